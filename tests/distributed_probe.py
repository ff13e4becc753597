"""Run under `accelerate launch --num_processes 2` with a DeepSpeed config: trains the VPiT recipe components for
N steps on a mixture where each rank often holds a text-only batch while the other holds images, then writes
what each rank saw to OUT/rank{i}.json and the final model to OUT/run/final.

    accelerate launch --config_file recipes/accelerate/deepspeed_zero3.yaml --num_processes 2 \\
        tests/distributed_probe.py OUT LLM CLIP TEXT_CARD STEPS
"""

import json
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed

from vpit.training.checkpoint import TrainerState
from vpit.training.components import build_accelerator, build_batches, build_model, build_optimizer, build_scheduler
from vpit.training.config import recipe_from_dict
from vpit.training.loop import finish, train_loop


def main(out: Path, llm: str, clip: str, text_card: str, steps: int) -> None:
    recipe = recipe_from_dict(
        {
            "stage": "vpit",
            "model": {"llm": llm, "vision": f"local-dir:{clip}", "num_visual_tokens": 4},
            "data": {
                "mixture": [
                    {"card": text_card, "weight": 1.0},
                    {"card": "data_cards/toy_generation.yaml", "weight": 1.0},
                ],
                "batch_size": 1,
                "num_workers": 0,
                "max_length": 128,
            },
            "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant", "max_grad_norm": 1.0},
            "train": {"output_dir": str(out / "run"), "max_steps": steps, "log_every": 1, "checkpoint_every": 0},
            "tracking": {"report_to": []},
        }
    )
    accelerator = build_accelerator(recipe)
    set_seed(recipe.train.seed)
    model, processor = build_model(recipe)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # What ZeRO did to the parameters and optimizer state on this rank.
    engine = model
    stage = engine.zero_optimization_stage()
    params = [p for p in engine.module.parameters() if p.requires_grad]
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    if stage == 3:
        local_params = sum(p.ds_tensor.numel() for p in params)
    else:
        local_params = sum(p.numel() for p in params)
    zero_optimizer = engine.optimizer
    partitions = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
    if partitions is None:  # ZeRO-3
        partitions = zero_optimizer.fp32_partitioned_groups_flat
    local_optimizer = sum(p.numel() for p in partitions)

    loader, _ = build_batches(
        recipe.data, processor, accelerator.process_index, accelerator.num_processes, Path(recipe.train.output_dir)
    )
    seen = []

    def recording():
        for batch in loader:
            slot = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
            seen.append(
                {
                    "batch_index": int(batch["batch_index"]),
                    "positions": batch["positions"],
                    "images": int((batch["input_ids"] == slot).sum()) // 4,
                }
            )
            yield batch

    state = train_loop(
        accelerator, model, recording(), optimizer, scheduler, recipe, Path(recipe.train.output_dir), TrainerState()
    )
    finish(accelerator, model, processor, recipe, Path(recipe.train.output_dir), state)
    report = {
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "stage": stage,
        "trainable_params": total,
        "local_params": local_params,
        "local_optimizer_elements": local_optimizer,
        "seen": seen,
        "history": state.history,
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, llm, clip, text_card, steps = sys.argv[1:6]
    main(Path(out), llm, clip, text_card, int(steps))
