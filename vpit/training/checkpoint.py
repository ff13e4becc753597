"""Resumable checkpoints: written atomically (a temporary folder, then one rename), rotated, found on restart.

A checkpoint folder `checkpoint-00000120/` holds accelerate's `save_state` output (model, optimizer, scheduler,
per-process RNG states, DeepSpeed engine state when in use), `trainer_state.json` (step, data position,
counters, metric history), `recipe.yaml` (the resolved recipe) and what a stage's extras write (the decoder's EMA
as safetensors: no object of a stage is serialised by torch.save). A run killed while writing leaves only a
`.tmp-checkpoint-*` folder, which is ignored and removed by the next save: the previous checkpoint stays usable.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml
from accelerate import Accelerator
from torch import nn
from torch.distributed.tensor import DTensor

STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"


@dataclass
class TrainerState:
    """What a resumed run needs besides the model and optimizer."""

    step: int = 0
    next_batch: int = 0  # data position: index of the next batch of this rank's stream
    samples: int = 0
    skipped: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class CheckpointExtra(Protocol):
    """State a stage keeps outside the prepared model / optimizer / scheduler, written into each checkpoint by the
    main process and read back on resume."""

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in run_dir.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    state: TrainerState,
    recipe: dict[str, Any],
    keep: int,
    extras: tuple[CheckpointExtra, ...] = (),
) -> Path:
    """Write a checkpoint for `state.step` on every process (DeepSpeed saves per-rank shards), then publish it
    with one rename on the main process and delete the oldest beyond `keep`."""
    final = run_dir / f"{PREFIX}{state.step:08d}"
    tmp = run_dir / f".tmp-{final.name}"
    if accelerator.is_main_process:
        for stale in run_dir.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        for extra in extras:
            extra.save(tmp)
        with (tmp / STATE_FILE).open("w") as handle:  # written last: its presence marks a complete checkpoint
            json.dump(asdict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def find_resume_point(run_dir: Path, resume: str | None) -> Path | None:
    """`auto`: the latest complete checkpoint in the run folder (None if there is none); a path: that one."""
    if resume is None:
        return None
    if resume == "auto":
        found = checkpoints(run_dir) if run_dir.exists() else []
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG states, and return the trainer state."""
    accelerator.load_state(str(path))
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def resume(
    accelerator: Accelerator, run_dir: Path, resume_from: str | None, extras: tuple[CheckpointExtra, ...] = ()
) -> TrainerState:
    """The state to start from: restored from the checkpoint `resume_from` points at (`auto`: the latest in the
    run folder), or a fresh one."""
    checkpoint = find_resume_point(run_dir, resume_from)
    if checkpoint is None:
        return TrainerState()
    state = load_checkpoint(accelerator, checkpoint)
    for extra in extras:
        extra.load(checkpoint)
    accelerator.print(f"[vpit] resumed from {checkpoint} at step {state.step}")
    return state


def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, Any]:
    """The whole model's weights for `save_pretrained`, gathered on every process from ZeRO-3 partitions or FSDP2
    shards (DTensors), on the CPU; every process must call it. Also for a model sharded with `fully_shard` outside
    an accelerate FSDP launch, whose `state_dict()` would hold each rank's shards."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return accelerator.get_state_dict(model)


__all__ = [
    "CheckpointExtra",
    "TrainerState",
    "checkpoints",
    "find_resume_point",
    "full_state_dict",
    "load_checkpoint",
    "resume",
    "save_checkpoint",
]
