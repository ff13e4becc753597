"""Data cards: every shipped card loads and its sample data validates clean; malformed cards are refused."""

import json
from pathlib import Path

import pytest
import yaml

from vpit.cli import main
from vpit.data.cards import DataCard, MixtureEntry, parse_mixture
from vpit.data.validation import validate

CARDS = sorted((Path(__file__).resolve().parents[1] / "data_cards").glob("*.yaml"))


def test_the_expected_cards_ship():
    names = {p.stem for p in CARDS}
    assert {
        "llava_v1_5_mix665k",
        "sharegpt4v",
        "cc3m_generation",
        "instructpix2pix",
        "ssv2_frames",
        "toy_understanding",
        "toy_generation",
        "toy_editing",
    } <= names
    tasks = {DataCard.load(p).task for p in CARDS}
    assert tasks == {"understanding", "generation", "other_visual"}


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.stem)
def test_card_sample_data_is_clean(path, tiny_vpit):
    card = DataCard.load(path)
    assert card.license and card.citation and card.description
    report = validate(path, use_sample=True)
    assert report.num_checked >= 5
    assert report.problems == []
    # With the tokenizer too: every sample tokenises with an exact response mask.
    _, processor = tiny_vpit
    assert validate(path, use_sample=True, processor=processor, max_length=2048).problems == []


def test_cli_validates_a_card_sample(tmp_path):
    card = next(p for p in CARDS if p.stem == "toy_generation")
    assert main(["data", "validate", str(card), "--sample", "--report", str(tmp_path / "r.jsonl")]) == 0


def _write_card(tmp_path, **changes):
    card = {
        "name": "x",
        "description": "d",
        "task": "generation",
        "format": "caption",
        "license": "MIT",
        "citation": "c",
        "source": {"data_files": ["x.jsonl"]},
    }
    card.update(changes)
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "red"}, r"unknown keys \['colour'\]"),
        ({"task": "captioning"}, r"task must be one of \['understanding', 'generation', 'other_visual'\]"),
        ({"format": "webdataset"}, r"format must be one of"),
        ({"source": {"data_files": ["x.parquet"]}}, r"must be \.json or \.jsonl"),
        ({"source": {"split": "train"}}, "give data_files .* or hub_id"),
        ({"fields": {"imgae": "jpg"}}, r"fields \['imgae'\] are not fields of the 'caption' format"),
        ({"response_template": []}, "a string or a non-empty list of strings"),
        ({"response_template": ["<image>", "no image here"]}, "'no image here' must hold <image> exactly once"),
    ],
)
def test_malformed_cards_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        DataCard.load(_write_card(tmp_path, **changes))


def test_missing_required_key(tmp_path):
    path = _write_card(tmp_path)
    data = yaml.safe_load(path.read_text())
    del data["license"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"missing required keys \['license'\]"):
        DataCard.load(path)


def test_mixture_parsing_and_overrides(tmp_path):
    with pytest.raises(ValueError, match="must list at least one card"):
        parse_mixture([])
    with pytest.raises(ValueError, match=r"weight must be >= 0, got -1"):
        parse_mixture([{"card": "a.yaml", "weight": -1}])
    with pytest.raises(ValueError, match=r"cap must be >= 1 or null, got 0"):
        parse_mixture([{"card": "a.yaml", "cap": 0}])
    with pytest.raises(ValueError, match=r"unknown keys \['wieght'\]"):
        parse_mixture([{"card": "a.yaml", "wieght": 1}])
    # Local files given in a mixture replace the card's Hub source (regression: the Hub was read anyway).
    path = _write_card(tmp_path, source={"hub_id": "org/data", "streaming": True})
    (tmp_path / "local.jsonl").write_text(json.dumps({"caption": "a red circle", "image": "a.png"}) + "\n")
    card = MixtureEntry(card=str(path), data_files=[str(tmp_path / "local.jsonl")]).load()
    assert card.source.hub_id is None
    assert [i for i, _ in card.records()] == [0]


def test_reports_use_the_card_id_field_and_missing_files(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"__key__": "k-7", "txt": "a cat", "jpg": "nope.jpg"}) + "\n")
    path = _write_card(tmp_path, fields={"id": "__key__", "caption": "txt", "image": "jpg"})
    problems = validate(path).problems
    assert [(p.id, p.reason) for p in problems] == [("k-7", "missing_image")]
    missing = _write_card(tmp_path, source={"data_files": ["absent.jsonl"]})
    assert [(p.index, p.reason) for p in validate(missing).problems] == [(-1, "unreadable_file")]


def test_without_image_folder_image_paths_stay_inside_the_card_folder(tmp_path):
    """No image_folder: paths are relative to the card's folder and may not leave it (absolute or ../)."""
    import json

    from PIL import Image

    from vpit.data.records import RecordError, load_record_image

    (tmp_path / "cards").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "cards" / "inside.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    records = [
        {
            "id": str(i),
            "image": path,
            "conversations": [{"from": "human", "value": "<image> ?"}, {"from": "gpt", "value": "a"}],
        }
        for i, path in enumerate(["inside.png", "../outside.png", str(tmp_path / "outside.png")])
    ]
    (tmp_path / "cards" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "cards" / "card.yaml").write_text(
        "name: c\ndescription: d\ntask: understanding\nformat: llava\nlicense: x\ncitation: y\n"
        "source: {data_files: [data.jsonl]}\n"
    )
    card = DataCard.load(tmp_path / "cards" / "card.yaml")
    assert card.image_root() == (tmp_path / "cards").resolve()
    samples = [card.to_sample(i, r) for i, r in card.records()]
    assert load_record_image(samples[0].images[0], samples[0].image_root).getpixel((0, 0)) == (1, 2, 3)
    for sample in samples[1:]:
        with pytest.raises(RecordError, match="path_escapes_root"):
            load_record_image(sample.images[0], sample.image_root)


def test_a_list_of_response_templates_is_drawn_per_record(tmp_path):
    """A card may answer its records with several response templates (e.g. some with the image first, which an
    answer forced to start with <image_start> then matches); the draw is seeded per record, after the prompt's."""
    responses = ["Here is an image based on your request: <image>", "<image>"]
    card = DataCard.load(_write_card(tmp_path, response_template=responses, templates=["{caption}", "Draw {caption}."]))
    record = {"image": "x.png", "caption": "a red circle"}
    answers = [card.to_sample(i, record).messages[1]["content"] for i in range(64)]
    assert set(answers) == set(responses) and 16 <= answers.count("<image>") <= 48
    assert [card.to_sample(i, record).messages[1]["content"] for i in range(64)] == answers
    assert {card.to_sample(i, record).messages[0]["content"] for i in range(64)} == {
        "a red circle",
        "Draw a red circle.",
    }
    single = DataCard.load(_write_card(tmp_path, response_template="Done: <image>"))
    assert single.to_sample(0, record).messages[1]["content"] == "Done: <image>"
