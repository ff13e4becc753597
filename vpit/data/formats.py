"""Readers for the formats people already have, and their conversion to canonical `Sample`s.

Formats (a card's `format`, or detected from a record's keys):
    llava     {"id", "image" | "images", "conversations": [{"from": "human" | "gpt" | "system", "value"}]}
              (LLaVA-Instruct / LLaVA-665k / ShareGPT4V; ShareGPT's "user" / "assistant" aliases accepted)
    messages  {"id", "images": [...], "messages": [{"role", "content"}]}; content is a string with <image>
              markers, or a list of parts [{"type": "text", "text"}, {"type": "image"}]
    caption   {"image", "caption"}: a caption set turned into generation data, MetaMorph style:
              "Generate an image of {caption}." -> "Here is an image based on your request: <image>"
    edit      {"input_image", "instruction", "output_image"}: image editing (InstructPix2Pix) as
              "<image> {instruction}" -> "<image>"
    frames    {"frames": [...]}: video frame prediction, the last frame is the target

Sources: JSON (a list of records), JSONL (one record a line), or a `datasets` dataset (a local folder saved with
`save_to_disk`, a local data folder, or a Hub id; `streaming=True` for large data). A list of video frames is
a list of images. Field names can be remapped per format with `fields={"canonical": "record_key"}`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..model.images import ImageSource
from .records import RecordError, Sample

FORMATS = ("llava", "messages", "caption", "edit", "frames")
TASKS = ("understanding", "generation", "other_visual")
# The image marker of the data formats (LLaVA's). It is a fact of the data, not of the model: `with_image_token`
# writes the model's own `config.image_token` in its place when a sample meets a processor.
IMAGE_MARKER = "<image>"

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}

GENERATION_TEMPLATES = (
    "Generate an image of {caption}.",
    "Draw {caption}.",
    "Create a picture of {caption}.",
    "Produce an image showing {caption}.",
    "Can you show me an image of {caption}?",
    "Make an image of {caption}.",
)
GENERATION_RESPONSE = "Here is an image based on your request: <image>"
EDIT_TEMPLATE = "<image> {instruction}"
FRAMES_PROMPT = "Predict the next frame of the video."

# canonical field name -> default record key, per format
DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "llava": {"id": "id", "image": "image", "images": "images", "conversations": "conversations"},
    "messages": {"id": "id", "images": "images", "messages": "messages"},
    "caption": {"id": "id", "image": "image", "caption": "caption"},
    "edit": {"id": "id", "input_image": "input_image", "instruction": "instruction", "output_image": "output_image"},
    "frames": {"id": "id", "frames": "frames", "prompt": "prompt"},
}


# ------------------------------------------------------------------------------------------- reading


def _has_surrogates(value: Any) -> bool:
    """True if any string inside `value` holds a lone surrogate (bytes that were not valid UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, Mapping):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_surrogates(v) for v in value)
    return False


RawRecord = tuple[int, "dict[str, Any] | RecordError"]


def read_json_file(path: str | Path) -> Iterator[RawRecord]:
    """Yield (index, record) from a .json list or a .jsonl file; a bad line or record yields (index, RecordError).

    Text is decoded with `surrogateescape`, so invalid UTF-8 in one record is reported for that record
    (`invalid_utf8`) instead of failing the whole file.

    Raises:
        RecordError: (bad_json) when a .json file as a whole is not a JSON list.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError("unreadable_file", f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        with path.open("rb") as handle:
            for index, raw in enumerate(handle):
                line = raw.decode("utf-8", errors="surrogateescape").strip()
                if not line:
                    continue
                yield index, _parse(line, f"line {index + 1}")
        return
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError("bad_json", f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise RecordError("bad_json", f"{path} holds a JSON {type(data).__name__}, expected a list of records")
    for index, record in enumerate(data):
        yield index, _checked(record, f"record {index}")


def _parse(text: str, where: str) -> dict[str, Any] | RecordError:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return RecordError("bad_json", f"{where}: {err}")
    return _checked(record, where)


def _checked(record: Any, where: str) -> dict[str, Any] | RecordError:
    if not isinstance(record, dict):
        return RecordError("bad_json", f"{where} is a JSON {type(record).__name__}, expected an object")
    if _has_surrogates(record):
        return RecordError("invalid_utf8", f"{where} holds text that is not valid UTF-8")
    return record


def read_hf_dataset(
    name_or_path: str | Path,
    split: str = "train",
    streaming: bool = False,
    **load_kwargs: Any,
) -> Iterator[RawRecord]:
    """Yield (index, record) from a `datasets` dataset: a `save_to_disk` folder, a data folder or a Hub id."""
    import datasets

    path = Path(name_or_path)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if streaming:
            dataset = dataset.to_iterable_dataset()
    else:
        dataset = datasets.load_dataset(str(name_or_path), split=split, streaming=streaming, **load_kwargs)
    for index, record in enumerate(dataset):
        yield index, _checked(dict(record), f"row {index}")


def detect_format(record: Mapping[str, Any]) -> str:
    """Guess a record's format from its keys (for bare files handed to `vpit data validate`)."""
    if "conversations" in record:
        return "llava"
    if "messages" in record:
        return "messages"
    if "frames" in record:
        return "frames"
    if "output_image" in record or "edited_image" in record:
        return "edit"
    if "caption" in record:
        return "caption"
    raise RecordError(
        "bad_record", f"cannot tell the format from the keys {sorted(record)}; name it with --format / a data card"
    )


# ---------------------------------------------------------------------------------------- converting


def _field(record: Mapping[str, Any], fields: Mapping[str, str], name: str, required: bool = True) -> Any:
    key = fields.get(name, name)
    if key not in record or record[key] is None:
        if required:
            raise RecordError("bad_record", f"missing field {key!r} ({name})")
        return None
    return record[key]


def _image_list(value: Any, key: str) -> list[ImageSource]:
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or hasattr(value, "mode"):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise RecordError("bad_record", f"field {key!r} must be an image or a list of images, got {type(value).__name__}")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError("bad_record", f"{where} must be a string, got {type(value).__name__}")
    return value


def _lower_first(text: str) -> str:
    """'A dog on grass.' -> 'a dog on grass' (keeps acronyms such as 'NASA rocket')."""
    text = text.strip().rstrip(".").strip()
    if len(text) > 1 and text[0].isupper() and not text[1].isupper():
        text = text[0].lower() + text[1:]
    return text


def _response(template: str | Sequence[str] | None, default: str, pick: random.Random) -> str:
    """The assistant turn: the card's response template, one of its list picked per record, or the default."""
    if isinstance(template, str):
        return template
    return pick.choice(list(template)) if template else default


def record_to_sample(
    record: Mapping[str, Any],
    fmt: str,
    *,
    index: int = -1,
    source: str = "",
    task: str | None = None,
    fields: Mapping[str, str] | None = None,
    templates: Sequence[str] | None = None,
    response_template: str | Sequence[str] | None = None,
    image_root: Path | None = None,
    seed: int = 0,
) -> Sample:
    """Convert one raw record to a `Sample`; structural problems raise RecordError (see `check_sample`).

    Args:
        fmt: one of FORMATS.
        fields: canonical field name -> the record's key (defaults: DEFAULT_FIELDS[fmt]).
        templates: caption formats: prompt templates with `{caption}` (one is picked per record, seeded by
            `seed` and `index`); edit: the user template with `{instruction}`; frames: the prompt.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    fields = {**DEFAULT_FIELDS[fmt], **(fields or {})}
    record_id = record.get(fields["id"])
    images: list[ImageSource]
    if fmt == "llava":
        turns = _field(record, fields, "conversations")
        if not isinstance(turns, list):
            raise RecordError("bad_record", "'conversations' must be a list of turns")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise RecordError("bad_record", f"turn {i} must be an object with 'from' and 'value'")
            role = ROLE_ALIASES.get(str(turn["from"]).lower())
            if role is None:
                raise RecordError("unknown_role", f"turn {i} has role {turn['from']!r}")
            messages.append({"role": role, "content": _text(turn["value"], f"turn {i} value")})
        images = _image_list(record.get(fields["images"]), fields["images"]) or _image_list(
            record.get(fields["image"]), fields["image"]
        )
        default_task = "understanding"
    elif fmt == "messages":
        turns = _field(record, fields, "messages")
        if not isinstance(turns, list):
            raise RecordError("bad_record", "'messages' must be a list")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise RecordError("bad_record", f"message {i} must be an object with 'role' and 'content'")
            role = ROLE_ALIASES.get(str(turn["role"]).lower())
            if role is None:
                raise RecordError("unknown_role", f"message {i} has role {turn['role']!r}")
            messages.append({"role": role, "content": _content_text(turn["content"], i)})
        images = _image_list(record.get(fields["images"]), fields["images"])
        default_task = "understanding"
    elif fmt == "caption":
        caption = _lower_first(_text(_field(record, fields, "caption"), "caption"))
        prompts = list(templates or GENERATION_TEMPLATES)
        pick = random.Random(seed * 1_000_003 + index)
        prompt = pick.choice(prompts)  # then the response, from the same draw sequence
        messages = [
            {"role": "user", "content": prompt.format(caption=caption)},
            {"role": "assistant", "content": _response(response_template, GENERATION_RESPONSE, pick)},
        ]
        images = [_field(record, fields, "image")]
        default_task = "generation"
    elif fmt == "edit":
        instruction = _text(_field(record, fields, "instruction"), "instruction").strip()
        template = (templates or [EDIT_TEMPLATE])[0]
        messages = [
            {"role": "user", "content": template.format(instruction=instruction)},
            {"role": "assistant", "content": _response(response_template, IMAGE_MARKER, random.Random(index))},
        ]
        images = [_field(record, fields, "input_image"), _field(record, fields, "output_image")]
        default_task = "other_visual"
    else:  # frames
        frames = _image_list(_field(record, fields, "frames"), fields["frames"])
        if len(frames) < 2:
            raise RecordError("bad_record", f"frame prediction needs at least 2 frames, got {len(frames)}")
        prompt = record.get(fields["prompt"]) or (templates or [FRAMES_PROMPT])[0]
        messages = [
            {"role": "user", "content": IMAGE_MARKER * (len(frames) - 1) + " " + _text(prompt, "prompt")},
            {"role": "assistant", "content": _response(response_template, IMAGE_MARKER, random.Random(index))},
        ]
        images = frames
        default_task = "other_visual"
    return Sample(
        messages=messages,
        images=images,
        id=None if record_id is None else str(record_id),
        source=source,
        index=index,
        task=task or default_task,
        image_root=image_root,
    )


def _content_text(content: Any, i: int) -> str:
    """A messages-format content: a string, or a list of text / image parts joined in order."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError("bad_record", f"message {i} content must be a string or a list of parts")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(_text(part.get("text"), f"message {i} text part"))
        elif kind == "image":
            pieces.append(IMAGE_MARKER)
        else:
            raise RecordError("bad_record", f"message {i} has a part of type {kind!r}; expected 'text' or 'image'")
    return "".join(pieces)


def check_sample(sample: Sample) -> None:
    """Structural checks on a converted sample (no image I/O).

    Raises:
        RecordError: empty_turn, bad_role_order, no_assistant_turn or image_count_mismatch.
    """
    roles = [m["role"] for m in sample.messages]
    for i, message in enumerate(sample.messages):
        if not message["content"].strip():
            raise RecordError("empty_turn", f"turn {i} ({message['role']}) is empty")
    body = roles[1:] if roles and roles[0] == "system" else roles
    if "system" in body:
        raise RecordError("bad_role_order", f"a system turn may only come first; roles are {roles}")
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if body != expected[: len(body)]:
        raise RecordError("bad_role_order", f"turns must alternate user, assistant; roles are {roles}")
    if "assistant" not in body:
        raise RecordError("no_assistant_turn", f"roles are {roles}")
    markers = sum(m["content"].count(IMAGE_MARKER) for m in sample.messages)
    if markers != len(sample.images):
        raise RecordError(
            "image_count_mismatch", f"{markers} {IMAGE_MARKER} marker(s) but {len(sample.images)} image(s)"
        )


def with_image_token(messages: Sequence[Mapping[str, Any]], image_token: str) -> list[dict[str, Any]]:
    """The messages with each data marker (`IMAGE_MARKER`) replaced by the model's image token."""
    if image_token == IMAGE_MARKER:
        return [dict(m) for m in messages]
    return [{**m, "content": m["content"].replace(IMAGE_MARKER, image_token)} for m in messages]


__all__ = [
    "DEFAULT_FIELDS",
    "FORMATS",
    "GENERATION_RESPONSE",
    "GENERATION_TEMPLATES",
    "TASKS",
    "check_sample",
    "detect_format",
    "read_hf_dataset",
    "read_json_file",
    "record_to_sample",
    "with_image_token",
]
