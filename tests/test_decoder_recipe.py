"""The `decoder` stage through `python -m vpit.train`: the loss falls, reconstruction grids are written, the final
folder loads with DiffusionPipeline.from_pretrained, and a resumed run reproduces the uninterrupted loss curve."""

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from training_helpers import history, run_killed_at_publish, run_training

import vpit


def _overrides(tiny_clip, out, **extra):
    values = {
        "model.pretrained": "null",
        "model.vision": f"local-dir:{tiny_clip}",
        "model.num_visual_tokens": 4,
        "train.output_dir": str(out),
        "train.log_every": 1,
        "train.checkpoint_every": 5,
        "train.eval_every": 0,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "data.use_sample": "true",
        "decoder.vae": "null",  # a random toy VAE: the trained one is built by `make demo`
        "optim.warmup_steps": 2,
        "tracking.report_to": "[]",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_decoder_stage_trains_and_saves_a_loadable_pipeline(tiny_clip, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "decoder"
    extra = {"train.max_steps": 30, "train.eval_every": 30, "tracking.report_to": "[tensorboard]"}
    run_training("recipes/toy/decoder.yaml", _overrides(tiny_clip, out, **extra))
    # The reconstruction grid reaches TensorBoard as an image, next to the scalars.
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert "reconstructions" in events.Tags()["images"] and events.Tags()["scalars"]
    rows = [r for r in history(out) if "loss" in r]
    first, last = (sum(r["loss"] for r in rows[i : i + 5]) / 5 for i in (0, len(rows) - 5))
    assert last < 0.7 * first, (first, last)
    grid = Image.open(out / "eval" / "reconstructions-00000030.png")
    assert grid.size == (4 * 32, 2 * 32)  # inputs in the first row, reconstructions in the second
    pipe = DiffusionPipeline.from_pretrained(out / "final")
    assert type(pipe) is vpit.VPiTDecoderPipeline
    image = pipe(image=[Image.new("RGB", (32, 32), (220, 40, 40))], num_inference_steps=2).images[0]
    assert image.size == (32, 32)


@pytest.mark.slow
def test_decoder_resume_reproduces_the_loss_curve(tiny_clip, tmp_path):
    straight = tmp_path / "straight"
    run_training("recipes/toy/decoder.yaml", _overrides(tiny_clip, straight, **{"train.max_steps": 12}))
    resumed = tmp_path / "resumed"
    overrides = _overrides(tiny_clip, resumed, **{"train.max_steps": 12})
    run_killed_at_publish("recipes/toy/decoder.yaml", overrides, "checkpoint-00000010")
    run_training("recipes/toy/decoder.yaml", overrides)  # resumes from checkpoint-00000005
    a, b = history(straight), history(resumed)
    assert [r["step"] for r in b] == list(range(1, 13))
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5, (x["step"], x["loss"], y["loss"])
    # The EMA resumed exactly too (the final folder holds the EMA weights), from safetensors, nothing pickled.
    checkpoint = resumed / "checkpoint-00000005"
    assert (checkpoint / "ema.safetensors").is_file() and (checkpoint / "ema.json").is_file()
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    for part in ("unet", "projector"):
        x = load_file(str(straight / "final" / part / "diffusion_pytorch_model.safetensors"))
        y = load_file(str(resumed / "final" / part / "diffusion_pytorch_model.safetensors"))
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-6)
