"""Tiny, randomly initialised backbones built from configs and saved as the folders real models come in.

No machine of this project can download weights, so tests, examples and the toy world build a few-layer Llama
(with a BPE tokenizer trained on the spot) and a small open_clip ViT, save them to disk, and load them back
through exactly the code paths a real model takes (`AutoModelForCausalLM.from_pretrained`, open_clip's
`local-dir:` folders).

Example:
    >>> save_tiny_llama("tiny/llama"); save_tiny_open_clip("tiny/clip")
    >>> model, processor = vpit.assemble("tiny/llama", "local-dir:tiny/clip", num_visual_tokens=4)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Enough English to give the BPE merges for captions, questions and chat roles.
DEFAULT_CORPUS = (
    "a small red circle on the left",
    "a large blue square at the top",
    "a small green triangle in the center",
    "Generate an image of a large purple circle at the bottom.",
    "Here is an image based on your request:",
    "What colour is the shape? red green blue yellow purple orange",
    "Describe the image. USER: ASSISTANT: Draw Make it Move it",
)

TINY_OPEN_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 48, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def train_bpe_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (Llama-style specials <s> </s> <unk> <pad>, BOS prepended) as a fast tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus) * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def save_tiny_llama(
    folder: str | Path,
    hidden_size: int = 64,
    num_layers: int = 2,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised few-layer Llama and its tokenizer as a transformers folder."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = train_bpe_tokenizer()
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def save_tiny_open_clip(folder: str | Path, model_cfg: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Save a randomly initialised open_clip CLIP as a `local-dir:` folder (open_clip_config.json + safetensors),
    the layout of open_clip models on the Hub."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model_cfg = model_cfg or TINY_OPEN_CLIP_CFG
    preprocess = {"size": model_cfg["vision_cfg"]["image_size"], "mean": [0.5] * 3, "std": [0.5] * 3}
    config = {"model_cfg": model_cfg, "preprocess_cfg": {**preprocess, "resize_mode": "squash"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    model = open_clip.model.CLIP(**model_cfg)
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return folder


__all__ = ["DEFAULT_CORPUS", "TINY_OPEN_CLIP_CFG", "save_tiny_llama", "save_tiny_open_clip", "train_bpe_tokenizer"]
