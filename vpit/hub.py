"""Hugging Face Hub I/O, in one place: the model cards of both folders vpit saves, and every upload.

    VPiT model folder (config.json, model_type "vpit")      -> `build_model_card`
    decoder folder (model_index.json, VPiTDecoderPipeline)  -> `build_decoder_model_card`
    either                                                  -> `write_model_card`, `push_folder`, `push_to_hub`
    evaluation figures into either's card (model-index)     -> `write_eval_results`

Cards are built from the saved files alone (configs and safetensors headers), so a folder can be described and
pushed without loading its weights. Tokens are handed to `huggingface_hub.HfApi` only (or read by it from
HF_TOKEN / the login cache); vpit never writes them to disk or to logs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .errors import REPO_ID_PATTERN, FolderError
from .model.resamplers import RESAMPLERS

MODEL_CARD_TEMPLATE = """---
{card_data}
---

# {title}

A unified vision-language model trained with **Visual-Predictive Instruction Tuning** (VPiT,
[MetaMorph](https://arxiv.org/abs/2412.14164)) using [vpit](https://github.com/vpit/vpit): it answers questions
about images and generates images by predicting continuous visual tokens, which a diffusion decoder turns into
pixels.

## Architecture

| part | value |
|---|---|
| language model | {llm} |
| vision encoder ({backend}) | {vision} (feature layer {feature_layer}, frozen) |
| visual tokens per image (K) | {num_visual_tokens} ({pooling} pooling, L2-normalised: {normalize}) |
| bridge | {bridge} |
| attention among an input image's tokens | {image_attention} |
| how images are made | {generation} |
| visual head | {visual_head} |
| visual loss | {visual_loss}, weight λ_v {visual_loss_weight} (text CE: λ_t {text_loss_weight}) |
{extra_rows}
## Usage

```python
import vpit  # registers the "vpit" model type with the transformers Auto classes
from vpit import VPiTForCausalLM, VPiTProcessor

model = VPiTForCausalLM.from_pretrained("{repo_id}")
processor = VPiTProcessor.from_pretrained("{repo_id}")
batch = processor(text=["<image> Describe the image."], images=["photo.jpg"])
outputs = model(**batch)
```
{training}"""


DECODER_CARD_TEMPLATE = """---
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
{extra_rows}
## Usage

```python
import torch
import vpit  # registers VPiTDecoderPipeline with diffusers
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}")
visual_tokens = torch.randn(1, {num_visual_tokens}, {vision_hidden_size})  # e.g. predicted by a VPiT model
image = pipe(visual_tokens=visual_tokens, guidance_scale=7.5, num_inference_steps=50).images[0]
{reconstruct}```
{training}"""


def _hub_id(name: str | None) -> str | None:
    """`name` if it looks like a Hub repo id (not a local path), else None."""
    if not name:
        return None
    name = name.removeprefix("hf-hub:").rstrip("/")
    if Path(name).exists() or not REPO_ID_PATTERN.match(name):
        return None
    return name


LOCAL = "<local path>"


def _public(value: Any) -> Any:
    """A recipe value as a card may publish it: Hub ids and plain names stay, local filesystem paths (folders,
    files, `local-dir:` references) become `<local path>`, so no card shows the machine it was trained on."""
    if isinstance(value, dict):
        return {key: _public(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_public(item) for item in value]
    if not isinstance(value, str) or not value:
        return value
    if value.startswith(("local-dir:", "file:")):
        return f"{value.split(':', 1)[0]}:{LOCAL}"
    if _hub_id(value) is not None or "://" in value:  # a repo id (not an existing local folder) or a URL
        return value
    if "/" in value or "\\" in value or value.startswith("~") or Path(value).exists():
        return LOCAL
    return value


def _metrics_and_training(metrics: dict[str, float] | None, training_config: dict[str, Any] | None) -> tuple[str, str]:
    """A card's metric rows and its training-configuration section (local paths removed)."""
    rows = "".join(f"| {name} | {value} |\n" for name, value in (metrics or {}).items())
    if training_config is None:
        return rows, ""
    public = json.dumps(_public(training_config), indent=2)
    return rows, "\n## Training configuration\n\n```json\n" + public + "\n```\n"


def _vision_hub_id(vision: dict[str, Any]) -> str | None:
    if vision.get("backend") == "open_clip" and vision.get("pretrained"):
        import open_clip

        tag = open_clip.get_pretrained_cfg(vision["model_name"], vision["pretrained"]) or {}
        if tag.get("hf_hub"):
            return _hub_id(tag["hf_hub"])
    return _hub_id(vision.get("model_name"))


def _generation_row(config: dict[str, Any]) -> str:
    """The generation mode: predicted visual tokens, or learned queries through a connector (their sizes)."""
    if config.get("generation_mode", "tokens") != "queries":
        return "tokens: the visual head predicts the K encoder tokens, which the decoder turns into pixels"
    options = ", ".join(f"{k} {v}" for k, v in (config.get("connector_options") or {}).items())
    connector = f"{config.get('connector')}{f' ({options})' if options else ''}"
    return (
        f"queries: {config.get('num_queries')} learned queries after <image_start>, their hidden states through a "
        f"{connector} connector into the decoder's condition (trained end to end with it)"
    )


def _bridge_row(config: dict[str, Any]) -> str:
    """The bridge, and for a resampler its sizes and the token-wise bridge of response images."""
    bridge = str(config.get("bridge"))
    if bridge not in RESAMPLERS:
        return bridge
    options = ", ".join(f"{k} {v}" for k, v in (config.get("bridge_options") or {}).items())
    sizes = f" ({options})" if options else " (the published sizes)"
    return f"{bridge}{sizes} on the patch tokens of prompt images; response images: {config.get('token_bridge')}"


def build_model_card(
    folder: str | Path,
    repo_id: str,
    *,
    license: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    training_config: dict[str, Any] | None = None,
) -> ModelCard:
    """A model card for the VPiT folder `folder`, with YAML metadata (base models, library_name, tags,
    datasets, licence) read from its config.json, an architecture table, a usage snippet, and optionally the
    training config and final metrics."""
    config = json.loads((Path(folder) / "config.json").read_text())
    discrete = config.get("visual_target", "continuous") == "discrete"
    vision = config.get("vision_config", {})
    base_models = [m for m in (_hub_id(config.get("text_model_name_or_path")), _vision_hub_id(vision)) if m]
    card_data = ModelCardData(
        base_model=base_models or None,
        library_name="vpit",
        pipeline_tag="any-to-any",
        license=license,
        datasets=datasets,
        tags=[
            "vpit",
            "metamorph",
            "multimodal",
            "image-generation",
            "visual-predictive-instruction-tuning",
            *(tags or []),
        ],
    )
    extra_rows, training = _metrics_and_training(metrics, training_config)
    text = MODEL_CARD_TEMPLATE.format(
        card_data=card_data.to_yaml(),
        title=repo_id.split("/")[-1],
        llm=_public(config.get("text_model_name_or_path")) or config.get("text_config", {}).get("model_type", "?"),
        backend=vision.get("backend", "?"),
        vision=_public(vision.get("model_name", "?"))
        + (f" ({_public(vision['pretrained'])})" if vision.get("pretrained") else ""),
        feature_layer=vision.get("feature_layer", -1),
        num_visual_tokens=config.get("num_visual_tokens"),
        pooling=config.get("pooling"),
        normalize=config.get("normalize_visual_tokens"),
        bridge=_bridge_row(config),
        image_attention=config.get("image_attention", "causal"),
        generation=_generation_row(config),
        visual_head=config.get("visual_head")
        if not discrete
        else f"none: the LM head's {config.get('visual_codebook_size')} code tokens (a k-means codebook)",
        visual_loss=config.get("visual_loss", "cosine") if not discrete else "cross-entropy over the codes",
        visual_loss_weight=config.get("visual_loss_weight"),
        text_loss_weight=config.get("text_loss_weight", 1.0),
        extra_rows=extra_rows,
        repo_id=repo_id,
        training=training,
    )
    return ModelCard(text)


def _parameters(folder: Path) -> str:
    """The parameter count of a component folder, read from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    count = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                count += math.prod(weights.get_slice(name).get_shape())
    return f"{count / 1e6:.2f} M parameters"


def _component_config(folder: Path, name: str) -> dict[str, Any]:
    files = [folder / name / n for n in ("config.json", "scheduler_config.json")]
    return next((json.loads(f.read_text()) for f in files if f.is_file()), {})


def build_decoder_model_card(
    folder: str | Path,
    repo_id: str | None = None,
    *,
    license: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    training_config: dict[str, Any] | None = None,
) -> ModelCard:
    """A model card for the saved decoder folder `folder` (a `VPiTDecoderPipeline`): YAML metadata (library_name
    diffusers, tags, base model), a component table, a usage snippet, and optionally metrics and the training
    config.

    Args:
        folder: the decoder folder (model_index.json and one subfolder per component).
        repo_id: where it lives or will live on the Hub; used in the title and the usage snippet.
        license: an SPDX-style licence id for the metadata.
        datasets: Hub ids of the image data it was trained on.
        tags: extra tags, added to `vpit`, `metamorph`, `diffusers` and `diffusion-autoencoder`.
    """
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json; save the decoder with save_pretrained first")
    index = json.loads(index_file.read_text())
    projector = _component_config(folder, "projector")
    unet = _component_config(folder, "unet")
    scheduler = _component_config(folder, "scheduler")
    source = index.get("base_model")
    card_data = ModelCardData(
        library_name="diffusers",
        license=license,
        datasets=datasets or None,
        base_model=_hub_id(source),
        pipeline_tag="image-to-image",
        tags=["vpit", "metamorph", "diffusers", "diffusion-autoencoder", *(tags or [])],
    )
    if (index.get("vae") or [None])[0] is not None:
        vae = _component_config(folder, "vae")
        space_label = "VAE (latent diffusion)"
        space = f"{index['vae'][1]}, {vae['latent_channels']} latent channels, {_parameters(folder / 'vae')}"
    else:
        space_label, space = "space", f"pixel space, {unet['out_channels']} channels"
    padded = f", zero-padded to {projector['context_length']}" if projector.get("context_length") else ""
    middle = f" -> {projector['hidden_size']} -> " if projector["projector_type"] == "mlp" else " -> queries -> "
    vision, reconstruct = "none (pass visual tokens)", ""
    if (index.get("vision_encoder") or [None])[0] is not None:
        spec = _component_config(folder, "vision_encoder")["vision_config"]
        vision = f"{spec['backend']} `{_public(spec['model_name'])}` (frozen, {_parameters(folder / 'vision_encoder')})"
        reconstruct = (
            "\nfrom PIL import Image\n\n"
            'reconstruction = pipe(image=Image.open("photo.jpg")).images[0]  # encode -> project -> denoise\n'
        )
    unet_row = f"{index['unet'][1]}, {unet['sample_size']} px samples, {_parameters(folder / 'unet')}"
    if source:
        unet_row += f" (from `{_public(source)}`)"
    tokens_out = projector.get("num_queries") or projector["num_visual_tokens"]
    extra_rows, training = _metrics_and_training(metrics, training_config)
    text = DECODER_CARD_TEMPLATE.format(
        card_data=card_data.to_yaml(),
        title=f"VPiT decoder — {repo_id}" if repo_id else "VPiT decoder",
        unet=unet_row,
        space_label=space_label,
        space=space,
        scheduler=f"{index['scheduler'][1]}, prediction type `{scheduler.get('prediction_type', 'epsilon')}`",
        projector=f"{projector['projector_type']}: {projector['num_visual_tokens']} x "
        f"{projector['vision_hidden_size']}{middle}{projector['cross_attention_dim']}{padded} "
        f"({_parameters(folder / 'projector')})",
        context_length=projector.get("context_length") or tokens_out,
        cross_attention_dim=projector["cross_attention_dim"],
        vision=vision,
        extra_rows=extra_rows,
        repo_id=repo_id or "path/to/decoder",
        num_visual_tokens=projector["num_visual_tokens"],
        vision_hidden_size=projector["vision_hidden_size"],
        reconstruct=reconstruct,
        training=training,
    )
    return ModelCard(text)


def write_model_card(folder: str | Path, repo_id: str | None = None, **card_kwargs: Any) -> Path:
    """Write README.md into a saved VPiT model folder or decoder folder (whichever `folder` is). Returns its path.

    `card_kwargs` go to `build_model_card` / `build_decoder_model_card` (license, tags, metrics, training_config;
    datasets for a model).
    """
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        card = build_decoder_model_card(folder, repo_id, **card_kwargs)
    elif (folder / "config.json").is_file():
        card = build_model_card(folder, repo_id or folder.name, **card_kwargs)
    else:
        raise FolderError(
            f"{folder} is neither a VPiT model folder (config.json) nor a decoder folder (model_index.json); "
            "save it with save_pretrained first"
        )
    card.save(folder / "README.md")
    return folder / "README.md"


def eval_result_key(result: EvalResult) -> tuple[str | None, ...]:
    """What makes two results the same figure: task, dataset (type, config, split) and metric (type, config)."""
    return (
        result.task_type,
        result.dataset_type,
        result.dataset_config,
        result.dataset_split,
        result.metric_type,
        result.metric_config,
    )


def write_eval_results(folder: str | Path, results: Sequence[EvalResult], *, model_name: str | None = None) -> Path:
    """Write evaluation figures into the README.md card of a saved model or decoder folder as Hub `model-index`
    metadata, which the Hub shows on the model's page once the folder is pushed.

    The card's other results stay; a result with the key of one already there (`eval_result_key`) replaces it in
    place. The card's other metadata and its text stay as they are. A folder without a card gets vpit's generated
    card first (`write_model_card`). Local paths in a metric's config become `<local path>`.

    Args:
        folder: a saved VPiT model folder or decoder folder.
        results: huggingface_hub `EvalResult`s, e.g. from `vpit.evaluation.model_index`.
        model_name: the model-index's name; default: the card's, else the folder's name.

    Returns:
        the card's path.

    Example:
        >>> write_eval_results("outputs/toy/vpit/final", toy_eval_results(report))
    """
    if not results:
        raise ValueError("no evaluation results to write into the model card")
    folder = Path(folder)
    path = folder / "README.md"
    if not path.is_file():
        write_model_card(folder)
    card = ModelCard.load(path)
    merged = {eval_result_key(result): result for result in card.data.eval_results or []}
    for result in results:
        public = dataclasses.replace(result, metric_config=_public(result.metric_config))
        merged[eval_result_key(public)] = public  # an existing key keeps its place
    card.data.eval_results = list(merged.values())
    card.data.model_name = model_name or card.data.model_name or folder.name
    card.save(path)
    return path


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload with vpit",
    create_pr: bool = False,
    **card_kwargs: Any,
) -> str:
    """Upload a saved VPiT model folder or decoder folder to `repo_id`, writing its model card first when the
    folder has no README.md. Returns the commit URL.

    Example:
        >>> push_folder("outputs/toy/vpit/final", "me/vpit-toy", private=True, license="apache-2.0")
    """
    folder = Path(folder)
    if not (folder / "README.md").exists():
        write_model_card(folder, repo_id, **card_kwargs)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, commit_message=commit_message, create_pr=create_pr
    )
    return str(commit.commit_url)


def push_to_hub(
    obj: Any,
    repo_id: str,
    *,
    processor: Any = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload with vpit",
    create_pr: bool = False,
    **card_kwargs: Any,
) -> str:
    """Save a `VPiTForCausalLM` (with its `processor`) or a `VPiTDecoderPipeline` to a temporary folder with its
    model card, and upload it. Returns the commit URL.

    Example:
        >>> push_to_hub(model, "me/vpit-llama3-siglip", processor=processor, license="llama3.1")
        >>> push_to_hub(decoder, "me/vpit-llama3-siglip-decoder")
    """
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        obj.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        return push_folder(
            folder,
            repo_id,
            token=token,
            private=private,
            commit_message=commit_message,
            create_pr=create_pr,
            **card_kwargs,
        )


__all__ = [
    "build_decoder_model_card",
    "build_model_card",
    "eval_result_key",
    "push_folder",
    "push_to_hub",
    "write_eval_results",
    "write_model_card",
]
