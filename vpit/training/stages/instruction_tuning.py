"""The `bridge` and `vpit` stages: instruction tuning of a VPiT model on a data mixture.

Stage 1, `bridge`: the LLM is frozen; the bridge (and the image-token rows) learn to feed the LLM (captioning /
VQA data). Stage 2, `vpit`: the LLM (full or LoRA), the bridge and the visual head train on understanding,
generation and other visual data. The YAML recipe says which; this file reads top to bottom.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import PeftModel
from PIL import Image
from torch import nn

from ...data.cards import parse_mixture
from ...data.features import encoder_fingerprint
from ...hub import push_folder, write_model_card
from ...model.lora import load_lora, merge_lora
from ...model.processing_vpit import VPiTProcessor
from ...model.resamplers import RESAMPLERS
from ..checkpoint import TrainerState, full_state_dict, resume
from ..components import (
    build_accelerator,
    build_batches,
    build_model,
    build_optimizer,
    build_scheduler,
)
from ..config import DataSection, InstructionRecipe
from ..evaluation import answer_accuracy, generation_grid, held_out_samples
from ..loop import LOSS_KEYS, evaluate_losses, plot_loss_curve, train_loop, vpit_config


def run(recipe: InstructionRecipe) -> Path:
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
    config = vpit_config(accelerator, model)
    fingerprint: str | None = encoder_fingerprint(config, processor.preprocess_config)
    if config.bridge in RESAMPLERS:
        # A feature cache holds the pooled tokens; a resampler reads the patch tokens, so the images are encoded.
        fingerprint = None
        if recipe.data.use_features and accelerator.is_main_process:
            print(f"[vpit] the {config.bridge} bridge reads patch tokens: encoder-token caches are not used")
    loader = build_batches(
        recipe.data, processor, rank, world, run_dir, start_batch=state.next_batch, encoder_fingerprint=fingerprint
    )
    evaluate = None
    if recipe.data.eval_mixture and recipe.train.eval_every:
        evaluate = periodic_evaluation(accelerator, model, processor, recipe, run_dir)

    state = train_loop(accelerator, model, iter(loader), optimizer, scheduler, recipe, run_dir, state, evaluate)
    final = finish(accelerator, model, processor, recipe, run_dir, state, lora_base)
    accelerator.end_training()
    return final


def finish(
    accelerator: Accelerator,
    model: nn.Module,
    processor: VPiTProcessor,
    recipe: InstructionRecipe,
    run_dir: Path,
    state: TrainerState,
    lora_base: Path | None = None,
) -> Path:
    """Write the final, self-describing model folder (loadable without DeepSpeed or peft), the summary, the loss
    curve and a model card; push to the Hub when the recipe asks. Returns the final folder.

    Every process takes part (ZeRO-3 gathers the 16-bit weights from all ranks); only the main process writes.
    """
    final = run_dir / "final"
    counts = accelerator.reduce(torch.tensor([state.samples, state.skipped], device=accelerator.device), "sum")
    samples, skipped = (int(c) for c in counts.cpu())  # over all processes
    state_dict = full_state_dict(accelerator, model)  # gathered across ranks under ZeRO-3 / FSDP2
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if recipe.lora.enabled:
            assert lora_base is not None, "a LoRA run saves its base model first"
            unwrapped.save_pretrained(run_dir / "adapter", state_dict=state_dict)
            merge_lora(load_lora(lora_base, run_dir / "adapter")).save_pretrained(final)
        elif isinstance(unwrapped, PeftModel):  # the bridge stage's image-token rows (TrainableTokens)
            merge_lora(unwrapped).save_pretrained(final)
        else:
            unwrapped.save_pretrained(final, state_dict=state_dict)
        processor.save_pretrained(final)
        metrics = {k: v for k, v in (state.history[-1] if state.history else {}).items() if math.isfinite(v)}
        summary = {"steps": state.step, "samples": samples, "skipped": skipped, "final": metrics}
        (final / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (run_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in state.history))
        plot_loss_curve(state.history, run_dir / "loss_curve.png")
        card_metrics = {k: round(v, 4) for k, v in metrics.items() if k in LOSS_KEYS}
        card_metrics |= {"steps": state.step, "skipped records": skipped}
        write_model_card(
            final,
            recipe.hub.repo_id or run_dir.name,
            license=recipe.hub.license,
            metrics=card_metrics,
            training_config=recipe.to_dict(),
        )
        if recipe.hub.push and recipe.hub.repo_id:
            push_folder(final, recipe.hub.repo_id, private=recipe.hub.private)
        print(
            f"[vpit] {recipe.stage}: {state.step} steps, {samples} samples, {skipped} records skipped "
            f"(see {run_dir / 'skipped.jsonl'}); final model in {final}"
        )
    accelerator.wait_for_everyone()
    return final


def periodic_evaluation(
    accelerator: Accelerator, model: Any, processor: VPiTProcessor, recipe: InstructionRecipe, run_dir: Path
) -> Callable[[int], dict[str, float]]:
    """Held-out losses and answer accuracy every `train.eval_every` steps, plus a grid of generated images when
    `train.eval_decoder` names a decoder."""
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = max(1, recipe.train.eval_samples // world)
    eval_loader = build_batches(_eval_section(recipe), processor, rank, world, run_dir / "eval")
    eval_batches = iter(eval_loader)
    num_batches = max(1, per_rank // recipe.data.batch_size)
    cards = [entry.load() for entry in parse_mixture(recipe.data.eval_mixture)]
    questions = held_out_samples(cards, "understanding", rank, world, per_rank, recipe.data.use_sample)
    decoder, prompts = None, []
    if recipe.train.eval_decoder:
        from ...decoder import VPiTDecoderPipeline

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


def _eval_section(recipe: InstructionRecipe) -> DataSection:
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
