"""The `vpit` command line. Subcommands live here as small functions; each parses its own arguments.

Errors speak as a finished tool's do: `vpit <command>: error: <cause and fix>` on one line, exit status 2 for
usage (a bad argument, a wrong recipe key, a missing file, a folder of the wrong kind: `vpit.errors.UsageError`)
and 1 for a failure while working; the traceback only with `--debug` (or VPIT_DEBUG=1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .inference.pipeline import AnswerOptions, VPiTPipeline


def _push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    url = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        commit_message=args.message,
        license=args.license,
        datasets=args.dataset or None,
        tags=args.tag or None,
    )
    print(url)
    return 0


def _data_validate(args: argparse.Namespace) -> int:
    from .data.validation import validate

    processor = None
    if args.processor:
        from .model.processing_vpit import VPiTProcessor

        processor = VPiTProcessor.from_pretrained(args.processor)
    report = validate(
        args.target,
        use_sample=args.sample,
        fmt=args.format,
        image_folder=args.image_folder,
        processor=processor,
        max_length=args.max_length,
    )
    path = report.write(args.report)
    print(report.summary())
    print(f"report: {path} (+ {path.with_suffix('.summary.json').name})")
    return 1 if report.num_bad else 0


def _data_cache_features(args: argparse.Namespace) -> int:
    from .data.features import cache_card_features

    folder, counts = cache_card_features(
        args.card,
        args.model,
        args.out,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        use_sample=args.sample,
        device=args.device,
    )
    print(
        f"{counts['encoded']} images encoded, {counts['cached']} already cached, {counts['skipped']} skipped "
        f"(see {folder / 'skipped.jsonl'}), {counts['uncacheable']} in memory without a key -> {folder}"
    )
    return 0


def _codebook_fit(args: argparse.Namespace) -> int:
    from .data.codebook import fit_card_codebook

    result = fit_card_codebook(
        args.card,
        args.model,
        args.out,
        size=args.size,
        max_images=args.max_images,
        batch_size=args.batch_size,
        seed=args.seed,
        use_sample=args.sample,
        device=args.device,
    )
    print(json.dumps(result, indent=1))
    return 0


def _toy_data(args: argparse.Namespace) -> int:
    from .toy.world import write_toy_data

    sizes = {"understanding": args.understanding, "generation": args.generation, "editing": args.editing}
    written = write_toy_data(
        args.out, sizes, seed=args.seed, canvas=args.canvas, understanding_only_colours=args.understanding_only_colours
    )
    for kind, path in written.items():
        print(f"{kind}: {sizes[kind]} records -> {path}")
    return 0


def _toy_backbones(args: argparse.Namespace) -> int:
    from .toy.backbones import build_toy_backbones

    metrics = build_toy_backbones(
        args.out,
        seed=args.seed,
        fast=args.fast,
        vae_downsamplings=args.vae_downsamplings,
        workers=args.workers,
        understanding_only_colours=args.understanding_only_colours,
    )
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def _eval_toy(args: argparse.Namespace) -> int:
    from .toy.evaluate import EvalSettings, evaluate_toy, markdown_report

    card = _card_folder(args)
    settings = EvalSettings(
        questions_per_type=args.questions_per_type,
        generation_repeats=args.generation_repeats,
        held_out_repeats=args.held_out_repeats,
        reconstruction_repeats=args.reconstruction_repeats,
        modes=tuple(args.modes),
        edits=args.edits,
        transfer=args.transfer,
        batch_size=args.batch_size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
    )
    report = evaluate_toy(args.model, args.decoder, out=args.out, settings=settings)
    print(markdown_report(report))
    print(f"written: {Path(args.out) / 'eval_toy.json'}, {Path(args.out) / 'eval_toy.md'} and the grids")
    if card is not None:
        from .evaluation.model_index import toy_eval_results
        from .hub import write_eval_results

        print(f"model card: {write_eval_results(card, toy_eval_results(report))}")
    return 0


def _card_folder(args: argparse.Namespace) -> Path | None:
    """The model folder whose README.md `--card` writes into; refused before any work when it is no local folder."""
    from .errors import UsageError

    if not args.card:
        return None
    if not Path(args.model).is_dir():
        raise UsageError(f"--card writes into the model folder's README.md; {args.model} is not a local folder")
    return Path(args.model)


def _eval_generation(args: argparse.Namespace) -> int:
    from .errors import UsageError
    from .evaluation.generation import REPORT_NAME, GenerationSettings, evaluate_generation, summary

    if args.card and not (args.clip or args.reference):
        raise UsageError("--card writes the CLIP score and the Fréchet distance: give --clip and/or --reference")
    card = _card_folder(args)
    settings = GenerationSettings(
        samples_per_prompt=args.samples_per_prompt,
        batch_size=args.batch_size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        start_with_image=args.start_with_image,
        max_new_tokens=args.max_new_tokens,
    )
    report = evaluate_generation(
        args.model,
        args.decoder,
        args.prompts,
        args.out,
        fmt=args.format,
        settings=settings,
        clip=args.clip,
        reference=args.reference,
        fid_encoder=args.fid_encoder,
        device=args.device,
        dtype=args.dtype,
    )
    print(summary(report))
    print(f"written: {Path(args.out) / REPORT_NAME}")
    if card is not None:
        from .evaluation.model_index import generation_eval_results
        from .hub import write_eval_results

        print(f"model card: {write_eval_results(card, generation_eval_results(report))}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import main as train_main

    train_main([args.recipe, *args.overrides])
    return 0


def _load_pipeline(args: argparse.Namespace) -> VPiTPipeline:
    from .inference.pipeline import VPiTPipeline

    return VPiTPipeline.from_pretrained(args.model, decoder=args.decoder, dtype=args.dtype, device=args.device)


def _answer_options(args: argparse.Namespace) -> AnswerOptions:
    """The generation options `vpit generate`, `vpit chat` and `vpit app` share (see `vpit.inference.pipeline.AnswerOptions`)."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_images_per_row": args.max_images,
        "visual_steps": args.visual_steps,
        "visual_temperature": args.visual_temperature,
        "visual_guidance_scale": args.visual_guidance,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
    }


def _generate(args: argparse.Namespace) -> int:
    pipe = _load_pipeline(args)
    options: AnswerOptions = {**_answer_options(args), "start_with_image": args.start_with_image}
    out = pipe(args.prompt, images=args.image, **options)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    answer = folder / "answer.txt"
    answer.write_text(out.text.strip() + "\n")
    print(out.text.strip())
    print(answer)
    for i, image in enumerate(out.images):
        path = folder / f"image_{i}.png"
        image.save(path)
        print(path)
    if out.visual_tokens and not out.images:
        print(f"{len(out.visual_tokens)} image(s) generated but not drawn: pass --decoder", file=sys.stderr)
    if pipe.model.makes_queries and not out.visual_tokens and not args.start_with_image:
        print("no image: this model (the 'queries' mode) draws when its answer is made to start with the image; "
              "add --start-with-image", file=sys.stderr)  # fmt: skip
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .inference.chat import run_chat

    pipe = _load_pipeline(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("vpit chat: /help lists the commands, /exit leaves")
    try:
        return run_chat(
            pipe, sys.stdin, sys.stdout, args.out, system=args.system, interactive=interactive, **_answer_options(args)
        )
    except KeyboardInterrupt:  # Ctrl-C at the terminal: leave without a traceback
        print()
        return 130


def _app(args: argparse.Namespace) -> int:
    import tempfile

    from .inference.app import launch
    from .toy.examples import toy_examples

    pipe = _load_pipeline(args)  # once: every browser tab shares it
    launch(
        pipe,
        host=args.host,
        port=args.port,
        examples=toy_examples(tempfile.mkdtemp(prefix="vpit-app-examples-"), pipe.model.makes_queries)
        if args.examples
        else (),
        system=args.system,
        options=_answer_options(args),
    )
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model / --decoder / device and the generation options of `generate`, `chat` and `app`."""
    parser.add_argument("--model", required=True, help="a saved VPiT folder (model + processor)")
    parser.add_argument("--decoder", default=None, help="a saved VPiTDecoderPipeline folder, to draw the images")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as saved)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (slots count)")
    parser.add_argument("--max-images", type=int, default=None, help="images per answer at most (default: no limit)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --sample)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (with --sample)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k sampling (with --sample)")
    parser.add_argument(
        "--visual-steps", type=int, default=None, help="a diffusion visual head's sampling steps (default: its own)"
    )
    parser.add_argument(
        "--visual-temperature",
        type=float,
        default=None,
        help="a diffusion head's noise scale, or a discrete model's code sampling temperature (default: greedy codes)",
    )
    parser.add_argument(
        "--visual-guidance",
        type=float,
        default=None,
        help="a diffusion visual head's guidance scale (default: its own)",
    )
    parser.add_argument("--steps", type=int, default=50, help="decoder denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="decoder classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=None, help="seeds sampling and the decoder's noise")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vpit",
        description="Visual-Predictive Instruction Tuning: train, run and share unified image+text models.",
    )
    parser.add_argument("--version", action="version", version=f"vpit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    push = commands.add_parser(
        "push",
        help="upload a saved VPiT folder to the Hugging Face Hub with a generated model card",
        description="Upload FOLDER to REPO_ID. The token comes from HF_TOKEN or `hf auth login`; it is never "
        "written anywhere. A model card (README.md) is generated when the folder has none.",
    )
    push.add_argument("folder", help="a folder written by save_pretrained (config.json, weights, processor)")
    push.add_argument("repo_id", help="target repository, e.g. my-org/vpit-llama3-siglip")
    push.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    push.add_argument("--message", default="Upload VPiT model", help="commit message")
    push.add_argument("--license", default=None, help="licence id for the card metadata, e.g. apache-2.0")
    push.add_argument("--dataset", action="append", help="a training dataset id for the card (repeatable)")
    push.add_argument("--tag", action="append", help="an extra tag for the card (repeatable)")
    push.set_defaults(func=_push)

    train = commands.add_parser(
        "train",
        help="run a training recipe (same as python -m vpit.train; use `accelerate launch -m vpit.train` for "
        "several processes)",
        description="Run RECIPE.yaml with dotted overrides, e.g. `vpit train recipes/toy/vpit.yaml optim.lr=1e-4`.",
    )
    train.add_argument("recipe", help="a YAML recipe (see recipes/)")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    train.set_defaults(func=_train)

    generate = commands.add_parser(
        "generate",
        help="answer one prompt in text and images; write answer.txt and image_0.png, ... to --out",
        description="Answer PROMPT with a saved VPiT model (chat template applied). Images given with --image are "
        "placed at the prompt's <image> markers, or in front of it when it has none. Generated images are drawn by "
        "--decoder and written as image_0.png, image_1.png, ...; the answer (with <image> where each image stands) "
        "goes to answer.txt. Prints the answer, then the paths written.",
    )
    _add_model_arguments(generate)
    generate.add_argument("--prompt", required=True, help="the user message")
    generate.add_argument(
        "--image", nargs="+", action="extend", default=[], help="prompt image file(s), in <image> marker order"
    )
    generate.add_argument("--out", required=True, help="folder for answer.txt and the images")
    generate.add_argument(
        "--start-with-image", action="store_true", help="start the answer with a generated image (<image_start>)"
    )
    generate.set_defaults(func=_generate)

    chat = commands.add_parser(
        "chat",
        help="chat with a saved VPiT model on stdin / stdout (works with piped input)",
        description="One line is one user message; /image PATH [PATH ...] attaches images to the next message, "
        "/draw TEXT starts the answer with an image, /reset forgets the conversation, /exit or /quit (or EOF) "
        "leaves, /help lists the commands. Generated images are saved in --out and their paths printed.",
    )
    _add_model_arguments(chat)
    chat.add_argument("--out", default="vpit-chat", help="folder for the generated images (default: vpit-chat)")
    chat.add_argument("--system", default=None, help="a system message for the conversation")
    chat.set_defaults(func=_chat)

    app = commands.add_parser(
        "app",
        help="a web app on localhost: chat with image upload, streamed answers, drawn images (needs vpit[app])",
        description="Load a saved VPiT model (and --decoder) once and serve a Gradio chat at http://HOST:PORT: "
        "upload images and ask about them, or ask for an image (tick 'start the answer with an image' for /draw); "
        "the answer streams and the decoder's images appear in the conversation. The generation options below "
        "are the page's starting settings. Every browser tab is served, one turn at a time.",
    )
    _add_model_arguments(app)
    app.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine)")
    app.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    app.add_argument("--system", default=None, help="a system message at the start of every conversation")
    app.add_argument(
        "--no-examples", dest="examples", action="store_false", help="leave out the toy-world example prompts"
    )
    app.set_defaults(func=_app)

    data = commands.add_parser("data", help="inspect and validate training data")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    check = data_commands.add_parser(
        "validate",
        help="scan a data card, a recipe's mixture or a data file and report every bad record",
        description="Scan everything, print a summary and write a report listing every bad record with its "
        "source, index, id and reason. Exits 1 when any record is bad.",
    )
    check.add_argument("target", help="a data card (.yaml), a recipe (.yaml with data.mixture) or a .json/.jsonl file")
    check.add_argument("--image-folder", default=None, help="folder image paths are relative to (data files)")
    check.add_argument("--format", default=None, help="data file format if detection is not wanted")
    check.add_argument("--sample", action="store_true", help="validate each card's shipped sample data")
    check.add_argument("--processor", default=None, help="a VPiT folder: also check tokenisation and truncation")
    check.add_argument("--max-length", type=int, default=None, help="sequence limit for the truncation check")
    check.add_argument("--report", default="validation_report.jsonl", help="where to write the report")
    check.set_defaults(func=_data_validate)
    cache = data_commands.add_parser(
        "cache-features",
        help="encode a card's images once with a model's frozen encoder; training then reads the tokens",
        description="Write the frozen vision encoder's K x Dv tokens of every image of a data card as safetensors "
        "shards (keyed by image, resumable: a rerun encodes only what is missing). Training with this model reads "
        "them instead of the images (data.use_features).",
    )
    cache.add_argument("card", help="a data card (.yaml)")
    cache.add_argument("--model", required=True, help="a VPiT folder or Hub id (only its vision encoder is loaded)")
    cache.add_argument("--out", default=None, help="cache folder (default: where training looks, beside the card)")
    cache.add_argument("--batch-size", type=int, default=32, help="images encoded at once")
    cache.add_argument("--shard-size", type=int, default=1024, help="images per safetensors shard")
    cache.add_argument("--sample", action="store_true", help="the card's shipped sample data")
    cache.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    cache.set_defaults(func=_data_cache_features)

    codebook = commands.add_parser("codebook", help="discrete visual codes (visual_target: discrete)")
    codebook_commands = codebook.add_subparsers(dest="codebook_command", metavar="CODEBOOK_COMMAND", required=True)
    fit = codebook_commands.add_parser(
        "fit",
        help="fit a k-means codebook on a card's encoder tokens and make a model discrete",
        description="Encode up to --max-images images of the card with the model's frozen encoder, fit --size "
        "k-means codes on their tokens, add the code tokens to the tokenizer and LM head, and save the model "
        "(visual_target: discrete) to --out, by default the model folder itself. Writes codebook.json beside it.",
    )
    fit.add_argument("card", help="a data card (.yaml) whose images the codes are fitted on")
    fit.add_argument("--model", required=True, help="a continuous VPiT folder (e.g. the bridge stage's final/)")
    fit.add_argument("--out", default=None, help="where the discrete model is written (default: --model, in place)")
    fit.add_argument("--size", type=int, default=256, help="codes in the codebook")
    fit.add_argument("--max-images", type=int, default=20000, help="images encoded for the fit, in card order")
    fit.add_argument("--batch-size", type=int, default=32, help="images encoded at once")
    fit.add_argument("--seed", type=int, default=0, help="seeds k-means")
    fit.add_argument("--sample", action="store_true", help="the card's shipped sample data")
    fit.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    fit.set_defaults(func=_codebook_fit)

    toy = commands.add_parser("toy", help="the toy world: generate data, pretrain the toy backbones")
    toy_commands = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND", required=True)
    toy_data = toy_commands.add_parser(
        "data",
        help="render seeded toy sets (understanding, generation, editing) as JSONL + PNG folders",
        description="Write OUT/{understanding,generation,editing}/records.jsonl + images/, the sources of the toy "
        "data cards (data_cards/toy_*.yaml read outputs/toy/data).",
    )
    toy_data.add_argument("--out", default="outputs/toy/data", help="root folder (default: outputs/toy/data)")
    toy_data.add_argument("--understanding", type=int, default=6000, help="understanding records")
    toy_data.add_argument("--generation", type=int, default=6000, help="generation records")
    toy_data.add_argument("--editing", type=int, default=2000, help="editing records")
    toy_data.add_argument("--seed", type=int, default=0)
    toy_data.add_argument("--canvas", type=int, default=64, help="image side in pixels (default 64)")
    toy_data.add_argument(
        "--understanding-only-colours",
        action="store_true",
        help="understanding records also in pink, teal and brown, which no generation or editing record shows",
    )
    toy_data.set_defaults(func=_toy_data)
    toy_backbones = toy_commands.add_parser(
        "backbones",
        help="build and pretrain the toy CLIP, tokenizer + Llama and VAE",
        description="Write OUT/clip (open_clip local-dir), OUT/llm (transformers) and OUT/vae (diffusers).",
    )
    toy_backbones.add_argument("--out", default="outputs/toy/backbones")
    toy_backbones.add_argument("--seed", type=int, default=0)
    toy_backbones.add_argument("--fast", action="store_true", help="a few steps each (smoke test)")
    toy_backbones.add_argument("--vae-downsamplings", type=int, default=2, help="2: 16x16x4 latents; 3: 8x8x4")
    toy_backbones.add_argument(
        "--workers", type=int, default=1, choices=(1, 2), help="2: CLIP and LLM + VAE in two processes at once"
    )
    toy_backbones.add_argument(
        "--understanding-only-colours", action="store_true", help="pretrain on pink, teal and brown too"
    )
    toy_backbones.set_defaults(func=_toy_backbones)

    evaluate = commands.add_parser("eval", help="evaluate a model")
    eval_commands = evaluate.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND", required=True)
    eval_toy = eval_commands.add_parser(
        "toy",
        help="understanding, generation and reconstruction accuracy on the toy world (pixel judge)",
        description="Score a VPiT model and its decoder on fresh toy renders: understanding per question type, "
        "generation per attribute and all four right (in-distribution and held-out compositions), "
        "reconstruction. Writes eval_toy.json, eval_toy.md and two image grids to --out.",
    )
    eval_toy.add_argument("--model", required=True, help="a VPiT folder (e.g. outputs/demo/model)")
    eval_toy.add_argument("--decoder", required=True, help="a decoder folder (e.g. outputs/demo/decoder)")
    eval_toy.add_argument("--out", default="eval_toy", help="folder for the report and grids")
    eval_toy.add_argument("--questions-per-type", type=int, default=60)
    eval_toy.add_argument("--generation-repeats", type=int, default=2, help="prompts per composition")
    eval_toy.add_argument(
        "--held-out-repeats", type=int, default=3, help="prompts per held-out composition (3: 90 prompts)"
    )
    eval_toy.add_argument("--reconstruction-repeats", type=int, default=2, help="renders per composition")
    eval_toy.add_argument("--edits", type=int, default=90, help="editing prompts judged (0: none)")
    eval_toy.add_argument(
        "--transfer",
        action="store_true",
        help="judge the transfer split too: every composition in pink, teal and brown, which only understanding "
        "data shows (a world built with --understanding-only-colours); colours are then read among nine",
    )
    eval_toy.add_argument(
        "--modes",
        nargs="*",
        default=["start_with_image", "paraphrase", "draw"],
        help="other ways of asking for an image to judge, each on every composition once (none: plain prompts only)",
    )
    eval_toy.add_argument("--batch-size", type=int, default=32)
    eval_toy.add_argument(
        "--steps",
        type=int,
        default=15,
        help="decoder denoising steps with the decoder folder's scheduler (15 suits the toy decoder's DPM-Solver++; DDIM wants 25 or more)",
    )
    eval_toy.add_argument("--guidance-scale", type=float, default=3.0)
    eval_toy.add_argument("--seed", type=int, default=1234)
    eval_toy.add_argument(
        "--card", action="store_true", help="write the figures into --model's README.md as Hub model-index metadata"
    )
    eval_toy.set_defaults(func=_eval_toy)
    eval_generation = eval_commands.add_parser(
        "generation",
        help="draw GenEval / DPG-Bench prompts in their folder layout for their official scorers; CLIP score, FD",
        description="Draw every prompt of --prompts with the model and decoder into OUT/images in the benchmark's "
        "layout (GenEval: 00000/metadata.jsonl + samples/0000.png ...; DPG-Bench: <item_id>.png, a 2x2 grid), so "
        "its official scorer runs on OUT/images unchanged. Prompts are sent as written; sample j of every prompt is "
        "seeded with --seed + j; answers without an image are listed in OUT/eval_generation.json. Optionally a "
        "CLIP score (--clip) and a Fréchet distance to --reference images in an open_clip encoder's space. "
        "See docs/generation_benchmarks.md.",
    )
    eval_generation.add_argument("--model", required=True, help="a VPiT folder (e.g. outputs/demo/model)")
    eval_generation.add_argument("--decoder", required=True, help="a decoder folder (e.g. outputs/demo/decoder)")
    eval_generation.add_argument(
        "--prompts",
        required=True,
        help="GenEval's evaluation_metadata.jsonl, DPG-Bench's prompts/ folder (or dpg_bench.csv), or a .txt file "
        "with one prompt per line",
    )
    eval_generation.add_argument(
        "--format", choices=["geneval", "dpg", "plain"], default=None, help="how to read --prompts (default: detected)"
    )
    eval_generation.add_argument("--out", default="eval_generation", help="folder for images/ and the report")
    eval_generation.add_argument(
        "--samples-per-prompt", type=int, default=4, help="images per prompt (GenEval: 4; DPG-Bench: exactly 4)"
    )
    eval_generation.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    eval_generation.add_argument(
        "--steps", type=int, default=50, help="decoder denoising steps (the toy decoder: 15 with its DPM-Solver++)"
    )
    eval_generation.add_argument(
        "--guidance-scale", type=float, default=7.5, help="decoder classifier-free guidance (the toy decoder: 3.0)"
    )
    eval_generation.add_argument("--seed", type=int, default=0, help="sample j of every prompt is seeded with SEED + j")
    eval_generation.add_argument(
        "--start-with-image",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="make each answer start with the image, the prompt unchanged (default); --no-start-with-image lets the "
        "model answer freely",
    )
    eval_generation.add_argument(
        "--max-new-tokens", type=int, default=None, help="tokens per answer (default: the image's, + 64 if free)"
    )
    eval_generation.add_argument(
        "--clip",
        default=None,
        help="open_clip model for the CLIP score: NAME:TAG (e.g. ViT-B-32:openai), hf-hub:org/repo or a local folder",
    )
    eval_generation.add_argument(
        "--reference", default=None, help="folder of reference images for the Fréchet distance (any depth)"
    )
    eval_generation.add_argument(
        "--fid-encoder", default=None, help="open_clip model whose image embeddings the distance uses (default: --clip)"
    )
    eval_generation.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    eval_generation.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as saved)"
    )
    eval_generation.add_argument(
        "--card", action="store_true", help="write the scores into --model's README.md as Hub model-index metadata"
    )
    eval_generation.set_defaults(func=_eval_generation)
    return parser


def _add_debug_flags(parser: argparse.ArgumentParser) -> None:
    """Give every command `--debug` and remember its name ("vpit eval toy") for its error lines."""
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error"
    )
    parser.set_defaults(prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                _add_debug_flags(sub)


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import report_error

    parser = build_parser()
    _add_debug_flags(parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = getattr(args, "debug", False) or os.environ.get("VPIT_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{args.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        return report_error(args.prog, error)


if __name__ == "__main__":
    sys.exit(main())
