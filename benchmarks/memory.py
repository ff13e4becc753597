"""Peak memory of a training step at a real vocabulary size (128k, Llama 3's): VPiT vs LLaVA, and the loss head.

    python -m benchmarks.memory [--vocab 128256] [--out benchmarks/results/memory.json]

Each measure runs in a fresh process (`--side NAME`), so that one side's freed memory never serves the other. The
figure is the growth of the process's resident memory during one forward + backward over its resident memory just
before it (a thread samples /proc/self/statm every 0.2 ms), the optimizer step left out (its state is the same on
both sides but for VPiT's small visual head). Sides:

- `vpit`: `benchmarks.training_step`'s VPiT (Llama of 2 layers, hidden 512, CLIP ViT-B/16, K = 196) with a
  128k vocabulary, batch 4 x 256, trained as vpit's loop trains it (`return_logits=False`: the LM head runs only at
  positions a label follows, the CE upcasts a chunk of rows at a time);
- `vpit_full_logits`: the same with `return_logits=True` (every position's logits, as before this benchmark);
- `llava`: transformers' `LlavaForConditionalGeneration` with the same parts and batch shape;
- `loss_vpit` / `loss_hf`: the text loss alone, forward + backward on (4, 256, V) bf16 logits: `vpit.model.losses
  .text_loss` vs transformers' `ForCausalLMLoss` (what `LlamaForCausalLM` and LLaVA use), which upcasts the whole
  logits to fp32.

Goals: VPiT <= 1.05x LLaVA; VPiT's loss head <= HF's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .common import describe_machine, write_json

PAGE = os.sysconf("SC_PAGE_SIZE")
SIDES = ("vpit", "vpit_full_logits", "llava", "loss_vpit", "loss_hf")


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakRSS:
    """Samples the resident set size on a thread; `peak - start` is the growth over the block."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.0002)

    def __exit__(self, *exc: object) -> None:
        self.peak = max(self.peak, _rss())
        self._stop.set()
        self._thread.join()


def measure(side: str, vocab: int) -> int:
    """Bytes the resident memory grows by during one forward + backward of `side`."""
    from . import training_step as ts

    torch.manual_seed(0)
    torch.set_num_threads(1)
    ts.VOCAB = vocab
    ts.TEXT_IDS = (400, vocab)
    if side.startswith("loss"):
        from transformers.loss.loss_utils import ForCausalLMLoss

        from vpit.model.losses import text_loss

        logits = torch.randn(ts.BATCH, ts.ROW, vocab, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, vocab, (ts.BATCH, ts.ROW))
        labels[:, : ts.ROW // 2] = -100
        with PeakRSS() as peak:
            if side == "loss_vpit":
                loss = text_loss(logits, labels)
            else:
                loss = ForCausalLMLoss(logits, labels, vocab_size=vocab)
            loss.backward()
        return peak.peak - peak.start

    original = ts.llama_config

    def small_llama() -> Any:
        config = original()
        config.num_hidden_layers = 2
        return config

    ts.llama_config = small_llama
    pixels = torch.randn(ts.BATCH, 3, 224, 224)
    with tempfile.TemporaryDirectory() as folder:
        if side.startswith("vpit"):
            model: Any = ts.build_vpit(Path(folder))
            batch = ts.vpit_batch(model, pixels)
            extra = {"return_logits": side == "vpit_full_logits"}
        else:
            model = ts.build_llava(image_token_id=vocab - 1)
            batch = ts.llava_batch(vocab - 1, pixels)
            extra = {}
        model.train()
        with PeakRSS() as peak:
            model(**batch, **extra).loss.backward()
    return peak.peak - peak.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--side", choices=SIDES, help="measure one side in this process and print its bytes")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    if args.side:
        print(json.dumps({"side": args.side, "bytes": measure(args.side, args.vocab)}))
        return
    figures = {}
    for side in SIDES:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", "--side", side, "--vocab", str(args.vocab)],
            capture_output=True,
            text=True,
            check=True,
        )
        figures[side] = json.loads(result.stdout.strip().splitlines()[-1])["bytes"]
    ratio = figures["vpit"] / figures["llava"]
    loss_ratio = figures["loss_vpit"] / figures["loss_hf"]
    print(f"{'side':<18} {'peak growth (MB)':>18}")
    for side, value in figures.items():
        print(f"{side:<18} {value / 2**20:>18.0f}")
    print(f"VPiT / LLaVA training step: {ratio:.3f}x (goal <= 1.05x); loss head VPiT / HF: {loss_ratio:.3f}x")
    write_json(
        args.out,
        {
            "machine": describe_machine(),
            "vocab": args.vocab,
            "bytes": figures,
            "vpit_vs_llava": ratio,
            "vpit_full_logits_vs_llava": figures["vpit_full_logits"] / figures["llava"],
            "loss_vpit_vs_hf": loss_ratio,
        },
    )


if __name__ == "__main__":
    main()
