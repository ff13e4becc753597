"""Two processes on CPU (gloo) under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2, launched with the shipped accelerate configs.

FSDP2: accelerate 1.15 enables FSDP on accelerator devices only, so on CPUs the probe shards the model with
accelerate's own FSDP2 preparation (`fsdp2_prepare_model`, settings from recipes/accelerate/fsdp2.yaml) under a gloo
process group; vpit's loop, evaluation, generation and final save run unchanged. A plain FSDP launch on CPUs fails
loudly (`check_launch`).

Shows: parameters / optimizer state are partitioned; each rank reads different samples; the loss and the learning
rate match a single-process run on the true global batch (warm-up + cosine, 2 micro-batches per step); text-only
and image batches mixed across ranks run 50 steps with periodic evaluation without hanging; the saved model loads
in a plain process (no DeepSpeed).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from conftest import free_port
from distributed_probe import OPTIM, training_mixture
from training_helpers import merge_batches

from vpit import VPiTForCausalLM
from vpit.training.components import build_batches, build_model, build_optimizer, build_scheduler
from vpit.training.config import recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
STEPS = 50
COMPARED_STEPS = 10
TOLERANCE = 1e-5  # fp32 on CPU; the only difference is the order of the cross-rank reductions

TEXT = [
    {"id": "t0", "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
    {"id": "t1", "messages": [{"role": "user", "content": "Shapes?"}, {"role": "assistant", "content": "circle"}]},
    {"id": "t2", "messages": [{"role": "user", "content": "A colour?"}, {"role": "assistant", "content": "red"}]},
]


@pytest.fixture(scope="module")
def text_card(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text-card")
    (folder / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEXT))
    (folder / "text.yaml").write_text(
        "name: text_only\ndescription: text-only chat\ntask: understanding\nformat: messages\n"
        "license: Apache-2.0\ncitation: none\nsource: {data_files: [text.jsonl]}\n"
    )
    return folder / "text.yaml"


CONFIGS = {
    "zero2": "recipes/accelerate/deepspeed_zero2.yaml",
    "zero3": "recipes/accelerate/deepspeed_zero3.yaml",
    "fsdp2": "recipes/accelerate/fsdp2.yaml",
}


def _launch(engine, out, tiny_llama, tiny_clip, text_card, model_extra=None, steps=STEPS):
    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        CONFIGS[engine],
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",  # fp32: the comparison with one process is to 1e-5
        "tests/distributed_probe.py",
        str(out),
        str(tiny_llama),
        str(tiny_clip),
        str(text_card),
        str(steps),
        *([json.dumps(model_extra)] if model_extra else []),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    # A hang (a module called on one rank only) would block both ranks: the bound fails it in minutes, not hours.
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _reference(tiny_llama, tiny_clip, text_card, tmp_path, model_extra=None, steps=STEPS):
    """One process, the true global batch: every step's 2 ranks x 2 micro-batches merged into one batch, its loss
    averaged over the batch's own labelled tokens and visual targets (no per-rank or per-micro-batch averages).
    Returns the losses of the first COMPARED_STEPS steps and the learning rate of every step."""
    recipe = recipe_from_dict(
        {
            "stage": "vpit",
            "model": {
                "llm": str(tiny_llama),
                "vision": f"local-dir:{tiny_clip}",
                "num_visual_tokens": 4,
                **(model_extra or {}),
            },
            "data": {
                "mixture": training_mixture(str(text_card), model_extra),
                "batch_size": 1,
                "num_workers": 0,
                "max_length": 128,
            },
            "optim": OPTIM,
            "train": {"output_dir": str(tmp_path / "ref"), "max_steps": steps},
            "tracking": {"report_to": []},
        }
    )
    set_seed(recipe.train.seed)
    model, processor = build_model(recipe)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe)
    streams = [iter(build_batches(recipe.data, processor, rank, 2, tmp_path / "ref")) for rank in (0, 1)]
    params = [p for p in model.parameters() if p.requires_grad]
    accumulation = OPTIM["gradient_accumulation_steps"]
    losses, lrs, uneven = [], [], 0
    model.train()
    for step in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        if step < COMPARED_STEPS:
            micro = [next(s) for s in streams for _ in range(accumulation)]  # rank 0's, then rank 1's
            counts = {(int((b["labels"] != -100).sum()), int(b["visual_target_mask"].sum())) for b in micro}
            uneven += len(counts) > 1
            loss = model(**merge_batches(micro, processor.tokenizer.pad_token_id)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, OPTIM["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        scheduler.step()
    if model_extra is None:
        assert uneven == COMPARED_STEPS  # every compared step splits unevenly: the weighting matters
    return losses, lrs


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_two_ranks(engine, tiny_llama, tiny_clip, text_card, tmp_path):
    ranks = _launch(engine, tmp_path / "out", tiny_llama, tiny_clip, text_card)
    r0, r1 = ranks
    assert (r0["world"], r1["world"]) == (2, 2) and (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["stage"] == engine
    # Partitioned: each rank holds half of the optimizer state (all three) and of the parameters (ZeRO-3, FSDP2:
    # FSDP2 splits each parameter's rows, so an odd row count leaves one rank a row more).
    for rank in ranks:
        half = rank["trainable_params"] / 2
        assert rank["local_optimizer_elements"] == pytest.approx(half, rel=0.01)
        if engine != "zero2":
            assert rank["local_params"] == pytest.approx(half, rel=0.01)
        else:
            assert rank["local_params"] == rank["trainable_params"]
    # Different samples on each rank, together exactly the single-process stream positions.
    accumulation = OPTIM["gradient_accumulation_steps"]
    positions = [{p for step in rank["seen"] for p in step["positions"]} for rank in ranks]
    assert not positions[0] & positions[1]
    assert positions[0] | positions[1] == set(range(2 * accumulation * STEPS))
    # 50 steps of 2 micro-batches, many with a text-only batch on one rank and images on the other: no hang.
    assert len(r0["seen"]) == len(r1["seen"]) == accumulation * STEPS
    mixed = sum((a["images"] == 0) != (b["images"] == 0) for a, b in zip(r0["seen"], r1["seen"], strict=True))
    assert mixed >= 20
    # The loss matches one process on the true global batch (2 ranks x 2 micro-batches, uneven token and target
    # counts), step after step: the gradients match too, or the later losses would drift apart.
    reference, lrs = _reference(tiny_llama, tiny_clip, text_card, tmp_path)
    for rank in ranks:
        logged = [h["loss"] for h in rank["history"][:COMPARED_STEPS]]
        assert logged == pytest.approx(reference, abs=TOLERANCE)
    # The learning rate at optimizer step s is one process's: warm-up ends at step 4, the cosine reaches 0 at the end.
    logged_lrs = [h["lr"] for h in r0["history"] if "lr" in h]
    assert logged_lrs == pytest.approx([*lrs[1:], 0.0], abs=1e-12)  # logged after the step's scheduler step
    assert max(logged_lrs) == pytest.approx(OPTIM["lr"]) and logged_lrs.index(max(logged_lrs)) == 3
    # Periodic evaluation under ZeRO-3 and FSDP2 as under ZeRO-2, on held-out batches that differ across ranks: every rank ran
    # it at the same steps (a module called on one rank only would have hung the run) and logged the same figures.
    evals = [[h for h in rank["history"] if "eval_loss" in h] for rank in ranks]
    assert [h["step"] for h in evals[0]] == [h["step"] for h in evals[1]] == [25.0, 50.0]
    for a, b in zip(*evals, strict=True):
        assert a == pytest.approx(b) and a["eval_loss"] > 0 and "eval_answer_accuracy" in a
    # The gathered final model is a plain folder (no DeepSpeed or FSDP shards) that loads without either.
    final = tmp_path / "out" / "run" / "final"
    names = {p.name for p in final.iterdir()}
    assert "model.safetensors" in names
    assert not [n for n in names if n.startswith(("global_step", "zero_to_fp32", "latest"))]
    loaded = VPiTForCausalLM.from_pretrained(final)
    set_seed(0)
    start, _ = build_model(
        recipe_from_dict(
            {
                "stage": "vpit",
                "model": {"llm": str(tiny_llama), "vision": f"local-dir:{tiny_clip}", "num_visual_tokens": 4},
                "data": {"mixture": [{"card": str(text_card)}]},
                "tracking": {"report_to": []},
            }
        )
    )
    moved = [not torch.equal(a, b) for a, b in zip(loaded.bridge.parameters(), start.bridge.parameters(), strict=True)]
    assert all(moved)


@pytest.mark.multiprocess
def test_fsdp_launch_on_cpus_fails_loudly(tiny_llama, tiny_clip, tmp_path):
    """The shipped FSDP2 config launched as users launch it, on CPUs: accelerate 1.15 sets FSDP up on accelerator
    devices only and would hand each process a plain single-device accelerator (each process training its own
    unsharded copy, all writing the final model). Both processes stop at once, naming the way out; nothing is written."""
    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        CONFIGS["fsdp2"],
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "-m",
        "vpit.train",
        "recipes/toy/vpit.yaml",
        "model.pretrained=null",
        f"model.llm={tiny_llama}",
        f"model.vision=local-dir:{tiny_clip}",
        "data.use_sample=true",
        f"train.output_dir={tmp_path / 'run'}",
        "tracking.report_to=[]",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "an FSDP launch config, but accelerate set up NO" in result.stderr
    assert "deepspeed_zero3.yaml" in result.stderr
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_two_ranks_with_a_resampler_and_bidirectional_image_attention(
    engine, tiny_llama, tiny_clip, text_card, tmp_path
):
    """ZeRO-3 and FSDP2 with a Perceiver bridge, its token-wise twin and bidirectional prompt-image attention, on a mixture
    where prompt images reach the resampler on one rank while the other holds text or a response image: no hang,
    and the loss equals one process on the true global batch step after step (the resampler's gradients included,
    or the later losses would drift apart)."""
    extra = {
        "bridge": "perceiver",
        "bridge_options": {"width": 32, "depth": 1, "heads": 4},
        "image_attention": "bidirectional",
    }
    steps = COMPARED_STEPS
    ranks = _launch(engine, tmp_path / "out", tiny_llama, tiny_clip, text_card, extra, steps)
    assert all(len(rank["seen"]) == OPTIM["gradient_accumulation_steps"] * steps for rank in ranks)
    reference, _ = _reference(tiny_llama, tiny_clip, text_card, tmp_path, extra, steps)
    for rank in ranks:
        assert [h["loss"] for h in rank["history"][:steps]] == pytest.approx(reference, abs=TOLERANCE)
    loaded = VPiTForCausalLM.from_pretrained(tmp_path / "out" / "run" / "final")
    assert loaded.config.bridge == "perceiver" and loaded.config.image_attention == "bidirectional"
