"""Frozen work done once: the vision encoder's visual tokens of a card's images, cached on disk.

The encoder is frozen in every stage, so each image's K x Dv tokens are the same at every epoch; at real sizes the
encoder costs seconds per 384 px image on a CPU and a large share of a GPU step. `vpit data cache-features CARD
--model DIR` writes them once; training then splices them in instead of encoding the pixels (`VPiTDataset` with
`features`, `VPiTForCausalLM.embed` with `visual_tokens_given`).

A cache folder (by default `<card folder>/features/<card name>-<fingerprint>/`):

    meta.json                 the encoder fingerprint and what it was computed from; `complete` once every
                              image of the card is in (or reported)
    index.json                image key -> {"shard": file, "stamp": [size, mtime_ns] of a file image, or null}
    shard-00000.safetensors   one (K, Dv) tensor per image key, written whole then renamed (never half-written)
    skipped.jsonl             the records or images that could not be encoded, with the reason

An image's key is its path relative to the card's image folder (file images, whose size and modification time
are checked on every read: a changed file is read from its pixels again), or the SHA-256 of its bytes (images
embedded in the records). The fingerprint covers the encoder's configuration (backend, name, weights tag, feature
layer, architecture), K, the pooling, the normalisation and the image transform, so a cache is never read by a
model whose tokens differ. Writing resumes: a run killed part-way keeps every finished shard, and the next run
encodes only the images not yet in the index.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import check_model_folder
from ..model.configuration_vpit import VPiTConfig
from ..model.images import ImageError, ImageSource, resolve_image_path
from .cards import DataCard
from .records import RecordError, load_record_image

META_FILE, INDEX_FILE, SKIPPED_FILE = "meta.json", "index.json", "skipped.jsonl"


def encoder_fingerprint(config: VPiTConfig, preprocess_config: dict[str, Any]) -> str:
    """16 hex digits naming what an image's cached tokens depend on (see the module docstring)."""
    vision = config.get_vision_config()
    spec = {
        "vision": {
            key: getattr(vision, key, None)
            for key in ("backend", "model_name", "pretrained", "feature_layer", "model_config", "hidden_size")
        },
        "num_visual_tokens": config.num_visual_tokens,
        "pooling": config.pooling,
        "normalize": config.normalize_visual_tokens,
        "preprocess": preprocess_config,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def feature_folder(card: DataCard, fingerprint: str, use_sample: bool = False) -> Path:
    """Where `vpit data cache-features` writes a card's cache by default, and where training looks for it."""
    if card.path is None:
        raise ValueError(f"card {card.name!r} was not loaded from a file; give the cache folder explicitly")
    name = f"{card.name}{'-sample' if use_sample else ''}-{fingerprint}"
    return card.path.parent / "features" / name


def image_key(source: ImageSource, root: Path | None) -> tuple[str, list[int] | None] | None:
    """(key, stamp) of a record's image: stamp is [size, mtime_ns] for a file; None for an image that has no
    stable identity (a PIL image in memory) or a file that does not exist (its loading reports why)."""
    if isinstance(source, dict):  # a `datasets` Image feature, undecoded
        source = source.get("bytes") or source.get("path") or b""
    if isinstance(source, bytes):
        return ("sha256:" + hashlib.sha256(source).hexdigest(), None) if source else None
    if isinstance(source, (str, Path)):
        try:
            path = resolve_image_path(source, root)
            stat = path.stat()
        except (ImageError, OSError):
            return None
        name = str(path.relative_to(root.resolve())) if root is not None else str(path.resolve())
        return "file:" + name, [stat.st_size, stat.st_mtime_ns]
    return None


class FeatureCache:
    """Read side: `get(source, root)` -> the (K, Dv) tokens of a cached image, or None (not cached, or the file
    changed since). Opens shards lazily in each process (DataLoader workers included)."""

    def __init__(self, folder: str | Path, fingerprint: str | None = None):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META_FILE).read_text())
        if fingerprint is not None and self.meta["fingerprint"] != fingerprint:
            raise ValueError(
                f"{self.folder}: features of encoder {self.meta['fingerprint']}, but the model's encoder is "
                f"{fingerprint}; write a cache for this model with `vpit data cache-features`"
            )
        self.index: dict[str, dict[str, Any]] = json.loads((self.folder / INDEX_FILE).read_text())
        self._shards: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the shards themselves
        return {**self.__dict__, "_shards": {}}

    def get(self, source: ImageSource, root: Path | None) -> torch.Tensor | None:
        found = image_key(source, root)
        if found is None:
            return None
        key, stamp = found
        entry = self.index.get(key)
        if entry is None or entry["stamp"] != stamp:
            return None
        shard = self._shards.get(entry["shard"])
        if shard is None:
            shard = self._shards[entry["shard"]] = safe_open(str(self.folder / entry["shard"]), framework="pt")
        return shard.get_tensor(key)


def open_feature_caches(
    cards: list[DataCard], fingerprint: str | None, use_sample: bool = False
) -> list[FeatureCache | None]:
    """Each card's cache for this encoder when one was written (`feature_folder`), else None."""
    caches: list[FeatureCache | None] = []
    for card in cards:
        folder = None if fingerprint is None or card.path is None else feature_folder(card, fingerprint, use_sample)
        caches.append(
            FeatureCache(folder, fingerprint) if folder is not None and (folder / INDEX_FILE).exists() else None
        )
    return caches


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: runs that share a cache read it at once
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def append_skipped(path: Path, card_name: str, index: int, err: RecordError) -> None:
    """Append one skipped record (card, index in the card, reason, detail) to the JSONL report at `path`."""
    line = {"card": card_name, "index": index, "reason": err.reason, "detail": err.message}
    with path.open("a") as out:
        out.write(json.dumps(line) + "\n")


def cache_features(
    card: DataCard,
    encode: Callable[[torch.Tensor], torch.Tensor],
    transform: Callable[[Any], torch.Tensor],
    folder: Path,
    fingerprint: str,
    *,
    batch_size: int = 32,
    shard_size: int = 1024,
    use_sample: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Encode every image of `card` not yet in the cache at `folder` and write it there (resumable).

    Args:
        encode: (I, 3, S, S) pixels -> (I, K, Dv) tokens (the frozen encoder, on its device).
        transform: PIL image -> (3, S, S) pixels (the model's image transform).

    Returns:
        counts: images `encoded` now, `cached` before, `skipped` (bad record or image, in skipped.jsonl),
        `uncacheable` (in-memory images without a key: training encodes their pixels).
    """
    folder.mkdir(parents=True, exist_ok=True)
    meta_path, index_path = folder / META_FILE, folder / INDEX_FILE
    if meta_path.exists():
        old = json.loads(meta_path.read_text())["fingerprint"]
        if old != fingerprint:
            raise ValueError(f"{folder} holds features of encoder {old}, not {fingerprint}; use another folder")
    index: dict[str, dict[str, Any]] = json.loads(index_path.read_text()) if index_path.exists() else {}
    _write_json(meta_path, {"fingerprint": fingerprint, "card": card.name, "use_sample": use_sample, "complete": False})
    if not index_path.exists():
        _write_json(index_path, index)
    counts = {"encoded": 0, "cached": 0, "skipped": 0, "uncacheable": 0}
    next_shard = 1 + max((int(e["shard"][6:11]) for e in index.values()), default=-1)
    shard: dict[str, torch.Tensor] = {}
    stamps: dict[str, list[int] | None] = {}
    batch: list[tuple[str, torch.Tensor]] = []
    (folder / SKIPPED_FILE).unlink(missing_ok=True)  # this run's report

    def flush_batch() -> None:
        if batch:
            with torch.no_grad():
                tokens = encode(torch.stack([pixels for _, pixels in batch])).float().cpu()
            shard.update({key: t.contiguous() for (key, _), t in zip(batch, tokens, strict=True)})
            counts["encoded"] += len(batch)
            if progress is not None:
                progress(len(batch))
            batch.clear()

    def flush_shard() -> None:
        nonlocal next_shard
        flush_batch()
        if shard:
            name = f"shard-{next_shard:05d}.safetensors"
            tmp = folder / f".{name}.tmp"
            save_file(shard, str(tmp))
            os.replace(tmp, folder / name)
            index.update({key: {"shard": name, "stamp": stamps[key]} for key in shard})
            _write_json(index_path, index)  # after the shard: an index entry always points at a whole file
            next_shard += 1
            shard.clear()

    def report(index_in_card: int, err: RecordError) -> None:
        counts["skipped"] += 1
        append_skipped(folder / SKIPPED_FILE, card.name, index_in_card, err)

    for position, (source, root) in card_images(card, use_sample, report):
        found = image_key(source, root)
        if found is None:  # missing (reported with its reason), or in memory with no key (training encodes it)
            try:
                load_record_image(source, root)
                counts["uncacheable"] += 1
            except RecordError as err:
                report(position, err)
            continue
        key, stamp = found
        if key in stamps or (key in index and index[key]["stamp"] == stamp):
            counts["cached"] += key not in stamps
            continue
        try:
            pixels = transform(load_record_image(source, root))
        except RecordError as err:
            report(position, err)
            continue
        stamps[key] = stamp
        batch.append((key, pixels))
        if len(shard) + len(batch) >= shard_size:
            flush_shard()
        elif len(batch) >= batch_size:
            flush_batch()
    flush_shard()
    _write_json(
        meta_path,
        {
            "fingerprint": fingerprint,
            "card": card.name,
            "use_sample": use_sample,
            "complete": True,
            "images": len(index),
        }
        | {"skipped": counts["skipped"]},
    )
    return counts


def cache_card_features(
    card_path: str | Path,
    model: str | Path,
    out: str | Path | None = None,
    *,
    batch_size: int = 32,
    shard_size: int = 1024,
    use_sample: bool = False,
    device: str | None = None,
) -> tuple[Path, dict[str, int]]:
    """`vpit data cache-features`: the frozen encoder of the VPiT folder `model` (loaded alone, without the LLM)
    over every image of the card at `card_path`, into `out` or the folder training looks in (`feature_folder`).
    Returns the folder and the counts of `cache_features`."""
    from tqdm.auto import tqdm

    from ..model.modeling_vpit import VPiTForCausalLM
    from ..model.processing_vpit import VPiTProcessor

    check_model_folder(model)
    card = DataCard.load(card_path)
    config = VPiTConfig.from_pretrained(model)
    processor = VPiTProcessor.from_pretrained(model)
    fingerprint = encoder_fingerprint(config, processor.preprocess_config)
    folder = Path(out) if out is not None else feature_folder(card, fingerprint, use_sample)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = VPiTForCausalLM.load_vision_encoder(model).to(target).eval()
    with tqdm(desc=f"{card.name}: encoding images", unit="img") as bar:

        def advance(count: int) -> None:
            bar.update(count)

        counts = cache_features(
            card,
            lambda pixels: encoder(pixels.to(target)),
            processor.image_transform,
            folder,
            fingerprint,
            batch_size=batch_size,
            shard_size=shard_size,
            use_sample=use_sample,
            progress=advance,
        )
    return folder, counts


def card_images(
    card: DataCard, use_sample: bool, report: Callable[[int, RecordError], None]
) -> Iterator[tuple[int, tuple[ImageSource, Path | None]]]:
    """(record index, (image source, image root)) of every image of every record; bad records are reported."""
    for index, record in card.records(use_sample):
        try:
            if isinstance(record, RecordError):
                raise record
            sample = card.to_sample(index, record, use_sample=use_sample)
        except RecordError as err:
            report(index, err)
            continue
        for image in sample.images:
            yield index, (image, sample.image_root)


__all__ = [
    "FeatureCache",
    "append_skipped",
    "cache_card_features",
    "cache_features",
    "card_images",
    "encoder_fingerprint",
    "feature_folder",
    "image_key",
    "open_feature_caches",
]
