"""The encoder-token cache (`vpit data cache-features`): written once, resumable, keyed by image, checked against the
model's encoder, read by training instead of the pixels with the same loss and gradients."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vpit.cli import main
from vpit.data.cards import DataCard
from vpit.data.features import (
    FeatureCache,
    cache_card_features,
    cache_features,
    encoder_fingerprint,
    feature_folder,
    open_feature_caches,
)
from vpit.model.images import load_image
from vpit.training.components import build_batches
from vpit.training.config import DataSection

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cards(tmp_path):
    """A copy of the shipped cards and samples (a cache is written beside its card)."""
    shutil.copytree(ROOT / "data_cards", tmp_path / "cards")
    return tmp_path / "cards"


@pytest.fixture
def saved_vpit(tiny_vpit, tmp_path):
    model, processor = tiny_vpit
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return tmp_path / "model", model.eval(), processor


def _image_paths(card):
    root = card.image_root(use_sample=True)
    return {
        f"file:{Path(image).name}": root / image
        for _, record in card.records(use_sample=True)
        for image in card.to_sample(0, record, use_sample=True).images
    }


def test_cache_holds_each_image_encoder_tokens_and_resumes(cards, saved_vpit, capsys):
    folder_model, model, processor = saved_vpit
    card = DataCard.load(cards / "toy_generation.yaml")
    fingerprint = encoder_fingerprint(model.config, processor.preprocess_config)
    folder = feature_folder(card, fingerprint, use_sample=True)
    images = _image_paths(card)
    assert len(images) == 6

    # A run killed after the third image: the finished shard (2 images) is kept, the rest is not in the index.
    def killed_after_three(count, seen=[0]):  # noqa: B006 (a counter across calls)
        seen[0] += count
        if seen[0] >= 3:
            raise KeyboardInterrupt

    encode = lambda pixels: model.encode_images(pixels)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        cache_features(
            card, encode, processor.image_transform, folder, fingerprint, batch_size=1, shard_size=2,
            use_sample=True, progress=killed_after_three,
        )  # fmt: skip
    index = json.loads((folder / "index.json").read_text())
    assert len(index) == 2 and not json.loads((folder / "meta.json").read_text())["complete"]
    assert not list(folder.glob(".*.tmp"))

    # The command resumes: only the 4 missing images are encoded.
    assert main(["data", "cache-features", str(cards / "toy_generation.yaml"), "--model", str(folder_model),
                 "--sample", "--shard-size", "2", "--batch-size", "2"]) == 0  # fmt: skip
    assert "4 images encoded, 2 already cached, 0 skipped" in capsys.readouterr().out
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["complete"] and meta["images"] == 6 and meta["fingerprint"] == fingerprint
    index = json.loads((folder / "index.json").read_text())
    assert set(index) == set(images)
    assert len({entry["shard"] for entry in index.values()}) == 3  # 2 + 2 + 2 images
    for key, path in images.items():  # each image's tokens are the encoder's (batched: to float rounding)
        with safe_open(str(folder / index[key]["shard"]), framework="pt") as shard:
            cached = shard.get_tensor(key)
        with torch.no_grad():
            expected = model.encode_images(processor.image_transform(load_image(path))[None])[0]
        assert cached.shape == (4, model.vision_tower.hidden_size)
        torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-6)


def test_bad_images_are_reported_and_changed_files_are_not_read(cards, saved_vpit, tmp_path):
    folder_model, model, processor = saved_vpit
    card_path = cards / "toy_generation.yaml"
    card = DataCard.load(card_path)
    root = card.image_root(use_sample=True)
    images = sorted(root.glob("*.png"))
    images[0].write_bytes(b"not a png")  # corrupt
    images[1].unlink()  # missing
    folder, counts = cache_card_features(card_path, folder_model, use_sample=True)
    assert counts == {"encoded": 4, "cached": 0, "skipped": 2, "uncacheable": 0}
    report = [json.loads(line) for line in (folder / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in report) == ["corrupt_image", "missing_image"]
    assert all(r["card"] == "toy_generation" for r in report)

    cache = FeatureCache(folder, encoder_fingerprint(model.config, processor.preprocess_config))
    assert cache.get(images[2].name, root) is not None
    images[2].write_bytes(images[3].read_bytes() + b"\0")  # changed since: size and mtime differ
    assert cache.get(images[2].name, root) is None  # read from its pixels again, never stale tokens
    with pytest.raises(ValueError, match=r"features of encoder .* but the model's encoder is deadbeef"):
        FeatureCache(folder, "deadbeef")


def test_training_reads_the_cache_with_the_same_loss_and_gradients(cards, saved_vpit, monkeypatch):
    """The same mixture stream (a cached generation card + an uncached understanding card, so batches mix cached
    and encoded images) gives the same batches' losses and gradients with the cache as with the pixels, and the
    cached images are never loaded."""
    folder_model, model, processor = saved_vpit
    cache_card_features(cards / "toy_generation.yaml", folder_model, use_sample=True)
    fingerprint = encoder_fingerprint(model.config, processor.preprocess_config)
    mixture = [{"card": str(cards / "toy_generation.yaml")}, {"card": str(cards / "toy_understanding.yaml")}]
    data = DataSection(mixture=mixture, use_sample=True, batch_size=4, num_workers=0, max_length=128)
    loaders = {
        name: iter(build_batches(data, processor, 0, 1, cards / name, encoder_fingerprint=fp))
        for name, fp in (("pixels", None), ("cached", fingerprint))
    }
    caches = open_feature_caches([DataCard.load(cards / "toy_generation.yaml")], fingerprint, use_sample=True)
    assert caches[0] is not None and len(caches[0]) == 6
    # data.use_features: false reads the pixels although the cache is there.
    off = dataclasses.replace(data, use_features=False)
    unused = iter(build_batches(off, processor, 0, 1, cards / "off", encoder_fingerprint=fingerprint))
    assert not any("visual_tokens" in next(unused) for _ in range(4))
    import vpit.data.encode as encode

    loaded = []
    original = encode.load_record_image
    monkeypatch.setattr(encode, "load_record_image", lambda image, root: loaded.append(image) or original(image, root))
    model.train()
    mixed = 0
    for _ in range(4):
        batches = {"pixels": next(loaders["pixels"])}
        loaded.clear()
        batches["cached"] = next(loaders["cached"])
        assert not [image for image in loaded if "gen_" in str(image)]  # cached images are not even opened
        assert "visual_tokens" not in batches["pixels"]
        cached = batches["cached"]
        if "visual_tokens" in cached:
            given = cached["visual_tokens_given"]
            total = batches["pixels"]["pixel_values"].shape[0]
            assert (
                given.shape == (total,) and cached.get("pixel_values", torch.zeros(0)).shape[0] == total - given.sum()
            )
            mixed += bool(given.any() and not given.all())
        results = {}
        for name, batch in batches.items():
            model.zero_grad()
            inputs = {k: batch[k] for k in batch if k in {"input_ids", "labels", "visual_target_mask", "attention_mask",
                                                          "position_ids", "pixel_values", "visual_tokens",
                                                          "visual_tokens_given"}}  # fmt: skip
            out = model(**inputs, return_logits=False)
            out.loss.backward()
            results[name] = (
                out.loss.detach(),
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            )
        torch.testing.assert_close(results["cached"][0], results["pixels"][0], rtol=1e-6, atol=1e-6)
        for name, grad in results["pixels"][1].items():
            torch.testing.assert_close(results["cached"][1][name], grad, rtol=1e-5, atol=1e-6)
    assert mixed >= 1  # some batch held cached and encoded images together


def test_cache_of_another_encoder_is_not_read(cards, saved_vpit, tiny_llama, tiny_clip):
    """A model with another K has another fingerprint: training finds no cache for it and encodes the pixels."""
    from vpit.model.assembly import assemble

    folder_model, model, processor = saved_vpit
    cache_card_features(cards / "toy_generation.yaml", folder_model, use_sample=True)
    other, other_processor = assemble(tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=9)
    theirs = encoder_fingerprint(other.config, other_processor.preprocess_config)
    assert theirs != encoder_fingerprint(model.config, processor.preprocess_config)
    assert open_feature_caches([DataCard.load(cards / "toy_generation.yaml")], theirs, use_sample=True) == [None]
