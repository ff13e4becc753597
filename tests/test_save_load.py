"""save_pretrained / from_pretrained round trips (bit-exact), Auto classes, the plain-LLM export, security."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import GENERATION, UNDERSTANDING, encode_conversations
from transformers import AutoConfig, AutoModelForCausalLM

import vpit
from vpit import VPiTForCausalLM, VPiTProcessor


@pytest.fixture
def saved(tiny_vpit, tmp_path):
    model, processor = tiny_vpit
    with torch.no_grad():  # make the bridge / head non-trivial so a lost module would show
        for p in (*model.bridge.parameters(), *model.visual_head.parameters()):
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return model, processor, tmp_path


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch)


def test_folder_is_self_describing_and_safetensors_only(saved):
    _, _, folder = saved
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vpit" and config["architectures"] == ["VPiTForCausalLM"]
    assert config["vision_config"]["model_config"]["vision_cfg"]["width"] == 48  # encoder rebuilds offline
    assert config["image_token_id"] is not None


def test_round_trip_reproduces_outputs_exactly(saved):
    model, processor, folder = saved
    batch = encode_conversations(processor, [UNDERSTANDING, GENERATION], [[None], [None]])
    reference = _outputs(model, batch)
    loaded = VPiTForCausalLM.from_pretrained(folder)
    out = _outputs(loaded, batch)
    for key in ("logits", "loss", "text_loss", "visual_loss", "visual_predictions", "visual_targets"):
        assert torch.equal(getattr(out, key), getattr(reference, key)), key
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # Regression: loading swaps in new Parameters; the encoder must come back frozen.
    assert all(not p.requires_grad for p in loaded.vision_tower.parameters())
    assert all(p.requires_grad for p in loaded.bridge.parameters())


def test_auto_classes_load_the_folder(saved):
    model, processor, folder = saved
    assert type(AutoConfig.from_pretrained(folder)) is vpit.VPiTConfig
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert type(loaded) is VPiTForCausalLM
    batch = encode_conversations(processor, [GENERATION], [[None]])
    assert torch.equal(_outputs(loaded, batch).logits, _outputs(model, batch).logits)


def test_processor_reloads_with_the_model(saved):
    _, processor, folder = saved
    loaded = VPiTProcessor.from_pretrained(folder)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_language_model_exports_as_plain_transformers_folder(tiny_vpit, tmp_path):
    model, processor = tiny_vpit
    model.save_language_model(tmp_path / "llm", tokenizer=processor.tokenizer)
    ids = processor.tokenizer("a small red circle <image_start>", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        expected = model.language_model(input_ids=ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "ref.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads({torch.get_num_threads()})  # bit-equal logits need the same reduction order as this process
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "llm")!r}).eval()
tok = AutoTokenizer.from_pretrained({str(tmp_path / "llm")!r})
ref = torch.load({str(tmp_path / "ref.pt")!r}, weights_only=True)
assert "vpit" not in sys.modules, "vpit was imported"
assert type(model).__name__ == "LlamaForCausalLM"
assert tok.convert_tokens_to_ids("<image_start>") == ref["ids"][0, -1].item()
with torch.no_grad():
    assert torch.equal(model(input_ids=ref["ids"]).logits, ref["logits"])
print("plain-ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert "plain-ok" in result.stdout, result.stderr[-2000:]


def test_hf_vision_backend_round_trip(tiny_llama, hf_vision, tmp_path):
    model, processor = vpit.assemble(tiny_llama, str(hf_vision("clip")), vision_backend="hf", num_visual_tokens=4)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    batch = encode_conversations(processor, [GENERATION], [[None]])
    loaded = VPiTForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_outputs(loaded, batch).logits, _outputs(model, batch).logits)
    assert all(not p.requires_grad for p in loaded.vision_tower.parameters())


def test_no_unsafe_deserialisation_in_the_package():
    """Weights are safetensors; any torch.load must pass weights_only=True; remote code is opt-in."""
    import re
    from pathlib import Path

    source = Path(vpit.__file__).parent
    for path in source.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert "pickle" not in text, path.name
        assert "trust_remote_code: bool = True" not in text, path.name
