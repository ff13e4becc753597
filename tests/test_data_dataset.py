"""The training stream: mixture of cards, encoded samples, skipped records counted and written, the skip limit."""

import itertools
import json

import pytest
import torch
import yaml
from broken_data import build
from PIL import Image
from torch.utils.data import DataLoader

from vpit.data.cards import DataCard
from vpit.data.collator import VPiTCollator, model_inputs
from vpit.data.dataset import SkipLog, SkipRateExceeded, VPiTDataset


def _card(folder, name, fmt, task, data_file, image_folder, **extra):
    card = {
        "name": name,
        "description": "test data",
        "task": task,
        "format": fmt,
        "license": "Apache-2.0",
        "citation": "none",
        "source": {"data_files": [str(data_file)], "image_folder": str(image_folder)},
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card))
    return DataCard.load(path)


@pytest.fixture(scope="module")
def cards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cards")
    images = folder / "gen_images"
    images.mkdir()
    rows = []
    for i, colour in enumerate([(220, 40, 40), (40, 80, 220), (40, 170, 60), (230, 200, 40)]):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
        rows.append({"id": f"g{i}", "caption": f"a colour {i} square", "image": f"{i}.png"})
    (folder / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    generation = _card(folder, "gen", "caption", "generation", folder / "gen.jsonl", images)
    broken_folder = folder / "broken"
    expected = build(broken_folder)
    understanding = _card(
        folder, "broken", "llava", "understanding", broken_folder / "records.jsonl", broken_folder / "images"
    )
    return generation, understanding, expected


def test_bad_records_are_skipped_counted_and_written(cards, tiny_vpit, tmp_path):
    _, understanding, expected = cards
    # Duplicate ids are a validation finding (`vpit data validate`); the stream itself does not track ids.
    expected = {i: (None if r == "duplicate_id" else r) for i, r in expected.items()}
    _, processor = tiny_vpit
    log = SkipLog(tmp_path / "skipped.jsonl", max_skip_rate=1.0)
    dataset = VPiTDataset([understanding], processor, skip_log=log, max_length=64, seed=0)
    n_records = len(expected)
    stream, samples = iter(dataset), []
    while dataset.sampler.position < n_records:  # exactly past the first epoch of the source
        samples.append(next(stream))
    epoch = [s for s in samples if s["position"] < n_records]
    skipped = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert log.skipped == len(skipped)
    first_epoch = [e for e in skipped if e["position"] < n_records]
    for entry in skipped:
        assert entry["source"] == "broken"
        assert entry["reason"] == expected[entry["index"]], entry
    # In one epoch every record is used or reported, exactly once, and the counts add up.
    assert sorted(s["index"] for s in epoch) == sorted(i for i, r in expected.items() if r is None)
    assert sorted(e["index"] for e in first_epoch) == sorted(i for i, r in expected.items() if r is not None)
    assert sum(s["num_skipped"] for s in epoch) == len(first_epoch) - _trailing_bad(first_epoch, epoch)


def _trailing_bad(skipped, used):
    """Bad records after the last used one are counted into the next sample, outside this epoch."""
    last = max(s["position"] for s in used)
    return sum(e["position"] > last for e in skipped)


def test_skip_rate_limit_stops_the_run(cards, tiny_vpit, tmp_path):
    _, understanding, _ = cards
    _, processor = tiny_vpit
    log = SkipLog(tmp_path / "skipped.jsonl", max_skip_rate=0.05, min_records=10)
    dataset = VPiTDataset([understanding], processor, skip_log=log, max_length=64)
    with pytest.raises(SkipRateExceeded, match=r"records skipped .* > max_skip_rate 5\.0%"):
        list(itertools.islice(iter(dataset), 100))


def test_mixture_stream_batches_into_the_model(cards, tiny_vpit):
    generation, understanding, _ = cards
    model, processor = tiny_vpit
    dataset = VPiTDataset(
        [generation, understanding],
        processor,
        weights=[1.0, 1.0],
        max_length=64,
        skip_log=SkipLog(None, max_skip_rate=1.0),
    )
    loader = DataLoader(dataset, batch_size=4, collate_fn=VPiTCollator(processor.tokenizer.pad_token_id))
    batch = next(iter(loader))
    assert batch["num_samples"] == 4
    out = model(**model_inputs(batch))
    assert torch.isfinite(out.loss)


def test_stream_does_not_depend_on_the_number_of_workers(cards, tiny_vpit):
    generation, _, _ = cards
    _, processor = tiny_vpit

    def positions(workers):
        dataset = VPiTDataset([generation], processor, seed=3)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers)
        return [(s["position"], s["id"]) for s in itertools.islice(iter(loader), 12)]

    single = positions(0)
    assert [p for p, _ in single] == list(range(12))
    assert sorted(positions(2)) == single


def test_resume_from_the_sampler_state(cards, tiny_vpit):
    generation, _, _ = cards
    _, processor = tiny_vpit
    first = VPiTDataset([generation], processor, seed=5)
    stream = iter(first)
    [next(stream) for _ in range(6)]
    state = first.state_dict()
    resumed = VPiTDataset([generation], processor, seed=5)
    resumed.load_state_dict(state)
    expected = [next(stream)["id"] for _ in range(6)]
    assert [s["id"] for s in itertools.islice(iter(resumed), 6)] == expected
