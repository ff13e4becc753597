"""Records: the canonical `Sample`, the reasons a record can be bad, and loading a record's images.

Every reader turns its format into a `Sample` (chat messages with `<image>` markers + the images they refer to).
Anything wrong with a record raises `RecordError(reason, message)`; the reason is one of `REASONS`, so reports
can count by class and tests can assert the exact reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..model.images import IMAGE_REASONS, ImageError, ImageSource, load_image

# reason code -> what it means (shown in reports)
REASONS: dict[str, str] = {
    **IMAGE_REASONS,
    "image_count_mismatch": "the number of <image> markers differs from the number of images given",
    "empty_turn": "a turn is empty or whitespace only",
    "unknown_role": "a turn has a role other than system / user / assistant (or their aliases)",
    "bad_role_order": "turns do not alternate user, assistant (after an optional leading system turn)",
    "no_assistant_turn": "the conversation has no assistant turn to learn from",
    "invalid_utf8": "text is not valid UTF-8",
    "truncates_image": "the sequence is longer than max_length and the cut would go through an image span",
    "no_labels": "no assistant token survives tokenisation / truncation, so the sample would train on nothing",
    "no_response_image": "no answer holds an image, which the queries stage needs as its target",
    "too_long": "the sequence up to the target image's queries is longer than max_length",
    "bad_json": "a line of the data file is not valid JSON (or not a JSON object)",
    "duplicate_id": "the record's id was already used by an earlier record of the same source",
    "bad_record": "the record lacks a field its format requires, or a field has the wrong type",
    "tokenization": "the response mask cannot be computed exactly with this tokenizer's chat template",
    "unreadable_file": "a data file is missing or cannot be read at all",
    "stale_cache": "the image changed after its frozen features were cached (delete the cache to recompute them)",
}


class RecordError(ValueError):
    """A record that cannot be used, with a machine-readable `reason` (a key of REASONS)."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown record error reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class Sample:
    """One conversation in canonical form.

    Attributes:
        messages: [{"role": "system" | "user" | "assistant", "content": str}], `<image>` marking each image.
        images: the images in marker order: paths (relative to `image_root`), bytes, PIL images, or
            `datasets` Image dicts ({"bytes": ..., "path": ...}).
        id: the record's own id, when it has one.
        source / index: where the record came from (card or file name, and its position there).
        task: understanding | generation | other_visual.
        image_root: the folder image paths are relative to (and must stay inside).
    """

    messages: list[dict[str, str]]
    images: list[ImageSource] = field(default_factory=list)
    id: str | None = None
    source: str = ""
    index: int = -1
    task: str = "understanding"
    image_root: Path | None = None


def load_record_image(source: ImageSource, root: Path | None = None) -> Image.Image:
    """`vpit.model.images.load_image` for a record's image: a bad image raises the record's `RecordError`, with
    the same reason."""
    try:
        return load_image(source, root)
    except ImageError as err:
        raise RecordError(err.reason, err.message) from err


__all__ = ["REASONS", "RecordError", "Sample", "load_record_image"]
