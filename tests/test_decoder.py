"""The diffusion autoencoder: projector, pipeline (CFG, save / load, encode -> reconstruct, SD initialisation),
training loss and its options, EMA, validation grid. Tiny models from configs, seeded; numbers asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_snr
from PIL import Image, ImageDraw

from vpit.decoder import VPiTDecoderPipeline, VPiTDecoderProjector, VPiTVisionEncoderModel
from vpit.hub import write_model_card
from vpit.model.configuration_vpit import VPiTVisionConfig
from vpit.toy.decoder import save_tiny_stable_diffusion, toy_decoder_components
from vpit.training.diffusion import (
    create_decoder_ema,
    decoder_loss,
    decoder_schedulers,
    decoder_trainable_parameters,
    encode_latents,
    validation_reconstructions,
)

DV, K = 48, 4  # the tiny open_clip ViT's width; 2 x 2 pooled tokens
COLOURS = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 200, 40), (140, 60, 180), (240, 130, 30)]


def toy_images(n: int) -> list[Image.Image]:
    """Toy-world-like 32x32 images: one flat-coloured circle or square on white, at varying places."""
    images = []
    for i in range(n):
        image = Image.new("RGB", (32, 32), "white")
        draw = ImageDraw.Draw(image)
        x, y, r = 10 + 6 * (i % 3), 10 + 6 * (i % 2), 6
        shape = draw.ellipse if i % 2 else draw.rectangle
        shape([x - r, y - r, x + r, y + r], fill=COLOURS[i % len(COLOURS)])
        images.append(image)
    return images


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL -> (B, 3, H, W) in [-1, 1]."""
    return torch.stack([torch.tensor(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])


def tokens(batch: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(batch, K, DV, generator=torch.Generator().manual_seed(seed)), dim=-1)


def toy_pipeline(**kwargs) -> VPiTDecoderPipeline:
    pipe = VPiTDecoderPipeline(**toy_decoder_components(DV, K, **kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: VPiTDecoderPipeline, seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs.setdefault("visual_tokens", tokens(2))
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "pt")
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these models are too small to gain from two, and on a 2-core machine that is also running
    something else two OpenMP threads spin against it (a toy UNet call goes from ~20 ms to over a second)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_encoder(tiny_clip) -> VPiTVisionEncoderModel:
    return VPiTVisionEncoderModel.from_spec(VPiTVisionConfig(model_name=f"local-dir:{tiny_clip}"), K)


# --------------------------------------------------------------------------------------------- projector


def test_projector_metamorph_sizes_pad_64_tokens_to_77():
    torch.manual_seed(0)
    projector = VPiTDecoderProjector(vision_hidden_size=1152, cross_attention_dim=768, num_visual_tokens=64)
    norms = 2 * 1152 + 2 * 768  # input and output LayerNorm
    assert sum(p.numel() for p in projector.parameters()) == 1152 * 2048 + 2048 + 2048 * 768 + 768 + norms
    out = projector(F.normalize(torch.randn(2, 64, 1152), dim=-1))
    assert out.shape == (2, 77, 768)
    assert torch.equal(out[:, 64:], torch.zeros(2, 13, 768))  # zero padding
    # The output LayerNorm (identity affine at init) gives every real token zero mean and unit variance.
    assert out[:, :64].mean(-1).abs().max() < 1e-5
    assert torch.allclose(out[:, :64].var(-1, unbiased=False), torch.ones(2, 64), atol=1e-3)
    assert projector.output_length == 77


def test_projector_without_context_length_emits_k_tokens():
    projector = VPiTDecoderProjector(
        vision_hidden_size=DV, cross_attention_dim=32, num_visual_tokens=K, hidden_size=64, context_length=None
    )
    assert projector(tokens(2)).shape == (2, K, 32)
    assert projector.output_length == K


def test_projector_query_variant():
    torch.manual_seed(0)
    projector = VPiTDecoderProjector(
        vision_hidden_size=DV,
        cross_attention_dim=32,
        num_visual_tokens=K,
        hidden_size=64,
        context_length=77,
        projector_type="query",
        num_queries=8,
        num_attention_heads=4,
    )
    z = tokens(2)
    out = projector(z)
    assert out.shape == (2, 77, 32)
    assert out[:, :8].abs().sum() > 0 and torch.equal(out[:, 8:], torch.zeros(2, 69, 32))
    # Learned positions make the queries see token order: permuting the tokens changes the output.
    assert not torch.allclose(projector(z.flip(1))[:, :8], out[:, :8], atol=1e-4)
    # num_queries defaults to the context length.
    default = VPiTDecoderProjector(
        vision_hidden_size=DV, cross_attention_dim=32, num_visual_tokens=K, hidden_size=64, projector_type="query"
    )
    assert default.num_tokens_out == 77 and default(z).shape == (2, 77, 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_visual_tokens": 81, "context_length": 77}, "context_length is 77"),
        ({"projector_type": "perceiver"}, "projector_type must be one of"),
        ({"num_queries": 4}, "num_queries only applies"),
        ({"projector_type": "query", "num_attention_heads": 5}, "must divide cross_attention_dim"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ],
)
def test_projector_rejects_bad_configs(kwargs, message):
    base = {"vision_hidden_size": DV, "cross_attention_dim": 32, "num_visual_tokens": K, "hidden_size": 64}
    with pytest.raises(ValueError, match=message):
        VPiTDecoderProjector(**{**base, **kwargs})


def test_projector_rejects_wrong_token_shape():
    projector = VPiTDecoderProjector(vision_hidden_size=DV, cross_attention_dim=32, num_visual_tokens=K, hidden_size=64)
    with pytest.raises(ValueError, match=r"shape \(B, 4, 48\)"):
        projector(torch.randn(2, 5, DV))


# --------------------------------------------------------------------------------------------- pipeline


def test_save_load_through_diffusion_pipeline_gives_identical_images(tmp_path):
    pipe = toy_pipeline()
    expected = sample(pipe)
    assert expected.shape == (2, 3, 32, 32) and expected.min() >= 0 and expected.max() <= 1
    pipe.save_pretrained(tmp_path)

    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "VPiTDecoderPipeline"
    assert index["projector"] == ["vpit.decoder.projector", "VPiTDecoderProjector"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["vision_encoder"] == [None, None]
    assert (tmp_path / "projector" / "diffusion_pytorch_model.safetensors").is_file()
    card = write_model_card(tmp_path).read_text()  # vpit.hub builds the card from the saved folder
    assert "library_name: diffusers" in card and "DiffusionPipeline.from_pretrained" in card

    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is VPiTDecoderPipeline and type(loaded.projector) is VPiTDecoderProjector
    assert torch.equal(sample(loaded), expected)
    direct = VPiTDecoderPipeline.from_pretrained(tmp_path)  # the class's own from_pretrained reads the same folder
    direct.set_progress_bar_config(disable=True)
    assert torch.equal(sample(direct), expected)


def test_a_fresh_interpreter_loads_the_folder_after_importing_vpit_decoder(tmp_path):
    """The user's path: no class imported by hand, no trust_remote_code; `import vpit.decoder` registers the class
    and makes the projector's module importable by the name model_index.json records."""
    toy_pipeline().save_pretrained(tmp_path)
    code = (
        "import sys, vpit.decoder\n"
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "print(type(pipe).__module__, type(pipe).__name__, type(pipe.projector).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    last_line = done.stdout.strip().splitlines()[-1]
    assert last_line == "vpit.decoder.pipeline_vpit_decoder VPiTDecoderPipeline VPiTDecoderProjector"


def test_pixel_space_pipeline_without_vae(tmp_path):
    pipe = toy_pipeline(latent=False)
    assert pipe.vae is None and pipe.vae_scale_factor == 1
    expected = sample(pipe, num_inference_steps=2)
    assert expected.shape == (2, 3, 32, 32)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == [None, None]
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None and torch.equal(sample(loaded, num_inference_steps=2), expected)


def test_seeded_generator_is_deterministic():
    pipe = toy_pipeline()
    first, again, other = sample(pipe, seed=0), sample(pipe, seed=0), sample(pipe, seed=1)
    assert torch.equal(first, again)
    assert (first - other).abs().mean() > 1e-3
    many = sample(pipe, num_images_per_condition=3, output_type="np")
    assert many.shape == (6, 32, 32, 3)


def manual_loop(pipe: VPiTDecoderPipeline, z: torch.Tensor, scale: float | None, steps: int = 3) -> torch.Tensor:
    """The denoising loop written out: ε = ε(∅) + s (ε(c) − ε(∅)) with ∅ all zeros, or ε(c) when scale is None."""
    cond = pipe.projector(z)
    latents = torch.randn(z.shape[0], 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = latents * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            conditional = pipe.unet(latents, t, encoder_hidden_states=cond).sample
            eps = conditional
            if scale is not None:
                unconditional = pipe.unet(latents, t, encoder_hidden_states=torch.zeros_like(cond)).sample
                eps = unconditional + scale * (conditional - unconditional)
            latents = pipe.scheduler.step(eps, t, latents).prev_sample
    return latents


def test_guidance_scale_one_is_the_conditional_prediction_alone():
    pipe = toy_pipeline()
    z = tokens(2)
    calls: list[torch.Tensor] = []
    pipe.unet.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    latents = sample(pipe, visual_tokens=z, guidance_scale=1.0, output_type="latent")
    assert len(calls) == 3 and all(c.shape[0] == 2 for c in calls)  # one conditional pass per step, no ∅ branch
    assert torch.allclose(latents, manual_loop(pipe, z, scale=None), atol=1e-5)


def test_guidance_uses_the_zero_condition_as_negative():
    pipe = toy_pipeline()
    z = tokens(2)
    calls: list[torch.Tensor] = []
    pipe.unet.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    guided = sample(pipe, visual_tokens=z, guidance_scale=4.0, output_type="latent")
    assert len(calls) == 3
    for context in calls:  # batched [∅, c]: the first half is exactly zero, the second the projected tokens
        assert context.shape == (4, K, 64)
        assert torch.equal(context[:2], torch.zeros(2, K, 64))
        assert torch.allclose(context[2:], pipe.projector(z))
    assert torch.allclose(guided, manual_loop(pipe, z, scale=4.0), atol=1e-4)
    unguided = sample(pipe, visual_tokens=z, guidance_scale=1.0, output_type="latent")
    assert (guided - unguided).abs().mean() > 1e-3  # the scale matters


def test_pipeline_rejects_bad_calls():
    pipe = toy_pipeline()
    with pytest.raises(ValueError, match="exactly one of visual_tokens"):
        pipe(num_inference_steps=1)
    with pytest.raises(ValueError, match="needs a vision encoder"):
        pipe(image=toy_images(1), num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe(visual_tokens=tokens(1), output_type="jpeg")
    parts = toy_decoder_components(DV, K)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        VPiTDecoderPipeline(
            **{
                **parts,
                "projector": VPiTDecoderProjector(vision_hidden_size=DV, cross_attention_dim=32, num_visual_tokens=K),
            }
        )


def test_image_to_reconstruction_with_the_vision_encoder(tmp_path, toy_encoder):
    pipe = VPiTDecoderPipeline(**toy_decoder_components(DV, K), vision_encoder=toy_encoder)
    pipe.set_progress_bar_config(disable=True)
    images = toy_images(2)
    z = pipe.encode_image(images)
    assert z.shape == (2, K, DV) and torch.allclose(z.norm(dim=-1), torch.ones(2, K), atol=1e-5)
    from_image = sample(pipe, visual_tokens=None, image=images)
    assert torch.equal(from_image, sample(pipe, visual_tokens=z))  # image= is encode, then decode
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vision_encoder"] == ["vpit.decoder.vision_encoder", "VPiTVisionEncoderModel"]
    assert "open_clip" in write_model_card(tmp_path).read_text()
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert not any(p.requires_grad for p in loaded.vision_encoder.parameters())  # still frozen after loading
    assert torch.equal(loaded.encode_image(images), z)
    assert torch.equal(sample(loaded, visual_tokens=None, image=images), from_image)


def test_vision_encoder_wraps_a_vpit_encoder_sharing_weights(toy_encoder):
    wrapped = VPiTVisionEncoderModel.from_vision_encoder(toy_encoder.encoder)
    assert wrapped.encoder is toy_encoder.encoder and wrapped.hidden_size == DV
    assert wrapped.config["num_visual_tokens"] == K


# --------------------------------------------------------------------------------------------- SD initialisation


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


def test_initialise_from_stable_diffusion_layout(tiny_sd, tmp_path):
    assert json.loads((tiny_sd / "model_index.json").read_text())["text_encoder"] == ["transformers", "CLIPTextModel"]
    pipe = VPiTDecoderPipeline.from_text_to_image_pipeline(
        tiny_sd, vision_hidden_size=DV, num_visual_tokens=K, projector_hidden_size=64
    )
    pipe.set_progress_bar_config(disable=True)
    assert set(pipe.components) == {"unet", "scheduler", "projector", "vae", "vision_encoder"}
    assert not hasattr(pipe, "text_encoder") and not hasattr(pipe, "tokenizer")
    reference_unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    for name, tensor in reference_unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[name], tensor), name
    reference_vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    assert all(torch.equal(pipe.vae.state_dict()[n], t) for n, t in reference_vae.state_dict().items())
    assert isinstance(pipe.scheduler, PNDMScheduler)
    # The projector targets the UNet's context: D = 32, padded to the text encoder's 77 positions.
    assert pipe.projector.config["cross_attention_dim"] == 32 and pipe.projector.output_length == 77
    assert pipe.config["base_model"] == str(tiny_sd)
    images = sample(pipe, output_type="np")
    assert images.shape == (2, 16, 16, 3)
    pipe.save_pretrained(tmp_path)
    assert not (tmp_path / "text_encoder").exists() and not (tmp_path / "tokenizer").exists()
    assert "text_encoder" not in json.loads((tmp_path / "model_index.json").read_text())


def test_initialise_rejects_a_folder_without_unet(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ValueError, match="has no unet or scheduler"):
        VPiTDecoderPipeline.from_text_to_image_pipeline(tmp_path, vision_hidden_size=DV, num_visual_tokens=K)


# --------------------------------------------------------------------------------------------- training


def test_a_short_training_run_lowers_the_loss():
    pipe = toy_pipeline()
    generator = torch.Generator().manual_seed(0)
    images = toy_images(8)
    z = tokens(8)
    latents = encode_latents(pipe.vae, to_pixels(images), generator)  # pre-encoded once: the VAE is frozen
    assert latents.shape == (8, 4, 8, 8)
    params = decoder_trainable_parameters(pipe)
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert len(params) == len(list(pipe.unet.parameters())) + len(list(pipe.projector.parameters()))
    pipe.unet.train()
    pipe.projector.train()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ema = create_decoder_ema(pipe, decay=0.99)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    losses = []
    for _ in range(30):
        out = decoder_loss(
            pipe.unet, pipe.projector, noise_scheduler, z, latents=latents, condition_dropout=0.1, generator=generator
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(params)
        losses.append(out.loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    # Measured: first 0.82, last 0.20 (seed 0, one thread). Require at least a halving.
    assert last < 0.5 * first, losses
    assert ema.optimization_step == 30


def loss_parts(**kwargs):
    """decoder_loss on a fixed toy batch with a fixed generator: every option sees the same draws."""
    torch.manual_seed(0)
    parts = toy_decoder_components(DV, K)
    scheduler = DDPMScheduler.from_config(
        parts["scheduler"].config, prediction_type=kwargs.pop("prediction_type", "epsilon")
    )
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = {"latents": latents, "generator": torch.Generator().manual_seed(2), **kwargs}
    return decoder_loss(parts["unet"], parts["projector"], scheduler, tokens(4), **kwargs), parts, scheduler


def test_min_snr_weighting_changes_the_loss_by_the_min_snr_weights():
    plain, _, scheduler = loss_parts()
    weighted, _, _ = loss_parts(snr_gamma=5.0)
    assert torch.equal(plain.timesteps, weighted.timesteps) and torch.equal(plain.mse, weighted.mse)
    assert torch.equal(plain.weights, torch.ones(4))
    snr = compute_snr(scheduler, weighted.timesteps)
    assert torch.allclose(weighted.weights, torch.clamp(snr, max=5.0) / snr)
    assert not torch.allclose(weighted.weights, torch.ones(4))
    assert torch.allclose(weighted.loss, (weighted.per_sample_mse * weighted.weights).mean())
    assert abs(weighted.loss.item() - plain.loss.item()) > 1e-3


def test_v_prediction_and_sample_targets_change_the_loss():
    epsilon, _, _ = loss_parts()
    v, _, scheduler = loss_parts(prediction_type="v_prediction")
    x0, _, _ = loss_parts(prediction_type="sample")
    assert torch.equal(epsilon.timesteps, v.timesteps)
    assert len({round(epsilon.loss.item(), 5), round(v.loss.item(), 5), round(x0.loss.item(), 5)}) == 3
    # With min-SNR, v-prediction divides by SNR + 1 (not SNR).
    v_weighted, _, _ = loss_parts(prediction_type="v_prediction", snr_gamma=5.0)
    snr = compute_snr(scheduler, v_weighted.timesteps)
    assert torch.allclose(v_weighted.weights, torch.clamp(snr, max=5.0) / (snr + 1))


def flow_loss(shift: float = 1.0, batch: int = 4, **kwargs):
    """decoder_loss under flow_prediction with a UNet that records its input and timesteps and predicts zeros, so
    that each sample's MSE is the mean square of its target."""
    torch.manual_seed(0)
    parts = toy_decoder_components(DV, K)
    sampling, training = decoder_schedulers(parts["scheduler"], "flow_prediction", shift)
    seen = {}

    def record(sample, timestep, encoder_hidden_states=None, return_dict=True):
        seen.update(sample=sample.detach(), timestep=timestep.detach())
        return (torch.zeros_like(sample) + 0.0 * encoder_hidden_states.sum(),)

    parts["unet"].forward = record
    latents = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = decoder_loss(parts["unet"], parts["projector"], training, tokens(batch), latents=latents,
                       generator=torch.Generator().manual_seed(2), **kwargs)  # fmt: skip
    return out, latents, seen, sampling


def test_flow_prediction_noises_on_the_straight_line_and_targets_the_velocity():
    out, x0, seen, sampling = flow_loss(shift=3.0)
    assert isinstance(sampling, DPMSolverMultistepScheduler)
    assert sampling.config.use_flow_sigmas and sampling.config.prediction_type == "flow_prediction"
    assert sampling.config.flow_shift == 3.0
    sigma = (seen["timestep"] / 1000).reshape(-1, 1, 1, 1)  # the UNet sees sigma * num_train_timesteps
    assert torch.equal(seen["timestep"], out.timesteps) and ((sigma > 0) & (sigma <= 1)).all()
    noise = (seen["sample"] - (1 - sigma) * x0) / sigma  # x_t = (1 - sigma) x0 + sigma noise
    assert noise.std().item() == pytest.approx(1.0, abs=0.15)  # the draw was N(0, 1): x_t is on the line
    expected = ((noise - x0) ** 2).mean(dim=(1, 2, 3))  # the target is the velocity noise - x0
    torch.testing.assert_close(out.per_sample_mse, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.weights, torch.ones(4))


def test_flow_timestep_sampling_and_shift_move_the_sigmas():
    def sigmas(shift=1.0, **kwargs):
        return flow_loss(shift, batch=2048, **kwargs)[0].timesteps / 1000

    uniform, logit_normal, shifted = sigmas(), sigmas(timestep_sampling="logit_normal"), sigmas(shift=3.0)
    middle = [((s > 0.25) & (s < 0.75)).float().mean().item() for s in (uniform, logit_normal)]
    # uniform: half of the sigmas in the middle half; logit-normal(0, 1): 74 % of them.
    assert middle[0] == pytest.approx(0.5, abs=0.04) and middle[1] == pytest.approx(0.74, abs=0.04)
    # shift 3 maps the median 0.5 to 3 * 0.5 / (1 + 2 * 0.5) = 0.75: training spends more of its draws at high noise.
    assert shifted.median().item() == pytest.approx(0.75, abs=0.03)


def test_flow_sampling_lands_on_the_point_a_perfect_velocity_leads_to():
    """DPM-Solver++ on flow sigmas, driven by the exact velocity of a one-point distribution, ends on that point:
    the pipeline and the scheduler integrate the flow the loss trains."""
    pipe = toy_pipeline()
    pipe.scheduler, _ = decoder_schedulers(pipe.scheduler, "flow_prediction", 3.0)
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def exact(sample, timestep, encoder_hidden_states=None, return_dict=True):
        sigma = float(timestep) / 1000
        return ((sample - target) / max(sigma, 1e-3),)  # v = noise - x0 = (x_t - x0) / sigma

    pipe.unet.forward = exact
    latents = pipe(visual_tokens=tokens(1), num_inference_steps=8, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    torch.testing.assert_close(latents, target, atol=2e-2, rtol=0)


def test_flow_prediction_trains_and_its_scheduler_survives_save_and_load(tmp_path):
    pipe = toy_pipeline()
    pipe.scheduler, training = decoder_schedulers(pipe.scheduler, "flow_prediction", 2.0)
    assert isinstance(training, FlowMatchEulerDiscreteScheduler) and training.config.shift == 2.0
    generator = torch.Generator().manual_seed(0)
    latents = encode_latents(pipe.vae, to_pixels(toy_images(8)), generator)
    params = decoder_trainable_parameters(pipe)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(30):
        out = decoder_loss(pipe.unet, pipe.projector, training, tokens(8), latents=latents,
                           timestep_sampling="logit_normal", generator=generator)  # fmt: skip
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    pipe.unet.eval()
    expected = sample(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = VPiTDecoderPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.use_flow_sigmas and loaded.scheduler.config.flow_shift == 2.0
    assert torch.equal(sample(loaded), expected)
    # Continued as a DDPM type, the same folder's scheduler is switched back, so sampling matches training.
    back, noise = decoder_schedulers(loaded.scheduler, "v_prediction")
    assert not back.config.use_flow_sigmas and isinstance(noise, DDPMScheduler)
    assert noise.config.prediction_type == "v_prediction"


def test_flow_options_are_refused_where_they_do_not_apply():
    parts = toy_decoder_components(DV, K)
    ddpm = DDPMScheduler.from_config(parts["scheduler"].config)
    _, flow = decoder_schedulers(parts["scheduler"], "flow_prediction")
    common = {"latents": torch.randn(1, 4, 8, 8)}
    with pytest.raises(ValueError, match="is for flow_prediction"):
        decoder_loss(parts["unet"], parts["projector"], ddpm, tokens(1), timestep_sampling="logit_normal", **common)
    with pytest.raises(ValueError, match="snr_gamma"):
        decoder_loss(parts["unet"], parts["projector"], flow, tokens(1), snr_gamma=5.0, **common)
    with pytest.raises(ValueError, match="differs from the noise scheduler"):
        decoder_loss(parts["unet"], parts["projector"], flow, tokens(1), prediction_type="epsilon", **common)


def test_noise_offset_changes_the_loss():
    plain, _, _ = loss_parts()
    offset, _, _ = loss_parts(noise_offset=0.5)
    assert abs(offset.loss.item() - plain.loss.item()) > 1e-3


def test_condition_dropout_replaces_the_condition_with_zeros():
    none, parts, _ = loss_parts(condition_dropout=0.0)
    assert not none.dropped.any()
    every, parts, _ = loss_parts(condition_dropout=1.0)
    assert every.dropped.all()
    every.loss.backward()  # a zero context carries no gradient back to the projector
    assert all(p.grad is None or not p.grad.any() for p in parts["projector"].parameters())
    assert any(p.grad is not None and p.grad.any() for p in parts["unet"].parameters())


def test_loss_rejects_bad_options():
    parts = toy_decoder_components(DV, K)
    with pytest.raises(ValueError, match="differs from the noise scheduler"):
        decoder_loss(
            parts["unet"],
            parts["projector"],
            parts["scheduler"],
            tokens(1),
            latents=torch.randn(1, 4, 8, 8),
            prediction_type="v_prediction",
        )
    with pytest.raises(ValueError, match="exactly one of images"):
        loss_parts(images=torch.zeros(4, 3, 32, 32))
    with pytest.raises(ValueError, match="condition_dropout"):
        loss_parts(condition_dropout=1.5)


def test_loss_from_images_encodes_with_the_vae():
    parts = toy_decoder_components(DV, K)
    images = to_pixels(toy_images(2))
    from_images = decoder_loss(
        parts["unet"],
        parts["projector"],
        parts["scheduler"],
        tokens(2),
        images=images,
        vae=parts["vae"],
        generator=torch.Generator().manual_seed(3),
    )
    generator = torch.Generator().manual_seed(3)
    latents = encode_latents(parts["vae"], images, generator)
    from_latents = decoder_loss(
        parts["unet"], parts["projector"], parts["scheduler"], tokens(2), latents=latents, generator=generator
    )
    assert torch.allclose(from_images.loss, from_latents.loss)


def test_ema_tracks_the_trainable_parameters():
    pipe = toy_pipeline()
    params = decoder_trainable_parameters(pipe)
    ema = create_decoder_ema(pipe, decay=0.9)
    assert len(ema.shadow_params) == len(params)
    start = [p.detach().clone() for p in params]

    def train_step() -> None:  # stands in for an optimizer step: every parameter moves by +1
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        ema.step(params)

    train_step()
    assert ema.cur_decay_value == 0.0  # the first step copies
    assert all(torch.equal(s, p) for s, p in zip(ema.shadow_params, params, strict=True))
    train_step()
    decay = ema.cur_decay_value
    assert decay == pytest.approx(2 / 11)  # min(0.9, n / (9 + n)) at n = 2
    for shadow, p0, p in zip(ema.shadow_params, start, params, strict=True):
        assert torch.allclose(shadow, decay * (p0 + 1) + (1 - decay) * (p0 + 2), atol=1e-6)
        assert torch.allclose(p, p0 + 2)
    ema.store(params)
    ema.copy_to(params)
    assert torch.allclose(params[0], start[0] + 2 - decay, atol=1e-6)
    ema.restore(params)
    assert torch.allclose(params[0], start[0] + 2)


def test_validation_reconstructions_grid(toy_encoder):
    pipe = VPiTDecoderPipeline(**toy_decoder_components(DV, K), vision_encoder=toy_encoder)
    pipe.set_progress_bar_config(disable=True)
    images = toy_images(3)
    grid = validation_reconstructions(
        pipe, images, num_inference_steps=2, num_samples=2, generator=torch.Generator().manual_seed(0)
    )
    assert grid.size == (3 * 32, 3 * 32)
    top_left = np.asarray(grid.crop((0, 0, 32, 32)))
    assert np.array_equal(top_left, np.asarray(images[0]))  # the first row holds the inputs
    expected = pipe(
        image=images,
        num_inference_steps=2,
        guidance_scale=3.0,
        num_images_per_condition=2,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert np.array_equal(np.asarray(grid.crop((32, 64, 64, 96))), np.asarray(expected[3]))  # row 2 = sample 1


@pytest.mark.gpu
def test_sampling_and_loss_on_cuda_with_a_cpu_generator():
    pipe = toy_pipeline().to("cuda")
    images = sample(pipe, visual_tokens=tokens(2).cuda())
    assert images.device.type == "cuda" and images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    half = toy_pipeline().to("cuda", torch.float16)
    assert torch.isfinite(sample(half, visual_tokens=tokens(2).cuda())).all()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    out = decoder_loss(
        pipe.unet,
        pipe.projector,
        scheduler,
        tokens(2).cuda(),
        images=to_pixels(toy_images(2)).cuda(),
        vae=pipe.vae,
        snr_gamma=5.0,
        noise_offset=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.timesteps.device.type == "cuda"


def test_toy_components_use_a_given_trained_vae_and_size_the_unet_to_its_latents():
    from vpit.toy.decoder import toy_vae_config

    vae = AutoencoderKL(**toy_vae_config(64, downsamplings=2))  # 64 px -> 16x16x4, like the trained toy VAE
    parts = toy_decoder_components(vision_hidden_size=DV, num_visual_tokens=4, vae=vae)
    assert parts["vae"] is vae and not any(p.requires_grad for p in vae.parameters())
    assert parts["unet"].config.sample_size == 16
    pipe = VPiTDecoderPipeline(**parts)
    assert pipe(visual_tokens=torch.randn(1, 4, DV), num_inference_steps=1).images[0].size == (64, 64)
    with pytest.raises(ValueError, match="pixel-space"):
        toy_decoder_components(vision_hidden_size=DV, num_visual_tokens=4, vae=vae, latent=False)


# ------------------------------------------------------------------------------------- spatial conditioning


def test_spatial_map_puts_each_token_on_its_grid_cell():
    projector = VPiTDecoderProjector(
        vision_hidden_size=DV, cross_attention_dim=32, num_visual_tokens=K, hidden_size=64, spatial_channels=3
    )
    z = tokens(2)
    grid = projector.spatial_condition(z, (2, 2))  # the k x k grid itself (k = 2): no resizing
    assert grid.shape == (2, 3, 2, 2)
    for index in range(K):  # token i (row-major) lands at (i // k, i % k)
        assert torch.allclose(grid[:, :, index // 2, index % 2], projector.spatial(z[:, index]), atol=1e-6)
    assert projector.spatial_condition(z, (8, 8)).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="K = 3 is not square"):
        VPiTDecoderProjector(vision_hidden_size=DV, num_visual_tokens=3, spatial_channels=2)
    with pytest.raises(ValueError, match="no spatial map"):
        VPiTDecoderProjector(vision_hidden_size=DV, cross_attention_dim=32, num_visual_tokens=K).spatial_condition(
            z, (8, 8)
        )


def test_spatial_decoder_concatenates_the_map_and_zeroes_it_when_unconditional(tmp_path):
    parts = toy_decoder_components(DV, K, spatial_channels=3)
    assert parts["unet"].config["in_channels"] == 4 + 3 and parts["unet"].config["out_channels"] == 4
    seen = []
    hook = parts["unet"].conv_in.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    pipe = VPiTDecoderPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    images = sample(pipe, guidance_scale=2.0, num_inference_steps=2)
    assert images.shape == (2, 3, 32, 32)
    first = seen[0]  # (2B, 4 + 3, 8, 8): [unconditional; conditional]
    assert first.shape == (4, 7, 8, 8)
    assert not first[:2, 4:].any()  # the zero map with the zero context
    assert torch.allclose(first[2:, 4:], pipe.projector.spatial_condition(tokens(2), (8, 8)), atol=1e-6)
    hook.remove()
    # In the loss, a dropped condition zeroes the map too: the projector then gets no gradient at all.
    scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    out = decoder_loss(
        parts["unet"], parts["projector"], scheduler, tokens(4), latents=torch.randn(4, 4, 8, 8), condition_dropout=1.0
    )
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in parts["projector"].parameters())
    # Saved and loaded, the folder samples the same images.
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.projector.spatial_channels == 3
    assert torch.equal(sample(loaded, guidance_scale=2.0, num_inference_steps=2), images)
    with pytest.raises(ValueError, match=r"spatial_channels \(0\)"):
        VPiTDecoderPipeline(**{**toy_decoder_components(DV, K), "unet": parts["unet"]})


def test_spatial_channels_widen_a_pretrained_unet_with_zero_weights(tiny_sd):
    plain = VPiTDecoderPipeline.from_text_to_image_pipeline(
        tiny_sd, vision_hidden_size=DV, num_visual_tokens=K, projector_hidden_size=64
    )
    wide = VPiTDecoderPipeline.from_text_to_image_pipeline(
        tiny_sd, vision_hidden_size=DV, num_visual_tokens=K, projector_hidden_size=64, spatial_channels=2
    )
    assert wide.unet.config["in_channels"] == 6 and wide.unet.conv_in.weight.shape[1] == 6
    assert torch.equal(wide.unet.conv_in.weight[:, :4], plain.unet.conv_in.weight)
    assert not wide.unet.conv_in.weight[:, 4:].any()
    # Zero weights on the new channels: the widened UNet computes what the pretrained one did, whatever the map.
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        reference = plain.unet(x, t, encoder_hidden_states=context).sample
        widened = wide.unet(torch.cat([x, torch.randn(1, 2, 8, 8)], 1), t, encoder_hidden_states=context).sample
    assert torch.allclose(widened, reference, atol=1e-6)


def test_token_noise_perturbs_the_condition_and_keeps_unit_tokens_unit():
    clean, _, _ = loss_parts()
    noisy, _, _ = loss_parts(token_noise=0.05)
    seen = []
    torch.manual_seed(0)
    parts = toy_decoder_components(DV, K)
    parts["projector"].register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    z = tokens(4)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    decoder_loss(
        parts["unet"], parts["projector"], scheduler, z, latents=latents, token_noise=0.05,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    given = seen[-1]
    assert torch.allclose(given.norm(dim=-1), torch.ones(4, K), atol=1e-5)  # re-normalised: still unit tokens
    cosine = F.cosine_similarity(given, z, dim=-1)
    expected = (1 + DV * 0.05**2) ** -0.5  # ~0.95 at Dv = 48
    assert abs(cosine.mean().item() - expected) < 0.03 and (cosine < 0.999).all()
    # The draws before it are unchanged, the loss is not.
    assert torch.equal(clean.timesteps, noisy.timesteps) and not torch.equal(clean.loss, noisy.loss)
    with pytest.raises(ValueError, match="token_noise must be >= 0"):
        loss_parts(token_noise=-0.1)
