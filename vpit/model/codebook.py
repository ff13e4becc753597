"""A discrete visual codebook: k-means centroids of a vision encoder's tokens (SEED, Chameleon, Emu3, LWM predict
codes like these with plain cross-entropy).

    fit_codebook   (N, Dv) encoder tokens -> (C, Dv) centroids (scikit-learn's MiniBatchKMeans; spherical for
                   normalised tokens: centroids renormalised, so that the nearest code by L2 is the nearest by cosine)
    nearest_codes  (.., Dv) tokens -> (..,) index of the nearest centroid

The model side (code tokens in the vocabulary, the cross-entropy, sampling) is `VPiTForCausalLM`'s; fitting a
card's images into a model folder is `vpit.data.codebook.fit_card_codebook` (`vpit codebook fit`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def fit_codebook(
    tokens: torch.Tensor, size: int, normalised: bool, seed: int = 0, batch_size: int = 4096, n_init: int = 3
) -> tuple[torch.Tensor, dict[str, Any]]:
    """k-means over encoder tokens.

    Args:
        tokens: (N, Dv) encoder tokens (N >= size).
        size: C, the number of codes.
        normalised: the tokens are unit vectors (`normalize_visual_tokens`): the centroids are renormalised.
        seed: k-means++ initialisation and mini-batch order.

    Returns:
        (C, Dv) float32 centroids, and statistics of the tokens quantised with them: `mean_cosine` (token vs its
        code), `used` (codes that some token picks), `perplexity` (exp of the code-usage entropy; C when uniform).
    """
    from sklearn.cluster import MiniBatchKMeans

    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (N, Dv), got shape {tuple(tokens.shape)}")
    if tokens.shape[0] < size:
        raise ValueError(f"{tokens.shape[0]} tokens cannot fit {size} codes; use more images or a smaller codebook")
    data = tokens.float().cpu()
    kmeans = MiniBatchKMeans(
        n_clusters=size, batch_size=min(batch_size, data.shape[0]), n_init=n_init, random_state=seed
    ).fit(data.numpy().astype(np.float32))
    centroids = torch.from_numpy(kmeans.cluster_centers_).float()  # (C, Dv)
    if normalised:
        centroids = F.normalize(centroids, dim=-1)
    codes = nearest_codes(data, centroids)  # (N,)
    usage = torch.bincount(codes, minlength=size).float() / codes.numel()
    entropy = -(usage[usage > 0] * usage[usage > 0].log()).sum()
    return centroids, {
        "tokens": int(data.shape[0]),
        "mean_cosine": float(F.cosine_similarity(data, centroids[codes], dim=-1).mean()),
        "used": int((usage > 0).sum()),
        "perplexity": float(entropy.exp()),
    }


def nearest_codes(tokens: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(.., Dv) tokens, (C, Dv) codebook -> (..,) long: the index of each token's nearest code (squared L2)."""
    flat = tokens.reshape(-1, tokens.shape[-1]).float()
    book = codebook.float().to(flat.device)
    distances = flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ book.T + book.pow(2).sum(-1)  # (M, C)
    return distances.argmin(dim=-1).reshape(tokens.shape[:-1])


__all__ = ["fit_codebook", "nearest_codes"]
