"""The model core: what a saved VPiT folder is, and nothing of data, training, inference pipelines or the Hub.

    configuration_vpit  VPiTConfig (LLM config + vision spec + VPiT fields), VPiTVisionConfig
    vision              VisionEncoder: the frozen encoder's pooled, normalised K visual tokens
    adapters            bridges (Dv -> H) and visual heads (H -> Dv), each behind a small registry
    losses              shifted text CE and the cosine loss
    modeling_vpit       VPiTForCausalLM: splicing, response-slot targets, the loss breakdown
    processing_vpit     VPiTProcessor: tokenizer + chat template + image transform
    images              load_image: decode, orient and convert one image to RGB
    assembly            vpit.assemble(llm, vision): a model and processor from pretrained parts
    lora                LoRA through peft, with the bridge, head and image-token rows trained and saved

Importing it registers the "vpit" model type with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_vpit import VPiTConfig, VPiTVisionConfig
from .modeling_vpit import VPiTCausalLMOutput, VPiTForCausalLM

AutoConfig.register(VPiTConfig.model_type, VPiTConfig, exist_ok=True)
AutoConfig.register(VPiTVisionConfig.model_type, VPiTVisionConfig, exist_ok=True)
AutoModelForCausalLM.register(VPiTConfig, VPiTForCausalLM, exist_ok=True)

__all__ = ["VPiTCausalLMOutput", "VPiTConfig", "VPiTForCausalLM", "VPiTVisionConfig"]
