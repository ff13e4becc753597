"""The visual prediction head: LLM hidden states (.., H) -> predicted visual tokens (.., Dv)."""

from __future__ import annotations

from torch import nn


def build_visual_head(kind: str, hidden_size: int, vision_size: int) -> nn.Sequential:
    """`mlp` -> Linear(H, H)-GELU-Linear(H, Dv) (MetaMorph: 4096 -> 4096 -> 1152); `linear` -> Linear(H, Dv)."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(hidden_size, vision_size))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, vision_size))
    raise ValueError(f"visual_head must be 'linear' or 'mlp', got {kind!r}")


__all__ = ["build_visual_head"]
