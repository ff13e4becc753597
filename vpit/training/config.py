"""Training recipes: YAML files with dotted command-line overrides, validated into one typed dataclass per stage.

    python -m vpit.train recipes/toy/vpit.yaml optim.lr=1e-4 train.max_steps=200

A recipe can start from another (`base: vpit.yaml`, relative to its folder) and state only what it changes.

`stage` picks the recipe class (`RECIPES`): `bridge` and `vpit` read an `InstructionRecipe`, `decoder` a
`DecoderRecipe`, `queries` a `QueriesRecipe`. Every section and key is a dataclass field with a default and help text; unknown keys, and
sections the stage does not use, are errors (a typo never silently trains with a default, and a `lora:` section
never sits ignored in a decoder recipe). The resolved recipe is written into every checkpoint and the final folder.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..errors import RecipeError

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")


def _help(text: str) -> dict[str, str]:
    """Field metadata: the one-line help of a recipe key."""
    return {"help": text}


@dataclass
class EncoderSection:
    """The frozen vision encoder: a saved VPiT folder's (`pretrained`), or a spec to build it from. Stage `decoder`
    reads this section; the instruction-tuning stages read `ModelSection`, which adds the LLM side."""

    pretrained: str | None = field(
        default=None,
        metadata=_help("a saved VPiT folder to start from (e.g. the bridge stage's output); it defines the encoder"),
    )
    vision: str = field(
        default="ViT-SO400M-14-SigLIP-384",
        metadata=_help("when not `pretrained`: open_clip name / hf-hub: / local-dir:, or an HF id"),
    )
    vision_backend: str = field(default="open_clip", metadata=_help("'open_clip' or 'hf'"))
    vision_pretrained: str | None = field(default=None, metadata=_help("open_clip pretrained tag or weights file"))
    feature_layer: int = field(
        default=-1, metadata=_help("encoder block giving the patch tokens (-1: last, before the final norm)")
    )
    num_visual_tokens: int | None = field(
        default=None,
        metadata=_help(
            "K, visual tokens per image (a square; 64 when building). With `pretrained`, the folder's config holds "
            "K: a value given here must equal it"
        ),
    )
    pooling: str | None = field(
        default=None, metadata=_help("'bilinear' (default) or 'avg'; with `pretrained`, must equal the folder's")
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("allow model code from the Hub (off unless you set it)")
    )


@dataclass
class ModelSection(EncoderSection):
    """Where the model comes from: a saved VPiT folder, or an LLM + a vision encoder to assemble."""

    llm: str | None = field(
        default=None, metadata=_help("Hub id or folder of the causal LLM to assemble with (when not `pretrained`)")
    )
    bridge: str | None = field(
        default=None,
        metadata=_help(
            "the prompt images' bridge: 'linear' or 'mlpNx_gelu' (mlp2x_gelu) token-wise, or a resampler of the "
            "patch tokens: 'perceiver', 'qformer', 'qformer_instruct', 'causal_query'; with `pretrained`, must "
            "equal the folder's"
        ),
    )
    bridge_options: dict[str, Any] | None = field(
        default=None,
        metadata=_help(
            "a resampler's width, depth, heads (and cross_attention_every for the Q-Formers); with `pretrained`, "
            "must equal the folder's"
        ),
    )
    token_bridge: str | None = field(
        default=None,
        metadata=_help(
            "with a resampler: the token-wise bridge of response images (mlp2x_gelu); with `pretrained`, must equal "
            "the folder's"
        ),
    )
    image_attention: str | None = field(
        default=None,
        metadata=_help(
            "'causal' (default) or 'bidirectional': each prompt image's slots attend to each other (Show-o, "
            "Transfusion); with `pretrained`, must equal the folder's"
        ),
    )
    visual_head: str | None = field(
        default=None,
        metadata=_help(
            "'linear', 'mlp' (default) or 'diffusion' (MAR's per-token denoiser); with `pretrained`, must equal the "
            "folder's"
        ),
    )
    visual_head_options: dict[str, Any] | None = field(
        default=None,
        metadata=_help(
            "the diffusion head's width, depth, batch_mul, condition_dropout and sampling defaults (steps, "
            "temperature, guidance_scale); with `pretrained`, must equal the folder's"
        ),
    )
    visual_target: str | None = field(
        default=None,
        metadata=_help(
            "'continuous' (default) or 'discrete' (codebook codes, SEED / Chameleon / Emu3): a folder that "
            "`vpit codebook fit` made discrete; with `pretrained`, must equal the folder's"
        ),
    )
    visual_loss: str | None = field(
        default=None,
        metadata=_help(
            "the visual head's loss: 'cosine' (MetaMorph, default), 'l2' (Emu, Emu2) or 'smooth_l1'; with "
            "`pretrained`, replaces the folder's"
        ),
    )
    visual_loss_beta: float | None = field(
        default=None,
        metadata=_help("smooth_l1's threshold per feature (0.05); with `pretrained`, replaces the folder's"),
    )
    visual_loss_weight: float | None = field(
        default=None, metadata=_help("lambda_v of the visual loss (1.0); with `pretrained`, replaces the folder's")
    )
    text_loss_weight: float | None = field(
        default=None, metadata=_help("lambda_t of the text CE (1.0); with `pretrained`, replaces the folder's")
    )
    initializer_range: float | None = field(
        default=None,
        metadata=_help("std of the new bridge and head weights when assembling (0.02, transformers' default)"),
    )
    dtype: str | None = field(
        default=None,
        metadata=_help("weights dtype: float32 / bfloat16 / float16 (mixed precision is train.mixed_precision)"),
    )
    attn_implementation: str = field(default="sdpa", metadata=_help("'sdpa', 'eager' or 'flash_attention_2'"))


@dataclass
class LoraSection:
    """LoRA on the LLM through peft (the bridge, head and image-token rows train in full)."""

    enabled: bool = field(default=False, metadata=_help("train LoRA adapters instead of the full LLM"))
    r: int = field(default=16, metadata=_help("rank"))
    alpha: int = field(default=32, metadata=_help("scaling numerator"))
    dropout: float = field(default=0.05, metadata=_help("dropout on the LoRA input"))
    target_modules: list[str] | None = field(
        default=None, metadata=_help("LLM Linear layer names; all of them when null")
    )

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"lora: need r >= 1, alpha >= 1, 0 <= dropout < 1; got {self.r}, {self.alpha}, {self.dropout}"
            )


@dataclass
class FreezeSection:
    """What does not train. The vision encoder never trains."""

    llm: bool = field(
        default=False,
        metadata=_help("freeze the LLM (bridge stage); the image-token rows still train unless new_token_rows"),
    )
    new_token_rows: bool = field(default=False, metadata=_help("freeze the image-token embedding / LM-head rows too"))
    bridge: bool = field(default=False, metadata=_help("freeze the bridge"))
    visual_head: bool = field(default=False, metadata=_help("freeze the visual head"))


@dataclass
class DataSection:
    """The data mixture and how it is batched."""

    mixture: list[dict[str, Any]] = field(
        default_factory=list, metadata=_help("cards with weight / cap / location overrides (see data_cards/README.md)")
    )
    eval_mixture: list[dict[str, Any]] = field(
        default_factory=list, metadata=_help("held-out cards for periodic evaluation (train.eval_every)")
    )
    use_sample: bool = field(default=False, metadata=_help("train on each card's shipped sample data (smoke tests)"))
    use_features: bool = field(
        default=True,
        metadata=_help(
            "read a card's cached encoder tokens (`vpit data cache-features`) instead of its images when a cache "
            "for this model's encoder exists"
        ),
    )
    max_length: int = field(
        default=2048, metadata=_help("token limit per sample; cut after the last image span, never through one")
    )
    batch_size: int = field(
        default=8, metadata=_help("samples drawn per batch per process (bad records make a batch smaller)")
    )
    pack: bool = field(
        default=False, metadata=_help("pack samples into rows of max_length (position ids restart per sample)")
    )
    num_workers: int = field(default=2, metadata=_help("DataLoader worker processes per training process"))
    seed: int = field(default=0, metadata=_help("seed of the mixture sampler"))
    max_skip_rate: float = field(
        default=0.01, metadata=_help("stop the run when more than this fraction of records is bad")
    )
    min_records_for_skip_rate: int = field(default=200, metadata=_help("records seen before the skip rate is enforced"))

    def __post_init__(self) -> None:
        if not self.mixture:
            raise ValueError("data.mixture must list at least one data card")
        if self.batch_size < 1 or self.max_length < 8 or self.num_workers < 0:
            raise ValueError("data: batch_size >= 1, max_length >= 8 and num_workers >= 0 are required")


@dataclass
class OptimSection:
    """AdamW with warm-up and a decay schedule; separate learning rates for the bridge and the head."""

    lr: float = field(default=2e-5, metadata=_help("learning rate of the LLM (or its LoRA adapters)"))
    bridge_lr: float | None = field(default=None, metadata=_help("learning rate of the bridge (default: lr)"))
    visual_head_lr: float | None = field(
        default=None, metadata=_help("learning rate of the visual head (default: bridge_lr, then lr)")
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (not on biases, norms or embeddings)"))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=_help("AdamW betas"))
    warmup_steps: int = field(default=0, metadata=_help("linear warm-up steps"))
    schedule: str = field(default="cosine", metadata=_help("'cosine', 'linear' or 'constant' after warm-up"))
    max_grad_norm: float | None = field(default=1.0, metadata=_help("gradient clipping norm (null: none)"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("micro-batches per optimizer step"))

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.lr <= 0 or self.gradient_accumulation_steps < 1 or self.warmup_steps < 0:
            raise ValueError("optim: lr > 0, gradient_accumulation_steps >= 1 and warmup_steps >= 0 are required")


@dataclass
class TrainSection:
    """Length, precision, checkpoints and logging of the run."""

    output_dir: str = field(
        default="outputs/run", metadata=_help("the run folder: checkpoints, logs, skipped.jsonl, the final model")
    )
    max_steps: int = field(default=1000, metadata=_help("optimizer steps"))
    seed: int = field(default=0, metadata=_help("seed of model init and dropout"))
    torch_threads: int | None = field(
        default=None,
        metadata=_help(
            "CPU threads of torch (torch.set_num_threads); null: torch's default. On a small shared CPU, 1 thread "
            "next to one data worker is fastest (the toy recipes set it)"
        ),
    )
    mixed_precision: str = field(
        default="no", metadata=_help("'no', 'bf16' or 'fp16' (bf16 needs a device that supports it)")
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("recompute LLM activations in backward to save memory")
    )
    fused_cross_entropy: bool | None = field(
        default=None,
        metadata=_help(
            "the text loss through Liger's fused linear cross-entropy (no logits stored): null = when it can run "
            "(CUDA, liger-kernel installed, unsharded weights), true = required, false = never"
        ),
    )
    z_loss: float = field(
        default=0.0,
        metadata=_help(
            "weight of Chameleon's z-loss, log(Z)^2 of the text logits at labelled positions (1e-5 to 1e-4 usual; "
            "0: off)"
        ),
    )
    checkpoint_every: int = field(
        default=500, metadata=_help("save a resumable checkpoint every N optimizer steps (0: never)")
    )
    keep_checkpoints: int = field(default=2, metadata=_help("how many checkpoints to keep (oldest deleted first)"))
    resume: str | None = field(
        default="auto", metadata=_help("'auto' (latest checkpoint in output_dir), a checkpoint folder, or null")
    )
    log_every: int = field(default=10, metadata=_help("log losses every N steps"))
    eval_every: int = field(default=0, metadata=_help("evaluate every N steps (0: never)"))
    eval_decoder: str | None = field(
        default=None,
        metadata=_help("a saved VPiT decoder folder: evaluations then also save a grid of generated images"),
    )
    eval_samples: int = field(default=32, metadata=_help("held-out samples per evaluation"))

    def __post_init__(self) -> None:
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"train.mixed_precision must be one of {list(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.max_steps < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ValueError("train: max_steps, keep_checkpoints and log_every must be >= 1")
        if not self.z_loss >= 0:
            raise ValueError(f"train.z_loss is a weight >= 0, got {self.z_loss}")


@dataclass
class TrackingSection:
    """Experiment trackers, through accelerate."""

    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata=_help("trackers: tensorboard (default), wandb, ... or [] for none"),
    )
    project: str = field(default="vpit", metadata=_help("tracker project / run group name"))


@dataclass
class HubSection:
    """Optional upload of the final model (with the recipe and final metrics in the card)."""

    push: bool = field(default=False, metadata=_help("push the final folder to the Hub"))
    repo_id: str | None = field(default=None, metadata=_help("target repository"))
    private: bool = field(default=True, metadata=_help("create the repository as private"))
    license: str | None = field(default=None, metadata=_help("licence id for the model card"))

    def __post_init__(self) -> None:
        if self.push and not self.repo_id:
            raise ValueError("hub.push needs hub.repo_id")


@dataclass
class DecoderSection:
    """The diffusion decoder stage: what it starts from and how it is trained (stage `decoder`)."""

    init: str = field(
        default="toy",
        metadata=_help(
            "'toy' (small latent UNet + toy VAE from configs), a Stable Diffusion 1.x folder / Hub id (keeps its "
            "UNet, VAE and scheduler), or a saved VPiT decoder folder to continue"
        ),
    )
    latent: bool = field(default=True, metadata=_help("toy init: latent diffusion (True) or pixel space"))
    vae: str | None = field(
        default=None,
        metadata=_help("toy init: a trained AutoencoderKL folder with 8x8x4 latents (the toy world's); null: random"),
    )
    projector_type: str = field(default="mlp", metadata=_help("'mlp' (LayerNorm MLP) or 'query' (cross-attention)"))
    projector_hidden_size: int = field(default=2048, metadata=_help("projector hidden width (MetaMorph: 2048)"))
    spatial_channels: int = field(
        default=0,
        metadata=_help(
            "C > 0: also lay the tokens on their grid, projected to C channels and concatenated to the UNet's input "
            "(a pretrained UNet's conv_in is widened with zero weights); 0: cross-attention only (MetaMorph)"
        ),
    )
    resolution: int | None = field(default=None, metadata=_help("training image side; default: the UNet's output size"))
    condition_dropout: float = field(
        default=0.7, metadata=_help("probability of the zero condition (classifier-free guidance; MetaMorph 0.7-0.8)")
    )
    prediction_type: str = field(
        default="epsilon",
        metadata=_help(
            "'epsilon', 'v_prediction', 'sample' (DDPM noise schedule) or 'flow_prediction' (rectified flow as in SD3 "
            "/ Sana: x_t = (1 - sigma) x0 + sigma noise, the UNet predicts noise - x0; sampled by DPM-Solver++ on "
            "flow sigmas)"
        ),
    )
    snr_gamma: float | None = field(
        default=None, metadata=_help("min-SNR-gamma loss weighting (5.0 usual; DDPM types only); null: off")
    )
    flow_shift: float = field(
        default=1.0,
        metadata=_help(
            "flow_prediction: sigma -> shift sigma / (1 + (shift - 1) sigma) in training and sampling, > 1 spends "
            "more of both at high noise (SD3: 3.0 at 1024 px)"
        ),
    )
    timestep_sampling: str = field(
        default="uniform",
        metadata=_help(
            "flow_prediction: how training draws sigma, 'uniform', 'logit_normal' (SD3) or 'mode' "
            "(diffusers' compute_density_for_timestep_sampling)"
        ),
    )
    logit_mean: float = field(default=0.0, metadata=_help("timestep_sampling logit_normal: the normal's mean"))
    logit_std: float = field(default=1.0, metadata=_help("timestep_sampling logit_normal: the normal's std"))
    mode_scale: float = field(default=1.29, metadata=_help("timestep_sampling mode: its scale (SD3: 1.29)"))
    noise_offset: float = field(default=0.0, metadata=_help("noise offset (0.05-0.1 for brighter/darker images)"))
    token_noise: float = field(
        default=0.0,
        metadata=_help(
            "std of Gaussian noise on the visual tokens in training (robustness to predicted tokens); 0: off"
        ),
    )
    predicted_tokens_from: str | None = field(
        default=None,
        metadata=_help(
            "a trained VPiT model folder: its own predicted visual tokens for the generation records' prompts, paired "
            "with the records' images, condition the decoder too (what it decodes at generation time, not only the "
            "encoder's exact tokens); null: encoder tokens only"
        ),
    )
    predicted_tokens_mode: str = field(
        default="generated",
        metadata=_help(
            "'generated': the tokens the model generates from the prompt alone (what generation feeds the decoder); "
            "'teacher_forced': its predictions with the true image tokens as context"
        ),
    )
    predicted_tokens_fraction: float = field(
        default=0.5,
        metadata=_help("share of the images with a prediction that are conditioned on it (the rest: encoder tokens)"),
    )
    predicted_tokens_max_records: int | None = field(
        default=None,
        metadata=_help(
            "predict for the first N generation records only (all are held in memory: at MetaMorph's 64 x 1152 "
            "tokens, 295 KB each); null: every record"
        ),
    )
    cache_frozen: bool = field(
        default=False,
        metadata=_help(
            "encode every training image with the frozen vision encoder and VAE once (tokens and posterior moments, "
            "safetensors keyed by image, resumable) and train from those: the same samples, without the two forward "
            "passes per step; needs every image to be a file or bytes"
        ),
    )
    frozen_cache_dir: str | None = field(
        default=None,
        metadata=_help(
            "where cache_frozen keeps them; null: RUN/frozen_cache. Runs with the same encoder and VAE (checked by a "
            "fingerprint of their configs and weights) can share one, as a decoder continued on predicted tokens"
        ),
    )
    ema_decay: float | None = field(default=0.9999, metadata=_help("EMA of UNet + projector; null: no EMA"))
    validation_images: int = field(default=4, metadata=_help("held-out images in each reconstruction grid"))
    validation_steps: int = field(default=25, metadata=_help("denoising steps of the reconstruction grid"))
    guidance_scale: float = field(default=3.0, metadata=_help("guidance scale of the reconstruction grid"))

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction", "sample", "flow_prediction"):
            raise ValueError(
                "decoder.prediction_type must be epsilon, v_prediction, sample or flow_prediction, got "
                f"{self.prediction_type!r}"
            )
        flow = self.prediction_type == "flow_prediction"
        if flow and self.snr_gamma is not None:
            raise ValueError(
                "decoder.snr_gamma (min-SNR weighting) is for the DDPM noise schedule; flow_prediction weighs by "
                "decoder.timestep_sampling instead: set decoder.snr_gamma=null"
            )
        if self.timestep_sampling not in ("uniform", "logit_normal", "mode"):
            raise ValueError(
                f"decoder.timestep_sampling must be uniform, logit_normal or mode, got {self.timestep_sampling!r}"
            )
        if not flow and (self.timestep_sampling != "uniform" or self.flow_shift != 1.0):
            raise ValueError(
                "decoder.timestep_sampling and decoder.flow_shift shape a flow_prediction decoder's training; with "
                f"prediction_type {self.prediction_type!r} leave them at uniform and 1.0"
            )
        if self.flow_shift <= 0 or self.logit_std <= 0:
            raise ValueError(
                f"decoder.flow_shift and decoder.logit_std must be > 0, got {self.flow_shift} and {self.logit_std}"
            )
        if not 0 <= self.condition_dropout <= 1:
            raise ValueError(f"decoder.condition_dropout is a probability, got {self.condition_dropout}")
        if self.projector_type not in ("mlp", "query"):
            raise ValueError(f"decoder.projector_type must be 'mlp' or 'query', got {self.projector_type!r}")
        if self.token_noise < 0:
            raise ValueError(f"decoder.token_noise must be >= 0, got {self.token_noise}")
        if self.spatial_channels < 0:
            raise ValueError(f"decoder.spatial_channels must be >= 0, got {self.spatial_channels}")
        if self.predicted_tokens_mode not in ("generated", "teacher_forced"):
            raise ValueError(
                f"decoder.predicted_tokens_mode must be generated or teacher_forced, got {self.predicted_tokens_mode!r}"
            )
        if not 0 <= self.predicted_tokens_fraction <= 1:
            raise ValueError(
                f"decoder.predicted_tokens_fraction is a probability, got {self.predicted_tokens_fraction}"
            )


@dataclass
class QueriesSection:
    """The 'queries' generation mode (stage `queries`, MetaQuery / NExT-GPT): Q learned queries after
    `<image_start>`, a connector from their hidden states to the decoder's condition, trained end to end through
    the decoder's diffusion loss."""

    num_queries: int = field(default=64, metadata=_help("Q, learned queries per image (MetaQuery: 64-256)"))
    connector: str = field(default="transformer", metadata=_help("'transformer' (MetaQuery) or 'mlp'"))
    connector_options: dict[str, Any] | None = field(
        default=None, metadata=_help("the connector's width, depth, heads (vpit.model.connector.CONNECTOR_DEFAULTS)")
    )
    condition_size: int | None = field(
        default=None,
        metadata=_help("C, each condition token's width: the decoder projector's input; null: the encoder's Dv"),
    )
    align_loss_weight: float = field(
        default=0.0,
        metadata=_help(
            "weight of NExT-GPT's condition alignment: 1 - cos between each condition token and the target image's "
            "encoder token (the decoder's native condition, through the frozen vision encoder), beside the diffusion "
            "loss; needs Q = K and C = Dv. 0: the diffusion loss alone (MetaQuery)"
        ),
    )
    train_unet: bool = field(
        default=True, metadata=_help("train the decoder's UNet with the connector (false: the projector only)")
    )
    decoder_lr: float | None = field(
        default=None, metadata=_help("learning rate of the decoder's UNet and projector; null: optim.lr")
    )

    def __post_init__(self) -> None:
        if isinstance(self.num_queries, bool) or not isinstance(self.num_queries, int) or self.num_queries < 1:
            raise ValueError(f"queries.num_queries must be a positive int, got {self.num_queries!r}")
        if not (self.align_loss_weight >= 0 and math.isfinite(self.align_loss_weight)):
            raise ValueError(f"queries.align_loss_weight must be a finite number >= 0, got {self.align_loss_weight}")


@dataclass(kw_only=True)
class Recipe:
    """The sections every stage has. A stage's own recipe class adds the sections it uses (see `RECIPES`)."""

    stage: str = field(metadata=_help("which stage runs: bridge, vpit, decoder or queries"))
    data: DataSection = field(metadata=_help("the data mixture and batching"))
    optim: OptimSection = field(default_factory=OptimSection, metadata=_help("optimizer and schedule"))
    train: TrainSection = field(default_factory=TrainSection, metadata=_help("length, precision, checkpoints"))
    tracking: TrackingSection = field(default_factory=TrackingSection, metadata=_help("experiment trackers"))
    hub: HubSection = field(default_factory=HubSection, metadata=_help("upload of the final folder"))

    def __post_init__(self) -> None:
        expected = [name for name, cls in RECIPES.items() if cls is type(self)]
        if self.stage not in expected:
            raise ValueError(f"a {type(self).__name__} is for stage {expected}, got stage {self.stage!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class InstructionRecipe(Recipe):
    """Stages `bridge` (LLM frozen; the bridge and image-token rows train) and `vpit` (LLM full or LoRA, bridge and
    visual head)."""

    model: ModelSection = field(metadata=_help("where the model comes from"))
    lora: LoraSection = field(default_factory=LoraSection, metadata=_help("LoRA on the LLM"))
    freeze: FreezeSection = field(default_factory=FreezeSection, metadata=_help("what does not train"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.model.pretrained is None) == (self.model.llm is None):
            raise ValueError("model: give exactly one of `pretrained` (a VPiT folder) or `llm` (to assemble)")
        if self.stage == "bridge" and (not self.freeze.llm or self.lora.enabled):
            raise ValueError("stage 'bridge' trains the bridge with the LLM frozen: set freeze.llm: true, no lora")
        if self.stage == "bridge" and not self.freeze.visual_head:
            # Understanding data gives the head no gradient; left trainable, weight decay would shrink it silently.
            raise ValueError(
                "stage 'bridge' does not train the visual head (stage 'vpit' does): set freeze.visual_head: true"
            )


@dataclass(kw_only=True)
class DecoderRecipe(Recipe):
    """Stage `decoder`: the diffusion decoder, trained on images alone through the frozen vision encoder."""

    model: EncoderSection = field(metadata=_help("the frozen vision encoder that defines the visual tokens"))
    decoder: DecoderSection = field(default_factory=DecoderSection, metadata=_help("the decoder and its training"))


@dataclass(kw_only=True)
class QueriesRecipe(InstructionRecipe):
    """Stage `queries` (an alternative to `vpit` + `decoder`): the learned queries, the connector and the decoder
    trained end to end through the diffusion loss, from a bridge- or VPiT-stage model (`model.pretrained`) and a
    decoder (`decoder.init`); the LLM frozen (`freeze.llm`), LoRA, or full."""

    decoder: DecoderSection = field(default_factory=DecoderSection, metadata=_help("the decoder and its training"))
    queries: QueriesSection = field(default_factory=QueriesSection, metadata=_help("the queries and the connector"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.pretrained is None:
            raise ValueError(
                "stage 'queries' continues a trained model: set model.pretrained to a bridge- or vpit-stage folder"
            )
        if self.decoder.predicted_tokens_from is not None:
            raise ValueError("decoder.predicted_tokens_from is the decoder stage's; the queries stage trains on the "
                             "language model's own query states already")  # fmt: skip


# stage name -> its recipe class; `vpit.training.stages.STAGES` maps the same names to the code that runs them.
RECIPES: dict[str, type[Recipe]] = {
    "bridge": InstructionRecipe,
    "vpit": InstructionRecipe,
    "decoder": DecoderRecipe,
    "queries": QueriesRecipe,
}


def check_against_config(section: Any, config: Any, keys: tuple[str, ...], where: str) -> None:
    """The saved folder's config is the one home of its architecture: a recipe key given next to `pretrained` must
    agree with it, never silently lose to it.

    Raises:
        ValueError: naming the key, the recipe's value and the folder's.
    """
    for key in keys:
        given = getattr(section, key)
        if given is not None and given != getattr(config, key):
            raise ValueError(
                f"model.{key} is {given!r} but {where} was saved with {key}={getattr(config, key)!r}; drop the key "
                "(the folder defines it) or start from a folder that has it"
            )


T = TypeVar("T")


def _build(cls: type[T], data: Any, where: str) -> T:
    """Instantiate dataclass `cls` from a mapping, recursing into dataclass-typed fields."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown and issubclass(cls, Recipe):
        raise ValueError(
            f"unknown keys {unknown}: stage {data.get('stage')!r} ({cls.__name__}) does not use them; its sections "
            f"are {sorted(set(fields) - {'stage'})}"
        )
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        sub = hints[name] if dataclasses.is_dataclass(hints[name]) else None
        kwargs[name] = _build(sub, value, key) if sub is not None else _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a missing required key
        raise ValueError(f"{where or 'recipe'}: {err}") from err


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Numbers as the field declares them: YAML reads `3e-4` as a string and `1` as an int."""
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None or not ({float, int} & set(allowed)) or isinstance(value, bool):
        return value
    if float in allowed and isinstance(value, (int, str)):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key} must be a number, got {value!r}") from None
    if int in allowed and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key} must be an integer, got {value!r}") from None
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML: numbers, booleans, lists, null)."""
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} must look like section.key=value")
        dotted, raw = override.split("=", 1)
        keys = dotted.split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` over `base`, section by section; a value that is not a mapping (lists included) replaces."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_recipe_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file as a mapping, with its `base:` resolved: `base: vpit.yaml` (relative to the file's folder)
    reads that recipe first and applies this file's keys over it, so a variant states only what it changes."""
    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise RecipeError(f"recipe bases form a cycle: {chain}")
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file (the recipes vpit ships are under recipes/)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base must name one recipe file, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise RecipeError(f"{path}: base recipe {base_path} does not exist")
    return _merge(read_recipe_file(base_path, (*_seen, path.resolve())), data)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (and its `base:` chain), apply dotted overrides, validate.

    Raises:
        RecipeError: a missing file, unknown keys, missing required keys, or an invalid value (the message names it).
    """
    data = read_recipe_file(path)
    try:
        data = apply_overrides(data, overrides or [])
    except ValueError as err:
        raise RecipeError(str(err)) from err
    return recipe_from_dict(data, str(path))


def recipe_from_dict(data: dict[str, Any], where: str = "") -> Recipe:
    """Validate a recipe mapping into the recipe class of its `stage`."""
    try:
        stage = data.get("stage") if isinstance(data, dict) else None
        if stage not in RECIPES:
            raise ValueError(f"stage must be one of {list(RECIPES)}, got {stage!r}")
        return _build(RECIPES[stage], data, "")
    except ValueError as err:
        raise RecipeError(f"{where}: {err}" if where else str(err)) from err


__all__ = [
    "RECIPES",
    "DecoderRecipe",
    "InstructionRecipe",
    "Recipe",
    "apply_overrides",
    "check_against_config",
    "load_recipe",
    "read_recipe_file",
    "recipe_from_dict",
]
