"""Training pieces of the decoder, as plain functions a recipe calls: the loss, the trainable parameters, EMA, and
validation reconstructions.

The decoder learns on images alone: image -> frozen encoder -> z (B, K, Dv) -> projector -> context (B, L, D);
image -> frozen VAE -> latents x0 (B, C, h, w). The UNet learns to denoise x_t given the context, which is replaced
by the all-zero context with probability `condition_dropout` (classifier-free guidance at sampling time). With a
spatial projector, the projector's spatial map of z (zeros where the context is dropped) is concatenated to x_t. The
projector and the UNet train; the VAE and the encoder stay frozen.

    >>> params = decoder_trainable_parameters(pipe)
    >>> optimizer, ema = torch.optim.AdamW(params, lr=1e-4), create_decoder_ema(pipe)
    >>> out = decoder_loss(pipe.unet, pipe.projector, noise_scheduler, z, images=pixels, vae=pipe.vae,
    ...                    condition_dropout=0.75, snr_gamma=5.0)
    >>> out.loss.backward(); optimizer.step(); optimizer.zero_grad(); ema.step(params)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling, compute_snr
from diffusers.utils import make_image_grid
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors.torch import load_file, save_file

from ..decoder.pipeline_vpit_decoder import VPiTDecoderPipeline
from ..decoder.projector import VPiTDecoderProjector

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")


def decoder_schedulers(
    scheduler: SchedulerMixin, prediction_type: str, flow_shift: float = 1.0
) -> tuple[SchedulerMixin, SchedulerMixin]:
    """The sampling scheduler a decoder is saved with and the noise scheduler it trains with, for `prediction_type`.

    epsilon / v_prediction / sample: the pipeline's scheduler class with that prediction type, and DDPM's noise
    schedule on the same betas. flow_prediction (rectified flow): DPM-Solver++ on flow sigmas (`use_flow_sigmas`,
    `flow_shift`, as Sana samples), and `FlowMatchEulerDiscreteScheduler` with the same shift for training's sigmas;
    the UNet sees timestep = sigma * num_train_timesteps in both. Continuing a saved decoder with another type
    reconfigures its scheduler the same way, so sampling always matches training.
    """
    config = dict(scheduler.config)  # type: ignore[attr-defined]
    if prediction_type == "flow_prediction":
        sampling: Any = DPMSolverMultistepScheduler.from_config(
            config, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift
        )
        training: Any = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.get("num_train_timesteps", 1000), shift=flow_shift
        )
        return sampling, training
    flow_keys = {"use_flow_sigmas": False} if "use_flow_sigmas" in config else {}
    same_class: Any = type(scheduler)  # every diffusers scheduler is a ConfigMixin
    sampling = same_class.from_config(config, prediction_type=prediction_type, **flow_keys)
    return sampling, DDPMScheduler.from_config(sampling.config)


@dataclass
class DecoderLossOutput:
    """The decoder loss and its parts.

    Attributes:
        loss: the scalar to minimise, mean over the batch of weight * per-sample MSE.
        mse: the unweighted mean MSE (detached), comparable across weighting schemes.
        per_sample_mse: (B,) MSE of each sample (detached).
        weights: (B,) the loss weight of each sample (1 without min-SNR weighting).
        timesteps: (B,) the diffusion timesteps drawn.
        dropped: (B,) True where the condition was replaced by the zero context.
    """

    loss: torch.Tensor
    mse: torch.Tensor
    per_sample_mse: torch.Tensor
    weights: torch.Tensor
    timesteps: torch.Tensor
    dropped: torch.Tensor


def _generator_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL | None, images: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, C, h, w) scaled VAE latents (a posterior sample); the images
    themselves when `vae` is None (pixel-space decoder)."""
    if vae is None:
        return images
    return _scaled(vae, vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample(generator=generator))


def latents_from_moments(
    vae: AutoencoderKL, moments: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, 2C, h, w) posterior moments, `vae.encode(images).latent_dist.parameters` computed once and cached ->
    (B, C, h, w) scaled latents, a posterior sample drawn exactly as `encode_latents` draws it."""
    return _scaled(vae, DiagonalGaussianDistribution(moments.to(vae.device, vae.dtype)).sample(generator=generator))


def _scaled(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    if vae.config.get("shift_factor") is not None:
        latents = latents - vae.config["shift_factor"]
    return latents * vae.config["scaling_factor"]


def decoder_loss(
    unet: UNet2DConditionModel,
    projector: VPiTDecoderProjector,
    noise_scheduler: SchedulerMixin,
    visual_tokens: torch.Tensor,
    *,
    images: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    vae: AutoencoderKL | None = None,
    condition_dropout: float = 0.0,
    prediction_type: str | None = None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    token_noise: float = 0.0,
    timestep_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
) -> DecoderLossOutput:
    """The denoising loss of one batch.

    Args:
        unet, projector: the trainable parts.
        noise_scheduler: the training noise scheduler, `decoder_schedulers(...)[1]`: a `DDPMScheduler` (epsilon,
            v_prediction, sample) or a `FlowMatchEulerDiscreteScheduler` (flow_prediction).
        visual_tokens: (B, K, Dv) encoder tokens of the images.
        images: (B, 3, H, W) in [-1, 1]; encoded with `vae` (frozen, no gradient), or used as they are when `vae` is
            None (pixel space). Exclusive with `latents`.
        latents: (B, C, h, w) already scaled latents (pre-encoded data). Exclusive with `images`.
        vae: the frozen VAE, for `images`.
        condition_dropout: probability of replacing a sample's context with the all-zero context (0.7-0.8 in
            MetaMorph).
        prediction_type: 'epsilon', 'v_prediction', 'sample' or 'flow_prediction'; None: the scheduler's (a
            flow-matching scheduler's is 'flow_prediction'). It must match the scheduler's (which sampling uses): get
            both from `decoder_schedulers`, and save the pipeline with its sampling scheduler.
        snr_gamma: min-SNR-γ weighting (Hang et al. 2023; 5.0 is the usual value); None: uniform weights. DDPM
            types only.
        noise_offset: adds noise_offset * N(0, 1) per sample and channel to the noise (brighter / darker images).
        token_noise: adds token_noise * N(0, 1) to every feature of the visual tokens (then re-normalised when they
            are unit vectors) before the projector, as unCLIP's decoder noise-augments its CLIP embedding: the
            language model's predicted tokens are near, not on, the encoder's (on the toy world cosine 0.97 to a
            render of the asked composition), and a decoder that saw only exact encoder tokens is brittle there.
            With Dv features, the cosine to the clean token is about 1 / sqrt(1 + Dv * token_noise^2).
        timestep_sampling, logit_mean, logit_std, mode_scale: flow_prediction: how sigma is drawn, by diffusers'
            `compute_density_for_timestep_sampling` ('uniform', 'logit_normal' as SD3, or 'mode'), then shifted by
            the scheduler's shift. DDPM types draw the timestep uniformly.
        generator: draws the noise, timesteps, dropout mask and VAE posterior sample.

    Returns:
        A `DecoderLossOutput`; `loss` carries gradients to the UNet and the projector.
    """
    if (images is None) == (latents is None):
        raise ValueError("pass exactly one of images= (B, 3, H, W) and latents= (B, C, h, w)")
    if not 0.0 <= condition_dropout <= 1.0:
        raise ValueError(f"condition_dropout is a probability in [0, 1], got {condition_dropout}")
    if snr_gamma is not None and snr_gamma <= 0:
        raise ValueError(f"snr_gamma must be > 0 (5.0 is usual) or None, got {snr_gamma}")
    if noise_offset < 0:
        raise ValueError(f"noise_offset must be >= 0, got {noise_offset}")
    if token_noise < 0:
        raise ValueError(f"token_noise must be >= 0, got {token_noise}")
    # SchedulerMixin declares neither `config` nor `add_noise`; every training scheduler (DDPM, DDIM, ...) has them.
    scheduler: Any = noise_scheduler
    flow = isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    scheduler_type = "flow_prediction" if flow else scheduler.config.prediction_type
    prediction_type = prediction_type or scheduler_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
    if prediction_type != scheduler_type:
        raise ValueError(
            f"prediction_type {prediction_type!r} differs from the noise scheduler's {scheduler_type!r}; a decoder "
            "trained on one and sampled with the other produces noise. Configure both with "
            f"vpit.training.diffusion.decoder_schedulers(pipe.scheduler, {prediction_type!r})"
        )
    if timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {list(TIMESTEP_SAMPLING)}, got {timestep_sampling!r}")
    if not flow and timestep_sampling != "uniform":
        raise ValueError(f"timestep_sampling {timestep_sampling!r} is for flow_prediction; DDPM types draw uniformly")
    if flow and snr_gamma is not None:
        raise ValueError("snr_gamma (min-SNR weighting) is for DDPM types; flow_prediction takes timestep_sampling")

    if images is not None:
        latents = encode_latents(vae, images, generator)
    assert latents is not None  # one of the two was given, checked above
    latents = latents.to(unet.device, unet.dtype)
    batch, channels = latents.shape[:2]
    if visual_tokens.shape[0] != batch:
        raise ValueError(f"visual_tokens has {visual_tokens.shape[0]} rows but the batch has {batch} images")
    device = latents.device
    draw = _generator_device(generator, device)

    noise = randn_tensor(tuple(latents.shape), generator=generator, device=device, dtype=latents.dtype)
    if noise_offset:
        offset = randn_tensor((batch, channels, 1, 1), generator=generator, device=device, dtype=latents.dtype)
        noise = noise + noise_offset * offset  # (B, C, h, w)
    num_train = scheduler.config.num_train_timesteps
    if flow:
        # As diffusers' SD3 training: u in [0, 1) from the chosen density -> an index into the shifted schedule.
        u = compute_density_for_timestep_sampling(
            timestep_sampling, batch, logit_mean, logit_std, mode_scale, device=draw, generator=generator
        )
        index = (u * num_train).long().clamp(0, num_train - 1).cpu()  # (B,)
        timesteps = scheduler.timesteps[index].to(device)  # (B,) sigma * num_train
        sigmas = scheduler.sigmas[index].to(device, latents.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise  # (B, C, h, w)
    else:
        timesteps = torch.randint(0, num_train, (batch,), generator=generator, device=draw).to(device)  # (B,)
        noisy = scheduler.add_noise(latents, noise, timesteps)  # (B, C, h, w)

    visual_tokens = visual_tokens.to(device)
    if token_noise:
        unit = bool(torch.allclose(visual_tokens.norm(dim=-1), torch.ones((), device=device), atol=1e-3))
        jitter = randn_tensor(tuple(visual_tokens.shape), generator=generator, device=device, dtype=visual_tokens.dtype)
        visual_tokens = visual_tokens + token_noise * jitter  # (B, K, Dv)
        if unit:
            visual_tokens = F.normalize(visual_tokens, dim=-1)
    context = projector(visual_tokens)  # (B, L, D)
    dropped = torch.rand(batch, generator=generator, device=draw).to(device) < condition_dropout  # (B,)
    context = torch.where(dropped[:, None, None], torch.zeros_like(context), context)

    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "flow_prediction":
        target = noise - latents  # the velocity d x_t / d sigma
    else:
        target = latents
    unet_input = noisy
    if projector.spatial_channels:
        spatial = projector.spatial_condition(visual_tokens, tuple(noisy.shape[-2:]))  # (B, C', h, w)
        spatial = torch.where(dropped[:, None, None, None], torch.zeros_like(spatial), spatial)
        unet_input = torch.cat([noisy, spatial.to(noisy.dtype)], dim=1)  # (B, C + C', h, w)
    prediction = unet(unet_input, timesteps, encoder_hidden_states=context.to(unet.dtype), return_dict=False)[0]
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)

    if snr_gamma is None:
        weights = torch.ones_like(per_sample)
    else:
        # Min-SNR-γ: weight the x0-space loss by min(SNR, γ); for ε- and v-targets divide by the factor that
        # converts their MSE to x0-space (SNR, SNR + 1).
        snr = compute_snr(noise_scheduler, timesteps).float()  # (B,)
        weights = torch.clamp(snr, max=snr_gamma)
        if prediction_type == "epsilon":
            weights = weights / snr
        elif prediction_type == "v_prediction":
            weights = weights / (snr + 1)
    loss = (per_sample * weights).mean()
    return DecoderLossOutput(
        loss=loss,
        mse=per_sample.mean().detach(),
        per_sample_mse=per_sample.detach(),
        weights=weights.detach(),
        timesteps=timesteps,
        dropped=dropped,
    )


def decoder_trainable_parameters(pipeline: VPiTDecoderPipeline) -> list[torch.nn.Parameter]:
    """Freeze the VAE and the vision encoder, unfreeze the UNet and the projector; return the latter's parameters
    (UNet first), the list to hand to the optimizer and to `EMAModel.step`."""
    for frozen in (pipeline.vae, pipeline.vision_encoder):
        if frozen is not None:
            frozen.requires_grad_(False)
            frozen.eval()
    pipeline.unet.requires_grad_(True)
    pipeline.projector.requires_grad_(True)
    return [*pipeline.unet.parameters(), *pipeline.projector.parameters()]


class EMACheckpoint:
    """The decoder's EMA in a checkpoint: the shadow weights as safetensors, the counters as JSON. accelerate's
    `register_for_checkpointing` would torch.save it as an object, which loading reads with `weights_only=False`."""

    WEIGHTS, COUNTERS = "ema.safetensors", "ema.json"

    def __init__(self, ema: EMAModel):
        self.ema = ema

    def save(self, folder: Path) -> None:
        state = self.ema.state_dict()
        shadow = state.pop("shadow_params")
        save_file({f"{i:06d}": p.detach().contiguous().cpu() for i, p in enumerate(shadow)}, str(folder / self.WEIGHTS))
        (folder / self.COUNTERS).write_text(json.dumps(state))

    def load(self, folder: Path) -> None:
        weights = load_file(str(folder / self.WEIGHTS))
        state = json.loads((folder / self.COUNTERS).read_text())
        state["shadow_params"] = [weights[key] for key in sorted(weights)]
        self.ema.load_state_dict(state)


def create_decoder_ema(
    pipeline: VPiTDecoderPipeline,
    decay: float = 0.9999,
    min_decay: float = 0.0,
    update_after_step: int = 0,
    use_ema_warmup: bool = False,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
) -> EMAModel:
    """An `EMAModel` over the UNet's and the projector's parameters, in `decoder_trainable_parameters` order.

    Call `ema.step(params)` after each optimizer step; `ema.copy_to(params)` (after `ema.store(params)` to keep
    the raw weights, `ema.restore(params)` to get them back) before sampling or saving. `ema.state_dict()` /
    `load_state_dict` checkpoint it. Without warm-up, the n-th `ema.step` copies the parameters for n = 1, then
    uses the decay min(decay, n / (9 + n)).
    """
    parameters = [*pipeline.unet.parameters(), *pipeline.projector.parameters()]
    return EMAModel(
        parameters,
        decay=decay,
        min_decay=min_decay,
        update_after_step=update_after_step,
        use_ema_warmup=use_ema_warmup,
        inv_gamma=inv_gamma,
        power=power,
    )


@torch.no_grad()
def validation_reconstructions(
    pipeline: VPiTDecoderPipeline,
    images: Sequence[Image.Image],
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Image.Image:
    """A grid to eyeball during training: the first row holds the input images, each following row one sample of
    their reconstructions (image -> encoder -> z -> decoder).

    Args:
        pipeline: a decoder pipeline with a vision encoder.
        images: a few PIL images (the columns).
        num_inference_steps, guidance_scale, generator: as in `VPiTDecoderPipeline.__call__`.
        num_samples: reconstruction rows.

    Returns:
        One PIL image of (1 + num_samples) rows x len(images) columns, each cell the decoder's output size.
    """
    if not images:
        raise ValueError("validation_reconstructions needs at least one image")
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    pipeline.projector.eval()
    (reconstructions,) = pipeline(
        image=list(images),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        num_images_per_condition=num_samples,
        generator=generator,
        output_type="pil",
        return_dict=False,
    )
    pipeline.unet.train(was_training)
    pipeline.projector.train(was_training)
    size = reconstructions[0].size
    originals = [image.convert("RGB").resize(size, Image.Resampling.BICUBIC) for image in images]
    # The pipeline returns samples grouped per image ([img0 s0, img0 s1, ...]); the grid wants one row per sample.
    rows = [reconstructions[i::num_samples] for i in range(num_samples)]
    cells = originals + [cell for row in rows for cell in row]
    return make_image_grid(cells, rows=1 + num_samples, cols=len(images))


__all__ = [
    "PREDICTION_TYPES",
    "DecoderLossOutput",
    "EMACheckpoint",
    "create_decoder_ema",
    "decoder_loss",
    "decoder_trainable_parameters",
    "encode_latents",
    "latents_from_moments",
    "validation_reconstructions",
]
