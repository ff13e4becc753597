"""Collation: encoded samples -> one batch for `VPiTForCausalLM.forward`, padded or packed.

An encoded sample is a dict of 1-D tensors of one length L plus its images:

    input_ids           (L,)  long
    labels              (L,)  long, -100 where not supervised (prompt, image slots)
    visual_target_mask  (L,)  bool, image slots whose encoder token is a target (response images)
    pixel_values        (n, 3, S, S) float, n >= 0, in the order their slots appear in input_ids
    visual_tokens       (n_all, K, Dv), visual_tokens_given (n_all,) bool, optional: images whose encoder tokens
                        came from a feature cache; pixel_values then holds only the others (`vpit.data.encode`)
    num_skipped         int, optional: bad records the dataset skipped just before this sample
    decoder_images      (1, 3, R, R), optional: the 'queries' mode's target image (`encode_query_sample`), and
    target_pixels       (1, 3, S, S) the same image for the vision encoder; the batch holds each in sample order
    (any other key, e.g. "id" or "source", is metadata and is dropped)

Dimension letters: B samples, R packed rows, T row length, I images in the batch, S image side.

When some sample brought cached tokens, the batch also holds visual_tokens (I_all, K, Dv) and visual_tokens_given
(I_all,) over every image in slot order, and pixel_values only the images not given (the model encodes those).

Padded (pack=False), one sample per row, T = the longest sample rounded up to `pad_to_multiple_of`:

    input_ids, labels, visual_target_mask, attention_mask, position_ids   (B, T)
    pixel_values                                                          (I, 3, S, S), absent without images

    right padding (training):    [a a a a] [b b . .]      position_ids [0 1 2 3] [0 1 0 0]
    left padding (generation):   [a a a a] [. . b b]      position_ids [0 1 2 3] [0 0 0 1]

Padded positions get position 0, as `GenerationMixin` computes it from the attention mask
(transformers/generation/utils.py: `cumsum(-1) - 1`, then `masked_fill(attention_mask == 0, 0)`).

Packed (pack=True), samples placed first-fit-decreasing into rows of T = max_length, no attention_mask:

    input_ids, labels, visual_target_mask, position_ids                   (R, T)
    pixel_values                                                          (I, 3, S, S), absent without images

    row 0: [a a a a a b b b]    position_ids [0 1 2 3 4 0 1 2]
    row 1: [c c c d d . . .]    position_ids [0 1 2 0 1 0 1 2]   (the tail padding is a segment of its own)

With attention_mask=None and no cache, transformers 5 reads the packing from position_ids
(transformers/masking_utils.py: `_preprocess_mask_arguments` -> `find_packed_sequence_indices`, a new segment
wherever the position does not grow by one) and `create_causal_mask` builds a block-diagonal causal mask, so a
token attends only to earlier tokens of its own sample with the sdpa, eager and flex backends. Two conditions:

- no cache: with a cache the packing is not looked for and the samples of a row would silently attend to each
  other. `VPiTForCausalLM.forward` turns the cache off itself when labels are given or the batch is packed
  (position_ids without attention_mask); call a bare transformers LLM with use_cache=False.
- the flash-attention backends read the packing from position_ids only when the batch has ONE row
  (transformers/modeling_flash_attention_utils.py: `_is_packed_sequence` returns False when batch_size != 1);
  with them, flatten a packed batch to (1, R * T) first, which keeps the row-major order images are scattered in.

In both modes the first token of every sample gets label -100 and visual_target_mask False: the model's losses
shift by one, so that target would be predicted from the token before it, which belongs to another sample (packed)
or is padding (left padding). Images are concatenated in the order their slots appear in the batch, row-major,
because the model scatters visual tokens into slots in that order.

Bookkeeping keys, read by the training loop and not passed to the model (see `model_inputs`):

    padding_fraction  float: padding tokens / (rows * T)
    num_skipped       int: the sum of the samples' num_skipped
    num_samples       int: B
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from ..model.losses import IGNORE_INDEX

MODEL_INPUT_KEYS = (
    "input_ids",
    "labels",
    "visual_target_mask",
    "attention_mask",
    "position_ids",
    "pixel_values",
    "visual_tokens",
    "visual_tokens_given",
)

_TOKEN_KEYS = ("input_ids", "labels", "visual_target_mask")
TARGET_IMAGE_KEYS = ("decoder_images", "target_pixels")
_PADDING_SIDES = ("right", "left")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a collated batch that `VPiTForCausalLM.forward` takes, i.e. without the bookkeeping keys.

    Example:
        >>> out = model(**model_inputs(batch))
    """
    return {key: batch[key] for key in MODEL_INPUT_KEYS if key in batch}


def _positive_int_or_none(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


class VPiTCollator:
    """Pads (or packs) encoded samples into a batch; see the module docstring for the layouts and shapes.

    Args:
        pad_token_id: the token id written at padding positions (the tokenizer's pad_token_id).
        padding_side: "right" for training, "left" for generation (prompts end at the same column).
        pack: place several samples in each row of length max_length (first-fit-decreasing), with position_ids
            restarting at every sample and no attention_mask; training only, so padding_side must be "right".
        max_length: the row length when packing (required then); when not packing, the longest sample allowed.
            A longer sample is an error, never truncated: truncation is the tokeniser's job.
        pad_to_multiple_of: round the padded length up to a multiple of this (when packing, max_length must be one).

    Example:
        >>> collate = VPiTCollator(pad_token_id=tokenizer.pad_token_id, pack=True, max_length=4096)
        >>> loader = DataLoader(dataset, batch_size=16, collate_fn=collate)
        >>> batch = next(iter(loader))
        >>> out = model(**model_inputs(batch))  # forward turns the cache off for packed batches
        >>> batch["padding_fraction"], batch["num_skipped"]
    """

    def __init__(
        self,
        pad_token_id: int,
        padding_side: Literal["right", "left"] = "right",
        pack: bool = False,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(
                f"pad_token_id must be a non-negative int (the tokenizer's pad_token_id), got {pad_token_id!r}; "
                "if the tokenizer has none, set tokenizer.pad_token first"
            )
        if padding_side not in _PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {_PADDING_SIDES}, got {padding_side!r}")
        _positive_int_or_none("max_length", max_length)
        _positive_int_or_none("pad_to_multiple_of", pad_to_multiple_of)
        if pack:
            if max_length is None:
                raise ValueError("pack=True needs max_length, the length of a packed row (e.g. max_length=4096)")
            if padding_side != "right":
                raise ValueError(
                    "pack=True is for training and pads at the end of each row; use padding_side='right' "
                    f"(got {padding_side!r}), or pack=False for left-padded generation batches"
                )
            if pad_to_multiple_of is not None and max_length % pad_to_multiple_of != 0:
                raise ValueError(
                    f"when packing, rows are max_length={max_length} long, which is not a multiple of "
                    f"pad_to_multiple_of={pad_to_multiple_of}; pick a max_length that is"
                )
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pack = pack
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pad_token_id={self.pad_token_id}, padding_side={self.padding_side!r}, "
            f"pack={self.pack}, max_length={self.max_length}, pad_to_multiple_of={self.pad_to_multiple_of})"
        )

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Collate encoded samples (see the module docstring) into a batch of (B, T) or packed (R, T) tensors."""
        if len(samples) == 0:
            raise ValueError("cannot collate an empty list of samples")
        tokens = [self._checked(i, sample) for i, sample in enumerate(samples)]
        images = [sample["pixel_values"] for sample in samples]
        order = list(range(len(samples)))
        if self.pack:
            batch, order = self._pack(tokens)
            images = [images[i] for i in order]
        else:
            batch = self._pad(tokens)
        cached = [samples[i] for i in order if "visual_tokens" in samples[i]]
        if cached:  # every image's tokens in slot order, the cached ones filled in (see the module docstring)
            zeros = cached[0]["visual_tokens"][:0]  # (0, K, Dv)
            rows, given = [], []
            for i in order:
                sample = samples[i]
                count = int(sample["pixel_values"].shape[0]) + int(sample.get("visual_tokens_given", zeros).sum())
                if "visual_tokens" in sample:
                    rows.append(sample["visual_tokens"])
                    given.append(sample["visual_tokens_given"])
                else:
                    rows.append(zeros.new_zeros(count, *zeros.shape[1:]))
                    given.append(torch.zeros(count, dtype=torch.bool))
            batch["visual_tokens"] = torch.cat(rows)
            batch["visual_tokens_given"] = torch.cat(given)
        pixel_values = [p for p in images if p.shape[0] > 0]
        if pixel_values:
            sizes = {tuple(p.shape[1:]) for p in pixel_values}
            if len(sizes) > 1:
                raise ValueError(f"the samples' images differ in size {sorted(sizes)}; preprocess them to one size")
            batch["pixel_values"] = torch.cat(pixel_values)  # (I, 3, S, S)
        for key in TARGET_IMAGE_KEYS:  # the 'queries' mode's target images, one per sample, in row-major order
            targets = [samples[i][key] for i in order if key in samples[i]]
            if targets:
                if len(targets) != len(samples):
                    raise ValueError(f"{len(targets)} of {len(samples)} samples carry {key}; all or none must")
                batch[key] = torch.cat(targets)  # (B, 3, R, R)
        num_slots = batch["input_ids"].numel()
        num_tokens = sum(len(t["input_ids"]) for t in tokens)
        batch["padding_fraction"] = (num_slots - num_tokens) / num_slots
        batch["num_skipped"] = sum(int(sample.get("num_skipped", 0)) for sample in samples)
        batch["num_samples"] = len(samples)
        return batch

    # ------------------------------------------------------------------------------------------- checks

    def _checked(self, index: int, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The sample's (L,) token tensors, checked, with the first token made a non-target."""
        missing = [key for key in (*_TOKEN_KEYS, "pixel_values") if key not in sample]
        if missing:
            raise ValueError(f"sample {index} lacks {missing}; encoded samples carry {[*_TOKEN_KEYS, 'pixel_values']}")
        input_ids, labels, targets = (sample[key] for key in _TOKEN_KEYS)
        length = input_ids.shape[0] if input_ids.ndim == 1 else -1
        if length < 1 or any(t.shape != (length,) for t in (labels, targets)):
            raise ValueError(
                f"sample {index}: input_ids, labels and visual_target_mask must be non-empty 1-D tensors of one "
                f"length, got shapes {[tuple(t.shape) for t in (input_ids, labels, targets)]}"
            )
        if targets.dtype != torch.bool:
            raise ValueError(f"sample {index}: visual_target_mask must be a bool tensor, got {targets.dtype}")
        pixel_values = sample["pixel_values"]
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"sample {index}: pixel_values must be (n, 3, S, S), got {tuple(pixel_values.shape)}")
        limit = self.max_length
        if limit is not None and length > limit:
            raise ValueError(
                f"sample {index} has {length} tokens, more than max_length={limit}; the collator never truncates: "
                "truncate or filter when tokenising, or raise max_length"
            )
        labels, targets = labels.clone(), targets.clone()
        # The losses shift by one: a first-token target would be predicted from another sample or from padding.
        labels[0], targets[0] = IGNORE_INDEX, False
        return {"input_ids": input_ids, "labels": labels, "visual_target_mask": targets}

    def _round_up(self, length: int) -> int:
        multiple = self.pad_to_multiple_of
        return length if multiple is None else (length + multiple - 1) // multiple * multiple

    # ------------------------------------------------------------------------------------------ padding

    def _pad(self, tokens: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One sample per row, padded on `padding_side` to the longest (rounded up): (B, T) tensors."""
        length = self._round_up(max(len(t["input_ids"]) for t in tokens))
        pad_values = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "visual_target_mask": False}
        batch: dict[str, Any] = {}
        for key, value in pad_values.items():
            padded = pad_sequence(
                [t[key] for t in tokens], batch_first=True, padding_value=value, padding_side=self.padding_side
            )  # (B, longest)
            extra = length - padded.shape[1]
            batch[key] = F.pad(padded, (0, extra) if self.padding_side == "right" else (extra, 0), value=value)
        lengths = torch.tensor([len(t["input_ids"]) for t in tokens])  # (B,)
        columns = torch.arange(length)  # (T,)
        if self.padding_side == "right":
            real = columns < lengths[:, None]  # (B, T)
        else:
            real = columns >= length - lengths[:, None]
        attention_mask = real.long()  # (B, T)
        batch["attention_mask"] = attention_mask
        batch["position_ids"] = (attention_mask.cumsum(-1) - 1).masked_fill(~real, 0)  # (B, T)
        return batch

    # ------------------------------------------------------------------------------------------ packing

    def _pack(self, tokens: list[dict[str, torch.Tensor]]) -> tuple[dict[str, Any], list[int]]:
        """Samples packed into (R, max_length) rows; also returns the sample order, row-major, for the images."""
        row_length = self.max_length
        if row_length is None:  # __init__ requires it when packing
            raise ValueError("pack=True needs max_length")
        rows = plan_packing([len(t["input_ids"]) for t in tokens], row_length)
        pad_values = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "visual_target_mask": False}
        columns: dict[str, list[torch.Tensor]] = {key: [] for key in (*pad_values, "position_ids")}
        for row in rows:
            free = row_length - sum(len(tokens[i]["input_ids"]) for i in row)
            for key, value in pad_values.items():
                pieces = [tokens[i][key] for i in row]
                columns[key].append(torch.cat([*pieces, torch.full((free,), value, dtype=pieces[0].dtype)]))
            # Positions restart at every sample, and at the tail padding, which becomes a segment of its own.
            spans = [len(tokens[i]["input_ids"]) for i in row] + ([free] if free else [])
            columns["position_ids"].append(torch.cat([torch.arange(span) for span in spans]))
        batch: dict[str, Any] = {key: torch.stack(rows_) for key, rows_ in columns.items()}  # (R, T) each
        return batch, [i for row in rows for i in row]


def plan_packing(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """First-fit-decreasing: sample indices grouped into rows whose lengths sum to at most row_length.

    Samples are taken longest first (ties in input order); each goes into the first row with room, or a new row.
    Within a row, samples keep the order they were placed in. Plain Python: O(B * R) over lengths only.

    Raises:
        ValueError: when a sample is longer than row_length.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length > row_length:
            raise ValueError(
                f"sample {index} has {length} tokens, more than the packed row length max_length={row_length}; "
                "the collator never truncates: truncate or filter when tokenising, or raise max_length"
            )
        row = next((r for r, room in enumerate(free) if room >= length), None)
        if row is None:
            rows.append([])
            free.append(row_length)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= length
    return rows


__all__ = ["MODEL_INPUT_KEYS", "VPiTCollator", "model_inputs", "plan_packing"]
