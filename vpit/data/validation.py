"""Scan data for bad records and report every one: source, index, id, reason, message.

`validate(target)` accepts a data card, a recipe (its `data.mixture`), or a bare LLaVA / messages / caption /
edit / frames JSON or JSONL file (format detected). Nothing is dropped quietly: every record is either counted
good or listed with its reason.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..model.processing_vpit import VPiTProcessor
from .cards import DataCard, parse_mixture
from .encode import encode_sample
from .formats import RawRecord, check_sample, detect_format, read_json_file, record_to_sample
from .records import REASONS, RecordError, Sample, load_record_image


@dataclass
class Problem:
    source: str
    index: int
    id: str | None
    reason: str
    message: str


@dataclass
class ValidationReport:
    """Counts per source, and every problem found."""

    checked: Counter[str] = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)

    @property
    def num_bad(self) -> int:
        return len(self.problems)

    @property
    def num_checked(self) -> int:
        return sum(self.checked.values())

    def by_reason(self) -> Counter[str]:
        return Counter(p.reason for p in self.problems)

    def summary(self) -> str:
        lines = [f"checked {self.num_checked} record(s), {self.num_bad} bad"]
        bad_by_source = Counter(p.source for p in self.problems)
        for source, count in self.checked.items():
            lines.append(f"  {source}: {count} checked, {bad_by_source[source]} bad")
        for reason, count in sorted(self.by_reason().items()):
            lines.append(f"  {reason:<22} {count:>6}  ({REASONS[reason]})")
        return "\n".join(lines)

    def write(self, path: str | Path) -> Path:
        """Write every problem as a JSON line to `path` and the counts to `path` with `.summary.json`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            for problem in self.problems:
                handle.write(json.dumps(asdict(problem)) + "\n")
        summary = {
            "checked": dict(self.checked),
            "bad": self.num_bad,
            "by_reason": dict(self.by_reason()),
        }
        path.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return path


def validate_records(
    records: Iterable[RawRecord],
    to_sample: Callable[[int, Mapping[str, Any]], Sample],
    source: str,
    report: ValidationReport,
    processor: VPiTProcessor | None = None,
    max_length: int | None = None,
    id_field: str = "id",
) -> ValidationReport:
    """Check every record: parse, structure, duplicate ids, images (decoded), and, with a processor, tokenisation
    and truncation. Adds to `report` and returns it."""
    seen: set[str] = set()
    try:
        for index, record in records:
            _check_one(index, record, to_sample, source, report, seen, processor, max_length, id_field)
    except RecordError as err:  # the source as a whole cannot be read (missing file, not a JSON list)
        report.checked[source] += 1
        report.problems.append(Problem(source, -1, None, err.reason, err.message))
    return report


def _check_one(
    index: int,
    record: dict[str, Any] | RecordError,
    to_sample: Callable[[int, Mapping[str, Any]], Sample],
    source: str,
    report: ValidationReport,
    seen: set[str],
    processor: VPiTProcessor | None,
    max_length: int | None,
    id_field: str,
) -> None:
    report.checked[source] += 1
    record_id = record.get(id_field) if isinstance(record, dict) else None
    try:
        if isinstance(record, RecordError):
            raise record
        sample = to_sample(index, record)
        check_sample(sample)
        if sample.id is not None:
            if sample.id in seen:
                raise RecordError("duplicate_id", f"id {sample.id!r} appears more than once")
            seen.add(sample.id)
        if processor is not None:
            encode_sample(sample, processor, max_length)
        else:
            for image in sample.images:
                load_record_image(image, sample.image_root)
    except RecordError as err:
        report.problems.append(
            Problem(source, index, None if record_id is None else str(record_id), err.reason, err.message)
        )


def validate_card(
    card: DataCard,
    report: ValidationReport,
    use_sample: bool = False,
    processor: VPiTProcessor | None = None,
    max_length: int | None = None,
) -> ValidationReport:
    def to_sample(index: int, record: Mapping[str, Any]) -> Sample:
        return card.to_sample(index, record, use_sample=use_sample)

    return validate_records(
        card.records(use_sample), to_sample, card.name, report, processor, max_length, id_field=card.id_field
    )


def validate_file(
    path: str | Path,
    report: ValidationReport,
    fmt: str | None = None,
    image_folder: str | Path | None = None,
    processor: VPiTProcessor | None = None,
    max_length: int | None = None,
) -> ValidationReport:
    """A bare data file; the format is detected from its first readable record unless given."""
    path = Path(path)
    root = Path(image_folder) if image_folder else path.parent
    detected: list[str] = [fmt] if fmt else []

    def to_sample(index: int, record: Mapping[str, Any]) -> Sample:
        if not detected:
            detected.append(detect_format(record))
        return record_to_sample(record, detected[0], index=index, source=path.name, image_root=root)

    return validate_records(read_json_file(path), to_sample, path.name, report, processor, max_length)


def validate(
    target: str | Path,
    use_sample: bool = False,
    fmt: str | None = None,
    image_folder: str | Path | None = None,
    processor: VPiTProcessor | None = None,
    max_length: int | None = None,
) -> ValidationReport:
    """Validate a data card (.yaml with name/format), a recipe (.yaml with data.mixture) or a data file."""
    target = Path(target)
    report = ValidationReport()
    if target.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(target.read_text())
        if isinstance(data, dict) and "data" in data:
            for entry in parse_mixture(data["data"].get("mixture", []), f"{target}: data.mixture"):
                validate_card(entry.load(target.parent), report, use_sample, processor, max_length)
            return report
        return validate_card(DataCard.load(target), report, use_sample, processor, max_length)
    if target.suffix in (".json", ".jsonl"):
        return validate_file(target, report, fmt, image_folder, processor, max_length)
    raise ValueError(f"{target}: expected a data card or recipe (.yaml) or a data file (.json / .jsonl)")


__all__ = ["Problem", "ValidationReport", "validate", "validate_card", "validate_file", "validate_records"]
