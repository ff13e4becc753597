"""Builders shared by the recipes: accelerator, model, data, optimizer, schedule. Plain functions, explicit inputs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_scheduler

from ..data.cards import parse_mixture
from ..data.collator import VPiTCollator
from ..data.dataset import SkipLog, VPiTBatches, VPiTDataset
from ..data.features import open_feature_caches
from ..data.records import Sample
from ..model.assembly import assemble
from ..model.lora import apply_image_token_rows, apply_lora
from ..model.modeling_vpit import VPiTForCausalLM, full_shape
from ..model.processing_vpit import VPiTProcessor
from .config import DataSection, InstructionRecipe, Recipe, check_against_config


def build_accelerator(recipe: Recipe) -> Accelerator:
    """An Accelerator for the launch configuration in effect (single process, DDP, DeepSpeed ZeRO, multi-node).

    On a machine without CUDA, a distributed launch needs the gloo backend named explicitly: accelerate 1.15
    otherwise leaves its backend unset under DeepSpeed, initialises torch.distributed through DeepSpeed anyway,
    and then reports process_index 0 and num_processes 1 on every rank (ranks would all load the same data and
    all write checkpoints). With the backend named, accelerate reads the real rank and world size.
    """
    if recipe.train.torch_threads is not None:
        torch.set_num_threads(recipe.train.torch_threads)
    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    run_dir = Path(recipe.train.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.optim.gradient_accumulation_steps,
        # The schedule is built in optimizer steps and the loop steps it once per optimizer step. Left to accelerate,
        # a prepared scheduler steps once per process at every optimizer step (its batches-per-process convention),
        # so warm-up and decay would run num_processes times too fast.
        step_scheduler_with_optimizer=False,
        mixed_precision=recipe.train.mixed_precision,
        log_with=recipe.tracking.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=handlers,
    )
    check_launch(accelerator)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # We shard the data ourselves (each rank reads its own slice of the mixture), so the DataLoader is not
        # prepared and DeepSpeed cannot infer "auto" batch sizes from it: fill them in.
        config = plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = recipe.data.batch_size
        config["train_batch_size"] = (
            recipe.data.batch_size * recipe.optim.gradient_accumulation_steps * accelerator.num_processes
        )
        if recipe.optim.max_grad_norm is not None:
            config["gradient_clipping"] = recipe.optim.max_grad_norm
    return accelerator


def check_launch(accelerator: Accelerator) -> None:
    """Fail when the accelerator did not set up what the launcher started, instead of training N unrelated copies.

    accelerate 1.15 enables FSDP only on accelerator devices (CUDA, XPU, NPU, ...): an FSDP config launched on CPUs
    gives every process a single-process accelerator (or plain data parallelism with `--cpu`), each writing the
    same outputs.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes but accelerate set up {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type.value}); on a machine without CUDA, launch with a "
            "DeepSpeed config (recipes/accelerate/deepspeed_zero3.yaml runs on CPUs with gloo)"
        )
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        and accelerator.distributed_type.value != "FSDP"
    ):
        raise RuntimeError(
            f"an FSDP launch config, but accelerate set up {accelerator.distributed_type.value}: accelerate runs FSDP "
            "on accelerator devices only (CUDA, XPU, NPU, ...); on CPUs use recipes/accelerate/deepspeed_zero3.yaml"
        )


# model. keys that define the architecture (a saved folder's must match) and those that set the losses (a recipe's
# replace a saved folder's); assembling a new model takes both.
ARCHITECTURE = (
    "num_visual_tokens",
    "pooling",
    "bridge",
    "bridge_options",
    "token_bridge",
    "image_attention",
    "visual_head",
    "visual_head_options",
    "visual_target",
    "initializer_range",
)
LOSS_SETTINGS = ("visual_loss", "visual_loss_beta", "visual_loss_weight", "text_loss_weight")


def build_model(recipe: InstructionRecipe) -> tuple[nn.Module, VPiTProcessor]:
    """Load or assemble the model, wrap it with LoRA when asked, freeze what the recipe freezes."""
    spec = recipe.model
    if spec.pretrained is not None:
        model = VPiTForCausalLM.from_pretrained(
            spec.pretrained,
            dtype=getattr(torch, spec.dtype) if spec.dtype else None,
            attn_implementation=spec.attn_implementation,
            trust_remote_code=spec.trust_remote_code,
        )
        processor = VPiTProcessor.from_pretrained(spec.pretrained, trust_remote_code=spec.trust_remote_code)
        check_against_config(spec, model.config, ARCHITECTURE, spec.pretrained)
        for key in LOSS_SETTINGS:  # losses, not architecture: the recipe sets them for its stage
            if getattr(spec, key) is not None:
                setattr(model.config, key, getattr(spec, key))
        model.config._check()
    else:
        assert spec.llm is not None  # ModelSection validation guarantees one of the two
        model, processor = assemble(
            spec.llm,
            spec.vision,
            vision_backend=spec.vision_backend,
            vision_pretrained=spec.vision_pretrained,
            feature_layer=spec.feature_layer,
            dtype=spec.dtype,
            attn_implementation=spec.attn_implementation,
            trust_remote_code=spec.trust_remote_code,
            **{
                key: getattr(spec, key)
                for key in (*ARCHITECTURE, *LOSS_SETTINGS)
                if getattr(spec, key) is not None  # unset: VPiTConfig's default
            },
        )
    queries = getattr(recipe, "queries", None)  # the queries stage's section
    if queries is not None:
        enable_queries(model, queries, str(spec.pretrained))
    model.fused_cross_entropy = recipe.train.fused_cross_entropy
    model.z_loss_weight = recipe.train.z_loss
    if recipe.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora.enabled:
        lora = recipe.lora
        wrapped = apply_lora(
            model, lora.r, lora.alpha, lora.dropout, lora.target_modules, not recipe.freeze.new_token_rows
        )
        return wrapped, processor
    return freeze(model, recipe), processor


def enable_queries(model: VPiTForCausalLM, section: Any, where: str) -> None:
    """Put the model in the 'queries' generation mode with the recipe's queries and connector (`add_queries`), or,
    for a model saved in that mode, check that the recipe agrees with it."""
    wanted = {key: getattr(section, key) for key in ("num_queries", "connector", "connector_options", "condition_size")}
    if not model.makes_queries:
        model.add_queries(**wanted)
        return
    differ = {key: (getattr(model.config, key), value) for key, value in wanted.items()
              if getattr(model.config, key) != value}  # fmt: skip
    if differ:
        saved = ", ".join(f"{key}={old!r}" for key, (old, _) in differ.items())
        given = ", ".join(f"{key}={new!r}" for key, (_, new) in differ.items())
        raise ValueError(
            f"{where} makes images through queries with {saved}, but the recipe's queries section says {given}; "
            "the saved folder is the home of its architecture: make the recipe agree with it"
        )


def freeze(model: VPiTForCausalLM, recipe: InstructionRecipe) -> nn.Module:
    """Apply the recipe's freezing. With a frozen LLM the image-token rows can still train: they alone, through
    peft's TrainableTokens, so no other row of the embedding or LM head can change and none holds optimizer state.
    Returns the model to train (wrapped when the rows train)."""
    rules = recipe.freeze
    model.vision_tower.freeze()
    for bridge in (model.bridge, model.token_bridge):  # (a resampling model's token-wise bridge is a bridge too)
        if bridge is not None:
            bridge.requires_grad_(not rules.bridge)
    model.visual_head.requires_grad_(not rules.visual_head)
    if not rules.llm:
        return model
    model.language_model.requires_grad_(False)
    if rules.new_token_rows:
        return model
    if hasattr(model.get_input_embeddings().weight, "ds_id"):
        raise ValueError(
            "freeze.llm with trainable image-token rows trains a few rows of the embedding and LM head, which "
            "DeepSpeed ZeRO-3 (partitioned parameters) does not support; use ZeRO-2 for the bridge stage (its "
            "trainable part is small) or set freeze.new_token_rows: true"
        )
    return apply_image_token_rows(model)


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """AdamW groups: LLM / bridge / visual head learning rates (the queries mode's connector and queries train at
    the bridge's); no weight decay on biases, norms, embeddings (the queries are one)."""
    optim = recipe.optim
    bridge_lr = optim.bridge_lr if optim.bridge_lr is not None else optim.lr
    head_lr = optim.visual_head_lr if optim.visual_head_lr is not None else bridge_lr
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    no_decay_modules = {id(m) for m in model.modules() if isinstance(m, nn.Embedding) or "Norm" in type(m).__name__}
    no_decay_params = {id(p) for m in model.modules() if id(m) in no_decay_modules for p in m.parameters(recurse=False)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        bridge = "bridge" in parts or "token_bridge" in parts or "connector" in parts  # adapters: the bridge's lr
        part = "bridge" if bridge else "visual_head" if "visual_head" in parts else "llm"
        rows = "trainable_tokens" in name  # token rows are embedding rows: no decay, as for the embedding
        decay = len(full_shape(param)) >= 2 and id(param) not in no_decay_params and not rows
        groups.setdefault((part, decay), []).append(param)
    lrs = {"llm": optim.lr, "bridge": bridge_lr, "visual_head": head_lr}
    return [
        {"params": params, "lr": lrs[part], "weight_decay": optim.weight_decay if decay else 0.0, "name": f"{part}"}
        for (part, decay), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    groups = param_groups(model, recipe)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen (check the recipe's freeze section)")
    betas = (float(recipe.optim.betas[0]), float(recipe.optim.betas[1]))
    return torch.optim.AdamW(groups, lr=recipe.optim.lr, betas=betas)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> Any:
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[recipe.optim.schedule]
    return get_scheduler(
        name, optimizer, num_warmup_steps=recipe.optim.warmup_steps, num_training_steps=recipe.train.max_steps
    )


def build_batches(
    data: DataSection,
    processor: VPiTProcessor,
    rank: int,
    world_size: int,
    run_dir: Path,
    start_batch: int = 0,
    base: Path | None = None,
    encoder_fingerprint: str | None = None,
    encode: Callable[[Sample], dict[str, Any]] | None = None,
) -> DataLoader:
    """This rank's DataLoader of collated batches from the recipe's mixture (see `VPiTBatches`). With the model's
    `encoder_fingerprint`, a card whose encoder tokens were cached for it (`vpit data cache-features`) has them read
    instead of its images (unless `data.use_features` is false). `encode` replaces the processor's own encoding of
    a sample (e.g. the queries stage's `encode_query_sample`); it reads images, never a feature cache."""
    entries = parse_mixture(data.mixture)
    cards = [entry.load(base) for entry in entries]
    fingerprint = encoder_fingerprint if data.use_features and encode is None else None
    features = open_feature_caches(cards, fingerprint, data.use_sample)
    for card, cache in zip(cards, features, strict=True):
        if cache is not None and rank == 0:
            print(f"[vpit] {card.name}: encoder tokens of {len(cache)} images read from {cache.folder}")
    dataset = VPiTDataset(
        cards,
        processor if encode is None else None,
        weights=[e.weight for e in entries],
        caps=[e.cap for e in entries],
        seed=data.seed,
        rank=rank,
        world_size=world_size,
        max_length=data.max_length,
        skip_log=SkipLog(run_dir / "skipped.jsonl", data.max_skip_rate, data.min_records_for_skip_rate),
        use_sample=data.use_sample,
        features=features,
        encode=encode,
    )
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # Llama 3: no pad
    collate = VPiTCollator(
        int(pad),
        pack=data.pack,
        max_length=data.max_length if data.pack else None,
    )
    batches = VPiTBatches(dataset, data.batch_size, collate, start_batch=start_batch)
    loader = DataLoader(batches, batch_size=None, num_workers=data.num_workers, persistent_workers=False)
    return loader


# What a decoder sample carries per image: pixels for the encoder and the decoder, or the frozen parts' cached
# outputs in their place; and, when trained on predictions, the predicted tokens and which images have one.
IMAGE_BATCH_KEYS = ("encoder_pixels", "images", "visual_tokens", "latent_moments", "predicted_tokens", "has_prediction")


def _concat_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Image batches for the decoder: every image of every sample, concatenated, per IMAGE_BATCH_KEYS."""
    batch: dict[str, Any] = {key: torch.cat([s[key] for s in samples]) for key in IMAGE_BATCH_KEYS if key in samples[0]}
    images = "images" if "images" in batch else "latent_moments"
    return batch | {"num_samples": len(batch[images]), "num_skipped": 0}


def build_image_batches(
    data: DataSection,
    encode: Any,
    rank: int,
    world_size: int,
    run_dir: Path,
    start_batch: int = 0,
) -> DataLoader:
    """Like `build_batches`, for image-only training (the decoder): `encode(sample)` gives its images."""
    entries = parse_mixture(data.mixture)
    dataset = VPiTDataset(
        [entry.load() for entry in entries],
        weights=[e.weight for e in entries],
        caps=[e.cap for e in entries],
        seed=data.seed,
        rank=rank,
        world_size=world_size,
        skip_log=SkipLog(run_dir / "skipped.jsonl", data.max_skip_rate, data.min_records_for_skip_rate),
        use_sample=data.use_sample,
        encode=encode,
    )
    batches = VPiTBatches(dataset, data.batch_size, _concat_images, start_batch=start_batch)
    return DataLoader(batches, batch_size=None, num_workers=data.num_workers, persistent_workers=False)


__all__ = [
    "IMAGE_BATCH_KEYS",
    "build_accelerator",
    "build_batches",
    "build_image_batches",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "check_launch",
    "freeze",
    "param_groups",
]
