"""vpit: Visual-Predictive Instruction Tuning for any Hugging Face causal LLM (MetaMorph, arXiv 2412.14164).

>>> import vpit
>>> model, processor = vpit.assemble("meta-llama/Llama-3.1-8B-Instruct", "ViT-SO400M-14-SigLIP-384",
...                                  vision_pretrained="webli")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The model core and the decoder load at once: importing them registers the "vpit" model type with transformers'
# Auto classes and VPiTDecoderPipeline with diffusers, so saved folders load through the ecosystem's entry points.
from .decoder import VPiTDecoderPipeline, VPiTDecoderProjector, VPiTVisionEncoderModel
from .model.assembly import assemble
from .model.configuration_vpit import VPiTConfig, VPiTVisionConfig
from .model.modeling_vpit import VPiTCausalLMOutput, VPiTForCausalLM
from .model.processing_vpit import VPiTProcessor
from .model.vision import VisionEncoder

__version__ = "0.1.0"

# The inference layer loads on first use (PEP 562), so that `import vpit.model` stays within the core.
_LAZY = {
    "VPiTGenerationOutput": "vpit.inference.generation",
    "generate": "vpit.inference.generation",
    "VPiTPipeline": "vpit.inference.pipeline",
    "VPiTPipelineOutput": "vpit.inference.pipeline",
}

if TYPE_CHECKING:
    from .inference.generation import VPiTGenerationOutput, generate
    from .inference.pipeline import VPiTPipeline, VPiTPipelineOutput


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vpit' has no attribute {name!r}")


__all__ = [
    "VPiTCausalLMOutput",
    "VPiTConfig",
    "VPiTDecoderPipeline",
    "VPiTDecoderProjector",
    "VPiTForCausalLM",
    "VPiTGenerationOutput",
    "VPiTPipeline",
    "VPiTPipelineOutput",
    "VPiTProcessor",
    "VPiTVisionConfig",
    "VPiTVisionEncoderModel",
    "VisionEncoder",
    "__version__",
    "assemble",
    "generate",
]
