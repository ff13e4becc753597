"""Examples in the toy world's grammar for `vpit app`: what a toy model was trained to answer."""

from __future__ import annotations

from pathlib import Path

from ..inference.app import AppExample
from .world import ToyObject, render


def toy_examples(folder: str | Path, start_with_image: bool = False) -> list[AppExample]:
    """Examples in the toy world's grammar (docs/toy_world.md): two drawing prompts as the generation data words
    them, two questions on rendered toy images (written to `folder`) and one edit.

    Args:
        folder: where the example images are written.
        start_with_image: whether the drawing prompts start the answer with an image (a 'queries' model draws only
            then); the edit always does, as the editing data's answers are images.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rendered = {}
    for name, obj in {
        "green_triangle": ToyObject("large", "green", "triangle", "bottom"),
        "yellow_square": ToyObject("small", "yellow", "square", "right"),
        "red_circle": ToyObject("large", "red", "circle", "center"),
    }.items():
        rendered[name] = folder / f"{name}.png"
        render(obj).save(rendered[name])
    return [
        AppExample("Generate an image of a large red circle at the top.", start_with_image=start_with_image),
        AppExample("Draw a small blue square on the left.", start_with_image=start_with_image),
        AppExample("What colour is the shape?", rendered["green_triangle"]),
        AppExample("Describe the image.", rendered["yellow_square"]),
        AppExample("Make it blue.", rendered["red_circle"], start_with_image=True),
    ]


__all__ = ["toy_examples"]
