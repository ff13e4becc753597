"""VPiT losses: next-token cross-entropy on response text, a regression loss on response visual slots (cosine
distance by default, as MetaMorph; squared L2 as Emu / Emu2; smooth L1), and Chameleon's z-loss on the text logits.

Each returns a sum over valid items divided by their count, so an empty selection gives an exact 0 (never NaN)
that still carries a graph through the module that produced the inputs.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


# fp32 logits materialised at once by the CE: 2^24 elements (64 MB), 128 rows of a 128k vocabulary.
CE_CHUNK_ELEMENTS = 1 << 24


VISUAL_LOSSES = ("cosine", "l2", "smooth_l1")


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _ce_z_sums(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(2,): the CE sum and the squared-log-partition sum, from one log-sum-exp (CE = log Z - logit of the target)."""
    valid = targets != IGNORE_INDEX
    log_partition = torch.logsumexp(logits.float(), dim=-1)[valid]  # (N',)
    target_logits = logits[valid].float().gather(-1, targets[valid, None]).squeeze(-1)  # (N',)
    return torch.stack([(log_partition - target_logits).sum(), log_partition.square().sum()])


def _chunked_sum(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """fn(logits, targets) summed over chunks of rows, each recomputed in backward (activation checkpointing), so
    no full fp32 copy of the (N, V) logits ever exists: 8 GB saved at N = 16k, V = 128k."""
    rows = max(1, CE_CHUNK_ELEMENTS // max(logits.shape[-1], 1))
    if logits.shape[0] <= rows:
        return fn(logits, targets)
    total = logits.new_zeros((), dtype=torch.float32)
    for x, y in zip(logits.split(rows), targets.split(rows), strict=True):
        grad = torch.is_grad_enabled()  # recomputed in backward: one chunk's fp32 copy is alive at a time
        total = total + (checkpoint(fn, x, y, use_reentrant=False) if grad else fn(x, y))
    return total


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum of CE over rows: logits (N, V) in any dtype, targets (N,) with -100 ignored, computed in fp32 a chunk of
    rows at a time (`_chunked_sum`)."""
    return _chunked_sum(_ce_sum, logits, targets)


def text_and_z_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`text_loss`, and Chameleon's z-loss (from PaLM): the squared log-partition log(sum(exp(logits)))^2 at the
    positions that predict a label, summed over them and divided as `text_loss` divides. The z-loss keeps the
    logits' normaliser near 1 (log Z near 0), against the logit drift that destabilised Chameleon's mixed-modal
    training; the usual weight is 1e-4 to 1e-5 (`train.z_loss`). Both come from one log-sum-exp over the
    vocabulary; same arguments as `text_loss`."""
    targets = _shifted_targets(labels, positions).to(logits.device)
    ce, z = _chunked_sum(_ce_z_sums, logits.flatten(0, 1), targets)
    count = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    return _divide(ce, count), _divide(z, count)


def _divide(total: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    if isinstance(count, torch.Tensor):
        return total / count.to(total.device).clamp(min=1)
    return total / max(int(count), 1)


def mean_over_items(per_item: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """(M,) per-item losses -> their sum divided by M (or by `num_items_in_batch`, the global batch's count); M = 0
    gives an exact 0."""
    return _divide(per_item.sum(), per_item.shape[0] if num_items_in_batch is None else num_items_in_batch)


def text_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shifted CE: logits at position t predict labels (B, T) at t + 1; -100 is ignored.

    Args:
        logits: (B, T, V), or (B, P, V) at the sequence `positions` (P,) only.
        num_items_in_batch: the count to divide by when gradients are accumulated over several micro-batches
            (the number of labelled tokens in the whole accumulated batch); defaults to this batch's count.
        positions: the sequence positions `logits` hold (see `labelled_positions`); all T when omitted.
    """
    targets = _shifted_targets(labels, positions).to(logits.device)
    total = cross_entropy_sum(logits.flatten(0, 1), targets)
    return _divide(total, (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch)


def _shifted_targets(labels: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """(B * T,) or (B * P,): the label each position predicts. The labels are shifted, not the logits (as
    transformers does): slicing (B, T, V) logits would copy them, and their gradient, every step."""
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T); the last position gets -100
    if positions is not None:
        shift_labels = shift_labels[:, positions.to(shift_labels.device)]  # (B, P)
    return shift_labels.flatten()


def fused_cross_entropy_available(device: torch.device) -> bool:
    """Whether Liger's fused linear cross-entropy can run here: a CUDA device and `liger-kernel` installed."""
    return device.type == "cuda" and _liger_installed()


@functools.cache
def _liger_installed() -> bool:  # asked at every training forward on CUDA: look the package up once
    return importlib.util.find_spec("liger_kernel") is not None


def fused_text_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """`text_loss` from the LM head's input instead of its output, through Liger's fused linear cross-entropy: the
    (N, V) logits are computed and consumed a block of rows at a time inside the kernel, never stored (Liger reports
    ~60 % less loss-path memory at a 131k vocabulary). `hidden` is (B, T, H), or (B, P, H) at `positions`."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    targets = _shifted_targets(labels, positions).to(hidden.device)
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    total = fused(lm_head.weight, hidden.flatten(0, 1), targets, lm_head.bias)
    return _divide(total.float(), (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch)


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """(P,) the positions t whose logits predict a label (labels at t + 1 in some row): the only logits the text
    loss needs."""
    return torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(dim=0)).flatten()


def cosine_loss(
    predictions: torch.Tensor, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """sum(1 - cos(pred, target)) over rows / their count; predictions and targets are (M, Dv). M = 0 gives 0.

    Args:
        num_items_in_batch: the count to divide by when the batch is part of a larger one (the visual targets of the
            whole global batch, over processes and micro-batches); defaults to M.
    """
    cos = F.cosine_similarity(predictions.float(), targets.float(), dim=-1)  # (M,)
    return mean_over_items(1.0 - cos, num_items_in_batch)


def visual_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    kind: str = "cosine",
    num_items_in_batch: int | torch.Tensor | None = None,
    beta: float = 0.05,
) -> torch.Tensor:
    """The regression loss of the visual head, summed per token over its Dv features, then over the M tokens and
    divided by their count (or `num_items_in_batch`); predictions and targets are (M, Dv), M = 0 gives 0.

    kind:
        cosine     1 - cos(pred, target) (MetaMorph); the prediction's norm is free.
        l2         ||pred - target||^2 (Emu, Emu2: MSE on the encoder's features, here summed rather than averaged
                   over Dv, so that on unit-norm tokens it is on the cosine loss's scale: 2 - 2 cos + (|p| - 1)^2).
        smooth_l1  Huber with threshold `beta` on each feature, summed: quadratic for small errors, linear for large
                   ones, so a few far-off tokens weigh less than under l2. Unit-norm tokens have features of about
                   1 / sqrt(Dv) (0.03 for SigLIP's 1152, 0.125 at the toy world's 64), hence beta 0.05.
    """
    if kind == "cosine":
        return cosine_loss(predictions, targets, num_items_in_batch)
    if kind == "l2":
        per_token = (predictions.float() - targets.float()).square().sum(dim=-1)  # (M,)
    elif kind == "smooth_l1":
        per_token = F.smooth_l1_loss(predictions.float(), targets.float(), reduction="none", beta=beta).sum(dim=-1)
    else:
        raise ValueError(f"visual loss must be one of {list(VISUAL_LOSSES)}, got {kind!r}")
    return mean_over_items(per_token, num_items_in_batch)


def count_loss_items(labels: torch.Tensor, visual_target_mask: torch.Tensor) -> torch.Tensor:
    """(2,) long: the labelled tokens the text loss averages over (labels shifted by one, as `text_loss` reads
    them) and the visual targets the cosine loss averages over (slots after position 0, as the model predicts
    them), for weighting a global batch by its true counts."""
    text = (labels[:, 1:] != IGNORE_INDEX).sum()
    visual = visual_target_mask[:, 1:].sum()
    return torch.stack([text, visual]).long()


__all__ = [
    "IGNORE_INDEX",
    "VISUAL_LOSSES",
    "cosine_loss",
    "count_loss_items",
    "cross_entropy_sum",
    "fused_cross_entropy_available",
    "fused_text_loss",
    "labelled_positions",
    "mean_over_items",
    "text_and_z_loss",
    "text_loss",
    "visual_loss",
]
