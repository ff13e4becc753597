"""LoRA through peft: what trains, what is saved, reload and merge."""

import pytest
import torch
from conftest import GENERATION, UNDERSTANDING, encode_conversations

from vpit import VPiTForCausalLM
from vpit.model.lora import apply_lora, load_lora, lora_target_modules, merge_lora


@pytest.fixture
def lora_setup(tiny_vpit, tmp_path):
    model, processor = tiny_vpit
    model.save_pretrained(tmp_path / "base")
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # pretend training moved every trainable tensor
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    batch = encode_conversations(processor, [UNDERSTANDING, GENERATION], [[None], [None]])
    return peft_model, batch, tmp_path


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_only_lora_bridge_head_and_image_rows_train(lora_setup):
    peft_model, _, _ = lora_setup
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert "lora_" in name or "modules_to_save" in name or "trainable_tokens" in name, name
        assert "vision_tower" not in name
    assert any("bridge.modules_to_save" in n for n in trainable)
    assert any("visual_head.modules_to_save" in n for n in trainable)
    assert any("embed_tokens.token_adapter" in n for n in trainable)
    assert any("lm_head.token_adapter" in n for n in trainable)


def test_target_modules_are_llm_linear_layers_only(tiny_vpit):
    model, _ = tiny_vpit
    pattern = lora_target_modules(model)
    assert pattern.startswith(r"^language_model\.")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in pattern
    assert "lm_head" not in pattern
    assert lora_target_modules(model, ["q_proj", "v_proj"]).endswith("(q_proj|v_proj)$")
    with pytest.raises(ValueError, match=r"\['qkv'\] are not Linear layers of the LLM"):
        lora_target_modules(model, ["qkv"])


def test_adapter_round_trip_is_exact(lora_setup):
    peft_model, batch, tmp_path = lora_setup
    reference = _logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt"))]
    # Reloaded for further training, the model computes exactly what was saved.
    resumed = load_lora(tmp_path / "base", tmp_path / "adapter", is_trainable=True)
    assert torch.equal(_logits(resumed, batch), reference)
    # For inference peft applies the image-token rows through a different (no-grad) path: same values,
    # float rounding apart.
    frozen = load_lora(tmp_path / "base", tmp_path / "adapter")
    assert torch.allclose(_logits(frozen, batch), reference, atol=1e-6)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_merge_gives_a_plain_vpit_folder(lora_setup):
    peft_model, batch, tmp_path = lora_setup
    reference = _logits(peft_model, batch)
    merged = merge_lora(peft_model)
    assert type(merged) is VPiTForCausalLM
    assert not [n for n, _ in merged.named_parameters() if "lora_" in n or "modules_to_save" in n]
    # Merging folds B @ A into the weights: equal up to float rounding.
    assert torch.allclose(_logits(merged, batch), reference, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = VPiTForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(_logits(again, batch), _logits(merged, batch))
    assert all(not p.requires_grad for p in again.vision_tower.parameters())
