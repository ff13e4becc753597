"""Running `python -m vpit.train` in a subprocess on tiny backbones, as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def toy_overrides(llm: Path, clip: Path, out: Path, **extra: object) -> list[str]:
    """Overrides that point the toy vpit recipe at tiny backbones and keep it fast and deterministic."""
    values = {
        "model.pretrained": "null",
        "model.llm": str(llm),
        "model.vision": f"local-dir:{clip}",
        "model.num_visual_tokens": 4,
        "train.output_dir": str(out),
        "train.log_every": 1,
        "train.checkpoint_every": 4,
        "train.keep_checkpoints": 5,
        "data.batch_size": 2,
        "data.num_workers": 0,
        "optim.warmup_steps": 2,
        "tracking.report_to": "[]",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def train_command(recipe: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "vpit.train", str(ROOT / recipe), *overrides]


def run_training(recipe: str, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        train_command(recipe, overrides), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


_KILL_AT_PUBLISH = """
import os, signal, sys
import vpit.training.checkpoint as checkpoint
real_replace = os.replace
def replace(src, dst):
    if str(dst).endswith(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)  # its files are written, it is not yet published
    real_replace(src, dst)
checkpoint.os.replace = replace
from vpit.train import main
main(sys.argv[2:])
"""


def run_killed_at_publish(recipe: str, overrides: list[str], checkpoint_name: str) -> None:
    """Run a recipe that SIGKILLs itself while publishing `checkpoint_name` (a kill during a checkpoint write)."""
    result = subprocess.run(
        [sys.executable, "-c", _KILL_AT_PUBLISH, checkpoint_name, str(ROOT / recipe), *overrides],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-4000:]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
