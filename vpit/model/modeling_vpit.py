"""VPiTForCausalLM: a pretrained causal LLM that reads and predicts continuous visual tokens (MetaMorph, VPiT).

    image -> VisionEncoder (frozen) -> z (I, K, Dv) --bridge--> (I, K, H) spliced at the <image> slots
    text  -> embeddings (B, T, H) ----------------------------------^
                                  LLM -> h (B, T, H) -> LM head -> text CE on labelled tokens
                                                     -> visual head -> normalise -> cosine loss on response slots

A discrete model (`visual_target: discrete`) predicts instead the code of each response slot's token in a fitted
codebook, with the LM head's code rows and cross-entropy, and reads the codebook vectors of response images.

Dimension letters: see `vpit.model.configuration_vpit`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .adapters import VisualHead, build_bridge, build_visual_head
from .codebook import nearest_codes
from .configuration_vpit import VISUAL_CODE_TOKEN, VPiTConfig
from .connector import QueryConnector
from .diffusion_head import DiffusionHead
from .losses import (
    IGNORE_INDEX,
    fused_cross_entropy_available,
    fused_text_loss,
    labelled_positions,
    mean_over_items,
    text_and_z_loss,
    text_loss,
    visual_loss,
)
from .processing_vpit import token_id
from .resamplers import RESAMPLERS, Resampler, build_resampler
from .vision import VisionEncoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class VPiTCausalLMOutput(ModelOutput):
    """Output of `VPiTForCausalLM.forward`; every loss term is returned separately.

    Args:
        loss: text_loss_weight * text_loss + visual_loss_weight * visual_loss (+ z_loss_weight * z_loss), when
            labels are given.
        text_loss: next-token CE over labelled tokens (response text and image boundary tokens).
        visual_loss: the `config.visual_loss` (mean 1 - cos by default) over response visual slots; exactly 0 when
            the batch has none.
        z_loss: the squared log-partition of the text logits (`vpit.model.losses.text_and_z_loss`), when the model's
            `z_loss_weight` is above 0.
        logits: (B, T, V); None when the forward was asked for the loss only (`return_logits=False`).
        visual_predictions: (M, Dv) head outputs (normalised if configured) for the M response slots.
        visual_targets: (M, Dv) the encoder tokens they were trained towards.
        past_key_values / hidden_states / attentions: as returned by the LLM.
    """

    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    visual_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    visual_predictions: torch.Tensor | None = None
    visual_targets: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return weight


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """A parameter's logical shape, also when DeepSpeed ZeRO-3 has partitioned it (its `.shape` is then empty)."""
    return getattr(tensor, "ds_shape", tensor.shape)


def gathered_for_write(params: list[torch.Tensor]) -> contextlib.AbstractContextManager[Any]:
    """Gather ZeRO-3-partitioned parameters so that rank 0 can write to them (broadcast to all on exit);
    a no-op for ordinary parameters. Models built under an accelerate ZeRO-3 config are partitioned at
    construction (transformers' `from_pretrained` uses `deepspeed.zero.Init`)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def response_slot_mask(
    input_ids: torch.Tensor, labels: torch.Tensor, image_start_token_id: int, image_token_id: int
) -> torch.Tensor:
    """(B, T) bool: the image slots whose image belongs to a response, i.e. whose `<image_start>` is labelled.

    The one rule for which images are targets: prompt images have their boundary tokens masked (-100), response
    images keep them as CE targets. The data pipeline and the model both ask here.
    """
    batch, length = input_ids.shape
    is_start = input_ids == image_start_token_id
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    # Position of the latest <image_start> at or before each t (-1 if none): a running max.
    last_start = torch.where(is_start, positions, -1).cummax(dim=1).values  # (B, T)
    start_labelled = is_start & (labels != IGNORE_INDEX)
    in_response = start_labelled.gather(1, last_start.clamp(min=0)) & (last_start >= 0)
    return (input_ids == image_token_id) & in_response


MAX_INSTRUCTION_TOKENS = 128  # a qformer_instruct bridge's instruction, as InstructBLIP's max_txt_len


class VPiTPreTrainedModel(PreTrainedModel):
    config: VPiTConfig
    config_class = VPiTConfig
    base_model_prefix = "vpit"
    input_modalities = ["image", "text"]  # noqa: RUF012 (an instance attribute upstream)
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]  # noqa: RUF012 (an instance attribute upstream)
    # Kept whole by device maps, and each sharded as one unit by FSDP2 (accelerate wraps these classes; the LLM's
    # decoder layers join from its own list): every module that evaluation and generation call directly gathers
    # its own weights, on every rank.
    # A model with a diffusion head names `DiffusionHead` instead of `VisualHead` (set per instance in __init__:
    # accelerate's FSDP wrap fails on a listed class the model does not contain).
    _no_split_modules = ["VisionEncoder", "Bridge", "VisualHead"]  # noqa: RUF012 (an instance attribute upstream)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # The LLM (a PreTrainedModel) and an HF vision tower are initialised by their own `_init_weights`; an
        # open_clip tower initialises itself when built. Only the Linear layers of the bridge and visual head are ours:
        # N(0, initializer_range) weights and zero biases, as transformers initialises its own projectors.
        adapters = [getattr(self, name, None) for name in ("bridge", "token_bridge", "visual_head", "connector")]
        ours = {id(m) for part in adapters if part is not None for m in part.modules()}
        if isinstance(module, nn.Linear) and id(module) in ours:
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        if isinstance(module, QueryConnector):  # the queries start among the LLM's own input embeddings
            module.init_queries(_weight(self.get_input_embeddings()))
        if isinstance(module, DiffusionHead):  # `apply` reaches it after its layers: adaLN-Zero over the N(0, std)
            for layer in module.zero_initialised():
                init.zeros_(layer.weight)
                init.zeros_(layer.bias)


class VPiTForCausalLM(VPiTPreTrainedModel):
    """A causal LLM + frozen vision encoder + bridge + visual head, trained with text CE and a cosine loss.

    Build one from pretrained parts with `vpit.assemble(...)`; reload a saved one with `from_pretrained(folder)`.

    Example:
        >>> model, processor = vpit.assemble("meta-llama/Llama-3.1-8B-Instruct", "ViT-SO400M-14-SigLIP-384",
        ...                                  vision_pretrained="webli")
        >>> batch = processor.apply_chat_template(
        ...     [{"role": "user", "content": "<image> Describe the image."},
        ...      {"role": "assistant", "content": "A red square on white."}],
        ...     images=[image], tokenize=True)
        >>> out = model(**batch)
        >>> out.loss, out.text_loss, out.visual_loss
    """

    visual_codebook: torch.Tensor  # (C, Dv), a buffer of discrete models only

    def __init__(
        self,
        config: VPiTConfig,
        language_model: PreTrainedModel | None = None,
        vision_tower: nn.Module | None = None,
    ):
        super().__init__(config)
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        self.vision_tower = VisionEncoder(
            config.get_vision_config(),
            config.num_visual_tokens,
            pooling=config.pooling,
            normalize=config.normalize_visual_tokens,
            tower=vision_tower,
        )
        hidden, vision = config.get_text_config().hidden_size, self.vision_tower.hidden_size
        # `bridge` reads the prompt's images; with a resampler, response images (and images given only as tokens)
        # enter through `token_bridge`, token-wise, which is the same module as `bridge` otherwise.
        self.token_bridge: nn.Module | None = None
        if config.bridge in RESAMPLERS:
            self.bridge: nn.Module = build_resampler(
                config.bridge, vision, hidden, config.num_visual_tokens, config.bridge_options
            )
            self.token_bridge = build_bridge(config.token_bridge, vision, hidden)
        else:
            self.bridge = build_bridge(config.bridge, vision, hidden)
        split = ["VisionEncoder", "Bridge", *([type(self.bridge).__name__] if self.token_bridge is not None else [])]
        if config.visual_target == "discrete":
            # The LM head's code rows predict the codes: no visual head (an empty one keeps the attribute).
            assert config.visual_codebook_size is not None  # VPiTConfig checks it
            self.visual_head: nn.Module = VisualHead()
            self.register_buffer("visual_codebook", torch.zeros(config.visual_codebook_size, vision))
            self._no_split_modules = split
        else:
            self.visual_head = build_visual_head(config.visual_head, hidden, vision, config.visual_head_options)
            self._no_split_modules = [*split, type(self.visual_head).__name__]
        # The 'queries' generation mode: Q learned queries and the connector to the decoder's condition.
        self.connector: QueryConnector | None = None
        if config.generation_mode == "queries":
            self.connector = self._build_connector()
            self._no_split_modules = [*self._no_split_modules, "QueryConnector"]
        self.post_init()
        # transformers 5 initialises weights in `from_pretrained` (for missing keys) or `init_weights()`, not in
        # `post_init`: the new bridge and head are initialised here (loaded weights are flagged and left alone).
        for part in self.adapters():
            part.apply(self._init_weights)
        # Liger's fused linear cross-entropy for the training loss: None = when it can run (`uses_fused_cross_entropy`),
        # False = never, True = required. A run setting, not architecture: not in the config.
        self.fused_cross_entropy: bool | None = None
        # Chameleon's z-loss weight (`train.z_loss`), 0: off. Also a run setting.
        self.z_loss_weight: float = 0.0

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> VPiTForCausalLM:
        """`PreTrainedModel.from_pretrained`, then re-freeze the encoder (loading swaps in fresh Parameters,
        which would otherwise come back with requires_grad=True)."""
        model = super().from_pretrained(*args, **kwargs)
        model.vision_tower.freeze()
        return model

    @classmethod
    def load_vision_encoder(cls, pretrained: str | Path, **hub_kwargs: Any) -> VisionEncoder:
        """The frozen vision encoder of a saved VPiT folder (or Hub repo) alone: its config and its `vision_tower.*`
        weights, without building or reading the language model (what the decoder stage trains from).

        Raises:
            ValueError: when the folder holds no vision-tower weights.
        """
        from safetensors import safe_open
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

        config = VPiTConfig.from_pretrained(pretrained, **hub_kwargs)
        index = cached_file(str(pretrained), SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False)
        if index is not None:  # sharded: only the shards that hold the tower
            weight_map: dict[str, str] = json.loads(Path(index).read_text())["weight_map"]
            files = sorted({f for key, f in weight_map.items() if key.startswith("vision_tower.")})
        else:
            files = [SAFE_WEIGHTS_NAME]
        prefix = "vision_tower."
        state: dict[str, torch.Tensor] = {}
        for name in files:
            path = cached_file(str(pretrained), name, **hub_kwargs)
            with safe_open(str(path), framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key.startswith(prefix):
                        state[key.removeprefix(prefix)] = weights.get_tensor(key)
        if not state:
            raise ValueError(f"{pretrained} holds no {prefix}* weights; is it a VPiT model folder?")
        encoder = VisionEncoder(
            config.get_vision_config(),
            config.num_visual_tokens,
            pooling=config.pooling,
            normalize=config.normalize_visual_tokens,
        )
        encoder.load_state_dict(state, strict=True)
        encoder.freeze()
        return encoder

    # ------------------------------------------------------------------------------------------- accessors

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def adapters(self) -> list[nn.Module]:
        """The trained modules around the LLM: the bridge, the token-wise bridge of a resampling model, the head,
        the queries mode's connector."""
        return [m for m in (self.bridge, self.token_bridge, self.visual_head, self.connector) if m is not None]

    # ------------------------------------------------------------------------------------ queries mode

    def _build_connector(self) -> QueryConnector:
        config = self.config
        return QueryConnector(
            config.connector,
            config.get_text_config().hidden_size,
            config.condition_size or self.vision_tower.hidden_size,
            config.num_queries,
            config.connector_options,
        )

    @property
    def makes_queries(self) -> bool:
        """Whether images are made through learned queries and the connector (`generation_mode` 'queries')."""
        return self.connector is not None

    @property
    def image_slots(self) -> int:
        """Slots of an image this model generates: Q queries in the 'queries' mode, else K visual tokens."""
        return self.config.num_queries if self.makes_queries else self.config.num_visual_tokens

    @property
    def condition_size(self) -> int:
        """The width of a generated image's tokens: C in the 'queries' mode, else the encoder's Dv."""
        if self.connector is not None:
            return int(self.connector.proj_out.out_features)
        return int(self.vision_tower.hidden_size)

    def add_queries(
        self,
        num_queries: int = 64,
        connector: str = "transformer",
        connector_options: dict[str, Any] | None = None,
        condition_size: int | None = None,
    ) -> QueryConnector:
        """Switch to the 'queries' generation mode (MetaQuery): add Q learned queries, started among the input
        embeddings, and a freshly initialised connector to condition tokens of width `condition_size` (None: the
        encoder's Dv), and record them in the config. What the `queries` stage does to a bridge- or VPiT-stage model.

        Raises:
            ValueError: when the model already makes images through queries, or on a bad setting.
        """
        if self.makes_queries:
            raise ValueError("this model is in the 'queries' generation mode already; its connector is trained")
        settings = {
            "generation_mode": "queries",
            "num_queries": num_queries,
            "connector": connector,
            "connector_options": connector_options,
            "condition_size": condition_size,
        }
        previous = {key: getattr(self.config, key) for key in settings}
        for key, value in settings.items():
            setattr(self.config, key, value)
        try:
            self.config._check()
        except ValueError:
            for key, value in previous.items():
                setattr(self.config, key, value)
            raise
        built = self._build_connector()
        device = _weight(self.get_input_embeddings()).device
        self.connector = built.to(device=device, dtype=self.dtype)
        self._no_split_modules = [*self._no_split_modules, "QueryConnector"]
        with gathered_for_write([_weight(self.get_input_embeddings())]):  # ZeRO-3: the queries read every row
            self.connector.apply(self._init_weights)
        return self.connector

    def query_embeddings(self, count: int) -> torch.Tensor:
        """(count * Q, H): the queries, once per image, in the order their slots are filled."""
        assert self.connector is not None, "the 'queries' generation mode only"
        device = _weight(self.get_input_embeddings()).device
        return self.connector(index=torch.arange(self.config.num_queries, device=device).repeat(count))

    def conditions(self, query_states: torch.Tensor) -> torch.Tensor:
        """(.., Q, H) final hidden states at an image's queries -> (.., Q, C) condition tokens for the decoder,
        L2-normalised per token when the encoder's tokens are (so a decoder trained on those reads them alike)."""
        assert self.connector is not None, "the 'queries' generation mode only"
        tokens = self.connector(query_states)
        return F.normalize(tokens, dim=-1) if self.config.normalize_visual_tokens else tokens

    @property
    def resamples(self) -> bool:
        """Whether the bridge resamples the prompt images' patch tokens (`config.bridge` is a resampler)."""
        return self.token_bridge is not None

    @property
    def _reads_instruction(self) -> bool:
        return isinstance(self.bridge, Resampler) and self.bridge.reads_instruction

    def bridge_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(.., Dv) visual tokens -> (.., H) input embeddings, token-wise: how a response image's tokens (predicted,
        fed back) and an image given only as tokens enter the LLM."""
        return (self.token_bridge if self.token_bridge is not None else self.bridge)(tokens)

    def is_partitioned(self) -> bool:
        """Whether DeepSpeed ZeRO-3 or FSDP2 shards this model's parameters (then every process must call the same
        modules in the same order, in evaluation and generation too: each call gathers weights collectively)."""
        if any(hasattr(p, "ds_id") for p in self.bridge.parameters()):
            return True
        return any(isinstance(m, FSDPModule) for m in (self, self.bridge, self.get_input_embeddings()))

    def image_token_ids(self) -> tuple[int, int, int]:
        """(image_start, image_end, image slot) token ids, as looked up in the tokenizer at assembly."""
        start, end, slot = self.config.image_start_token_id, self.config.image_end_token_id, self.config.image_token_id
        if start is None or end is None or slot is None:
            raise ValueError(
                "config.image_*_token_id are not set: the tokenizer's image tokens were never looked up. "
                "Build the model with vpit.assemble(...) or call model.add_image_tokens(tokenizer)."
            )
        return start, end, slot

    # ---------------------------------------------------------------------------------------- tokenizer

    @torch.no_grad()
    def add_image_tokens(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Add the image start/end/placeholder tokens to `tokenizer`, grow the embedding and LM-head matrices,
        start every new row at the mean of the existing rows, and record the looked-up ids in the config.

        Returns the ids of the newly added tokens (empty if the tokenizer already had them and the matrices fit).
        """
        specials = [self.config.image_start_token, self.config.image_end_token, self.config.image_token]
        old_rows = self._add_tokens(tokenizer, specials)
        start, end, slot = (token_id(tokenizer, token) for token in specials)
        self.config.image_start_token_id, self.config.image_end_token_id, self.config.image_token_id = start, end, slot
        return [i for i in (start, end, slot) if i >= old_rows]

    @torch.no_grad()
    def _add_tokens(self, tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> int:
        """Add special `tokens` to `tokenizer`, grow the embedding and LM head to it, start each new row at the mean
        of the old rows; return the old row count."""
        tokenizer.add_tokens(tokens, special_tokens=True)
        old_rows = full_shape(_weight(self.get_input_embeddings()))[0]
        new_rows = len(tokenizer)
        if new_rows > old_rows:
            self.language_model.resize_token_embeddings(new_rows, mean_resizing=False)
            matrices = [self.get_input_embeddings(), self.get_output_embeddings()]
            for matrix in {id(m): m for m in matrices if m is not None}.values():
                weight = _weight(matrix)  # (V, H) for both the embedding and the LM head
                bias = getattr(matrix, "bias", None)
                with gathered_for_write([weight] + ([bias] if bias is not None else [])):
                    weight[old_rows:] = weight[:old_rows].float().mean(dim=0).to(weight.dtype)
                    if bias is not None:
                        bias[old_rows:] = bias[:old_rows].float().mean().to(bias.dtype)
        self.config.get_text_config().vocab_size = full_shape(_weight(self.get_input_embeddings()))[0]
        return int(old_rows)

    @torch.no_grad()
    def set_visual_codebook(self, codebook: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Make this model discrete (`visual_target: discrete`): keep `codebook` (C, Dv), add its C code tokens
        (`<image_code_0>` ...) to `tokenizer` and the embedding / LM head, drop the continuous visual head.

        Returns the code tokens' ids (consecutive). A model that is already discrete takes a new codebook of the
        same size (the code tokens stay).
        """
        size, width = codebook.shape
        if width != self.vision_tower.hidden_size:
            raise ValueError(
                f"the codebook's vectors have {width} features, the encoder's tokens {self.vision_tower.hidden_size}"
            )
        config = self.config
        if config.visual_target == "discrete" and config.visual_codebook_size != size:
            raise ValueError(
                f"this model already has {config.visual_codebook_size} code tokens; fit {size} codes on a continuous "
                "folder instead"
            )
        tokens = [VISUAL_CODE_TOKEN.format(i) for i in range(size)]
        self._add_tokens(tokenizer, tokens)
        ids = [token_id(tokenizer, token) for token in tokens]
        if ids != list(range(ids[0], ids[0] + size)):
            raise ValueError(f"the tokenizer gave the code tokens non-consecutive ids ({ids[:3]} ...)")
        config.visual_target, config.visual_codebook_size, config.visual_code_token_id = "discrete", size, ids[0]
        config._check()
        device = _weight(self.get_input_embeddings()).device
        self.register_buffer("visual_codebook", codebook.float().to(device))  # replaces a previous codebook
        self.visual_head = VisualHead()
        self._no_split_modules = ["VisionEncoder", "Bridge"]
        return ids

    @property
    def is_discrete(self) -> bool:
        """Whether this model predicts codebook codes (`visual_target: discrete`) rather than continuous tokens."""
        return self.config.visual_target == "discrete"

    def new_token_ids(self) -> list[int]:
        """The ids of the tokens VPiT added to the LLM's vocabulary: the image tokens, and a discrete model's codes."""
        ids = set(self.image_token_ids())
        if self.is_discrete:
            first, size = self.config.visual_code_token_id, self.config.visual_codebook_size
            assert first is not None and size is not None  # set with visual_target by set_visual_codebook
            ids.update(range(first, first + size))
        return sorted(ids)

    def code_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(.., H) -> (.., C) float: the LM head's logits of the code tokens (the head is called as a module, so
        that ZeRO-3 / FSDP2 gather its weight; a discrete model only)."""
        first, size = self.config.visual_code_token_id, self.config.visual_codebook_size
        if not self.is_discrete or first is None or size is None:
            raise ValueError("code_logits needs a discrete model (fit a codebook with `vpit codebook fit`)")
        head = self.get_output_embeddings()
        assert head is not None
        return head(hidden_states)[..., first : first + size].float()

    def quantise(self, tokens: torch.Tensor) -> torch.Tensor:
        """(.., Dv) -> (.., Dv): each token's nearest codebook vector (a discrete model only)."""
        codebook = self.visual_codebook
        return codebook[nearest_codes(tokens, codebook)].to(tokens.dtype)

    # ------------------------------------------------------------------------------------------ pieces

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(I, 3, S, S) -> (I, K, Dv): the frozen encoder's pooled (normalised) tokens; no gradient."""
        return self.vision_tower(pixel_values)

    def embed(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        visual_tokens: torch.Tensor | None = None,
        visual_tokens_given: torch.Tensor | None = None,
        response_slots: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        query_slots: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with the bridged images spliced into the image slots.

        Args:
            input_ids: (B, T) with K `image_token_id` slots per image, images in row-major order.
            pixel_values: (I, 3, S, S), or
            visual_tokens: (I, K, Dv) already encoded (e.g. predicted tokens fed back at generation time, or a
                feature cache's), with
            visual_tokens_given: (I,) bool, optional: which rows of `visual_tokens` hold tokens; the others are
                encoded from `pixel_values`, which then holds exactly those images, in order.
            response_slots: (B, T) bool, the slots of response images (teacher forcing; `response_slot_mask`): a
                discrete model reads them as their tokens' codebook vectors (what generation feeds back), a
                resampling model through its token-wise bridge (as generation feeds them back).
            labels: (B, T), a `qformer_instruct` bridge's: an image's instruction is the text after it up to the
                first labelled token (in generation, without labels: to the end of the prompt).
            query_slots: (B, T) bool, the 'queries' mode's: the slots of the images to make, Q per image, which hold
                the learned queries (not an image's tokens; they count for no image).

        Returns:
            inputs_embeds (B, T, H) and the visual tokens z (I, K, Dv) (None when there are no images); z is the
            encoder's pooled tokens, not quantised.

        Raises:
            ValueError: when the number of slots is not I * K.
        """
        _, _, slot_id = self.image_token_ids()
        embed_tokens = self.get_input_embeddings()
        inputs_embeds = embed_tokens(input_ids)  # (B, T, H)
        slot_mask = input_ids == slot_id  # (B, T)
        if query_slots is not None:
            query_slots = query_slots.to(slot_mask.device)
            if bool((query_slots & ~slot_mask).any()):
                raise ValueError("query_slots marks positions that are not image slots")
            slot_mask = slot_mask & ~query_slots
        partitioned = self.is_partitioned()
        pixels = pixel_values if pixel_values is not None and pixel_values.shape[0] > 0 else None
        patches = None  # (I', N, Dv), a resampling model's: the patch tokens of the images encoded from pixels
        encoded = None  # (I,) bool: which images were encoded from pixels here
        if visual_tokens is not None and visual_tokens_given is not None and pixels is not None:
            encoded = ~visual_tokens_given.to(visual_tokens.device)
            visual_tokens = visual_tokens.clone()
            pooled, patches = self._encode(pixels)
            visual_tokens[encoded] = pooled.to(visual_tokens.dtype)
        elif visual_tokens is None and pixels is not None:
            visual_tokens, patches = self._encode(pixels)
            encoded = torch.ones(visual_tokens.shape[0], dtype=torch.bool, device=visual_tokens.device)
        elif partitioned:
            # Under ZeRO-3 / FSDP2 calling the encoder gathers its weights collectively: it runs once in every call
            # on every rank, on a dummy image when this rank's batch needs no encoding.
            self.encode_images(inputs_embeds.new_zeros(1, 3, *self.vision_tower.image_size))
        num_images = 0 if visual_tokens is None else visual_tokens.shape[0]
        num_slots = int(slot_mask.sum())
        k = self.config.num_visual_tokens
        if num_slots != num_images * k:
            raise ValueError(
                f"input_ids hold {num_slots} image slots ({self.config.image_token!r}) but {num_images} image(s) x "
                f"K={k} = {num_images * k} visual tokens were given; every image needs exactly K slots "
                "(VPiTProcessor expands each <image> marker into them)"
            )
        if visual_tokens is not None and num_images > 0:
            responses = None  # (I,) bool
            if response_slots is not None and bool(response_slots.any()):
                responses = response_slots[slot_mask].view(num_images, k).any(dim=-1)
            read = visual_tokens
            if responses is not None and self.is_discrete:
                read = torch.where(responses[:, None, None], self.quantise(visual_tokens), visual_tokens)
            bridged = self.bridge_tokens(read.to(inputs_embeds.dtype))  # (I, K, H)
            if self.resamples:
                bridged = self._resample_prompt_images(
                    bridged, input_ids, patches, encoded, responses, inputs_embeds, labels
                )
            inputs_embeds = inputs_embeds.masked_scatter(
                slot_mask.unsqueeze(-1).expand_as(inputs_embeds), bridged.to(inputs_embeds.dtype)
            )
        elif self.training or partitioned:
            # Every rank runs the bridge every step, even on a text-only batch, so that DDP / ZeRO-3 / FSDP2 see the
            # same trainable modules used on all ranks (no hang, no unused-parameter error); under ZeRO-3 / FSDP2
            # in evaluation too. (The frozen encoder needs this only when sharded: above.)
            dummy = inputs_embeds.new_zeros(1, k, self.vision_tower.hidden_size)
            bridged = self.bridge_tokens(dummy)
            if self.resamples:
                bridged = bridged + self._idle_resampler(inputs_embeds)
            inputs_embeds = inputs_embeds + 0.0 * bridged.sum().to(inputs_embeds.dtype)
        if query_slots is not None and bool(query_slots.any()):
            q = self.config.num_queries
            count = int(query_slots.sum())
            if count % q:
                raise ValueError(f"query_slots marks {count} slots, not a multiple of num_queries={q}")
            queries = self.query_embeddings(count // q).to(inputs_embeds.dtype)  # (count, H)
            inputs_embeds = inputs_embeds.masked_scatter(query_slots.unsqueeze(-1).expand_as(inputs_embeds), queries)
        return inputs_embeds, visual_tokens

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pooled tokens (I, K, Dv) and, for a resampling model, the patch tokens (I, N, Dv)."""
        if self.resamples:
            return self.vision_tower.encode_with_patches(pixels)
        return self.encode_images(pixels), None

    def _idle_resampler(self, like: torch.Tensor) -> torch.Tensor:
        """0 x the resampler's output on one dummy image (see `embed`: every rank calls every trained module)."""
        patches = like.new_zeros(1, 1, self.vision_tower.hidden_size)  # a resampler reads any number of patches
        instruction = like.new_zeros(1, 1, like.shape[-1]) if self._reads_instruction else None
        mask = like.new_ones(1, 1, dtype=torch.long) if instruction is not None else None
        return 0.0 * self.bridge(patches, instruction, mask).sum()

    def _resample_prompt_images(
        self,
        bridged: torch.Tensor,
        input_ids: torch.Tensor,
        patches: torch.Tensor | None,
        encoded: torch.Tensor | None,
        responses: torch.Tensor | None,
        token_embeds: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """`bridged` (I, K, H), token-wise, with the prompt images that were encoded from pixels replaced by the
        resampler's output on their patch tokens."""
        images = bridged.shape[0]
        resampled = torch.zeros(images, dtype=torch.bool, device=bridged.device)
        if encoded is not None:
            resampled = encoded.to(bridged.device)
        if responses is not None:
            resampled = resampled & ~responses.to(bridged.device)
        if not bool(resampled.any()):
            return bridged + self._idle_resampler(token_embeds) if self.training or self.is_partitioned() else bridged
        assert patches is not None and encoded is not None  # resampled rows are encoded rows
        chosen = resampled[encoded.to(bridged.device)]  # which of the encoded images are prompt images
        instruction = mask = None
        if self._reads_instruction:
            instruction, mask = self._instructions(input_ids, token_embeds, resampled, labels)
        out = self.bridge(patches[chosen.to(patches.device)].to(bridged.dtype), instruction, mask)  # (I', K, H)
        full = bridged.new_zeros(bridged.shape).index_put((resampled.nonzero().squeeze(1),), out.to(bridged.dtype))
        return torch.where(resampled[:, None, None], full, bridged)

    def _instructions(
        self, input_ids: torch.Tensor, token_embeds: torch.Tensor, images: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For each image marked in `images` (I,) bool: the token embeddings of its instruction, the text that follows
        its span in its row up to the first labelled token or the row's end, other images' slots left out, at most
        MAX_INSTRUCTION_TOKENS; as (I', L, H) with an (I', L) 0/1 mask (an image with no text after it: all 0)."""
        _, _, slot_id = self.image_token_ids()
        k, length = self.config.num_visual_tokens, input_ids.shape[1]
        slots = (input_ids == slot_id).nonzero()  # (I * K, 2), row-major: image i's slots are rows i*K .. i*K+K-1
        pieces = []
        for i in images.nonzero().squeeze(1).tolist():
            row, last = (int(v) for v in slots[(i + 1) * k - 1])
            stop = length
            if labels is not None:
                answer = (labels[row, last + 1 :] != IGNORE_INDEX).nonzero()
                stop = last + 1 + int(answer[0]) if len(answer) else length
            text = input_ids[row, last + 1 : stop] != slot_id
            pieces.append(token_embeds[row, last + 1 : stop][text][:MAX_INSTRUCTION_TOKENS])
        width = max([1, *(len(piece) for piece in pieces)])
        out = token_embeds.new_zeros(len(pieces), width, token_embeds.shape[-1])
        mask = torch.zeros(len(pieces), width, dtype=torch.long, device=token_embeds.device)
        for j, piece in enumerate(pieces):
            out[j, : len(piece)] = piece
            mask[j, : len(piece)] = 1
        return out, mask

    def response_slot_mask(self, input_ids: torch.LongTensor, labels: torch.LongTensor) -> torch.Tensor:
        """(B, T) bool: the image slots whose image belongs to a response (see `response_slot_mask`)."""
        start_id, _, slot_id = self.image_token_ids()
        return response_slot_mask(input_ids, labels, start_id, slot_id)

    @property
    def visual_sampling_options(self) -> tuple[str, ...]:
        """The sampling settings `predict_visual` takes: a diffusion head's steps, temperature and guidance_scale,
        a discrete model's temperature; none for a regression head."""
        if self.is_discrete:
            return ("temperature",)
        return ("steps", "temperature", "guidance_scale") if isinstance(self.visual_head, DiffusionHead) else ()

    @property
    def samples_visual_tokens(self) -> bool:
        """Whether the visual tokens are sampled (a `diffusion` head, or a discrete model's codes) rather than
        regressed."""
        return bool(self.visual_sampling_options)

    def predict_visual(self, hidden_states: torch.Tensor, **sampling: Any) -> torch.Tensor:
        """(.., H) -> (.., Dv): the visual head's tokens; normalised when the targets are and the head is trained
        with the cosine (which leaves the norm free) or samples them (diffusion), not when it regresses their values
        (l2, smooth_l1). A discrete model returns the codebook vectors of its codes: the most likely ones, or drawn
        at `temperature` > 0.

        Args:
            sampling: `visual_sampling_options` (None: the head's defaults) and the generator. A regression head
                takes none.
        """
        given = sorted(k for k, v in sampling.items() if v is not None and k != "generator")
        unknown = [k for k in given if k not in self.visual_sampling_options]
        if unknown:
            kind = "a discrete model" if self.is_discrete else f"the {self.config.visual_head!r} head"
            raise ValueError(f"{unknown} do not apply to {kind}, which takes {list(self.visual_sampling_options)}")
        if self.is_discrete:
            logits = self.code_logits(hidden_states)  # (.., C)
            temperature = sampling.get("temperature")
            if temperature is not None and not temperature >= 0:
                raise ValueError(f"a discrete model's visual temperature must be >= 0 (0: greedy), got {temperature}")
            if temperature is None or temperature == 0:
                codes = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits.flatten(0, -2) / temperature, dim=-1)  # (M, C)
                codes = torch.multinomial(probs, 1, generator=sampling.get("generator")).view(logits.shape[:-1])
            return self.visual_codebook[codes]
        if isinstance(self.visual_head, DiffusionHead):
            pred = self.visual_head(hidden_states, **{k: v for k, v in sampling.items() if v is not None})
        else:
            pred = self.visual_head(hidden_states)
        normalise = self.config.normalize_visual_tokens and self.config.visual_loss == "cosine"
        return F.normalize(pred, dim=-1) if normalise else pred

    # ----------------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: object | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        visual_target_mask: torch.Tensor | None = None,
        visual_tokens: torch.Tensor | None = None,
        visual_tokens_given: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        num_visual_items_in_batch: int | torch.Tensor | None = None,
        return_logits: bool = True,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> VPiTCausalLMOutput:
        """Run the LLM on text with spliced visual tokens and, given labels, compute the VPiT loss.

        Args:
            input_ids: (B, T), with K image slots per image (see `VPiTProcessor`).
            pixel_values: (I, 3, S, S) images in the order their slots appear (row-major over the batch).
            labels: (B, T) token ids to predict, -100 where ignored; image slots must be -100.
            visual_target_mask: (B, T) bool, the slots whose encoder token is a target; by default the slots of
                images whose `<image_start>` is labelled (response images).
            visual_tokens: (I, K, Dv) to splice instead of encoding `pixel_values`; with `visual_tokens_given`
                (I,) bool, only the rows it marks (a feature cache's), the others encoded from `pixel_values`.
            num_items_in_batch: labelled-token count of the whole global batch (over processes and accumulated
                micro-batches); the text loss is then this batch's CE sum over it. Default: this batch's count.
            num_visual_items_in_batch: the same for the visual targets and the cosine loss.
            return_logits: False (with labels): the LM head runs only at the positions whose next token is
                labelled, and `logits` is None; the training loop's choice, which spares the (B, T, V) logits of
                the prompts (and of a 128k vocabulary's padding).

        Returns:
            `VPiTCausalLMOutput` with `loss`, `text_loss`, `visual_loss`, `logits` and the visual predictions.
        """
        z = None
        packed = attention_mask is None and position_ids is not None and past_key_values is None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            responses = None
            if (self.is_discrete or self.resamples) and labels is not None:
                # Teacher forcing reads response images as generation feeds them back: a discrete model's as
                # codebook vectors, a resampling model's through the token-wise bridge.
                if visual_target_mask is None:
                    visual_target_mask = self.response_slot_mask(input_ids, labels)  # also the loss's targets
                responses = visual_target_mask
            inputs_embeds, z = self.embed(
                input_ids, pixel_values, visual_tokens, visual_tokens_given, responses, labels
            )
            if past_key_values is None:
                if labels is not None and responses is None and self.config.image_attention != "causal":
                    # Response images stay causal: each slot is predicted from the ones before it.
                    responses = (
                        visual_target_mask
                        if visual_target_mask is not None
                        else self.response_slot_mask(input_ids, labels)
                    )
                attention_mask = self.llm_attention_mask(
                    input_ids, inputs_embeds, attention_mask, position_ids, None, responses
                )
        if use_cache is None and (labels is not None or packed):
            # Training needs no KV cache, and transformers builds the block-diagonal mask of packed rows (position
            # ids restarting per sample) only when there is none: a default cache would let samples attend across.
            use_cache = False
        positions = labelled_positions(labels) if labels is not None and not return_logits else None  # (P,)
        z_weight = float(self.z_loss_weight) if labels is not None else 0.0
        fused = positions is not None and self.uses_fused_cross_entropy(inputs_embeds.device, needs_logits=z_weight > 0)
        if fused and positions is not None:
            kwargs["logits_to_keep"] = positions[:0]  # no logits at all: the fused loss applies the LM head itself
        elif positions is not None and self.keeps_some_logits():
            kwargs["logits_to_keep"] = positions  # the LM head runs at these positions only
        outputs, hidden = self.run_language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        logits = outputs.logits  # (B, T, V), or (B, P, V) at `positions`
        if positions is not None and not fused and "logits_to_keep" not in kwargs:
            logits = logits[:, positions]

        loss = t_loss = v_loss = z_term = predictions = targets = None
        if labels is not None:
            if input_ids is None:
                raise ValueError("computing the VPiT loss needs input_ids to locate image slots")
            _, _, slot_id = self.image_token_ids()
            slot_mask = input_ids == slot_id  # (B, T)
            if bool((labels[slot_mask] != IGNORE_INDEX).any()):
                raise ValueError(
                    "labels must be -100 at image slots (visual tokens are trained by the cosine loss, not CE)"
                )
            if visual_target_mask is None:
                visual_target_mask = self.response_slot_mask(input_ids, labels)
            elif bool((visual_target_mask & ~slot_mask).any()):
                raise ValueError("visual_target_mask marks positions that are not image slots")
            head = self.get_output_embeddings()
            if fused and isinstance(head, nn.Linear) and positions is not None:
                t_loss = fused_text_loss(hidden[:, positions], head, labels, num_items_in_batch, positions)
            elif z_weight > 0:
                t_loss, z_term = text_and_z_loss(logits, labels, num_items_in_batch, positions)
            else:
                t_loss = text_loss(logits, labels, num_items_in_batch, positions)
            # Next-token shift: the hidden state at t - 1 predicts the visual token at slot t.
            conditions = hidden[:, :-1][visual_target_mask[:, 1:]]  # (M, H)
            if z is None:
                targets = conditions.new_zeros(0, self.vision_tower.hidden_size)
            else:
                targets = z.reshape(-1, z.shape[-1])[visual_target_mask[slot_mask]].detach()  # (M, Dv)
            config = self.config
            if self.is_discrete:
                # SEED / Chameleon / Emu3: cross-entropy of the LM head's code logits against the target's code.
                logits_c = self.code_logits(conditions)  # (M, C)
                codes = nearest_codes(targets, self.visual_codebook)  # (M,)
                v_loss = mean_over_items(F.cross_entropy(logits_c, codes, reduction="none"), num_visual_items_in_batch)
                predictions = self.visual_codebook[logits_c.argmax(dim=-1)]  # (M, Dv)
            elif isinstance(self.visual_head, DiffusionHead):
                # Sampled tokens only when evaluating (they cost `steps` denoiser calls and carry no gradient).
                predictions = None if self.training else self.predict_visual(conditions)
                v_loss = mean_over_items(self.visual_head(conditions, targets), num_visual_items_in_batch)
            else:
                predictions = self.predict_visual(conditions)  # (M, Dv)
                v_loss = visual_loss(
                    predictions, targets, config.visual_loss, num_visual_items_in_batch, beta=config.visual_loss_beta
                )
            loss = config.text_loss_weight * t_loss + config.visual_loss_weight * v_loss
            if z_term is not None:
                loss = loss + z_weight * z_term

        return VPiTCausalLMOutput(
            loss=loss,
            text_loss=t_loss,
            visual_loss=v_loss,
            z_loss=z_term,
            logits=logits if positions is None else None,
            visual_predictions=predictions,
            visual_targets=targets,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=getattr(outputs, "attentions", None),
        )

    def query_forward(
        self,
        input_ids: torch.LongTensor,
        query_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        visual_tokens: torch.Tensor | None = None,
        visual_tokens_given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The 'queries' mode's forward (what the `queries` stage trains): the LLM reads the prompt (its images
        through the bridge) and, at each image to make, the Q learned queries; the connector turns the final hidden
        states at the queries into the decoder's condition tokens.

        Args:
            input_ids: (B, T) with Q `image_token_id` slots per image to make (marked by `query_mask`) and K per
                prompt image, whose pixels (`pixel_values`) or tokens (`visual_tokens`) are given in slot order.
            query_mask: (B, T) bool, the slots of the images to make.

        Returns:
            conditions (M, Q, C) for the M images to make, in row-major order.
        """
        if not self.makes_queries:
            raise ValueError("query_forward is the 'queries' generation mode's; add_queries() switches a model to it")
        inputs_embeds, _ = self.embed(
            input_ids, pixel_values, visual_tokens, visual_tokens_given, query_slots=query_mask
        )
        mask = self.llm_attention_mask(input_ids, inputs_embeds, attention_mask, position_ids, None, query_mask)
        kwargs = {"logits_to_keep": 1} if self.keeps_some_logits() else {}  # the LM head's output is not used
        _, hidden = self.run_language_model(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, use_cache=False, **kwargs
        )
        states = hidden[query_mask.to(hidden.device)]  # (M * Q, H)
        return self.conditions(states.view(-1, self.config.num_queries, states.shape[-1]))  # (M, Q, C)

    def uses_fused_cross_entropy(self, device: torch.device, needs_logits: bool = False) -> bool:
        """Whether the training loss goes through Liger's fused linear cross-entropy (`fused_text_loss`): asked for
        (`fused_cross_entropy` True, or None and it can run) on a CUDA device with liger-kernel installed, an LM
        head that is a plain Linear (no logit soft-capping or scaling after it) and weights that are not sharded
        (the kernel reads the head's weight directly; under ZeRO-3 / FSDP2 the chunked CE runs instead), and no
        other loss term reading the logits (`needs_logits`: the z-loss)."""
        if self.fused_cross_entropy is False:
            return False
        if needs_logits:
            if self.fused_cross_entropy:
                raise RuntimeError(
                    "fused_cross_entropy never materialises the logits, which the z-loss reads: set "
                    "train.fused_cross_entropy to null or false, or train.z_loss to 0"
                )
            return False
        text = self.config.get_text_config()
        plain = getattr(text, "final_logit_softcapping", None) is None and getattr(text, "logit_scale", None) is None
        head = self.get_output_embeddings()
        usable = (
            fused_cross_entropy_available(device)
            and plain
            and isinstance(head, nn.Linear)
            and self.keeps_some_logits()
            and not self.is_partitioned()
        )
        if self.fused_cross_entropy and not usable:
            raise RuntimeError(
                "fused_cross_entropy is required but cannot run here: it needs a CUDA device, liger-kernel installed "
                "(pip install liger-kernel), a plain Linear LM head and unsharded weights (not ZeRO-3 / FSDP2)"
            )
        return usable

    def keeps_some_logits(self) -> bool:
        """Whether the LLM's forward takes `logits_to_keep` (every transformers causal LM of this generation does)."""
        return "logits_to_keep" in inspect.signature(self.language_model.forward).parameters

    def llm_attention_mask(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        response_slots: torch.Tensor | None = None,
    ) -> Any:
        """The LLM's attention mask for a prefill of `input_ids`: `attention_mask` itself when image attention is
        causal; with `image_attention: bidirectional` the 4-D mask in which the K slots of each prompt image attend
        to each other (the response images' slots, `response_slots`, stay causal), built by transformers'
        `create_causal_mask` with `block_sequence_ids` in the LLM's attention backend's format, packed rows
        (position ids restarting) and padding included. A 4-D mask reaches the LLM's layers as it is."""
        if self.config.image_attention == "causal":
            return attention_mask
        from transformers.masking_utils import create_causal_mask

        backend = str(self.language_model.config._attn_implementation)
        if "flash" in backend:  # flash kernels take no mask beyond padding: the blocks would be dropped silently
            raise ValueError(
                f"image_attention 'bidirectional' needs an attention backend that takes a mask ('sdpa', 'eager' or "
                f"'flex_attention'); the LLM runs {backend!r}"
            )

        _, _, slot_id = self.image_token_ids()
        slots = input_ids == slot_id  # (B, T)
        prompt = slots if response_slots is None else slots & ~response_slots.to(slots.device)
        image = torch.div(prompt.long().cumsum(-1) - 1, self.config.num_visual_tokens, rounding_mode="floor")
        blocks = torch.where(prompt, image, -1)  # (B, T): each prompt image's slots one block, -1 elsewhere
        if not bool(prompt.any()):
            return attention_mask
        if position_ids is None and attention_mask is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return create_causal_mask(
            config=self.language_model.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            block_sequence_ids=blocks,
        )

    def run_language_model(self, **kwargs: Any) -> tuple[Any, torch.Tensor]:
        """The LLM's forward (kwargs as its own: inputs_embeds, attention_mask, cache, `logits_to_keep`, ...) and its
        last hidden state (B, T, H) after the final norm, the LM head's input, which the visual head reads.

        The hidden state is taken from the LLM's decoder output by a forward hook rather than by asking for every
        layer's hidden states (`output_hidden_states=True` would keep all of them alive to return one).
        """
        decoder = self.language_model.base_model
        if decoder is self.language_model:  # no separate decoder module: ask for the hidden states
            outputs = self.language_model(**{**kwargs, "output_hidden_states": True, "return_dict": True})
            return outputs, outputs.hidden_states[-1]
        captured: list[torch.Tensor] = []

        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handle = decoder.register_forward_hook(keep)
        try:
            outputs = self.language_model(**{**kwargs, "return_dict": True})
        finally:
            handle.remove()
        return outputs, captured[-1]

    # ------------------------------------------------------------------------------------------ generation

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Unified decoding of text and images with a KV cache: see `vpit.inference.generation.generate`.

        Example:
            >>> batch = processor.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
            >>> out = model.generate(**batch, max_new_tokens=64)
            >>> out.sequences, out.images   # token ids; per row, the (K, Dv) visual tokens of each image
        """
        from ..inference.generation import generate

        return generate(self, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------- export

    def save_language_model(
        self, save_directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, **kwargs: Any
    ) -> None:
        """Write the LLM alone (with the grown vocabulary) as a plain transformers causal-LM folder, loadable
        with `AutoModelForCausalLM.from_pretrained` without vpit installed."""
        self.language_model.save_pretrained(save_directory, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)


__all__ = ["VPiTCausalLMOutput", "VPiTForCausalLM", "VPiTPreTrainedModel", "response_slot_mask"]
