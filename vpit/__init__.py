"""vpit: Visual-Predictive Instruction Tuning for any Hugging Face causal LLM (MetaMorph, arXiv 2412.14164).

>>> import vpit
>>> model, processor = vpit.assemble("meta-llama/Llama-3.1-8B-Instruct", "ViT-SO400M-14-SigLIP-384",
...                                  vision_pretrained="webli")
"""

from .decoder import VPiTDecoderPipeline, VPiTDecoderProjector, VPiTVisionEncoderModel
from .inference.generation import VPiTGenerationOutput, generate
from .inference.pipeline import VPiTPipeline, VPiTPipelineOutput
from .model.assembly import assemble
from .model.configuration_vpit import VPiTConfig, VPiTVisionConfig
from .model.modeling_vpit import VPiTCausalLMOutput, VPiTForCausalLM
from .model.processing_vpit import VPiTProcessor
from .model.vision import VisionEncoder

__version__ = "0.1.0"


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
