"""`vpit eval toy`: score a VPiT model and its decoder on the toy world, with the pixel judge of `vpit.toy.judge`.

Three measurements, all on fresh seeded renders (a seed stream of their own, disjoint from the training data's):

- understanding: a rendered image and one question per type (colour, shape, size, position, describe), answered
  greedily; an answer is right when it equals the grammar's answer (case, surrounding space and a final full stop
  ignored). Held-out compositions are included: they occur in understanding training data.
- generation: "Generate an image of {caption}." (one of the toy templates) -> the model answers freely (greedy)
  -> its first generated image's visual tokens -> the decoder -> the judge. Accuracy per attribute and
  all-four-correct, on in-distribution captions (every non-held-out composition) and on the held-out
  compositions (purple triangle, orange square, green circle, never a training target). A reply with no image
  counts as wrong on every attribute. The same replies are also scored in token space, without the decoder: the
  composition whose prototype (the mean encoder tokens of a few renders of it) is nearest in cosine to the
  predicted tokens. The gap between the two tells the language model's share of the errors from the decoder's.
- editing: a render and "Make it {colour}." or "Move it {where}." (the editing card's instructions) -> the edited
  image, judged against the intended object (all four attributes).
- reconstruction: render -> the decoder's vision encoder -> visual tokens -> the decoder -> the judge, on every
  composition.

Writes `eval_toy.json` and `eval_toy.md`, plus the grids `generation_grid.png` (prompt -> generated image) and
`reconstruction_grid.png` (image -> reconstruction).

Example:
    >>> report = evaluate_toy("outputs/toy/vpit/final", "outputs/toy/decoder/final", out="outputs/toy/eval")
    >>> report["generation"]["in_distribution"]["all"]
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ..data.formats import GENERATION_TEMPLATES
from ..inference.pipeline import VPiTPipeline
from ..training.evaluation import normalize_answer
from .judge import judge
from .world import (
    ATTRIBUTES,
    COLOURS,
    QUESTION_KINDS,
    QUESTIONS,
    UNDERSTANDING_ONLY_COLOURS,
    ToyObject,
    compositions,
    edit,
    jittered,
    render,
    world_colours,
)

TARGETS = {
    "understanding": 0.95,
    "generation_in_distribution": 0.90,
    "generation_held_out": 0.60,
    "reconstruction": 0.97,
}

# Instructions that no training template uses: does generation follow the request, not the template's wording?
PARAPHRASES = (
    "Please draw {caption}.",
    "I would like a picture of {caption}.",
    "Show {caption}.",
    "Could you generate a picture of {caption}?",
    "Create an image of {caption}.",
)

# How a user asks for an image, each judged on its own (`generation_modes`):
#   plain             a training-style instruction (one of GENERATION_TEMPLATES)
#   start_with_image  the same prompts, the answer forced to start with <image_start> (pipeline / `vpit generate
#                     --start-with-image`)
#   paraphrase        an instruction no training template uses (PARAPHRASES)
#   draw              `vpit chat`'s `/draw CAPTION`: the bare caption, the answer forced to start with an image
PROMPT_MODES = ("plain", "start_with_image", "paraphrase", "draw")


@dataclass
class EvalSettings:
    """How much to evaluate and how to sample (the defaults are what `make demo` reports)."""

    questions_per_type: int = 60
    generation_repeats: int = 1  # each composition this many times (fresh jitter each)
    held_out_repeats: int | None = None  # each held-out composition this many times; None: generation_repeats
    reconstruction_repeats: int = 1
    batch_size: int = 32
    num_inference_steps: int = 15
    guidance_scale: float = 3.0
    seed: int = 1234
    grid_examples: int = 12
    prototype_renders: int = 4  # renders per composition averaged into its token-space prototype
    modes: tuple[str, ...] = ()  # other PROMPT_MODES judged too (each composition once), beside "plain"
    edits: int = 90  # editing prompts ("<image> Make it {colour}." / "Move it {where}.") judged; 0: none
    # Finding 1's transfer split (a world built with `understanding_only_colours`): every composition in pink, teal
    # and brown, `generation_repeats` times, asked plainly; the judge and token space then choose among nine colours.
    transfer: bool = False

    @property
    def colours(self) -> tuple[str, ...]:
        """The colours the judge and the token-space prototypes choose among."""
        return world_colours(self.transfer)


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _accuracy(flags: Sequence[dict[str, bool]]) -> dict[str, Any]:
    """Accuracy per attribute and all four, n, and the 95 % Wilson interval of all four."""
    n = len(flags)
    result: dict[str, Any] = {key: sum(f[key] for f in flags) / max(n, 1) for key in (*ATTRIBUTES, "all")}
    return {**result, "n": float(n), "all_ci95": wilson_interval(sum(f["all"] for f in flags), n)}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float]:
    """The 95 % Wilson score interval of a proportion (sound at small n and near 0 or 1, unlike p +- 1.96 se)."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


UNDERSTANDING_MAX_NEW_TOKENS = 24  # room for the longest answer, a caption, with some to spare


@dataclass(frozen=True)
class UnderstandingItem:
    """One understanding question: a render of `obj`, a question of `kind` about it and the grammar's answer."""

    kind: str
    question: str
    answer: str
    image: Image.Image
    obj: ToyObject


def understanding_items(settings: EvalSettings) -> list[UnderstandingItem]:
    """The questions `evaluate_understanding` asks: `settings.questions_per_type` of each kind, on fresh renders
    seeded by `settings.seed` (the lmms-eval toy task of `vpit.integrations.lmms_eval` is written from these)."""
    rng = random.Random(f"eval-understanding:{settings.seed}")
    items = []
    all_compositions = compositions()
    for kind in QUESTION_KINDS:
        phrasings, answer = QUESTIONS[kind]
        for _ in range(settings.questions_per_type):
            obj = jittered(rng, *rng.choice(all_compositions))
            items.append(UnderstandingItem(kind, rng.choice(phrasings), answer(obj), render(obj), obj))
    return items


def evaluate_understanding(pipe: VPiTPipeline, settings: EvalSettings, progress: bool = True) -> dict[str, Any]:
    items = understanding_items(settings)
    right: dict[str, list[bool]] = {kind: [] for kind in QUESTION_KINDS}
    mistakes: list[dict[str, str]] = []
    bar = tqdm(total=len(items), desc="eval: understanding", disable=not progress)
    for batch in _batches(items, settings.batch_size):
        outputs = pipe(
            [f"{pipe.processor.image_token}\n{item.question}" for item in batch],
            images=[item.image for item in batch],
            max_new_tokens=UNDERSTANDING_MAX_NEW_TOKENS,
        )
        for item, output in zip(batch, outputs, strict=True):
            ok = normalize_answer(output.text) == normalize_answer(item.answer)
            right[item.kind].append(ok)
            if not ok and len(mistakes) < 20:
                mistakes.append(
                    {"image": item.obj.caption, "question": item.question, "expected": item.answer, "got": output.text}
                )
        bar.update(len(batch))
    bar.close()
    per_type = {kind: sum(flags) / len(flags) for kind, flags in right.items()}
    total = [flag for flags in right.values() for flag in flags]
    return {"overall": sum(total) / len(total), "per_type": per_type, "n": len(total), "mistakes": mistakes}


def _generate_images(
    pipe: VPiTPipeline,
    prompts: list[str],
    settings: EvalSettings,
    desc: str,
    progress: bool,
    start_with_image: bool = False,
) -> tuple[list[Image.Image | None], list[torch.Tensor | None]]:
    """Each prompt's first generated image, decoded, and its predicted visual tokens (K, Dv); None without one."""
    images: list[Image.Image | None] = []
    tokens: list[torch.Tensor | None] = []
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress)
    for i, batch in enumerate(_batches(prompts, settings.batch_size)):
        outputs = pipe(
            list(batch),
            max_new_tokens=64 + pipe.model.image_slots,
            max_images_per_row=1,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            seed=settings.seed + i,
            start_with_image=start_with_image,
        )
        images += [output.images[0] if output.images else None for output in outputs]
        tokens += [output.visual_tokens[0] if output.visual_tokens else None for output in outputs]
        bar.update(len(batch))
    bar.close()
    return images, tokens


def composition_prototypes(
    pipe: VPiTPipeline, renders: int, seed: int, colours: tuple[str, ...] = COLOURS
) -> tuple[list[ToyObject], torch.Tensor]:
    """Every composition in `colours` (jitter 0) and its prototype: the mean of the encoder tokens of `renders`
    jittered renders, flattened to (K * Dv,) and L2-normalised; (180, K * Dv) in all with the six colours."""
    rng = random.Random(f"eval-prototypes:{seed}")
    objects = [ToyObject(*c) for c in compositions(colours=colours)]
    prototypes = []
    for obj in objects:
        images = [render(jittered(rng, obj.size, obj.colour, obj.shape, obj.position)) for _ in range(renders)]
        pixels = pipe.processor.preprocess_images(images).to(pipe.device)
        with torch.inference_mode():
            prototypes.append(pipe.model.encode_images(pixels).float().mean(0).flatten())
    return objects, torch.nn.functional.normalize(torch.stack(prototypes), dim=-1)


def nearest_composition(tokens: torch.Tensor, objects: list[ToyObject], prototypes: torch.Tensor) -> ToyObject:
    """The composition whose prototype is nearest in cosine to the (K, Dv) visual tokens."""
    query = torch.nn.functional.normalize(tokens.detach().float().flatten().to(prototypes.device), dim=0)
    return objects[int((prototypes @ query).argmax())]


def mode_prompts(mode: str, objects: Sequence[ToyObject], rng: random.Random) -> tuple[list[str], bool]:
    """The prompts a `mode` of PROMPT_MODES sends for `objects`, and whether the answer is forced to start with an
    image."""
    if mode in ("plain", "start_with_image"):
        return [rng.choice(GENERATION_TEMPLATES).format(caption=o.caption) for o in objects], mode != "plain"
    if mode == "paraphrase":
        return [rng.choice(PARAPHRASES).format(caption=o.caption) for o in objects], False
    if mode == "draw":
        return [o.caption for o in objects], True  # what `vpit chat` sends for `/draw CAPTION`
    raise ValueError(f"unknown generation mode {mode!r}; one of {PROMPT_MODES}")


def evaluate_generation(
    pipe: VPiTPipeline, settings: EvalSettings, progress: bool = True, mode: str = "plain", repeats: int | None = None
) -> tuple[dict[str, Any], list[tuple[ToyObject, str, Image.Image | None, bool]]]:
    """Per split: accuracy per attribute and all four; plus (object, prompt, image, right) for the grid. Each of
    the 180 compositions `repeats` times (default: settings.generation_repeats), freshly jittered."""
    rng = random.Random(f"eval-generation:{settings.seed}" + ("" if mode == "plain" else f":{mode}"))
    repeats = settings.generation_repeats if repeats is None else repeats
    held_out = settings.held_out_repeats if settings.held_out_repeats is not None and mode == "plain" else repeats
    objects = [
        jittered(rng, *c) for c in compositions() for _ in range(held_out if ToyObject(*c).held_out else repeats)
    ]
    splits = ["in_distribution", "held_out"]
    if settings.transfer and mode == "plain":
        objects += [jittered(rng, *c) for c in compositions(colours=UNDERSTANDING_ONLY_COLOURS) for _ in range(repeats)]
        splits.append("transfer")
    prompts, start_with_image = mode_prompts(mode, objects, rng)
    images, tokens = _generate_images(pipe, prompts, settings, f"eval: generation ({mode})", progress, start_with_image)
    # Token space scores predicted encoder tokens; a 'queries' model's condition tokens are not encoder tokens.
    scored = not pipe.model.makes_queries
    if scored:
        prototype_objects, prototypes = composition_prototypes(
            pipe, settings.prototype_renders, settings.seed, settings.colours
        )
    wrong = dict.fromkeys((*ATTRIBUTES, "all"), False)
    flags: dict[str, list[dict[str, bool]]] = {split: [] for split in splits}
    token_flags: dict[str, list[dict[str, bool]]] = {split: [] for split in splits}
    examples = []
    for obj, prompt, image, predicted in zip(objects, prompts, images, tokens, strict=True):
        split = "transfer" if obj.understanding_only else "held_out" if obj.held_out else "in_distribution"
        match = judge(image, settings.colours).matches(obj) if image is not None else wrong
        flags[split].append(match)
        if scored:
            nearest = None if predicted is None else nearest_composition(predicted, prototype_objects, prototypes)
            token_flags[split].append(wrong if nearest is None else _same(nearest, obj))
        examples.append((obj, prompt, image, match["all"]))
    result: dict[str, Any] = {split: _accuracy(f) for split, f in flags.items()}
    if scored:
        result["tokens"] = {split: _accuracy(f) for split, f in token_flags.items()}
    result["no_image"] = sum(image is None for image in images)
    return result, examples


def evaluate_editing(pipe: VPiTPipeline, settings: EvalSettings, progress: bool = True) -> dict[str, Any]:
    """Edits as the editing card asks them (`<image> Make it {colour}.` / `<image> Move it {where}.` on a render),
    the answer started with the image as the card's answers are (nothing else): the edited image judged against the
    intended object, all four attributes, over `settings.edits` prompts."""
    rng = random.Random(f"eval-editing:{settings.seed}")
    cases = []
    for _ in range(settings.edits):
        before = jittered(rng, *rng.choice(compositions()))
        instruction, after = edit(rng, before)
        cases.append((render(before), f"{pipe.processor.image_token} {instruction}", after))
    flags, missing = [], 0
    bar = tqdm(total=len(cases), desc="eval: editing", disable=not progress)
    for i, batch in enumerate(_batches(cases, settings.batch_size)):
        outputs = pipe(
            [prompt for _, prompt, _ in batch],
            images=[image for image, _, _ in batch],
            max_new_tokens=16 + pipe.model.image_slots,
            max_images_per_row=1,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            seed=settings.seed + i,
            start_with_image=True,  # the editing card's answer is the edited image itself
        )
        for (_, _, after), output in zip(batch, outputs, strict=True):
            missing += not output.images
            wrong = dict.fromkeys((*ATTRIBUTES, "all"), False)
            flags.append(judge(output.images[0], settings.colours).matches(after) if output.images else wrong)
        bar.update(len(batch))
    bar.close()
    return _accuracy(flags) | {"no_image": missing}


def _same(found: ToyObject, expected: ToyObject) -> dict[str, bool]:
    flags = {attribute: getattr(found, attribute) == getattr(expected, attribute) for attribute in ATTRIBUTES}
    return {**flags, "all": all(flags.values())}


def evaluate_reconstruction(
    pipe: VPiTPipeline, settings: EvalSettings, progress: bool = True
) -> tuple[dict[str, float], list[tuple[Image.Image, Image.Image]]]:
    decoder = pipe.decoder
    if decoder is None:
        raise ValueError("reconstruction needs a decoder")
    rng = random.Random(f"eval-reconstruction:{settings.seed}")
    objects = [jittered(rng, *c) for c in compositions() for _ in range(settings.reconstruction_repeats)]
    flags, pairs = [], []
    bar = tqdm(total=len(objects), desc="eval: reconstruction", disable=not progress)
    for i, batch in enumerate(_batches(objects, settings.batch_size)):
        originals = [render(obj) for obj in batch]
        generator = torch.Generator(decoder.device).manual_seed(settings.seed + i)
        result = decoder(
            image=originals,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=generator,
            output_type="pil",
        )
        reconstructions = list(result.images if not isinstance(result, tuple) else result[0])
        for obj, original, image in zip(batch, originals, reconstructions, strict=True):
            flags.append(judge(image, settings.colours).matches(obj))
            pairs.append((original, image))
        bar.update(len(batch))
    bar.close()
    return _accuracy(flags), pairs


# ------------------------------------------------------------------------------------------------ grids


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int, fill: tuple[int, int, int]) -> None:
    font = ImageFont.load_default()
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) > width and line:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    for i, text_line in enumerate(lines[:3]):
        draw.text((xy[0], xy[1] + 11 * i), text_line, fill=fill, font=font)


def generation_grid(examples: Sequence[tuple[str, Image.Image | None, bool]], cell: int = 128) -> Image.Image:
    """Prompt above, generated image below (green caption: judged right; red: wrong)."""
    columns = min(6, max(len(examples), 1))
    rows = (len(examples) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (cell + 8), rows * (cell + 44)), (245, 245, 245))
    draw = ImageDraw.Draw(grid)
    for i, (prompt, image, right) in enumerate(examples):
        x, y = (i % columns) * (cell + 8) + 4, (i // columns) * (cell + 44) + 2
        _label(draw, (x, y), prompt, cell, (20, 120, 40) if right else (190, 30, 30))
        if image is not None:
            grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y + 38))
    return grid


def reconstruction_grid(pairs: Sequence[tuple[Image.Image, Image.Image]], cell: int = 96) -> Image.Image:
    """Pairs side by side: original | reconstruction."""
    columns = 4
    rows = (len(pairs) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (2 * cell + 12), rows * (cell + 8)), (200, 200, 200))
    for i, (original, reconstruction) in enumerate(pairs):
        x, y = (i % columns) * (2 * cell + 12) + 4, (i // columns) * (cell + 8) + 4
        grid.paste(original.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        grid.paste(reconstruction.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x + cell + 2, y))
    return grid


# ----------------------------------------------------------------------------------------------- report


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _pct_ci(accuracy: dict[str, Any]) -> str:
    """All-four accuracy with its 95 % interval."""
    low, high = accuracy.get("all_ci95", (accuracy["all"], accuracy["all"]))
    return f"{_pct(accuracy['all'])} [{100 * low:.1f}, {100 * high:.1f}]"


def markdown_report(report: dict[str, Any]) -> str:
    u, g, r = report["understanding"], report["generation"], report["reconstruction"]
    lines = [
        "# Toy-world evaluation",
        "",
        f"Model: `{report['model']}`; decoder: `{report['decoder']}`; seed {report['settings']['seed']}; "
        f"{report['seconds']:.0f} s.",
        "",
        "| measure | figure | target |",
        "|---|---|---|",
        f"| understanding (all question types, n={u['n']}) | {_pct(u['overall'])} | >= 95% |",
        f"| generation, all four right, in-distribution (n={int(g['in_distribution']['n'])}) "
        f"| {_pct_ci(g['in_distribution'])} | >= {_pct(TARGETS['generation_in_distribution'])} |",
        f"| generation, all four right, held-out compositions (n={int(g['held_out']['n'])}) "
        f"| {_pct_ci(g['held_out'])} | >= {_pct(TARGETS['generation_held_out'])} |",
        f"| reconstruction, all four right (n={int(r['n'])}) | {_pct_ci(r)} | >= {_pct(TARGETS['reconstruction'])} |",
        *([f"| editing, all four right (n={int(e['n'])}) | {_pct_ci(e)} | |"] if (e := report.get("editing")) else []),
        "",
        "Understanding per question type: "
        + ", ".join(f"{kind} {_pct(acc)}" for kind, acc in u["per_type"].items())
        + ".",
        "",
        "| generation: per attribute | size | colour | shape | position | all four |",
        "|---|---|---|---|---|---|",
    ]
    splits = [split for split in ("in_distribution", "held_out", "transfer") if split in g]
    for split in splits:
        acc = g[split]
        lines.append(f"| {split.replace('_', '-')} | " + " | ".join(_pct(acc[k]) for k in (*ATTRIBUTES, "all")) + " |")
    for split in splits if "tokens" in g else ():
        acc = g["tokens"][split]
        lines.append(
            f"| {split.replace('_', '-')}, token space | "
            + " | ".join(_pct(acc[k]) for k in (*ATTRIBUTES, "all"))
            + " |"
        )
    lines.append("| reconstruction | " + " | ".join(_pct(r[k]) for k in (*ATTRIBUTES, "all")) + " |")
    if "tokens" in g:
        lines += [
            "",
            "Token space: the predicted visual tokens scored without the decoder, as the composition whose prototype "
            "(mean encoder tokens of a few renders) is nearest in cosine.",
        ]
    other = {mode: result for mode, result in g.get("modes", {}).items() if mode != "plain"}
    if other:
        lines += [
            "",
            "| how the image is asked for | in-distribution, all four | held-out, all four | token space |",
            "|---|---|---|---|",
        ]
        for mode, result in g["modes"].items():
            tokens = result.get("tokens")
            lines.append(
                f"| {mode} | {_pct_ci(result['in_distribution'])} (n={int(result['in_distribution']['n'])}) "
                f"| {_pct_ci(result['held_out'])} (n={int(result['held_out']['n'])}) "
                + (
                    f"| {_pct(tokens['in_distribution']['all'])} / {_pct(tokens['held_out']['all'])} |"
                    if tokens
                    else "| - |"
                )
            )
        lines += [
            "",
            "plain: a training-style instruction; start_with_image: the same, the answer forced to start with an "
            "image; paraphrase: an instruction no training template uses; draw: `vpit chat`'s `/draw CAPTION`. Token "
            "space: in-distribution / held-out, all four (a miss there is the language model's, not the decoder's).",
        ]
    if "transfer" in g:
        lines += [
            "",
            f"Transfer (Finding 1): every composition in a colour only understanding data shows (pink, teal, brown; "
            f"n={int(g['transfer']['n'])}), all four right: decoded {_pct_ci(g['transfer'])}, token space "
            + (f"{_pct(g['tokens']['transfer']['all'])}." if "tokens" in g else "not scored (queries mode)."),
        ]
    if g.get("no_image"):
        lines += ["", f"{g['no_image']} generation prompt(s) got a reply without an image (counted wrong)."]
    if u["mistakes"]:
        lines += ["", "Some understanding mistakes:", ""]
        lines += [
            f"- {m['image']}: {m['question']!r} -> {m['got']!r} (expected {m['expected']!r})" for m in u["mistakes"][:8]
        ]
    return "\n".join(lines) + "\n"


def evaluate_toy(
    model_dir: str | Path,
    decoder_dir: str | Path,
    out: str | Path | None = None,
    settings: EvalSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the three measurements; write eval_toy.json / eval_toy.md and the two grids to `out` if given."""
    settings = settings or EvalSettings()
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    pipe = VPiTPipeline.from_pretrained(model_dir, decoder=decoder_dir)
    if pipe.decoder is not None:
        pipe.decoder.set_progress_bar_config(disable=True)  # the evaluation's own bars count the images
    understanding = evaluate_understanding(pipe, settings, progress)
    generation, examples = evaluate_generation(pipe, settings, progress)

    def summary(result: dict[str, Any]) -> dict[str, Any]:
        """A mode's two splits, decoded and (whether a miss is the language model's or the decoder's) in token space."""
        splits = ("in_distribution", "held_out")
        tokens = {"tokens": {split: result["tokens"][split] for split in splits}} if "tokens" in result else {}
        return {split: result[split] for split in splits} | tokens

    modes = {"plain": summary(generation)}
    for mode in settings.modes:
        result, _ = evaluate_generation(pipe, settings, progress, mode=mode, repeats=1)
        modes[mode] = summary(result) | {"no_image": result["no_image"]}
    generation["modes"] = modes
    editing = evaluate_editing(pipe, settings, progress) if settings.edits else None
    reconstruction, pairs = evaluate_reconstruction(pipe, settings, progress)
    report: dict[str, Any] = {
        "model": str(model_dir),
        "decoder": str(decoder_dir),
        "settings": vars(settings),
        "understanding": understanding,
        "generation": generation,
        "editing": editing,
        "reconstruction": reconstruction,
        "targets": TARGETS,
        "seconds": time.perf_counter() - start,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_toy.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "eval_toy.md").write_text(markdown_report(report))
        rng = random.Random(settings.seed)
        seen = [e for e in examples if not e[0].held_out]
        held = [e for e in examples if e[0].held_out]
        shown = rng.sample(seen, min(settings.grid_examples - 3, len(seen))) + rng.sample(held, min(3, len(held)))
        generation_grid([(prompt, image, right) for _, prompt, image, right in shown]).save(out / "generation_grid.png")
        reconstruction_grid(pairs[:: max(1, len(pairs) // 16)][:16]).save(out / "reconstruction_grid.png")
    return report


def meets_targets(report: dict[str, Any]) -> dict[str, bool]:
    generation = report["generation"]
    met = {
        "understanding": report["understanding"]["overall"] >= TARGETS["understanding"],
        "generation_in_distribution": generation["in_distribution"]["all"] >= TARGETS["generation_in_distribution"],
        "generation_held_out": generation["held_out"]["all"] >= TARGETS["generation_held_out"],
        "reconstruction": report["reconstruction"]["all"] >= TARGETS["reconstruction"],
    }
    for mode, result in generation.get("modes", {}).items():
        if mode != "plain":
            met[f"generation_{mode}"] = (
                result["in_distribution"]["all"] >= TARGETS["generation_in_distribution"]
                and result["held_out"]["all"] >= TARGETS["generation_held_out"]
            )
    return met
