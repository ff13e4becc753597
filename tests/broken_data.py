"""A deliberately broken LLaVA-format data set: one record per class of bad input, plus good records whose images
use every awkward mode (which must be converted, not rejected). `build(folder)` returns the expected reasons."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _record(rid: str, image: str | list[str] | None, turns: list[tuple[str, str]]) -> dict:
    record: dict = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if isinstance(image, list):
        record["images"] = image
    elif image is not None:
        record["image"] = image
    return record


QA = [("human", "<image>\nWhat colour is the shape?"), ("gpt", "Red.")]

# index -> expected reason (None: a good record)
EXPECTED: dict[int, str | None] = {}


def build(folder: Path) -> dict[int, str | None]:
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    red = Image.new("RGB", (24, 24), (220, 40, 40))
    (images / "good.png").write_bytes(_png(red))
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png body at all")
    (images / "truncated.png").write_bytes(_png(Image.effect_noise((64, 64), 50).convert("RGB"))[:300])
    (images / "empty.png").write_bytes(b"")
    (folder / "outside.png").write_bytes(_png(red))
    # Awkward modes that are fine once converted.
    Image.new("L", (24, 24), 90).save(images / "gray.png")
    rgba = Image.new("RGBA", (24, 24), (0, 0, 255, 0))
    rgba.save(images / "rgba.png")
    Image.new("RGB", (24, 24), (40, 170, 60)).convert("P", palette=Image.Palette.ADAPTIVE).save(images / "palette.png")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(images / "cmyk.jpg")
    Image.new("I;16", (24, 24), 65535).save(images / "sixteen.png")
    tall = Image.new("RGB", (10, 20), (230, 200, 40))
    exif = tall.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    tall.save(images / "exif.jpg", exif=exif)

    lines: list[bytes] = []
    expected: dict[int, str | None] = {}

    def add(record: dict | bytes, reason: str | None) -> None:
        expected[len(lines)] = reason
        lines.append(record if isinstance(record, bytes) else json.dumps(record).encode())

    add(_record("ok-1", "good.png", QA), None)
    add(_record("missing", "nope.png", QA), "missing_image")
    add(_record("corrupt", "corrupt.png", QA), "corrupt_image")
    add(_record("truncated", "truncated.png", QA), "corrupt_image")
    add(_record("empty", "empty.png", QA), "empty_image")
    add(_record("count", "good.png", [("human", "<image> and <image>?"), ("gpt", "Both red.")]), "image_count_mismatch")
    add(_record("blank", "good.png", [("human", "<image>\nColour?"), ("gpt", " \n\t ")]), "empty_turn")
    add(_record("order", "good.png", [("gpt", "Red."), ("human", "<image>\nColour?")]), "bad_role_order")
    add(_record("role", "good.png", [("human", "<image>\nColour?"), ("bot", "Red.")]), "unknown_role")
    add(_record("noanswer", "good.png", [("human", "<image>\nColour?")]), "no_assistant_turn")
    add(
        b'{"id": "utf8", "image": "good.png", "conversations": [{"from": "human", "value": "<image>\\nbad \xff\xfe"},'
        b' {"from": "gpt", "value": "Red."}]}',
        "invalid_utf8",
    )
    add(_record("escape", "../outside.png", QA), "path_escapes_root")
    add(b'{"id": "json", "image": "good.png", "conversations": [', "bad_json")
    add(_record("ok-1", "good.png", QA), "duplicate_id")
    long_prompt = "a small red circle on the left " * 12
    add(_record("long", "good.png", [("human", long_prompt + "<image>\nColour?"), ("gpt", "Red.")]), "truncates_image")
    for name in ("gray.png", "rgba.png", "palette.png", "cmyk.jpg", "sixteen.png", "exif.jpg"):
        add(_record(f"mode-{name}", name, QA), None)
    add(_record("text-only", None, [("human", "Say hi."), ("gpt", "Hi.")]), None)
    (folder / "records.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return expected
