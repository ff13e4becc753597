"""Adapters between the vision encoder and the LLM, behind one small registry each.

    bridge       encoder tokens (.., Dv) -> LLM input embeddings (.., H), token-wise; or a resampler of the patch tokens
                 (`vpit.model.resamplers`: Perceiver, Q-Formers) for the prompt's images
    visual head  LLM hidden states (.., H) -> predicted visual tokens (.., Dv); `diffusion` samples them
                 (`vpit.model.diffusion_head`), the others regress them

A name in the config (`VPiTConfig.bridge`, `VPiTConfig.visual_head`) selects a builder here; adding a variant is
one function plus one registry line. Bridge names may carry a depth: `mlpNx_gelu` is N Linear layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

from .diffusion_head import DiffusionHead
from .resamplers import RESAMPLERS

_MLP_BRIDGE = re.compile(r"^mlp(\d+)x_gelu$")


class Bridge(nn.Sequential):
    """A bridge's layers. A type of its own so that sharding (FSDP2 wraps each `_no_split_modules` class as a unit)
    and device maps treat the bridge as one piece; its state-dict keys are a plain `nn.Sequential`'s."""


class VisualHead(nn.Sequential):
    """A visual head's layers (see `Bridge`)."""


def _mlp_gelu(depth: int, vision_size: int, hidden_size: int) -> Bridge:
    """Linear(Dv, H) then (GELU, Linear(H, H)) x (depth - 1); `mlp2x_gelu` is LLaVA-1.5's projector and MetaMorph's
    1152 -> 4096 -> 4096 bridge."""
    layers: list[nn.Module] = [nn.Linear(vision_size, hidden_size)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return Bridge(*layers)


def _linear_head(hidden_size: int, vision_size: int) -> VisualHead:
    """Linear(H, Dv)."""
    return VisualHead(nn.Linear(hidden_size, vision_size))


def _mlp_head(hidden_size: int, vision_size: int) -> VisualHead:
    """Linear(H, H)-GELU-Linear(H, Dv) (MetaMorph: 4096 -> 4096 -> 1152)."""
    return VisualHead(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, vision_size))


# name -> builder(Dv, H); `mlpNx_gelu` is parsed (see `check_bridge`).
BRIDGES: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": lambda vision_size, hidden_size: _mlp_gelu(1, vision_size, hidden_size),
}


def _diffusion_head(hidden_size: int, vision_size: int, **options: Any) -> DiffusionHead:
    """MAR's per-token flow-matching denoiser conditioned on the hidden state; `options` are `DiffusionHead`'s
    (width, depth, batch_mul, condition_dropout, steps, temperature, guidance_scale)."""
    return DiffusionHead(hidden_size, vision_size, **options)


# name -> builder(H, Dv, **VPiTConfig.visual_head_options)
VISUAL_HEADS: dict[str, Callable[..., nn.Module]] = {
    "linear": _linear_head,
    "mlp": _mlp_head,
    "diffusion": _diffusion_head,
}
SAMPLING_HEADS = ("diffusion",)  # heads that sample their tokens rather than regress them


def check_bridge(name: str) -> None:
    """Raise an actionable ValueError unless `name` is a registered bridge, `mlpNx_gelu` with N >= 1 or one of the
    resamplers (`vpit.model.resamplers.RESAMPLERS`)."""
    match = _MLP_BRIDGE.match(name)
    if name not in BRIDGES and name not in RESAMPLERS and (match is None or int(match.group(1)) < 1):
        raise ValueError(
            f"bridge must be {' or '.join(map(repr, sorted(BRIDGES)))}, 'mlpNx_gelu' with N >= 1 (e.g. 'mlp2x_gelu') "
            f"or a resampler ({', '.join(map(repr, RESAMPLERS))}), got {name!r}"
        )


def check_visual_head(name: str) -> None:
    """Raise an actionable ValueError unless `name` is a registered visual head."""
    if name not in VISUAL_HEADS:
        raise ValueError(f"visual_head must be one of {sorted(VISUAL_HEADS)}, got {name!r}")


def build_bridge(name: str, vision_size: int, hidden_size: int) -> nn.Module:
    """The token-wise bridge `name`: (.., Dv) -> (.., H) (a resampler is built by `build_resampler`)."""
    check_bridge(name)
    if name in RESAMPLERS:
        raise ValueError(f"{name!r} is a resampler, not a token-wise bridge: build it with build_resampler")
    if name in BRIDGES:
        return BRIDGES[name](vision_size, hidden_size)
    match = _MLP_BRIDGE.match(name)
    assert match is not None  # checked above
    return _mlp_gelu(int(match.group(1)), vision_size, hidden_size)


def build_visual_head(
    name: str, hidden_size: int, vision_size: int, options: dict[str, Any] | None = None
) -> nn.Module:
    """The visual head `name`: (.., H) -> (.., Dv); `options` go to its builder (only sampling heads take any)."""
    check_visual_head(name)
    if options and name not in SAMPLING_HEADS:
        raise ValueError(f"visual_head_options apply to the {list(SAMPLING_HEADS)} heads; {name!r} takes none")
    return VISUAL_HEADS[name](hidden_size, vision_size, **(options or {}))


__all__ = [
    "BRIDGES",
    "SAMPLING_HEADS",
    "VISUAL_HEADS",
    "Bridge",
    "VisualHead",
    "build_bridge",
    "build_visual_head",
    "check_bridge",
    "check_visual_head",
]
