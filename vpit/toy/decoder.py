"""Decoder components for the toy world (built from configs) and a tiny Stable-Diffusion-layout folder for tests.

Toy world: 32x32 RGB images; a toy `AutoencoderKL` maps them to 8x8x4 latents (two downsamplings) and a ~1 M
parameter `UNet2DConditionModel` denoises those latents, cross-attending to the projected visual tokens. Pass
`latent=False` for a pixel-space variant (the UNet denoises 32x32x3 images; no VAE).

Example:
    >>> pipe = VPiTDecoderPipeline(**toy_decoder_components(vision_hidden_size=48, num_visual_tokens=4))
    >>> pipe(visual_tokens=torch.randn(1, 4, 48), num_inference_steps=10).images[0].size
    (32, 32)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

from ..decoder.projector import VPiTDecoderProjector

TOY_IMAGE_SIZE = 32
TOY_LATENT_CHANNELS = 4


def toy_vae_config(image_size: int = TOY_IMAGE_SIZE, downsamplings: int = 2) -> dict[str, Any]:
    """`AutoencoderKL` kwargs: (B, 3, S, S) renders <-> (B, 4, S / 2^d, S / 2^d) latents.

    downsamplings 2: blocks of 16, 32, 32 channels, 0.23 M parameters; 64x64 -> 16x16x4 (the toy world's VAE, see
        `vpit.toy.backbones.pretrain_toy_vae` for why), 32x32 -> 8x8x4 (the random VAE of `toy_decoder_components`);
    downsamplings 3: 64x64 -> 8x8x4, blocks of 16, 32, 32, 32 channels, 0.31 M parameters.
    No attention in the mid block: a flat object on a white canvas needs no global mixing, and without it the
    autoencoder merged colours less often in short runs. One normalisation group: a GroupNorm over groups of two
    channels normalises each pair of feature maps of a flat object on white by its own statistics, which leaves
    little of the object's colour; one group keeps the channels' ratios (see `pretrain_toy_vae`).
    """
    if downsamplings not in (2, 3):
        raise ValueError(f"downsamplings must be 2 (16x16 latents at 64 px) or 3 (8x8), got {downsamplings}")
    blocks = downsamplings + 1
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "block_out_channels": [16, 32, 32, 32][:blocks],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 1,
        "sample_size": image_size,
        "mid_block_add_attention": False,
    }


def toy_unet_config(
    cross_attention_dim: int = 64, latent: bool = True, latent_size: int = 8, spatial_channels: int = 0
) -> dict[str, Any]:
    """`UNet2DConditionModel` kwargs, ~1 M parameters (at cross_attention_dim 64).

    latent: on the toy VAE's 8x8x4 latents, two levels, cross-attention at 8x8 (1.08 M parameters); with
    `latent_size` 16 (the trained toy VAE: 64 px -> 16x16x4), three levels (16, 8, 4) with cross-attention at 8x8
    and 4x4 (1.89 M parameters): the 4x4 level matches the encoder's 4x4 token grid, and its features, next to the
    zero padding everywhere, know where they are, which placing the object at the right position needs.
    pixel space (`latent=False`): on 32x32x3 images, three levels, cross-attention only at the 8x8 level, where
    attention is cheap (1.25 M parameters).
    spatial_channels: extra input channels for the projector's spatial map (0: none).
    """
    common = {"layers_per_block": 1, "cross_attention_dim": cross_attention_dim, "attention_head_dim": 8}
    if latent and latent_size == 16:
        return {
            **common,
            "sample_size": 16,
            "in_channels": TOY_LATENT_CHANNELS + spatial_channels,
            "out_channels": TOY_LATENT_CHANNELS,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [48, 64, 64],
            "norm_num_groups": 16,
        }
    if latent:
        if latent_size != 8:
            raise ValueError(f"the toy latent UNet takes 8x8 or 16x16 latents, got {latent_size}")
        return {
            **common,
            "sample_size": 8,
            "in_channels": TOY_LATENT_CHANNELS + spatial_channels,
            "out_channels": TOY_LATENT_CHANNELS,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [48, 64],
            "norm_num_groups": 16,
        }
    return {
        **common,
        "sample_size": TOY_IMAGE_SIZE,
        "in_channels": 3 + spatial_channels,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 48, 64],
        "norm_num_groups": 16,
    }


def toy_scheduler_config() -> dict[str, Any]:
    """Stable Diffusion's training schedule (1000 steps, scaled-linear betas), ε-prediction, sampled by DPM-Solver++
    (2nd order) on 'trailing' timesteps, whose first step is the last training timestep (pure noise).

    Measured on the toy decoder (benchmarks/RESULTS.md, "The pictures"): DPM-Solver++ in 15 steps decodes as well
    as DDIM in 25 (generation 82.0% against 81.3-82.7%, reconstruction 90.0% against 90.0-90.6%, n = 150 / 180),
    in 60% of the UNet calls; 10 steps cost 3 points of reconstruction.
    """
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "timestep_spacing": "trailing",
    }


def toy_decoder_components(
    vision_hidden_size: int,
    num_visual_tokens: int,
    cross_attention_dim: int = 64,
    projector_hidden_size: int = 128,
    projector_type: str = "mlp",
    latent: bool = True,
    seed: int = 0,
    vae: AutoencoderKL | None = None,
    spatial_channels: int = 0,
) -> dict[str, Any]:
    """Randomly initialised toy decoder parts, ready for `VPiTDecoderPipeline(**components)`.

    Args:
        vision_hidden_size: Dv of the visual tokens.
        num_visual_tokens: K.
        cross_attention_dim: D, the UNet's context width.
        projector_hidden_size: the projector MLP's hidden width.
        projector_type: 'mlp' or 'query'.
        latent: True: toy VAE + UNet on 8x8x4 latents; False: UNet on 32x32x3 pixels, no VAE.
        seed: seeds the initialisation.
        vae: a trained `AutoencoderKL` to use instead of a random toy VAE (the toy world's, from
            `vpit.toy.backbones`); its latents must be 8x8x4 or 16x16x4, and the UNet is sized to match.
        spatial_channels: C > 0 adds the projector's spatial map, concatenated to the UNet's input (see
            `VPiTDecoderProjector`).

    Returns:
        {'unet', 'scheduler', 'projector', 'vae'} ('vae' is None when `latent` is False), in eval mode, the VAE
        frozen.
    """
    torch.manual_seed(seed)
    if vae is not None and not latent:
        raise ValueError("a VAE was given for a pixel-space (latent=False) toy decoder")
    if latent and vae is None:
        vae = AutoencoderKL(**toy_vae_config())
    latent_size = 8
    if vae is not None:
        latent_size = vae.config["sample_size"] // 2 ** (len(vae.config["block_out_channels"]) - 1)
    unet = UNet2DConditionModel(
        **toy_unet_config(
            cross_attention_dim, latent=latent, latent_size=latent_size, spatial_channels=spatial_channels
        )
    )
    projector = VPiTDecoderProjector(
        vision_hidden_size=vision_hidden_size,
        cross_attention_dim=cross_attention_dim,
        num_visual_tokens=num_visual_tokens,
        hidden_size=projector_hidden_size,
        context_length=None,  # trained from scratch: no pretrained context length to match
        projector_type=projector_type,
        spatial_channels=spatial_channels,
    )
    for module in (unet, projector, vae):
        if module is not None:
            module.eval()  # as `from_pretrained` returns models; training code switches the trainable ones to train()
    if vae is not None:
        vae.requires_grad_(False)  # the VAE is frozen in every decoder recipe
    return {
        "unet": unet,
        "scheduler": DPMSolverMultistepScheduler(**toy_scheduler_config()),
        "projector": projector,
        "vae": vae,
    }


def save_tiny_stable_diffusion(folder: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised, Stable-Diffusion-1.x-layout `StableDiffusionPipeline` (tiny UNet, VAE, CLIP
    text encoder with a 77-token context, CLIP tokenizer, PNDM scheduler) as a diffusers folder; 16 px images.

    Stands in for `stable-diffusion-v1-5/stable-diffusion-v1-5` where nothing can be downloaded.
    """
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_pndm import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate([*letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    components: dict[str, Any] = {  # None for the safety checker is how diffusers documents turning it off
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    pipeline = StableDiffusionPipeline(**components)
    pipeline.save_pretrained(folder)
    return folder


__all__ = [
    "TOY_IMAGE_SIZE",
    "save_tiny_stable_diffusion",
    "toy_decoder_components",
    "toy_scheduler_config",
    "toy_unet_config",
    "toy_vae_config",
]
