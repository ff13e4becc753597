"""Tiny backbones built from configs and saved as the folders real models come in (no network)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

import vpit
from vpit.toy.tiny import save_tiny_llama, save_tiny_open_clip


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs `-n auto --dist loadfile`), the workers share the cores: each takes its
    share of torch threads instead of every worker starting one per core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def free_port() -> int:
    """A TCP port nobody listens on now: for `accelerate launch --main_process_port` and the web app, so that tests
    running at once under pytest-xdist never meet on accelerate's default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tied"), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return save_tiny_open_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture
def one_thread():
    """One torch thread: the tiny models are too small to gain from more (see tests/test_decoder.py). A module
    that runs them takes it for every test with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_pipeline(root: Path, tiny_llama: Path, tiny_clip: Path, k: int = 4, dv: int = 48) -> dict[str, Path]:
    """A saved tiny VPiT (model + processor, K = k, seed 0) in ROOT/model and a toy decoder for its (k, dv) tokens
    in ROOT/decoder: the pair of folders `VPiTPipeline.from_pretrained` and the command line load."""
    from vpit.decoder import VPiTDecoderPipeline
    from vpit.toy.decoder import toy_decoder_components

    torch.manual_seed(0)
    model, processor = vpit.assemble(tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=k)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    VPiTDecoderPipeline(**toy_decoder_components(dv, k)).save_pretrained(root / "decoder")
    return {"model": root / "model", "decoder": root / "decoder"}


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


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: on a CPU-only machine they skip, saying why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
