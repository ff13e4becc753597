"""Readers and format conversion: LLaVA / ShareGPT, messages, captions as generation data, edits, frames."""

import io
import json

import pytest
from PIL import Image, ImageFile

from vpit.data.formats import (
    GENERATION_RESPONSE,
    GENERATION_TEMPLATES,
    check_sample,
    detect_format,
    read_hf_dataset,
    read_json_file,
    record_to_sample,
)
from vpit.data.records import RecordError
from vpit.model.images import ImageError, load_image

LLAVA = {
    "id": "000000033471",
    "image": "coco/train2017/000000033471.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."},
    ],
}


def test_llava_record():
    sample = record_to_sample(LLAVA, "llava", index=7, source="llava665k")
    assert [m["role"] for m in sample.messages] == ["user", "assistant", "user", "assistant"]
    assert sample.messages[0]["content"].startswith("<image>\n")
    assert sample.images == ["coco/train2017/000000033471.jpg"]
    assert (sample.id, sample.index, sample.source, sample.task) == ("000000033471", 7, "llava665k", "understanding")
    check_sample(sample)


def test_sharegpt_aliases_system_turn_and_image_lists():
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "user", "value": "<image><image> Same shape?"},
            {"from": "assistant", "value": "Yes."},
        ],
        "images": ["a.png", "b.png"],
    }
    sample = record_to_sample(record, "llava")
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant"]
    assert sample.images == ["a.png", "b.png"]
    check_sample(sample)


def test_messages_with_content_parts():
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A circle: "}, {"type": "image"}]},
        ],
        "images": ["q.png", "a.png"],
    }
    sample = record_to_sample(record, "messages")
    assert sample.messages[0]["content"] == "<image> What is it?"
    assert sample.messages[1]["content"] == "A circle: <image>"
    check_sample(sample)
    with pytest.raises(RecordError, match="bad_record: message 0 has a part of type 'video'"):
        record_to_sample({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages")


def test_caption_becomes_generation_data_with_a_seeded_template():
    record = {"txt": "A dog running on the beach.", "jpg": "dog.jpg"}
    fields = {"caption": "txt", "image": "jpg"}
    sample = record_to_sample(record, "caption", index=3, fields=fields)
    prompt = sample.messages[0]["content"]
    assert any(prompt == t.format(caption="a dog running on the beach") for t in GENERATION_TEMPLATES)
    assert sample.messages[1] == {"role": "assistant", "content": GENERATION_RESPONSE}
    assert sample.images == ["dog.jpg"] and sample.task == "generation"
    again = record_to_sample(record, "caption", index=3, fields=fields)
    assert again.messages == sample.messages  # same seed and index, same template
    picked = {record_to_sample(record, "caption", index=i, fields=fields).messages[0]["content"] for i in range(60)}
    assert len(picked) == len(GENERATION_TEMPLATES)  # every template gets used
    fixed = record_to_sample(record, "caption", fields=fields, templates=["Draw {caption}."])
    assert fixed.messages[0]["content"] == "Draw a dog running on the beach."
    nasa = record_to_sample({"caption": "NASA rocket.", "image": "r.png"}, "caption", templates=["Draw {caption}."])
    assert nasa.messages[0]["content"] == "Draw NASA rocket."


def test_edit_and_frames():
    edit = record_to_sample({"input_image": "in.png", "instruction": "Make it red.", "output_image": "out.png"}, "edit")
    assert [m["content"] for m in edit.messages] == ["<image> Make it red.", "<image>"]
    assert edit.images == ["in.png", "out.png"] and edit.task == "other_visual"
    check_sample(edit)
    frames = record_to_sample({"frames": ["f0.png", "f1.png", "f2.png"]}, "frames")
    assert frames.messages[0]["content"].startswith("<image><image> ")
    assert frames.messages[1]["content"] == "<image>"
    check_sample(frames)
    with pytest.raises(RecordError, match="at least 2 frames"):
        record_to_sample({"frames": ["f0.png"]}, "frames")


def test_missing_fields_and_detection():
    with pytest.raises(RecordError, match="bad_record: missing field 'txt'"):
        record_to_sample({"jpg": "x"}, "caption", fields={"caption": "txt", "image": "jpg"})
    assert detect_format(LLAVA) == "llava"
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"caption": "x", "image": "y"}) == "caption"
    assert detect_format({"frames": []}) == "frames"
    with pytest.raises(RecordError, match="cannot tell the format"):
        detect_format({"text": "x"})


def test_json_and_jsonl_reading(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([LLAVA, [1, 2]]))
    rows = list(read_json_file(tmp_path / "a.json"))
    assert rows[0] == (0, LLAVA)
    assert isinstance(rows[1][1], RecordError) and rows[1][1].reason == "bad_json"
    (tmp_path / "b.json").write_text('{"not": "a list"}')
    with pytest.raises(RecordError, match="expected a list of records"):
        list(read_json_file(tmp_path / "b.json"))
    (tmp_path / "c.jsonl").write_bytes(b'{"a": 1}\n\n{"b": "\xff"}\nnot json\n')
    rows = list(read_json_file(tmp_path / "c.jsonl"))
    assert [i for i, _ in rows] == [0, 2, 3]  # blank lines are not records; indices are line numbers
    assert rows[0][1] == {"a": 1}
    assert rows[1][1].reason == "invalid_utf8" and rows[2][1].reason == "bad_json"


def test_datasets_folder_with_image_feature_and_streaming(tmp_path):
    import datasets

    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    table = datasets.Dataset.from_dict(
        {"caption": ["one", "two", "three"], "image": images},
        features=datasets.Features({"caption": datasets.Value("string"), "image": datasets.Image()}),
    )
    table.save_to_disk(str(tmp_path / "ds"))
    for streaming in (False, True):
        rows = list(read_hf_dataset(tmp_path / "ds", streaming=streaming))
        assert [i for i, _ in rows] == [0, 1, 2]
        sample = record_to_sample(rows[2][1], "caption", index=2)
        assert load_image(sample.images[0]).getpixel((0, 0)) == (80, 0, 0)


def test_a_truncated_image_is_refused_even_when_a_library_allows_them(tmp_path, monkeypatch):
    """lmms-eval sets PIL's process-wide ImageFile.LOAD_TRUNCATED_IMAGES on import; PIL then pads a truncated file
    with grey. vpit's loader refuses it anyway, and leaves the flag as it found it."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:300])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(tmp_path / "truncated.png") as padded:
        padded.load()  # what any other loader in this process now accepts
    with pytest.raises(ImageError, match="truncated"):
        load_image(tmp_path / "truncated.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
