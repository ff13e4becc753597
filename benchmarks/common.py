"""Helpers shared by the benchmarks: interleaved median timing, a description of the machine, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def timed_runs(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process-CPU seconds of every timed run of each function.

    Each function is called `warmup` times, then `repeats` rounds of one call each (interleaved, the order rotated
    every round), so that a change in the load of a shared machine hits every side alike. `sync` (e.g.
    `torch.cuda.synchronize`) is called before each clock read.

    CPU seconds count the time this process's threads ran, whatever else the machine was doing: with one torch
    thread they measure the work of a step, and stay steady when a shared machine's load makes wall time jump.
    """
    wait = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:  # A B, B A, A B, ...: no side always runs first
            fn = fns[name]
            wait()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wait()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-round ratios of two interleaved series (robust to load that drifts between rounds)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def describe_machine(device: str = "cpu") -> str:
    """One line: the processor (or GPU), its cores, torch's version and thread count."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return (
        f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s)"
    )


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    """Write `result` as indented JSON, creating the folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
