"""The decoder's projector: K visual tokens (B, K, Dv) -> the UNet's cross-attention context (B, L, D).

A pretrained text-to-image UNet was trained on text-encoder states of a fixed length (77 for Stable Diffusion 1.5)
and width D (768). The projector maps each visual token into that space and zero-pads to the length the UNet saw,
so the pretrained cross-attention starts from familiar statistics (MetaMorph: 1152 -> 2048 -> 768, 64 tokens
zero-padded to 77).

Two variants (`projector_type`):
    mlp    LayerNorm(Dv) - Linear(Dv, hidden) - GELU - Linear(hidden, D) - LayerNorm(D) per token;
           L = context_length (or K)
    query  the same MLP plus a learned position embedding per token, then Nq learned queries cross-attend to the
           K tokens; L = context_length (or Nq).

Cross-attention treats its context as a set: neither the UNet nor the query attention sees token order. The 'mlp'
variant (MetaMorph's) relies on the encoder's tokens carrying their position in their features, as ViT tokens do;
the 'query' variant adds learned position embeddings to the tokens it attends to, since it mixes them.

The zero condition (the classifier-free-guidance negative and the condition-dropout replacement) is the all-zero
context (B, L, D), not the projection of zero tokens: it carries no information whatever the projector learns.

Optionally (`spatial_channels` > 0) the projector also lays the tokens out on their k x k grid: each token is
projected to C channels, and the (B, C, k, k) map, bilinearly resized to the UNet's sample size, is concatenated to
the UNet's input channels, as InstructPix2Pix concatenates its input image's latents. A UNet does not know where
on the canvas each of its features lies (its convolutions are translation-equivariant and cross-attention is
order-blind), so it has to learn absolute position from padding effects alone; the spatial map gives every
location the token above it. Its zero condition is the all-zero map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

PROJECTOR_TYPES = ("mlp", "query")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


# diffusers models combine the two mixins the same way; their `config_name` types disagree in diffusers itself.
class VPiTDecoderProjector(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """Visual tokens -> UNet cross-attention tokens.

    Args:
        vision_hidden_size: Dv, the width of the visual tokens.
        cross_attention_dim: D, the UNet's `cross_attention_dim`.
        num_visual_tokens: K, visual tokens per image.
        hidden_size: width of the MLP's hidden layer.
        context_length: L, the number of context tokens the UNet was pretrained with (77 for SD 1.5); the output
            is zero-padded to it. None: no padding (L = K for 'mlp', Nq for 'query').
        projector_type: 'mlp' (per-token MLP with LayerNorm) or 'query' (learned queries cross-attending to the
            tokens).
        num_queries: Nq for 'query'; defaults to `context_length`, else K.
        num_attention_heads: heads of the 'query' cross-attention; must divide D.
        spatial_channels: C > 0 adds the spatial map (`spatial_condition`), for a UNet with C extra input
            channels; 0: cross-attention only (MetaMorph). K must be a square number.

    Example:
        >>> projector = VPiTDecoderProjector(vision_hidden_size=1152, cross_attention_dim=768, num_visual_tokens=64)
        >>> projector(torch.randn(2, 64, 1152)).shape
        torch.Size([2, 77, 768])
    """

    @register_to_config
    def __init__(
        self,
        vision_hidden_size: int = 1152,
        cross_attention_dim: int = 768,
        num_visual_tokens: int = 64,
        hidden_size: int = 2048,
        context_length: int | None = 77,
        projector_type: str = "mlp",
        num_queries: int | None = None,
        num_attention_heads: int = 8,
        spatial_channels: int = 0,
    ):
        super().__init__()
        if spatial_channels < 0:
            raise ValueError(f"spatial_channels must be >= 0, got {spatial_channels}")
        if spatial_channels and math.isqrt(num_visual_tokens) ** 2 != num_visual_tokens:
            raise ValueError(f"a spatial map lays the K tokens on a square grid; K = {num_visual_tokens} is not square")
        for name, value in [
            ("vision_hidden_size", vision_hidden_size),
            ("cross_attention_dim", cross_attention_dim),
            ("num_visual_tokens", num_visual_tokens),
            ("hidden_size", hidden_size),
            ("num_attention_heads", num_attention_heads),
        ]:
            _positive(name, value)
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {list(PROJECTOR_TYPES)}, got {projector_type!r}")
        if projector_type == "mlp" and num_queries is not None:
            raise ValueError("num_queries only applies to projector_type='query'; leave it None for 'mlp'")
        if projector_type == "query":
            num_queries = num_queries or context_length or num_visual_tokens
            _positive("num_queries", num_queries)
            if cross_attention_dim % num_attention_heads:
                raise ValueError(
                    f"num_attention_heads ({num_attention_heads}) must divide cross_attention_dim "
                    f"({cross_attention_dim})"
                )
        tokens_out = num_queries if projector_type == "query" else num_visual_tokens
        assert tokens_out is not None  # set above for 'query'; K for 'mlp'
        if context_length is not None and tokens_out > context_length:
            raise ValueError(
                f"the projector emits {tokens_out} tokens but context_length is {context_length}; the UNet's "
                "context cannot hold them. Pool to fewer visual tokens, lower num_queries, or set context_length "
                "to None (no padding) if the UNet is trained from scratch"
            )
        self.num_tokens_out = tokens_out

        # Input LayerNorm: the tokens are L2-normalised, so each feature is ~1/sqrt(Dv) (0.03 for SigLIP); without
        # it the MLP starts in GELU's linear region with outputs so small that the output norm's eps dominates.
        # Output LayerNorm: a pretrained UNet attends to text-encoder states that leave a final LayerNorm, so the
        # projected tokens start with the per-token statistics it knows.
        self.mlp = nn.Sequential(
            nn.LayerNorm(vision_hidden_size),
            nn.Linear(vision_hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, cross_attention_dim),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)
        if projector_type == "query":
            self.queries = nn.Parameter(torch.randn(tokens_out, cross_attention_dim) * 0.02)
            self.positions = nn.Parameter(torch.randn(num_visual_tokens, cross_attention_dim) * 0.02)
            self.query_norm = nn.LayerNorm(cross_attention_dim)
            self.attention = nn.MultiheadAttention(cross_attention_dim, num_attention_heads, batch_first=True)
        if spatial_channels:
            self.spatial = nn.Sequential(
                nn.LayerNorm(vision_hidden_size), nn.Linear(vision_hidden_size, spatial_channels)
            )

    @property
    def output_length(self) -> int:
        """L, the number of context tokens this projector emits (padding included)."""
        return int(self.config["context_length"] or self.num_tokens_out)

    @property
    def spatial_channels(self) -> int:
        """C, the channels of the spatial map (0: none)."""
        return int(self.config.get("spatial_channels", 0) or 0)

    def _check(self, visual_tokens: torch.Tensor) -> None:
        k, dv = self.config["num_visual_tokens"], self.config["vision_hidden_size"]
        if visual_tokens.ndim != 3 or visual_tokens.shape[1:] != (k, dv):
            raise ValueError(
                f"visual_tokens must have shape (B, {k}, {dv}) (num_visual_tokens, vision_hidden_size), "
                f"got {tuple(visual_tokens.shape)}"
            )

    def spatial_condition(self, visual_tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, K, Dv) -> (B, C, h, w): each token projected to C channels at its cell of the k x k grid (row-major,
        as the encoder pools them), bilinearly resized to `size` (the UNet's sample size)."""
        if not self.spatial_channels:
            raise ValueError("this projector has no spatial map (spatial_channels = 0)")
        self._check(visual_tokens)
        batch, k = visual_tokens.shape[0], math.isqrt(self.config["num_visual_tokens"])
        grid = self.spatial(visual_tokens.to(self.dtype)).transpose(1, 2).reshape(batch, -1, k, k)  # (B, C, k, k)
        return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)

    def forward(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """(B, K, Dv) -> (B, L, D); positions past the projected tokens are exact zeros."""
        self._check(visual_tokens)
        tokens = self.mlp(visual_tokens.to(self.dtype))  # (B, K, D)
        if self.config["projector_type"] == "query":
            queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B, Nq, D)
            keys = tokens + self.positions  # (B, K, D)
            attended, _ = self.attention(self.query_norm(queries), keys, keys, need_weights=False)
            tokens = queries + attended  # (B, Nq, D)
        tokens = self.norm(tokens)
        return F.pad(tokens, (0, 0, 0, self.output_length - tokens.shape[1]))  # (B, L, D)


__all__ = ["PROJECTOR_TYPES", "VPiTDecoderProjector"]
