"""The frozen vision encoder: open_clip or transformers towers -> patch tokens -> K pooled, normalised tokens.

Two backends, one contract:
    `patch_tokens(pixel_values)`  (B, 3, S, S) -> (B, N, Dv), N = g*g patch tokens of `feature_layer`
    `forward(pixel_values)`       (B, 3, S, S) -> (B, K, Dv), pooled to k x k and (optionally) L2-normalised

`resolve_vision_config` reads the encoder's architecture and preprocessing once (from the open_clip registry, a
`local-dir:` folder, the Hub, or a transformers config) and records them in the config, so that a saved VPiT
folder rebuilds the same encoder offline with `VisionEncoder(config, ...)`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import _build_vision_tower
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, PreTrainedConfig

from .configuration_vpit import VPiTVisionConfig

_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


# --------------------------------------------------------------------------------------------- resolution


def _open_clip_model_cfg(model_name: str) -> dict[str, Any]:
    """The open_clip `model_cfg` behind a registry name, `local-dir:` folder or `hf-hub:` repo."""
    schema, identifier = open_clip.factory.parse_model_name(model_name)
    if schema == "local-dir":
        path = Path(identifier) / "open_clip_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"open_clip folder {identifier} has no open_clip_config.json")
        return json.loads(path.read_text())["model_cfg"]
    if schema == "hf-hub":
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(identifier, "open_clip_config.json")).read_text())["model_cfg"]
    cfg = open_clip.get_model_config(identifier.replace("/", "-"))
    if cfg is None:
        raise ValueError(
            f"open_clip has no model named {model_name!r}; use a name from open_clip.list_models(), "
            "'hf-hub:org/repo' or 'local-dir:/path/to/folder'"
        )
    return cfg


def _hf_vision_config(model_name: str, trust_remote_code: bool = False) -> PreTrainedConfig:
    config = AutoConfig.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    # A full CLIP / SigLIP checkpoint holds the vision tower's config as a sub-config.
    return getattr(config, "vision_config", None) or config


def _hf_preprocess_config(model_name: str, vision_config: PreTrainedConfig) -> dict[str, Any]:
    """Translate a transformers image processor (if the folder has one) into open_clip's PreprocessCfg fields."""
    cfg = asdict(PreprocessCfg(size=vision_config.image_size))
    try:
        processor = AutoImageProcessor.from_pretrained(model_name)
    except OSError:  # tiny test towers and bare configs ship no preprocessor_config.json
        is_siglip = "siglip" in vision_config.model_type
        if is_siglip:
            cfg.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode="squash")
        return cfg
    size = dict(getattr(processor, "size", None) or {})
    crop = dict(getattr(processor, "crop_size", None) or {})
    cfg["mean"] = tuple(processor.image_mean)
    cfg["std"] = tuple(processor.image_std)
    cfg["interpolation"] = _PIL_RESAMPLE.get(int(getattr(processor, "resample", 3)), "bicubic")
    if "shortest_edge" in size:  # CLIP: resize the short side, then centre-crop
        cfg["resize_mode"] = "shortest"
        cfg["size"] = crop.get("height", size["shortest_edge"])
    else:  # SigLIP: resize straight to (height, width)
        cfg["resize_mode"] = "squash"
        cfg["size"] = size.get("height", vision_config.image_size)
    return cfg


def _build_tower(config: VPiTVisionConfig) -> nn.Module:
    """Build the tower from a resolved config, randomly initialised (weights come from a checkpoint)."""
    if config.model_config is None:
        raise ValueError(
            "vision_config.model_config is not resolved; call vpit.model.vision.resolve_vision_config(config) or "
            "assemble the model with vpit.assemble(...)"
        )
    if config.backend == "open_clip":
        cfg = config.model_config
        tower = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))
        preprocess = merge_preprocess_dict(asdict(PreprocessCfg()), config.preprocess_config or {})
        open_clip.factory.set_model_preprocess_cfg(tower, preprocess)
        return tower
    hf_config = AutoConfig.for_model(**copy.deepcopy(config.model_config))
    return AutoModel.from_config(hf_config)


def _load_pretrained_tower(config: VPiTVisionConfig, trust_remote_code: bool = False) -> nn.Module:
    if config.backend == "open_clip":
        schema, _ = open_clip.factory.parse_model_name(config.model_name)
        if config.pretrained is None and schema is None:
            # A registry architecture with no weights named: random init (tests, or training from scratch).
            return _build_tower(config)
        model = open_clip.create_model(config.model_name, pretrained=config.pretrained, weights_only=True)
        return model.visual
    hf_config = AutoConfig.for_model(**copy.deepcopy(config.model_config or {}))
    model_cls: Any = AutoModel._model_mapping[type(hf_config)]  # e.g. SiglipVisionModel, CLIPVisionModel
    return model_cls.from_pretrained(config.model_name, trust_remote_code=trust_remote_code)


def resolve_vision_config(config: VPiTVisionConfig, trust_remote_code: bool = False) -> VPiTVisionConfig:
    """Return a copy of `config` with `model_config` and `preprocess_config` filled in.

    Reads the open_clip registry, a `local-dir:` folder's open_clip_config.json, or a transformers config (which
    may download a small JSON file for a Hub id). Weights are not read here.
    """
    config = copy.deepcopy(config)
    if config.backend == "open_clip":
        if config.model_config is None:
            config.model_config = _open_clip_model_cfg(config.model_name)
        if config.preprocess_config is None:
            pre = asdict(PreprocessCfg())
            schema, identifier = open_clip.factory.parse_model_name(config.model_name)
            if schema == "local-dir":
                local = json.loads((Path(identifier) / "open_clip_config.json").read_text())
                pre = merge_preprocess_dict(pre, local.get("preprocess_cfg", {}))
            elif config.pretrained and (tag := open_clip.get_pretrained_cfg(config.model_name, config.pretrained)):
                pre = merge_preprocess_dict(pre, tag)
            pre["size"] = config.model_config["vision_cfg"].get("image_size", pre["size"])
            config.preprocess_config = pre
    else:
        if config.model_config is None:
            config.model_config = _hf_vision_config(config.model_name, trust_remote_code).to_dict()
        if config.preprocess_config is None:
            hf_config = AutoConfig.for_model(**copy.deepcopy(config.model_config))
            config.preprocess_config = _hf_preprocess_config(config.model_name, hf_config)
    config.preprocess_config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.preprocess_config.items()}
    return config


# --------------------------------------------------------------------------------------------- the module


class VisionEncoder(nn.Module):
    """A frozen vision tower that returns K pooled visual tokens per image.

    Args:
        config: a resolved `VPiTVisionConfig` (see `resolve_vision_config`).
        num_visual_tokens: K, a square number.
        pooling: 'bilinear' (MetaMorph) or 'avg' (adaptive average) from the g x g patch grid to k x k.
        normalize: L2-normalise each pooled token along Dv.
        tower: an already-built tower (e.g. with pretrained weights); built from `config` when omitted.

    Example:
        >>> enc = VisionEncoder(resolve_vision_config(VPiTVisionConfig(model_name="ViT-B-16")), 64)
        >>> enc(torch.zeros(2, 3, 224, 224)).shape
        torch.Size([2, 64, 768])
    """

    def __init__(
        self,
        config: VPiTVisionConfig,
        num_visual_tokens: int,
        pooling: str = "bilinear",
        normalize: bool = True,
        tower: nn.Module | None = None,
    ):
        super().__init__()
        self.config = config
        self.num_visual_tokens = num_visual_tokens
        self.grid = math.isqrt(num_visual_tokens)
        self.pooling = pooling
        self.normalize = normalize
        # open_clip and transformers towers expose different attributes (trunk, transformer, config): Any.
        self.tower: Any = tower if tower is not None else _build_tower(config)
        self.freeze()
        self._block_index = self._resolve_block_index()

    @classmethod
    def from_pretrained_spec(
        cls, config: VPiTVisionConfig, num_visual_tokens: int, trust_remote_code: bool = False, **kwargs: Any
    ) -> VisionEncoder:
        """Resolve `config` and load the tower's pretrained weights (open_clip tag/file/folder or HF weights)."""
        config = resolve_vision_config(config, trust_remote_code=trust_remote_code)
        tower = _load_pretrained_tower(config, trust_remote_code=trust_remote_code)
        encoder = cls(config, num_visual_tokens, tower=tower, **kwargs)
        with torch.no_grad():
            probe = encoder.patch_grid(torch.zeros(1, 3, *encoder.image_size))
        config.hidden_size = int(probe.shape[1])
        return encoder

    # ---- introspection

    def _num_blocks(self) -> int:
        tower = self.tower
        if self.config.backend == "hf":
            return int(tower.config.num_hidden_layers)
        if hasattr(tower, "trunk"):  # open_clip TimmModel (SigLIP, EVA, ...)
            return len(tower.trunk.blocks)
        if hasattr(tower, "transformer"):  # open_clip VisionTransformer
            return len(tower.transformer.resblocks)
        raise ValueError(f"{type(tower).__name__} is not a ViT; VPiT needs patch tokens, so pick a ViT open_clip model")

    def _resolve_block_index(self) -> int:
        """0-based index of the block whose output we take (feature_layer -1 = last, k >= 1 = block k)."""
        n = self._num_blocks()
        layer = self.config.feature_layer
        index = n + layer if layer < 0 else layer - 1
        if not 0 <= index < n:
            raise ValueError(f"vision_config.feature_layer={layer} is out of range for a {n}-block encoder")
        return index

    @property
    def image_size(self) -> tuple[int, int]:
        size = (self.config.preprocess_config or {}).get("size", 224)
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def hidden_size(self) -> int:
        """Dv."""
        if self.config.hidden_size is not None:
            return int(self.config.hidden_size)
        if self.config.backend == "hf":
            return int(self.tower.config.hidden_size)
        if hasattr(self.tower, "trunk"):
            return int(self.tower.trunk.embed_dim)
        return int(self.tower.transformer.width)

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The eval-time PIL -> tensor transform of this encoder (open_clip's, from the resolved PreprocessCfg)."""
        return build_image_transform(self.config.preprocess_config or {})

    def freeze(self) -> None:
        """No gradients, eval mode (no dropout / drop-path) whatever mode the parent model is in."""
        self.tower.requires_grad_(False)
        self.tower.eval()

    def train(self, mode: bool = True) -> VisionEncoder:
        super().train(mode)
        self.tower.eval()  # frozen: no dropout / drop-path, whatever mode the model is in
        return self

    # ---- forward

    def _gathered(self) -> contextlib.AbstractContextManager[Any]:
        """Under DeepSpeed ZeRO-3 a module's own parameters are gathered only when that module is *called*;
        `forward_intermediates` reads the tower's position / class embeddings directly, so gather the (frozen)
        tower's partitioned parameters around it. A no-op otherwise."""
        partitioned = [p for p in self.tower.parameters() if hasattr(p, "ds_id")]
        if not partitioned:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)

    def patch_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, Dv, g, g) patch tokens of the chosen block, before the final norm."""
        with self._gathered():
            return self._patch_grid(pixel_values)

    def _patch_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.config.backend == "hf":
            # The embeddings and the blocks up to the chosen one, no further: the later blocks, the post-LayerNorm
            # and SigLIP's attention-pooling head would run for nothing.
            vision = getattr(self.tower, "vision_model", self.tower)  # a full CLIP / SigLIP model, or its tower
            tokens = vision.embeddings(pixel_values)  # (B, N (+1), Dv)
            if getattr(vision, "pre_layrnorm", None) is not None:  # CLIP normalises before its first block
                tokens = vision.pre_layrnorm(tokens)
            for layer in vision.encoder.layers[: self._block_index + 1]:
                out = layer(tokens, None)
                tokens = out[0] if isinstance(out, tuple) else out
            side = math.isqrt(tokens.shape[1])
            prefix = tokens.shape[1] - side * side  # CLIP's class token; SigLIP has none
            tokens = tokens[:, prefix:]  # (B, N, Dv)
            return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        out = self.tower.forward_intermediates(
            pixel_values,
            indices=[self._block_index],
            normalize_intermediates=False,
            intermediates_only=True,
            output_fmt="NCHW",
        )
        return out["image_intermediates"][0]

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, Dv)."""
        return self.patch_grid(pixel_values).flatten(2).transpose(1, 2)

    def pool(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, Dv, g, g) -> (B, K, Dv), pooled to k x k and optionally L2-normalised."""
        if self.pooling == "bilinear":
            pooled = F.interpolate(grid, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        else:
            pooled = F.adaptive_avg_pool2d(grid, (self.grid, self.grid))
        tokens = pooled.flatten(2).transpose(1, 2)  # (B, K, Dv)
        return F.normalize(tokens, dim=-1) if self.normalize else tokens

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, with_patches: bool = False) -> Any:
        """(B, 3, S, S) -> (B, K, Dv); with `with_patches`, also the patch tokens they pool, (B, N, Dv), from the same
        pass. No gradient: the encoder is frozen and its tokens are targets. (Both go through this forward, so that
        DeepSpeed ZeRO-3, which checks that every rank calls the same modules in the same order, sees one module.)"""
        dtype = next(self.tower.parameters()).dtype  # (under ZeRO-3 an empty placeholder, but of the right dtype)
        grid = self.patch_grid(pixel_values.to(dtype))
        return (self.pool(grid), grid.flatten(2).transpose(1, 2)) if with_patches else self.pool(grid)

    def encode_with_patches(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> the pooled tokens (B, K, Dv) and the patch tokens they pool (B, N, Dv), from one pass."""
        pooled, patches = self(pixel_values, with_patches=True)
        return pooled, patches


def build_image_transform(preprocess_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's eval transform (resize, crop, to tensor, normalise) for a PreprocessCfg dict."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in preprocess_config.items()}
    return image_transform_v2(PreprocessCfg(**fields), is_train=False)


__all__ = ["VisionEncoder", "build_image_transform", "resolve_vision_config"]
