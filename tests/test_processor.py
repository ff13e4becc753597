"""VPiTProcessor: marker expansion, counts, the chat template, images, save/load."""

import pytest
import torch
from PIL import Image

from vpit import VPiTProcessor
from vpit.model.processing_vpit import DEFAULT_CHAT_TEMPLATE


def test_markers_expand_to_k_slots_between_boundaries(tiny_vpit):
    _, processor = tiny_vpit
    text, count = processor.expand_image_markers("<image> and <image><image> done")
    assert count == 3
    assert text.count("<image_start><image><image><image><image><image_end>") == 3
    # An already expanded span is kept as it is, not expanded again.
    again, count = processor.expand_image_markers(text)
    assert (again, count) == (text, 3)
    with pytest.raises(ValueError, match="an image span holds 2 slots, expected K=4"):
        processor.expand_image_markers("<image_start><image><image><image_end>")


def test_call_tokenises_and_transforms(tiny_vpit):
    model, processor = tiny_vpit
    images = [Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("L", (20, 20), 128)]
    batch = processor(["<image> What colour?", "compare <image> please"], images=images)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    ids = batch["input_ids"]
    assert (ids == model.config.image_token_id).sum(dim=1).tolist() == [4, 4]
    assert (ids == model.config.image_start_token_id).sum().item() == 2
    assert batch["attention_mask"].shape == ids.shape
    # The grayscale image is converted to RGB, all three channels equal.
    assert torch.equal(batch["pixel_values"][1, 0], batch["pixel_values"][1, 2])


def test_marker_and_image_count_mismatch(tiny_vpit):
    _, processor = tiny_vpit
    with pytest.raises(ValueError, match=r"holds 2 image marker\(s\) .* per row \[1, 1\] but 1 image\(s\)"):
        processor(["<image> a", "<image> b"], images=[Image.new("RGB", (8, 8))])


def test_truncation_through_a_span_is_an_error(tiny_vpit):
    _, processor = tiny_vpit
    with pytest.raises(ValueError, match="was an image span truncated"):
        processor(["a b c <image>"], images=[Image.new("RGB", (8, 8))], truncation=True, max_length=6)


def test_default_chat_template_marks_assistant_tokens(tiny_vpit):
    _, processor = tiny_vpit
    assert processor.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]
    enc = processor.tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    kept = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert processor.tokenizer.decode(kept) == " red</s>"
    assert processor.apply_chat_template(messages[:1], add_generation_prompt=True).endswith("ASSISTANT:")


def test_save_load_round_trip(tiny_vpit, tmp_path):
    _, processor = tiny_vpit
    processor.save_pretrained(tmp_path)
    loaded = VPiTProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (40, 40), (10, 200, 30))
    a = processor(["<image> Describe the image."], images=[image])
    b = loaded(["<image> Describe the image."], images=[image])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert loaded.tokenizer.chat_template == processor.tokenizer.chat_template
    assert loaded.to_dict() == processor.to_dict()
    with pytest.raises(FileNotFoundError, match=r"has no processor_config\.json"):
        VPiTProcessor.from_pretrained(_empty(tmp_path))


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_tokenizer_without_image_tokens_is_rejected(tiny_llama):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="tokenizer lacks the image tokens"):
        VPiTProcessor(AutoTokenizer.from_pretrained(tiny_llama), {"size": 32}, 4)


def test_chat_template_path_tokenises_once_with_assistant_only_labels(tiny_vpit):
    """One BOS (the template writes it; nothing adds it again), labels on the reply only, and the same encoding as
    the data pipeline gives the same sample."""
    from vpit.data.encode import encode_sample
    from vpit.data.records import Sample

    model, processor = tiny_vpit
    red = Image.new("RGB", (32, 32), (220, 40, 40))
    messages = [
        {"role": "user", "content": "Generate an image of a red square."},
        {"role": "assistant", "content": "Here is an image based on your request: <image>"},
    ]
    batch = processor.apply_chat_template(messages, images=[red], tokenize=True)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert int((ids == processor.tokenizer.bos_token_id).sum()) == 1 and ids[0] == processor.tokenizer.bos_token_id
    kept = processor.tokenizer.decode(labels[labels != -100])
    assert kept == " Here is an image based on your request: <image_start><image_end></s>"
    reference = encode_sample(Sample(messages, images=[red]), processor)
    assert torch.equal(ids, reference["input_ids"]) and torch.equal(labels, reference["labels"])
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])
    out = model(**batch)
    assert out.visual_predictions.shape[0] == 4 and out.visual_loss > 0  # the response image is the target

    prompts = processor.apply_chat_template(
        [[messages[0]], [{"role": "user", "content": "<image> What colour is it?"}]],
        images=[red],
        tokenize=True,
        add_generation_prompt=True,
    )
    assert "labels" not in prompts and prompts["pixel_values"].shape[0] == 1
    assert prompts["attention_mask"][:, -1].all() and not prompts["attention_mask"].all()  # left-padded
    with pytest.raises(ValueError, match=r"hold 1 image marker\(s\) .* but 0 image\(s\)"):
        processor.apply_chat_template(messages, tokenize=True)
