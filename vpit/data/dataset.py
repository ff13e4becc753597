"""The training stream: a mixture of data cards, sampled by `MixtureSampler`, encoded on the fly.

A bad record is never retried or replaced quietly: it is skipped, counted, and appended with its reason to
`skipped.jsonl` in the run folder; each encoded sample carries `num_skipped` (records skipped just before it)
so the training loop can show the count, and the stream stops with `SkipRateExceeded` when the skip rate
passes `max_skip_rate` (after `min_records` records, so one early bad record does not stop a run).

Duplicate ids are a validation finding (`vpit data validate`), not a reason to skip at training time: the
stream would have to remember every id, and ids legitimately repeat across epochs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from ..model.processing_vpit import VPiTProcessor
from .cards import DataCard
from .encode import encode_sample
from .features import FeatureCache
from .formats import RawRecord
from .mixture import MixtureSampler
from .records import RecordError, Sample


class SkipRateExceeded(RuntimeError):
    """Too many bad records: the data needs fixing (see skipped.jsonl and `vpit data validate`)."""


class SkipLog:
    """Counts used and skipped records; appends each skipped one to a JSONL file.

    Args:
        path: skipped.jsonl in the run folder (None: count only).
        max_skip_rate: the largest tolerated fraction of skipped records.
        min_records: the rate is enforced once this many records were seen.
    """

    def __init__(self, path: str | Path | None, max_skip_rate: float = 0.01, min_records: int = 200):
        if not 0 <= max_skip_rate <= 1:
            raise ValueError(f"max_skip_rate must be in [0, 1], got {max_skip_rate}")
        self.path = Path(path) if path is not None else None
        self.max_skip_rate = max_skip_rate
        self.min_records = min_records
        self.used = 0
        self.skipped = 0

    def ok(self) -> None:
        self.used += 1

    def skip(self, source: str, index: int, record_id: str | None, error: RecordError, position: int = -1) -> None:
        """Count a skipped record and append it (with its stream position) to the log file."""
        self.skipped += 1
        if self.path is not None:
            entry = {
                "source": source,
                "index": index,
                "id": record_id,
                "reason": error.reason,
                "message": error.message,
                "position": position,
            }
            # One short line per write, opened in append mode: lines from several workers never interleave.
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
        seen = self.used + self.skipped
        if seen >= self.min_records and self.skipped / seen > self.max_skip_rate:
            raise SkipRateExceeded(
                f"{self.skipped} of {seen} records skipped ({self.skipped / seen:.1%} > max_skip_rate "
                f"{self.max_skip_rate:.1%}); reasons are in {self.path or 'the skip log'}; "
                "run `vpit data validate` on the data"
            )


class _Records:
    """Random access to a map-style source, sequential access to a streaming one."""

    def __init__(self, card: DataCard, use_sample: bool):
        self.streaming = card.location(use_sample).streaming
        self._card, self.use_sample = card, use_sample
        self._rows: list[RawRecord] | None = None if self.streaming else list(card.records(use_sample))
        self._stream: Iterator[RawRecord] | None = None
        self._next = 0

    def __len__(self) -> int:
        if self._rows is None:
            raise TypeError("a streaming source has no length")
        return len(self._rows)

    def get(self, index: int) -> RawRecord:
        if self._rows is not None:
            return self._rows[index]
        if self._stream is None or index < self._next:  # first use, or the stream wrapped at its cap
            self._stream, self._next = iter(self._card.records(self.use_sample)), 0
        while True:
            position, record = next(self._stream)
            self._next = position + 1
            if position == index:
                return position, record


class VPiTDataset(IterableDataset):
    """Encoded samples from a weighted mixture of cards, for one distributed rank.

    Args:
        cards: the data cards of the mixture.
        processor: tokenizer + image transform of the model being trained (samples go through `encode_sample`).
        encode: instead of a processor, any picklable `Sample -> dict` (e.g. images only, for the decoder); it
            raises RecordError for a bad sample.
        features: per card, its encoder-token cache or None (`vpit.data.features`): cached images are not loaded.
        weights / caps: sampling weight and optional cap per card.
        seed / rank / world_size: the sampler's seed and this process's shard.
        max_length: token limit per sample (cut after the last image span, never through one).
        skip_log: where skipped records are counted and written.
        use_sample: read each card's shipped sample data instead of its full source.

    Each DataLoader worker takes every `num_workers`-th position of this rank's stream, so the order of the
    stream does not depend on the number of workers.
    """

    def __init__(
        self,
        cards: Sequence[DataCard],
        processor: VPiTProcessor | None = None,
        weights: Sequence[float] | None = None,
        caps: Sequence[int | None] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_length: int | None = None,
        skip_log: SkipLog | None = None,
        use_sample: bool = False,
        encode: Callable[[Sample], dict[str, Any]] | None = None,
        features: Sequence[FeatureCache | None] | None = None,
    ):
        super().__init__()
        if (processor is None) == (encode is None):
            raise ValueError("give a processor (conversations) or an encode function (e.g. images only), not both")
        self.encode = encode
        self.cards = list(cards)
        self.processor = processor
        self.max_length = max_length
        self.skip_log = skip_log or SkipLog(None)
        self.records = [_Records(card, use_sample) for card in self.cards]
        self.features = list(features) if features is not None else [None] * len(self.cards)
        sizes = [None if r.streaming else len(r) for r in self.records]
        self.sampler = MixtureSampler(
            sizes,
            list(weights) if weights is not None else [1.0] * len(self.cards),
            caps=caps,
            seed=seed,
            rank=rank,
            world_size=world_size,
            names=[card.name for card in self.cards],
        )

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def encode_next(self) -> dict[str, Any] | None:
        """Draw the next record of the stream and encode it; None (counted and logged) when it is bad."""
        position = self.sampler.position  # global position in the mixture stream
        source, index = next(self.sampler)
        card = self.cards[source]
        _, record = self.records[source].get(index)
        record_id = record.get(card.id_field) if isinstance(record, dict) else None
        try:
            if isinstance(record, RecordError):
                raise record
            sample = card.to_sample(index, record, use_sample=self.records[source].use_sample)
            if self.encode is not None:
                encoded = self.encode(sample)
            else:
                assert self.processor is not None
                encoded = encode_sample(sample, self.processor, self.max_length, self.features[source])
        except RecordError as err:
            self.skip_log.skip(card.name, index, None if record_id is None else str(record_id), err, position)
            return None
        self.skip_log.ok()
        encoded["position"] = position
        return encoded

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Encoded samples; each DataLoader worker takes every `num_workers`-th draw of this rank's stream."""
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        if worker is not None:
            self._own_skip_log()
        skipped = 0
        sampler = self.sampler
        while True:
            local = (sampler.position - sampler.rank) // sampler.world_size  # this rank's n-th draw
            if local % num_workers != worker_id:
                next(sampler)
                continue
            encoded = self.encode_next()
            if encoded is None:
                skipped += 1
                continue
            encoded["num_skipped"], skipped = skipped, 0
            yield encoded

    def _own_skip_log(self) -> None:
        """In a worker process: count this worker's share (the file is shared, append-only lines)."""
        log = self.skip_log
        self.skip_log = SkipLog(log.path, log.max_skip_rate, log.min_records)


class VPiTBatches(IterableDataset):
    """Collated batches of a `VPiTDataset`, in an order that does not depend on the number of workers.

    Batch k holds the good samples among this rank's draws [k * batch_size, (k + 1) * batch_size) of the mixture
    stream (bad records are skipped and counted, so a batch can be smaller; a batch with no good sample is not
    yielded). Worker w of W builds batches k = w, w + W, ...; the DataLoader returns them in k order. The run's
    data position is therefore one number, the index of the next batch: resuming from `start_batch` continues the
    stream exactly.

    Use with `DataLoader(batches, batch_size=None, num_workers=...)`.
    """

    def __init__(self, dataset: VPiTDataset, batch_size: int, collate: Any, start_batch: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate = collate
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        dataset = self.dataset
        if worker is not None:
            dataset._own_skip_log()
        sampler = dataset.sampler
        batch_index = self.start_batch + worker_id
        while True:
            state = sampler.state_dict()
            state["position"] = sampler.rank + batch_index * self.batch_size * sampler.world_size
            sampler.load_state_dict(state)
            samples, skipped = [], 0
            for _ in range(self.batch_size):
                sample = dataset.encode_next()
                if sample is None:
                    skipped += 1
                else:
                    samples.append(sample)
            if samples:
                batch = self.collate(samples)
                batch["num_skipped"] = skipped
                batch["batch_index"] = batch_index
                batch["positions"] = [sample["position"] for sample in samples]  # stream positions (bookkeeping)
                yield batch
            batch_index += num_workers


__all__ = ["SkipLog", "SkipRateExceeded", "VPiTBatches", "VPiTDataset"]
