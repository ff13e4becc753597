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
"""

from __future__ import annotations

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
    ):
        super().__init__()
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

    @property
    def output_length(self) -> int:
        """L, the number of context tokens this projector emits (padding included)."""
        return int(self.config["context_length"] or self.num_tokens_out)

    def zero_condition(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The unconditional context: zeros of shape (B, L, D)."""
        first = next(self.parameters())
        return torch.zeros(
            batch_size,
            self.output_length,
            self.config["cross_attention_dim"],
            device=device or first.device,
            dtype=dtype or first.dtype,
        )

    def forward(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """(B, K, Dv) -> (B, L, D); positions past the projected tokens are exact zeros."""
        k, dv = self.config["num_visual_tokens"], self.config["vision_hidden_size"]
        if visual_tokens.ndim != 3 or visual_tokens.shape[1:] != (k, dv):
            raise ValueError(
                f"visual_tokens must have shape (B, {k}, {dv}) (num_visual_tokens, vision_hidden_size), "
                f"got {tuple(visual_tokens.shape)}"
            )
        tokens = self.mlp(visual_tokens.to(self.dtype))  # (B, K, D)
        if self.config["projector_type"] == "query":
            queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B, Nq, D)
            keys = tokens + self.positions  # (B, K, D)
            attended, _ = self.attention(self.query_norm(queries), keys, keys, need_weights=False)
            tokens = queries + attended  # (B, Nq, D)
        tokens = self.norm(tokens)
        return F.pad(tokens, (0, 0, 0, self.output_length - tokens.shape[1]))  # (B, L, D)


__all__ = ["PROJECTOR_TYPES", "VPiTDecoderProjector"]
