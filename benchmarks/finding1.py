"""MetaMorph's Finding 1 on the toy world: does visual understanding data make visual generation cheap?

    python -m benchmarks.finding1 [--sizes 100 300 1000 3000] [--steps 150] [--match generation|compute]

The paper (arXiv 2412.14164, Fig. 2) trains with growing amounts of generation data, with and without visual
understanding data, and finds that generation ability unlocks with far less generation data when understanding
data is in the mix. The toy analogue: for each generation-data size N, two VPiT runs from the same starting point
(the toy demo's bridge-stage model: pretrained toy LLM + aligned bridge), batch 16:

- "generation only": the mixture is the first N toy generation records, `--steps` steps;
- "+ understanding": the same N generation records plus the demo's toy understanding set (4000 records), sampled
  1:1. With `--match generation` (the default) it trains twice the steps, so that both arms see as many generation
  samples and the understanding data comes on top, as in the paper; with `--match compute` it trains `--steps`
  steps too, so half of them go to understanding.

Each run is scored by `vpit eval toy`'s generation measurement (every composition, the model's own greedy answer):
all-four-correct on in-distribution and on held-out compositions, twice: decoded by the demo's decoder and judged
in pixels, and in token space (the composition whose prototype tokens are nearest to the predicted ones). The
decoder is shared by all runs: it maps the vision encoder's tokens to pixels and does not depend on the language
model; the token-space figure is the language model's alone.

Needs `make demo` first (it builds outputs/toy: data, backbones, bridge and decoder); run from the repository
root. Writes `WORK/finding1.json`, `WORK/finding1.md` and `WORK/finding1.png` (generation accuracy against N, one
line per arm), and copies the table and plot to benchmarks/results/. Budget: about 20 minutes on 2 CPU cores with
the defaults (4 runs of 150 steps, 4 of 300, 8 generation evaluations).

The transfer experiment (`--transfer`) asks the cleaner question: can the model draw colours that only
understanding data showed it? Its world is built with `python -m vpit.toy.demo --understanding-only-colours --work
outputs/transfer/toy --out outputs/transfer/demo`: pink, teal and brown occur in understanding data and in the
backbones' and the bridge's training, never as a generation or editing target. For each generation-data size N and
each training seed, three VPiT runs from that world's bridge model:

- "generation only": the first N generation records, `--steps` steps;
- "+ understanding, matched samples": the same N records + the understanding set 1:1, 2 x `--steps` steps;
- "+ understanding, matched steps": the same mixture, `--steps` steps.

Each run is scored in token space (no decoder): the transfer split (every pink, teal and brown composition), the
in-distribution and the held-out compositions, against prototypes of all nine colours; and by a probe of whether the
model names a new colour when it reads one: "What colour is the shape?" on renders of the new colours, answered
greedily. Per arm and size: the mean over seeds, each seed's figure, and the 95 % Wilson interval of the pooled
prompts, in `WORK/finding1_transfer.{json,md,png}` (copied to benchmarks/results/). Budget: about 25 minutes on 2
CPU cores with the transfer defaults (sizes 100 and 1000, seeds 0-2, three arms, 150 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _mixture(toy: Path, n_generation: int, with_understanding: bool) -> str:
    def entry(kind: str, cap: int | None) -> str:
        folder = toy / "data" / kind
        capped = f", cap: {cap}" if cap else ""
        return (
            f"{{card: data_cards/toy_{kind}.yaml, weight: 1.0{capped}, "
            f"data_files: [{folder / 'records.jsonl'}], image_folder: {folder / 'images'}}}"
        )

    entries = [entry("generation", n_generation)]
    if with_understanding:
        entries.append(entry("understanding", None))
    return "[" + ", ".join(entries) + "]"


def train_arm(toy: Path, run: Path, n_generation: int, with_understanding: bool, steps: int, seed: int = 0) -> None:
    overrides = {
        "train.seed": seed,
        "data.seed": seed,
        "model.pretrained": toy / "bridge" / "final",
        "data.mixture": _mixture(toy, n_generation, with_understanding),
        "train.output_dir": run,
        "train.max_steps": steps,
        "train.checkpoint_every": 0,
        "train.log_every": 25,
        "tracking.report_to": "[]",
    }
    command = [sys.executable, "-m", "vpit.train", str(ROOT / "recipes" / "toy" / "vpit.yaml")]
    command += [f"{k}={v}" for k, v in overrides.items()]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def score_arm(model: Path, decoder: Path, steps: int) -> dict[str, Any]:
    from vpit.inference.pipeline import VPiTPipeline
    from vpit.toy.evaluate import EvalSettings, evaluate_generation

    pipe = VPiTPipeline.from_pretrained(model, decoder=decoder)
    result, _ = evaluate_generation(pipe, EvalSettings(num_inference_steps=steps, batch_size=64))
    return result


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, split, title in zip(axes, ("in_distribution", "held_out"), ("in-distribution", "held-out"), strict=True):
        for arm, colour in (("generation only", "tab:orange"), ("+ understanding", "tab:blue")):
            rows = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["n_generation"])
            sizes = [r["n_generation"] for r in rows]
            ax.plot(sizes, [100 * r["tokens"][split]["all"] for r in rows], "s-", color=colour, label=f"{arm}, tokens")
            ax.plot(sizes, [100 * r[split]["all"] for r in rows], "o--", color=colour, label=f"{arm}, decoded")
        ax.set_xscale("log")
        ax.set_xlabel("generation records")
        ax.set_title(f"generation, all four right: {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| generation records | arm | tokens: in-distribution | tokens: held-out | decoded: in-distribution "
        "| decoded: held-out | tokens: colour | shape | size | position |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["n_generation"], r["arm"])):
        tokens = r["tokens"]["in_distribution"]
        lines.append(
            f"| {r['n_generation']} | {r['arm']} | {100 * tokens['all']:.1f}% | "
            f"{100 * r['tokens']['held_out']['all']:.1f}% | {100 * r['in_distribution']['all']:.1f}% | "
            f"{100 * r['held_out']['all']:.1f}% | "
            + " | ".join(f"{100 * tokens[k]:.0f}%" for k in ("colour", "shape", "size", "position"))
            + " |"
        )
    return "\n".join(lines)


def write_results(
    work: Path, results_dir: Path, stem: str, report: dict[str, Any], markdown: str, plotter: Any
) -> None:
    """WORK/STEM.json, .md and .png (`plotter(results, path)`), copied to `results_dir`; the table printed."""
    (work / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / f"{stem}.md").write_text(markdown)
    plotter(report["results"], work / f"{stem}.png")
    results_dir.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".md", ".png"):
        shutil.copy(work / f"{stem}{suffix}", results_dir / f"{stem}{suffix}")
    print("\n" + markdown)


# ------------------------------------------------------------------------------------------ the transfer experiment

TRANSFER_ARMS = (
    # (name, with understanding, steps as a multiple of --steps)
    ("generation only", False, 1),
    ("+ understanding, matched samples", True, 2),
    ("+ understanding, matched steps", True, 1),
)


def score_transfer(model: Path, seed: int = 1234) -> dict[str, Any]:
    """Token-space accuracy on the three splits (nine-colour prototypes) and the colour-naming probe."""
    from vpit.inference.pipeline import VPiTPipeline
    from vpit.toy.evaluate import EvalSettings, evaluate_generation
    from vpit.toy.world import COLOURS, UNDERSTANDING_ONLY_COLOURS, compositions, jittered, render
    from vpit.training.evaluation import normalize_answer

    pipe = VPiTPipeline.from_pretrained(model)  # no decoder: the language model's own figure
    settings = EvalSettings(transfer=True, generation_repeats=1, batch_size=64, seed=seed)
    result, _ = evaluate_generation(pipe, settings, progress=False)
    rng = random.Random(f"finding1-probe:{seed}")
    probe: dict[str, Any] = {}
    for split, colours in (("new", UNDERSTANDING_ONLY_COLOURS), ("trained", COLOURS)):
        objects = [jittered(rng, *c) for c in compositions(colours=colours)]
        answers = []
        for i in range(0, len(objects), 64):
            batch = objects[i : i + 64]
            outputs = pipe(
                [f"{pipe.processor.image_token}\nWhat colour is the shape?"] * len(batch),
                images=[render(o) for o in batch],
                max_new_tokens=8,
            )
            answers += [normalize_answer(o.text) == o_.colour for o, o_ in zip(outputs, batch, strict=True)]
        probe[split] = {"right": sum(answers), "n": len(answers)}
    return {"tokens": result["tokens"], "probe": probe}


def _pooled(rows: list[dict[str, Any]], get: Any) -> tuple[float, list[float], list[float]]:
    """Mean over seeds, each seed's value, and the Wilson interval of the pooled (right, n)."""
    from vpit.toy.evaluate import wilson_interval

    values = [get(r)[0] / get(r)[1] for r in rows]
    right, n = sum(get(r)[0] for r in rows), sum(get(r)[1] for r in rows)
    return sum(values) / len(values), values, wilson_interval(right, n)


def transfer_table(results: list[dict[str, Any]]) -> str:
    def tokens(split: str) -> Any:
        return lambda r: (round(r["tokens"][split]["all"] * r["tokens"][split]["n"]), int(r["tokens"][split]["n"]))

    measures = [
        ("transfer, token space", tokens("transfer")),
        ("in-distribution, token space", tokens("in_distribution")),
        ("held-out, token space", tokens("held_out")),
        ("probe: names a new colour", lambda r: (r["probe"]["new"]["right"], r["probe"]["new"]["n"])),
    ]
    lines = [
        "| generation records | arm | " + " | ".join(name for name, _ in measures) + " |",
        "|---|---|" + "---|" * len(measures),
    ]
    keys = sorted(
        {(r["n_generation"], r["arm"]) for r in results},
        key=lambda k: (k[0], [a[0] for a in TRANSFER_ARMS].index(k[1])),
    )
    for n, arm in keys:
        rows = [r for r in results if (r["n_generation"], r["arm"]) == (n, arm)]
        cells = []
        for _, get in measures:
            mean, values, (low, high) = _pooled(rows, get)
            seeds = " / ".join(f"{100 * v:.0f}" for v in values)
            cells.append(f"{100 * mean:.1f}% [{100 * low:.1f}, {100 * high:.1f}] ({seeds})")
        lines.append(f"| {n} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_transfer(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, split, title in zip(
        axes, ("transfer", "in_distribution"), ("transfer (new colours)", "in-distribution"), strict=True
    ):
        for (arm, _, _), colour in zip(TRANSFER_ARMS, ("tab:orange", "tab:blue", "tab:green"), strict=True):
            sizes = sorted({r["n_generation"] for r in results if r["arm"] == arm})
            means = []
            for n in sizes:
                rows = [r for r in results if r["arm"] == arm and r["n_generation"] == n]
                means.append(100 * sum(r["tokens"][split]["all"] for r in rows) / len(rows))
                ax.scatter([n] * len(rows), [100 * r["tokens"][split]["all"] for r in rows], color=colour, s=10)
            ax.plot(sizes, means, "o-", color=colour, label=arm)
        ax.set_xscale("log")
        ax.set_xlabel("generation records")
        ax.set_title(f"token space, all four right: {title}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_transfer(args: argparse.Namespace, toy: Path, work: Path) -> int:
    backbones = json.loads((toy / "backbones" / "backbones.json").read_text())
    if len(backbones.get("colours", [])) != 9:
        raise SystemExit(
            f"{toy} is not a world with the understanding-only colours: build it with `python -m vpit.toy.demo "
            f"--understanding-only-colours --work {toy} --out {toy.parent / 'demo'}`"
        )
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for n in args.sizes:
        for seed in args.seeds:
            for arm, with_understanding, multiple in TRANSFER_ARMS:
                run = work / f"n{n}_s{seed}_{arm.split(',')[-1].strip().replace(' ', '_').replace('+', 'und')}"
                print(f"\n=== {n} generation records, seed {seed}, {arm} ===", flush=True)
                train_arm(toy, run, n, with_understanding, multiple * args.steps, seed)
                results.append({"n_generation": n, "seed": seed, "arm": arm, **score_transfer(run / "final")})
                shutil.rmtree(run / "final")
                print(transfer_table(results), flush=True)
    report = {"sizes": args.sizes, "seeds": args.seeds, "steps": args.steps, "results": results,
              "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    markdown = (
        f"# Finding 1 on the toy world: transfer to colours only understanding data shows\n\n"
        f"{args.steps} steps per generation-only run, batch 16, seeds {args.seeds}; {report['seconds']:.0f} s in all. "
        "Each cell: mean over seeds [95 % Wilson interval of the pooled prompts] (each seed's figure).\n\n"
        + transfer_table(results)
        + "\n\n![transfer](finding1_transfer.png)\n"
    )
    write_results(work, args.results, "finding1_transfer", report, markdown, plot_transfer)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="default 100 300 1000 3000; transfer: 100 1000"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps of the generation-only runs (default 150)"
    )
    parser.add_argument(
        "--transfer", action="store_true", help="the transfer experiment (a world with the new colours)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the transfer runs")
    parser.add_argument(
        "--match",
        choices=("generation", "compute"),
        default="generation",
        help="generation: the + understanding runs train 2x the steps (as many generation samples); compute: as many",
    )
    parser.add_argument("--toy", type=Path, default=ROOT / "outputs" / "toy", help="what `make demo` built")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "finding1")
    parser.add_argument("--decoder-steps", type=int, default=15, help="denoising steps when scoring")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the table and plot are copied")
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [100, 1000] if args.transfer else [100, 300, 1000, 3000]
    if args.steps is None:
        args.steps = 150
    toy, work = args.toy.resolve(), args.work.resolve()
    for needed in (toy / "bridge" / "final", toy / "decoder" / "final", toy / "data" / "generation"):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run `make demo` first (it builds {toy})")
    generation_records = sum(1 for _ in (toy / "data" / "generation" / "records.jsonl").open())
    if max(args.sizes) > generation_records:
        raise SystemExit(f"--sizes up to {max(args.sizes)} but {toy}/data/generation has {generation_records} records")
    work.mkdir(parents=True, exist_ok=True)
    if args.transfer:
        return run_transfer(args, toy, work)
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for n in args.sizes:
        for arm, with_understanding in (("generation only", False), ("+ understanding", True)):
            run = work / f"n{n}_{'und' if with_understanding else 'gen'}"
            print(f"\n=== {n} generation records, {arm} ===", flush=True)
            steps = 2 * args.steps if with_understanding and args.match == "generation" else args.steps
            train_arm(toy, run, n, with_understanding, steps)
            scores = score_arm(run / "final", toy / "decoder" / "final", args.decoder_steps)
            results.append({"n_generation": n, "arm": arm, **scores})
            shutil.rmtree(run / "final")  # keep the logs and the curve, not one model per point
            print(table(results), flush=True)
    report = {
        "sizes": args.sizes,
        "steps": args.steps,
        "match": args.match,
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    markdown = (
        f"# Finding 1 on the toy world\n\nGeneration only: {args.steps} steps per run; + understanding: "
        f"{2 * args.steps if args.match == 'generation' else args.steps} (matched: {args.match}); batch 16; "
        f"{report['seconds']:.0f} s in all.\n\n"
        + table(results)
        + "\n\n![generation accuracy vs generation data](finding1.png)\n"
    )
    write_results(work, args.results, "finding1", report, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
