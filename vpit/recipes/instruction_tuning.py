"""The `bridge` and `vpit` stages: instruction tuning of a VPiT model on a data mixture.

Stage 1, `bridge`: the LLM is frozen; the bridge (and the image-token rows) learn to feed the LLM (captioning /
VQA data). Stage 2, `vpit`: the LLM (full or LoRA), the bridge and the visual head train on understanding,
generation and other visual data. The YAML recipe says which; this file reads top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image

from ..data.cards import parse_mixture
from ..processing_vpit import VPiTProcessor
from ..training.checkpoint import resume
from ..training.components import (
    build_accelerator,
    build_batches,
    build_model,
    build_optimizer,
    build_scheduler,
)
from ..training.config import DataSection, Recipe
from ..training.evaluation import answer_accuracy, generation_grid, held_out_samples
from ..training.loop import evaluate_losses, finish, train_loop


def run(recipe: Recipe) -> Path:
    run_dir = Path(recipe.train.output_dir)
    accelerator = build_accelerator(recipe)
    set_seed(recipe.train.seed)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(recipe.tracking.project, config=_flat(recipe.to_dict()))

    # Model: assembled from an LLM + encoder, or loaded from the previous stage; LoRA and freezing applied.
    model, processor = build_model(recipe)
    lora_base = None
    if recipe.lora.enabled:  # the merged final model is rebuilt from this base + the adapter
        lora_base = run_dir / "base"
        if accelerator.is_main_process and not (lora_base / "config.json").exists():
            model.get_base_model().save_pretrained(lora_base)  # type: ignore[operator]  # a peft PeftModel
            processor.save_pretrained(lora_base)

    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # Resume: model, optimizer, schedule and RNG from the checkpoint; the data position from its trainer state.
    state = resume(accelerator, run_dir, recipe.train.resume)

    # Data: each process reads its own shard of the mixture; batches continue where the checkpoint stopped.
    rank, world = accelerator.process_index, accelerator.num_processes
    loader, _ = build_batches(recipe.data, processor, rank, world, run_dir, start_batch=state.next_batch)
    evaluate = None
    if recipe.data.eval_mixture and recipe.train.eval_every:
        evaluate = _evaluator(accelerator, model, processor, recipe, run_dir)

    state = train_loop(accelerator, model, iter(loader), optimizer, scheduler, recipe, run_dir, state, evaluate)
    final = finish(accelerator, model, processor, recipe, run_dir, state, lora_base)
    accelerator.end_training()
    return final


def _evaluator(
    accelerator: Accelerator, model: Any, processor: VPiTProcessor, recipe: Recipe, run_dir: Path
) -> Callable[[int], dict[str, float]]:
    """Held-out losses and answer accuracy every `train.eval_every` steps, plus a grid of generated images when
    `train.eval_decoder` names a decoder."""
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = max(1, recipe.train.eval_samples // world)
    eval_loader, _ = build_batches(_eval_section(recipe), processor, rank, world, run_dir / "eval")
    eval_batches = iter(eval_loader)
    num_batches = max(1, per_rank // recipe.data.batch_size)
    cards = [entry.load() for entry in parse_mixture(recipe.data.eval_mixture)]
    questions = held_out_samples(cards, "understanding", rank, world, per_rank, recipe.data.use_sample)
    decoder, prompts = None, []
    if recipe.train.eval_decoder:
        from ..decoder import VPiTDecoderPipeline

        decoder = VPiTDecoderPipeline.from_pretrained(recipe.train.eval_decoder)
        prompts = [
            s.messages[0]["content"] for s in held_out_samples(cards, "generation", 0, 1, 8, recipe.data.use_sample)
        ]

    def evaluate(step: int) -> dict[str, float]:
        results = evaluate_losses(accelerator, model, eval_batches, num_batches)
        if questions:
            results |= answer_accuracy(accelerator, model, processor, questions)
        if decoder is not None and prompts:
            path = generation_grid(
                accelerator, model, processor, decoder, prompts, run_dir / "eval" / f"step-{step:08d}.png"
            )
            if path is not None:
                for tracker in accelerator.trackers:
                    if hasattr(tracker, "log_images"):
                        tracker.log_images({"generated": [np.asarray(Image.open(path))]}, step=step, dataformats="NHWC")
        return results

    return evaluate


def _eval_section(recipe: Recipe) -> DataSection:
    import dataclasses

    return dataclasses.replace(recipe.data, mixture=recipe.data.eval_mixture, seed=recipe.data.seed + 1, num_workers=0)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Trackers take flat scalar configs."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
