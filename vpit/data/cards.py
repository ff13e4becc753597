"""Data cards (YAML files in `data_cards/`) and mixtures of them.

A card describes one source: what it is, its task category, where it lives, its format and field mapping,
licence, citation, default templates, and a handful of sample records shipped with vpit (so every card can be
validated offline). A recipe's mixture lists cards with sampling weights, caps and location overrides:

    data:
      mixture:
        - {card: data_cards/llava_v1_5_mix665k.yaml, weight: 1.0, image_folder: /data/llava}
        - {card: data_cards/cc3m_generation.yaml, weight: 0.5, cap: 100000}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .formats import DEFAULT_FIELDS, FORMATS, TASKS, RawRecord, read_hf_dataset, read_json_file, record_to_sample
from .records import RecordError, Sample


@dataclass
class SourceLocation:
    """Where records live: local JSON/JSONL files, or a `datasets` dataset (Hub id or local folder).

    Relative paths are resolved against the card's folder.
    """

    data_files: list[str] = field(default_factory=list)
    hub_id: str | None = None
    split: str = "train"
    streaming: bool = False
    image_folder: str | None = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> SourceLocation:
        _reject_unknown(data, cls, where)
        location = cls(**data)
        if location.data_files is None:
            location.data_files = []
        if isinstance(location.data_files, str):
            location.data_files = [location.data_files]
        if not location.data_files and not location.hub_id:
            raise ValueError(f"{where}: give data_files (local JSON / JSONL) or hub_id (a datasets dataset)")
        for name in location.data_files:
            if not name.endswith((".json", ".jsonl")):
                raise ValueError(f"{where}: data file {name!r} must be .json or .jsonl (use hub_id for others)")
        return location

    def resolved(self, base: Path) -> SourceLocation:
        def absolute(p: str) -> str:
            return p if "://" in p else str((base / p).resolve())

        return dataclasses.replace(
            self,
            data_files=[absolute(p) for p in self.data_files],
            image_folder=absolute(self.image_folder) if self.image_folder else None,
            hub_id=absolute(self.hub_id) if self.hub_id and (base / self.hub_id).exists() else self.hub_id,
        )


@dataclass
class DataCard:
    """One data source, as described by a YAML card. Every field is documented in data_cards/README.md."""

    name: str
    description: str
    task: str
    format: str
    license: str
    citation: str
    source: SourceLocation
    homepage: str | None = None
    sample: SourceLocation | None = None
    fields: dict[str, str] = field(default_factory=dict)
    templates: list[str] | None = None
    response_template: str | list[str] | None = None
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> DataCard:
        """Read and validate a card.

        Raises:
            ValueError: unknown or missing keys, an unknown task or format, a malformed location.
        """
        path = Path(path)
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a data card is a YAML mapping")
        _reject_unknown(data, cls, str(path), exclude={"path"})
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and _required(f)]
        if missing:
            raise ValueError(f"{path}: missing required keys {missing}")
        if data["task"] not in TASKS:
            raise ValueError(f"{path}: task must be one of {list(TASKS)}, got {data['task']!r}")
        if data["format"] not in FORMATS:
            raise ValueError(f"{path}: format must be one of {list(FORMATS)}, got {data['format']!r}")
        base = path.parent
        data["source"] = SourceLocation.from_dict(data["source"], f"{path}: source").resolved(base)
        if data.get("sample") is not None:
            data["sample"] = SourceLocation.from_dict(data["sample"], f"{path}: sample").resolved(base)
        unknown_fields = sorted(set(data.get("fields") or {}) - set(DEFAULT_FIELDS[data["format"]]))
        if unknown_fields:
            raise ValueError(
                f"{path}: fields {unknown_fields} are not fields of the {data['format']!r} format; "
                f"known: {sorted(DEFAULT_FIELDS[data['format']])}"
            )
        if data.get("templates") is not None and not all(isinstance(t, str) for t in data["templates"]):
            raise ValueError(f"{path}: templates must be a list of strings")
        responses = data.get("response_template")
        if isinstance(responses, list) and (not responses or not all(isinstance(r, str) for r in responses)):
            raise ValueError(f"{path}: response_template must be a string or a non-empty list of strings")
        for response in responses if isinstance(responses, list) else [responses] if responses else []:
            if response.count("<image>") != 1:
                raise ValueError(f"{path}: response_template {response!r} must hold <image> exactly once")
        return cls(**data, path=path)

    def location(self, use_sample: bool = False) -> SourceLocation:
        if use_sample:
            if self.sample is None:
                raise ValueError(f"card {self.name!r} ships no sample data")
            return self.sample
        return self.source

    def records(self, use_sample: bool = False) -> Iterator[RawRecord]:
        """(index, raw record or RecordError) over the whole source (or its shipped sample)."""
        yield from read_location(self.location(use_sample))

    @property
    def id_field(self) -> str:
        """The record key holding the id (e.g. CC3M's `__key__`)."""
        return self.fields.get("id", DEFAULT_FIELDS[self.format]["id"])

    def image_root(self, use_sample: bool = False) -> Path | None:
        """The folder every image path of this source must stay inside: its `image_folder`, else the card's own
        folder (a record can never reach `/etc/...` or `../..` by leaving image_folder unset), else the folder of
        its first data file (a card built in code). None only for a Hub dataset of a card built in code."""
        location = self.location(use_sample)
        if location.image_folder:
            return Path(location.image_folder)
        if self.path is not None:
            return self.path.resolve().parent
        if location.data_files and "://" not in location.data_files[0]:
            return Path(location.data_files[0]).resolve().parent
        return None

    def to_sample(self, index: int, record: Mapping[str, Any], use_sample: bool = False, seed: int = 0) -> Sample:
        return record_to_sample(
            record,
            self.format,
            index=index,
            source=self.name,
            task=self.task,
            fields=self.fields,
            templates=self.templates,
            response_template=self.response_template,
            image_root=self.image_root(use_sample),
            seed=seed,
        )


def read_location(location: SourceLocation) -> Iterator[RawRecord]:
    """Records of every data file in order (indices continue across files), or of the datasets dataset."""
    if location.hub_id:
        yield from read_hf_dataset(location.hub_id, location.split, location.streaming, **location.load_kwargs)
        return
    offset = 0
    for data_file in location.data_files:
        last = -1
        for index, record in read_json_file(data_file):
            yield offset + index, record
            last = index
        offset += last + 1


@dataclass
class MixtureEntry:
    """One card in a mixture, with its sampling weight, optional cap and location overrides."""

    card: str
    weight: float = 1.0
    cap: int | None = None
    data_files: list[str] | None = None
    image_folder: str | None = None
    hub_id: str | None = None
    streaming: bool | None = None

    def load(self, base: Path | None = None) -> DataCard:
        # Card paths are relative to the working directory (the repository root) or to the recipe's folder.
        card_path = Path(self.card)
        if not card_path.exists() and base is not None and (base / self.card).exists():
            card_path = base / self.card
        card = DataCard.load(card_path)
        overrides: dict[str, Any] = {
            k: v
            for k, v in {
                "data_files": self.data_files,
                "image_folder": self.image_folder,
                "hub_id": self.hub_id,
                "streaming": self.streaming,
            }.items()
            if v is not None
        }
        if self.data_files is not None and self.hub_id is None:
            overrides["hub_id"] = None  # local files replace a Hub source, they do not sit behind it
        if overrides:
            location = dataclasses.replace(card.source, **overrides)
            card.source = location.resolved(Path.cwd())
        return card


def parse_mixture(entries: Sequence[Mapping[str, Any]], where: str = "data.mixture") -> list[MixtureEntry]:
    """Validate a recipe's mixture list.

    Raises:
        ValueError: on unknown keys, a missing card, a negative weight or a non-positive cap.
    """
    if not entries:
        raise ValueError(f"{where} must list at least one card")
    parsed = []
    for i, entry in enumerate(entries):
        _reject_unknown(entry, MixtureEntry, f"{where}[{i}]")
        if "card" not in entry:
            raise ValueError(f"{where}[{i}] needs a 'card' path")
        item = MixtureEntry(**entry)
        if not item.weight >= 0:
            raise ValueError(f"{where}[{i}] ({item.card}): weight must be >= 0, got {item.weight}")
        if item.cap is not None and item.cap < 1:
            raise ValueError(f"{where}[{i}] ({item.card}): cap must be >= 1 or null, got {item.cap}")
        parsed.append(item)
    return parsed


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _reject_unknown(data: Mapping[str, Any], cls: type, where: str, exclude: set[str] | None = None) -> None:
    known = {f.name for f in dataclasses.fields(cls)} - (exclude or set())
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")


__all__ = ["DataCard", "MixtureEntry", "RecordError", "SourceLocation", "parse_mixture", "read_location"]
