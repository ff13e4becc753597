"""The `decoder` stage: fine-tune the diffusion autoencoder to turn visual tokens into pixels.

Trained on images alone: image -> frozen vision encoder -> z (B, K, Dv) -> projector -> UNet context; the UNet
learns to denoise the image (or its VAE latents) under that context, with condition dropout to the all-zero
context for classifier-free guidance. The VAE and the encoder stay frozen; the projector and the UNet train, with
an EMA copy. With `decoder.predicted_tokens_from`, a share of the generation records' images are conditioned on a
trained VPiT model's own predicted tokens for their prompts instead (`vpit.training.predictions`): what the decoder
receives at generation time. With `decoder.cache_frozen`, every training image goes through the frozen encoder and
VAE once (`write_frozen_cache`) and the steps read its tokens and posterior moments from disk. Reads top to bottom.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate.utils import set_seed
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn
from torchvision import transforms

from ...data.cards import DataCard, parse_mixture
from ...data.features import FeatureCache, cache_features, image_key
from ...data.records import RecordError, Sample, load_record_image
from ...decoder import VPiTDecoderPipeline, VPiTVisionEncoderModel
from ...errors import RecipeError
from ...hub import push_folder, write_model_card
from ...model.configuration_vpit import VPiTConfig, VPiTVisionConfig
from ...model.modeling_vpit import VPiTForCausalLM
from ...toy.decoder import toy_decoder_components
from ..checkpoint import resume
from ..components import IMAGE_BATCH_KEYS, build_accelerator, build_image_batches, build_scheduler
from ..config import DecoderRecipe, check_against_config
from ..diffusion import (
    EMACheckpoint,
    create_decoder_ema,
    decoder_loss,
    decoder_schedulers,
    latents_from_moments,
    validation_reconstructions,
)
from ..evaluation import held_out_samples
from ..loop import plot_loss_curve, train_loop
from ..predictions import generation_samples, load_predictions, predict_generation_tokens, save_predictions


class DecoderTrainable(nn.Module):
    """The trainable parts in one module, so that DDP / DeepSpeed wrap a single model whose forward is the loss."""

    def __init__(self, pipeline: VPiTDecoderPipeline, noise_scheduler: SchedulerMixin, recipe: DecoderRecipe):
        super().__init__()
        self.unet = pipeline.unet
        self.projector = pipeline.projector
        # Kept out of the module tree: not trained, not wrapped, not saved in checkpoints.
        self._frozen: dict[str, Any] = {
            "vae": pipeline.vae,
            "encoder": pipeline.vision_encoder,
            "scheduler": noise_scheduler,
        }
        self.settings = recipe.decoder

    def forward(
        self,
        encoder_pixels: torch.Tensor | None,
        images: torch.Tensor | None,
        generator: torch.Generator,
        predicted_tokens: torch.Tensor | None = None,
        has_prediction: torch.Tensor | None = None,
        visual_tokens: torch.Tensor | None = None,
        latent_moments: torch.Tensor | None = None,
    ) -> Any:
        """The loss of a batch: the images as pixels for the encoder and the decoder, or what the frozen parts make
        of them, cached (`visual_tokens` (B, K, Dv) instead of `encoder_pixels`, `latent_moments` (B, 2C, h, w)
        instead of `images`): the same loss, drawn from the generator in the same order."""
        with torch.no_grad():
            if visual_tokens is None:
                visual_tokens = self._frozen["encoder"](encoder_pixels)  # (B, K, Dv), frozen
            if predicted_tokens is not None and has_prediction is not None:
                # The VPiT model's own predictions for a share of the images that have one (see predictions.py).
                draw = torch.rand(len(has_prediction), generator=generator).to(has_prediction.device)
                use = has_prediction & (draw < self.settings.predicted_tokens_fraction)
                visual_tokens = torch.where(use[:, None, None], predicted_tokens.to(visual_tokens.dtype), visual_tokens)
            latents = None
            if latent_moments is not None:  # the posterior sample, where decoder_loss would draw it from `images`
                latents = latents_from_moments(self._frozen["vae"], latent_moments, generator)
        return decoder_loss(
            self.unet,
            self.projector,
            self._frozen["scheduler"],
            visual_tokens,
            images=images,
            latents=latents,
            vae=self._frozen["vae"],
            condition_dropout=self.settings.condition_dropout,
            prediction_type=self.settings.prediction_type,
            snr_gamma=self.settings.snr_gamma,
            noise_offset=self.settings.noise_offset,
            token_noise=self.settings.token_noise,
            timestep_sampling=self.settings.timestep_sampling,
            logit_mean=self.settings.logit_mean,
            logit_std=self.settings.logit_std,
            mode_scale=self.settings.mode_scale,
            generator=generator,
        )


def build_decoder(recipe: DecoderRecipe) -> VPiTDecoderPipeline:
    """The pipeline to train: from the toy configs, a Stable Diffusion folder, or a saved decoder; its vision
    encoder from the VPiT model (`model.pretrained`) or the vision spec (`model.vision*`)."""
    spec, settings = recipe.model, recipe.decoder
    if spec.pretrained is not None:
        check_against_config(
            spec, VPiTConfig.from_pretrained(spec.pretrained), ("num_visual_tokens", "pooling"), spec.pretrained
        )
        # The encoder alone: the decoder never needs the language model's weights.
        encoder = VPiTVisionEncoderModel.from_vision_encoder(VPiTForCausalLM.load_vision_encoder(spec.pretrained))
    else:
        vision = VPiTVisionConfig(
            backend=spec.vision_backend,
            model_name=spec.vision,
            pretrained=spec.vision_pretrained,
            feature_layer=spec.feature_layer,
        )
        given = {"num_visual_tokens": spec.num_visual_tokens, "pooling": spec.pooling}
        encoder = VPiTVisionEncoderModel.from_spec(vision, **{k: v for k, v in given.items() if v is not None})
    init = settings.init
    if init == "toy":
        parts = toy_decoder_components(
            encoder.hidden_size,
            encoder.encoder.num_visual_tokens,
            projector_hidden_size=settings.projector_hidden_size,
            projector_type=settings.projector_type,
            latent=settings.latent,
            seed=recipe.train.seed,
            vae=AutoencoderKL.from_pretrained(settings.vae) if settings.vae else None,
            spatial_channels=settings.spatial_channels,
        )
        return VPiTDecoderPipeline(**parts, vision_encoder=encoder)
    if (Path(init) / "model_index.json").is_file() and "VPiTDecoderPipeline" in (
        Path(init) / "model_index.json"
    ).read_text():
        pipeline = VPiTDecoderPipeline.from_pretrained(init)
        trained_as = pipeline.scheduler.config.get("prediction_type", "epsilon")
        if trained_as != settings.prediction_type:
            raise RecipeError(
                f"decoder.init {init} was trained with prediction_type {trained_as!r} (its scheduler says so) but the "
                f"recipe continues it with {settings.prediction_type!r}: a changed objective retrains the UNet from "
                f"where it stands. Set decoder.prediction_type={trained_as} (and decoder.snr_gamma / "
                "decoder.timestep_sampling as it was trained) to continue it"
            )
        return pipeline
    return VPiTDecoderPipeline.from_text_to_image_pipeline(
        init,
        encoder.hidden_size,
        encoder.encoder.num_visual_tokens,
        projector_hidden_size=settings.projector_hidden_size,
        projector_type=settings.projector_type,
        vision_encoder=encoder,
        spatial_channels=settings.spatial_channels,
    )


def decoder_transform(resolution: int) -> transforms.Compose:
    """An image -> the decoder's training pixels: resized and centre-cropped to `resolution`, in [-1, 1]."""
    return transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


class ImageEncoder:
    """Sample -> its images, twice: for the vision encoder (its own transform) and for the decoder ([-1, 1] at the
    training resolution); with `frozen` ({card name: {"tokens": cache, "moments": cache}}, `open_frozen_cache`),
    their cached `visual_tokens` and `latent_moments` instead; with `predicted` ({image key: (K, Dv)}), also each
    image's predicted tokens (zeros and `has_prediction` False where there is none). Picklable, for DataLoader
    workers."""

    def __init__(
        self,
        encoder_transform: Any,
        resolution: int,
        predicted: dict[str, torch.Tensor] | None = None,
        frozen: dict[str, dict[str, FeatureCache]] | None = None,
    ):
        self.encoder_transform = encoder_transform
        self.predicted = predicted
        self.frozen = frozen
        self.decoder_transform = decoder_transform(resolution)

    def __call__(self, sample: Sample) -> dict[str, Any]:
        if not sample.images:
            raise RecordError("bad_record", "the decoder trains on images; this record has none")
        encoded = self._cached(sample) if self.frozen is not None else {}
        if len(encoded) < 2:  # the encoder's or the decoder's side still comes from the pixels
            images = [load_record_image(image, sample.image_root) for image in sample.images]
            if "visual_tokens" not in encoded:
                encoded["encoder_pixels"] = torch.stack([self.encoder_transform(i) for i in images])
            if "latent_moments" not in encoded:
                encoded["images"] = torch.stack([self.decoder_transform(i) for i in images])
        if self.predicted:
            found = [image_key(image, sample.image_root) for image in sample.images]
            tokens = [self.predicted.get(key[0]) if key is not None else None for key in found]
            zeros = torch.zeros_like(next(iter(self.predicted.values())))
            encoded["predicted_tokens"] = torch.stack([zeros if t is None else t for t in tokens])
            encoded["has_prediction"] = torch.tensor([t is not None for t in tokens])
        return encoded

    def _cached(self, sample: Sample) -> dict[str, torch.Tensor]:
        assert self.frozen is not None
        encoded = {}
        for part, cache in self.frozen.get(sample.source, {}).items():
            found = [t for image in sample.images if (t := cache.get(image, sample.image_root)) is not None]
            if len(found) < len(sample.images):
                for image in sample.images:  # a bad image is reported as such
                    load_record_image(image, sample.image_root)
                raise RecordError(
                    "stale_cache", f"an image of this record is not in {cache.folder} (changed since it was written?)"
                )
            encoded[FROZEN_PARTS[part]] = torch.stack(found)
        return encoded


# The frozen cache's parts: what each holds per image, and the batch key it fills.
FROZEN_PARTS = {"tokens": "visual_tokens", "moments": "latent_moments"}


def frozen_fingerprint(pipeline: VPiTDecoderPipeline, resolution: int) -> str:
    """16 hex digits over what the cached tokens and posterior moments depend on: the vision encoder's and the
    VAE's configurations and weights, and the training resolution (the encoder's transform follows its config)."""
    spec = {  # diffusers' bookkeeping (_name_or_path, _diffusers_version, ...) aside: a saved copy matches
        name: {k: v for k, v in module.config.items() if not k.startswith("_")} if module is not None else None
        for name, module in (("encoder", pipeline.vision_encoder), ("vae", pipeline.vae))
    } | {"resolution": resolution}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for module in (pipeline.vision_encoder, pipeline.vae):
        for name, tensor in module.state_dict().items() if module is not None else ():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def write_frozen_cache(
    pipeline: VPiTDecoderPipeline,
    encoder_transform: Any,
    resolution: int,
    cards: list[DataCard],
    folder: Path,
    fingerprint: str,
    use_sample: bool = False,
) -> dict[str, dict[str, int]]:
    """Every image of `cards` through the frozen vision encoder ((K, Dv) tokens) and the VAE ((2C, h, w) posterior
    moments), into FOLDER/<card>/tokens and FOLDER/<card>/moments (`vpit.data.features.cache_features`: safetensors
    keyed by image, resumable, bad images in skipped.jsonl), under `frozen_fingerprint(pipeline, resolution)`.
    Returns the counts per card and part."""
    if pipeline.vision_encoder is None:
        raise ValueError("decoder.cache_frozen needs the pipeline's vision encoder")
    encoder, vae = pipeline.vision_encoder, pipeline.vae
    parts: dict[str, tuple[Any, Any]] = {
        "tokens": (lambda pixels: encoder(pixels.to(encoder.device)), encoder_transform)
    }
    if vae is not None:
        parts["moments"] = (
            lambda pixels: vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters,
            decoder_transform(resolution),
        )
    counts = {}
    for card in cards:
        for part, (encode, transform) in parts.items():
            where = folder / card.name / part
            counts[f"{card.name}/{part}"] = cache_features(
                card, encode, transform, where, fingerprint, use_sample=use_sample
            )
    uncacheable = sum(c["uncacheable"] for c in counts.values())
    if uncacheable:
        raise RecipeError(
            f"decoder.cache_frozen: {uncacheable} images are held in memory, with no file or bytes to key a cache by; "
            "set decoder.cache_frozen=false for this data"
        )
    return counts


def open_frozen_cache(
    pipeline: VPiTDecoderPipeline, cards: list[DataCard], folder: Path, fingerprint: str
) -> dict[str, dict[str, FeatureCache]]:
    """{card name: {part: its cache}} of `write_frozen_cache`'s folder, checked against `fingerprint` (this
    pipeline's `frozen_fingerprint`)."""
    parts = ("tokens", "moments") if pipeline.vae is not None else ("tokens",)
    return {card.name: {part: FeatureCache(folder / card.name / part, fingerprint) for part in parts} for card in cards}


PREDICTIONS_FILE = "predicted_tokens.safetensors"
FROZEN_CACHE = "frozen_cache"


def _write_predictions(recipe: DecoderRecipe, run_dir: Path) -> None:
    """The VPiT model's predictions for the mixture's generation records, computed once (by the main process) into
    RUN/predicted_tokens.safetensors, with their statistics in RUN/predicted_tokens.json; a resumed run reuses them."""
    settings = recipe.decoder
    assert settings.predicted_tokens_from is not None
    cards = [entry.load() for entry in parse_mixture(recipe.data.mixture)]
    samples = generation_samples(cards, recipe.data.use_sample)[: settings.predicted_tokens_max_records]
    if not samples:
        raise ValueError("decoder.predicted_tokens_from is set but the mixture has no generation records")
    predictions, stats = predict_generation_tokens(
        settings.predicted_tokens_from, samples, settings.predicted_tokens_mode
    )
    save_predictions(run_dir / PREDICTIONS_FILE, predictions, stats)
    (run_dir / "predicted_tokens.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"[vpit] decoder: {stats['predictions']} {stats['mode']} predictions, cosine "
          f"{stats['mean_cosine_to_encoder_tokens']:.3f} to the encoder's tokens, {stats['seconds']:.0f} s")  # fmt: skip


def run(recipe: DecoderRecipe) -> Path:
    run_dir = Path(recipe.train.output_dir)
    accelerator = build_accelerator(recipe)
    set_seed(recipe.train.seed)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(recipe.tracking.project)

    # The pipeline: UNet + projector train; VAE and vision encoder frozen. The training noise schedule is DDPM's
    # with the pipeline scheduler's betas and the recipe's prediction type (which sampling then uses too), or, for
    # flow_prediction, flow matching's sigmas with DPM-Solver++ on the same sigmas for sampling.
    pipeline = build_decoder(recipe)
    settings = recipe.decoder
    pipeline.scheduler, noise_scheduler = decoder_schedulers(
        pipeline.scheduler, settings.prediction_type, settings.flow_shift
    )
    resolution = settings.resolution or pipeline.unet.config["sample_size"] * pipeline.vae_scale_factor
    trainable = DecoderTrainable(pipeline, noise_scheduler, recipe)
    trainable.unet.train()
    trainable.projector.train()
    unet_params = [p for p in trainable.unet.parameters() if p.requires_grad]
    projector_params = list(trainable.projector.parameters())
    groups = [
        {"params": unet_params, "lr": recipe.optim.lr},
        {"params": projector_params, "lr": recipe.optim.bridge_lr or recipe.optim.lr},
    ]
    optimizer = torch.optim.AdamW(groups, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
    scheduler = build_scheduler(optimizer, recipe)
    ema = create_decoder_ema(pipeline, decay=settings.ema_decay) if settings.ema_decay is not None else None
    model, optimizer, scheduler = accelerator.prepare(trainable, optimizer, scheduler)
    extras: tuple[EMACheckpoint, ...] = ()
    if ema is not None:
        ema.to(accelerator.device)
        extras = (EMACheckpoint(ema),)

    state = resume(accelerator, run_dir, recipe.train.resume, extras)

    rank, world = accelerator.process_index, accelerator.num_processes
    if pipeline.vision_encoder is None:
        raise ValueError("the decoder stage needs the pipeline's vision encoder (images -> visual tokens)")
    predicted = None
    if settings.predicted_tokens_from:
        if accelerator.is_main_process and not (run_dir / PREDICTIONS_FILE).is_file():
            _write_predictions(recipe, run_dir)
        accelerator.wait_for_everyone()
        predicted = load_predictions(run_dir / PREDICTIONS_FILE)
    frozen = None
    if settings.cache_frozen:
        folder = Path(settings.frozen_cache_dir or run_dir / FROZEN_CACHE)
        cards = [entry.load() for entry in parse_mixture(recipe.data.mixture)]
        fingerprint = frozen_fingerprint(pipeline, resolution)  # hashes the frozen weights: once per run
        if accelerator.is_main_process:
            started = time.perf_counter()
            transform = pipeline.vision_encoder.image_transform()
            counts = write_frozen_cache(
                pipeline, transform, resolution, cards, folder, fingerprint, recipe.data.use_sample
            )
            tokens = [c for part, c in counts.items() if part.endswith("/tokens")]  # one per image
            encoded, skipped = (sum(c[key] for c in tokens) for key in ("encoded", "skipped"))
            print(f"[vpit] decoder: frozen cache in {folder}: {encoded} images encoded now "
                  f"({time.perf_counter() - started:.0f} s), {skipped} skipped (skipped.jsonl)")  # fmt: skip
        accelerator.wait_for_everyone()
        frozen = open_frozen_cache(pipeline, cards, folder, fingerprint)
    encode = ImageEncoder(pipeline.vision_encoder.image_transform(), resolution, predicted, frozen)
    loader = build_image_batches(recipe.data, encode, rank, world, run_dir, start_batch=state.next_batch)
    params = unet_params + projector_params

    def compute_loss(batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Noise, timesteps and dropout are drawn from (seed, step, rank): a resumed run draws the same ones.
        generator = torch.Generator().manual_seed(recipe.train.seed * 1_000_003 + step * 1009 + rank)
        device = accelerator.device
        inputs = {key: batch[key].to(device) for key in IMAGE_BATCH_KEYS if key in batch}
        out = model(inputs.pop("encoder_pixels", None), inputs.pop("images", None), generator, **inputs)
        return out.loss, {"loss": out.loss, "mse": out.mse}

    def after_step() -> None:
        if ema is not None:
            ema.step(params)

    evaluate = None
    if recipe.train.eval_every:
        cards = [entry.load() for entry in parse_mixture(recipe.data.eval_mixture or recipe.data.mixture)]
        held_out = [
            load_record_image(s.images[-1], s.image_root)
            for s in held_out_samples(cards, cards[0].task, 0, 1, settings.validation_images, recipe.data.use_sample)
            if s.images
        ]

        def evaluate(step: int) -> dict[str, float]:
            if accelerator.is_main_process and held_out:
                if ema is not None:
                    ema.store(params)
                    ema.copy_to(params)
                grid = validation_reconstructions(
                    pipeline,
                    held_out,
                    settings.validation_steps,
                    settings.guidance_scale,
                    generator=torch.Generator().manual_seed(0),
                )
                if ema is not None:
                    ema.restore(params)
                path = run_dir / "eval" / f"reconstructions-{step:08d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                grid.save(path)
                for tracker in accelerator.trackers:
                    if hasattr(tracker, "log_images"):
                        # (1, H, W, C): TensorBoard's add_images takes one array; W&B iterates it as one image.
                        tracker.log_images({"reconstructions": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
            trainable.unet.train()
            trainable.projector.train()
            return {}

    state = train_loop(
        accelerator,
        model,
        iter(loader),
        optimizer,
        scheduler,
        recipe,
        run_dir,
        state,
        evaluate,
        compute_loss=compute_loss,
        after_step=after_step,
        checkpoint_extras=extras,
    )

    # The final folder: the pipeline with the EMA weights, loadable with DiffusionPipeline.from_pretrained.
    final = run_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(params)
        pipeline.save_pretrained(final)
        (final / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        write_model_card(
            final,
            recipe.hub.repo_id or run_dir.name,
            license=recipe.hub.license,
            metrics={"steps": state.step, "images": state.samples},
            training_config=recipe.to_dict(),
        )
        if recipe.hub.push and recipe.hub.repo_id:
            push_folder(final, recipe.hub.repo_id, private=recipe.hub.private)
        (run_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in state.history))
        plot_loss_curve(state.history, run_dir / "loss_curve.png")
        print(f"[vpit] decoder: {state.step} steps, {state.samples} images; final decoder in {final}")
    accelerator.end_training()
    return final


__all__ = [
    "DecoderTrainable",
    "ImageEncoder",
    "build_decoder",
    "decoder_transform",
    "frozen_fingerprint",
    "open_frozen_cache",
    "run",
    "write_frozen_cache",
]
