"""`make demo` / `python -m vpit.toy.demo`: the whole VPiT loop on the toy world, end to end on a CPU.

    python -m vpit.toy.demo --out outputs/demo [--work outputs/toy] [--fast]

Steps, each timed and shown with a progress bar:

1. data: seeded toy sets (understanding, generation, editing) rendered by `vpit.toy.world` into WORK/data;
2. backbones: the toy CLIP (open_clip, contrastive), tokenizer + Llama (LM-pretrained) and VAE, into
   WORK/backbones (`vpit.toy.backbones`);
3. the three training stages, each through the real entry point (`python -m vpit.train recipes/toy/*.yaml` with
   overrides that point at WORK): `bridge` (LLM frozen), `vpit` (LLM + bridge + visual head), `decoder`;
4. `vpit eval toy` on fresh renders.

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
    eval: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def full(cls) -> DemoPlan:
        return cls(
            data={"understanding": 4000, "generation": 4000, "editing": 1000},
            backbones_fast=False,
            bridge={},
            vpit={},
            decoder={},
            eval={"questions_per_type": 40, "num_inference_steps": 20},
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
            eval={
                "questions_per_type": 2,
                "generation_repeats": 1,
                "batch_size": 64,
                "num_inference_steps": 2,
                "grid_examples": 6,
            },
        )


def _mixture(work: Path, kinds: dict[str, float]) -> str:
    """A `data.mixture` override: the toy cards, reading the sets generated under WORK/data."""
    entries = []
    for kind, weight in kinds.items():
        folder = work / "data" / kind
        entries.append(
            f"{{card: {CARDS / f'toy_{kind}.yaml'}, weight: {weight}, "
            f"data_files: [{folder / 'records.jsonl'}], image_folder: {folder / 'images'}}}"
        )
    return "[" + ", ".join(entries) + "]"


def _train(stage: str, overrides: dict[str, Any]) -> None:
    command = [sys.executable, "-m", "vpit.train", str(RECIPES / f"{stage}.yaml")]
    command += [f"{key}={value}" for key, value in overrides.items()]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=ROOT, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the {stage} stage failed (exit {result.returncode}): {' '.join(command)}")


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


def run_demo(out: Path, work: Path, plan: DemoPlan, progress: bool = True) -> dict[str, Any]:
    from .backbones import build_toy_backbones
    from .evaluate import EvalSettings, evaluate_toy, markdown_report, meets_targets
    from .world import write_toy_data

    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def step(name: str) -> float:
        print(f"\n=== {name} ===", flush=True)
        return time.perf_counter()

    start = step("1/6 toy data")
    write_toy_data(work / "data", plan.data, seed=0)
    timings["data"] = time.perf_counter() - start

    start = step("2/6 backbones: toy CLIP, tokenizer + Llama, VAE")
    backbones = build_toy_backbones(work / "backbones", seed=0, fast=plan.backbones_fast)
    timings["backbones"] = time.perf_counter() - start

    runs = {stage: work / stage for stage in ("bridge", "vpit", "decoder")}
    common = {"tracking.report_to": "[]"}
    start = step("3/6 stage 1: bridge (LLM frozen)")
    _train(
        "bridge",
        {
            **common,
            "model.llm": work / "backbones" / "llm",
            "model.vision": f"local-dir:{work / 'backbones' / 'clip'}",
            "data.mixture": _mixture(work, {"understanding": 1.0}),
            "train.output_dir": runs["bridge"],
            **plan.bridge,
        },
    )
    timings["bridge"] = time.perf_counter() - start

    start = step("4/6 stage 2: VPiT (LLM + bridge + visual head)")
    _train(
        "vpit",
        {
            **common,
            "model.pretrained": runs["bridge"] / "final",
            "data.mixture": _mixture(work, {"understanding": 1.0, "generation": 1.0, "editing": 0.3}),
            "train.output_dir": runs["vpit"],
            **plan.vpit,
        },
    )
    timings["vpit"] = time.perf_counter() - start

    start = step("5/6 stage 3: diffusion decoder")
    _train(
        "decoder",
        {
            **common,
            "model.pretrained": runs["vpit"] / "final",
            "decoder.vae": work / "backbones" / "vae",
            "data.mixture": _mixture(work, {"generation": 1.0, "understanding": 1.0}),
            "train.output_dir": runs["decoder"],
            **plan.decoder,
        },
    )
    timings["decoder"] = time.perf_counter() - start

    start = step("6/6 evaluation (vpit eval toy)")
    settings = EvalSettings(**plan.eval)
    evaluation = evaluate_toy(runs["vpit"] / "final", runs["decoder"] / "final", out=out, settings=settings)
    timings["eval"] = time.perf_counter() - start

    _copy(runs["vpit"] / "final", out / "model")
    _copy(runs["decoder"] / "final", out / "decoder")
    curves = out / "loss_curves"
    curves.mkdir(exist_ok=True)
    for stage, run in runs.items():
        if (run / "loss_curve.png").is_file():
            shutil.copy(run / "loss_curve.png", curves / f"{stage}.png")
    report = {
        "plan": asdict(plan),
        "timings_s": {k: round(v, 1) for k, v in timings.items()} | {"total": round(sum(timings.values()), 1)},
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
        "The whole loop on the toy world (DESIGN.md): locally pretrained toy backbones, the bridge stage, the VPiT",
        "stage and the diffusion decoder, judged by the toy world's pixel classifier on fresh renders.",
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
    args = parser.parse_args(argv)
    plan = DemoPlan.fast() if args.fast else DemoPlan.full()
    run_demo(args.out.resolve(), args.work.resolve(), plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
