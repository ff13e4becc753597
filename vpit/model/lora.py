"""LoRA on the LLM through peft; the bridge, visual head and image-token rows train in full and save with it.

A LoRA checkpoint is a standard peft adapter folder (adapter_config.json + adapter_model.safetensors) holding the
LoRA matrices, the bridge and visual head (`modules_to_save`) and the image-token rows of the embedding and LM
head (`trainable_token_indices`). `merge_lora` folds everything back into a plain `VPiTForCausalLM`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model
from torch import nn

from .modeling_vpit import VPiTForCausalLM

MODULES_TO_SAVE = ["bridge", "visual_head"]  # and a resampling model's token_bridge, a queries model's connector


def lora_target_modules(model: VPiTForCausalLM, names: Sequence[str] | None = None) -> str:
    """A `target_modules` regex over the LLM's Linear layers (all of them but the LM head by default).

    The encoder, bridge and head are never matched: the pattern is anchored at `language_model.`.

    Raises:
        ValueError: if a requested name is not a Linear layer of the LLM.
    """
    lm = model.language_model
    output_embeddings = lm.get_output_embeddings()
    linear = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in lm.named_modules()
            if isinstance(module, nn.Linear) and module is not output_embeddings
        }
    )
    if names is not None:
        unknown = sorted(set(names) - set(linear))
        if unknown:
            raise ValueError(f"lora target modules {unknown} are not Linear layers of the LLM; choose from {linear}")
        linear = sorted(names)
    return rf"^language_model\..*\.({'|'.join(map(re.escape, linear))})$"


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def apply_lora(
    model: VPiTForCausalLM,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
    train_image_token_rows: bool = True,
) -> PeftModel:
    """Wrap `model` with LoRA adapters on the LLM.

    Args:
        r, alpha, dropout: LoRA rank, scaling numerator and dropout.
        target_modules: leaf names of LLM Linear layers (e.g. ["q_proj", "v_proj"]); all of them by default.
        train_image_token_rows: also train the embedding and LM-head rows of the image tokens (peft
            `trainable_token_indices`), which are new and start at the mean row.

    Example:
        >>> peft_model = apply_lora(model, r=8)
        >>> peft_model.save_pretrained("run/adapter")   # adapter + bridge + head + image-token rows
    """
    if r < 1:
        raise ValueError(f"lora r must be >= 1, got {r}")
    token_indices = None
    if train_image_token_rows:
        ids, targets = _image_token_targets(model)
        token_indices = dict.fromkeys(targets, ids)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_modules(model, target_modules),
        modules_to_save=[
            *MODULES_TO_SAVE,
            *(["token_bridge"] if model.resamples else []),
            *(["connector"] if model.makes_queries else []),
        ],
        trainable_token_indices=token_indices,
    )
    return get_peft_model(model, config)


def _image_token_targets(model: VPiTForCausalLM) -> tuple[list[int], list[str]]:
    """The ids of the tokens VPiT added (image tokens; codes of a discrete model) and the matrices that hold their
    rows: the embedding, and an untied LM head."""
    ids = model.new_token_ids()
    embeddings = model.get_input_embeddings()
    targets = [_module_name(model, embeddings)]
    output_embeddings = model.get_output_embeddings()
    if output_embeddings is not None and output_embeddings.weight is not embeddings.weight:
        targets.append(_module_name(model, output_embeddings))
    return ids, targets


def apply_image_token_rows(model: VPiTForCausalLM) -> PeftModel:
    """Train the image tokens' embedding and LM-head rows alone (peft's TrainableTokens) with the rest of the LLM
    frozen, as the bridge stage does: only those rows hold gradients and optimizer state (a few rows, not a
    128k x 4096 matrix), and no other row can change, weight decay or not. The bridge and visual head keep the
    trainability they had; `merge_lora` folds the rows back into a plain model.

    Example:
        >>> model.language_model.requires_grad_(False)
        >>> wrapped = apply_image_token_rows(model)   # bridge + image-token rows train
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    ids, targets = _image_token_targets(model)
    wrapped = get_peft_model(model, TrainableTokensConfig(token_indices=ids, target_modules=targets))
    for name, param in model.named_parameters():  # peft freezes everything it did not add: restore the rest
        if name in trainable:
            param.requires_grad_(True)
    return wrapped


def load_lora(base: VPiTForCausalLM | str | Path, adapter: str | Path, is_trainable: bool = False) -> PeftModel:
    """Load an adapter folder onto a VPiT base model (an object or a saved VPiT folder)."""
    model = base if isinstance(base, VPiTForCausalLM) else VPiTForCausalLM.from_pretrained(base)
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=is_trainable)


def merge_lora(peft_model: PeftModel) -> VPiTForCausalLM:
    """Fold LoRA (or the TrainableTokens of `apply_image_token_rows`), the trained bridge/head and the image-token
    rows into a plain `VPiTForCausalLM`."""
    merged = peft_model.merge_and_unload()
    if not isinstance(merged, VPiTForCausalLM):
        raise TypeError(f"expected a VPiTForCausalLM under the adapter, got {type(merged).__name__}")
    merged.vision_tower.freeze()
    return merged


__all__ = ["apply_image_token_rows", "apply_lora", "load_lora", "lora_target_modules", "merge_lora"]
