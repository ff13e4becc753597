"""The queries mode's generation path: Q learned queries read by the LLM, a connector into the decoder's condition.

    queries            Q learned input embeddings (Q, H), appended after `<image_start>` in place of a response
                       image's slots (MetaQuery's "learnable queries", NExT-GPT's signal tokens)
    connector          the LLM's final hidden states at the Q queries (Q, H) -> Q condition tokens (Q, C), where C
                       is what the decoder's projector reads (the vision encoder's width Dv by default, so that a
                       decoder trained on encoder tokens is the starting point):

        mlp            Linear(H, W) - GELU - Linear(W, C), token-wise
        transformer    Linear(H, W), `depth` pre-norm bidirectional transformer encoder layers (torch's
                       `nn.TransformerEncoderLayer`) over the Q tokens, LayerNorm, Linear(W, C) (MetaQuery's
                       connector: a transformer encoder between the LLM and the diffusion model)

The decoder is trained end to end through its diffusion loss with the connector and the queries (the LLM frozen,
LoRA or full): it learns from what the language model produces, never from exact encoder tokens
(`vpit.training.stages.queries`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

GENERATION_MODES = ("tokens", "queries")
CONNECTORS = ("mlp", "transformer")
# option -> default per connector; `width: null` means the LLM's width H.
CONNECTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"width": None},
    "transformer": {"width": None, "depth": 2, "heads": 8},
}


def connector_options(name: str, options: dict[str, Any] | None, hidden_size: int | None = None) -> dict[str, Any]:
    """The connector's options: its defaults overridden by `options`, `width: None` resolved to `hidden_size` (left
    None without it). Raises ValueError on an unknown connector or key, or sizes that do not fit."""
    if name not in CONNECTORS:
        raise ValueError(f"connector must be one of {list(CONNECTORS)}, got {name!r}")
    defaults = CONNECTOR_DEFAULTS[name]
    unknown = sorted(set(options or {}) - set(defaults))
    if unknown:
        raise ValueError(f"connector_options for {name!r} take {sorted(defaults)}, got unknown {unknown}")
    merged = {**defaults, **(options or {})}
    if merged["width"] is None:
        merged["width"] = hidden_size
    for key in ("width", "depth", "heads"):
        value = merged.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"connector_options {key} must be a positive int, got {value!r}")
    if name == "transformer" and merged["width"] is not None and merged["width"] % merged["heads"]:
        raise ValueError(
            f"connector_options width {merged['width']} is not divisible by heads {merged['heads']}; "
            "pick a width that the heads divide"
        )
    return merged


class QueryConnector(nn.Module):
    """The Q learned queries and the connector from their hidden states to the decoder's condition tokens.

    Args:
        kind: 'mlp' or 'transformer' (see the module docstring).
        hidden_size: H, the LLM's width (the queries' and the hidden states').
        condition_size: C, the width of each condition token (what the decoder's projector reads).
        num_queries: Q.
        options: `connector_options` (width, depth, heads).
    """

    def __init__(
        self, kind: str, hidden_size: int, condition_size: int, num_queries: int, options: dict[str, Any] | None
    ):
        super().__init__()
        settings = connector_options(kind, options, hidden_size)
        width = settings["width"]
        self.kind = kind
        self.num_queries = num_queries
        self.queries = nn.Embedding(num_queries, hidden_size)  # (Q, H), set by `init_queries`
        self.encoder: nn.Module | None = None
        if kind == "mlp":
            self.proj_in: nn.Module = nn.Linear(hidden_size, width)
            self.act: nn.Module = nn.GELU()
            self.norm: nn.Module = nn.Identity()
        else:
            self.proj_in = nn.Linear(hidden_size, width)
            self.act = nn.Identity()
            layer = nn.TransformerEncoderLayer(
                width, settings["heads"], dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                batch_first=True, norm_first=True,
            )  # fmt: skip
            self.encoder = nn.TransformerEncoder(layer, settings["depth"], enable_nested_tensor=False)
            self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, condition_size)

    @torch.no_grad()
    def init_queries(self, embeddings: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Start the queries at the scale of the LLM's input embeddings (V, H): their mean row plus noise of their
        per-feature spread, so the frozen LLM reads them as it reads tokens."""
        rows = embeddings.float()
        mean, std = rows.mean(dim=0), rows.std(dim=0)
        weight = self.queries.weight
        noise = torch.randn(weight.shape, generator=generator, device=rows.device)
        weight.copy_((mean + noise * std).to(weight.dtype))

    def forward(self, hidden_states: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """(.., Q, H) hidden states at the queries -> (.., Q, C) condition tokens; or, with `index` (any shape) of
        query numbers, those queries' input embeddings (.., H). Both through this forward, so that ZeRO-3 and FSDP2
        gather the weights whichever is asked for."""
        if index is not None:
            return self.queries(index)
        if hidden_states is None:
            raise ValueError("pass the hidden states at the queries, or index= for the queries' embeddings")
        shape = hidden_states.shape
        x = self.act(self.proj_in(hidden_states.reshape(-1, *shape[-2:])))  # (M, Q, W)
        if self.encoder is not None:
            x = self.encoder(x)
        return self.proj_out(self.norm(x)).reshape(*shape[:-1], -1)  # (.., Q, C)


__all__ = ["CONNECTORS", "CONNECTOR_DEFAULTS", "GENERATION_MODES", "QueryConnector", "connector_options"]
