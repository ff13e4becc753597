"""The decoder pipeline's model card (README.md): diffusers-style metadata, the components, and how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from .pipeline_vpit_decoder import VPiTDecoderPipeline

CARD_TEMPLATE = """---
{card_data}
---

# {title}

The diffusion autoencoder ("decoder") of a [VPiT](https://github.com/vpit/vpit) model
([MetaMorph](https://arxiv.org/abs/2412.14164)): a 🧨 diffusers UNet whose cross-attention is conditioned on the
K continuous visual tokens of a frozen vision encoder (through a small projector) instead of text embeddings.
It turns visual tokens — encoded from an image, or predicted by a VPiT language model — into pixels.

## Components

| part | value |
|---|---|
| UNet | {unet} |
| {space_label} | {space} |
| scheduler | {scheduler} |
| projector | {projector} |
| zero condition (CFG negative, condition dropout) | all-zero context of shape ({context_length}, {cross_attention_dim}) |
| vision encoder | {vision} |

## Usage

```python
import torch
import vpit  # registers VPiTDecoderPipeline with diffusers
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}")
visual_tokens = torch.randn(1, {num_visual_tokens}, {vision_hidden_size})  # e.g. predicted by a VPiT model
image = pipe(visual_tokens=visual_tokens, guidance_scale=7.5, num_inference_steps=50).images[0]
{reconstruct}```
"""


def _millions(module: object) -> str:
    parameters = getattr(module, "parameters", None)
    count = sum(p.numel() for p in parameters()) if callable(parameters) else 0
    return f"{count / 1e6:.2f} M parameters"


def _hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id rather than a local folder."""
    if not name or Path(name).exists() or name.count("/") != 1 or name.startswith((".", "/")):
        return None
    return name


def build_decoder_model_card(
    pipeline: VPiTDecoderPipeline,
    repo_id: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """A model card for `pipeline`: YAML metadata (library_name diffusers, tags, base model) and a component table.

    Args:
        pipeline: the decoder pipeline to describe.
        repo_id: where it lives or will live on the Hub; used in the usage snippet.
        license: an SPDX-style licence id for the metadata.
        tags: extra tags, added to `vpit`, `metamorph`, `diffusers` and `image-to-image`.
    """
    projector: dict[str, Any] = dict(pipeline.projector.config)
    unet: dict[str, Any] = dict(pipeline.unet.config)
    source = pipeline.config.get("base_model")
    card_data = ModelCardData(
        library_name="diffusers",
        license=license,
        base_model=_hub_id(source),
        pipeline_tag="image-to-image",
        tags=["vpit", "metamorph", "diffusers", "diffusion-autoencoder", *(tags or [])],
    )
    if pipeline.vae is not None:
        space_label = "VAE (latent diffusion)"
        channels = pipeline.vae.config["latent_channels"]
        space = f"{type(pipeline.vae).__name__}, {channels} latent channels, {_millions(pipeline.vae)}"
    else:
        space_label = "space"
        space = f"pixel space, {unet['out_channels']} channels"
    padded = f", zero-padded to {projector['context_length']}" if projector["context_length"] else ""
    middle = f" -> {projector['hidden_size']} -> " if projector["projector_type"] == "mlp" else " -> queries -> "
    vision = "none (pass visual tokens)"
    reconstruct = ""
    if pipeline.vision_encoder is not None:
        spec = pipeline.vision_encoder.encoder.config
        vision = f"{spec.backend} `{spec.model_name}` (frozen, {_millions(pipeline.vision_encoder)})"
        reconstruct = (
            "\nfrom PIL import Image\n\n"
            'reconstruction = pipe(image=Image.open("photo.jpg")).images[0]  # encode -> project -> denoise\n'
        )
    unet_row = f"{type(pipeline.unet).__name__}, {unet['sample_size']} px samples, {_millions(pipeline.unet)}"
    if source:
        unet_row += f" (from `{source}`)"
    projector_row = (
        f"{projector['projector_type']}: {projector['num_visual_tokens']} x {projector['vision_hidden_size']}"
        f"{middle}{projector['cross_attention_dim']}{padded} ({_millions(pipeline.projector)})"
    )
    scheduler_config: dict[str, Any] = dict(pipeline.scheduler.config)
    fields = {
        "card_data": card_data.to_yaml(),
        "title": f"VPiT decoder — {repo_id}" if repo_id else "VPiT decoder",
        "unet": unet_row,
        "space_label": space_label,
        "space": space,
        "scheduler": f"{type(pipeline.scheduler).__name__}, prediction type "
        f"`{scheduler_config.get('prediction_type', 'epsilon')}`",
        "projector": projector_row,
        "context_length": pipeline.projector.output_length,
        "cross_attention_dim": projector["cross_attention_dim"],
        "vision": vision,
        "repo_id": repo_id or "path/to/decoder",
        "num_visual_tokens": projector["num_visual_tokens"],
        "vision_hidden_size": projector["vision_hidden_size"],
        "reconstruct": reconstruct,
    }
    return ModelCard(CARD_TEMPLATE.format(**fields))


__all__ = ["build_decoder_model_card"]
