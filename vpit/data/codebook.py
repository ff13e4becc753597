"""`vpit codebook fit CARD --model DIR`: fit a discrete visual codebook on a card's images and make the model in DIR
discrete (`visual_target: discrete`).

The model's frozen encoder encodes up to `max_images` images of the card; k-means over their K x Dv tokens gives C
codes (`vpit.model.codebook.fit_codebook`); `VPiTForCausalLM.set_visual_codebook` adds the code tokens to the
tokenizer and the LM head and keeps the codebook in the weights. The folder written (DIR itself by default) then
trains like any other: the VPiT stage's recipe points `model.pretrained` at it. Beside the model:

    codebook.json    what was fitted: card, images, tokens, size, seed, and the quantisation's mean cosine,
                     codes used and usage perplexity
    skipped.jsonl    the records or images that could not be read, with the reason (absent when none)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import FolderError, check_model_folder
from ..model.codebook import fit_codebook
from .cards import DataCard
from .features import append_skipped, card_images
from .records import RecordError, load_record_image

REPORT_FILE, SKIPPED_FILE = "codebook.json", "skipped.jsonl"


def fit_card_codebook(
    card_path: str | Path,
    model_path: str | Path,
    out: str | Path | None = None,
    *,
    size: int = 256,
    max_images: int = 20000,
    batch_size: int = 32,
    seed: int = 0,
    use_sample: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Fit `size` codes on the tokens of up to `max_images` images of the card (in card order) and save the model
    in `model_path` (a continuous VPiT folder or Hub id), made discrete, to `out` (default: `model_path` itself).

    Returns the report written to `out/codebook.json`.
    """
    from tqdm.auto import tqdm

    from ..model.modeling_vpit import VPiTForCausalLM
    from ..model.processing_vpit import VPiTProcessor

    if size < 2 or max_images < 1:
        raise ValueError(f"size must be >= 2 and max_images >= 1, got {size} and {max_images}")
    folder = Path(out if out is not None else model_path)
    if out is None and not Path(model_path).is_dir():
        raise FolderError(f"{model_path} is not a local folder: pass --out, where the discrete model is written")
    check_model_folder(model_path)
    card = DataCard.load(card_path)
    model = VPiTForCausalLM.from_pretrained(model_path).eval()
    processor = VPiTProcessor.from_pretrained(model_path)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = model.vision_tower.to(target)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SKIPPED_FILE).unlink(missing_ok=True)
    skipped = 0

    def report(index: int, err: RecordError) -> None:
        nonlocal skipped
        skipped += 1
        append_skipped(folder / SKIPPED_FILE, card.name, index, err)

    tokens: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []
    images = 0

    def flush() -> None:
        if batch:
            with torch.no_grad():
                tokens.append(encoder(torch.stack(batch).to(target)).float().cpu().flatten(0, 1))  # (b * K, Dv)
            batch.clear()

    with tqdm(desc=f"{card.name}: encoding images", unit="img", total=max_images) as bar:
        for position, (source, root) in card_images(card, use_sample, report):
            if images >= max_images:
                break
            try:
                batch.append(processor.image_transform(load_record_image(source, root)))
            except RecordError as err:
                report(position, err)
                continue
            images += 1
            bar.update(1)
            if len(batch) >= batch_size:
                flush()
        flush()
    if not tokens:
        raise ValueError(f"card {card.name!r} gave no readable image (see {folder / SKIPPED_FILE})")
    codebook, stats = fit_codebook(torch.cat(tokens), size, model.config.normalize_visual_tokens, seed=seed)
    model.to("cpu")
    ids = model.set_visual_codebook(codebook, processor.tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    result = {
        "card": card.name,
        "model": str(model_path),
        "images": images,
        "skipped": skipped,
        "size": size,
        "seed": seed,
        "code_token_ids": [ids[0], ids[-1]],
        **stats,
    }
    (folder / REPORT_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return result


__all__ = ["fit_card_codebook"]
