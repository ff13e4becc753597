"""The decoder pipeline's optional vision encoder: `vpit.VisionEncoder` as a diffusers component.

A `DiffusionPipeline` saves and loads each component through `ModelMixin`/`ConfigMixin`; this wrapper records the
resolved `VPiTVisionConfig` (plus K, pooling and normalisation) in its config.json and the tower's weights in
diffusion_pytorch_model.safetensors, so a saved decoder folder can encode and reconstruct images offline, with no
open_clip registry, Hub or `local-dir:` folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image

from ..model.configuration_vpit import POOLING_MODES, VPiTVisionConfig
from ..model.vision import VisionEncoder, resolve_vision_config


# diffusers models combine the two mixins the same way; their `config_name` types disagree in diffusers itself.
class VPiTVisionEncoderModel(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """A frozen `VisionEncoder` (image -> (B, K, Dv) visual tokens) that saves like any diffusers model.

    Args:
        vision_config: a resolved `VPiTVisionConfig` as a dict (`config.to_diff_dict()`); see `from_vision_encoder`
            and `from_spec` for the usual ways in.
        num_visual_tokens: K, a square number.
        pooling: 'bilinear' or 'avg'.
        normalize: L2-normalise each visual token.

    Example:
        >>> encoder = VPiTVisionEncoderModel.from_vision_encoder(model.vision_tower)  # from a VPiT model
        >>> pipe = VPiTDecoderPipeline(unet=unet, scheduler=scheduler, projector=projector, vision_encoder=encoder)
    """

    @register_to_config
    def __init__(
        self,
        vision_config: dict[str, Any] | None = None,
        num_visual_tokens: int = 64,
        pooling: str = "bilinear",
        normalize: bool = True,
    ):
        super().__init__()
        if vision_config is None:
            raise ValueError(
                "vision_config is required: pass a resolved VPiTVisionConfig as a dict, or build the component "
                "with VPiTVisionEncoderModel.from_vision_encoder(...) / .from_spec(...)"
            )
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {list(POOLING_MODES)}, got {pooling!r}")
        config = VPiTVisionConfig.from_dict(vision_config)
        self.encoder = VisionEncoder(config, num_visual_tokens, pooling=pooling, normalize=normalize)

    @classmethod
    def from_vision_encoder(cls, encoder: VisionEncoder) -> VPiTVisionEncoderModel:
        """Wrap an existing encoder (e.g. `VPiTForCausalLM.vision_tower`), sharing its weights."""
        with torch.device("meta"):  # the placeholder tower is replaced at once: allocate nothing for it
            model = cls(
                vision_config=_config_dict(encoder.config),
                num_visual_tokens=encoder.num_visual_tokens,
                pooling=encoder.pooling,
                normalize=encoder.normalize,
            )
        model.encoder = encoder
        return model

    @classmethod
    def from_spec(
        cls,
        vision_config: VPiTVisionConfig,
        num_visual_tokens: int = 64,
        pooling: str = "bilinear",
        normalize: bool = True,
        trust_remote_code: bool = False,
    ) -> VPiTVisionEncoderModel:
        """Resolve `vision_config` and load the tower's pretrained weights (open_clip tag, file or folder; HF id)."""
        encoder = VisionEncoder.from_pretrained_spec(
            resolve_vision_config(vision_config, trust_remote_code=trust_remote_code),
            num_visual_tokens,
            pooling=pooling,
            normalize=normalize,
            trust_remote_code=trust_remote_code,
        )
        return cls.from_vision_encoder(encoder)

    @property
    def hidden_size(self) -> int:
        """Dv."""
        return self.encoder.hidden_size

    @property
    def image_size(self) -> tuple[int, int]:
        return self.encoder.image_size

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The encoder's eval-time PIL -> (3, S, S) tensor transform."""
        return self.encoder.image_transform()

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """PIL image(s) -> (B, 3, S, S) pixel values for `forward`, on this model's device."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        transform = self.image_transform()
        return torch.stack([transform(image.convert("RGB")) for image in images]).to(self.device)

    def train(self, mode: bool = True) -> VPiTVisionEncoderModel:
        super().train(mode)
        self.encoder.freeze()  # frozen whatever the pipeline's mode; loading also re-creates Parameters
        return self

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed pixels -> (B, K, Dv) visual tokens."""
        return self.encoder(pixel_values)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> VPiTVisionEncoderModel:
        """`ModelMixin.from_pretrained`, then re-freeze (loading swaps in fresh Parameters with requires_grad=True)."""
        model = super().from_pretrained(*args, **kwargs)
        model.encoder.freeze()
        return model


def _config_dict(config: VPiTVisionConfig) -> dict[str, Any]:
    """The JSON-able, version-free diff of a VPiTVisionConfig (rebuilt with `VPiTVisionConfig.from_dict`)."""
    if config.model_config is None:
        config = resolve_vision_config(config)
    values = config.to_diff_dict()
    values.pop("transformers_version", None)
    return values


__all__ = ["VPiTVisionEncoderModel"]
