"""The optimisation loop and the end of a run, shared by the recipes.

The loop is deliberately small: accumulate, step, log, checkpoint, evaluate. Everything it needs is passed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..data.collator import model_inputs
from ..model.losses import count_loss_items
from .checkpoint import CheckpointExtra, TrainerState, save_checkpoint
from .config import Recipe

LOSS_KEYS = ("loss", "text_loss", "visual_loss", "z_loss")  # z_loss only when train.z_loss > 0


def train_loop(
    accelerator: Accelerator,
    model: nn.Module,
    batches: Iterator[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    recipe: Recipe,
    run_dir: Path,
    state: TrainerState,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    compute_loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None,
    after_step: Callable[[], None] | None = None,
    checkpoint_extras: tuple[CheckpointExtra, ...] = (),
    global_loss: bool = False,
) -> TrainerState:
    """Train until `recipe.train.max_steps` optimizer steps, starting from `state` (0, or a resumed checkpoint).

    The VPiT loss of a step is the loss of its whole global batch (every micro-batch of every process): the text
    term is the CE sum over the global batch's labelled tokens divided by their count, the visual term likewise
    over its visual targets. Each micro-batch's loss is its sums over those global counts (all-reduced before the
    step), scaled by processes x micro-batches to undo the averaging that gradient accumulation and data
    parallelism apply, so a global batch gives the same loss and gradients however it is split. Logged losses are
    the global batch's; every log line is also appended to `state.history` (checkpoints, summary, loss curve).

    `compute_loss(batch, step) -> (loss, named terms)` replaces the VPiT forward (the decoder stage's: a mean per
    micro-batch, averaged over micro-batches and processes); with `global_loss`, `compute_loss(batch, step,
    global_counts)` gets the global batch's (labelled tokens, visual targets) and weighs its terms over them as
    the VPiT forward does (the queries stage's); `after_step()` runs after each optimizer step (e.g.
    an EMA update); `checkpoint_extras` go into every checkpoint (see `vpit.training.checkpoint`).
    """
    train, accumulation = recipe.train, recipe.optim.gradient_accumulation_steps
    world = accelerator.num_processes
    global_counts = torch.ones(2, dtype=torch.long)  # (labelled tokens, visual targets) of the current global batch
    weigh_globally = compute_loss is None or global_loss

    def vpit_loss(batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(
            **model_inputs(batch),
            num_items_in_batch=global_counts[0],
            num_visual_items_in_batch=global_counts[1],
            return_logits=False,  # the LM head runs only where a label follows
        )
        terms = {key: getattr(out, key) for key in LOSS_KEYS if getattr(out, key) is not None}
        return out.loss * (world * accumulation), terms

    loss_of: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] = compute_loss or vpit_loss

    params = [p for p in model.parameters() if p.requires_grad]
    progress = tqdm(
        total=train.max_steps, initial=state.step, desc=f"{recipe.stage}", disable=not accelerator.is_local_main_process
    )
    window: dict[str, float] = {}
    window_steps, window_samples, window_start = 0, 0, time.perf_counter()
    model.train()
    while state.step < train.max_steps:
        micro_batches = [next(batches) for _ in range(accumulation)]
        if weigh_globally:
            local = sum(count_loss_items(b["labels"], b["visual_target_mask"]) for b in micro_batches)
            global_counts = accelerator.reduce(torch.as_tensor(local).to(accelerator.device), reduction="sum")
        for batch in micro_batches:
            with accelerator.accumulate(model):
                if global_loss:
                    loss, terms = loss_of(batch, state.step, global_counts)
                else:
                    loss, terms = loss_of(batch, state.step)
                accelerator.backward(loss)
                if accelerator.sync_gradients and recipe.optim.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, recipe.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in terms.items():  # global-batch terms add up; per-micro-batch means average
                window[key] = window.get(key, 0.0) + float(value.detach()) / (1 if weigh_globally else accumulation)
            state.next_batch = int(batch["batch_index"]) + 1
            state.samples += int(batch["num_samples"])
            state.skipped += int(batch["num_skipped"])
            window_samples += int(batch["num_samples"])
        if not getattr(optimizer, "step_was_skipped", False):  # an fp16 overflow skips the step, and the schedule too
            scheduler.step()  # once per optimizer step, whatever the number of processes or micro-batches
        if after_step is not None and accelerator.sync_gradients:
            after_step()
        state.step += 1
        window_steps += 1
        progress.update(1)
        last = state.step == train.max_steps
        if state.step % train.log_every == 0 or last:
            keys = sorted(window)
            local = torch.tensor([window[k] / window_steps for k in keys] + [window_samples, state.skipped])
            total = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
            losses = total if weigh_globally else total / world  # each process holds its share / its own mean
            seconds = time.perf_counter() - window_start
            metrics = {k: float(losses[i]) for i, k in enumerate(keys)}
            metrics |= {
                "lr": float(scheduler.get_last_lr()[0]),
                "samples_per_s": float(total[-2]) / seconds,
                "skipped": float(total[-1]),
                "step": float(state.step),
            }
            accelerator.log(metrics, step=state.step)
            state.history.append(metrics)
            shown: dict[str, object] = {k.removesuffix("_loss"): f"{metrics[k]:.4f}" for k in keys}
            shown |= {"lr": f"{metrics['lr']:.2e}", "sps": f"{metrics['samples_per_s']:.1f}"}
            progress.set_postfix(shown | {"skipped": int(metrics["skipped"])})
            window = {}
            window_steps, window_samples, window_start = 0, 0, time.perf_counter()
        if train.checkpoint_every and (state.step % train.checkpoint_every == 0) and not last:
            save_checkpoint(
                accelerator, run_dir, state, recipe.to_dict(), train.keep_checkpoints, extras=checkpoint_extras
            )
        if evaluate is not None and train.eval_every and (state.step % train.eval_every == 0 or last):
            model.eval()
            results = evaluate(state.step)
            model.train()
            if results:
                accelerator.log(results, step=state.step)
                state.history.append({**results, "step": float(state.step)})
    progress.close()
    return state


def evaluate_losses(
    accelerator: Accelerator, model: nn.Module, batches: Iterator[dict[str, Any]], num_batches: int
) -> dict[str, float]:
    """Held-out losses over `num_batches` batches of every process, weighted as training weighs a global batch:
    CE summed over all labelled tokens over their count, the visual term likewise over all visual targets; the
    total with the config's per-modality weights (the z-loss, a regulariser, is not part of it)."""
    sums = torch.zeros(4, dtype=torch.float64)  # CE sum, visual-loss sum, labelled tokens, visual targets
    with torch.no_grad():
        for _ in range(num_batches):
            batch = next(batches)
            out = model(**model_inputs(batch), num_items_in_batch=1, num_visual_items_in_batch=1, return_logits=False)
            counts = count_loss_items(batch["labels"], batch["visual_target_mask"])
            sums += torch.tensor([float(out.text_loss), float(out.visual_loss), *counts.tolist()], dtype=torch.float64)
    total = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    text, visual = float(total[0] / max(total[2], 1)), float(total[1] / max(total[3], 1))
    config = vpit_config(accelerator, model)
    loss = float(config.text_loss_weight) * text + float(config.visual_loss_weight) * visual
    return {"eval_loss": loss, "eval_text_loss": text, "eval_visual_loss": visual}


def vpit_config(accelerator: Accelerator, model: nn.Module) -> Any:
    """The VPiT config behind a prepared (DeepSpeed / DDP) and possibly peft-wrapped model."""
    unwrapped = accelerator.unwrap_model(model)
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    return base.config


def plot_loss_curve(history: list[dict[str, float]], path: Path) -> Path | None:
    """loss, text_loss and visual_loss against the step, as a PNG (matplotlib, no display needed)."""
    rows = [h for h in history if "loss" in h]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [h["step"] for h in rows]
    for key in [k for k in rows[-1] if k == "loss" or k.endswith("_loss") or k == "mse"]:
        ax.plot(steps, [h[key] for h in rows], label=key)
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o--", label="eval_loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["LOSS_KEYS", "evaluate_losses", "plot_loss_curve", "train_loop", "vpit_config"]
