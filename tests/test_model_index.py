"""Evaluation figures in the model card (vpit.hub.write_eval_results, vpit.evaluation.model_index): the Hub's
`model-index` metadata parses with huggingface_hub, holds the figures under the right names, a second evaluation
merges instead of overwriting, the card's text and other metadata stay, and `vpit push` uploads the card as it is."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import EvalResult, ModelCard, metadata_load

import vpit.toy.evaluate as toy_evaluate
from vpit.cli import main
from vpit.evaluation.model_index import generation_eval_results, toy_eval_results
from vpit.hub import push_folder, write_eval_results


def _accuracy(all_four: float, n: int) -> dict:
    """One accuracy block of a `vpit eval toy` report (vpit.toy.evaluate._accuracy)."""
    return {
        "size": 1.0,
        "colour": 1.0,
        "shape": 1.0,
        "position": 1.0,
        "all": all_four,
        "n": float(n),
        "all_ci95": [0, 1],
    }


def toy_report(understanding: float = 0.93333) -> dict:
    """The parts of `evaluate_toy`'s report the card reads."""
    return {
        "understanding": {"overall": understanding, "per_type": {}, "n": 300, "mistakes": []},
        "generation": {
            "in_distribution": _accuracy(0.95, 330),
            "held_out": _accuracy(0.61111, 90),
            "tokens": {"in_distribution": _accuracy(0.97, 330), "held_out": _accuracy(0.7, 90)},
            "no_image": 0,
        },
        "editing": _accuracy(0.43333, 90),
        "reconstruction": _accuracy(0.99167, 360),
    }


def generation_report(clip_model: str = "ViT-B-32:openai") -> dict:
    """The parts of `evaluate_generation`'s report the card reads."""
    return {
        "format": "geneval",
        "prompts": "geneval/prompts/evaluation_metadata.jsonl",
        "settings": {"samples_per_prompt": 4},
        "clip_score": {"model": clip_model, "value": 31.234567, "n": 2212},
        "fid": {"encoder": clip_model, "value": 12.3456789, "n_generated": 2212, "n_reference": 5000},
    }


@pytest.fixture
def folder(tiny_vpit, tmp_path) -> Path:
    model, processor = tiny_vpit
    model.save_pretrained(tmp_path / "vpit-tiny")
    processor.save_pretrained(tmp_path / "vpit-tiny")
    return tmp_path / "vpit-tiny"


def _figures(card: Path) -> dict[tuple, float]:
    """(task, dataset type, dataset config, metric type, metric config) -> value, as the Hub reads the card."""
    index = metadata_load(card)["model-index"]
    assert len(index) == 1
    return {
        (r["task"]["type"], r["dataset"]["type"], r["dataset"].get("config"), m["type"], m.get("config")): m["value"]
        for r in index[0]["results"]
        for m in r["metrics"]
    }


TOY_FIGURES = {
    ("visual-question-answering", "vpit-toy-world", "understanding", "accuracy", None): 93.33,
    ("text-to-image", "vpit-toy-world", "in-distribution", "accuracy", None): 95.0,
    ("text-to-image", "vpit-toy-world", "in-distribution", "token_space_accuracy", None): 97.0,
    ("text-to-image", "vpit-toy-world", "held-out", "accuracy", None): 61.11,
    ("text-to-image", "vpit-toy-world", "held-out", "token_space_accuracy", None): 70.0,
    ("image-to-image", "vpit-toy-world", "editing", "accuracy", None): 43.33,
    ("image-to-image", "vpit-toy-world", "reconstruction", "accuracy", None): 99.17,
}


def test_toy_figures_go_into_a_new_vpit_card(folder):
    path = write_eval_results(folder, toy_eval_results(toy_report()))
    assert path == folder / "README.md"
    assert _figures(path) == TOY_FIGURES
    card = ModelCard.load(path)
    assert card.data.library_name == "vpit" and "## Architecture" in card.text  # vpit's generated card
    assert card.data.model_name == "vpit-tiny" and len(card.data.eval_results) == len(TOY_FIGURES)
    names = {(r.dataset_config, r.metric_type): r.metric_name for r in card.data.eval_results}
    assert names["understanding", "accuracy"] == "Accuracy, all question types (%)"
    assert names["held-out", "token_space_accuracy"] == "All four attributes right, token space (%), held-out"
    assert {r.dataset_name for r in card.data.eval_results} == {"vpit toy world"}


def test_a_second_evaluation_merges_and_the_card_keeps_its_text(folder):
    path = write_eval_results(folder, toy_eval_results(toy_report()), model_name="me/vpit-tiny")
    card = ModelCard.load(path)
    card.text += "\n## Notes\n\nTrained on a laptop.\n"
    card.data.license = "apache-2.0"
    card.save(path)

    write_eval_results(folder, generation_eval_results(generation_report()))
    figures = _figures(path)
    assert len(figures) == len(TOY_FIGURES) + 2
    assert figures["text-to-image", "geneval", None, "clip_score", "ViT-B-32:openai"] == 31.2346
    assert figures["text-to-image", "geneval", None, "frechet_distance", "ViT-B-32:openai"] == 12.3457

    before = [(r.dataset_config, r.metric_type) for r in ModelCard.load(path).data.eval_results]
    write_eval_results(folder, toy_eval_results(toy_report(understanding=0.5)))  # a rerun replaces, in place
    card = ModelCard.load(path)
    assert [(r.dataset_config, r.metric_type) for r in card.data.eval_results] == before
    assert _figures(path)["visual-question-answering", "vpit-toy-world", "understanding", "accuracy", None] == 50.0
    assert card.data.model_name == "me/vpit-tiny" and card.data.license == "apache-2.0"
    assert card.data.library_name == "vpit" and "Trained on a laptop." in card.text and "## Architecture" in card.text


def test_a_clip_named_by_a_local_folder_is_not_published(folder, tmp_path):
    write_eval_results(folder, generation_eval_results(generation_report(clip_model=str(tmp_path))))
    assert {key[4] for key in _figures(folder / "README.md")} == {"<local path>"}
    write_eval_results(folder, generation_eval_results(generation_report(clip_model=f"local-dir:{tmp_path}")))
    assert (
        "<local path>" in (folder / "README.md").read_text() and str(tmp_path) not in (folder / "README.md").read_text()
    )


def test_a_card_that_is_not_vpits_keeps_its_metadata(folder):
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My model\n\nHand written.\n")
    write_eval_results(folder, toy_eval_results(toy_report())[:1])
    card = ModelCard.load(folder / "README.md")
    assert (
        card.data.license == "mit" and card.data.tags == ["mine"] and card.text.strip() == "# My model\n\nHand written."
    )
    assert _figures(folder / "README.md") == dict(list(TOY_FIGURES.items())[:1])
    with pytest.raises(ValueError, match="no evaluation results"):
        write_eval_results(folder, [])


class _RecordingApi:
    """Stands in for HfApi: keeps the files `push_folder` uploads."""

    uploaded: dict[str, bytes]

    def __init__(self, token=None, **_):
        pass

    def create_repo(self, repo_id, **_):
        pass

    def upload_folder(self, folder_path, repo_id, commit_message, create_pr=False):
        _RecordingApi.uploaded = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()}

        class Commit:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc"

        return Commit()


def test_push_uploads_the_card_with_its_figures(folder, monkeypatch):
    monkeypatch.setattr("vpit.hub.HfApi", _RecordingApi)
    card = write_eval_results(folder, toy_eval_results(toy_report()))
    push_folder(folder, "me/vpit-tiny", license="mit")  # the card exists: push keeps it as it is
    assert _RecordingApi.uploaded["README.md"] == card.read_bytes()
    assert b"model-index" in _RecordingApi.uploaded["README.md"]


def test_cli_eval_toy_card(folder, tmp_path, monkeypatch, capsys):
    """`vpit eval toy --card` writes the report's figures (the evaluation itself stubbed: it is tested elsewhere)."""
    monkeypatch.setattr(toy_evaluate, "evaluate_toy", lambda *args, **kwargs: toy_report())
    monkeypatch.setattr(toy_evaluate, "markdown_report", lambda report: "report")
    argv = ["eval", "toy", "--model", str(folder), "--decoder", str(tmp_path), "--out", str(tmp_path / "eval")]
    assert main([*argv, "--card"]) == 0
    assert str(folder / "README.md") in capsys.readouterr().out
    assert _figures(folder / "README.md") == TOY_FIGURES


def test_eval_results_round_trip_through_huggingface_hub(folder):
    results = toy_eval_results(toy_report()) + generation_eval_results(generation_report())
    assert all(isinstance(r, EvalResult) for r in results)
    write_eval_results(folder, results)
    loaded = ModelCard.load(folder / "README.md").data.eval_results
    assert [(r.task_type, r.dataset_config, r.metric_type, r.metric_value) for r in loaded] == [
        (r.task_type, r.dataset_config, r.metric_type, r.metric_value) for r in results
    ]
