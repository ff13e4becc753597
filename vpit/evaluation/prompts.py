"""The prompt files of text-to-image benchmarks, read as their official repositories ship them, and checked.

    format   input                                                        prompt key (names its output)
    geneval  GenEval's prompts/evaluation_metadata.jsonl: one JSON object   the line's index, zero-padded: 00000
             per line, {"tag": ..., "include": [...], "prompt": ...}
    dpg      DPG-Bench's dpg_bench/prompts/: a folder of <item_id>.txt      the item id (the file's stem)
             files, one prompt each; or dpg_bench/dpg_bench.csv (columns
             item_id, text; one row per question, the prompt repeated)
    plain    a .txt file, one prompt per line                               the line's index, zero-padded: 00000

Detection (`read_prompts(path)` without `fmt`): a folder or a .csv is DPG-Bench, a .jsonl GenEval, a .txt plain.
A prompt is kept exactly as written; only the whitespace around a .txt prompt (its line end, a file's final
newline) is dropped. A record that cannot be read is refused with its file, line and the reason: an empty line
inside a file, a line that is not a JSON object with a non-empty "prompt" string, a DPG id that is no plain file
name, or one DPG id with two different texts.

Example:
    >>> prompts = read_prompts("geneval/prompts/evaluation_metadata.jsonl")
    >>> prompts.format, prompts.prompts[0].key, prompts.prompts[0].text
    ('geneval', '00000', 'a photo of a bench')
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

FORMATS = ("geneval", "dpg", "plain")

# A DPG-Bench item id becomes a file name (<id>.png), so it must be one: no separators, no leading dot.
_FILE_NAME = re.compile(r"^[\w][\w.-]*$")


@dataclass(frozen=True)
class BenchmarkPrompt:
    """One prompt of a benchmark.

    Args:
        key: the name of its output: GenEval and plain, the prompt's index zero-padded to 5 digits; DPG, its item id.
        text: the prompt, sent to the model as it is.
        metadata: GenEval and plain, the line written as the prompt's metadata.jsonl (GenEval: the input line
            verbatim; plain: {"prompt": text}); DPG: None.
        source: where it was read, "file:line".
    """

    key: str
    text: str
    metadata: str | None
    source: str


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one file (or DPG folder) and the benchmark format they were read as (one of FORMATS)."""

    format: str
    path: Path
    prompts: list[BenchmarkPrompt]


def detect_format(path: str | Path) -> str:
    """The format of a prompt file or folder, from what it is: a folder or .csv: dpg; .jsonl: geneval; .txt: plain."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such prompt file or folder")
    if path.is_dir():
        return "dpg"
    formats = {".jsonl": "geneval", ".csv": "dpg", ".txt": "plain"}
    if path.suffix.lower() not in formats:
        raise UsageError(
            f"{path}: cannot tell the prompt format from the name (.jsonl: GenEval, a folder of .txt or .csv: "
            "DPG-Bench, .txt: one prompt per line); pass --format geneval|dpg|plain"
        )
    return formats[path.suffix.lower()]


def read_prompts(path: str | Path, fmt: str | None = None) -> PromptSet:
    """Read a benchmark's prompts; `fmt` (one of FORMATS) overrides the detection of `detect_format`.

    Raises:
        vpit.errors.UsageError: a missing path, an unknown format, no prompts, or a bad record (its file, line and
            the reason).
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown prompt format {fmt!r}; one of {', '.join(FORMATS)}")
    fmt = fmt or detect_format(path)
    if not path.exists():
        raise UsageError(f"{path}: no such prompt file or folder")
    if fmt == "dpg":
        prompts = _read_dpg_folder(path) if path.is_dir() else _read_dpg_csv(path)
    elif path.is_dir():
        raise UsageError(f"{path} is a folder; {fmt} prompts are one file (folders of .txt files are DPG-Bench's)")
    else:
        prompts = _read_geneval(path) if fmt == "geneval" else _read_plain(path)
    if not prompts:
        raise UsageError(f"{path}: no prompts")
    return PromptSet(fmt, path, prompts)


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line without its end) for every line up to the last non-empty one; an empty line before it
    is refused (it would shift every later prompt's index)."""
    lines = _text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise UsageError(f"{path}:{number}: empty line; one prompt per line, no blank lines between them")
    return list(enumerate(lines, 1))


def _read_geneval(path: Path) -> list[BenchmarkPrompt]:
    prompts: list[BenchmarkPrompt] = []
    for number, line in _lines(path):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where}: not a JSON object ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{where}: a JSON {type(record).__name__}, not an object with a 'prompt'")
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{where}: no 'prompt' string (a GenEval record holds 'tag', 'include' and 'prompt')")
        prompts.append(BenchmarkPrompt(f"{len(prompts):05d}", prompt, line, where))
    return prompts


def _read_plain(path: Path) -> list[BenchmarkPrompt]:
    return [
        BenchmarkPrompt(f"{i:05d}", line.strip(), json.dumps({"prompt": line.strip()}), f"{path}:{number}")
        for i, (number, line) in enumerate(_lines(path))
    ]


def _read_dpg_folder(path: Path) -> list[BenchmarkPrompt]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")
    if not files:
        raise UsageError(f"{path}: no .txt files; DPG-Bench's prompts are a folder of <item_id>.txt files")
    prompts: list[BenchmarkPrompt] = []
    for file in files:
        text = _text(file).strip()
        if not text:
            raise UsageError(f"{file}:1: empty prompt")
        prompts.append(BenchmarkPrompt(file.stem, text, None, f"{file}:1"))
    return prompts


def _read_dpg_csv(path: Path) -> list[BenchmarkPrompt]:
    texts: dict[str, BenchmarkPrompt] = {}
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        missing = {"item_id", "text"} - set(reader.fieldnames or ())
        if missing:
            raise UsageError(
                f"{path}:1: no column {', '.join(sorted(missing))}; DPG-Bench's dpg_bench.csv has item_id and text"
            )
        for row in reader:
            where = f"{path}:{reader.line_num}"
            key, text = (row["item_id"] or "").strip(), (row["text"] or "").strip()
            if not _FILE_NAME.match(key):
                raise UsageError(f"{where}: item_id {key!r} cannot name an image file (<item_id>.png)")
            if not text:
                raise UsageError(f"{where}: empty text for item {key!r}")
            if key in texts and texts[key].text != text:
                raise UsageError(f"{where}: item {key!r} has another text than at {texts[key].source}")
            texts.setdefault(key, BenchmarkPrompt(key, text, None, where))
    return list(texts.values())


__all__ = ["FORMATS", "BenchmarkPrompt", "PromptSet", "detect_format", "read_prompts"]
