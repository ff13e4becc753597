"""Resampling bridges: the encoder's patch tokens of a prompt image -> K LLM input embeddings.

    perceiver         Flamingo's Perceiver resampler: K learned latents cross-attend to [patches; latents]
                      (transformers' `IdeficsPerceiverResampler`, Flamingo's as ported for IDEFICS)
    qformer           BLIP-2's Q-Former: K learned queries, self-attention among them and cross-attention to the
                      patches (transformers' `Blip2QFormerModel`), then a Linear to the LLM width
    qformer_instruct  InstructBLIP's: the same, with the instruction's tokens (the LLM's own embeddings, projected)
                      in the Q-Former's self-attention, so the queries pick what the question asks about
    causal_query      Emu / SEED-tokenizer style: the Q-Former's layers with causal self-attention among the queries

A resampler reads the whole patch grid of an image at once, so it cannot take a response image one predicted token
at a time: response images (teacher-forced in training, fed back in generation) and images given only as tokens
enter through the model's token-wise bridge instead (`VPiTConfig.token_bridge`, `VPiTForCausalLM.token_bridge`).
The visual targets stay the encoder's K pooled tokens whatever the bridge.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

RESAMPLERS = ("perceiver", "qformer", "qformer_instruct", "causal_query")
# option -> default per resampler: the published settings (Flamingo: 6 layers at the vision width; BLIP-2: BERT-base
# width, 12 layers, cross-attention every other layer). `width: null` means the encoder's width Dv.
RESAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "perceiver": {"width": None, "depth": 6, "heads": 16},
    "qformer": {"width": 768, "depth": 12, "heads": 12, "cross_attention_every": 2},
    "qformer_instruct": {"width": 768, "depth": 12, "heads": 12, "cross_attention_every": 2},
    "causal_query": {"width": 768, "depth": 12, "heads": 12, "cross_attention_every": 1},
}


class Resampler(nn.Module):
    """Patch tokens (I, N, Dv) -> (I, K, H); `reads_instruction` resamplers also take the instruction's embeddings.

    A type of its own (as `Bridge`) so that sharding and device maps keep it whole.
    """

    reads_instruction = False

    def forward(
        self,
        patches: torch.Tensor,
        instruction: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


def resampler_options(name: str, options: dict[str, Any] | None, vision_size: int | None = None) -> dict[str, Any]:
    """The resampler's options: its defaults overridden by `options`, `width: None` resolved to `vision_size` (left
    None without it). Raises ValueError on an unknown key or a width that the heads do not divide."""
    defaults = RESAMPLER_DEFAULTS[name]
    unknown = sorted(set(options or {}) - set(defaults))
    if unknown:
        raise ValueError(f"bridge_options for {name!r} take {sorted(defaults)}, got unknown {unknown}")
    merged = {**defaults, **(options or {})}
    if merged["width"] is None:
        merged["width"] = vision_size
    for key in ("depth", "heads", "cross_attention_every"):
        if key in merged and not (isinstance(merged[key], int) and merged[key] >= 1):
            raise ValueError(f"bridge_options: {key} must be an integer >= 1, got {merged[key]!r}")
    if merged["width"] is not None and merged["width"] % merged["heads"]:
        raise ValueError(f"bridge_options: width {merged['width']} must be a multiple of heads {merged['heads']}")
    return merged


class PerceiverBridge(Resampler):
    """Flamingo's Perceiver resampler at width W over LayerNorm(Linear(Dv, W)) of the patches, then Linear(W, H)."""

    def __init__(self, vision_size: int, hidden_size: int, num_queries: int, width: int, depth: int, heads: int):
        super().__init__()
        from transformers import IdeficsConfig
        from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

        # IDEFICS's resampler reads its MLP width and the q/k norms from an IdeficsConfig: only those two fields.
        config = IdeficsConfig(vision_config={"embed_dim": width}, perceiver_config={"qk_layer_norms_perceiver": False})
        self.input_projection = nn.Linear(vision_size, width)
        self.resampler = IdeficsPerceiverResampler(config, width, depth, heads, width // heads, num_queries)
        self.output_projection = nn.Linear(width, hidden_size)

    def forward(
        self,
        patches: torch.Tensor,
        instruction: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.output_projection(self.resampler(self.input_projection(patches)))


class QFormerBridge(Resampler):
    """BLIP-2's Q-Former (transformers' `Blip2QFormerModel`) with K learned queries over LayerNorm(patches), then
    Linear(W, H) (BLIP-2's language projection).

    Args:
        instruct: InstructBLIP: the instruction's embeddings (Linear(H, W) of the LLM's) join the queries'
            self-attention; only the queries cross-attend to the image and come out.
        causal: the queries attend to themselves causally (query i sees queries <= i), as Emu's and SEED's.
    """

    def __init__(
        self,
        vision_size: int,
        hidden_size: int,
        num_queries: int,
        width: int,
        depth: int,
        heads: int,
        cross_attention_every: int,
        instruct: bool = False,
        causal: bool = False,
    ):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        config = Blip2QFormerConfig(
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=4 * width,
            encoder_hidden_size=vision_size,
            cross_attention_frequency=cross_attention_every,
            use_qformer_text_input=instruct,  # the layers' feed-forward for the instruction's positions
        )
        self.reads_instruction = instruct
        self.causal = causal
        self.num_queries = num_queries
        self.patch_norm = nn.LayerNorm(vision_size)  # BLIP-2's ViT hands over final-LayerNorm'd patches
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, width))
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        self.qformer = Blip2QFormerModel(config)
        self.instruction_projection = nn.Linear(hidden_size, width) if instruct else None
        self.output_projection = nn.Linear(width, hidden_size)

    def forward(
        self,
        patches: torch.Tensor,
        instruction: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        images, k = patches.shape[0], self.num_queries
        queries = self.query_tokens.expand(images, -1, -1).to(patches.dtype)
        attention_mask: torch.Tensor | None = None
        if self.instruction_projection is not None:
            if instruction is None or instruction_mask is None:
                raise ValueError("the qformer_instruct bridge needs each prompt image's instruction")
            queries = torch.cat([queries, self.instruction_projection(instruction.to(patches.dtype))], dim=1)
            attention_mask = torch.cat([instruction_mask.new_ones(images, k), instruction_mask], dim=1)  # (I, K+L)
        if self.causal:
            # An additive (I, 1, K, K) mask: Blip2QFormerModel hands a prepared 4-D mask to its attention as is.
            blocked = torch.ones(k, k, dtype=torch.bool, device=patches.device).triu(1)
            attention_mask = torch.zeros(images, 1, k, k, dtype=torch.float32, device=patches.device)
            attention_mask = attention_mask.masked_fill(blocked, torch.finfo(torch.float32).min)
        out = self.qformer(
            query_embeds=queries,
            query_length=k,
            attention_mask=attention_mask,
            encoder_hidden_states=self.patch_norm(patches),
        ).last_hidden_state[:, :k]  # (I, K, W)
        return self.output_projection(out.to(self.output_projection.weight.dtype))


def build_resampler(
    name: str, vision_size: int, hidden_size: int, num_queries: int, options: dict[str, Any] | None = None
) -> Resampler:
    """The resampling bridge `name` (one of RESAMPLERS) with K = `num_queries` outputs."""
    merged = resampler_options(name, options, vision_size)
    if name == "perceiver":
        return PerceiverBridge(vision_size, hidden_size, num_queries, **merged)
    return QFormerBridge(
        vision_size,
        hidden_size,
        num_queries,
        **merged,
        instruct=name == "qformer_instruct",
        causal=name == "causal_query",
    )


__all__ = ["RESAMPLERS", "RESAMPLER_DEFAULTS", "PerceiverBridge", "QFormerBridge", "Resampler", "build_resampler"]
