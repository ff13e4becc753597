"""Periodic evaluation during training: held-out losses, answer accuracy, and generated-image grids.

Every process evaluates its own share of the held-out samples with the same number of forward passes (fixed-
length greedy decoding, no early stop), so DeepSpeed ZeRO-3 ranks stay in step; the counts are summed over
processes.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from PIL import Image
from torch import nn

from ..data.cards import DataCard
from ..data.formats import with_image_token
from ..data.records import RecordError, Sample, load_record_image
from ..inference.generation import generate
from ..model.images import ImageSource
from ..model.modeling_vpit import VPiTForCausalLM
from ..model.processing_vpit import VPiTProcessor

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, no punctuation, single spaces."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def held_out_samples(
    cards: Sequence[DataCard], task: str, rank: int, world: int, per_rank: int, use_sample: bool = False
) -> list[Sample]:
    """The first `per_rank * world` usable samples of the cards of `task`, this rank's share (the same count on
    every rank), from each card's source (or its shipped sample with `use_sample`). Bad records are left out here;
    the validation report lists them."""
    chosen: list[Sample] = []
    for card in cards:
        if card.task != task:
            continue
        for index, record in card.records(use_sample):
            if isinstance(record, RecordError):
                continue
            try:
                chosen.append(card.to_sample(index, record, use_sample=use_sample))
            except RecordError:
                continue
            if len(chosen) == per_rank * world:
                return chosen[rank::world]
    usable = len(chosen) // world * world
    return chosen[:usable][rank::world]


def _base(accelerator: Accelerator, model: nn.Module) -> VPiTForCausalLM:
    unwrapped = accelerator.unwrap_model(model)
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped  # peft: LoRA in place
    if not isinstance(base, VPiTForCausalLM):
        raise TypeError(f"expected a VPiTForCausalLM, got {type(base).__name__}")
    return base


@torch.no_grad()
def answer_accuracy(
    accelerator: Accelerator,
    model: nn.Module,
    processor: VPiTProcessor,
    samples: Sequence[Sample],
    max_new_tokens: int = 24,
) -> dict[str, float]:
    """Greedy answers to the held-out questions (the conversation up to its last assistant turn) scored by exact
    match after VQA normalisation."""
    base = _base(accelerator, model)
    eos = processor.tokenizer.eos_token_id
    correct = 0
    for sample in samples:
        messages = with_image_token(sample.messages[:-1], processor.image_token)
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        images: list[ImageSource] = [
            load_record_image(image, sample.image_root)
            for image in sample.images[: sum(m["content"].count(processor.image_token) for m in messages)]
        ]
        batch = processor([prompt], images=images or None, add_special_tokens=False)
        out = generate(
            base,
            batch["input_ids"].to(accelerator.device),
            batch["attention_mask"].to(accelerator.device),
            batch["pixel_values"].to(accelerator.device) if "pixel_values" in batch else None,
            max_new_tokens=max_new_tokens,
            eos_token_id=[],  # every rank decodes the same number of steps
        )
        assert out.sequences is not None
        new = out.sequences[0, batch["input_ids"].shape[1] :].tolist()
        if eos in new:
            new = new[: new.index(eos)]
        prediction = processor.decode(new, skip_special_tokens=True)
        correct += normalize_answer(prediction) == normalize_answer(sample.messages[-1]["content"])
    counts = accelerator.reduce(torch.tensor([correct, len(samples)], device=accelerator.device), reduction="sum")
    correct_all, total = (int(c) for c in counts.cpu())
    return {"eval_answer_accuracy": correct_all / max(total, 1)}


def image_grid(images: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    """Tile equally sized images into one grid image."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return grid


@torch.no_grad()
def generation_grid(
    accelerator: Accelerator,
    model: nn.Module,
    processor: VPiTProcessor,
    decoder: Any,
    prompts: Sequence[str],
    path: Path,
    num_inference_steps: int = 20,
) -> Path | None:
    """Generate one image per prompt (a forced `<image_start>` after the prompt), decode the visual tokens with
    the diffusion decoder, and save a grid. Every process runs the same steps; the main process writes."""
    base = _base(accelerator, model)
    start = torch.tensor([[base.config.image_start_token_id]])
    tokens = []
    for prompt in prompts:
        text = processor.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = processor.tokenizer([text], return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = generate(
            base,
            torch.cat([ids, start], dim=1).to(accelerator.device),
            max_new_tokens=1 + base.config.num_visual_tokens,
            eos_token_id=[],
        )
        assert out.images is not None
        tokens.append(out.images[0][0])
    if not accelerator.is_main_process:
        return None
    generator = torch.Generator().manual_seed(0)
    images = decoder(
        visual_tokens=torch.stack(tokens).cpu(), num_inference_steps=num_inference_steps, generator=generator
    ).images
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    return path


__all__ = ["answer_accuracy", "generation_grid", "held_out_samples", "image_grid", "normalize_answer"]
