"""The bridge (adapter): encoder tokens (.., Dv) -> LLM input embeddings (.., H)."""

from __future__ import annotations

from torch import nn

from .configuration_vpit import parse_bridge


def build_bridge(kind: str, vision_size: int, hidden_size: int) -> nn.Sequential:
    """`linear` -> Linear(Dv, H); `mlpNx_gelu` -> Linear(Dv, H) then (GELU, Linear(H, H)) x (N - 1).

    `mlp2x_gelu` is LLaVA-1.5's projector and MetaMorph's 1152 -> 4096 -> 4096 bridge.
    """
    depth = parse_bridge(kind)
    layers: list[nn.Module] = [nn.Linear(vision_size, hidden_size)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)


__all__ = ["build_bridge"]
