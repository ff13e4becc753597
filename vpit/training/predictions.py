"""A VPiT model's own predicted visual tokens for generation records, to train the decoder on what it will decode.

The decoder learns from the encoder's exact tokens of an image, but at generation time it receives the language
model's predictions, which lie near that set, not on it (on the toy world: teacher-forced cosine ~0.98 to the
image's tokens, generated from the prompt ~0.96). `predict_generation_tokens` runs the trained model over the
generation records of a mixture and returns, per record image, the tokens the model predicts for it:

- `generated`: from the prompt alone, greedily, as `VPiTPipeline` generates (the first image of the answer; with
  `start_with_image` for a record whose answer is the bare image);
- `teacher_forced`: one forward pass over the whole record (prompt, answer text and the true image tokens), the
  visual head's prediction at each of the image's slots.

The decoder stage (`decoder.predicted_tokens_from`) pairs them with the records' images. Keys are the feature
cache's image keys (`vpit.data.features.image_key`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.cards import DataCard
from ..data.collator import VPiTCollator, model_inputs
from ..data.encode import encode_sample
from ..data.features import image_key
from ..data.formats import IMAGE_MARKER
from ..data.records import RecordError, Sample
from ..inference.pipeline import VPiTPipeline
from ..model.images import load_image


def generation_samples(cards: Sequence[DataCard], use_sample: bool) -> list[Sample]:
    """Every record of the generation cards whose answer is one image after a text-only prompt."""
    samples = []
    for card in cards:
        if card.task != "generation":
            continue
        for index, record in card.records(use_sample):
            if isinstance(record, RecordError):
                continue
            try:
                sample = card.to_sample(index, record, use_sample=use_sample)
            except RecordError:
                continue
            if len(sample.images) == 1 and "<image>" not in sample.messages[0]["content"]:
                samples.append(sample)
    return samples


def predict_generation_tokens(
    model: str | Path,
    samples: Sequence[Sample],
    mode: str = "generated",
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """{image key: (K, Dv) predicted tokens} for `samples`, and statistics: how many, how many prompts produced no
    image, the mean cosine of the predictions to the images' encoder tokens, seconds."""
    start = time.perf_counter()
    pipe = VPiTPipeline.from_pretrained(model)
    pipe.model.eval()
    predictions: dict[str, torch.Tensor] = {}
    cosines: list[float] = []
    no_image = 0
    bar = tqdm(total=len(samples), desc=f"decoder: {mode} predictions of {Path(model).name}", disable=not progress)
    for first in range(0, len(samples), batch_size):
        batch = list(samples[first : first + batch_size])
        with torch.inference_mode():
            predicted = _generated(pipe, batch) if mode == "generated" else _teacher_forced(pipe, batch)
            for sample, tokens in zip(batch, predicted, strict=True):
                found = image_key(sample.images[-1], sample.image_root)
                if tokens is None or found is None:
                    no_image += tokens is None
                    continue
                pixels = pipe.processor.preprocess_images([load_image(sample.images[-1], sample.image_root)])
                target = pipe.model.encode_images(pixels.to(pipe.device))[0].float()
                cosines.append(float(torch.nn.functional.cosine_similarity(tokens.float(), target, dim=-1).mean()))
                predictions[found[0]] = tokens.float().cpu().contiguous()
        bar.update(len(batch))
    bar.close()
    stats = {
        "mode": mode,
        "records": len(samples),
        "predictions": len(predictions),
        "no_image": no_image,
        "mean_cosine_to_encoder_tokens": sum(cosines) / max(len(cosines), 1),
        "seconds": time.perf_counter() - start,
    }
    return predictions, stats


def _generated(pipe: VPiTPipeline, samples: list[Sample]) -> list[torch.Tensor | None]:
    """Each record's prompt answered as its own answer begins: a record whose answer is the bare image is generated
    with `start_with_image` (the answer opens with the image), the others freely (the model writes its lead-in)."""
    k = pipe.model.config.num_visual_tokens
    found: list[torch.Tensor | None] = [None] * len(samples)
    for opens in (False, True):
        chosen = [i for i, s in enumerate(samples) if _answer_opens_with_image(s) is opens]
        if not chosen:
            continue
        prompts = [samples[i].messages[0]["content"] for i in chosen]
        outputs = pipe(prompts, max_new_tokens=64 + k, max_images_per_row=1, start_with_image=opens)
        for i, output in zip(chosen, outputs, strict=True):
            found[i] = output.visual_tokens[0] if output.visual_tokens else None
    return found


def _answer_opens_with_image(sample: Sample) -> bool:
    return str(sample.messages[1]["content"]).lstrip().startswith(IMAGE_MARKER)


def _teacher_forced(pipe: VPiTPipeline, samples: list[Sample]) -> list[torch.Tensor | None]:
    processor, model = pipe.processor, pipe.model
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = VPiTCollator(int(pad))([encode_sample(sample, processor) for sample in samples])
    out = model(**{k: v.to(pipe.device) for k, v in model_inputs(batch).items()}, return_logits=False)
    k = model.config.num_visual_tokens
    tokens = out.visual_predictions.reshape(len(samples), k, -1)  # one response image per sample, K slots each
    return list(tokens)


def save_predictions(path: Path, predictions: dict[str, torch.Tensor], stats: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(predictions, str(path), metadata={k: str(v) for k, v in stats.items()})


def load_predictions(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


__all__ = [
    "generation_samples",
    "load_predictions",
    "predict_generation_tokens",
    "save_predictions",
]
