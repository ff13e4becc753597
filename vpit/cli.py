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
