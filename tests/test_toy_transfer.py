"""Finding 1's world: pink, teal and brown occur in understanding data and the backbones' pretraining, never as a
response image; the judge reads nine colours when asked; `vpit eval toy --transfer` scores the new split."""

import json
import random

import numpy as np
import pytest
from test_toy_judge import blur_shift_noise, decoder, noise

from vpit.toy import evaluate as toy_evaluate
from vpit.toy.backbones import toy_conversation, toy_tokenizer_corpus
from vpit.toy.evaluate import EvalSettings, evaluate_generation, markdown_report
from vpit.toy.judge import score
from vpit.toy.world import (
    ALL_COLOURS,
    COLOURS,
    UNDERSTANDING_ONLY_COLOURS,
    ToyObject,
    compositions,
    generation_record,
    render,
    write_split,
)


def colours_of(path) -> dict[str, set[str]]:
    """Colour names in a split's records: of its (input) objects, and of its response images."""
    seen: dict[str, set[str]] = {"objects": set(), "responses": set()}
    for line in path.read_text().splitlines():
        meta = json.loads(line)["meta"]
        if "output" in meta:  # an edit: the input is shown, the output is the response image
            seen["objects"].add(meta["input"]["colour"])
            seen["responses"].add(meta["output"]["colour"])
        else:
            seen["objects"].add(meta["colour"])
    return seen


def test_the_option_adds_the_colours_to_understanding_only(tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    for kind, n in (("understanding", 300), ("generation", 300), ("editing", 200)):
        with_option = write_split(on / kind, kind, n, seed=3, understanding_only_colours=True)
        without = write_split(off / kind, kind, n, seed=3)
        seen, seen_off = colours_of(with_option), colours_of(without)
        assert seen_off["objects"] | seen_off["responses"] <= set(COLOURS)
        if kind == "understanding":
            assert seen["objects"] == set(ALL_COLOURS)  # 300 records: every one of the nine
            answers = with_option.read_text()
            assert all(f'"content": "{colour}"' in answers for colour in UNDERSTANDING_ONLY_COLOURS)
        else:  # the option leaves generation and editing data byte for byte as they were
            assert with_option.read_text() == without.read_text()
            assert not (seen["objects"] | seen["responses"]) & set(UNDERSTANDING_ONLY_COLOURS)


def test_an_understanding_only_colour_is_never_a_generation_target():
    with pytest.raises(ValueError, match="a small pink circle on the left: an understanding-only colour may not"):
        generation_record(ToyObject("small", "pink", "circle", "left"), "x.png", 0)
    assert len(compositions(colours=ALL_COLOURS)) == 270 and len(compositions()) == 180


def test_the_backbones_read_the_new_colours_but_are_never_asked_to_draw_them():
    corpus = " ".join(toy_tokenizer_corpus(seed=0, samples=400, colours=ALL_COLOURS))
    assert all(f" {colour} " in corpus for colour in UNDERSTANDING_ONLY_COLOURS)
    assert not any(f" {colour} " in " ".join(toy_tokenizer_corpus(seed=0, samples=400)) for colour in ("pink", "teal"))
    rng = random.Random(0)
    for _ in range(400):
        messages = toy_conversation(rng, ALL_COLOURS)
        request = messages[0]["content"]
        if "Here is an image" in messages[-1]["content"]:  # a generation request: never in a new colour
            assert not any(colour in request for colour in UNDERSTANDING_ONLY_COLOURS), request


@pytest.mark.parametrize("degrade", [noise, decoder, blur_shift_noise], ids=["noise", "decoder", "32px"])
def test_the_judge_reads_nine_colours_when_asked(degrade):
    rng = np.random.default_rng(0)
    canvas = 32 if degrade is blur_shift_noise else 64
    pairs = [
        (obj, degrade(render(obj, canvas), rng)) for obj in (ToyObject(*c) for c in compositions(colours=ALL_COLOURS))
    ]
    nine = score(pairs, ALL_COLOURS)
    # As the six-colour test of the judge: every render right at 64 px, at least 99% at 32 px (1 of 270 here).
    assert nine["n"] == 270 and nine["all"] >= (0.99 if canvas == 32 else 1.0)


class StubPipe:
    """Stands in for the pipeline where evaluate_generation reads it. It says it is a queries model, so that no
    token space is scored: the stub has no encoder (token space is `nearest_composition`'s, tested elsewhere)."""

    class model:
        makes_queries = True


def test_eval_toy_scores_the_transfer_split(monkeypatch):
    def perfect_but_no_pink(pipe, prompts, settings, desc, progress, start_with_image=False):
        """Draw what each prompt asks, except that pink comes out purple."""
        images = []
        for prompt in prompts:
            obj = next(ToyObject(*c) for c in compositions(colours=ALL_COLOURS) if ToyObject(*c).caption in prompt)
            images.append(render(obj.replace(colour="purple") if obj.colour == "pink" else obj))
        return images, [None] * len(prompts)

    monkeypatch.setattr(toy_evaluate, "_generate_images", perfect_but_no_pink)
    settings = EvalSettings(transfer=True, generation_repeats=1)
    result, _ = evaluate_generation(StubPipe(), settings, progress=False)
    assert result["in_distribution"]["n"] == 150 and result["held_out"]["n"] == 30
    assert result["in_distribution"]["all"] == result["held_out"]["all"] == 1.0
    assert result["transfer"]["n"] == 90 and result["transfer"]["all"] == pytest.approx(60 / 90)
    assert result["transfer"]["colour"] == pytest.approx(60 / 90)
    without, _ = evaluate_generation(StubPipe(), EvalSettings(generation_repeats=1), progress=False)
    assert "transfer" not in without and without["in_distribution"]["n"] == 150
    report = {
        "model": "m",
        "decoder": "d",
        "settings": {"seed": 1234},
        "seconds": 1.0,
        "understanding": {"n": 1, "overall": 1.0, "per_type": {}, "mistakes": []},
        "generation": result,
        "reconstruction": {**result["in_distribution"]},
    }
    text = markdown_report(report)
    assert "| transfer | 100.0% | 66.7% | 100.0% | 100.0% | 66.7% |" in text
    assert "Transfer (Finding 1): every composition in a colour only understanding data shows" in text
