"""vpit: Visual-Predictive Instruction Tuning for any Hugging Face causal LLM (MetaMorph, arXiv 2412.14164).

>>> import vpit
>>> model, processor = vpit.assemble("meta-llama/Llama-3.1-8B-Instruct", "ViT-SO400M-14-SigLIP-384",
...                                  vision_pretrained="webli")
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .assembly import assemble
from .configuration_vpit import VPiTConfig, VPiTVisionConfig
from .decoder import VPiTDecoderPipeline, VPiTDecoderProjector, VPiTVisionEncoderModel
from .generation import VPiTGenerationOutput, generate
from .modeling_vpit import VPiTCausalLMOutput, VPiTForCausalLM
from .pipeline import VPiTPipeline, VPiTPipelineOutput
from .processing_vpit import VPiTProcessor
from .vision import VisionEncoder

__version__ = "0.1.0"

AutoConfig.register(VPiTConfig.model_type, VPiTConfig, exist_ok=True)
AutoConfig.register(VPiTVisionConfig.model_type, VPiTVisionConfig, exist_ok=True)
AutoModelForCausalLM.register(VPiTConfig, VPiTForCausalLM, exist_ok=True)

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
