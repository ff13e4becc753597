"""The toy world: the renderer follows docs/toy_world.md, the generators keep the held-out pairs out of every
response image, splits are seeded, and the toy cards read the generated sets cleanly."""

import json
import math
import random

import numpy as np
import pytest

from vpit.cli import main
from vpit.data.cards import MixtureEntry
from vpit.data.validation import validate
from vpit.toy.world import (
    CIRCUMRADIUS,
    HELD_OUT,
    PALETTE,
    ToyObject,
    compositions,
    jittered,
    render,
    sample_object,
    toy_text_corpus,
    write_split,
    write_toy_data,
)


def _mask(image):
    pixels = np.asarray(image).astype(int)
    return (np.abs(pixels - 255).sum(-1) > 0), pixels


@pytest.mark.parametrize("canvas", [64, 32, 128])
@pytest.mark.parametrize(("shape", "area_per_r2"), [("circle", math.pi), ("square", 2.0), ("triangle", 3 * 3**0.5 / 4)])
@pytest.mark.parametrize("size", ["small", "large"])
def test_render_matches_the_grammar(canvas, shape, area_per_r2, size):
    obj = ToyObject(size, "blue", shape, "left", 0.04, -0.04)
    mask, pixels = _mask(render(obj, canvas))
    r = CIRCUMRADIUS[size] * canvas / 64
    # Area of the shape with circumradius r, within the rasterisation error of its outline (PIL fills the outline
    # pixels too: up to about one pixel along the perimeter).
    perimeter = {"circle": 2 * math.pi, "square": 4 * 2**0.5, "triangle": 3 * 3**0.5}[shape] * r
    assert abs(mask.sum() - area_per_r2 * r**2) <= perimeter + 4
    # Flat fill in the palette colour, on pure white.
    assert {tuple(p) for p in pixels[mask]} == {PALETTE["blue"]}
    ys, xs = np.nonzero(mask)
    cx, cy = obj.centre
    if shape != "triangle":  # the triangle's centroid, not its box centre, sits at the anchor
        assert xs.mean() == pytest.approx(cx * canvas, abs=1.0)
        assert ys.mean() == pytest.approx(cy * canvas, abs=1.0)
    else:
        assert ys.min() == pytest.approx(cy * canvas - r, abs=1.0)  # apex up, on the circumcircle


def test_caption_and_attributes():
    obj = ToyObject("small", "red", "circle", "left")
    assert obj.caption == "a small red circle on the left"
    assert ToyObject("large", "green", "triangle", "center").caption == "a large green triangle in the center"
    assert ToyObject.from_meta(jittered(random.Random(0), "large", "blue", "square", "top").meta()).position == "top"
    with pytest.raises(ValueError, match="colour 'magenta'"):
        ToyObject("small", "magenta", "circle", "left")
    with pytest.raises(ValueError, match="jitter"):
        ToyObject("small", "red", "circle", "left", dx=0.05)


def test_compositions_and_held_out():
    assert len(compositions()) == 180
    assert len(compositions(include_held_out=False)) == 150
    assert {("purple", "triangle"), ("orange", "square"), ("green", "circle")} == HELD_OUT
    rng = random.Random(0)
    assert all(not sample_object(rng, held_out=False).held_out for _ in range(500))
    assert all(sample_object(rng, held_out=True).held_out for _ in range(50))
    jitters = [jittered(rng, "small", "red", "circle", "left") for _ in range(500)]
    assert max(max(abs(o.dx), abs(o.dy)) for o in jitters) <= 0.04
    assert max(abs(o.dx) for o in jitters) > 0.035  # the whole jitter range is used


def test_generated_sets_keep_held_out_pairs_out_of_every_response_image(tmp_path):
    paths = write_toy_data(tmp_path, {"understanding": 400, "generation": 400, "editing": 400}, seed=3)
    understanding = [json.loads(line) for line in paths["understanding"].read_text().splitlines()]
    generation = [json.loads(line) for line in paths["generation"].read_text().splitlines()]
    editing = [json.loads(line) for line in paths["editing"].read_text().splitlines()]
    assert len(understanding) == len(generation) == len(editing) == 400
    pair = lambda meta: (meta["colour"], meta["shape"])  # noqa: E731
    assert not any(pair(r["meta"]) in HELD_OUT for r in generation)
    assert not any(pair(r["meta"]["output"]) in HELD_OUT for r in editing)
    # ... while understanding data and edit inputs do show them (about 1/6 of uniform draws).
    held = sum(pair(r["meta"]) in HELD_OUT for r in understanding)
    assert 30 < held < 110
    assert any(pair(r["meta"]["input"]) in HELD_OUT for r in editing)
    # Every answer follows the grammar; the describe answer is the caption.
    for record in understanding:
        for question, answer in zip(record["messages"][::2], record["messages"][1::2], strict=True):
            if question["content"].endswith("Describe the image."):
                assert answer["content"] == record["meta"]["caption"]
    # Edits change exactly what they say.
    for record in editing:
        before, after = record["meta"]["input"], record["meta"]["output"]
        changed = {k for k in ("size", "colour", "shape", "position") if before[k] != after[k]}
        key = "colour" if record["instruction"].startswith("Make it") else "position"
        assert changed == {key}


def test_splits_are_seeded(tmp_path):
    a = write_split(tmp_path / "a", "generation", 20, seed=1)
    b = write_split(tmp_path / "b", "generation", 20, seed=1)
    c = write_split(tmp_path / "c", "generation", 20, seed=2)
    assert a.read_text() == b.read_text() and a.read_text() != c.read_text()
    first = sorted((tmp_path / "a" / "images").iterdir())[0]
    assert first.read_bytes() == (tmp_path / "b" / "images" / first.name).read_bytes()
    assert len(toy_text_corpus(random.Random(0), 50)) == 50


def test_toy_cards_read_the_generated_sets_cleanly(tmp_path):
    main(["toy", "data", "--out", str(tmp_path), "--understanding", "30", "--generation", "30", "--editing", "30"])
    for kind in ("understanding", "generation", "editing"):
        folder = tmp_path / kind
        entry = MixtureEntry(
            card=f"data_cards/toy_{kind}.yaml",
            data_files=[str(folder / "records.jsonl")],
            image_folder=str(folder / "images"),
        )
        card = entry.load()
        records = list(card.records())
        assert len(records) == 30
        sample = card.to_sample(*records[0])
        assert sample.images and sample.messages
        report = validate(folder / "records.jsonl", image_folder=str(folder / "images"))
        assert report.num_checked == 30 and report.problems == []
