"""`vpit eval generation`: draw a benchmark's prompts with a VPiT model in the benchmark's own folder layout, so its
official scorer reads the folder unchanged; optionally score the images with a CLIP score and a Fréchet distance.

Layouts, under OUT/images (pass that folder to the scorer; reports stay outside it, in OUT):

    GenEval (and plain prompts)                      DPG-Bench
    OUT/images/00000/metadata.jsonl  the input line  OUT/images/<item_id>.png   2x2 grid of the 4 samples,
    OUT/images/00000/samples/0000.png                                           row-major (sample 0 top left),
    OUT/images/00000/samples/0001.png ...            each tile the decoder's size S; score with --resolution S
    OUT/images/00000/grid.png        the samples
    OUT/images/00001/...

GenEval's `evaluation/evaluate_images.py` reads each numbered folder's metadata.jsonl (one JSON object: the line of
evaluation_metadata.jsonl, verbatim) and its samples/*.png; DPG-Bench's `compute_dpg_bench.py` cuts each
<item_id>.png into `--pic-num` tiles of `--resolution` pixels. Plain prompts get the GenEval layout with
metadata {"prompt": ...}. docs/generation_benchmarks.md has the commands.

How the images are drawn:
- Each prompt is sent as it is, through the pipeline's chat template; nothing rewrites it. By default the answer
  is made to start with the image (`start_with_image`, what `vpit chat`'s `/draw` does), so the model draws the
  prompt rather than deciding whether to; with `start_with_image=False` it answers freely.
- Sample j of every prompt is drawn with seed `seed + j` (sampling and the decoder's noise alike); prompts are
  batched `batch_size` at a time, each call holding one sample index. The decoder draws a batch's noise from one
  generator, so a rerun with the same settings, batch size included, writes the same bytes.
- An answer without an image is never retried or dropped: it is listed in the report (prompt, sample, seed,
  answer text) and counted as `no_image`; its slot in the layout gets a black image of the decoder's size, so the
  official scorers count it as the failure it is instead of skipping it. The CLIP score and the Fréchet distance
  are over the images the model drew only (their `n` says how many).

Writes OUT/eval_generation.json (settings, counts, the missing images, the scores and the scorer's command).

Example:
    >>> report = evaluate_generation("out/vpit", "out/decoder", "geneval/prompts/evaluation_metadata.jsonl",
    ...                              "eval/geneval", clip="ViT-B-32:openai")
    >>> report["no_image"], report["clip_score"]["value"]
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import UsageError
from ..inference.pipeline import VPiTPipeline
from .prompts import BenchmarkPrompt, read_prompts
from .scores import ImageItem, OpenClip, clip_score, frechet_distance, image_files, load_open_clip

DPG_SAMPLES = 4  # DPG-Bench's scorer cuts each image into a 2x2 grid of samples
REPORT_NAME = "eval_generation.json"


@dataclass
class GenerationSettings:
    """How `evaluate_generation` draws; the defaults are GenEval's 4 samples and the pipeline's decoder settings."""

    samples_per_prompt: int = 4  # images per prompt (DPG-Bench: exactly 4, its 2x2 grid)
    batch_size: int = 8  # prompts per pipeline call
    num_inference_steps: int = 50  # the decoder's denoising steps
    guidance_scale: float = 7.5  # the decoder's classifier-free guidance scale
    seed: int = 0  # sample j of every prompt is drawn with seed + j
    start_with_image: bool = True  # make the answer start with the image (the prompt itself is unchanged)
    max_new_tokens: int | None = None  # None: the image's slots + 1 when the answer starts with it, + 64 otherwise

    def __post_init__(self) -> None:
        for name in ("samples_per_prompt", "batch_size", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def generate_samples(
    pipe: VPiTPipeline, prompts: Sequence[str], settings: GenerationSettings, progress: bool = True
) -> Iterator[tuple[int, list[list[Image.Image | None]], list[list[str]]]]:
    """Draw `settings.samples_per_prompt` images of each prompt, sample j with seed `settings.seed + j`, a batch of
    prompts at a time (so that a caller can write them out and let them go).

    Yields:
        for each batch: the index of its first prompt, images[i][j], sample j of its prompt i (None when the answer
        held no image), and answers[i][j], that answer's text.
    """
    slots = pipe.model.image_slots
    max_new_tokens = settings.max_new_tokens or slots + (1 if settings.start_with_image else 64)
    bar = tqdm(total=len(prompts) * settings.samples_per_prompt, desc="eval: generation", disable=not progress)
    for start in range(0, len(prompts), settings.batch_size):
        batch = list(prompts[start : start + settings.batch_size])
        images: list[list[Image.Image | None]] = [[] for _ in batch]
        answers: list[list[str]] = [[] for _ in batch]
        for sample in range(settings.samples_per_prompt):
            outputs = pipe(
                batch,
                max_new_tokens=max_new_tokens,
                max_images_per_row=1,
                start_with_image=settings.start_with_image,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                seed=settings.seed + sample,
            )
            for row, output in enumerate(outputs):
                images[row].append(output.images[0] if output.images else None)
                answers[row].append(output.text)
            bar.update(len(batch))
        yield start, images, answers
    bar.close()


def image_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Equal-sized images in a grid, row-major, `columns` wide."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return grid


def write_geneval_layout(
    folder: Path, prompts: Sequence[BenchmarkPrompt], samples: Sequence[Sequence[Image.Image]]
) -> list[list[ImageItem]]:
    """GenEval's layout: folder/<key>/metadata.jsonl, samples/<jjjj>.png and grid.png for each prompt.

    Returns:
        where each sample was written, [i][j] as `samples`.
    """
    written: list[list[ImageItem]] = []
    for prompt, images in zip(prompts, samples, strict=True):
        (folder / prompt.key / "samples").mkdir(parents=True)
        (folder / prompt.key / "metadata.jsonl").write_text(f"{prompt.metadata}\n", encoding="utf-8")
        paths = [folder / prompt.key / "samples" / f"{j:04d}.png" for j in range(len(images))]
        for image, path in zip(images, paths, strict=True):
            image.save(path)
        image_grid(images, math.ceil(math.sqrt(len(images)))).save(folder / prompt.key / "grid.png")
        written.append(list(paths))
    return written


def write_dpg_layout(
    folder: Path, prompts: Sequence[BenchmarkPrompt], samples: Sequence[Sequence[Image.Image]]
) -> list[list[ImageItem]]:
    """DPG-Bench's layout: folder/<item_id>.png, the 4 samples as a 2x2 grid (sample 0 top left, row-major).

    Returns:
        each sample as a loader of its tile of the written grid, [i][j] as `samples`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written: list[list[ImageItem]] = []
    for prompt, images in zip(prompts, samples, strict=True):
        image_grid(images, 2).save(folder / f"{prompt.key}.png")
        width, height = images[0].size
        boxes = [((j % 2) * width, (j // 2) * height, (j % 2 + 1) * width, (j // 2 + 1) * height) for j in range(4)]
        tiles: list[ImageItem] = [partial(_tile, folder / f"{prompt.key}.png", box) for box in boxes]
        written.append(tiles)
    return written


def _tile(path: Path, box: tuple[int, int, int, int]) -> Image.Image:
    with Image.open(path) as grid:
        return grid.crop(box).convert("RGB")


def _scorer_command(fmt: str, images: Path, out: Path, size: int) -> str:
    if fmt == "geneval":
        return (
            f"python evaluation/evaluate_images.py {images} --outfile {out / 'geneval_results.jsonl'} "
            f"--model-path <object-detector folder> && python evaluation/summary_scores.py "
            f"{out / 'geneval_results.jsonl'}"
        )
    if fmt == "dpg":
        return f"python dpg_bench/compute_dpg_bench.py --image-root-path {images} --resolution {size} --pic-num 4 --vqa-model mplug"
    return ""


def evaluate_generation(
    model: str | Path,
    decoder: str | Path,
    prompts: str | Path,
    out: str | Path,
    *,
    fmt: str | None = None,
    settings: GenerationSettings | None = None,
    clip: str | None = None,
    reference: str | Path | None = None,
    fid_encoder: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Draw every prompt of a benchmark file into OUT/images in its layout; score with CLIP and a Fréchet distance.

    Args:
        model, decoder: the saved VPiT folder and its decoder folder.
        prompts: a GenEval .jsonl, a DPG-Bench folder of .txt or .csv, or a .txt of prompts
            (see `vpit.evaluation.prompts`).
        out: the output folder; its images/ subfolder must not hold an earlier run's images.
        fmt: "geneval", "dpg" or "plain", overriding the detection from `prompts`.
        clip: an open_clip model (see `vpit.evaluation.scores`) for the CLIP score; None: no CLIP score.
        reference: a folder of reference images for the Fréchet distance; None: no distance.
        fid_encoder: the open_clip model whose image embeddings the distance is measured in (default: `clip`).
        device, dtype: where and in what dtype the VPiT model and decoder run (default: cuda when available; as saved).

    Returns:
        the report written to OUT/eval_generation.json.

    Raises:
        vpit.errors.UsageError: a bad prompt file (file, line, reason), DPG-Bench with other than 4 samples, a
            reference folder without an encoder (or the reverse) or with fewer than 2 images, an images/ folder
            that is not empty.
    """
    start_time = time.perf_counter()
    settings = settings or GenerationSettings()
    prompt_set = read_prompts(prompts, fmt)
    if prompt_set.format == "dpg" and settings.samples_per_prompt != DPG_SAMPLES:
        raise UsageError(
            f"DPG-Bench's scorer reads a 2x2 grid of {DPG_SAMPLES} samples per prompt; got samples_per_prompt "
            f"{settings.samples_per_prompt}"
        )
    if fid_encoder is not None and reference is None:
        raise UsageError("--fid-encoder measures against reference images: give --reference FOLDER")
    fid_encoder = fid_encoder or clip
    if reference is not None and fid_encoder is None:
        raise UsageError("the Fréchet distance needs an encoder: give --fid-encoder (or --clip, which it defaults to)")
    references = image_files(reference) if reference is not None else []
    if reference is not None and len(references) < 2:
        raise UsageError(f"{reference}: {len(references)} image(s); the Fréchet distance needs at least 2")
    out = Path(out)
    images_dir = out / "images"
    if images_dir.exists() and any(images_dir.iterdir()):
        raise UsageError(f"{images_dir} holds an earlier run's images; give another --out or remove it")
    # The scorers load before the (long) generation, so that a wrong model name fails at once.
    names = [clip, fid_encoder if reference is not None else None]
    scorers: dict[str, OpenClip] = {name: load_open_clip(name, device) for name in names if name is not None}

    torch.manual_seed(settings.seed)
    pipe = VPiTPipeline.from_pretrained(model, decoder=decoder, device=device, dtype=dtype)
    if pipe.decoder is None:
        raise UsageError("vpit eval generation draws images: give --decoder")
    pipe.decoder.set_progress_bar_config(disable=True)  # the evaluation's own bar counts the images
    size = pipe.decoder.unet.config["sample_size"] * pipe.decoder.vae_scale_factor
    write = write_dpg_layout if prompt_set.format == "dpg" else write_geneval_layout
    blank = Image.new("RGB", (size, size))
    missing: list[dict[str, Any]] = []
    pairs: list[tuple[ImageItem, str]] = []  # each drawn sample, as written, and its prompt: what the scores read
    texts = [p.text for p in prompt_set.prompts]
    for start, drawn, answers in generate_samples(pipe, texts, settings, progress):
        prompts_drawn = prompt_set.prompts[start : start + len(drawn)]
        written = write(images_dir, prompts_drawn, [[i if i is not None else blank for i in row] for row in drawn])
        for prompt, images, row_answers, items in zip(prompts_drawn, drawn, answers, written, strict=True):
            for j, (image, answer, item) in enumerate(zip(images, row_answers, items, strict=True)):
                if image is None:
                    seed = settings.seed + j
                    missing.append(
                        {"key": prompt.key, "prompt": prompt.text, "sample": j, "seed": seed, "answer": answer}
                    )
                else:
                    pairs.append((item, prompt.text))
    report: dict[str, Any] = {
        "model": str(model),
        "decoder": str(decoder),
        "prompts": str(prompt_set.path),
        "format": prompt_set.format,
        "images": str(images_dir),
        "image_size": size,
        "settings": asdict(settings),
        "n_prompts": len(prompt_set.prompts),
        "n_images": len(pairs),
        "no_image": len(missing),
        "no_image_samples": missing,
        "clip_score": None,
        "fid": None,
        "skipped": [],
        "scorer": _scorer_command(prompt_set.format, images_dir, out, size),
    }
    # Too few images for a score is said in the report (and by `summary`), not raised after the generation.
    if clip is not None and not pairs:
        report["skipped"].append("CLIP score: no image was generated")
    elif clip is not None:
        value = clip_score(scorers[clip], [i for i, _ in pairs], [t for _, t in pairs])
        report["clip_score"] = {"model": clip, "value": value, "n": len(pairs)}
    if fid_encoder is not None and reference is not None and len(pairs) < 2:
        report["skipped"].append(f"Fréchet distance: {len(pairs)} image(s) generated, it needs at least 2")
    elif fid_encoder is not None and reference is not None:
        value = frechet_distance(scorers[fid_encoder], [i for i, _ in pairs], references)
        report["fid"] = {
            "encoder": fid_encoder,
            "value": value,
            "n_generated": len(pairs),
            "n_reference": len(references),
            "reference": str(reference),
        }
    report["seconds"] = time.perf_counter() - start_time
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def summary(report: dict[str, Any]) -> str:
    """The report in a few lines, for the terminal."""
    lines = [
        f"{report['n_prompts']} {report['format']} prompts x {report['settings']['samples_per_prompt']} samples -> "
        f"{report['images']} ({report['n_images']} images, {report['image_size']} px)",
    ]
    if report["no_image"]:
        lines.append(
            f"{report['no_image']} sample(s) got an answer without an image (black placeholders; listed in "
            f"no_image_samples of {REPORT_NAME})"
        )
    if report["clip_score"]:
        score = report["clip_score"]
        lines.append(f"CLIP score ({score['model']}): {score['value']:.2f} over {score['n']} image-prompt pairs")
    if report["fid"]:
        fid = report["fid"]
        lines.append(
            f"Fréchet distance ({fid['encoder']} image embeddings): {fid['value']:.3f} "
            f"({fid['n_generated']} generated vs {fid['n_reference']} reference images)"
        )
    lines += [f"not computed: {reason}" for reason in report["skipped"]]
    if report["scorer"]:
        lines.append(f"official scorer: {report['scorer']}")
    return "\n".join(lines)


__all__ = [
    "DPG_SAMPLES",
    "REPORT_NAME",
    "GenerationSettings",
    "evaluate_generation",
    "generate_samples",
    "image_grid",
    "summary",
    "write_dpg_layout",
    "write_geneval_layout",
]
