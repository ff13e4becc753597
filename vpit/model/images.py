"""Loading one image the way a person expects to see it: decoded now, EXIF-oriented, converted to 8-bit RGB.

Used by the processor (the model's own input path) and by every data reader. A bad image raises
`ImageError(reason, message)`, the reason one of `IMAGE_REASONS`; the data layer reports it as the record's error.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

# reason code -> what it means (shown in data reports, which add the record-level reasons)
IMAGE_REASONS: dict[str, str] = {
    "missing_image": "an image file the record names does not exist",
    "corrupt_image": "an image file cannot be decoded (corrupt or truncated)",
    "empty_image": "an image file is empty (0 bytes) or has zero width or height",
    "path_escapes_root": "an image path points outside the dataset's image folder",
    "bad_image_reference": "an image reference is neither a path, bytes, a PIL image nor a datasets Image dict",
}

ImageSource = str | Path | bytes | Image.Image | dict[str, Any]


class ImageError(ValueError):
    """An image that cannot be used, with a machine-readable `reason` (a key of IMAGE_REASONS)."""

    def __init__(self, reason: str, message: str):
        if reason not in IMAGE_REASONS:
            raise ValueError(f"unknown image error reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def resolve_image_path(ref: str | Path, root: Path | None) -> Path:
    """`ref` relative to `root`; raises `path_escapes_root` if it resolves outside `root`."""
    if root is None:
        return Path(ref)
    root = root.resolve()
    path = (root / ref).resolve()
    if not path.is_relative_to(root):
        raise ImageError("path_escapes_root", f"image path {str(ref)!r} resolves outside {root}")
    return path


def _open(source: ImageSource, root: Path | None) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):  # a `datasets` Image feature, undecoded
        if source.get("bytes"):
            return _open(source["bytes"], root)
        if source.get("path"):
            return _open(source["path"], root)
        raise ImageError("bad_image_reference", "image dict has neither bytes nor path")
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty_image", "image bytes are empty")
        return Image.open(io.BytesIO(source))
    path = resolve_image_path(source, root)
    if not path.is_file():
        raise ImageError("missing_image", f"{path} does not exist")
    if path.stat().st_size == 0:
        raise ImageError("empty_image", f"{path} is 0 bytes")
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
        ImageError: missing_image, empty_image, corrupt_image, path_escapes_root or bad_image_reference.
    """
    try:
        image = _open(source, root)
        _decode_whole(image)  # decode now: truncated files fail here, not later inside a DataLoader worker
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise ImageError("corrupt_image", f"{_describe(source)}: {err}") from err
    if image.width == 0 or image.height == 0:
        raise ImageError("empty_image", f"{_describe(source)} is {image.width}x{image.height}")
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def _decode_whole(image: Image.Image) -> None:
    """`image.load()` with truncated files refused whatever PIL's process-wide `ImageFile.LOAD_TRUNCATED_IMAGES`
    says: libraries set it on import (lmms-eval's `lmms_eval.api.task` does), after which PIL pads a truncated file
    with grey and a corrupt record would be trained on silently."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, dict):
        return str(source.get("path") or "<image bytes>")
    return f"<{type(source).__name__}>"


__all__ = ["IMAGE_REASONS", "ImageError", "ImageSource", "load_image", "resolve_image_path", "to_rgb"]
