"""The toy-world demo end to end, shortened (`python -m vpit.toy.demo --fast`): data, backbones, the three recipes
through `python -m vpit.train`, `vpit eval toy`, the report; then the quickstart notebook runs on its output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from vpit.toy import ToyObject, render
from vpit.toy.evaluate import (
    PARAPHRASES,
    TARGETS,
    markdown_report,
    meets_targets,
    mode_prompts,
    nearest_composition,
    wilson_interval,
)
from vpit.toy.world import compositions
from vpit.training.evaluation import normalize_answer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    out, work = base / "out", base / "work"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "vpit.toy.demo", "--fast", "--out", str(out), "--work", str(work)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, work, result.stdout


@pytest.mark.slow
def test_fast_demo_writes_every_artefact(demo):
    out, work, stdout = demo
    for name in ("report.md", "report.json", "eval_toy.json", "eval_toy.md", "generation_grid.png"):
        assert (out / name).is_file(), name
    assert (out / "reconstruction_grid.png").is_file()
    curves = {p.name for p in (out / "loss_curves").iterdir()}
    assert curves == {"bridge.png", "vpit.png", "decoder.png", "decoder_predicted.png"}
    assert (out / "model" / "config.json").is_file() and (out / "decoder" / "model_index.json").is_file()
    assert {p.name for p in (work / "backbones").iterdir()} >= {"clip", "llm", "vae", "backbones.json"}
    report = json.loads((out / "report.json").read_text())
    # This machine has 2 cores: the decoder trained alongside the VPiT stage, its output in WORK/decoder.log.
    assert report["workers"] == 2
    assert set(report["timings_s"]) == {
        "data",
        "backbones",
        "bridge",
        "vpit + decoder, side by side",
        "decoder on predictions",
        "eval",
        "total",
    }
    assert set(report["stage_seconds"]) == {"vpit", "decoder", "decoder_predicted"}
    side_by_side = report["timings_s"]["vpit + decoder, side by side"]
    assert max(report["stage_seconds"]["vpit"], report["stage_seconds"]["decoder"]) <= side_by_side
    assert "[vpit] decoder: 6 steps" in (work / "decoder.log").read_text()
    assert set(report["targets_met"]) == set(TARGETS)
    for stage in ("bridge", "vpit", "decoder", "decoder_predicted"):
        assert report["training"][stage]["steps"] == 6, stage
    # The last stage decoded the VPiT model's own predictions of the generation records (24 in the fast demo).
    stats = json.loads((work / "decoder_predicted" / "predicted_tokens.json").read_text())
    assert stats["records"] == 24 and stats["predictions"] + stats["no_image"] == 24
    evaluation = report["evaluation"]
    assert evaluation["understanding"]["n"] == 5 * 2  # five question types, two questions each
    assert evaluation["generation"]["in_distribution"]["n"] == 150
    assert evaluation["generation"]["held_out"]["n"] == 30
    assert evaluation["reconstruction"]["n"] == 180
    assert evaluation["editing"]["n"] == 4  # the fast plan's edits, judged
    # Six training steps draw nothing right, so no floor applies here (the figures are `make demo`'s); what must
    # hold is the scoring: each figure counts whole prompts, all four right is never above one attribute's, and
    # the interval brackets the figure.
    scored = evaluation["generation"]["in_distribution"]
    for key in ("size", "colour", "shape", "position", "all"):
        assert scored[key] * 150 == pytest.approx(round(scored[key] * 150), abs=1e-9), key
    assert scored["all"] <= min(scored[key] for key in ("size", "colour", "shape", "position"))
    low, high = scored["all_ci95"]
    assert low <= scored["all"] <= high and high - low > 0
    assert "=== evaluation (vpit eval toy) ===" in stdout and "Targets met" in (out / "report.md").read_text()


@pytest.mark.slow
def test_demo_outputs_load_through_the_standard_entry_points(demo):
    from diffusers import DiffusionPipeline
    from transformers import AutoModelForCausalLM

    import vpit

    out, _, _ = demo
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert isinstance(model, vpit.VPiTForCausalLM) and model.config.num_visual_tokens == 16
    decoder = DiffusionPipeline.from_pretrained(out / "decoder")
    assert isinstance(decoder, vpit.VPiTDecoderPipeline) and decoder.vae is not None
    image = render(ToyObject("small", "red", "circle", "left"))
    assert decoder(image=[image], num_inference_steps=2).images[0].size == (64, 64)


@pytest.mark.slow
def test_quickstart_notebook_runs(demo, monkeypatch):
    out, _, _ = demo
    monkeypatch.setenv("VPIT_DEMO", str(out))
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # the forced generation, the question's picture, two reconstruction pairs
    text = "".join(o.get("text", "") for o in outputs)
    assert f"models from {out}" in text and "What colour is the shape?" in text


def test_answer_normalisation_and_targets():
    assert normalize_answer("  Red. ") == "red"
    assert normalize_answer("a small red circle  on the left.") == "a small red circle on the left"
    accuracy = {"size": 1.0, "colour": 1.0, "shape": 1.0, "position": 1.0, "all": 0.92, "n": 150.0}
    held_out = {**accuracy, "all": 0.4, "n": 30.0, "all_ci95": wilson_interval(12, 30)}
    report = {
        "model": "m",
        "decoder": "d",
        "settings": {"seed": 0},
        "seconds": 1.0,
        "understanding": {"overall": 0.96, "per_type": {"colour": 0.96}, "n": 300, "mistakes": []},
        "generation": {"in_distribution": accuracy, "held_out": held_out, "no_image": 0},
        "reconstruction": {**accuracy, "all": 0.97, "n": 180.0},
    }
    assert meets_targets(report) == {
        "understanding": True,
        "generation_in_distribution": True,
        "generation_held_out": False,
        "reconstruction": True,
    }
    markdown = markdown_report(report)
    assert "| generation, all four right, held-out compositions (n=30) | 40.0% [24.6, 57.7] | >= 60.0% |" in markdown
    # Each way of asking for an image is judged against the same targets.
    report["generation"]["modes"] = {
        "plain": {"in_distribution": accuracy, "held_out": {**accuracy, "all": 0.7}},
        "draw": {"in_distribution": accuracy, "held_out": held_out, "no_image": 0},
    }
    assert meets_targets(report)["generation_draw"] is False
    assert "| draw | 92.0% [92.0, 92.0] (n=150) | 40.0% [24.6, 57.7] (n=30) | - |" in markdown_report(report)
    # With token space per mode, a miss is placed: here the language model names the composition, the decoder fails.
    report["generation"]["modes"]["draw"]["tokens"] = {"in_distribution": accuracy, "held_out": {**accuracy, "all": 1}}
    assert "| draw | 92.0% [92.0, 92.0] (n=150) | 40.0% [24.6, 57.7] (n=30) | 92.0% / 100.0% |" in markdown_report(
        report
    )
    report["generation"]["tokens"] = {"in_distribution": accuracy, "held_out": {**accuracy, "all": 0.8, "n": 30.0}}
    markdown = markdown_report(report)
    assert "| held-out, token space | 100.0% | 100.0% | 100.0% | 100.0% | 80.0% |" in markdown


def test_token_space_scoring_picks_the_nearest_prototype():
    objects = [ToyObject(*c) for c in compositions()[:3]]
    prototypes = torch.eye(3, 8)  # three unit vectors, as (K=2) x (Dv=4) tokens flattened
    tokens = torch.tensor([[0.1, 0.0, 0.9, 0.0], [0.0, 0.0, 0.0, 0.0]])  # nearest: the third prototype
    assert nearest_composition(tokens, objects, prototypes) == objects[2]
    assert nearest_composition(-tokens, objects, prototypes) != objects[2]


@pytest.mark.slow
def test_fast_demo_scores_generation_in_token_space(demo):
    out, _, _ = demo
    generation = json.loads((out / "report.json").read_text())["evaluation"]["generation"]
    for split, n in (("in_distribution", 150), ("held_out", 30)):
        tokens = generation["tokens"][split]
        assert tokens["n"] == n and 0.0 <= tokens["all"] <= min(tokens[k] for k in ("size", "colour", "shape"))
    assert "token space" in (out / "report.md").read_text()


def test_finding1_trains_both_arms_per_size_and_writes_table_and_plot(tmp_path, monkeypatch):
    """The orchestration of `python -m benchmarks.finding1`, with training and scoring replaced by recorders (each
    is `python -m vpit.train` and `evaluate_generation`, tested on their own; a real run takes ~15 minutes)."""
    from benchmarks import finding1

    toy = tmp_path / "toy"
    for folder in ("bridge/final", "decoder/final", "data/generation"):
        (toy / folder).mkdir(parents=True)
    (toy / "data" / "generation" / "records.jsonl").write_text("{}\n" * 30)
    trained = []

    def train_arm(toy_dir, run, n, with_understanding, steps):
        trained.append((n, with_understanding, steps))
        (run / "final").mkdir(parents=True)

    def score_arm(model, decoder, steps):
        n = int(model.parent.name[1:].split("_")[0])
        split = dict.fromkeys(("size", "colour", "shape", "position", "all"), n / 100)
        return {"in_distribution": split, "held_out": split, "tokens": {"in_distribution": split, "held_out": split}}

    monkeypatch.setattr(finding1, "train_arm", train_arm)
    monkeypatch.setattr(finding1, "score_arm", score_arm)
    args = ["--sizes", "10", "30", "--steps", "7", "--toy", str(toy), "--work", str(tmp_path / "f1")]
    assert finding1.main([*args, "--results", str(tmp_path / "results")]) == 0
    # --match generation (the default): the + understanding runs take twice the steps, as many generation samples.
    assert trained == [(10, False, 7), (10, True, 14), (30, False, 7), (30, True, 14)]
    report = json.loads((tmp_path / "results" / "finding1.json").read_text())
    assert [(r["n_generation"], r["arm"]) for r in report["results"]][:2] == [
        (10, "generation only"),
        (10, "+ understanding"),
    ]
    table = (tmp_path / "results" / "finding1.md").read_text()
    assert "| 30 | + understanding | 30.0% | 30.0% | 30.0% | 30.0% | 30% | 30% | 30% | 30% |" in table
    assert (tmp_path / "results" / "finding1.png").stat().st_size > 0
    assert not (tmp_path / "f1" / "n10_gen" / "final").exists()  # one model per point is not kept
    trained.clear()
    assert (
        finding1.main(
            ["--sizes", "10", "--steps", "7", "--match", "compute", *args[5:], "--results", str(tmp_path / "r2")]
        )
        == 0
    )
    assert trained == [(10, False, 7), (10, True, 7)]
    with pytest.raises(SystemExit, match="--sizes up to 100"):
        finding1.main(["--sizes", "100", "--toy", str(toy), "--work", str(tmp_path / "f2")])


def test_finding1_transfer_trains_three_arms_per_size_and_seed(tmp_path, monkeypatch):
    """`python -m benchmarks.finding1 --transfer`: the arms, steps and seeds it trains, the pooled table, and the
    refusal of a world without the new colours (training and scoring replaced by recorders, as above)."""
    from benchmarks import finding1

    toy = tmp_path / "toy"
    for folder in ("bridge/final", "decoder/final", "data/generation", "backbones"):
        (toy / folder).mkdir(parents=True)
    (toy / "data" / "generation" / "records.jsonl").write_text("{}\n" * 30)
    (toy / "backbones" / "backbones.json").write_text(json.dumps({"colours": ["red"] * 6}))
    args = ["--transfer", "--sizes", "10", "30", "--steps", "7", "--seeds", "0", "1", "--toy", str(toy)]
    args += ["--work", str(tmp_path / "f1"), "--results", str(tmp_path / "results")]
    with pytest.raises(SystemExit, match="not a world with the understanding-only colours: build it with"):
        finding1.main(args)
    (toy / "backbones" / "backbones.json").write_text(json.dumps({"colours": ["c"] * 9}))
    trained = []

    def train_arm(toy_dir, run, n, with_understanding, steps, seed):
        trained.append((n, with_understanding, steps, seed))
        (run / "final").mkdir(parents=True)

    def score_transfer(model):
        n, und, _, seed = trained[-1]
        right = 9 * (n // 10) + (30 if und else 0) + seed  # out of 90: a figure that differs per arm and seed
        split = {"all": right / 90, "n": 90.0}
        probe = {"new": {"right": right, "n": 90}, "trained": {"right": 180, "n": 180}}
        return {"tokens": {"transfer": split, "in_distribution": split, "held_out": split}, "probe": probe}

    monkeypatch.setattr(finding1, "train_arm", train_arm)
    monkeypatch.setattr(finding1, "score_transfer", score_transfer)
    assert finding1.main(args) == 0
    assert trained[:3] == [(10, False, 7, 0), (10, True, 14, 0), (10, True, 7, 0)]
    assert len(trained) == 2 * 2 * 3 and {t[3] for t in trained} == {0, 1}
    table = (tmp_path / "results" / "finding1_transfer.md").read_text()
    # generation only at N=10: seeds 0 and 1 get 9/90 and 10/90: mean 10.6%, pooled Wilson on 19/180.
    low, high = wilson_interval(19, 180)
    assert f"| 10 | generation only | 10.6% [{100 * low:.1f}, {100 * high:.1f}] (10 / 11) |" in table
    assert "| 30 | + understanding, matched steps | 63.9%" in table  # (57 + 58) / 2 of 90
    assert (tmp_path / "results" / "finding1_transfer.png").stat().st_size > 0


def test_finding1_mixture_caps_the_generation_records(tmp_path):
    from benchmarks.finding1 import _mixture

    only = _mixture(tmp_path, 300, with_understanding=False)
    assert "toy_generation.yaml, weight: 1.0, cap: 300" in only and "understanding" not in only
    both = _mixture(tmp_path, 300, with_understanding=True)
    assert f"data_files: [{tmp_path / 'data' / 'understanding' / 'records.jsonl'}]" in both


def test_wilson_interval_and_the_prompt_modes():
    # Reference values of the 95 % Wilson score interval (z = 1.96).
    assert wilson_interval(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert wilson_interval(0, 30) == pytest.approx([0.0, 0.1135], abs=1e-4)
    assert wilson_interval(450, 450)[1] == 1.0 and wilson_interval(450, 450)[0] == pytest.approx(0.99154, abs=1e-4)
    import random

    from vpit.data.formats import GENERATION_TEMPLATES
    from vpit.toy.world import ToyObject

    objects = [ToyObject("small", "red", "circle", "left"), ToyObject("large", "blue", "square", "top")]
    plain, forced = mode_prompts("plain", objects, random.Random(0))
    assert not forced and all(any(p == t.format(caption=o.caption) for t in GENERATION_TEMPLATES)
                              for p, o in zip(plain, objects, strict=True))  # fmt: skip
    assert mode_prompts("start_with_image", objects, random.Random(0)) == (plain, True)
    paraphrased, forced = mode_prompts("paraphrase", objects, random.Random(0))
    assert not forced and all(p not in {t.format(caption=o.caption) for t in GENERATION_TEMPLATES}
                              for p, o in zip(paraphrased, objects, strict=True))  # fmt: skip
    assert all(
        any(p == t.format(caption=o.caption) for t in PARAPHRASES) for p, o in zip(paraphrased, objects, strict=True)
    )
    assert mode_prompts("draw", objects, random.Random(0)) == (["a small red circle on the left",
                                                                "a large blue square at the top"], True)  # fmt: skip


def test_robustness_benchmark_perturbs_tokens_to_exactly_the_asked_cosine():
    from benchmarks.decoder_robustness import perturbed

    tokens = torch.nn.functional.normalize(torch.randn(6, 16, 32), dim=-1)
    for cosine in (0.99, 0.97, 0.95):
        moved = perturbed(tokens, cosine, torch.Generator().manual_seed(0))
        torch.testing.assert_close(moved.norm(dim=-1), torch.ones(6, 16))  # still unit tokens
        torch.testing.assert_close((moved * tokens).sum(-1), torch.full((6, 16), cosine))  # each at that cosine
        assert not torch.allclose(perturbed(tokens, cosine, torch.Generator().manual_seed(1)), moved)


def test_the_vpit_stage_recipe_is_checked_before_anything_runs(tmp_path):
    from vpit.toy.demo import DemoPlan, run_demo

    plan = DemoPlan.fast()
    assert plan.vpit_recipe == "vpit_smooth_l1"  # the demo's default (the library's stays MetaMorph's cosine)
    plan.vpit_recipe = "vpit_huber"
    with pytest.raises(SystemExit, match=r"no recipe .*vpit_huber\.yaml for the VPiT stage"):
        run_demo(tmp_path / "out", tmp_path / "work", plan)
    assert not (tmp_path / "work").exists()  # nothing was written


def test_editing_is_judged_against_the_intended_object():
    """`evaluate_editing` on stand-in editors: one that applies each instruction to the object it reads in the
    source image scores 100%, one that returns the source unchanged 0% (every edit changes the colour or the
    position); the edit is asked with the answer started on the image."""
    from types import SimpleNamespace

    from vpit.toy.evaluate import EvalSettings, evaluate_editing
    from vpit.toy.judge import judge
    from vpit.toy.world import WHERE, ToyObject, render

    class Editor:
        def __init__(self, perfect):
            self.perfect, self.calls = perfect, []
            self.processor = SimpleNamespace(image_token="<image>")
            self.model = SimpleNamespace(image_slots=16)

        def __call__(self, prompts, images, start_with_image=False, **_):
            self.calls.append(start_with_image)
            outputs = []
            for prompt, image in zip(prompts, images, strict=True):
                read = judge(image)
                obj = ToyObject(read.size, read.colour, read.shape, read.position)
                instruction = prompt.removeprefix("<image> ").removesuffix(".")
                if self.perfect and instruction.startswith("Make it "):
                    obj = obj.replace(colour=instruction.removeprefix("Make it "))
                elif self.perfect:
                    where = instruction.removeprefix("Move it ")
                    obj = obj.replace(position=next(p for p, phrase in WHERE.items() if phrase == where))
                outputs.append(SimpleNamespace(images=[render(obj)]))
            return outputs

    settings = EvalSettings(edits=20, batch_size=8)
    perfect, identity = Editor(True), Editor(False)
    assert evaluate_editing(perfect, settings, progress=False)["all"] == 1.0
    result = evaluate_editing(identity, settings, progress=False)
    assert result["all"] == 0.0 and result["n"] == 20 and result["no_image"] == 0
    assert perfect.calls == [True] * 3
