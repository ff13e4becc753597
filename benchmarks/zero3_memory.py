"""Per-rank training memory under DeepSpeed ZeRO-3: 2 ranks vs 1 rank (CPU, gloo).

    python -m benchmarks.zero3_memory [--steps 2] [--out benchmarks/results/zero3_memory.json]

Launches `benchmarks/zero3_probe.py` with `accelerate launch` and the shipped ZeRO-3 configuration
(`recipes/accelerate/deepspeed_zero3.yaml`: fp32 here, no offload, persistence threshold "auto" = 10 x hidden),
once with 1 process and once with 2, as the project's distributed tests do (on a machine without CUDA,
`vpit.training.components.build_accelerator` names the gloo backend). Each rank builds the model, optimizer and
data with vpit's recipe builders, trains `steps` steps on the toy understanding + generation cards (their shipped
samples), and
reports the bytes it holds for parameters, gradients and optimizer state (see the probe's docstring for what is
counted and how). Model: Llama 8 layers x 512 (tiny BPE vocabulary) + the tiny open_clip ViT, K = 16; the LLM,
bridge and visual head train (AdamW), the encoder is frozen (and partitioned too).

The figure is the largest rank's total with 2 ranks over the total with 1 rank. Goal: <= 0.55x (ideal 0.5x; the
rest is what ZeRO-3 keeps whole on every rank: persistent small parameters and the reduce bucket). Memory is
counted, not timed, so one run of each is exact; the launches take most of the ~1-2 min.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from vpit.toy.tiny import save_tiny_llama, save_tiny_open_clip

from .common import write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "recipes/accelerate/deepspeed_zero3.yaml"
GOAL = 0.55


def free_port() -> int:
    """A TCP port nothing listens on now (so that a concurrent distributed run on the default port is no clash)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample_cards(folder: Path) -> list[Path]:
    """The toy understanding and generation cards, reading their shipped samples (no `make demo` needed)."""
    folder.mkdir(parents=True)
    cards = []
    for name in ("toy_understanding", "toy_generation"):
        card = yaml.safe_load((ROOT / "data_cards" / f"{name}.yaml").read_text())
        sample = card["sample"]
        card["source"] = {
            "data_files": [str(ROOT / "data_cards" / f) for f in sample["data_files"]],
            "image_folder": str(ROOT / "data_cards" / sample["image_folder"]),
        }
        card.pop("sample")
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(card))
        cards.append(folder / f"{name}.yaml")
    return cards


def launch(processes: int, out: Path, llm: Path, clip: Path, steps: int, cards: list[Path]) -> list[dict[str, Any]]:
    """Run the probe on `processes` ranks; returns each rank's report."""
    out.mkdir(parents=True)
    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        CONFIG,
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),
        "benchmarks/zero3_probe.py",
        str(out),
        str(llm),
        str(clip),
        str(steps),
        *map(str, cards),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{processes}-rank launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/zero3_memory.json")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        llm = save_tiny_llama(folder / "llm", hidden_size=512, num_layers=8)
        clip = save_tiny_open_clip(folder / "clip")
        cards = sample_cards(folder / "cards")
        runs = {n: launch(n, folder / f"ranks{n}", llm, clip, args.steps, cards) for n in (1, 2)}
    single = runs[1][0]
    largest = max(runs[2], key=lambda r: r["total_bytes"])
    ratio = largest["total_bytes"] / single["total_bytes"]
    result: dict[str, Any] = {
        "machine": f"{os.cpu_count()}-core CPU, gloo, DeepSpeed ZeRO-3 ({CONFIG}), fp32",
        "model": f"VPiT: Llama 8x512 + tiny open_clip ViT, K=16, {single['parameters'] / 1e6:.2f} M parameters "
        f"({single['trainable_parameters'] / 1e6:.2f} M trainable)",
        "steps": args.steps,
        "one_rank": single,
        "two_ranks": runs[2],
        "ratio_two_over_one": ratio,
        "goal": f"<= {GOAL}",
        "met": ratio <= GOAL,
        "wall_s": time.perf_counter() - start,
    }
    out = write_json(args.out, result)

    mib = 2**20
    categories = list(single["bytes"])
    print(f"ZeRO-3 per-rank bytes after {args.steps} steps; model: {result['model']}")
    print(f"{'MiB':24} {'1 rank':>9} " + " ".join(f"{'2 ranks, r' + str(r['rank']):>13}" for r in runs[2]))
    for category in [*categories, "total"]:
        cells = [r["total_bytes"] if category == "total" else r["bytes"][category] for r in [single, *runs[2]]]
        print(f"{category:24} {cells[0] / mib:9.2f} " + " ".join(f"{c / mib:13.2f}" for c in cells[1:]))
    print(
        f"largest rank / 1 rank = {ratio:.3f}x  (goal <= {GOAL}x: {'met' if result['met'] else 'MISSED'}); "
        f"wrote {out} ({result['wall_s']:.0f} s)"
    )


if __name__ == "__main__":
    main()
