"""The input side of the family on the toy world (issue #19): each bridge trained the same way, then judged the same
way.

    python -m benchmarks.bridges [--work outputs/toy] [--bridges mlp2x_gelu perceiver ...] [--vpit-steps 500]
                                 [--out benchmarks/results/bridges.json]

`--work` holds the toy backbones and data of a `make demo` run (outputs/toy/backbones, outputs/toy/data). Per bridge:

1. stage 1, `recipes/toy/bridge.yaml` (the MLP) or `recipes/toy/bridge_<name>.yaml` (a resampler; `bidirectional`:
   the MLP with `model.image_attention: bidirectional`): the bridge and
   the image-token rows on understanding data, the LLM frozen, `--bridge-steps` steps (100, as the demo);
2. stage 2, `recipes/toy/vpit_smooth_l1.yaml` from there (the demo's VPiT stage), `--vpit-steps` steps;
3. judged by `vpit eval toy`'s own functions: understanding per question type (40 per type: colour, shape, size,
   position, describe) after stage 1 and after stage 2, and generation in token space (the predicted
   tokens' nearest composition prototype; no decoder) on the 150 in-distribution and 30 held-out compositions.

Also the parameters of each bridge (the resampler plus, for a resampler, its token-wise bridge) and each stage's
training seconds per step, from the runs' own logs (one process at a time, 1 torch thread, same batches).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vpit.inference.pipeline import VPiTPipeline
from vpit.toy.demo import RECIPES, ROOT, toy_mixture
from vpit.toy.evaluate import EvalSettings, evaluate_generation, evaluate_understanding

from .common import describe_machine, write_json

BRIDGES = ("mlp2x_gelu", "bidirectional", "perceiver", "qformer", "qformer_instruct", "causal_query")


def _train(recipe: Path, overrides: dict[str, Any]) -> float:
    """Run one stage through the real entry point; its wall seconds."""
    command = [sys.executable, "-m", "vpit.train", str(recipe), *(f"{k}={v}" for k, v in overrides.items())]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _seconds_per_step(run: Path) -> float:
    """Median seconds per step over the logged intervals of the run's history.jsonl (samples/s and batch size)."""
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]
    rates = sorted(row["samples_per_s"] for row in rows if row.get("samples_per_s"))
    return 16 / rates[len(rates) // 2]  # the toy recipes' batch size


def _understanding(model_dir: Path, settings: EvalSettings) -> dict[str, Any]:
    pipe = VPiTPipeline.from_pretrained(model_dir)
    return evaluate_understanding(pipe, settings, progress=False)


def _bridge_parameters(model_dir: Path) -> dict[str, int]:
    pipe = VPiTPipeline.from_pretrained(model_dir)
    model = pipe.model
    count = {"bridge": sum(p.numel() for p in model.bridge.parameters())}
    if model.token_bridge is not None:
        count["token_bridge"] = sum(p.numel() for p in model.token_bridge.parameters())
    return count


def run(work: Path, out_dir: Path, bridges: list[str], bridge_steps: int, vpit_steps: int, seed: int) -> dict[str, Any]:
    settings = EvalSettings(questions_per_type=40, generation_repeats=1)
    results: dict[str, Any] = {}
    common = {"tracking.report_to": "[]", "train.seed": seed, "data.seed": seed, "train.checkpoint_every": 0}
    for bridge in bridges:
        print(f"[bridges] {bridge}", flush=True)
        recipe = RECIPES / ("bridge.yaml" if bridge == "mlp2x_gelu" else f"bridge_{bridge}.yaml")
        first, second = out_dir / bridge / "bridge", out_dir / bridge / "vpit"
        bridge_seconds = _train(
            recipe,
            {
                **common,
                "model.llm": work / "backbones" / "llm",
                "model.vision": f"local-dir:{work / 'backbones' / 'clip'}",
                "data.mixture": toy_mixture(work, {"understanding": 1.0}),
                "train.output_dir": first,
                "train.max_steps": bridge_steps,
                "optim.warmup_steps": min(10, bridge_steps // 10),
            },
        )
        vpit_seconds = _train(
            RECIPES / "vpit_smooth_l1.yaml",
            {
                **common,
                "model.pretrained": first / "final",
                "data.mixture": toy_mixture(work, {"understanding": 1.0, "generation": 1.0, "editing": 0.3}),
                "train.output_dir": second,
                "train.max_steps": vpit_steps,
                "optim.warmup_steps": min(30, vpit_steps // 10),
            },
        )
        torch.manual_seed(seed)
        after_bridge = _understanding(first / "final", settings)
        pipe = VPiTPipeline.from_pretrained(second / "final")
        after_vpit = evaluate_understanding(pipe, settings, progress=False)
        generation, _ = evaluate_generation(pipe, settings, progress=False)
        results[bridge] = {
            "parameters": _bridge_parameters(first / "final"),
            "understanding_after_bridge_stage": {"overall": after_bridge["overall"], **after_bridge["per_type"]},
            "understanding_after_vpit_stage": {"overall": after_vpit["overall"], **after_vpit["per_type"]},
            "token_space": generation["tokens"],
            "seconds_per_step": {"bridge": _seconds_per_step(first), "vpit": _seconds_per_step(second)},
            "stage_seconds": {"bridge": round(bridge_seconds, 1), "vpit": round(vpit_seconds, 1)},
        }
        print(json.dumps(results[bridge], indent=1), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("outputs/toy"), help="a make demo run's backbones + data")
    parser.add_argument("--runs", type=Path, default=Path("outputs/bridges"), help="where the runs go")
    parser.add_argument("--bridges", nargs="+", default=list(BRIDGES), choices=BRIDGES)
    parser.add_argument("--bridge-steps", type=int, default=100)
    parser.add_argument("--vpit-steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/bridges.json")
    args = parser.parse_args()
    start = time.perf_counter()
    results = run(args.work.resolve(), args.runs.resolve(), args.bridges, args.bridge_steps, args.vpit_steps, args.seed)
    path = write_json(
        args.out,
        {
            "machine": describe_machine(),
            "bridge_steps": args.bridge_steps,
            "vpit_steps": args.vpit_steps,
            "seed": args.seed,
            "bridges": results,
            "seconds": round(time.perf_counter() - start, 1),
        },
    )
    print(f"[bridges] wrote {path}")


if __name__ == "__main__":
    main()
