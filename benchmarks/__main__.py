"""Every benchmark in sequence, then a summary table of the figures and their goals.

    python -m benchmarks [--only NAME ...]      (make bench)

Runs each benchmark as its own process (`python -m benchmarks.<name>`, default arguments: median of 5 or more
timed runs after a warm-up; see each module's docstring), prints its table, reads the JSON it writes to
benchmarks/results/, and ends with a table of every measure (figure, goal, met?) written to
benchmarks/results/summary.json. A benchmark that fails is reported and the others still run; the exit status is
non-zero then. About 13 minutes on 2 shared CPU cores (budget: 20). `decoder_robustness` measures the toy models
`make demo` trains, and says so instead of running when outputs/demo holds none. MetaMorph's Finding-1 experiment
(`benchmarks.finding1`) is not part of the suite: it needs `make demo` first and takes ~20 minutes on its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Row:
    """One line of the summary."""

    benchmark: str
    measure: str
    figure: str
    goal: str
    met: bool | None  # None: no goal (a tracked figure)


def _data_pipeline(r: dict[str, Any]) -> list[Row]:
    packed = r["padding"]["packed_buffer64_row2048"]
    return [
        Row("data_pipeline", "pipeline / training-step samples/s", f"{r['ratio']:.1f}x", ">= 5x", r["ratio"] >= 5),
        Row("data_pipeline", "padding, packed rows of 2048", f"{packed:.1%}", "< 5%", packed < 0.05),
    ]


def _generation(r: dict[str, Any]) -> list[Row]:
    speedup, step = r["image_speedup_cache_vs_no_cache"], r["visual_vs_hf_text_step"]
    decode = r["visual_vs_hf_text_step_decode_only"]
    return [
        Row("generation", "64 visual tokens, KV cache vs no cache", f"{speedup:.1f}x", ">= 10x", speedup >= 10),
        Row("generation", "visual step / HF text step (with prefill)", f"{step:.2f}x", "<= 1.2x", step <= 1.2),
        Row("generation", "visual step / HF text step (decode only)", f"{decode:.2f}x", "<= 1.2x", decode <= 1.2),
    ]


def _decoder(r: dict[str, Any]) -> list[Row]:
    return [
        Row(
            "decoder",
            f"pipeline / bare loop, {s['setting'].split(' (')[0]}",
            f"{s['ratio']:.3f}x",
            ">= 0.95x",
            s["ratio"] >= 0.95,
        )
        for s in r["settings"]
    ]


def _training_step(r: dict[str, Any]) -> list[Row]:
    ratio = r["ratio_vpit_over_llava"]
    return [Row("training_step", "VPiT / LLaVA step (CPU time)", f"{ratio:.3f}x", "<= 1.05x", ratio <= 1.05)]


def _mfu(r: dict[str, Any]) -> list[Row]:
    where = f"{r['device']}, {r['precision']}"
    return [
        Row("mfu", f"VPiT throughput ({where})", f"{r['tokens_per_s']:.0f} tokens/s", "-", None),
        Row("mfu", f"MFU vs measured matmul peak ({where})", f"{r['mfu']:.1%}", "-", None),
        Row(
            "mfu",
            f"MFU vs the device's published peak ({where})",
            "-" if r.get("mfu_spec") is None else f"{r['mfu_spec']:.1%}",
            "-",
            None,
        ),
    ]


def _memory(r: dict[str, Any]) -> list[Row]:
    step, loss = r["vpit_vs_llava"], r["loss_vpit_vs_hf"]
    vocab = f"{r['vocab'] // 1000}k vocabulary"
    return [
        Row("memory", f"VPiT / LLaVA step peak memory, {vocab}", f"{step:.3f}x", "<= 1.05x", step <= 1.05),
        Row("memory", f"VPiT / HF loss head peak memory, {vocab}", f"{loss:.3f}x", "<= 1x", loss <= 1.0),
    ]


def _zero3(r: dict[str, Any]) -> list[Row]:
    ratio = r["ratio_two_over_one"]
    return [Row("zero3_memory", "ZeRO-3 bytes per rank, 2 ranks / 1", f"{ratio:.3f}x", "<= 0.55x", ratio <= 0.55)]


def _feature_cache(r: dict[str, Any]) -> list[Row]:
    ratio = r["speedup_cached_vs_pixels"]
    return [
        Row("feature_cache", "training samples/s, cached encoder tokens / pixels (ViT-B/16)", f"{ratio:.2f}x",
            "> 1x", ratio > 1),
        Row("feature_cache", "cache-features writing speed (ViT-B/16, 224 px)",
            f"{r['cache_images_per_s']:.1f} img/s", "-", None),
    ]  # fmt: skip


def _output_side(r: dict[str, Any]) -> list[Row]:
    return [
        Row("output_side", f"training step, {name} / cosine (CPU time)", f"{ratio:.2f}x", "-", None)
        for name, ratio in r["ratio_to_cosine"].items()
        if name != "cosine"
    ]


def _decoder_robustness(r: dict[str, Any]) -> list[Row]:
    accuracy, ci = r["accuracy"], r["ci95"]
    rows = []
    for name in accuracy:
        low, high = ci[name]
        label = name if name != "teacher-forced" else f"teacher-forced (cos {r['teacher_forced_mean_cosine']:.3f})"
        rows.append(
            Row("decoder_robustness", f"reconstruction from {label} tokens", f"{accuracy[name]:.1%}",
                f"[{low:.0%}, {high:.0%}]", None)
        )  # fmt: skip
    return rows


def _decoder_cache(r: dict[str, Any]) -> list[Row]:
    return [
        Row("decoder_cache", "decoder step, frozen cache / pixels (toy)", f"{r['speedup']:.2f}x", ">= 1.2x",
            r["speedup"] >= 1.2),
        Row("decoder_cache", f"cache of {r['images']} images written, s", f"{r['cache_write_seconds']:.0f}", "-", None),
    ]  # fmt: skip


# name -> (extra arguments, JSON file it writes, summary rows from that JSON)
BENCHMARKS: dict[str, tuple[list[str], str, Callable[[dict[str, Any]], list[Row]]]] = {
    "data_pipeline": ([], "data_pipeline.json", _data_pipeline),
    "generation": ([], "generation.json", _generation),
    "decoder": ([], "decoder.json", _decoder),
    "training_step": ([], "training_step.json", _training_step),
    "mfu": (["--device", "cpu"], "mfu_cpu.json", _mfu),
    "zero3_memory": ([], "zero3_memory.json", _zero3),
    "memory": ([], "memory.json", _memory),
    "feature_cache": ([], "feature_cache.json", _feature_cache),
    "output_side": ([], "output_side.json", _output_side),
    "decoder_robustness": ([], "decoder_robustness.json", _decoder_robustness),
    "decoder_cache": ([], "decoder_cache.json", _decoder_cache),
}


def run(name: str, extra: list[str], timeout: float) -> tuple[bool, float, str]:
    """Run one benchmark, its stdout (the table) passed through; returns (ok, seconds, stderr tail on failure)."""
    command = [sys.executable, "-m", f"benchmarks.{name}", *extra]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # warnings and progress bars; shown only when the run fails
        try:
            result = subprocess.run(command, cwd=ROOT, stderr=log, text=True, timeout=timeout)
            ok = result.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
            print(f"{name} ran past {timeout:.0f} s and was stopped", flush=True)
        log.seek(0)
        tail = "" if ok else log.read()[-4000:]
    return ok, time.perf_counter() - start, tail


NEEDS_DEMO = {"decoder_robustness", "decoder_cache"}  # benchmarks of the toy models and data `make demo` writes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run these benchmarks only")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed to each benchmark")
    parser.add_argument("--out", default=str(RESULTS / "summary.json"))
    args = parser.parse_args()
    names = args.only or list(BENCHMARKS)
    start = time.perf_counter()
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    demo = ROOT / "outputs" / "demo"
    for name in names:
        extra, json_name, summarise = BENCHMARKS[name]
        if name in NEEDS_DEMO and not (demo / "decoder" / "model_index.json").is_file():
            print(f"\n=== {name}: not run, it needs `make demo`'s outputs in {demo}", flush=True)
            rows.append(Row(name, "not run: needs `make demo` first", "-", "-", None))
            continue
        ok, seconds[name], tail = run(name, extra, args.timeout)
        if not ok:
            failed[name] = tail
            print(f"{name} FAILED:\n{tail}", flush=True)
            continue
        rows += summarise(json.loads((RESULTS / json_name).read_text()))
    total = time.perf_counter() - start

    print(f"\n=== summary ({total / 60:.1f} min)")
    print(f"{'benchmark':14} {'measure':52} {'figure':>16} {'goal':>9} {'met?':>5}")
    for row in rows:
        met = "-" if row.met is None else "yes" if row.met else "NO"
        print(f"{row.benchmark:14} {row.measure:52} {row.figure:>16} {row.goal:>9} {met:>5}")
    for name in failed:
        print(f"{name:14} (failed: see above)")
    print(f"wall time per benchmark: {', '.join(f'{n} {s:.0f} s' for n, s in seconds.items())}")
    write_json(
        args.out,
        {
            "rows": [asdict(row) for row in rows],
            "seconds": seconds,
            "total_seconds": total,
            "failed": sorted(failed),
            "all_goals_met": all(row.met is not False for row in rows) and not failed,
        },
    )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
