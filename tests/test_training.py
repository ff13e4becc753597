"""Training through the recipes on tiny backbones: both stages, LoRA, exact resume after SIGKILL, and a kill
during a checkpoint write."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from training_helpers import (
    ROOT,
    history,
    merge_batches,
    run_killed_at_publish,
    run_training,
    toy_overrides,
    train_command,
)

from vpit import VPiTForCausalLM
from vpit.training.checkpoint import checkpoints, find_resume_point


@pytest.fixture
def fresh_accelerator():
    """accelerate keeps one state per process; tests that build Accelerators in-process start and end clean."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bridge_then_vpit_stage(tiny_llama, tiny_clip, tmp_path):
    bridge = tmp_path / "bridge"
    run_training(
        "recipes/toy/bridge.yaml",
        toy_overrides(
            tiny_llama, tiny_clip, bridge, **{"train.max_steps": 8, "optim.lr": 0.01, "model.pretrained": "null"}
        ),
    )
    rows = history(bridge)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["text_loss"] < rows[0]["text_loss"]  # the bridge and image-token rows learn
    assert all(r["visual_loss"] == 0 for r in rows)  # understanding data only
    final = bridge / "final"
    for name in ("config.json", "model.safetensors", "processor_config.json", "recipe.yaml", "README.md"):
        assert (final / name).is_file(), name
    assert (bridge / "loss_curve.png").stat().st_size > 1000
    summary = json.loads((bridge / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["samples"] == 16 and summary["skipped"] == 0
    # A frozen LLM stays exactly as it was, except the image-token rows.
    assert not (bridge / "base").exists()  # a LoRA base is saved only for LoRA runs
    trained = VPiTForCausalLM.from_pretrained(final)
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    layer = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(trained.language_model.state_dict()[layer], original.state_dict()[layer])
    old = original.get_input_embeddings().weight.shape[0]
    emb = trained.get_input_embeddings().weight
    assert torch.equal(emb[:old], original.get_input_embeddings().weight)
    mean = original.get_input_embeddings().weight.mean(dim=0)
    assert not torch.allclose(emb[old:], mean.expand(3, -1), atol=1e-6)  # the new rows moved off their mean

    vpit = tmp_path / "vpit"
    run_training(
        "recipes/toy/vpit.yaml",
        toy_overrides(
            tiny_llama, tiny_clip, vpit, **{"model.pretrained": str(final), "model.llm": "null", "train.max_steps": 6}
        ),
    )
    rows = history(vpit)
    assert any(r["visual_loss"] > 0 for r in rows)  # generation data trains the head
    assert VPiTForCausalLM.from_pretrained(vpit / "final").config.num_visual_tokens == 4


def test_lora_run_saves_adapter_and_merged_model(tiny_llama, tiny_clip, tmp_path):
    out = tmp_path / "lora"
    run_training(
        "recipes/toy/vpit.yaml",
        toy_overrides(tiny_llama, tiny_clip, out, **{"lora.enabled": "true", "lora.r": 4, "train.max_steps": 4}),
    )
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "base" / "config.json").is_file()
    merged = VPiTForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def _uninterrupted(tiny_llama, tiny_clip, tmp_path, steps):
    run_dir = tmp_path / "straight"
    run_training("recipes/toy/vpit.yaml", toy_overrides(tiny_llama, tiny_clip, run_dir, **{"train.max_steps": steps}))
    return history(run_dir)


def _assert_same_curve(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "text_loss", "visual_loss", "lr"):
            assert abs(x[key] - y[key]) <= 1e-5, (x["step"], key, x[key], y[key])


@pytest.mark.slow
def test_sigkill_and_resume_reproduce_the_loss_curve(tiny_llama, tiny_clip, tmp_path):
    steps = 40
    reference = _uninterrupted(tiny_llama, tiny_clip, tmp_path, steps)
    run_dir = tmp_path / "killed"
    overrides = toy_overrides(tiny_llama, tiny_clip, run_dir, **{"train.max_steps": steps})
    process = subprocess.Popen(
        train_command("recipes/toy/vpit.yaml", overrides),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint-00000008" / "trainer_state.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (run_dir / "final").exists()
    resumed_from = find_resume_point(run_dir, "auto")
    assert resumed_from is not None and int(resumed_from.name.split("-")[1]) >= 8
    run_training("recipes/toy/vpit.yaml", overrides)
    _assert_same_curve(history(run_dir), reference)


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_previous_one_usable(tiny_llama, tiny_clip, tmp_path):
    steps = 12
    reference = _uninterrupted(tiny_llama, tiny_clip, tmp_path, steps)
    run_dir = tmp_path / "torn"
    overrides = toy_overrides(tiny_llama, tiny_clip, run_dir, **{"train.max_steps": steps})
    run_killed_at_publish("recipes/toy/vpit.yaml", overrides, "checkpoint-00000008")
    assert (run_dir / ".tmp-checkpoint-00000008").is_dir()  # the half-published write
    assert [p.name for p in checkpoints(run_dir)] == ["checkpoint-00000004"]
    run_training("recipes/toy/vpit.yaml", overrides)
    assert not list(run_dir.glob(".tmp-*"))  # cleaned by the next save
    _assert_same_curve(history(run_dir), reference)
    assert os.path.isdir(run_dir / "final")


def test_periodic_evaluation_logs_losses_accuracy_and_image_grids(tiny_llama, tiny_clip, tmp_path):
    from vpit import VPiTDecoderPipeline, VPiTVisionConfig, VPiTVisionEncoderModel
    from vpit.toy.decoder import toy_decoder_components

    encoder = VPiTVisionEncoderModel.from_spec(VPiTVisionConfig(model_name=f"local-dir:{tiny_clip}"), 4)
    decoder = VPiTDecoderPipeline(**toy_decoder_components(encoder.hidden_size, 4), vision_encoder=encoder)
    decoder.save_pretrained(tmp_path / "decoder")
    out = tmp_path / "eval-run"
    run_training(
        "recipes/toy/vpit.yaml",
        toy_overrides(
            tiny_llama,
            tiny_clip,
            out,
            **{
                "train.max_steps": 4,
                "train.eval_every": 2,
                "train.eval_samples": 4,
                "train.eval_decoder": str(tmp_path / "decoder"),
                "data.eval_mixture": "[{card: data_cards/toy_understanding.yaml}, {card: data_cards/toy_generation.yaml}]",
            },
        ),
    )
    evals = [r for r in history(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2.0, 4.0]
    for row in evals:
        assert 0.0 <= row["eval_answer_accuracy"] <= 1.0
        assert row["eval_loss"] > 0
    grid = Image.open(out / "eval" / "step-00000004.png")
    assert grid.size == (4 * 32, 2 * 32)  # 8 generation prompts of the toy card sample, 4 per row


def test_accumulated_micro_batches_weigh_like_one_global_batch(fresh_accelerator, tiny_llama, tiny_clip, tmp_path):
    """One process, 2 micro-batches with different labelled-token and visual-target counts: the accumulated gradient
    is the gradient of the loss of the merged global batch (SGD with lr 1 makes the update the gradient itself)."""
    import copy

    from vpit.training.checkpoint import TrainerState
    from vpit.training.components import build_accelerator, build_batches, build_model
    from vpit.training.config import recipe_from_dict
    from vpit.training.loop import train_loop

    recipe = recipe_from_dict(
        {
            "stage": "vpit",
            "model": {"llm": str(tiny_llama), "vision": f"local-dir:{tiny_clip}", "num_visual_tokens": 4},
            "data": {
                "mixture": [{"card": "data_cards/toy_understanding.yaml"}, {"card": "data_cards/toy_generation.yaml"}],
                "use_sample": True,
                "batch_size": 2,
                "num_workers": 0,
            },
            "optim": {"gradient_accumulation_steps": 2, "max_grad_norm": None, "schedule": "constant"},
            "train": {"output_dir": str(tmp_path), "max_steps": 1, "log_every": 1, "checkpoint_every": 0},
            "tracking": {"report_to": []},
        }
    )
    accelerator = build_accelerator(recipe)
    torch.manual_seed(0)
    model, processor = build_model(recipe)
    stream = iter(build_batches(recipe.data, processor, 0, 1, tmp_path / "data"))
    micro = [next(stream), next(stream)]
    counts = [(int((b["labels"] != -100).sum()), int(b["visual_target_mask"].sum())) for b in micro]
    assert counts[0] != counts[1]  # uneven: averaging the two micro-batch losses would weigh them wrongly

    reference = copy.deepcopy(model)
    global_loss = reference(**merge_batches(micro, processor.tokenizer.pad_token_id)).loss
    global_loss.backward()

    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = train_loop(accelerator, model, iter(micro), optimizer, scheduler, recipe, tmp_path, TrainerState())

    assert state.history[0]["loss"] == pytest.approx(float(global_loss), abs=1e-5)
    reference_params = [p for p in reference.parameters() if p.requires_grad]
    for start, after, ref in zip(before, params, reference_params, strict=True):
        torch.testing.assert_close(start - after.detach(), ref.grad, rtol=1e-4, atol=1e-6)


def test_bf16_mixed_precision_autocasts_the_forward_and_keeps_fp32_weights(
    fresh_accelerator, tiny_llama, tiny_clip, tmp_path
):
    """train.mixed_precision: bf16 (CPU autocast here): the LLM computes in bf16, the weights and the optimizer stay
    fp32, the losses are fp32 and close to the fp32 run's."""
    from vpit.data.collator import model_inputs
    from vpit.training.components import build_accelerator, build_batches, build_model
    from vpit.training.config import recipe_from_dict

    def recipe(precision):
        return recipe_from_dict(
            {
                "stage": "vpit",
                "model": {"llm": str(tiny_llama), "vision": f"local-dir:{tiny_clip}", "num_visual_tokens": 4},
                "data": {"mixture": [{"card": "data_cards/toy_generation.yaml"}], "use_sample": True, "num_workers": 0},
                "train": {"output_dir": str(tmp_path), "mixed_precision": precision},
                "tracking": {"report_to": []},
            }
        )

    losses = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process, as accelerate has it
        accelerator = build_accelerator(recipe(precision))
        torch.manual_seed(0)
        model, processor = build_model(recipe(precision))
        batch = model_inputs(next(iter(build_batches(recipe(precision).data, processor, 0, 1, tmp_path / "d"))))
        prepared = accelerator.prepare(model)
        out = prepared(**batch)
        out.loss.backward()
        assert out.loss.dtype == torch.float32 and out.visual_loss > 0
        # accelerate hands outputs back in fp32; computed in bf16, the logits are bf16 values
        in_bf16 = bool((out.logits == out.logits.bfloat16().float()).all())
        assert out.logits.dtype == torch.float32 and in_bf16 == (precision == "bf16")
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
        losses[precision] = float(out.loss)
        accelerator.free_memory()
    AcceleratorState._reset_state(reset_partial_state=True)
    assert losses["bf16"] == pytest.approx(losses["no"], rel=2e-2)
    assert losses["bf16"] != losses["no"]  # autocast really ran


def test_bridge_stage_changes_no_llm_weight_and_keeps_state_only_for_trained_rows(
    fresh_accelerator, tiny_llama, tiny_clip, tmp_path
):
    """Frozen means frozen: with weight decay on, 3 bridge-stage steps change the bridge and the image tokens' rows of
    the embedding and the untied LM head, and nothing else (the LLM, the visual head); the optimizer holds state for
    those only."""
    from transformers import AutoModelForCausalLM

    from vpit.model.lora import merge_lora
    from vpit.training.checkpoint import TrainerState
    from vpit.training.components import build_accelerator, build_batches, build_model, build_optimizer, build_scheduler
    from vpit.training.config import recipe_from_dict
    from vpit.training.loop import train_loop

    recipe = recipe_from_dict(
        {
            "stage": "bridge",
            "model": {"llm": str(tiny_llama), "vision": f"local-dir:{tiny_clip}", "num_visual_tokens": 4},
            "freeze": {"llm": True, "visual_head": True},
            "data": {"mixture": [{"card": "data_cards/toy_understanding.yaml"}], "use_sample": True, "num_workers": 0},
            "optim": {"lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 1},
            "train": {"output_dir": str(tmp_path), "max_steps": 3, "checkpoint_every": 0},
            "tracking": {"report_to": []},
        }
    )
    accelerator = build_accelerator(recipe)
    model, processor = build_model(recipe)
    start = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    optimizer, scheduler = build_optimizer(model, recipe), None
    scheduler = build_scheduler(optimizer, recipe)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    batches = iter(build_batches(recipe.data, processor, 0, 1, tmp_path / "data"))
    train_loop(accelerator, model, batches, optimizer, scheduler, recipe, tmp_path, TrainerState())

    base = model.get_base_model()
    hidden = base.config.get_text_config().hidden_size
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    rows = sum(v for n, v in trained.items() if "trainable_tokens" in n)
    assert rows == 2 * 3 * hidden  # 3 image-token rows of the embedding and of the LM head, nothing more of them
    adapters = sum(p.numel() for p in base.bridge.parameters())
    assert sum(trained.values()) == adapters + rows
    state = sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim)
    assert state == 2 * (adapters + rows)  # Adam's two moments, for the trained parameters only

    merged = merge_lora(accelerator.unwrap_model(model))
    after = merged.state_dict()
    original_llm = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    rows = sorted(set(merged.image_token_ids()))
    changed = []
    for key, before in start.items():
        key = key.replace(".base_layer", "")
        if key not in after:
            continue
        now = after[key]
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            keep = torch.ones(now.shape[0], dtype=torch.bool)
            keep[rows] = False
            assert torch.equal(now[keep], before[keep]), key  # every old row exactly as it was
            assert not torch.equal(now[rows], before[rows]), key  # the image rows learnt
            old = original_llm[key.removeprefix("language_model.")]
            assert torch.equal(now[: old.shape[0]], old)
        elif not torch.equal(now, before):
            changed.append(key)
    assert changed and all(key.startswith("bridge.") for key in changed), changed
