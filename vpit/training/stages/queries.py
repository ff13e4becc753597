"""The `queries` stage: learned queries, a connector and the decoder, trained end to end (MetaQuery, NExT-GPT).

An alternative to `vpit` + `decoder`. The model (a bridge- or vpit-stage folder) gets Q learned queries and a
connector (`VPiTForCausalLM.add_queries`); each generation or edit record becomes its conversation up to the
answer's `<image_start>`, then the Q queries (`vpit.data.encode.encode_query_sample`). The LLM reads it (prompt
images through the bridge), the connector turns its final hidden states at the queries into condition tokens, and
the decoder's diffusion loss on the answer's image trains the connector, the queries, the decoder's projector and
UNet, and the LLM when it is not frozen (LoRA or full), all through one backward. The decoder thus learns from what
the language model produces, never from exact encoder tokens. Condition dropout (`decoder.condition_dropout`)
keeps classifier-free guidance.

The loss of a step is its global batch's: the per-image diffusion losses summed over the global batch's images (of
every process and micro-batch) over their count, whatever the split. `queries.align_loss_weight` adds NExT-GPT's
alignment of the conditions with the decoder's native condition (the target's encoder tokens), weighed the same way.

The LLM learns no text here (the records hold generation and edits only, and a CE on them alone would teach it to
open an image in every answer): a model asked for an image opens it when its answer starts with the image
(`start_with_image=True`, `vpit generate --start-with-image`, `vpit chat`'s `/draw`), as MetaQuery's frozen LLM is
asked.

Output: RUN/final/model (a VPiT folder in the 'queries' generation mode) and RUN/final/decoder (a
`VPiTDecoderPipeline` folder): the pair `vpit generate`, `vpit chat` and `VPiTPipeline` take. Reads top to bottom.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from accelerate.utils import DistributedType, set_seed
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import EMAModel
from peft import PeftModel
from torch import nn

from ...data.encode import encode_query_sample
from ...data.records import Sample
from ...decoder import VPiTDecoderPipeline
from ...hub import push_folder, write_model_card
from ...model.lora import load_lora, merge_lora
from ...model.modeling_vpit import VPiTForCausalLM
from ...model.processing_vpit import VPiTProcessor
from ..checkpoint import full_state_dict, resume
from ..components import build_accelerator, build_batches, build_model, build_scheduler, param_groups
from ..config import QueriesRecipe
from ..diffusion import EMACheckpoint, decoder_loss, decoder_schedulers
from ..loop import plot_loss_curve, train_loop
from .decoder import build_decoder, decoder_transform


def _base(model: nn.Module) -> VPiTForCausalLM:
    """The VPiT model under a peft wrapper (LoRA, or the image-token rows), whose layers carry the adapters."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    assert isinstance(base, VPiTForCausalLM)
    return base


class QueriesTrainable(nn.Module):
    """The VPiT model, the decoder's UNet and projector in one module whose forward is the loss, so that DDP /
    DeepSpeed wrap a single model; the VAE and the noise scheduler stay outside the module tree (frozen, unsaved)."""

    def __init__(
        self, model: nn.Module, pipeline: VPiTDecoderPipeline, noise_scheduler: SchedulerMixin, recipe: QueriesRecipe
    ):
        super().__init__()
        self.model = model
        # accelerate sizes DeepSpeed's "auto" buckets from `model.config.hidden_size`: the LLM's width.
        self.config = _base(model).config
        self.unet = pipeline.unet
        self.projector = pipeline.projector
        self._frozen: dict[str, Any] = {
            "vae": pipeline.vae,
            "scheduler": noise_scheduler,
            "encoder": pipeline.vision_encoder,
        }
        self.settings = recipe.decoder
        self.num_queries = recipe.queries.num_queries
        self.align_loss_weight = recipe.queries.align_loss_weight

    def forward(
        self, batch: dict[str, Any], generator: torch.Generator, global_counts: torch.Tensor, scale: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's share of the global batch's loss (times `scale` = processes x micro-batches, which
        data parallelism and accumulation divide by again), and its named terms (shares of the global ones)."""
        device = self.projector.device
        inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
        conditions = _base(self.model).query_forward(
            query_mask=batch["visual_target_mask"].to(device),
            pixel_values=batch["pixel_values"].to(device) if "pixel_values" in batch else None,
            **inputs,
        )  # (B, Q, C)
        out = decoder_loss(
            self.unet,
            self.projector,
            self._frozen["scheduler"],
            conditions,
            images=batch["decoder_images"].to(device),
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
        # decoder_loss is this micro-batch's mean over its images: as a sum over the global batch's images.
        images = global_counts[1].to(out.loss.device) / self.num_queries
        share = conditions.shape[0] / images
        diffusion = out.loss * share
        terms = {"loss": diffusion, "diffusion_loss": diffusion, "mse": out.mse * share}
        loss = diffusion
        if self.align_loss_weight > 0:
            # NExT-GPT's alignment: the conditions near the decoder's native condition, the target's encoder tokens.
            with torch.no_grad():
                native = self._frozen["encoder"](batch["target_pixels"].to(device))  # (B, K, Dv)
            cosine = F.cosine_similarity(conditions, native.to(conditions.dtype), dim=-1)  # (B, Q)
            align = (1 - cosine).mean(dim=-1).sum() / images
            loss = diffusion + self.align_loss_weight * align
            terms |= {"loss": loss, "align_loss": align}
        return loss * scale, {key: value.detach() for key, value in terms.items()}


class QuerySamples:
    """Sample -> `encode_query_sample(...)`, the target through the vision encoder's transform too when the
    alignment term needs it; picklable, for DataLoader workers."""

    def __init__(
        self, processor: VPiTProcessor, num_queries: int, resolution: int, max_length: int | None, align: bool
    ):
        self.processor, self.num_queries, self.max_length = processor, num_queries, max_length
        self.transform = decoder_transform(resolution)
        self.encoder_transform = processor.image_transform if align else None

    def __call__(self, sample: Sample) -> dict[str, Any]:
        return encode_query_sample(
            sample, self.processor, self.num_queries, self.transform, self.max_length, self.encoder_transform
        )


def check_sizes(model: VPiTForCausalLM, pipeline: VPiTDecoderPipeline, align_loss_weight: float, source: str) -> None:
    """Refuse a decoder that does not read the model's (Q, C) condition tokens, and an alignment term whose sizes
    are not the encoder's (Q = K, C = Dv), each with the fix."""
    pipeline.check_condition(model.image_slots, model.condition_size, source)
    native = (model.config.num_visual_tokens, model.vision_tower.hidden_size)
    if align_loss_weight > 0 and (model.image_slots, model.condition_size) != native:
        raise ValueError(
            f"queries.align_loss_weight aligns each condition token with the target's encoder token: it needs "
            f"num_queries = K = {native[0]} and condition_size = Dv = {native[1]}, got "
            f"({model.image_slots}, {model.condition_size}); set it to 0 or match the sizes"
        )
    if align_loss_weight > 0 and pipeline.vision_encoder is None:
        raise ValueError("queries.align_loss_weight reads the target through the decoder's vision encoder; it has none")


def run(recipe: QueriesRecipe) -> Path:
    run_dir = Path(recipe.train.output_dir)
    accelerator = build_accelerator(recipe)
    set_seed(recipe.train.seed)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(recipe.tracking.project)
    if recipe.train.eval_every:
        raise ValueError(
            "the queries stage has no periodic evaluation: set train.eval_every: 0 and judge the final folders with "
            "`vpit eval toy` or `vpit generate`"
        )
    settings = recipe.decoder
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    zero3 = plugin is not None and plugin.zero_stage == 3
    if settings.ema_decay is not None and zero3:
        raise ValueError("decoder.ema_decay under ZeRO-3 would average partitions; set it to null (or use ZeRO-2)")

    # The model in the queries mode (LoRA and freezing applied), and the decoder whose condition it feeds.
    model, processor = build_model(recipe)
    lora_base = None
    if recipe.lora.enabled:  # the merged final model is rebuilt from this base + the adapter
        lora_base = run_dir / "base"
        if accelerator.is_main_process and not (lora_base / "config.json").exists():
            model.get_base_model().save_pretrained(lora_base)  # type: ignore[operator]  # a peft PeftModel
            processor.save_pretrained(lora_base)
    pipeline = build_decoder(recipe)  # type: ignore[arg-type]  # reads model / decoder / train, as a DecoderRecipe
    base = _base(model)
    check_sizes(base, pipeline, recipe.queries.align_loss_weight, f"the model ({recipe.model.pretrained})")
    pipeline.scheduler, noise_scheduler = decoder_schedulers(
        pipeline.scheduler, settings.prediction_type, settings.flow_shift
    )
    resolution = settings.resolution or pipeline.unet.config["sample_size"] * pipeline.vae_scale_factor
    pipeline.unet.requires_grad_(recipe.queries.train_unet)
    trainable = QueriesTrainable(model, pipeline, noise_scheduler, recipe)
    trainable.train()

    decoder_lr = recipe.queries.decoder_lr or recipe.optim.lr
    decoder_params = [p for p in [*trainable.unet.parameters(), *trainable.projector.parameters()] if p.requires_grad]
    groups = [*param_groups(model, recipe), {"params": decoder_params, "lr": decoder_lr, "name": "decoder"}]
    betas = (float(recipe.optim.betas[0]), float(recipe.optim.betas[1]))
    optimizer = torch.optim.AdamW(groups, lr=recipe.optim.lr, betas=betas, weight_decay=recipe.optim.weight_decay)
    scheduler = build_scheduler(optimizer, recipe)
    params = [p for p in trainable.parameters() if p.requires_grad]
    ema = EMAModel(params, decay=settings.ema_decay) if settings.ema_decay is not None else None
    prepared, optimizer, scheduler = accelerator.prepare(trainable, optimizer, scheduler)
    extras: tuple[EMACheckpoint, ...] = ()
    if ema is not None:
        ema.to(accelerator.device)
        extras = (EMACheckpoint(ema),)
    state = resume(accelerator, run_dir, recipe.train.resume, extras)

    rank, world = accelerator.process_index, accelerator.num_processes
    align = recipe.queries.align_loss_weight > 0
    encode = QuerySamples(processor, recipe.queries.num_queries, resolution, recipe.data.max_length, align)
    loader = build_batches(recipe.data, processor, rank, world, run_dir, start_batch=state.next_batch, encode=encode)
    scale = world * recipe.optim.gradient_accumulation_steps

    def compute_loss(
        batch: dict[str, Any], step: int, global_counts: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Noise, timesteps and dropout are drawn from (seed, step, rank): a resumed run draws the same ones.
        generator = torch.Generator().manual_seed(recipe.train.seed * 1_000_003 + step * 1009 + rank)
        loss, terms = prepared(batch, generator, global_counts, scale)
        return loss, terms

    def after_step() -> None:
        if ema is not None:
            ema.step(params)

    state = train_loop(
        accelerator,
        prepared,
        iter(loader),
        optimizer,
        scheduler,
        recipe,
        run_dir,
        state,
        compute_loss=compute_loss,
        after_step=after_step,
        checkpoint_extras=extras,
        global_loss=True,
    )

    # The final pair of folders, with the EMA weights when there is an EMA.
    final = run_dir / "final"
    if ema is not None:
        ema.copy_to(params)
    weights = full_state_dict(accelerator, prepared)  # gathered across ranks under ZeRO-3 / FSDP2
    counts = accelerator.reduce(torch.tensor([state.samples, state.skipped], device=accelerator.device), "sum")
    samples, skipped = (int(c) for c in counts.cpu())  # over all processes
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(prepared)
        parts = {name: {k.removeprefix(f"{name}."): v for k, v in weights.items() if k.startswith(f"{name}.")}
                 for name in ("model", "unet", "projector")}  # fmt: skip
        _save_model(unwrapped.model, parts["model"], processor, final / "model", run_dir, lora_base)
        # Fresh UNet and projector take the gathered weights (under ZeRO-3 the trained ones hold only a partition).
        unet: nn.Module = type(pipeline.unet).from_config(pipeline.unet.config)  # type: ignore[assignment]
        unet.load_state_dict(parts["unet"])
        projector: nn.Module = type(pipeline.projector).from_config(pipeline.projector.config)  # type: ignore[assignment]
        projector.load_state_dict(parts["projector"])
        VPiTDecoderPipeline(**{**pipeline.components, "unet": unet, "projector": projector}).save_pretrained(
            final / "decoder"
        )
        summary = {"steps": state.step, "samples": samples, "skipped": skipped,
                   "final": {k: v for k, v in (state.history[-1] if state.history else {}).items() if math.isfinite(v)}}  # fmt: skip
        for folder in (final / "model", final / "decoder"):
            (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            write_model_card(
                folder,
                recipe.hub.repo_id or f"{run_dir.name}-{folder.name}",
                license=recipe.hub.license,
                metrics={"steps": state.step, "images": samples},
                training_config=recipe.to_dict(),
            )
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (run_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in state.history))
        plot_loss_curve(state.history, run_dir / "loss_curve.png")
        if recipe.hub.push and recipe.hub.repo_id:
            push_folder(final / "model", recipe.hub.repo_id, private=recipe.hub.private)
            push_folder(final / "decoder", f"{recipe.hub.repo_id}-decoder", private=recipe.hub.private)
        print(
            f"[vpit] queries: {state.step} steps, {samples} samples, {skipped} records skipped (see "
            f"{run_dir / 'skipped.jsonl'}); model in {final / 'model'}, decoder in {final / 'decoder'}"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _save_model(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    processor: VPiTProcessor,
    folder: Path,
    run_dir: Path,
    lora_base: Path | None,
) -> None:
    """The VPiT folder, loadable without peft: LoRA (or the image-token rows) merged in."""
    if lora_base is not None:
        assert isinstance(model, PeftModel)
        model.save_pretrained(str(run_dir / "adapter"), state_dict=weights)
        merge_lora(load_lora(lora_base, run_dir / "adapter")).save_pretrained(folder)
    elif isinstance(model, PeftModel):  # the image-token rows (TrainableTokens)
        model.load_state_dict(weights)
        merge_lora(model).save_pretrained(folder)
    else:
        assert isinstance(model, VPiTForCausalLM)
        model.save_pretrained(folder, state_dict=weights)
    processor.save_pretrained(folder)


__all__ = ["QueriesTrainable", "QuerySamples", "check_sizes", "decoder_transform", "run"]
