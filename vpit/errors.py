"""Errors a user can fix before anything runs, and the checks that raise them.

    UsageError            input named on the command line or in a call is wrong: the message names it and the fix
    ├── RecipeError       a recipe that cannot run as written (unknown key, bad value, missing file)
    └── FolderError       a path that is not the kind of folder asked for (missing, not a model, not a decoder)

`vpit` prints each as one line, `vpit <command>: error: <message>`, and exits with status 2 (usage); any other
exception is a failure (status 1). Both are subclasses of ValueError, so code that caught ValueError keeps working.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

# A Hub repository id: one "/", no leading "." or "/" (what huggingface_hub accepts for a model id).
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UsageError(ValueError):
    """Input the user gave is wrong; the message names it and says how to fix it."""


class RecipeError(UsageError):
    """A recipe that cannot run as written; the message names the file and the key."""


class FolderError(UsageError):
    """A path that is not the folder asked for: missing, or a folder of another kind."""


def error_line(error: BaseException) -> str:
    """One line naming an error's cause: its message, the file of an OSError, or the type when there is no text."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    text = " ".join(str(error).split())
    if isinstance(error, ValueError) and text:
        return text  # vpit's own errors (UsageError included) are ValueErrors whose messages name the cause
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def report_error(prog: str, error: BaseException) -> int:
    """Print `prog: error: <cause>` on stderr and return the exit status: 2 for usage, 1 for a failure."""
    usage = isinstance(error, (UsageError, FileNotFoundError))  # a missing file is the caller's to fix
    hint = "" if usage else " (--debug shows the traceback)"
    print(f"{prog}: error: {error_line(error)}{hint}", file=sys.stderr)
    return 2 if usage else 1


def _local_or_hub(path: str | os.PathLike[str], what: str) -> Path | None:
    """The local folder `path` names, or None when it is a Hub id (`org/name`) with no such local folder."""
    folder = Path(path)
    if folder.exists():
        if not folder.is_dir():
            raise FolderError(f"{path} is a file, not {what} folder")
        return folder
    if REPO_ID_PATTERN.match(os.fspath(path)) and not os.fspath(path).startswith((".", "/", "~")):
        return None  # a Hub id: huggingface_hub resolves it (and says so when it cannot)
    raise FolderError(f"{path}: no such folder (give {what} folder, or a Hub id such as org/name)")


def check_model_folder(path: str | os.PathLike[str]) -> None:
    """Refuse a path that cannot be a saved VPiT model: missing, without config.json, or another model type."""
    folder = _local_or_hub(path, "a VPiT model")
    if folder is None:
        return
    config = folder / "config.json"
    if not config.is_file():
        hint = " (it is a decoder folder: pass it as --decoder)" if (folder / "model_index.json").is_file() else ""
        raise FolderError(
            f"{path} is not a VPiT model folder: it has no config.json{hint}. Pass the folder that "
            "save_pretrained wrote, e.g. a run's final/ or outputs/demo/model"
        )
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise FolderError(f"{config} is not a readable JSON config: {err}") from None
    if model_type != "vpit":
        raise FolderError(
            f"{path} holds a {model_type!r} model, not a VPiT one (model_type 'vpit'); assemble it first "
            "(vpit.assemble or a bridge-stage recipe) and pass the saved folder"
        )


def check_decoder_folder(path: str | os.PathLike[str]) -> None:
    """Refuse a path that cannot be a saved VPiT decoder: missing, or without a diffusers model_index.json."""
    folder = _local_or_hub(path, "a decoder")
    if folder is None:
        return
    if not (folder / "model_index.json").is_file():
        hint = " (it is a VPiT model folder: pass it as --model)" if (folder / "config.json").is_file() else ""
        raise FolderError(
            f"{path} is not a decoder folder: it has no model_index.json{hint}. Pass the folder a decoder or "
            "queries stage wrote, e.g. a run's final/ (decoder stage) or outputs/demo/decoder"
        )


__all__ = [
    "REPO_ID_PATTERN",
    "FolderError",
    "RecipeError",
    "UsageError",
    "check_decoder_folder",
    "check_model_folder",
    "error_line",
    "report_error",
]
