"""VPiT configuration: a composite `PreTrainedConfig` (LLM config + vision-encoder spec).

Glossary of dimension letters used across vpit:
    B  batch size                 T  sequence length
    H  LLM hidden size            Dv vision-encoder feature size
    N  patch tokens per image     K  visual tokens per image (pooled, a square: k x k)
    I  images in a batch          V  vocabulary size
    Q  learned queries per image  C  condition-token width (the 'queries' generation mode)
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .adapters import SAMPLING_HEADS, check_bridge, check_visual_head
from .connector import GENERATION_MODES, connector_options
from .losses import VISUAL_LOSSES
from .resamplers import RESAMPLERS, resampler_options

VISION_BACKENDS = ("open_clip", "hf")
VISUAL_TARGETS = ("continuous", "discrete")
VISUAL_CODE_TOKEN = "<image_code_{}>"  # the vocabulary entry of code i of a discrete model's codebook
POOLING_MODES = ("bilinear", "avg")
IMAGE_ATTENTION = ("causal", "bidirectional")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


class VPiTVisionConfig(PreTrainedConfig):
    """Which frozen vision encoder produces the visual tokens, and which of its layers.

    The architecture is recorded in `model_config` once resolved (see `vpit.model.vision.resolve_vision_config`), so
    a saved VPiT folder rebuilds its encoder without the open_clip registry, the Hub, or a custom config file.
    """

    model_type: ClassVar[str] = "vpit_vision"

    backend: str = field(
        default="open_clip",
        metadata={"help": "Library that builds the encoder: 'open_clip' (any open_clip model) or 'hf' (transformers)."},
    )
    model_name: str = field(
        default="ViT-SO400M-14-SigLIP-384",
        metadata={
            "help": "open_clip: a registry name, 'hf-hub:org/repo' or 'local-dir:/path'; "
            "hf: a Hub id or local folder of a SiglipVisionModel / CLIPVisionModel (or the full CLIP/SigLIP model)."
        },
    )
    pretrained: str | None = field(
        default=None,
        metadata={"help": "open_clip only: pretrained tag (e.g. 'webli') or local weights file, read at assembly."},
    )
    feature_layer: int = field(
        default=-1,
        metadata={
            "help": "Transformer block whose output gives the patch tokens; -1 is the last block, before the final "
            "norm (MetaMorph), -2 the one before it (LLaVA)."
        },
    )
    model_config: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Resolved architecture: open_clip model_cfg, or the transformers vision config as a dict."},
    )
    preprocess_config: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Resolved image transform (open_clip PreprocessCfg fields: size, mean, std, ...)."},
    )
    hidden_size: int | None = field(default=None, metadata={"help": "Dv, the patch-token width; resolved."})

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        _one_of("vision_config.backend", self.backend, VISION_BACKENDS)
        if not self.model_name:
            raise ValueError("vision_config.model_name must name an encoder, e.g. 'ViT-SO400M-14-SigLIP-384'")
        if self.feature_layer == 0:
            raise ValueError(
                "vision_config.feature_layer indexes transformer blocks (-1 = last); 0 would be the patch "
                "embedding, which carries no context. Use a negative index or a block number >= 1."
            )
        if self.pretrained is not None and self.backend == "hf":
            raise ValueError(
                "vision_config.pretrained is an open_clip tag; for backend 'hf' put the weights' Hub id or folder "
                f"in model_name instead (got pretrained={self.pretrained!r})"
            )


class VPiTConfig(PreTrainedConfig):
    """Configuration of a VPiT model: a causal LLM, a frozen vision encoder, a bridge and a visual head.

    Example:
        >>> from vpit import VPiTConfig
        >>> config = VPiTConfig(text_config={"model_type": "llama", "hidden_size": 64}, num_visual_tokens=16)
        >>> config.num_visual_tokens
        16
    """

    model_type: ClassVar[str] = "vpit"
    sub_configs_defaults: ClassVar[dict[str, Any]] = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=VPiTVisionConfig),
    }

    text_config: dict | PreTrainedConfig | None = field(
        default=None,
        metadata={"help": "The LLM's config (a dict with model_type, a config object, or a Hub id / local path)."},
    )
    vision_config: dict | PreTrainedConfig | None = field(
        default=None, metadata={"help": "The vision encoder spec, see VPiTVisionConfig."}
    )
    text_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Where the LLM weights came from; written into the model card."}
    )
    num_visual_tokens: int = field(
        default=64, metadata={"help": "K, visual tokens per image after pooling the patch grid; a square number."}
    )
    pooling: str = field(
        default="bilinear", metadata={"help": "How the patch grid is pooled to k x k: 'bilinear' or 'avg'."}
    )
    normalize_visual_tokens: bool = field(
        default=True, metadata={"help": "L2-normalise each visual token (target and prediction) along Dv."}
    )
    bridge: str = field(
        default="mlp2x_gelu",
        metadata={
            "help": "Encoder -> LLM adapter of the prompt's images: token-wise 'linear' or 'mlpNx_gelu' (N Linear "
            "layers with GELU between) on the K pooled tokens, or a resampler of the patch tokens: 'perceiver' "
            "(Flamingo), 'qformer' (BLIP-2), 'qformer_instruct' (InstructBLIP), 'causal_query' (Emu, SEED)."
        },
    )
    bridge_options: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "A resampler's sizes (vpit.model.resamplers.RESAMPLER_DEFAULTS): width, depth, heads, and "
            "cross_attention_every for the Q-Formers."
        },
    )
    token_bridge: str = field(
        default="mlp2x_gelu",
        metadata={
            "help": "With a resampling bridge: the token-wise bridge ('linear', 'mlpNx_gelu') through which response "
            "images (teacher-forced, fed back one token at a time) and images given only as tokens enter."
        },
    )
    image_attention: str = field(
        default="causal",
        metadata={
            "help": "Attention among an input image's K slots: 'causal', or 'bidirectional' (Show-o, Transfusion: "
            "each prompt image's slots see each other, text and response images stay causal)."
        },
    )
    generation_mode: str = field(
        default="tokens",
        metadata={
            "help": "How a response image is made: 'tokens' (MetaMorph: the visual head predicts the K encoder "
            "tokens, which the decoder turns into pixels), or 'queries' (MetaQuery, NExT-GPT: N learned queries "
            "follow <image_start>, and a connector turns the LLM's hidden states at them into the decoder's "
            "condition; trained end to end through the diffusion loss by the `queries` stage)."
        },
    )
    num_queries: int = field(
        default=64,
        metadata={
            "help": "Q, the learned queries of the 'queries' generation mode (the slots of each image it makes)."
        },
    )
    connector: str = field(
        default="transformer",
        metadata={
            "help": "The 'queries' mode's connector from the query states to the decoder's condition: 'mlp' or "
            "'transformer' (vpit.model.connector)."
        },
    )
    connector_options: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "The connector's sizes (vpit.model.connector.CONNECTOR_DEFAULTS): width, depth, heads."},
    )
    condition_size: int | None = field(
        default=None,
        metadata={
            "help": "C, the width of the 'queries' mode's condition tokens (what the decoder's projector reads); "
            "None: the vision encoder's width Dv."
        },
    )
    visual_head: str = field(
        default="mlp",
        metadata={
            "help": "LLM -> visual token head: 'linear' (H->Dv), 'mlp' (Linear(H,H)-GELU-Linear(H,Dv)), or "
            "'diffusion' (MAR: a flow-matching denoiser conditioned on the hidden state samples each token)."
        },
    )
    visual_head_options: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Options of the 'diffusion' head (vpit.model.diffusion_head.DiffusionHead): width, depth, "
            "batch_mul, condition_dropout, and the sampling defaults steps, temperature, guidance_scale."
        },
    )
    visual_loss: str = field(
        default="cosine",
        metadata={
            "help": "The visual head's regression loss: 'cosine' (MetaMorph; predictions L2-normalised when the "
            "targets are), 'l2' (Emu / Emu2) or 'smooth_l1' (threshold visual_loss_beta); the last two regress the "
            "targets' values, so predictions are not normalised."
        },
    )
    visual_target: str = field(
        default="continuous",
        metadata={
            "help": "What the model predicts at an image slot: 'continuous' encoder tokens (the visual head), or "
            "'discrete' codes of a codebook fitted on the encoder's tokens (SEED, Chameleon, Emu3, LWM): code tokens "
            "in the vocabulary, trained with cross-entropy, their codebook vectors handed to the bridge and decoder. "
            "Set by `vpit codebook fit`, which fits the codebook and adds the codes."
        },
    )
    visual_codebook_size: int | None = field(
        default=None, metadata={"help": "C, the discrete codebook's entries; set by `vpit codebook fit`."}
    )
    visual_code_token_id: int | None = field(
        default=None, metadata={"help": "Id of code 0 (`<image_code_0>`); codes 0..C-1 are consecutive ids."}
    )
    visual_loss_beta: float = field(
        default=0.05, metadata={"help": "smooth_l1's threshold per feature (unit-norm tokens: ~1/sqrt(Dv) each)."}
    )
    visual_loss_weight: float = field(
        default=1.0,
        metadata={"help": "lambda_v in loss = lambda_t * text CE + lambda_v * visual loss over response visual slots."},
    )
    text_loss_weight: float = field(
        default=1.0, metadata={"help": "lambda_t, the text CE's weight (per-modality weights, as LWM uses)."}
    )
    image_start_token: str = field(default="<image_start>", metadata={"help": "Token opening an image span."})
    image_end_token: str = field(default="<image_end>", metadata={"help": "Token closing an image span."})
    image_token: str = field(
        default="<image>", metadata={"help": "Placeholder token of one visual slot; also the image marker in text."}
    )
    image_start_token_id: int | None = field(
        default=None, metadata={"help": "Looked up from the tokenizer at assembly; never set by hand."}
    )
    image_end_token_id: int | None = field(default=None, metadata={"help": "Looked up from the tokenizer."})
    image_token_id: int | None = field(default=None, metadata={"help": "Looked up from the tokenizer."})
    initializer_range: float = field(default=0.02, metadata={"help": "Std of the bridge and head initialisation."})
    tie_word_embeddings: bool = field(
        default=False, metadata={"help": "Mirrors the LLM's own setting; read from text_config."}
    )

    def __post_init__(self, **kwargs: Any) -> None:
        trust_remote_code = kwargs.pop("trust_remote_code", False)
        if isinstance(self.text_config, str):
            # A Hub id or local folder: read its config (no weights) so the composite is self-describing.
            self.text_model_name_or_path = self.text_model_name_or_path or self.text_config
            self.text_config = AutoConfig.from_pretrained(self.text_config, trust_remote_code=trust_remote_code)
        if isinstance(self.text_config, PreTrainedConfig) and "attn_implementation" not in kwargs:
            # The base class sets the backend on every sub-config; keep the one the LLM was loaded with.
            kwargs["attn_implementation"] = self.text_config._attn_implementation
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self._check()

    def _check(self) -> None:
        side = math.isqrt(self.num_visual_tokens) if self.num_visual_tokens > 0 else 0
        if side * side != self.num_visual_tokens or side == 0:
            nearest = max(1, round(math.sqrt(max(self.num_visual_tokens, 1)))) ** 2
            raise ValueError(
                f"num_visual_tokens must be a square number (the pooled grid is k x k), got "
                f"{self.num_visual_tokens}; the nearest square is {nearest}"
            )
        _one_of("pooling", self.pooling, POOLING_MODES)
        _one_of("image_attention", self.image_attention, IMAGE_ATTENTION)
        check_bridge(self.bridge)
        if self.token_bridge in RESAMPLERS:
            raise ValueError(
                f"token_bridge must be token-wise ('linear' or 'mlpNx_gelu'), got the resampler {self.token_bridge!r}"
            )
        check_bridge(self.token_bridge)
        if self.bridge_options and self.bridge not in RESAMPLERS:
            raise ValueError(f"bridge_options apply to the resamplers {list(RESAMPLERS)}; {self.bridge!r} takes none")
        if self.bridge in RESAMPLERS:
            resampler_options(self.bridge, self.bridge_options)  # unknown keys, bad sizes fail here
        _one_of("generation_mode", self.generation_mode, GENERATION_MODES)
        connector_options(self.connector, self.connector_options)  # unknown connector or keys, bad sizes fail here
        for name in ("num_queries", "condition_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.generation_mode == "queries" and self.visual_target == "discrete":
            raise ValueError("the 'queries' generation mode makes images through its connector; it has no codes")
        check_visual_head(self.visual_head)
        if self.visual_head in SAMPLING_HEADS and self.visual_loss != "cosine":
            raise ValueError(
                f"the {self.visual_head!r} head trains with its own (flow-matching) loss; visual_loss "
                f"{self.visual_loss!r} applies to the regression heads ('linear', 'mlp'): leave it at 'cosine'"
            )
        _one_of("visual_loss", self.visual_loss, VISUAL_LOSSES)
        _one_of("visual_target", self.visual_target, VISUAL_TARGETS)
        if self.visual_target == "discrete":
            if self.visual_head in SAMPLING_HEADS or self.visual_loss != "cosine":
                raise ValueError(
                    "a discrete visual target is predicted by the LM head's code rows and trained with cross-entropy; "
                    f"visual_head {self.visual_head!r} / visual_loss {self.visual_loss!r} apply to continuous targets"
                )
            if self.visual_codebook_size is None or self.visual_codebook_size < 2:
                raise ValueError(
                    f"visual_target 'discrete' needs a codebook of >= 2 entries, got {self.visual_codebook_size}; "
                    "fit one with `vpit codebook fit CARD --model DIR`"
                )
        for name in ("visual_loss_weight", "text_loss_weight"):
            weight = getattr(self, name)
            if not (weight >= 0 and math.isfinite(weight)):
                raise ValueError(f"{name} must be a finite number >= 0, got {weight}")
        if not (self.visual_loss_beta > 0 and math.isfinite(self.visual_loss_beta)):
            raise ValueError(f"visual_loss_beta must be a finite number > 0, got {self.visual_loss_beta}")
        tokens = [self.image_start_token, self.image_end_token, self.image_token]
        if any(not t or t.strip() != t for t in tokens) or len(set(tokens)) != 3:
            raise ValueError(
                "image_start_token, image_end_token and image_token must be three distinct non-empty strings "
                f"without surrounding whitespace, got {tokens}"
            )
        if getattr(self.text_config, "hidden_size", None) is None:
            raise ValueError(
                f"text_config ({type(self.text_config).__name__}) has no hidden_size; VPiT needs a causal LLM config"
            )

    def get_vision_config(self) -> VPiTVisionConfig:
        """The vision sub-config (typed; always a VPiTVisionConfig after construction)."""
        if not isinstance(self.vision_config, VPiTVisionConfig):
            raise TypeError(f"vision_config is a {type(self.vision_config).__name__}, expected VPiTVisionConfig")
        return self.vision_config

    @property
    def hidden_size(self) -> int:
        """The LLM's hidden size H (read by tools that size buffers from `config.hidden_size`, e.g. DeepSpeed's
        "auto" bucket sizes in accelerate)."""
        return int(self.get_text_config().hidden_size)


__all__ = [
    "GENERATION_MODES",
    "IMAGE_ATTENTION",
    "POOLING_MODES",
    "VISION_BACKENDS",
    "VISUAL_CODE_TOKEN",
    "VISUAL_TARGETS",
    "VPiTConfig",
    "VPiTVisionConfig",
]
