"""`vpit.assemble`: a VPiT model and its processor from any HF causal LLM and any vision encoder, in one call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .configuration_vpit import VPiTConfig, VPiTVisionConfig
from .modeling_vpit import VPiTForCausalLM
from .processing_vpit import VPiTProcessor
from .vision import VisionEncoder


def assemble(
    llm: str | Path | PreTrainedModel,
    vision: str | VPiTVisionConfig | dict[str, Any] = "ViT-SO400M-14-SigLIP-384",
    *,
    vision_backend: str = "open_clip",
    vision_pretrained: str | None = None,
    feature_layer: int = -1,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    **config_kwargs: Any,
) -> tuple[VPiTForCausalLM, VPiTProcessor]:
    """Build a VPiT model from a pretrained causal LLM and a pretrained vision encoder.

    The LLM and its tokenizer load through `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained`; the encoder
    through open_clip (`create_model`, registry names with a `pretrained` tag, `hf-hub:` or `local-dir:`) or
    transformers (`SiglipVisionModel` / `CLIPVisionModel` weights). The image tokens are added to the tokenizer,
    with new embedding and LM-head rows at the mean of the existing rows; the bridge and head start random.

    Args:
        llm: Hub id, local folder, or an already loaded causal LM.
        vision: encoder name (open_clip name / `hf-hub:` / `local-dir:`, or an HF id / folder with
            `vision_backend="hf"`), or a full `VPiTVisionConfig` / dict.
        vision_pretrained: open_clip pretrained tag (e.g. "webli") or weights file.
        feature_layer: encoder block giving the patch tokens (-1: last block, before the final norm).
        tokenizer: defaults to the LLM's own.
        dtype: dtype of the whole model (e.g. torch.bfloat16); the LLM's checkpoint dtype when omitted.
        **config_kwargs: any other `VPiTConfig` field (num_visual_tokens, pooling, bridge, visual_head, ...).

    Returns:
        (model, processor).

    Example:
        >>> model, processor = vpit.assemble(
        ...     "meta-llama/Llama-3.1-8B-Instruct", "ViT-SO400M-14-SigLIP-384", vision_pretrained="webli",
        ...     dtype=torch.bfloat16)
    """
    torch_dtype: torch.dtype | None = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    language_model: PreTrainedModel
    llm_name: str | None
    if isinstance(llm, (str, Path)):
        llm_name = str(llm)
        language_model = AutoModelForCausalLM.from_pretrained(
            llm_name, dtype=torch_dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    else:
        language_model = llm
        llm_name = language_model.config.name_or_path or None
    if tokenizer is None:
        if llm_name is None:
            raise ValueError("pass tokenizer= when llm is a model object without a name_or_path")
        tokenizer = llm_name
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)

    if isinstance(vision, VPiTVisionConfig):
        vision_config = vision
    elif isinstance(vision, dict):
        vision_config = VPiTVisionConfig(**vision)
    else:
        vision_config = VPiTVisionConfig(
            backend=vision_backend, model_name=vision, pretrained=vision_pretrained, feature_layer=feature_layer
        )
    # Validate the VPiT fields before loading any encoder weights.
    probe = VPiTConfig(text_config=language_model.config, vision_config=vision_config, **config_kwargs)
    encoder = VisionEncoder.from_pretrained_spec(
        vision_config, probe.num_visual_tokens, trust_remote_code=trust_remote_code
    )

    config = VPiTConfig(
        text_config=language_model.config,
        vision_config=encoder.config,
        text_model_name_or_path=llm_name,
        **config_kwargs,
    )
    model = VPiTForCausalLM(config, language_model=language_model, vision_tower=encoder.tower)
    model.add_image_tokens(tokenizer)
    target = torch_dtype if torch_dtype is not None else language_model.dtype
    if any(p.dtype != target for p in model.parameters()):
        # transformers wraps PreTrainedModel.to in a decorator whose signature mypy misreads.
        model.to(target)  # type: ignore[arg-type]
    return model, VPiTProcessor.from_config(tokenizer, model.config)


__all__ = ["assemble"]
