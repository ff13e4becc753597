"""The VPiT decoder (the diffusion autoencoder): visual tokens -> pixels with a diffusers UNet. Inference only.

Modules, one concern each:
    projector               VPiTDecoderProjector: (B, K, Dv) visual tokens -> (B, L, D) UNet context
    vision_encoder          VPiTVisionEncoderModel: the frozen vpit VisionEncoder as a diffusers component
    pipeline_vpit_decoder   VPiTDecoderPipeline: sampling, save / load, initialisation from Stable Diffusion

Training lives in `vpit.training` (the `decoder` stage and `vpit.training.diffusion`), model cards and uploads in
`vpit.hub`, the toy world's decoder parts in `vpit.toy.decoder`. Importing this package registers
`VPiTDecoderPipeline` with diffusers, so that `diffusers.DiffusionPipeline.from_pretrained(folder)` loads a saved
decoder.
"""

from .pipeline_vpit_decoder import VPiTDecoderPipeline, register_with_diffusers
from .projector import PROJECTOR_TYPES, VPiTDecoderProjector
from .vision_encoder import VPiTVisionEncoderModel

register_with_diffusers()

__all__ = [
    "PROJECTOR_TYPES",
    "VPiTDecoderPipeline",
    "VPiTDecoderProjector",
    "VPiTVisionEncoderModel",
    "register_with_diffusers",
]
