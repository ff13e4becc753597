"""Regenerate every sample file under data_cards/samples/ (deterministic: fixed seeds, PIL only).

    .venv/bin/python data_cards/samples/build_samples.py

Each card ships 5-8 sample records in its own folder, `samples/<card name>/`, as `records.json` (LLaVA-style
cards: a JSON list, as the real files are) or `records.jsonl`, with the images under `images/`.

- Hub-source cards (LLaVA-1.5 mix665k, ShareGPT4V, CC3M, InstructPix2Pix, Something-Something v2): the records are
  hand-written stand-ins in the real schema (the same keys, id styles and image path layouts, so a card's `fields`
  mapping is exercised), and the pictures are small synthetic scenes drawn here that match the text. Nothing is
  copied from the real datasets.
- Toy cards: rendered exactly by the toy-world grammar of docs/toy_world.md (white 64x64 canvas, the six flat colours,
  circle / square / triangle with circumradius 8 or 14 px, five positions jittered by at most 0.04, captions
  `a {size} {colour} {shape} {where}`); the held-out (colour, shape) pairs never appear as a generation or editing
  target image.

Running the script deletes and rewrites each `samples/<card name>/` folder (this script itself is kept).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from vpit.toy.world import QUESTIONS as WORLD_QUESTIONS
from vpit.toy.world import ToyObject, jittered, render

HERE = Path(__file__).resolve().parent
SEED = 20241218  # MetaMorph's arXiv date; any fixed number would do
JPEG_QUALITY = 90

# ------------------------------------------------------------------------------------------- helpers

Colour = tuple[int, int, int]
Painter = Callable[[ImageDraw.ImageDraw, int, int], None]


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # The bitmap font does not depend on FreeType, so the text pixels are the same on every machine.
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader is not None else ImageFont.load_default()


FONT = _font()


def fresh_folder(name: str) -> Path:
    folder = HERE / name
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "images").mkdir(parents=True)
    return folder


def paint(size: tuple[int, int], background: Colour, painter: Painter) -> Image.Image:
    image = Image.new("RGB", size, background)
    painter(ImageDraw.Draw(image), *size)
    return image


def save(image: Image.Image, folder: Path, relative: str) -> str:
    """Save under `folder/images/relative` (JPEG or PNG by suffix); return `relative`, the path a record names."""
    path = folder / "images" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        image.save(path, "JPEG", quality=JPEG_QUALITY)
    else:
        image.save(path, "PNG")
    return relative


def write_json(folder: Path, records: Sequence[dict[str, Any]]) -> None:
    (folder / "records.json").write_text(json.dumps(list(records), indent=1, ensure_ascii=False) + "\n")


def write_jsonl(folder: Path, records: Sequence[dict[str, Any]]) -> None:
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    """LLaVA conversations from (human, gpt) pairs."""
    out = []
    for human, gpt in pairs:
        out += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return out


# Small scene pieces shared by the placeholder pictures.
SKY: Colour = (135, 190, 235)
NIGHT: Colour = (20, 24, 60)
GRASS: Colour = (70, 150, 70)
ROAD: Colour = (110, 110, 115)
WOOD: Colour = (150, 105, 60)
WALL: Colour = (225, 215, 195)


def box(d: ImageDraw.ImageDraw, xy: Sequence[float], fill: Colour, outline: Colour | None = None) -> None:
    d.rectangle(list(xy), fill=fill, outline=outline)


def disc(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: Colour) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def bus(d: ImageDraw.ImageDraw, x: int, y: int, body: Colour = (245, 245, 245), stripe: Colour = (200, 30, 40)) -> None:
    box(d, (x, y, x + 34, y + 16), body, (60, 60, 60))
    box(d, (x, y + 10, x + 34, y + 12), stripe)
    for wx in range(x + 3, x + 31, 7):
        box(d, (wx, y + 3, wx + 4, y + 7), (90, 140, 190))
    disc(d, x + 7, y + 17, 3, (30, 30, 30))
    disc(d, x + 27, y + 17, 3, (30, 30, 30))


# ------------------------------------------------------------------------------ LLaVA-1.5 mix665k


def build_llava_mix665k() -> None:
    folder = fresh_folder("llava_v1_5_mix665k")
    short = "\nAnswer the question using a single word or phrase."
    records: list[dict[str, Any]] = []

    def street(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (0, 0, w, 30), SKY)
        box(d, (0, 30, w, 40), (190, 190, 190))  # sidewalk
        box(d, (0, 40, w, h), ROAD)
        bus(d, 16, 28)
        for px in (4, 9, 56):
            disc(d, px, 33, 2, (60, 40, 30))

    image = save(paint((64, 64), SKY, street), folder, "coco/train2017/000000033471.jpg")
    records.append(
        {
            "id": "000000033471",
            "image": image,
            "conversations": turns(
                (
                    "<image>\nWhat colors are on the bus in the image?",
                    "The bus is white with a red stripe along its side.",
                ),
                (
                    "Is the bus parked or driving along the street?",
                    "The bus is in the traffic lane rather than at a stop, so it appears to be driving along the street.",
                ),
                (
                    "What might the people on the sidewalk be doing?",
                    "They could be waiting to board the bus or simply walking past it on their way somewhere.",
                ),
            ),
        }
    )

    def stop_sign(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (30, 34, 33, h), (120, 120, 120))
        octagon = [
            (32 + 16 * math.cos(math.radians(22.5 + 45 * k)), 22 + 16 * math.sin(math.radians(22.5 + 45 * k)))
            for k in range(8)
        ]
        d.polygon(octagon, fill=(200, 25, 30))
        d.text((21, 17), "STOP", fill=(255, 255, 255), font=FONT)

    image = save(paint((64, 64), SKY, stop_sign), folder, "coco/train2017/000000174482.jpg")
    records.append(
        {
            "id": "000000174482",
            "image": image,
            "conversations": turns(
                ("<image>\nWhat does the sign say?" + short, "Stop"),
                ("What color is the sign?" + short, "Red"),
                ("What shape is the sign?" + short, "Octagon"),
            ),
        }
    )

    def desk(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (0, 40, w, h), WOOD)
        box(d, (10, 30, 18, 40), (40, 80, 220))  # cup
        d.arc([15, 32, 21, 38], 270, 90, fill=(40, 80, 220))
        box(d, (32, 18, 56, 34), (40, 40, 45))  # laptop screen
        box(d, (28, 34, 60, 40), (160, 160, 165))  # keyboard

    image = save(paint((64, 64), WALL, desk), folder, "gqa/images/2354786.jpg")
    records.append(
        {
            "id": "2354786",
            "image": image,
            "conversations": turns(
                ("<image>\nIs the cup to the left or to the right of the laptop?" + short, "Left"),
                ("What color is the cup?" + short, "Blue"),
                ("Which material is the table made of?" + short, "Wood"),
            ),
        }
    )

    def book(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (8, 2, 56, 62), (30, 110, 80), (10, 50, 30))
        d.text((12, 8), "GARDEN", fill=(255, 255, 255), font=FONT)
        d.text((12, 18), "BASICS", fill=(255, 255, 255), font=FONT)
        disc(d, 32, 38, 7, (240, 200, 40))
        d.text((12, 50), "A. REED", fill=(230, 230, 230), font=FONT)

    image = save(paint((64, 64), (250, 250, 250), book), folder, "ocr_vqa/images/1585101176.jpg")
    records.append(
        {
            "id": "1585101176",
            "image": image,
            "conversations": turns(
                ("<image>\nWho wrote this book?" + short, "A. Reed"),
                ("What is the title of this book?" + short, "Garden Basics"),
                ("What is the genre of this book?" + short, "Crafts, Hobbies & Home"),
                ("Is this a sci-fi book?" + short, "No"),
            ),
        }
    )

    def shop(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (0, 0, w, h), (180, 70, 60))  # brick wall
        box(d, (8, 6, 56, 20), (250, 240, 210), (40, 30, 20))
        d.text((20, 8), "CAFE", fill=(40, 30, 20), font=FONT)
        box(d, (20, 30, 44, h), (60, 40, 30))  # door
        box(d, (24, 34, 40, 48), (150, 200, 230))

    image = save(paint((64, 64), WALL, shop), folder, "textvqa/train_images/0a0bc91825468c45.jpg")
    records.append(
        {
            "id": "0a0bc91825468c45",
            "image": image,
            "conversations": turns(("<image>\nWhat is written on the sign above the door?" + short, "cafe")),
        }
    )

    kite = (0.55, 0.12, 0.83, 0.38)
    field = (0.0, 0.72, 1.0, 1.0)

    def park(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (field[0] * w, field[1] * h, field[2] * w, field[3] * h), GRASS)
        x0, y0, x1, y1 = (kite[0] * w, kite[1] * h, kite[2] * w, kite[3] * h)
        d.polygon(
            [((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)], fill=(240, 210, 30)
        )
        d.line([((x0 + x1) / 2, y1), (20, 50)], fill=(40, 40, 40))

    image = save(paint((64, 64), SKY, park), folder, "vg/VG_100K/2356347.jpg")
    records.append(
        {
            "id": "2356347",
            "image": image,
            "conversations": turns(
                (
                    "<image>\nPlease provide the bounding box coordinate of the region this sentence describes: "
                    "yellow kite in the sky.",
                    "[" + ", ".join(f"{v:.2f}" for v in kite) + "]",
                ),
                (
                    "Please provide a short description for this region: ["
                    + ", ".join(f"{v:.2f}" for v in field)
                    + "]",
                    "Green grass field.",
                ),
            ),
        }
    )

    # A text-only ShareGPT conversation, as the mix carries ~40k of them: no "image" key at all.
    records.append(
        {
            "id": "oB2aF5k_0",
            "model": "",
            "conversations": turns(
                (
                    "Write a haiku about autumn leaves.",
                    "Red leaves drift and fall,\nthe maple lets go softly,\nthe path turns to gold.",
                ),
                (
                    "Now write one about spring rain.",
                    "Warm rain on the roof,\nseeds wake beneath the wet soil,\ngreen returns at dawn.",
                ),
            ),
        }
    )
    write_json(folder, records)


# ------------------------------------------------------------------------------------------ ShareGPT4V


def build_sharegpt4v() -> None:
    folder = fresh_folder("sharegpt4v")
    records: list[dict[str, Any]] = []

    def fruit(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (0, 40, w, h), WOOD)
        d.ellipse([10, 30, 54, 50], fill=(240, 240, 240), outline=(180, 180, 180))
        disc(d, 24, 34, 7, (230, 40, 40))
        disc(d, 38, 33, 7, (240, 140, 30))
        d.ellipse([26, 22, 46, 30], fill=(240, 220, 60))

    image = save(paint((64, 64), WALL, fruit), folder, "coco/train2017/000000306267.jpg")
    records.append(
        {
            "id": "000000306267",
            "image": image,
            "conversations": turns(
                (
                    "What do you see happening in this image?\n<image>",
                    "The image shows a simple still life on a wooden table. A white oval bowl sits in the centre "
                    "holding three pieces of fruit: a red apple on the left, an orange on the right and a yellow "
                    "banana resting across the top. The wall behind is a plain warm beige, and the table's brown "
                    "wood fills the lower part of the frame. The arrangement is calm and evenly lit, with no people "
                    "or other objects in view.",
                )
            ),
        }
    )

    def street(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (0, 44, w, h), ROAD)
        box(d, (6, 10, 30, 44), (200, 170, 140))
        box(d, (34, 20, 58, 44), (150, 160, 175))
        for x in (10, 20):
            for y in (14, 26):
                box(d, (x, y, x + 6, y + 6), (90, 130, 170))
        d.line([(0, 54), (w, 54)], fill=(240, 240, 240))

    image = save(paint((64, 64), SKY, street), folder, "sam/images/sa_227843.jpg")
    records.append(
        {
            "id": "sa_227843",
            "image": image,
            "conversations": turns(
                (
                    "Can you describe the main features of this image for me?\n<image>",
                    "This is a street scene under a clear light-blue sky. On the left stands a sandy-coloured "
                    "building with four square blue windows in two rows; to its right is a lower grey building with "
                    "a flat roof. A grey asphalt road runs across the bottom of the image, divided by a thin white "
                    "line. No vehicles or pedestrians are visible, which gives the scene a quiet, empty feel.",
                )
            ),
        }
    )

    def poster(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (0, 0, w, 22), (30, 60, 140))
        d.text((6, 6), "SUMMER", fill=(255, 255, 255), font=FONT)
        disc(d, 32, 40, 12, (250, 190, 40))
        d.text((10, 54), "FESTIVAL", fill=(30, 60, 140), font=FONT)

    image = save(paint((64, 64), (250, 245, 230), poster), folder, "llava/llava_pretrain/images/00015/000156891.jpg")
    records.append(
        {
            "id": "000156891",
            "image": image,
            "conversations": turns(
                (
                    "<image>\nAnalyze the image in a comprehensive and detailed manner.",
                    'The image is a simple poster. A dark-blue band across the top carries the word "SUMMER" in '
                    "white capital letters. Below it, on a cream background, a large yellow-orange circle suggests "
                    'the sun. At the bottom the word "FESTIVAL" is printed in the same dark blue as the top band, '
                    'so the two words read together as "Summer Festival". The design is flat and graphic, with no '
                    "photographic detail.",
                )
            ),
        }
    )

    def painting(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (0, 0, w, 28), (240, 200, 150))
        box(d, (0, 28, w, h), (60, 110, 150))
        disc(d, 46, 20, 6, (250, 120, 60))
        d.polygon([(0, 28), (14, 14), (30, 28)], fill=(90, 80, 90))
        for y in range(34, 62, 6):
            d.line([(4, y), (60, y + 1)], fill=(120, 170, 200))

    image = save(paint((64, 64), (0, 0, 0), painting), folder, "wikiart/images/anonymous_coastal-sunset-1890.jpg")
    records.append(
        {
            "id": "anonymous_coastal-sunset-1890",
            "image": image,
            "conversations": turns(
                (
                    "Write a detailed description of the given image.\n<image>",
                    "This painting shows a coastal scene at sunset. The upper part is a warm peach sky with a small "
                    "orange sun low on the right. On the left a dark hill slopes down to the water. The lower half "
                    "is a deep blue sea crossed by light horizontal strokes that suggest gentle waves catching the "
                    "evening light. The palette contrasts warm sky tones with cool water, typical of late "
                    "nineteenth-century landscape painting.",
                )
            ),
        }
    )

    def sign(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (10, 14, 54, 34), (20, 20, 20))
        d.text((20, 18), "OPEN", fill=(60, 230, 90), font=FONT)
        box(d, (0, 44, w, h), (200, 200, 200))

    image = save(paint((64, 64), (80, 70, 60), sign), folder, "share_textvqa/images/003a8ae2ef43b901.jpg")
    records.append(
        {
            "id": "003a8ae2ef43b901",
            "image": image,
            "conversations": turns(
                (
                    "Explain the visual content of the image in great detail.\n<image>",
                    'The image shows a black rectangular sign mounted on a dark brown wall. The sign reads "OPEN" '
                    "in bright green capital letters, the style of an illuminated shop sign. Below it a light grey "
                    "counter or ledge spans the width of the image. The composition is centred on the sign, which "
                    "tells passers-by that the business is open.",
                )
            ),
        }
    )
    write_json(folder, records)


# ------------------------------------------------------------------------------------------------- CC3M


def build_cc3m() -> None:
    folder = fresh_folder("cc3m_generation")

    def city_bus(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (0, 40, w, h), ROAD)
        box(d, (14, 14, 50, 46), (200, 30, 40))
        for y in (18, 31):
            for x in range(17, 47, 8):
                box(d, (x, y, x + 5, y + 6), (220, 230, 240))
        disc(d, 20, 47, 3, (20, 20, 20))
        disc(d, 44, 47, 3, (20, 20, 20))

    def sea_sunset(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (0, 0, w, 36), (250, 160, 90))
        disc(d, 32, 36, 9, (255, 210, 80))
        box(d, (0, 36, w, h), (40, 70, 120))
        d.polygon([(22, 48), (38, 48), (35, 52), (25, 52)], fill=(30, 20, 20))
        d.line([(30, 48), (30, 40)], fill=(30, 20, 20))

    def flower(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        d.line([(32, 34), (32, 60)], fill=(30, 110, 30), width=2)
        for k in range(6):
            a = math.radians(60 * k)
            disc(d, 32 + 8 * math.cos(a), 26 + 8 * math.sin(a), 5, (250, 215, 40))
        disc(d, 32, 26, 4, (140, 90, 20))

    def mountains(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        d.polygon([(0, 60), (22, 20), (44, 60)], fill=(110, 110, 130))
        d.polygon([(24, 60), (46, 14), (64, 52), (64, 60)], fill=(90, 95, 115))
        d.polygon([(17, 30), (22, 20), (27, 30)], fill=(255, 255, 255))
        d.polygon([(41, 24), (46, 14), (51, 24)], fill=(255, 255, 255))
        box(d, (0, 58, w, h), (240, 240, 245))

    def coffee(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (0, 42, w, h), WOOD)
        d.ellipse([14, 44, 50, 52], fill=(235, 235, 235))
        box(d, (22, 26, 42, 47), (250, 250, 250), (180, 180, 180))
        d.ellipse([22, 23, 42, 29], fill=(90, 55, 30))
        d.arc([38, 30, 48, 42], 270, 90, fill=(180, 180, 180), width=2)

    def house(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (0, 50, w, h), GRASS)
        box(d, (16, 30, 48, 52), (245, 235, 210), (120, 100, 80))
        d.polygon([(12, 30), (32, 12), (52, 30)], fill=(190, 40, 40))
        box(d, (28, 40, 36, 52), (110, 70, 40))

    def moon_city(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        disc(d, 46, 14, 7, (245, 240, 210))
        for x, top in ((2, 34), (12, 24), (24, 38), (34, 28), (46, 36), (54, 30)):
            box(d, (x, top, x + 9, h), (35, 35, 50))
            for wy in range(top + 4, h - 4, 7):
                box(d, (x + 3, wy, x + 5, wy + 2), (250, 220, 120))

    scenes: list[tuple[str, Painter, Colour]] = [
        ("a red double - decker bus drives along a city street", city_bus, SKY),
        ("sunset over the sea with a small boat on the water", sea_sunset, (250, 160, 90)),
        ("a yellow flower in a green field", flower, GRASS),
        ("snow - capped mountains under a clear blue sky", mountains, SKY),
        ("a cup of coffee on a wooden table", coffee, WALL),
        ("illustration of a house with a red roof", house, SKY),
        ("the moon rises over the city 's skyline", moon_city, NIGHT),
    ]
    records = []
    for i, (caption, painter, background) in enumerate(scenes):
        key = f"{i:09d}"
        jpg = save(paint((64, 64), background, painter), folder, f"cc3m-train-0000/{key}.jpg")
        records.append({"__key__": key, "jpg": jpg, "txt": caption})
    write_jsonl(folder, records)


# ------------------------------------------------------------------------------------ InstructPix2Pix


def build_instructpix2pix() -> None:
    folder = fresh_folder("instructpix2pix")

    def cottage(night: bool) -> Painter:
        def draw(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
            box(d, (0, 0, w, 44), NIGHT if night else SKY)
            if night:
                disc(d, 50, 12, 6, (245, 240, 210))
            box(d, (0, 44, w, h), (40, 90, 40) if night else GRASS)
            box(d, (18, 28, 46, 48), (230, 220, 200))
            d.polygon([(14, 28), (32, 14), (50, 28)], fill=(120, 60, 40))
            box(d, (22, 34, 28, 40), (250, 220, 110) if night else (120, 170, 210))
            box(d, (36, 34, 42, 40), (250, 220, 110) if night else (120, 170, 210))

        return draw

    def tree(winter: bool) -> Painter:
        def draw(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
            box(d, (0, 48, w, h), (245, 245, 250) if winter else GRASS)
            box(d, (29, 30, 35, 50), (100, 70, 40))
            disc(d, 32, 24, 15, (235, 240, 245) if winter else (40, 130, 50))

        return draw

    def car(colour: Colour) -> Painter:
        def draw(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
            box(d, (0, 44, w, h), ROAD)
            box(d, (10, 30, 54, 44), colour)
            d.polygon([(18, 30), (24, 20), (42, 20), (48, 30)], fill=colour)
            box(d, (26, 22, 40, 29), (170, 210, 235))
            disc(d, 20, 45, 5, (25, 25, 25))
            disc(d, 44, 45, 5, (25, 25, 25))

        return draw

    def beach(boat: bool) -> Painter:
        def draw(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
            box(d, (0, 26, w, 46), (50, 120, 190))
            box(d, (0, 46, w, h), (235, 215, 160))
            disc(d, 12, 10, 5, (255, 220, 60))
            if boat:
                d.polygon([(36, 38), (54, 38), (51, 42), (39, 42)], fill=(120, 70, 40))
                d.polygon([(45, 37), (45, 22), (53, 36)], fill=(250, 250, 250))

        return draw

    def hills(sunset: bool) -> Painter:
        def draw(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
            box(d, (0, 0, w, 40), (245, 140, 70) if sunset else SKY)
            disc(d, 40, 38, 8, (255, 200, 80) if sunset else (255, 245, 200))
            d.polygon(
                [(0, 64), (0, 36), (20, 26), (40, 40), (64, 30), (64, 64)], fill=(60, 90, 60) if sunset else GRASS
            )

        return draw

    def mug(text: str | None) -> Painter:
        def draw(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
            box(d, (0, 46, w, h), WOOD)
            box(d, (18, 18, 42, 48), (250, 250, 250), (170, 170, 170))
            d.arc([36, 24, 50, 40], 270, 90, fill=(170, 170, 170), width=2)
            if text:
                d.text((21, 28), text, fill=(200, 40, 40), font=FONT)

        return draw

    pairs: list[tuple[str, Painter, str, str, Painter]] = [
        (
            "A cottage in the countryside, oil painting",
            cottage(False),
            "make it night time",
            "A cottage in the countryside at night, oil painting",
            cottage(True),
        ),
        ("A lone oak tree in a meadow", tree(False), "make it winter", "A lone oak tree in a snowy meadow", tree(True)),
        (
            "Photo of a red vintage car parked on the street",
            car((200, 35, 35)),
            "turn the car blue",
            "Photo of a blue vintage car parked on the street",
            car((40, 80, 200)),
        ),
        (
            "An empty tropical beach on a sunny day",
            beach(False),
            "add a sailboat",
            "A tropical beach with a sailboat on a sunny day",
            beach(True),
        ),
        (
            "Rolling green hills, digital art",
            hills(False),
            "make it sunset",
            "Rolling hills at sunset, digital art",
            hills(True),
        ),
        (
            "A plain white coffee mug on a desk",
            mug(None),
            "write LOVE on the mug",
            "A white coffee mug with LOVE written on it",
            mug("LOVE"),
        ),
    ]
    records = []
    for i, (original_prompt, before, edit_prompt, edited_prompt, after) in enumerate(pairs):
        original = save(paint((64, 64), SKY, before), folder, f"{i:07d}/0.jpg")
        edited = save(paint((64, 64), SKY, after), folder, f"{i:07d}/1.jpg")
        records.append(
            {
                "original_prompt": original_prompt,
                "original_image": original,
                "edit_prompt": edit_prompt,
                "edited_prompt": edited_prompt,
                "edited_image": edited,
            }
        )
    write_jsonl(folder, records)


# ------------------------------------------------------------------------------- Something-Something v2


def build_ssv2() -> None:
    """Frame lists as a user's extraction script would write them (see ssv2_frames.yaml): `frames/<video id>/%06d.jpg`."""
    folder = fresh_folder("ssv2_frames")
    size = (64, 48)  # SSv2 videos are 240 px high and mostly 4:3 or wider

    def table(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
        box(d, (0, 32, w, h), WOOD)

    def pushing(t: float) -> Painter:
        def draw(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
            table(d, w, h)
            x = 8 + 36 * t
            box(d, (x, 20, x + 10, 33), (40, 80, 220))
            disc(d, x - 4, 27, 4, (230, 185, 150))  # the hand pushing it

        return draw

    def putting(t: float) -> Painter:
        def draw(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
            table(d, w, h)
            y = 6 + 24 * t
            d.line([(20, y), (44, y)], fill=(20, 20, 20), width=3)
            disc(d, 32, y - 4, 4, (230, 185, 150))

        return draw

    def moving_up(t: float) -> Painter:
        def draw(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
            table(d, w, h)
            y = 26 - 20 * t
            disc(d, 32, y, 5, (220, 60, 40))
            disc(d, 32, y + 8, 4, (230, 185, 150))

        return draw

    def tipping(t: float) -> Painter:
        def draw(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
            table(d, w, h)
            angle = math.radians(90 * t)
            cx, cy = 30.0, 33.0  # bottle pivots on its bottom-right corner
            corners = [(-8, 0), (0, 0), (0, -20), (-8, -20)]
            pts = [
                (cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
                for x, y in corners
            ]
            d.polygon(pts, fill=(40, 150, 80))

        return draw

    def opening(t: float) -> Painter:
        def draw(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
            table(d, w, h)
            box(d, (20, 20, 44, 33), (190, 150, 90), (120, 90, 50))
            angle = math.radians(100 * t)
            hinge = (44.0, 20.0)
            tip = (hinge[0] - 24 * math.cos(angle), hinge[1] - 24 * math.sin(angle))
            d.line([hinge, tip], fill=(120, 90, 50), width=3)

        return draw

    videos: list[tuple[str, str, str, list[str], Callable[[float], Painter], int, str | None]] = [
        (
            "100218",
            "pushing a cup from left to right",
            "Pushing [something] from left to right",
            ["a cup"],
            pushing,
            4,
            None,
        ),
        ("57031", "putting a pen on a table", "Putting [something] on a surface", ["a pen"], putting, 4, None),
        ("143552", "moving a ball up", "Moving [something] up", ["a ball"], moving_up, 3, None),
        (
            "8812",
            "tipping a bottle over",
            "Tipping [something] over",
            ["a bottle"],
            tipping,
            5,
            "The video shows someone tipping a bottle over. Predict the next frame.",
        ),
        (
            "201964",
            "opening a box",
            "Opening [something]",
            ["a box"],
            opening,
            4,
            "The video shows someone opening a box. Predict the next frame.",
        ),
    ]
    records = []
    for video_id, label, template, placeholders, motion, n, prompt in videos:
        frames = []
        for k in range(n):
            t = k / (n - 1)
            frames.append(save(paint(size, WALL, motion(t)), folder, f"frames/{video_id}/{6 * k + 1:06d}.jpg"))
        # id / label / template / placeholders as in SSv2's something-something-v2-train.json; frames (and the
        # optional prompt) are what the user's extraction script adds.
        record: dict[str, Any] = {
            "id": video_id,
            "label": label,
            "template": template,
            "placeholders": placeholders,
            "frames": frames,
        }
        if prompt is not None:
            record["prompt"] = prompt
        records.append(record)
    write_jsonl(folder, records)


# --------------------------------------------------------------------------------------------- toy world

# docs/toy_world.md: the grammar and renderer live in vpit.toy.world; the samples use the first phrasing
# of each question so the shipped records stay stable.
QUESTIONS: dict[str, tuple[str, Callable[[ToyObject], str]]] = {
    kind: (phrasings[0], answer) for kind, (phrasings, answer) in WORLD_QUESTIONS.items()
}


def build_toy_understanding(rng: random.Random) -> None:
    folder = fresh_folder("toy_understanding")
    # Held-out pairs appear here on purpose: understanding data is where the model learns them.
    plan = [
        (("small", "red", "circle", "left"), ["colour", "shape", "describe"], "text"),
        (("large", "purple", "triangle", "center"), ["describe"], "parts"),
        (("small", "orange", "square", "top"), ["size", "position"], "system"),
        (("large", "green", "circle", "bottom"), ["shape", "colour"], "text"),
        (("large", "blue", "square", "right"), ["position", "size", "describe"], "parts"),
        (("small", "yellow", "triangle", "bottom"), ["describe", "colour"], "text"),
        (("large", "orange", "circle", "left"), ["shape", "position"], "parts"),
    ]
    records = []
    for i, (attributes, kinds, style) in enumerate(plan):
        obj = jittered(rng, *attributes)
        image = save(render(obj), folder, f"und_{i:04d}.png")
        messages: list[dict[str, Any]] = []
        if style == "system":
            messages.append({"role": "system", "content": "You answer questions about simple shapes."})
        for j, kind in enumerate(kinds):
            question, answer = QUESTIONS[kind]
            content: Any
            if j > 0:
                content = question
            elif style == "parts":
                content = [{"type": "image"}, {"type": "text", "text": question}]
            else:
                content = "<image>\n" + question
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer(obj)}]
        records.append({"id": f"toy-und-{i:04d}", "images": [image], "messages": messages, "meta": obj.meta()})
    write_jsonl(folder, records)


def build_toy_generation(rng: random.Random) -> None:
    folder = fresh_folder("toy_generation")
    plan = [
        ("small", "red", "circle", "left"),
        ("large", "blue", "triangle", "top"),
        ("small", "green", "square", "center"),
        ("large", "purple", "circle", "right"),
        ("small", "orange", "triangle", "bottom"),
        ("large", "yellow", "square", "center"),
    ]
    records = []
    for i, attributes in enumerate(plan):
        obj = jittered(rng, *attributes)
        assert not obj.held_out, f"{obj.caption} is held out and may not be a generation target"
        image = save(render(obj), folder, f"gen_{i:04d}.png")
        records.append({"id": f"toy-gen-{i:04d}", "image": image, "caption": obj.caption, "meta": obj.meta()})
    write_jsonl(folder, records)


def build_toy_editing(rng: random.Random) -> None:
    folder = fresh_folder("toy_editing")
    # (input attributes, edit kind, new value); a held-out input is allowed, a held-out output is not.
    plan = [
        (("small", "blue", "circle", "left"), "colour", "red"),
        (("large", "green", "circle", "center"), "colour", "yellow"),
        (("small", "purple", "square", "top"), "position", "right"),
        (("large", "red", "triangle", "bottom"), "colour", "blue"),
        (("large", "orange", "circle", "right"), "position", "top"),
        (("small", "yellow", "triangle", "center"), "position", "left"),
        (("large", "orange", "square", "left"), "colour", "green"),
    ]
    records = []
    for i, (attributes, kind, value) in enumerate(plan):
        before = jittered(rng, *attributes)
        if kind == "colour":
            assert value != before.colour
            after = ToyObject(before.size, value, before.shape, before.position, before.dx, before.dy)
            instruction = f"Make it {value}."
        else:
            assert value != before.position
            after = jittered(rng, before.size, before.colour, before.shape, value)
            instruction = f"Move it {after.where}."
        assert not after.held_out, f"{after.caption} is held out and may not be an editing target"
        records.append(
            {
                "id": f"toy-edit-{i:04d}",
                "input_image": save(render(before), folder, f"edit_{i:04d}_input.png"),
                "instruction": instruction,
                "output_image": save(render(after), folder, f"edit_{i:04d}_output.png"),
                "meta": {"input": before.meta(), "output": after.meta()},
            }
        )
    write_jsonl(folder, records)


def main() -> None:
    build_llava_mix665k()
    build_sharegpt4v()
    build_cc3m()
    build_instructpix2pix()
    build_ssv2()
    rng = random.Random(SEED)
    build_toy_understanding(rng)
    build_toy_generation(rng)
    build_toy_editing(rng)
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file() and p.name != "build_samples.py")
    print(f"wrote samples under {HERE} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
