"""Training-step time of each output-side option (issue #17) against MetaMorph's cosine regression, same model and
batch as `benchmarks.training_step`.

    python -m benchmarks.output_side [--repeats 7] [--threads 1] [--out benchmarks/results/output_side.json]

The VPiT model of `training_step` (Llama 8x512, vocabulary 32000, frozen CLIP ViT-B/16 @224, K = 196) on its batch
(2 understanding rows + 2 generation rows, 392 visual targets), one step = forward + backward + AdamW + zero_grad:

- cosine      `model.visual_loss: cosine`, the MLP head (the reference)
- l2          `model.visual_loss: l2`
- smooth_l1   `model.visual_loss: smooth_l1`
- z_loss      cosine + `train.z_loss: 1e-4` (the log-partition of the text logits at the labelled positions)
- diffusion   `model.visual_head: diffusion` (width 1024, depth 3, 4 noise draws per target: MAR's setting)
- discrete    `model.visual_target: discrete` with 8192 codes (SEED's codebook size): the vocabulary grows by 8192
              rows, the code CE runs the LM head at the 392 target slots

The figure is the median over rounds of each option's per-round ratio of process CPU time to the cosine's (one
torch thread; the options interleaved, the order rotating). No goal: a tracked figure, reported beside the toy
comparison in RESULTS.md ("The output side").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vpit.model.adapters import build_visual_head

from .common import describe_machine, median_ratio, timed_runs, write_json
from .training_step import build_vpit, build_vpit_and_processor, count, training_step, vpit_batch

DIFFUSION = {"width": 1024, "depth": 3, "batch_mul": 4}
CODES = 8192
LOSS_OPTIONS: dict[str, dict[str, Any]] = {
    "cosine": {"visual_loss": "cosine"},
    "l2": {"visual_loss": "l2"},
    "smooth_l1": {"visual_loss": "smooth_l1"},
    "z_loss": {"visual_loss": "cosine", "z_loss_weight": 1e-4},
}


def with_settings(model: Any, settings: dict[str, Any], step: Callable[[], float]) -> Callable[[], float]:
    """The step, run with `settings` applied to the model's config (z_loss_weight: to the model)."""

    def run() -> float:
        model.z_loss_weight = settings.get("z_loss_weight", 0.0)
        model.config.visual_loss = settings["visual_loss"]
        return step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default="benchmarks/results/output_side.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start_time = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_vpit(Path(tmp))
        diffusion_model = build_vpit(Path(tmp) / "diffusion")
        discrete_model, processor = build_vpit_and_processor(Path(tmp) / "discrete")
    hidden, vision = model.config.get_text_config().hidden_size, model.vision_tower.hidden_size
    torch.manual_seed(0)
    diffusion_model.visual_head = build_visual_head("diffusion", hidden, vision, DIFFUSION)
    diffusion_model.config.visual_head, diffusion_model.config.visual_head_options = "diffusion", DIFFUSION
    codebook = torch.nn.functional.normalize(torch.randn(CODES, vision), dim=-1)
    discrete_model.set_visual_codebook(codebook, processor.tokenizer)
    pixels = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    batch = vpit_batch(model, pixels)
    steps = {
        name: with_settings(model, settings, training_step(model, batch, model.vision_tower))
        for name, settings in LOSS_OPTIONS.items()
    }
    steps["diffusion"] = training_step(diffusion_model, batch, diffusion_model.vision_tower)
    steps["discrete"] = training_step(discrete_model, batch, discrete_model.vision_tower)
    wall, cpu = timed_runs(steps, args.repeats)
    result: dict[str, Any] = {
        "machine": describe_machine(),
        "model": "training_step's VPiT: Llama 8x512 (vocab 32000) + frozen CLIP ViT-B/16 @224, K=196, 4 x 256 tokens",
        "diffusion_head": DIFFUSION,
        "codebook_size": CODES,
        "head_parameters": {
            "mlp": sum(p.numel() for p in model.visual_head.parameters()),
            "diffusion": sum(p.numel() for p in diffusion_model.visual_head.parameters()),
        },
        "trainable_parameters": {
            "mlp": count(model, True),
            "diffusion": count(diffusion_model, True),
            "discrete": count(discrete_model, True),
        },
        "repeats": args.repeats,
        "cpu_seconds_per_step": {name: statistics.median(v) for name, v in cpu.items()},
        "ratio_to_cosine": {name: median_ratio(cpu[name], cpu["cosine"]) for name in steps},
        "wall_ratio_to_cosine": {name: median_ratio(wall[name], wall["cosine"]) for name in steps},
        "seconds": time.perf_counter() - start_time,
    }
    print(f"output side, {result['machine']}; step CPU time relative to the cosine (median of {args.repeats} rounds)")
    print("| option | CPU s / step | x cosine |")
    print("|---|---|---|")
    for name in steps:
        print(f"| {name} | {result['cpu_seconds_per_step'][name]:.3f} | {result['ratio_to_cosine'][name]:.3f} |")
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
