"""`vpit eval generation` (vpit.evaluation) on the tiny VPiT (K = 4, Dv = 48) and the toy decoder (32x32 images):
GenEval's and DPG-Bench's folder layouts byte for byte, seeds, the report of answers without an image, prompt
files refused with their line and reason, and the CLIP score and Fréchet distance against independent computations
(open_clip features, numpy / scipy closed form) with a tiny open_clip that can read text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import scipy.linalg
import torch
from conftest import save_tiny_pipeline
from PIL import Image

from vpit.cli import main
from vpit.errors import UsageError
from vpit.evaluation.generation import GenerationSettings, evaluate_generation, summary
from vpit.evaluation.prompts import read_prompts
from vpit.evaluation.scores import clip_score, frechet_distance, image_files, load_open_clip
from vpit.inference.pipeline import VPiTPipeline
from vpit.toy.tiny import TINY_OPEN_CLIP_CFG, save_tiny_open_clip

K, DV, SIZE = 4, 48, 32  # visual tokens, their width, the toy decoder's image side
STEPS = 2
GENEVAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "red"}], "prompt": "a photo of a red cow"}',
    '{"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"}',
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tiny_llama, tiny_clip, tmp_path_factory) -> dict[str, Path]:
    """A saved tiny VPiT and toy decoder (as tests/test_pipeline.py builds them), a CLIP that reads text, prompts
    and reference images."""
    root = tmp_path_factory.mktemp("eval-generation")
    save_tiny_pipeline(root, tiny_llama, tiny_clip, K, DV)
    # The tiny ViT of conftest has a 64-token text vocabulary; open_clip's tokenizer needs its 49408.
    text_cfg = {**TINY_OPEN_CLIP_CFG["text_cfg"], "vocab_size": 49408}
    save_tiny_open_clip(root / "clip", {**TINY_OPEN_CLIP_CFG, "text_cfg": text_cfg}, seed=1)
    (root / "geneval.jsonl").write_text("\n".join(GENEVAL_LINES) + "\n")
    (root / "dpg").mkdir()
    (root / "dpg" / "alpha.txt").write_text("A red cube sits on a wooden table beside a blue vase.\n")
    (root / "dpg" / "beta7.txt").write_text("Two cats sleep under a window.")
    rng = np.random.default_rng(0)
    (root / "reference" / "nested").mkdir(parents=True)
    for i in range(5):
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "reference" / ("nested" if i % 2 else "") / f"ref{i}.png")
    return {**{name: root / name for name in ("model", "decoder", "clip", "dpg", "reference")}, "root": root}


def _settings(**overrides) -> GenerationSettings:
    return GenerationSettings(**{"samples_per_prompt": 2, "batch_size": 2, "num_inference_steps": STEPS, **overrides})


def _run(folders, out, prompts=None, **kwargs):
    kwargs.setdefault("settings", _settings())
    prompts = prompts or folders["root"] / "geneval.jsonl"
    return evaluate_generation(
        folders["model"], folders["decoder"], prompts, out, device="cpu", progress=False, **kwargs
    )


@pytest.fixture(scope="module")
def geneval(folders, tmp_path_factory):
    """Two identical runs on the GenEval prompts, scored with the text CLIP against the reference folder."""
    outs = [tmp_path_factory.mktemp("geneval") for _ in range(2)]
    clip = str(folders["clip"])
    reports = [_run(folders, out, clip=clip, reference=folders["reference"]) for out in outs]
    return outs, reports


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------- layouts


def test_geneval_layout_is_exactly_the_scorers(geneval):
    (out, _), (report, _) = geneval
    images = out / "images"
    assert sorted(p.name for p in images.iterdir()) == ["00000", "00001", "00002"]
    for index, line in enumerate(GENEVAL_LINES):
        folder = images / f"{index:05d}"
        assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "metadata.jsonl", "samples"]
        assert (folder / "metadata.jsonl").read_text() == line + "\n"  # the input line, verbatim
        assert json.loads((folder / "metadata.jsonl").read_text()) == json.loads(line)  # GenEval's json.load
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        samples = [Image.open(folder / "samples" / f"{j:04d}.png") for j in range(2)]
        assert all(s.size == (SIZE, SIZE) and s.mode == "RGB" for s in samples)
        grid = Image.open(folder / "grid.png")
        assert grid.size == (2 * SIZE, SIZE)
        assert np.array_equal(np.asarray(grid)[:, SIZE:], np.asarray(samples[1]))
    assert report["n_prompts"] == 3 and report["n_images"] == 6 and report["no_image"] == 0 and not report["skipped"]
    assert report["format"] == "geneval" and report["image_size"] == SIZE
    assert "evaluation/evaluate_images.py" in report["scorer"] and str(images) in report["scorer"]
    assert json.loads((out / "eval_generation.json").read_text()) == report


def test_seeds_make_reruns_identical_and_samples_different(geneval):
    (first, second), (report, again) = geneval
    assert _files(first / "images") == _files(second / "images")
    assert report["clip_score"]["value"] == again["clip_score"]["value"]
    assert report["fid"]["value"] == again["fid"]["value"]
    for index in range(3):
        samples = first / "images" / f"{index:05d}" / "samples"
        assert (samples / "0000.png").read_bytes() != (samples / "0001.png").read_bytes()  # seed + 0 vs seed + 1


def test_dpg_layout_is_one_2x2_grid_per_item(folders, tmp_path):
    settings = _settings(samples_per_prompt=4, batch_size=1)
    report = _run(folders, tmp_path, prompts=folders["dpg"], settings=settings, clip=str(folders["clip"]))
    images = tmp_path / "images"
    assert sorted(p.name for p in images.iterdir()) == ["alpha.png", "beta7.png"]
    assert report["format"] == "dpg" and report["n_images"] == 8
    assert f"--resolution {SIZE}" in report["scorer"]
    # Tile j (row-major) is the pipeline's own answer to the prompt, as written, with seed 0 + j.
    pipe = VPiTPipeline.from_pretrained(folders["model"], decoder=folders["decoder"], device="cpu")
    pipe.decoder.set_progress_bar_config(disable=True)
    texts = {
        "alpha": "A red cube sits on a wooden table beside a blue vase.",
        "beta7": "Two cats sleep under a window.",
    }
    scored = []
    for key, text in texts.items():
        grid = np.asarray(Image.open(images / f"{key}.png"))
        assert grid.shape == (2 * SIZE, 2 * SIZE, 3)
        tiles = [grid[r * SIZE : (r + 1) * SIZE, c * SIZE : (c + 1) * SIZE] for r in range(2) for c in range(2)]
        for j, tile in enumerate(tiles):
            out = pipe(text, start_with_image=True, max_new_tokens=K + 1, num_inference_steps=STEPS, seed=j)
            assert np.array_equal(tile, np.asarray(out.images[0]))
        assert not np.array_equal(tiles[0], tiles[1])
        scored += [(Image.fromarray(tile), text) for tile in tiles]
    # The CLIP score reads the samples back from the grids' tiles.
    expected, _ = _independent_clip_score(folders["clip"], [i for i, _ in scored], [t for _, t in scored])
    assert report["clip_score"]["n"] == 8 and report["clip_score"]["value"] == pytest.approx(expected, abs=1e-4)


def test_dpg_needs_four_samples(folders, tmp_path):
    with pytest.raises(UsageError, match="2x2 grid of 4 samples"):
        _run(folders, tmp_path, prompts=folders["dpg"], settings=_settings(samples_per_prompt=3))


def test_answers_without_an_image_are_reported_not_dropped(folders, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    # Free answers of 4 tokens cannot hold an image (<image_start>, K = 4 slots, <image_end>).
    settings = _settings(start_with_image=False, max_new_tokens=4)
    clip, reference = str(folders["clip"]), folders["reference"]
    report = _run(folders, tmp_path / "out", prompts=prompts, settings=settings, clip=clip, reference=reference)
    assert report["no_image"] == 4 and report["n_images"] == 0
    assert report["clip_score"] is None and report["fid"] is None and len(report["skipped"]) == 2
    assert "4 sample(s) got an answer without an image" in summary(report)
    missing = report["no_image_samples"]
    assert [(m["key"], m["prompt"], m["sample"], m["seed"]) for m in missing] == [
        ("00000", "a red circle", 0, 0),
        ("00000", "a red circle", 1, 1),
        ("00001", "a blue square", 0, 0),
        ("00001", "a blue square", 1, 1),
    ]
    assert all(isinstance(m["answer"], str) for m in missing)
    folder = tmp_path / "out" / "images" / "00001"
    assert json.loads((folder / "metadata.jsonl").read_text()) == {"prompt": "a blue square"}
    placeholder = np.asarray(Image.open(folder / "samples" / "0000.png"))
    assert placeholder.shape == (SIZE, SIZE, 3) and not placeholder.any()  # black: the scorer counts a failure


def test_an_earlier_runs_images_are_not_mixed_in(folders, tmp_path):
    (tmp_path / "images" / "00000").mkdir(parents=True)
    with pytest.raises(UsageError, match="earlier run"):
        _run(folders, tmp_path)


# ------------------------------------------------------------------------------------------------ prompt files


@pytest.mark.parametrize(
    ("name", "text", "fmt", "message"),
    [
        ("p.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog"\n', None, r"p\.jsonl:2: not a JSON object"),
        ("p.jsonl", '{"prompt": "a cat"}\n["a dog"]\n', None, r"p\.jsonl:2: a JSON list, not an object"),
        ("p.jsonl", '{"prompt": "a cat"}\n{"tag": "x"}\n', None, r"p\.jsonl:2: no 'prompt' string"),
        ("p.jsonl", '{"prompt": "a cat"}\n\n{"prompt": "a dog"}\n', None, r"p\.jsonl:2: empty line"),
        ("p.txt", "a cat\n  \na dog\n", None, r"p\.txt:2: empty line"),
        ("p.txt", "a cat\n", "geneval", r"p\.txt:1: not a JSON object"),
        ("p.csv", "id,text\n1,a cat\n", None, r"p\.csv:1: no column item_id"),
        ("p.csv", "item_id,text\nx1,a cat\nx1,a dog\n", None, r"p\.csv:3: item 'x1' has another text than at .*:2"),
        ("p.csv", "item_id,text\n../up,a cat\n", None, r"p\.csv:2: item_id '\.\./up' cannot name an image"),
        ("p.yaml", "a cat\n", None, r"cannot tell the prompt format"),
    ],
)
def test_bad_prompt_files_are_refused_with_line_and_reason(tmp_path, name, text, fmt, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(UsageError, match=message):
        read_prompts(tmp_path / name, fmt)


def test_prompt_formats_are_read_as_shipped(folders, tmp_path):
    geneval = read_prompts(folders["root"] / "geneval.jsonl")
    first = geneval.prompts[0]
    assert (first.key, first.text, first.metadata) == ("00000", "a photo of a bench", GENEVAL_LINES[0])
    assert [p.key for p in geneval.prompts] == ["00000", "00001", "00002"]
    dpg = read_prompts(folders["dpg"])
    assert dpg.format == "dpg" and [(p.key, p.text) for p in dpg.prompts] == [
        ("alpha", "A red cube sits on a wooden table beside a blue vase."),
        ("beta7", "Two cats sleep under a window."),
    ]
    csv_file = tmp_path / "dpg_bench.csv"
    csv_file.write_text('item_id,text,keywords\nx1,"a cat, sitting",k\nx1,"a cat, sitting",k2\nx2,a dog,k\n')
    assert [(p.key, p.text) for p in read_prompts(csv_file).prompts] == [("x1", "a cat, sitting"), ("x2", "a dog")]
    plain = tmp_path / "prompts.txt"
    plain.write_text("a cat\n  a dog  \n\n")
    assert [(p.key, p.text) for p in read_prompts(plain).prompts] == [("00000", "a cat"), ("00001", "a dog")]
    assert read_prompts(plain, "plain").format == "plain"


# ---------------------------------------------------------------------------------------------------- scores


def _independent_features(clip_dir: Path, images, texts=None):
    """open_clip's own embeddings, computed without vpit: (N, E) image features and, given texts, text features."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    model.eval()
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(i.convert("RGB")) for i in images])).double()
        if texts is None:
            return image_features.numpy()
        text_features = model.encode_text(open_clip.get_tokenizer(f"local-dir:{clip_dir}")(texts)).double()
    return image_features, text_features


def _independent_clip_score(clip_dir, images, texts) -> tuple[float, torch.Tensor]:
    """100 * cos per pair, averaged, floored at 0 (and the (N, M) matrix of 100 * cos of every image and text)."""
    image_features, text_features = _independent_features(clip_dir, images, texts)
    cos = torch.nn.functional.normalize(image_features, dim=-1) @ torch.nn.functional.normalize(text_features, dim=-1).T
    return max(float(100 * cos.diagonal().mean()), 0.0), 100 * cos


def test_clip_score_of_the_report_equals_an_independent_computation(folders, geneval):
    (out, _), (report, _) = geneval
    images, texts = [], []
    for index, line in enumerate(GENEVAL_LINES):
        for j in range(2):
            images.append(Image.open(out / "images" / f"{index:05d}" / "samples" / f"{j:04d}.png"))
            texts.append(json.loads(line)["prompt"])
    expected, _ = _independent_clip_score(folders["clip"], images, texts)
    assert report["clip_score"]["n"] == 6 and report["clip_score"]["model"] == str(folders["clip"])
    assert expected > 0  # not the floor: the figure is the mean cosine itself
    assert report["clip_score"]["value"] == pytest.approx(expected, abs=1e-4)


def test_clip_score_is_the_mean_cosine_floored_at_zero(folders):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(6)]
    candidates = ["a red cube", "two cats", "a photo of a bench", "a blue sky", "green grass", "a yellow car"]
    _, cos = _independent_clip_score(folders["clip"], images, candidates)
    best = [candidates[i] for i in cos.argmax(1).tolist()]  # each image with the text nearest to it
    worst = [candidates[i] for i in cos.argmin(1).tolist()]
    clip = load_open_clip(str(folders["clip"]), device="cpu")
    assert cos.max(1).values.mean() > 0 > cos.min(1).values.mean()  # the floor matters for one and not the other
    assert clip_score(clip, images, best, batch_size=4) == pytest.approx(float(cos.max(1).values.mean()), abs=1e-4)
    assert clip_score(clip, images, worst) == 0.0


def test_frechet_distance_equals_the_closed_form(folders, tmp_path):
    """n = 48 images per set > E = 32 features: both covariances are full rank, so sqrtm is well defined."""
    rng = np.random.default_rng(2)
    noise = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(48)]
    flat = [Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(48)]
    for i, image in enumerate(flat):
        image.save(tmp_path / f"{i}.png")
    clip = load_open_clip(f"local-dir:{folders['clip']}", device="cpu")
    value = frechet_distance(clip, noise, image_files(tmp_path))
    a, b = _independent_features(folders["clip"], noise), _independent_features(folders["clip"], flat)
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    closed_form = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert closed_form > 1.0
    assert value == pytest.approx(closed_form, rel=1e-3)
    assert abs(frechet_distance(clip, noise, noise)) < 1e-3 * np.trace(np.cov(a, rowvar=False))
    with pytest.raises(UsageError, match="at least 2 reference images"):
        frechet_distance(clip, noise, noise[:1])


def test_the_reports_distance_counts_both_sets(geneval, folders):
    (_, _), (report, _) = geneval
    assert report["fid"]["n_generated"] == 6 and report["fid"]["n_reference"] == 5  # nested folders included
    assert report["fid"]["encoder"] == str(folders["clip"]) and report["fid"]["value"] > 0


def test_open_clip_names_are_checked(folders, tiny_clip):
    with pytest.raises(UsageError, match="architecture without weights"):
        load_open_clip("ViT-B-32")
    with pytest.raises(UsageError, match="no open_clip model"):
        load_open_clip("not-a-model")
    text_blind = load_open_clip(str(tiny_clip), device="cpu")  # a 64-token text vocabulary
    with pytest.raises(UsageError, match="cannot read text"):
        clip_score(text_blind, [Image.new("RGB", (SIZE, SIZE))], ["a photo of a bench"])


def test_reference_and_encoder_must_come_together(folders, tmp_path):
    with pytest.raises(UsageError, match="needs an encoder"):
        _run(folders, tmp_path, reference=folders["reference"])
    with pytest.raises(UsageError, match="give --reference"):
        _run(folders, tmp_path, fid_encoder=str(folders["clip"]))


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_the_layout_and_the_scores_into_the_card(folders, tmp_path, capsys):
    argv = ["eval", "generation", "--model", str(folders["model"]), "--decoder", str(folders["decoder"])]
    argv += ["--prompts", str(folders["root"] / "geneval.jsonl"), "--out", str(tmp_path), "--device", "cpu"]
    argv += ["--samples-per-prompt", "2", "--steps", str(STEPS), "--clip", str(folders["clip"])]
    argv += ["--reference", str(folders["reference"]), "--card"]
    card = folders["model"] / "README.md"
    card.unlink(missing_ok=True)
    try:
        assert main(argv) == 0
        report = json.loads((tmp_path / "eval_generation.json").read_text())
        printed = capsys.readouterr().out
        assert "CLIP score" in printed and "evaluate_images.py" in printed and str(card) in printed
        from huggingface_hub import metadata_load

        results = metadata_load(card)["model-index"][0]["results"]
        assert [r["dataset"]["type"] for r in results] == ["geneval"]
        metrics = {m["type"]: m for m in results[0]["metrics"]}
        assert metrics["clip_score"]["value"] == round(report["clip_score"]["value"], 4)
        assert metrics["frechet_distance"]["value"] == round(report["fid"]["value"], 4)
        assert metrics["frechet_distance"]["config"] == "<local path>"  # no local path on a card
    finally:
        card.unlink(missing_ok=True)
