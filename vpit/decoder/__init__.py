"""The VPiT diffusion autoencoder ("decoder"): visual tokens -> pixels with a diffusers UNet.

Modules, one concern each:
    projector               VPiTDecoderProjector: (B, K, Dv) visual tokens -> (B, L, D) UNet context
    vision_encoder          VPiTVisionEncoderModel: the frozen vpit VisionEncoder as a diffusers component
    pipeline_vpit_decoder   VPiTDecoderPipeline: sampling, save / load, initialisation from Stable Diffusion
    training                decoder_loss, trainable parameters, EMA, validation reconstructions
    toy                     toy-world components (toy VAE, ~1 M UNet) and a tiny SD-layout folder
    card                    the pipeline's model card

Importing this package registers `VPiTDecoderPipeline` with diffusers, so that
`diffusers.DiffusionPipeline.from_pretrained(folder)` loads a saved decoder.
"""

from .card import build_decoder_model_card
from .pipeline_vpit_decoder import VPiTDecoderPipeline, register_with_diffusers
from .projector import PROJECTOR_TYPES, VPiTDecoderProjector
from .toy import (
    TOY_IMAGE_SIZE,
    save_tiny_stable_diffusion,
    toy_decoder_components,
    toy_scheduler_config,
    toy_unet_config,
    toy_vae_config,
)
from .training import (
    PREDICTION_TYPES,
    DecoderLossOutput,
    create_decoder_ema,
    decoder_loss,
    decoder_trainable_parameters,
    encode_latents,
    validation_reconstructions,
)
from .vision_encoder import VPiTVisionEncoderModel

register_with_diffusers()

__all__ = [
    "PREDICTION_TYPES",
    "PROJECTOR_TYPES",
    "TOY_IMAGE_SIZE",
    "DecoderLossOutput",
    "VPiTDecoderPipeline",
    "VPiTDecoderProjector",
    "VPiTVisionEncoderModel",
    "build_decoder_model_card",
    "create_decoder_ema",
    "decoder_loss",
    "decoder_trainable_parameters",
    "encode_latents",
    "register_with_diffusers",
    "save_tiny_stable_diffusion",
    "toy_decoder_components",
    "toy_scheduler_config",
    "toy_unet_config",
    "toy_vae_config",
    "validation_reconstructions",
]
