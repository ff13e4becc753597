"""One rank of `benchmarks.zero3_memory`: train a VPiT model a few steps under DeepSpeed ZeRO-3, then write the
bytes this rank holds for parameters, gradients and optimizer state to OUT/rank{i}.json.

    accelerate launch --config_file recipes/accelerate/deepspeed_zero3.yaml --num_processes N \\
        benchmarks/zero3_probe.py OUT LLM CLIP STEPS CARD [CARD ...]

The model, optimizer and data come from vpit's recipe builders (`vpit.training.components`), as `vpit train`
builds them. Bytes are counted per storage, each storage once (DeepSpeed keeps partitions as views of flat
buffers, and with fp32 weights the optimizer's master partition is the parameter partition itself):
- parameters: every parameter's partition (`ds_tensor`), plus any full copy still resident (`ds_persist`
  parameters below the persistence threshold, which ZeRO-3 keeps whole on every rank);
- master weights: the optimizer's fp32 partitions (no extra bytes when the parameters are fp32);
- gradients: the partitioned gradient buffer, the fp32 partitions' `.grad`, any `param.grad`, and the
  reduce bucket (a fixed-size buffer, not partitioned);
- optimizer state: every tensor in the wrapped AdamW's state (exp_avg, exp_avg_sq, step).
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from vpit.data.collator import model_inputs
from vpit.training.components import build_accelerator, build_batches, build_model, build_optimizer
from vpit.training.config import recipe_from_dict


class StorageLedger:
    """Bytes by category, each underlying storage counted once (in the first category that claims it)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def add(self, category: str, tensors: Iterable[torch.Tensor | None]) -> None:
        total = self.bytes.setdefault(category, 0)
        for tensor in tensors:
            if tensor is None or tensor.numel() == 0:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() in self.seen:
                continue
            self.seen.add(storage.data_ptr())
            total += storage.nbytes()
        self.bytes[category] = total


def main(out: Path, llm: str, clip: str, steps: int, cards: list[str]) -> None:
    recipe = recipe_from_dict(
        {
            "stage": "vpit",
            "model": {"llm": llm, "vision": f"local-dir:{clip}", "num_visual_tokens": 16},
            "data": {
                "mixture": [{"card": card, "weight": 1.0} for card in cards],
                "batch_size": 2,
                "num_workers": 0,
                "max_length": 256,
            },
            "optim": {"lr": 1e-4, "warmup_steps": 0, "schedule": "constant", "max_grad_norm": 1.0},
            "train": {"output_dir": str(out / "run"), "max_steps": steps},
            "tracking": {"report_to": []},
        }
    )
    accelerator = build_accelerator(recipe)
    Path(recipe.train.output_dir).mkdir(parents=True, exist_ok=True)
    set_seed(recipe.train.seed)
    model, processor = build_model(recipe)
    optimizer = build_optimizer(model, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = build_batches(
        recipe.data, processor, accelerator.process_index, accelerator.num_processes, Path(recipe.train.output_dir)
    )
    model.train()
    losses = []
    for batch in itertools.islice(loader, steps):
        loss = model(**model_inputs(batch)).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))

    engine: Any = model  # a DeepSpeedEngine
    zero: Any = engine.optimizer  # DeepSpeedZeroOptimizer_Stage3
    assert engine.zero_optimization_stage() == 3
    params = list(engine.module.parameters())
    ledger = StorageLedger()
    ledger.add("parameters", [p.ds_tensor for p in params])
    ledger.add("parameters", [p.data for p in params])  # resident full copies (persistent parameters)
    ledger.add("master_weights", zero.fp32_partitioned_groups_flat)
    buckets = [getattr(bucket, "buffer", None) for bucket in getattr(zero, "ipg_buckets", {}).values()]
    ledger.add("gradients", [zero.grad_partitions_flat_buffer])
    ledger.add("gradients", [g.grad for g in zero.fp32_partitioned_groups_flat])
    ledger.add("gradients", [p.grad for p in params])
    ledger.add("gradient_reduce_bucket", buckets)
    state = [v for s in zero.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    ledger.add("optimizer_state", state)
    trainable = [p for p in params if p.requires_grad]
    report = {
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "stage": engine.zero_optimization_stage(),
        "parameters": sum(p.ds_numel for p in params),
        "trainable_parameters": sum(p.ds_numel for p in trainable),
        "persistent_parameters": sum(p.ds_numel for p in params if p.ds_persist),
        "local_partition_elements": sum(p.ds_tensor.numel() for p in params),
        "bytes": ledger.bytes,
        "total_bytes": sum(ledger.bytes.values()),
        "losses": losses,
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, llm_dir, clip_dir, num_steps, *card_files = sys.argv[1:]
    main(Path(out_dir), llm_dir, clip_dir, int(num_steps), card_files)
