"""Model card contents and uploads, with huggingface_hub's HfApi replaced by a recorder (no network)."""

import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from huggingface_hub import HfApi

from vpit.cli import main
from vpit.errors import FolderError
from vpit.hub import build_model_card, push_folder, push_to_hub
from vpit.toy.decoder import toy_decoder_components

SECRET = "hf_secretTOKENthatMustNeverBeWritten"


class RecordingApi:
    """Stands in for HfApi: records the calls and a snapshot of the uploaded folder."""

    calls: ClassVar[list] = []

    def __init__(self, token=None, **_):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        RecordingApi.calls.append(("create_repo", repo_id, private, exist_ok, repo_type, self.token))

    def upload_folder(self, folder_path, repo_id, commit_message, create_pr=False):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()}
        RecordingApi.calls.append(("upload_folder", repo_id, commit_message, files))

        class Commit:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc123"

        return Commit()


@pytest.fixture
def api(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr("vpit.hub.HfApi", RecordingApi)
    monkeypatch.setattr(HfApi, "__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
    return RecordingApi


@pytest.fixture
def folder(tiny_vpit, tmp_path):
    model, processor = tiny_vpit
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return tmp_path


def _metadata(card_text):
    return yaml.safe_load(card_text.split("---")[1])


def test_model_card_metadata_and_usage(folder):
    config = json.loads((folder / "config.json").read_text())
    config["text_model_name_or_path"] = "meta-llama/Llama-3.1-8B-Instruct"
    config["vision_config"].update(model_name="ViT-SO400M-14-SigLIP-384", pretrained="webli")
    (folder / "config.json").write_text(json.dumps(config))
    card = build_model_card(
        folder,
        "me/vpit-tiny",
        license="apache-2.0",
        datasets=["liuhaotian/LLaVA-Instruct-150K"],
        metrics={"text_loss": 1.25},
        training_config={"lr": 1e-4},
    )
    meta = _metadata(str(card))
    assert meta["library_name"] == "vpit"
    assert meta["base_model"] == ["meta-llama/Llama-3.1-8B-Instruct", "timm/ViT-SO400M-14-SigLIP-384"]
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["liuhaotian/LLaVA-Instruct-150K"]
    assert {"vpit", "metamorph", "multimodal", "image-generation"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "any-to-any"
    text = str(card)
    assert 'VPiTForCausalLM.from_pretrained("me/vpit-tiny")' in text
    assert "| visual tokens per image (K) | 4 (bilinear pooling" in text
    assert "| text_loss | 1.25 |" in text and '"lr": 0.0001' in text


def test_local_paths_are_not_listed_as_base_models(folder):
    meta = _metadata(str(build_model_card(folder, "me/vpit-tiny")))
    assert "base_model" not in meta  # the tiny models live in temporary folders, not on the Hub


def test_push_folder_uploads_with_card_and_never_writes_the_token(folder, api):
    url = push_folder(folder, "me/vpit-tiny", token=SECRET, private=True, license="mit")
    assert url == "https://huggingface.co/me/vpit-tiny/commit/abc123"
    create, upload = api.calls
    assert create == ("create_repo", "me/vpit-tiny", True, True, "model", SECRET)
    files = upload[3]
    assert {"README.md", "config.json", "model.safetensors", "processor_config.json"} <= set(files)
    assert _metadata(files["README.md"].decode())["license"] == "mit"
    for name, content in files.items():
        assert SECRET.encode() not in content, name
    for path in folder.rglob("*"):
        assert path.is_dir() or SECRET.encode() not in path.read_bytes(), path


def test_existing_readme_is_kept(folder, api):
    (folder / "README.md").write_text("my own card")
    push_folder(folder, "me/vpit-tiny")
    assert api.calls[-1][3]["README.md"] == b"my own card"


def test_push_folder_needs_a_saved_model(tmp_path, api):
    with pytest.raises(FolderError, match=r"neither a VPiT model folder \(config\.json\) nor a decoder folder"):
        push_folder(tmp_path, "me/x")
    assert api.calls == []


def test_model_push_to_hub(tiny_vpit, api):
    model, processor = tiny_vpit
    url = push_to_hub(model, "me/vpit-tiny", processor=processor, token=SECRET, license="apache-2.0")
    assert url.endswith("/commit/abc123")
    files = api.calls[-1][3]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(files)
    assert all(SECRET.encode() not in content for content in files.values())


def test_decoder_push_to_hub_uploads_the_folder_with_its_model_card(api, tmp_path):
    from vpit.decoder import VPiTDecoderPipeline

    pipe = VPiTDecoderPipeline(**toy_decoder_components(vision_hidden_size=48, num_visual_tokens=4))
    url = push_to_hub(pipe, "someone/toy-decoder", token=SECRET, license="apache-2.0")
    assert url == "https://huggingface.co/someone/toy-decoder/commit/abc123"
    create, upload = api.calls
    assert create[1] == "someone/toy-decoder" and upload[1] == "someone/toy-decoder"
    files = upload[3]
    assert set(files) == {"README.md", "model_index.json"}  # top-level files; components sit in subfolders
    card = files["README.md"].decode()
    assert 'DiffusionPipeline.from_pretrained("someone/toy-decoder")' in card
    assert _metadata(card)["license"] == "apache-2.0" and _metadata(card)["library_name"] == "diffusers"
    assert "UNet2DConditionModel, 8 px samples" in card and "AutoencoderKL, 4 latent channels" in card
    assert all(SECRET.encode() not in content for content in files.values())
    pipe.save_pretrained(tmp_path)  # `vpit push` takes a saved decoder folder as it takes a model folder
    assert main(["push", str(tmp_path), "someone/toy-decoder"]) == 0
    assert "VPiT decoder" in api.calls[-1][3]["README.md"].decode()


def test_cli_push(folder, api, capsys):
    assert (
        main(["push", str(folder), "me/vpit-tiny", "--license", "apache-2.0", "--dataset", "a/b", "--tag", "toy"]) == 0
    )
    assert capsys.readouterr().out.strip() == "https://huggingface.co/me/vpit-tiny/commit/abc123"
    meta = _metadata(api.calls[-1][3]["README.md"].decode())
    assert meta["datasets"] == ["a/b"] and "toy" in meta["tags"]


def test_console_script_help():
    exe = Path(sys.executable).parent / "vpit"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "push" in result.stdout and "Visual-Predictive" in result.stdout


def test_cards_publish_no_local_paths(folder, tmp_path):
    """Recipe values that are local paths (folders, files, local-dir: references) never reach a card."""
    from vpit.hub import write_model_card

    recipe = {
        "stage": "vpit",
        "model": {"pretrained": str(folder), "llm": None, "vision": f"local-dir:{tmp_path}/clip"},
        "data": {"mixture": [{"card": "data_cards/toy_generation.yaml", "image_folder": "/data/private/images"}]},
        "train": {"output_dir": "outputs/toy/vpit", "eval_decoder": "~/decoders/x"},
        "hub": {"repo_id": "me/vpit-tiny"},
        "optim": {"schedule": "cosine"},
    }
    card = write_model_card(folder, "me/vpit-tiny", training_config=recipe).read_text()
    for secret in (str(tmp_path), "/data/private", "outputs/toy", "data_cards/", "~/decoders"):
        assert secret not in card, secret
    assert '"repo_id": "me/vpit-tiny"' in card and '"schedule": "cosine"' in card  # names and Hub ids stay
    assert '"vision": "local-dir:<local path>"' in card and '"output_dir": "<local path>"' in card
