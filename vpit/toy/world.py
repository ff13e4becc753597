"""The toy world (docs/toy_world.md): one flat shape on a white canvas, a fixed grammar, and seeded data generators.

Everything here is the grammar documented in docs/toy_world.md, so the renderer, the data, the judge and every
test agree:

- a white RGB canvas, 64x64 by default (any size scales every length);
- one object: colour (six flat colours), shape (circle, square, upright equilateral triangle), size (circumradius
  8 or 14 px at 64x64) and position (five anchors, jittered by at most 0.04 of the canvas);
- the caption `a {size} {colour} {shape} {where}`;
- the held-out (colour, shape) pairs purple triangle, orange square and green circle never occur as a response
  image (generation or editing target) but do occur in understanding data;
- the understanding-only colours pink, teal and brown (a world option, off by default: `understanding_only_colours`)
  occur in understanding data, the backbones' pretraining and the decoder's images, never as a response image:
  what Finding 1's transfer split asks the model to draw.

Example:
    >>> obj = ToyObject("small", "red", "circle", "left")
    >>> obj.caption
    'a small red circle on the left'
    >>> render(obj).size
    (64, 64)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

# The generation instructions are vpit's caption-format defaults (the toy cards use the same list).
from ..data.formats import GENERATION_TEMPLATES, IMAGE_MARKER

Colour = tuple[int, int, int]

CANVAS = 64
BACKGROUND: Colour = (255, 255, 255)
PALETTE: dict[str, Colour] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
    # Understanding-only: never a response image, and only in a world built with `understanding_only_colours`.
    "pink": (235, 110, 170),
    "teal": (20, 150, 150),
    "brown": (130, 80, 40),
}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")  # the colours of every response image
UNDERSTANDING_ONLY_COLOURS = ("pink", "teal", "brown")
ALL_COLOURS = COLOURS + UNDERSTANDING_ONLY_COLOURS
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
CIRCUMRADIUS = {"small": 8, "large": 14}  # px at 64x64
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
POSITIONS = tuple(ANCHORS)
JITTER = 0.04
HELD_OUT = frozenset({("purple", "triangle"), ("orange", "square"), ("green", "circle")})
ATTRIBUTES = ("size", "colour", "shape", "position")


@dataclass(frozen=True)
class ToyObject:
    """One object of the toy world; `dx`, `dy` are the jitter as fractions of the canvas (|d| <= JITTER)."""

    size: str
    colour: str
    shape: str
    position: str
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("size", self.size, SIZES),
            ("colour", self.colour, ALL_COLOURS),
            ("shape", self.shape, SHAPES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"toy {name} {value!r} is not one of {', '.join(allowed)}")
        if abs(self.dx) > JITTER + 1e-9 or abs(self.dy) > JITTER + 1e-9:
            raise ValueError(f"toy jitter ({self.dx}, {self.dy}) exceeds {JITTER}")

    @property
    def where(self) -> str:
        return WHERE[self.position]

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {self.where}"

    @property
    def centre(self) -> tuple[float, float]:
        fx, fy = ANCHORS[self.position]
        return (fx + self.dx, fy + self.dy)

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT

    @property
    def understanding_only(self) -> bool:
        """Drawn in a colour no response image has (pink, teal, brown)."""
        return self.colour in UNDERSTANDING_ONLY_COLOURS

    @property
    def attributes(self) -> dict[str, str]:
        return {"size": self.size, "colour": self.colour, "shape": self.shape, "position": self.position}

    def replace(self, **changes: Any) -> ToyObject:
        return dataclasses.replace(self, **changes)

    def meta(self) -> dict[str, Any]:
        cx, cy = self.centre
        return {"caption": self.caption, **self.attributes, "centre": [round(cx, 4), round(cy, 4)]}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ToyObject:
        fx, fy = ANCHORS[meta["position"]]
        cx, cy = meta.get("centre", (fx, fy))
        return cls(meta["size"], meta["colour"], meta["shape"], meta["position"], round(cx - fx, 4), round(cy - fy, 4))


def world_colours(understanding_only_colours: bool = False) -> tuple[str, ...]:
    """The colours a world's images are drawn in: the six, or nine with the understanding-only ones."""
    return ALL_COLOURS if understanding_only_colours else COLOURS


def compositions(
    *, include_held_out: bool = True, colours: tuple[str, ...] = COLOURS
) -> list[tuple[str, str, str, str]]:
    """Every (size, colour, shape, position) in `colours`: 180 in all with the six, 150 without the held-out
    (colour, shape) pairs; 270 with the nine."""
    return [
        (size, colour, shape, position)
        for size, colour, shape, position in itertools.product(SIZES, colours, SHAPES, POSITIONS)
        if include_held_out or (colour, shape) not in HELD_OUT
    ]


def jittered(rng: random.Random, size: str, colour: str, shape: str, position: str) -> ToyObject:
    """The object with a fresh jitter drawn uniformly in [-JITTER, JITTER] on each axis."""
    dx = round(rng.uniform(-JITTER, JITTER), 4)
    dy = round(rng.uniform(-JITTER, JITTER), 4)
    return ToyObject(size, colour, shape, position, dx, dy)


def sample_object(rng: random.Random, *, held_out: bool | None = None, colours: tuple[str, ...] = COLOURS) -> ToyObject:
    """A uniformly random object in one of `colours`. held_out: None = any; False = never a held-out pair; True =
    only those."""
    while True:
        obj = jittered(rng, rng.choice(SIZES), rng.choice(colours), rng.choice(SHAPES), rng.choice(POSITIONS))
        if held_out is None or obj.held_out == held_out:
            return obj


def render(obj: ToyObject, canvas: int = CANVAS) -> Image.Image:
    """One flat-filled object on a white canvas; every length scales with canvas / 64."""
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cx, cy = (v * canvas for v in obj.centre)
    r = CIRCUMRADIUS[obj.size] * canvas / 64
    fill = PALETTE[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":  # axis-aligned, its corners on the circumcircle
        half = r / math.sqrt(2)
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:  # upright equilateral triangle: apex up, centroid at the centre
        h = r * math.sqrt(3) / 2
        draw.polygon([(cx, cy - r), (cx + h, cy + r / 2), (cx - h, cy + r / 2)], fill=fill)
    return image


# ------------------------------------------------------------------------------------------ conversations

QUESTIONS: dict[str, tuple[tuple[str, ...], Callable[[ToyObject], str]]] = {
    "colour": (("What colour is the shape?", "What color is the object?"), lambda o: o.colour),
    "shape": (("What shape is it?", "What is the shape of the object?"), lambda o: o.shape),
    "size": (("Is it small or large?", "What size is the shape?"), lambda o: o.size),
    "position": (("Where is the shape?", "Where is the object in the image?"), lambda o: o.where),
    "describe": (("Describe the image.",), lambda o: o.caption),
}
QUESTION_KINDS = tuple(QUESTIONS)


def understanding_record(rng: random.Random, obj: ToyObject, image: str, index: int, turns: int = 2) -> dict[str, Any]:
    """A `messages` record: the image with the first question, then `turns - 1` follow-ups on other kinds."""
    kinds = rng.sample(QUESTION_KINDS, turns)
    messages: list[dict[str, str]] = []
    for j, kind in enumerate(kinds):
        phrasings, answer = QUESTIONS[kind]
        question = rng.choice(phrasings)
        messages.append({"role": "user", "content": f"{IMAGE_MARKER}\n{question}" if j == 0 else question})
        messages.append({"role": "assistant", "content": answer(obj)})
    return {"id": f"toy-und-{index:06d}", "images": [image], "messages": messages, "meta": obj.meta()}


def generation_record(obj: ToyObject, image: str, index: int) -> dict[str, Any]:
    """A `caption` record; the card turns it into an instruction (one of GENERATION_TEMPLATES) and the response."""
    if obj.held_out or obj.understanding_only:
        what = "an understanding-only colour" if obj.understanding_only else "a held-out composition"
        raise ValueError(f"{obj.caption}: {what} may not be a generation target")
    return {"id": f"toy-gen-{index:06d}", "image": image, "caption": obj.caption, "meta": obj.meta()}


def edit(rng: random.Random, before: ToyObject) -> tuple[str, ToyObject]:
    """A random edit whose result is not held out: `Make it {colour}.` or `Move it {where}.`."""
    while True:
        if rng.random() < 0.5:
            colour = rng.choice([c for c in COLOURS if c != before.colour])
            after, instruction = before.replace(colour=colour), f"Make it {colour}."
        else:
            position = rng.choice([p for p in POSITIONS if p != before.position])
            after = jittered(rng, before.size, before.colour, before.shape, position)
            instruction = f"Move it {after.where}."
        if not after.held_out:
            return instruction, after


# -------------------------------------------------------------------------------------------- datasets

KINDS = ("understanding", "generation", "editing")


def _objects(rng: random.Random, kind: str, n: int, colours: tuple[str, ...]) -> Iterator[ToyObject]:
    for _ in range(n):
        yield sample_object(rng, held_out=False if kind == "generation" else None, colours=colours)


def write_split(
    folder: str | Path,
    kind: str,
    n: int,
    seed: int,
    canvas: int = CANVAS,
    understanding_only_colours: bool = False,
) -> Path:
    """Write `n` seeded records of one kind as `folder/records.jsonl` + `folder/images/*.png`; return the JSONL.

    The folder is replaced. The same (kind, n, seed, canvas, option) always gives the same bytes. With
    `understanding_only_colours`, understanding records draw from the nine colours; generation and editing
    records (inputs and targets) keep the six, so no response image is pink, teal or brown.
    """
    if kind not in KINDS:
        raise ValueError(f"toy data kind {kind!r} is not one of {', '.join(KINDS)}")
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "images").mkdir(parents=True)
    rng = random.Random(f"{kind}:{seed}")
    records: list[dict[str, Any]] = []
    colours = world_colours(understanding_only_colours and kind == "understanding")
    for i, obj in enumerate(_objects(rng, kind, n, colours)):
        if kind == "editing":
            instruction, after = edit(rng, obj)
            before_name, after_name = f"edit_{i:06d}_input.png", f"edit_{i:06d}_output.png"
            render(obj, canvas).save(folder / "images" / before_name)
            render(after, canvas).save(folder / "images" / after_name)
            records.append(
                {
                    "id": f"toy-edit-{i:06d}",
                    "input_image": before_name,
                    "instruction": instruction,
                    "output_image": after_name,
                    "meta": {"input": obj.meta(), "output": after.meta()},
                }
            )
            continue
        name = f"{kind[:3]}_{i:06d}.png"
        render(obj, canvas).save(folder / "images" / name)
        if kind == "understanding":
            records.append(understanding_record(rng, obj, name, i, turns=rng.choice((1, 2, 3))))
        else:
            records.append(generation_record(obj, name, i))
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_toy_data(
    root: str | Path,
    sizes: dict[str, int],
    seed: int = 0,
    canvas: int = CANVAS,
    understanding_only_colours: bool = False,
) -> dict[str, Path]:
    """Write one split per kind under `root/<kind>/` (sizes: kind -> number of records); return kind -> JSONL."""
    return {
        kind: write_split(Path(root) / kind, kind, n, seed, canvas, understanding_only_colours)
        for kind, n in sizes.items()
        if n > 0
    }


def toy_text_corpus(rng: random.Random, n: int, colours: tuple[str, ...] = COLOURS) -> list[str]:
    """Plain toy-world sentences (captions, questions and answers, instructions) for tokenizer and LM pretraining."""
    lines: list[str] = []
    for _ in range(n):
        obj = sample_object(rng, colours=colours)
        kind = rng.choice(QUESTION_KINDS)
        phrasings, answer = QUESTIONS[kind]
        lines.append(
            rng.choice(
                (
                    f"{obj.caption[0].upper()}{obj.caption[1:]}.",
                    f"{rng.choice(phrasings)} {answer(obj)}.",
                    rng.choice(GENERATION_TEMPLATES).format(caption=obj.caption),
                    f"The {obj.shape} is {obj.colour} and {obj.size}, {obj.where}.",
                    f"Make it {rng.choice(colours)}. Move it {rng.choice(list(WHERE.values()))}.",
                )
            )
        )
    return lines
