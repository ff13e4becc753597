"""The `vpit` command line. Subcommands live here as small functions; each parses its own arguments."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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
        from .processing_vpit import VPiTProcessor

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


def _train(args: argparse.Namespace) -> int:
    from .train import main as train_main

    train_main([args.recipe, *args.overrides])
    return 0


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
