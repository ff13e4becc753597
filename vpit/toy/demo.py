"""`make demo` / `python -m vpit.toy.demo`: the whole VPiT loop on the toy world, end to end on a CPU.

    python -m vpit.toy.demo --out outputs/demo [--work outputs/toy] [--seed 0] [--fast] [--workers 1|2]

Steps, each timed and shown with a progress bar:

1. data: seeded toy sets (understanding, generation, editing) rendered by `vpit.toy.world` into WORK/data;
2. backbones: the toy CLIP (open_clip, contrastive), tokenizer + Llama (LM-pretrained) and VAE, into
   WORK/backbones (`vpit.toy.backbones`);
3. the training stages, each through the real entry point (`python -m vpit.train recipes/toy/*.yaml` with
   overrides that point at WORK): `bridge` (LLM frozen), `vpit` (LLM + bridge + visual head), `decoder` (on the
   encoder's tokens), then `decoder_predicted` (the decoder continued on the VPiT model's own predicted tokens);
4. `vpit eval toy` on fresh renders.

On two or more cores, two processes (one torch thread each) train at once: the CLIP alongside the Llama + VAE, and
the decoder alongside the VPiT stage (the decoder needs only the frozen vision encoder, which the bridge-stage model
already holds); the decoder's output then goes to WORK/decoder.log. `--workers 1` runs everything in turn.

OUT receives `model/` (the VPiT folder), `decoder/` (the diffusers folder), `report.md` + `report.json`, the grids
(`generation_grid.png`: prompt -> generated image, `reconstruction_grid.png`: image -> reconstruction) and
`loss_curves/`. `--fast` runs the same pipeline with a few steps of each (the test suite uses it): it shows that
the loop works, not the quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "toy"
CARDS = ROOT / "data_cards"


@dataclass
class DemoPlan:
    """Sizes and steps of one demo run; `full()` is `make demo`, `fast()` the test suite's smoke run."""

    data: dict[str, int]
    backbones_fast: bool
    bridge: dict[str, Any]
    vpit: dict[str, Any]
    decoder: dict[str, Any]
    decoder_predicted: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    # The VPiT stage's recipe under recipes/toy/: `vpit_smooth_l1` (the tokens regressed with smooth L1: held-out
    # compositions drawn right 13-23 points more often than with the cosine on three seeds, benchmarks/RESULTS.md),
    # `vpit` (MetaMorph's cosine, the library's default) or another output-side variant.
    vpit_recipe: str = "vpit_smooth_l1"
    # Finding 1's world (`vpit.toy.world`): pink, teal and brown in understanding data and the backbones'
    # pretraining, never a response image; the evaluation adds the transfer split. Off in `make demo`.
    understanding_only_colours: bool = False

    @classmethod
    def full(cls) -> DemoPlan:
        return cls(
            data={"understanding": 4000, "generation": 4000, "editing": 1000},
            backbones_fast=False,
            bridge={},
            vpit={},
            decoder={},
            decoder_predicted={},
            eval={
                "questions_per_type": 40,
                "num_inference_steps": 15,
                "generation_repeats": 2,  # 300 in-distribution prompts
                "held_out_repeats": 3,  # 90 held-out prompts
                "reconstruction_repeats": 2,
                "modes": ("start_with_image", "paraphrase", "draw"),
                "edits": 90,
            },
        )

    @classmethod
    def fast(cls) -> DemoPlan:
        steps = {"train.max_steps": 6, "train.checkpoint_every": 3, "train.log_every": 1, "data.batch_size": 4}
        return cls(
            data={"understanding": 24, "generation": 24, "editing": 8},
            backbones_fast=True,
            bridge=dict(steps),
            vpit=dict(steps),
            decoder={**steps, "train.eval_every": 0, "decoder.validation_steps": 2},
            decoder_predicted={**steps, "train.eval_every": 0, "decoder.validation_steps": 2},
            eval={
                "questions_per_type": 2,
                "generation_repeats": 1,
                "batch_size": 64,
                "num_inference_steps": 2,
                "grid_examples": 6,
                "edits": 4,
            },
        )


def toy_mixture(work: Path, kinds: dict[str, float]) -> str:
    """A `data.mixture` override: the toy cards, reading the sets generated under WORK/data."""
    entries = []
    for kind, weight in kinds.items():
        folder = work / "data" / kind
        entries.append(
            f"{{card: {CARDS / f'toy_{kind}.yaml'}, weight: {weight}, "
            f"data_files: [{folder / 'records.jsonl'}], image_folder: {folder / 'images'}}}"
        )
    return "[" + ", ".join(entries) + "]"


def _command(stage: str, overrides: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "vpit.train", str(RECIPES / f"{stage}.yaml")] + [
        f"{k}={v}" for k, v in overrides.items()
    ]


def _environment() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def _train(stage: str, overrides: dict[str, Any]) -> None:
    command = _command(stage, overrides)
    result = subprocess.run(command, cwd=ROOT, env=_environment(), check=False)
    if result.returncode != 0:
        raise SystemExit(f"the {stage} stage failed (exit {result.returncode}): {' '.join(command)}")


def _train_side_by_side(
    front: tuple[str, dict[str, Any]], back: tuple[str, dict[str, Any]], log: Path
) -> tuple[float, float]:
    """Train two stages at once, each in its own process: `front` shows its progress here, `back` writes its output
    to `log`. Returns each one's wall seconds (front, back); if either fails, stops the other and raises SystemExit."""
    back_stage, back_overrides = back
    start = time.perf_counter()
    with log.open("w") as stream:
        background = subprocess.Popen(
            _command(back_stage, back_overrides), cwd=ROOT, env=_environment(), stdout=stream, stderr=subprocess.STDOUT
        )
        try:
            _train(*front)
            front_seconds = time.perf_counter() - start
            print(f"\n(waiting for the {back_stage} stage, log: {log})", flush=True)
            code = background.wait()
        finally:
            if background.poll() is None:
                background.terminate()
                background.wait()
    back_seconds = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"the {back_stage} stage failed (exit {code}); the end of {log}:\n{tail}")
    return front_seconds, back_seconds


def _summary(run: Path) -> dict[str, Any]:
    """The run's summary.json, or (the decoder stage writes none) its last logged step from history.jsonl."""
    path = run / "summary.json"
    if path.is_file():
        return dict(json.loads(path.read_text()))
    lines = (run / "history.jsonl").read_text().splitlines() if (run / "history.jsonl").is_file() else []
    rows = [json.loads(line) for line in lines]
    return {"steps": int(rows[-1]["step"]), "final": rows[-1]} if rows else {}


def _copy(source: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)


def run_demo(out: Path, work: Path, plan: DemoPlan, workers: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Run the plan; return the report (also written to OUT/report.json and OUT/report.md).

    seed: of the data, the backbones and every training stage (model init, data order, noise); the evaluation keeps
        its own seed, so that runs of different seeds are judged on the same prompts and renders.
    workers: how many processes train at once (default: 2 when the machine has 2 or more cores, else 1). With 2,
        the CLIP trains alongside the Llama + VAE, and the decoder stage alongside the VPiT stage, each process on
        one torch thread.
    """
    from .backbones import build_toy_backbones
    from .evaluate import EvalSettings, evaluate_toy, markdown_report, meets_targets
    from .world import write_toy_data

    if not (RECIPES / f"{plan.vpit_recipe}.yaml").is_file():
        raise SystemExit(f"no recipe {RECIPES / plan.vpit_recipe}.yaml for the VPiT stage (--vpit-recipe)")

    if workers is None:
        workers = 2 if (os.cpu_count() or 1) >= 2 else 1
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def step(name: str) -> float:
        print(f"\n=== {name} ===", flush=True)
        return time.perf_counter()

    start = step("toy data")
    write_toy_data(work / "data", plan.data, seed=seed, understanding_only_colours=plan.understanding_only_colours)
    timings["data"] = time.perf_counter() - start

    start = step("backbones: toy CLIP, tokenizer + Llama, VAE")
    backbones = build_toy_backbones(
        work / "backbones",
        seed=seed,
        fast=plan.backbones_fast,
        workers=min(workers, 2),
        understanding_only_colours=plan.understanding_only_colours,
    )
    timings["backbones"] = time.perf_counter() - start

    runs = {stage: work / stage for stage in ("bridge", "vpit", "decoder", "decoder_predicted")}
    for run in runs.values():  # trained on the data and backbones just rebuilt: never resume an earlier run's stages
        shutil.rmtree(run, ignore_errors=True)
    common = {"tracking.report_to": "[]", "train.seed": seed, "data.seed": seed}
    start = step("stage 1: bridge (LLM frozen)")
    _train(
        "bridge",
        {
            **common,
            "model.llm": work / "backbones" / "llm",
            "model.vision": f"local-dir:{work / 'backbones' / 'clip'}",
            "data.mixture": toy_mixture(work, {"understanding": 1.0}),
            "train.output_dir": runs["bridge"],
            **plan.bridge,
        },
    )
    timings["bridge"] = time.perf_counter() - start

    # The decoder needs only the frozen vision encoder, which the bridge-stage model already holds (the VPiT stage
    # does not change it): so it trains from there, and on two or more cores alongside the VPiT stage.
    vpit_stage = (
        plan.vpit_recipe,
        {
            **common,
            "model.pretrained": runs["bridge"] / "final",
            "data.mixture": toy_mixture(work, {"understanding": 1.0, "generation": 1.0, "editing": 0.3}),
            "train.output_dir": runs["vpit"],
            **plan.vpit,
        },
    )
    decoder_stage = (
        "decoder",
        {
            **common,
            "model.pretrained": runs["bridge"] / "final",
            "decoder.vae": work / "backbones" / "vae",
            "data.mixture": toy_mixture(work, {"generation": 1.0, "understanding": 1.0}),
            "train.output_dir": runs["decoder"],
            **plan.decoder,
        },
    )
    if workers >= 2:
        log = work / "decoder.log"
        start = step(
            f"stage 2: VPiT (LLM + bridge + visual head), with stage 3, the diffusion decoder, alongside ({log})"
        )
        vpit_seconds, decoder_seconds = _train_side_by_side(vpit_stage, decoder_stage, log)
        stage_seconds = {"vpit": vpit_seconds, "decoder": decoder_seconds}
        timings["vpit + decoder, side by side"] = time.perf_counter() - start
    else:
        stage_seconds = {}
        for number, (name, job, title) in enumerate(
            (
                ("vpit", vpit_stage, "VPiT (LLM + bridge + visual head)"),
                ("decoder", decoder_stage, "diffusion decoder"),
            ),
            start=2,
        ):
            start = step(f"stage {number}: {title}")
            _train(*job)
            timings[name] = stage_seconds[name] = time.perf_counter() - start

    # The decoder continues on what it will decode: the VPiT model's own predicted tokens for the generation prompts.
    start = step("stage 4: the decoder on the VPiT model's predicted tokens")
    _train(
        "decoder_predicted",
        {
            **common,
            "model.pretrained": runs["bridge"] / "final",
            "decoder.init": runs["decoder"] / "final",
            "decoder.predicted_tokens_from": runs["vpit"] / "final",
            "decoder.frozen_cache_dir": runs["decoder"] / "frozen_cache",  # stage 3's: the same encoder and VAE
            "data.mixture": toy_mixture(work, {"generation": 1.0, "understanding": 1.0}),
            "train.output_dir": runs["decoder_predicted"],
            "train.torch_threads": max(1, workers),
            **plan.decoder_predicted,
        },
    )
    timings["decoder on predictions"] = stage_seconds["decoder_predicted"] = time.perf_counter() - start

    start = step("evaluation (vpit eval toy)")
    settings = EvalSettings(**plan.eval, transfer=plan.understanding_only_colours)
    decoder = runs["decoder_predicted"] / "final"
    evaluation = evaluate_toy(runs["vpit"] / "final", decoder, out=out, settings=settings)
    timings["eval"] = time.perf_counter() - start

    _copy(runs["vpit"] / "final", out / "model")
    _copy(decoder, out / "decoder")
    curves = out / "loss_curves"
    curves.mkdir(exist_ok=True)
    for stage, run in runs.items():
        if (run / "loss_curve.png").is_file():
            shutil.copy(run / "loss_curve.png", curves / f"{stage}.png")
    report = {
        "plan": asdict(plan),
        "seed": seed,
        "timings_s": {k: round(v, 1) for k, v in timings.items()} | {"total": round(sum(timings.values()), 1)},
        "workers": workers,
        "stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()},
        "backbones": backbones,
        "training": {stage: _summary(run) for stage, run in runs.items()},
        "evaluation": evaluation,
        "targets_met": meets_targets(evaluation),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(demo_markdown(report, markdown_report(evaluation)))
    print("\n" + (out / "report.md").read_text())
    return report


def demo_markdown(report: dict[str, Any], evaluation_md: str) -> str:
    timings = report["timings_s"]
    lines = [
        "# vpit toy-world demo",
        "",
        "The whole loop on the toy world (docs/toy_world.md): locally pretrained toy backbones, the bridge stage, the",
        "VPiT stage and the diffusion decoder, judged by the toy world's pixel classifier on fresh renders.",
        f"Seed {report.get('seed', 0)} (data, backbones, training; the evaluation has its own). VPiT stage: "
        f"`recipes/toy/{report['plan'].get('vpit_recipe', 'vpit')}.yaml`.",
        "",
        "| step | seconds |",
        "|---|---|",
        *(f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()),
        "",
        "Targets met: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in report["targets_met"].items()) + ".",
        "",
        "Files: `model/` (VPiT), `decoder/` (diffusers), `generation_grid.png`, `reconstruction_grid.png`,",
        "`loss_curves/`, `report.json`.",
        "",
        "![prompt -> generated image](generation_grid.png)",
        "",
        "![image -> reconstruction](reconstruction_grid.png)",
        "",
    ]
    return "\n".join(lines) + "\n" + evaluation_md.replace("# Toy-world evaluation", "## Evaluation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="where the results go")
    parser.add_argument("--work", type=Path, default=Path("outputs/toy"), help="data, backbones and run folders")
    parser.add_argument("--fast", action="store_true", help="a few steps of everything (a smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, backbones and training (default 0)")
    parser.add_argument(
        "--vpit-recipe",
        default="vpit_smooth_l1",
        help="the VPiT stage's recipe in recipes/toy/ (default vpit_smooth_l1; vpit: MetaMorph's cosine)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        choices=(1, 2),
        default=None,
        help="processes training at once (default: 2 on a machine with 2 or more cores)",
    )
    parser.add_argument(
        "--understanding-only-colours",
        action="store_true",
        help="Finding 1's world: pink, teal and brown in understanding data and pretraining, never drawn in training; "
        "the evaluation adds the transfer split",
    )
    args = parser.parse_args(argv)
    plan = DemoPlan.fast() if args.fast else DemoPlan.full()
    plan.vpit_recipe = args.vpit_recipe
    plan.understanding_only_colours = args.understanding_only_colours
    run_demo(args.out.resolve(), args.work.resolve(), plan, workers=args.workers, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
