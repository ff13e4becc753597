"""Tiny backbones built from configs and saved as the folders real models come in (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import vpit

CORPUS = [
    "a small red circle on the left",
    "a large blue square at the top",
    "a small green triangle in the center",
    "Generate an image of a large purple circle at the bottom.",
    "Here is an image based on your request:",
    "What colour is the shape? red green blue yellow purple orange",
    "Describe the image. USER: ASSISTANT: Draw Make it Move it",
]

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 48, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def build_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok.train_from_iterator(
        CORPUS * 4,
        trainers.BpeTrainer(
            vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)
    return fast


def build_tiny_llama(folder: Path, tie: bool = False) -> Path:
    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def build_tiny_open_clip(folder: Path) -> Path:
    """A tiny open_clip CLIP saved as a `local-dir:` folder (open_clip_config.json + safetensors)."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_cfg": TINY_OPEN_CLIP,
        "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    model = open_clip.model.CLIP(**TINY_OPEN_CLIP)
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tied"), tie=True)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_open_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture
def tiny_vpit(tiny_llama, tiny_clip):
    """A freshly assembled (model, processor) with K = 4 from the tiny Llama and tiny open_clip ViT."""
    torch.manual_seed(0)
    return vpit.assemble(tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=4)


def build_hf_vision(folder: Path, kind: str) -> Path:
    """Tiny transformers vision towers: 'siglip' / 'clip' (vision model only) or 'siglip-full' (text + vision)."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipConfig,
        SiglipModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(0)
    common = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    if kind == "siglip":
        SiglipVisionModel(SiglipVisionConfig(**common)).save_pretrained(folder)
    elif kind == "clip":
        CLIPVisionModel(CLIPVisionConfig(**common, projection_dim=16)).save_pretrained(folder)
    elif kind == "siglip-full":
        text = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 16,
        }
        SiglipModel(SiglipConfig(text_config=text, vision_config=common)).save_pretrained(folder)
    else:
        raise ValueError(kind)
    return folder


@pytest.fixture(scope="session")
def hf_vision(tmp_path_factory):
    """kind -> folder, built once per session on first use."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_hf_vision(tmp_path_factory.mktemp(f"hf-{kind}"), kind)
        return built[kind]

    return get


def encode_conversations(processor, conversations, images_per_row):
    """Tokenise chat conversations with the tokenizer's template: labels on assistant tokens, -100 on prompts,
    image slots and padding; right-padded; images in row-major order."""
    from PIL import Image

    rows, labels = [], []
    slot_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for messages in conversations:
        expanded = [{**m, "content": processor.expand_image_markers(m["content"])[0]} for m in messages]
        enc = processor.tokenizer.apply_chat_template(
            expanded, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = torch.tensor(enc["input_ids"])
        mask = torch.tensor(enc["assistant_masks"]).bool()
        rows.append(ids)
        labels.append(torch.where(mask & (ids != slot_id), ids, -100))
    length = max(len(r) for r in rows)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.full((len(rows), length), pad)
    label_ids = torch.full((len(rows), length), -100)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(r)], label_ids[i, : len(r)], attention[i, : len(r)] = r, lab, 1
    images = [img for row in images_per_row for img in row]
    colours = [(220, 40, 40), (40, 80, 220), (40, 170, 60), (230, 200, 40)]
    pil = [Image.new("RGB", (32, 32), colours[i % 4]) if img is None else img for i, img in enumerate(images)]
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids}
    if pil:
        batch["pixel_values"] = processor.preprocess_images(pil)
    return batch


UNDERSTANDING = [
    {"role": "user", "content": "<image> What colour is the shape?"},
    {"role": "assistant", "content": "red"},
]
GENERATION = [
    {"role": "user", "content": "Generate an image of a small red circle on the left."},
    {"role": "assistant", "content": "Here is an image based on your request: <image>"},
]
TEXT_ONLY = [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": "a circle"}]
