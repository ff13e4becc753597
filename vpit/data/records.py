"""Records: the canonical `Sample`, the reasons a record can be bad, and loading images safely.

Every reader turns its format into a `Sample` (chat messages with `<image>` markers + the images they refer to).
Anything wrong with a record raises `RecordError(reason, message)`; the reason is one of `REASONS`, so reports
can count by class and tests can assert the exact reason.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# reason code -> what it means (shown in reports)
REASONS: dict[str, str] = {
    "missing_image": "an image file the record names does not exist",
    "corrupt_image": "an image file cannot be decoded (corrupt or truncated)",
    "empty_image": "an image file is empty (0 bytes) or has zero width or height",
    "image_count_mismatch": "the number of <image> markers differs from the number of images given",
    "empty_turn": "a turn is empty or whitespace only",
    "unknown_role": "a turn has a role other than system / user / assistant (or their aliases)",
    "bad_role_order": "turns do not alternate user, assistant (after an optional leading system turn)",
    "no_assistant_turn": "the conversation has no assistant turn to learn from",
    "invalid_utf8": "text is not valid UTF-8",
    "truncates_image": "the sequence is longer than max_length and the cut would go through an image span",
    "no_labels": "no assistant token survives tokenisation / truncation, so the sample would train on nothing",
    "path_escapes_root": "an image path points outside the dataset's image folder",
    "bad_json": "a line of the data file is not valid JSON (or not a JSON object)",
    "duplicate_id": "the record's id was already used by an earlier record of the same source",
    "bad_record": "the record lacks a field its format requires, or a field has the wrong type",
    "tokenization": "the response mask cannot be computed exactly with this tokenizer's chat template",
    "unreadable_file": "a data file is missing or cannot be read at all",
}


class RecordError(ValueError):
    """A record that cannot be used, with a machine-readable `reason` (a key of REASONS)."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown record error reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


ImageSource = str | Path | bytes | Image.Image | dict[str, Any]


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


# --------------------------------------------------------------------------------------------- images


def resolve_image_path(ref: str | Path, root: Path | None) -> Path:
    """`ref` relative to `root`; raises `path_escapes_root` if it resolves outside `root`."""
    if root is None:
        return Path(ref)
    root = root.resolve()
    path = (root / ref).resolve()
    if not path.is_relative_to(root):
        raise RecordError("path_escapes_root", f"image path {str(ref)!r} resolves outside {root}")
    return path


def _open(source: ImageSource, root: Path | None) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):  # a `datasets` Image feature, undecoded
        if source.get("bytes"):
            return _open(source["bytes"], root)
        if source.get("path"):
            return _open(source["path"], root)
        raise RecordError("bad_record", "image dict has neither bytes nor path")
    if isinstance(source, bytes):
        if not source:
            raise RecordError("empty_image", "image bytes are empty")
        return Image.open(io.BytesIO(source))
    path = resolve_image_path(source, root)
    if not path.is_file():
        raise RecordError("missing_image", f"{path} does not exist")
    if path.stat().st_size == 0:
        raise RecordError("empty_image", f"{path} is 0 bytes")
    return Image.open(path)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a person would expect to see it.

    - transparency (RGBA, LA, PA, P with a transparent index) is composited onto white, not dropped to black;
    - 16-bit and 32-bit integer greyscale (I;16*, I) is scaled to 8 bits by its bit depth, not clipped;
    - float greyscale (F) in [0, 1] is scaled to [0, 255];
    - CMYK, YCbCr, LAB, HSV, 1-bit and palette images go through PIL's conversions.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image).astype(np.float64)
        scale = 257.0 if mode.startswith("I;16") or array.max() <= 65535 else 16843009.0
        return Image.fromarray(np.clip(array / scale, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        array = np.asarray(image).astype(np.float64)
        if array.max() <= 1.0:
            array = array * 255.0
        return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageSource, root: Path | None = None) -> Image.Image:
    """Open, fully decode, orient (EXIF) and convert one image to RGB.

    Raises:
        RecordError: missing_image, empty_image, corrupt_image or path_escapes_root.
    """
    try:
        image = _open(source, root)
        image.load()  # decode now: truncated files fail here, not later inside a DataLoader worker
    except RecordError:
        raise
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise RecordError("corrupt_image", f"{_describe(source)}: {err}") from err
    if image.width == 0 or image.height == 0:
        raise RecordError("empty_image", f"{_describe(source)} is {image.width}x{image.height}")
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, dict):
        return str(source.get("path") or "<image bytes>")
    return f"<{type(source).__name__}>"


__all__ = ["REASONS", "ImageSource", "RecordError", "Sample", "load_image", "resolve_image_path", "to_rgb"]
