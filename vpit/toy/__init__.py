"""The toy world (docs/toy_world.md): renderer, data generators, judge, toy backbones, demo and evaluation.

`vpit.toy.world` renders and generates data; `vpit.toy.judge` classifies renders pixel by pixel;
`vpit.toy.backbones` builds and pretrains the toy CLIP, tokenizer + Llama and VAE; `vpit.toy.evaluate` is
`vpit eval toy`; `python -m vpit.toy.demo` (`make demo`) runs the whole loop.
"""

from .world import (
    CANVAS,
    COLOURS,
    HELD_OUT,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    ToyObject,
    compositions,
    render,
    sample_object,
    write_toy_data,
)

__all__ = [
    "CANVAS",
    "COLOURS",
    "HELD_OUT",
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "ToyObject",
    "compositions",
    "render",
    "sample_object",
    "write_toy_data",
]
