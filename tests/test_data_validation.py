"""`vpit data validate` on a deliberately broken fixture set: every class of bad input with the right reason."""

import json

import pytest
from broken_data import build
from PIL import Image

from vpit.cli import main
from vpit.data.records import RecordError, load_record_image
from vpit.data.validation import validate
from vpit.model.images import ImageError, load_image


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    return folder, build(folder)


def _reasons(report):
    return {p.index: p.reason for p in report.problems}


def test_every_class_is_reported_with_its_reason(broken):
    folder, expected = broken
    report = validate(folder / "records.jsonl", image_folder=folder / "images")
    # Without a tokenizer the truncation class cannot be judged; every other class is found.
    wanted = {i: r for i, r in expected.items() if r is not None and r != "truncates_image"}
    assert _reasons(report) == wanted
    assert report.num_checked == len(expected)
    by_id = {p.index: p.id for p in report.problems}
    assert by_id[1] == "missing" and by_id[13] == "ok-1"
    assert by_id[12] is None  # a line that is not JSON has no id to give


def test_truncation_through_an_image_span_needs_the_processor(broken, tiny_vpit):
    folder, expected = broken
    _, processor = tiny_vpit
    report = validate(folder / "records.jsonl", image_folder=folder / "images", processor=processor, max_length=64)
    assert _reasons(report) == {i: r for i, r in expected.items() if r is not None}


def test_report_files(broken, tmp_path):
    folder, expected = broken
    report = validate(folder / "records.jsonl", image_folder=folder / "images")
    path = report.write(tmp_path / "report.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == report.num_bad == 13
    assert set(lines[0]) == {"source", "index", "id", "reason", "message"}
    assert lines[0]["source"] == "records.jsonl"
    summary = json.loads(path.with_suffix(".summary.json").read_text())
    assert summary["bad"] == 13
    assert summary["by_reason"]["corrupt_image"] == 2
    assert summary["checked"] == {"records.jsonl": len(expected)}


def test_cli_exit_codes_and_summary(broken, tmp_path, capsys):
    folder, _ = broken
    code = main(
        [
            "data",
            "validate",
            str(folder / "records.jsonl"),
            "--image-folder",
            str(folder / "images"),
            "--report",
            str(tmp_path / "r.jsonl"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "13 bad" in out and "missing_image" in out and "path_escapes_root" in out
    good = tmp_path / "good.jsonl"
    good.write_bytes((folder / "records.jsonl").read_bytes().splitlines()[0] + b"\n")
    assert (
        main(
            [
                "data",
                "validate",
                str(good),
                "--image-folder",
                str(folder / "images"),
                "--report",
                str(tmp_path / "g.jsonl"),
            ]
        )
        == 0
    )


def test_a_json_file_that_is_not_json_is_one_reported_problem(tmp_path):
    bad = tmp_path / "data.json"
    bad.write_text('[{"id": 1,')
    report = validate(bad)
    assert [(p.index, p.reason) for p in report.problems] == [(-1, "bad_json")]


@pytest.mark.parametrize(
    ("name", "pixel", "size"),
    [
        ("gray.png", (90, 90, 90), (24, 24)),
        ("rgba.png", (255, 255, 255), (24, 24)),  # fully transparent: white, not black
        ("palette.png", (40, 170, 60), (24, 24)),
        ("cmyk.jpg", (255, 0, 0), (24, 24)),
        ("sixteen.png", (255, 255, 255), (24, 24)),  # 65535 scaled by bit depth, not clipped to 255 by accident
        ("exif.jpg", None, (20, 10)),  # stored 10x20, displayed rotated: 20x10
    ],
)
def test_awkward_modes_are_converted_not_rejected(broken, name, pixel, size):
    folder, _ = broken
    image = load_image(folder / "images" / name)
    assert image.mode == "RGB" and image.size == size
    if pixel is not None:
        got = image.getpixel((5, 5))
        assert all(abs(a - b) <= 2 for a, b in zip(got, pixel, strict=True)), got


def test_partially_transparent_pixels_blend_onto_white():
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert load_image(half).getpixel((0, 0)) == (127, 127, 127)


def test_sixteen_bit_midtones_scale():
    image = Image.new("I;16", (2, 2), 32896)  # 128 * 257
    assert load_image(image).getpixel((0, 0)) == (128, 128, 128)


def test_image_errors_name_the_reason(tmp_path):
    with pytest.raises(RecordError, match="missing_image"):
        load_record_image("nope.png", tmp_path)
    with pytest.raises(RecordError, match="path_escapes_root"):
        load_record_image("../x.png", tmp_path)
    with pytest.raises(RecordError, match="empty_image"):
        load_record_image(b"")
    with pytest.raises(ImageError, match="missing_image"):  # the model core's own error, same reason
        load_image("nope.png", tmp_path)
