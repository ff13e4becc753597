"""Training recipes: YAML files with dotted command-line overrides, validated into dataclasses.

    python -m vpit.train recipes/toy/vpit.yaml optim.lr=1e-4 train.max_steps=200

Every section and key is a dataclass field with a default and help text; unknown keys are errors (a typo never
silently trains with a default). The resolved recipe is written into every checkpoint and the final folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

STAGES = ("bridge", "vpit")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelSection:
    """Where the model comes from: a saved VPiT folder, or an LLM + a vision encoder to assemble."""

    pretrained: str | None = _help("a saved VPiT folder to start from (e.g. the bridge stage's output)", default=None)
    llm: str | None = _help("Hub id or folder of the causal LLM to assemble with (when not `pretrained`)", default=None)
    vision: str = _help(
        "vision encoder: open_clip name / hf-hub: / local-dir:, or an HF id", default="ViT-SO400M-14-SigLIP-384"
    )
    vision_backend: str = _help("'open_clip' or 'hf'", default="open_clip")
    vision_pretrained: str | None = _help("open_clip pretrained tag or weights file", default=None)
    feature_layer: int = _help("encoder block giving the patch tokens (-1: last, before the final norm)", default=-1)
    num_visual_tokens: int = _help("K, visual tokens per image (a square)", default=64)
    pooling: str = _help("'bilinear' or 'avg'", default="bilinear")
    bridge: str = _help("'linear' or 'mlpNx_gelu'", default="mlp2x_gelu")
    visual_head: str = _help("'linear' or 'mlp'", default="mlp")
    visual_loss_weight: float = _help("lambda of the cosine loss", default=1.0)
    dtype: str | None = _help(
        "weights dtype: float32 / bfloat16 / float16 (mixed precision is train.mixed_precision)", default=None
    )
    attn_implementation: str = _help("'sdpa', 'eager' or 'flash_attention_2'", default="sdpa")
    trust_remote_code: bool = _help("allow model code from the Hub (off unless you set it)", default=False)

    def __post_init__(self) -> None:
        if (self.pretrained is None) == (self.llm is None):
            raise ValueError("model: give exactly one of `pretrained` (a VPiT folder) or `llm` (to assemble)")


@dataclass
class LoraSection:
    """LoRA on the LLM through peft (the bridge, head and image-token rows train in full)."""

    enabled: bool = _help("train LoRA adapters instead of the full LLM", default=False)
    r: int = _help("rank", default=16)
    alpha: int = _help("scaling numerator", default=32)
    dropout: float = _help("dropout on the LoRA input", default=0.05)
    target_modules: list[str] | None = _help("LLM Linear layer names; all of them when null", default=None)

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"lora: need r >= 1, alpha >= 1, 0 <= dropout < 1; got {self.r}, {self.alpha}, {self.dropout}"
            )


@dataclass
class FreezeSection:
    """What does not train. The vision encoder never trains."""

    llm: bool = _help(
        "freeze the LLM (bridge stage); the image-token rows still train unless new_token_rows", default=False
    )
    new_token_rows: bool = _help("freeze the image-token embedding / LM-head rows too", default=False)
    bridge: bool = _help("freeze the bridge", default=False)
    visual_head: bool = _help("freeze the visual head", default=False)


@dataclass
class DataSection:
    """The data mixture and how it is batched."""

    mixture: list[dict[str, Any]] = _help(
        "cards with weight / cap / location overrides (see data_cards/README.md)", default_factory=list
    )
    eval_mixture: list[dict[str, Any]] = _help(
        "held-out cards for periodic evaluation (train.eval_every)", default_factory=list
    )
    use_sample: bool = _help("train on each card's shipped sample data (smoke tests)", default=False)
    max_length: int = _help("token limit per sample; cut after the last image span, never through one", default=2048)
    batch_size: int = _help("samples drawn per batch per process (bad records make a batch smaller)", default=8)
    pack: bool = _help("pack samples into rows of max_length (position ids restart per sample)", default=False)
    num_workers: int = _help("DataLoader worker processes per training process", default=2)
    seed: int = _help("seed of the mixture sampler", default=0)
    max_skip_rate: float = _help("stop the run when more than this fraction of records is bad", default=0.01)
    min_records_for_skip_rate: int = _help("records seen before the skip rate is enforced", default=200)

    def __post_init__(self) -> None:
        if not self.mixture:
            raise ValueError("data.mixture must list at least one data card")
        if self.batch_size < 1 or self.max_length < 8 or self.num_workers < 0:
            raise ValueError("data: batch_size >= 1, max_length >= 8 and num_workers >= 0 are required")


@dataclass
class OptimSection:
    """AdamW with warm-up and a decay schedule; separate learning rates for the bridge and the head."""

    lr: float = _help("learning rate of the LLM (or its LoRA adapters)", default=2e-5)
    bridge_lr: float | None = _help("learning rate of the bridge (default: lr)", default=None)
    visual_head_lr: float | None = _help("learning rate of the visual head (default: bridge_lr, then lr)", default=None)
    weight_decay: float = _help("AdamW weight decay (not on biases, norms or embeddings)", default=0.0)
    betas: list[float] = _help("AdamW betas", default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = _help("linear warm-up steps", default=0)
    schedule: str = _help("'cosine', 'linear' or 'constant' after warm-up", default="cosine")
    max_grad_norm: float | None = _help("gradient clipping norm (null: none)", default=1.0)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", default=1)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.lr <= 0 or self.gradient_accumulation_steps < 1 or self.warmup_steps < 0:
            raise ValueError("optim: lr > 0, gradient_accumulation_steps >= 1 and warmup_steps >= 0 are required")


@dataclass
class TrainSection:
    """Length, precision, checkpoints and logging of the run."""

    output_dir: str = _help("the run folder: checkpoints, logs, skipped.jsonl, the final model", default="outputs/run")
    max_steps: int = _help("optimizer steps", default=1000)
    seed: int = _help("seed of model init and dropout", default=0)
    mixed_precision: str = _help("'no', 'bf16' or 'fp16' (bf16 needs a device that supports it)", default="no")
    gradient_checkpointing: bool = _help("recompute LLM activations in backward to save memory", default=False)
    checkpoint_every: int = _help("save a resumable checkpoint every N optimizer steps (0: never)", default=500)
    keep_checkpoints: int = _help("how many checkpoints to keep (oldest deleted first)", default=2)
    resume: str | None = _help("'auto' (latest checkpoint in output_dir), a checkpoint folder, or null", default="auto")
    log_every: int = _help("log losses every N steps", default=10)
    eval_every: int = _help("evaluate every N steps (0: never)", default=0)
    eval_samples: int = _help("held-out samples per evaluation", default=32)

    def __post_init__(self) -> None:
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"train.mixed_precision must be one of {list(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.max_steps < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ValueError("train: max_steps, keep_checkpoints and log_every must be >= 1")


@dataclass
class TrackingSection:
    """Experiment trackers, through accelerate."""

    report_to: list[str] = _help(
        "trackers: tensorboard (default), wandb, ... or [] for none", default_factory=lambda: ["tensorboard"]
    )
    project: str = _help("tracker project / run group name", default="vpit")


@dataclass
class HubSection:
    """Optional upload of the final model (with the recipe and final metrics in the card)."""

    push: bool = _help("push the final folder to the Hub", default=False)
    repo_id: str | None = _help("target repository", default=None)
    private: bool = _help("create the repository as private", default=True)
    license: str | None = _help("licence id for the model card", default=None)

    def __post_init__(self) -> None:
        if self.push and not self.repo_id:
            raise ValueError("hub.push needs hub.repo_id")


@dataclass
class Recipe:
    """A whole training run. `stage` picks the recipe: `bridge` (LLM frozen) or `vpit` (full or LoRA)."""

    stage: str
    model: ModelSection
    data: DataSection
    lora: LoraSection = field(default_factory=LoraSection)
    freeze: FreezeSection = field(default_factory=FreezeSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    hub: HubSection = field(default_factory=HubSection)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {self.stage!r}")
        if self.stage == "bridge" and (not self.freeze.llm or self.lora.enabled):
            raise ValueError("stage 'bridge' trains the bridge with the LLM frozen: set freeze.llm: true, no lora")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


T = TypeVar("T")


def _build(cls: type[T], data: Any, where: str) -> T:
    """Instantiate dataclass `cls` from a mapping, recursing into dataclass-typed fields."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = _SECTIONS.get(name) if cls is Recipe else None
        kwargs[name] = _build(sub, value, f"{where}.{name}" if where else name) if sub is not None else value
    try:
        return cls(**kwargs)
    except TypeError as err:  # a missing required key
        raise ValueError(f"{where or 'recipe'}: {err}") from err


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "lora": LoraSection,
    "freeze": FreezeSection,
    "optim": OptimSection,
    "train": TrainSection,
    "tracking": TrackingSection,
    "hub": HubSection,
}


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


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted overrides, validate.

    Raises:
        ValueError: unknown keys, missing required keys, or an invalid value (the message names it).
    """
    data = yaml.safe_load(Path(path).read_text()) or {}
    return recipe_from_dict(apply_overrides(data, overrides or []), str(path))


def recipe_from_dict(data: dict[str, Any], where: str = "") -> Recipe:
    try:
        return _build(Recipe, data, "")
    except ValueError as err:
        raise ValueError(f"{where}: {err}" if where else str(err)) from err


__all__ = ["Recipe", "apply_overrides", "load_recipe", "recipe_from_dict"]
