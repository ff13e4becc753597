"""VPiT losses: next-token cross-entropy on response text, cosine distance on response visual slots.

Both return a sum over valid items divided by their count, so an empty selection gives an exact 0 (never NaN)
that still carries a graph through the module that produced the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def text_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Shifted CE: logits (B, T, V) at position t predict labels (B, T) at t + 1; -100 is ignored.

    Args:
        num_items_in_batch: the count to divide by when gradients are accumulated over several micro-batches
            (the number of labelled tokens in the whole accumulated batch); defaults to this batch's count.
    """
    # Shift the labels, not the logits (as transformers does): slicing (B, T, V) logits would copy them, and their
    # gradient, every step. The last position gets label -100.
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].flatten().to(logits.device)  # (B*T,)
    total = F.cross_entropy(logits.flatten(0, 1).float(), shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != IGNORE_INDEX).sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch.clamp(min=1)
    return total / max(int(num_items_in_batch), 1)


def cosine_loss(
    predictions: torch.Tensor, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """sum(1 - cos(pred, target)) over rows / their count; predictions and targets are (M, Dv). M = 0 gives 0.

    Args:
        num_items_in_batch: the count to divide by when the batch is part of a larger one (the visual targets of the
            whole global batch, over processes and micro-batches); defaults to M.
    """
    cos = F.cosine_similarity(predictions.float(), targets.float(), dim=-1)  # (M,)
    total = (1.0 - cos).sum()
    if num_items_in_batch is None:
        return total / max(cos.shape[0], 1)
    if isinstance(num_items_in_batch, torch.Tensor):
        return total / num_items_in_batch.to(total.device).clamp(min=1)
    return total / max(int(num_items_in_batch), 1)


def count_loss_items(labels: torch.Tensor, visual_target_mask: torch.Tensor) -> torch.Tensor:
    """(2,) long: the labelled tokens the text loss averages over (labels shifted by one, as `text_loss` reads
    them) and the visual targets the cosine loss averages over (slots after position 0, as the model predicts
    them), for weighting a global batch by its true counts."""
    text = (labels[:, 1:] != IGNORE_INDEX).sum()
    visual = visual_target_mask[:, 1:].sum()
    return torch.stack([text, visual]).long()


__all__ = ["IGNORE_INDEX", "cosine_loss", "count_loss_items", "text_loss"]
