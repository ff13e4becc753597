"""The command line's errors: one line `vpit <command>: error: ...` naming the cause and the fix, exit status 2 for
usage and 1 for failures, the traceback only with --debug. The folder checks read files only, so no model is built."""

import json
import re
import runpy
import sys
from pathlib import Path

import pytest

from vpit.cli import main
from vpit.errors import FolderError, RecipeError, check_decoder_folder, check_model_folder, error_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path) -> dict[str, Path]:
    """Folders that look like what save_pretrained writes (their configs only): a VPiT model, a decoder, a Llama."""
    folders = {name: tmp_path / name for name in ("model", "decoder", "llama", "empty")}
    for folder in folders.values():
        folder.mkdir()
    (folders["model"] / "config.json").write_text(json.dumps({"model_type": "vpit"}))
    (folders["decoder"] / "model_index.json").write_text(json.dumps({"_class_name": "VPiTDecoderPipeline"}))
    (folders["llama"] / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folders


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    status = main(list(argv))
    return status, capsys.readouterr().err.splitlines()


def generate(model: Path | str, decoder: Path | None = None) -> list[str]:
    argv = ["generate", "--model", str(model), "--prompt", "Draw a red circle.", "--out", "unused"]
    return argv + (["--decoder", str(decoder)] if decoder is not None else [])


@pytest.mark.parametrize(
    ("model", "decoder", "says"),
    [
        ("missing", None, r"missing: no such folder \(give a VPiT model folder, or a Hub id such as org/name\)"),
        (
            "decoder",
            None,
            r"decoder is not a VPiT model folder: it has no config\.json \(it is a decoder folder: pass ",
        ),
        ("llama", None, r"llama holds a 'llama' model, not a VPiT one .*assemble it first"),
        ("empty", None, r"empty is not a VPiT model folder: it has no config\.json\. Pass the folder that save_pretr"),
        ("model", "model", r"model is not a decoder folder: it has no model_index\.json \(it is a VPiT model folder: "),
        ("model", "missing", r"missing: no such folder \(give a decoder folder"),
    ],
)
def test_a_folder_of_the_wrong_kind_is_one_usage_line(saved, tmp_path, capsys, model, decoder, says):
    pick = {**saved, "missing": tmp_path / "missing"}
    status, lines = run(capsys, *generate(pick[model], pick[decoder] if decoder else None))
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("vpit generate: error: "), lines
    assert re.search(says, lines[0]), lines[0]


def test_hub_ids_pass_the_checks_and_files_do_not(tmp_path):
    check_model_folder("meta-llama/Llama-3.1-8B-Instruct")  # no such local folder: left to huggingface_hub
    check_decoder_folder("my-org/vpit-decoder")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FolderError, match=r"weights\.bin is a file, not a VPiT model folder"):
        check_model_folder(tmp_path / "weights.bin")
    with pytest.raises(FolderError, match=r"\./org/name: no such folder"):
        check_model_folder("./org/name")  # a relative path is never a Hub id


def test_a_wrong_recipe_key_or_file_is_one_usage_line(capsys, tmp_path):
    status, lines = run(capsys, "train", str(ROOT / "recipes/toy/vpit.yaml"), "optim.lrr=3e-4")
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith("vpit train: error: ") and "optim: unknown keys ['lrr']; known keys are [" in lines[0]
    status, lines = run(capsys, "train", str(tmp_path / "nope.yaml"))
    assert (status, lines) == (2, [f"vpit train: error: {tmp_path / 'nope.yaml'}: no such recipe file (the recipes "
                                   "vpit ships are under recipes/)"])  # fmt: skip
    status, lines = run(capsys, "train", str(ROOT / "recipes/toy/vpit.yaml"), "optim.lr=fast")
    assert status == 2 and lines[0].endswith("optim.lr must be a number, got 'fast'")


def test_a_missing_input_file_is_usage_and_a_failure_while_working_is_status_1(saved, capsys, tmp_path):
    status, lines = run(capsys, "data", "validate", str(tmp_path / "card.yaml"))
    assert (status, lines) == (2, [f"vpit data validate: error: {tmp_path / 'card.yaml'}: No such file or directory"])
    # The model folder passes the checks (config.json of model_type vpit) but cannot load: a failure, not usage.
    status, lines = run(capsys, *generate(saved["model"]))
    assert status == 1 and len(lines) == 1
    assert lines[0].startswith("vpit generate: error: ") and lines[0].endswith(" (--debug shows the traceback)")


def test_debug_shows_the_traceback(saved):
    with pytest.raises(RecipeError, match="unknown keys"):
        main(["train", str(ROOT / "recipes/toy/vpit.yaml"), "optim.lrr=1", "--debug"])
    with pytest.raises(FolderError, match="no such folder"):
        main(["--debug", *generate(saved["model"].parent / "missing")])


def test_error_line_folds_any_message_to_one_line():
    assert error_line(ValueError("two\n  lines")) == "two lines"
    assert error_line(RuntimeError("CUDA out of memory")) == "RuntimeError: CUDA out of memory"
    assert error_line(KeyError()) == "KeyError"
    assert error_line(FileNotFoundError(2, "No such file or directory", "x.png")) == "x.png: No such file or directory"


def test_python_m_vpit_train_as_accelerate_launches_it_prints_one_line(monkeypatch, capsys):
    recipe = str(ROOT / "recipes/toy/vpit.yaml")
    monkeypatch.setattr(sys, "argv", ["vpit.train", recipe, "train.max_stepz=3"])
    with pytest.raises(SystemExit) as status:
        runpy.run_module("vpit.train", run_name="__main__")  # what `python -m vpit.train` runs
    assert status.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vpit.train: error: {recipe}: train: unknown keys ['max_stepz']")
    assert "'max_steps'" in lines[0]
    monkeypatch.setattr(sys, "argv", ["vpit.train", recipe, "train.max_stepz=3", "--debug"])
    with pytest.raises(RecipeError, match="unknown keys"):
        runpy.run_module("vpit.train", run_name="__main__")
    with pytest.raises(SystemExit) as usage:
        main(["generate", "--prompt", "hi"])
    assert usage.value.code == 2
