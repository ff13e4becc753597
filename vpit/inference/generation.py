"""Unified text + image generation for VPiT models (MetaMorph inference), batched, with a KV cache.

One decoding loop serves text and images. Every row of a batch is in its own mode at every step, and ONE
forward of the LLM per step serves the whole batch: the step's input embedding of each row is chosen with
`torch.where` between a token embedding and a bridged visual token.

State machine, per row (the token in brackets is what the step records in `sequences`):

    TEXT    sample a token from the LM head (transformers' logits processors and warpers)     [token]
            -> VISUAL with K steps to go if it is <image_start>; -> DONE if it is an eos token
    VISUAL  ẑ = model.predict_visual(h_last); the next input is model.bridge_tokens(ẑ)       [image_token_id]
            -> END after the K-th visual step
    END     the next input is <image_end>, forced, never sampled                            [image_end_token_id]
            -> TEXT
    DONE    pad, with attention mask 0; the loop ends when every row is DONE or after max_new_tokens steps

In the 'queries' generation mode (`VPiTConfig.generation_mode`) VISUAL runs Q steps whose inputs are the learned
queries in order, and the step after each records the final hidden state at that query; once the loop ends, the
connector turns each image's Q states into its (Q, C) condition tokens (`VPiTForCausalLM.conditions`), which is
what `images` holds (an image cut short by max_new_tokens is dropped: the connector needs all Q states).

A prompt that ends with <image_start> starts its row in VISUAL; the logits of a VISUAL or END step are not used.
In TEXT the slot token is never sampled, and <image_start> is barred once a row started `max_images_per_row` images.
h_last is the final hidden state of the newest position, `hidden_states[-1][:, -1]`, i.e. the LM head's input:
the hidden state one position before a slot predicts that slot's visual token, the shift training uses.

Shapes (letters as in `vpit.model.configuration_vpit`; N new tokens):

    input_ids, attention_mask   (B, T)        left-padded prompts, K image_token_id slots per prompt image
    pixel_values                (I, 3, S, S)  prompt images, row-major in slot order (or visual_tokens (I, K, Dv))
    per step                    inputs (B, 1, H) (the prefill: (B, T, H)) -> h_last (B, H), logits (B, V), ẑ (B, Dv)
    sequences, attention_mask   (B, T + N)    prompt, then the new tokens (slots as image_token_id, pad when DONE)
    images                      per row, a list of (K, Dv) tensors, one per generated image, in order

`generate_no_cache` is a plain reference for tests and benchmarks: MetaMorph's released inference style (one row
at a time, no KV cache, the whole prefix recomputed at every step), with the state machine written out per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.distributed as dist
from transformers import DynamicCache, GenerationConfig
from transformers.generation import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput

if TYPE_CHECKING:
    from ..model.modeling_vpit import VPiTForCausalLM


class Streamer(Protocol):
    """What `generate` pushes text to: transformers' `TextStreamer` / `TextIteratorStreamer` or anything alike."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


@dataclass
class VPiTGenerationOutput(ModelOutput):
    """Output of `generate` / `generate_no_cache`.

    Args:
        sequences: (B, T + N) the prompts, then the new tokens: image slots as `image_token_id`, boundaries as
            their ids, pad after a row's eos.
        attention_mask: (B, T + N) 1 on real tokens (the prompt's and the new ones up to eos included).
        images: per row, one (K, Dv) tensor of predicted visual tokens per complete generated image, in order.
        partial_images: per row, the (k, Dv) tokens of an image that max_new_tokens cut short (0 < k < K), or None.
        num_new_tokens: (B,) tokens each row generated, its eos included, its trailing pad not.
        finished: (B,) bool, whether the row stopped at an eos token (False: it ran out of max_new_tokens).
    """

    sequences: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    images: list[list[torch.Tensor]] | None = None
    partial_images: list[torch.Tensor | None] | None = None
    num_new_tokens: torch.Tensor | None = None
    finished: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------- settings

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class _Settings:
    max_new_tokens: int
    do_sample: bool
    temperature: float | None
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    max_images_per_row: int | None
    visual_sampling: dict[str, Any]  # steps / temperature / guidance_scale of a sampling visual head (given ones)


VISUAL_SAMPLING = {
    "visual_steps": "steps",
    "visual_temperature": "temperature",
    "visual_guidance_scale": "guidance_scale",
}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _resolve_settings(
    model: VPiTForCausalLM, generation_config: GenerationConfig | None, explicit: dict[str, Any]
) -> _Settings:
    """Explicit arguments win over `generation_config`, which wins over the defaults: greedy decoding, and the LLM's
    own eos / pad ids (its generation_config, then its config)."""
    config = generation_config if generation_config is not None else GenerationConfig()
    llm_generation = getattr(model.language_model, "generation_config", None) or GenerationConfig()
    llm_config = model.config.get_text_config()

    def pick(name: str, default: Any = None) -> Any:
        return _first(explicit.get(name), getattr(config, name, None), default)

    max_new_tokens = pick("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    limit = pick("max_images_per_row")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"max_images_per_row must be an int >= 0 or None, got {limit!r}")

    eos = _first(
        explicit.get("eos_token_id"),
        config.eos_token_id,
        llm_generation.eos_token_id,
        getattr(llm_config, "eos_token_id", None),
    )
    eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(int(i) for i in eos)
    pad = _first(
        explicit.get("pad_token_id"),
        config.pad_token_id,
        llm_generation.pad_token_id,
        getattr(llm_config, "pad_token_id", None),
        eos_ids[0] if eos_ids else None,
    )
    if pad is None:
        raise ValueError("no pad_token_id: pass pad_token_id= (e.g. tokenizer.pad_token_id or an eos id)")
    special = set(model.image_token_ids())
    if special & set(eos_ids):
        raise ValueError(f"eos_token_id {list(eos_ids)} must not contain an image token id {sorted(special)}")

    do_sample = bool(pick("do_sample", False))
    warpers = [name for name in ("temperature", "top_k", "top_p") if explicit.get(name) is not None]
    if warpers and not do_sample:
        raise ValueError(f"{', '.join(warpers)} only shape sampling; pass do_sample=True, or leave them out for greedy")
    temperature, top_p, penalty = pick("temperature"), pick("top_p"), pick("repetition_penalty")
    visual_sampling = {head_name: pick(name) for name, head_name in VISUAL_SAMPLING.items() if pick(name) is not None}
    unknown = sorted(f"visual_{name}" for name in visual_sampling if name not in model.visual_sampling_options)
    if unknown:
        takes = [f"visual_{name}" for name in model.visual_sampling_options]
        kind = "a discrete model" if model.is_discrete else f"the {model.config.visual_head!r} visual head"
        raise ValueError(
            f"{unknown} do not apply to {kind}, which takes {takes or 'none (it regresses its tokens)'}; "
            "a 'diffusion' head samples in visual_steps at visual_temperature and visual_guidance_scale"
        )
    return _Settings(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=None if temperature is None else float(temperature),
        top_k=pick("top_k"),
        top_p=None if top_p is None else float(top_p),
        repetition_penalty=None if penalty is None else float(penalty),
        eos_token_ids=eos_ids,
        pad_token_id=int(pad),
        max_images_per_row=limit,
        visual_sampling=visual_sampling,
    )


def _visual_kwargs(model: VPiTForCausalLM, settings: _Settings, generator: torch.Generator | None) -> dict[str, Any]:
    """What `predict_visual` takes: a sampling head's settings and the generator; nothing for a regression head."""
    return {**settings.visual_sampling, "generator": generator} if model.samples_visual_tokens else {}


def _code_ids(model: VPiTForCausalLM) -> range | None:
    """A discrete model's code token ids (text decoding never samples them), else None."""
    first, size = model.config.visual_code_token_id, model.config.visual_codebook_size
    return range(first, first + size) if model.is_discrete and first is not None and size is not None else None


class ImageTokenMask(LogitsProcessor):
    """Keeps text decoding inside the state machine: the slot token (and a discrete model's code tokens, `codes`)
    is never sampled (slots are written only by visual steps), and `<image_start>` is barred from rows that already
    started `max_images_per_row` images."""

    def __init__(
        self,
        image_token_id: int,
        image_start_token_id: int,
        max_images_per_row: int | None,
        codes: range | None = None,
    ):
        self.image_token_id = image_token_id
        self.codes = codes
        self.image_start_token_id = image_start_token_id
        self.max_images_per_row = max_images_per_row
        self.images_started: torch.Tensor | None = None  # (B,) long, updated by the decoding loop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.image_token_id] = -float("inf")
        if self.codes is not None:
            scores[:, self.codes.start : self.codes.stop] = -float("inf")
        if self.max_images_per_row is not None and self.images_started is not None:
            full = self.images_started >= self.max_images_per_row  # (B,)
            scores[:, self.image_start_token_id] = scores[:, self.image_start_token_id].masked_fill(full, -float("inf"))
        return scores


def _processors(
    settings: _Settings,
    mask: ImageTokenMask,
    extra: Sequence[LogitsProcessor] | None,
    padding_lengths: torch.Tensor | None,
) -> LogitsProcessorList:
    """transformers' processors in `GenerationMixin._get_logits_processor` order: repetition penalty, the caller's
    processors, (our image-token mask), then, when sampling, the warpers temperature -> top-k -> top-p."""
    processors = LogitsProcessorList()
    if settings.repetition_penalty is not None and settings.repetition_penalty != 1.0:
        # As transformers does: left padding is not part of the prompt the penalty looks at.
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty, padding_lengths))
    processors.extend(extra or [])
    processors.append(mask)
    if settings.do_sample:
        if settings.temperature is not None and settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k is not None and settings.top_k != 0:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p is not None and settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


def _choose(
    processors: LogitsProcessorList,
    sequences: torch.Tensor,
    logits: torch.Tensor,
    do_sample: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, T') ids so far, (B, V) logits -> (B,) next text tokens, as `GenerationMixin._sample` picks them."""
    scores = processors(cast(torch.LongTensor, sequences), logits.float())  # (B, V)
    if do_sample:
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    return scores.argmax(dim=-1)


# ---------------------------------------------------------------------------------------------- prompt checks


def _check_prompt(
    model: VPiTForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate left-padded prompts. Returns input_ids (B, T), attention_mask (B, T) long, and (B,) bool: the
    rows whose prompt ends with an open `<image_start>` (they start in VISUAL)."""
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (B, T) tensor, got shape {tuple(input_ids.shape)}")
    device = next(model.get_input_embeddings().parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}; they must match"
        )
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()) or not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "generation needs LEFT-padded prompts (padding before the text, every row ending with a real token); "
            "use tokenizer.padding_side = 'left' or VPiTCollator(padding_side='left')"
        )
    start_id, end_id, _ = model.image_token_ids()
    columns = torch.arange(input_ids.shape[1], device=device)
    last_start = torch.where(input_ids == start_id, columns, -1).amax(dim=1)  # (B,)
    last_end = torch.where(input_ids == end_id, columns, -1).amax(dim=1)  # (B,)
    open_span = last_start > last_end
    if bool((open_span & (last_start != input_ids.shape[1] - 1)).any()):
        raise ValueError(
            "a prompt ends inside an image span (an <image_start> with slots but no <image_end>); a prompt may end "
            "with <image_start> itself (the image is then generated), or with whole images only"
        )
    return input_ids, attention_mask, open_span


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids from the mask, as `GenerationMixin` computes them: cumsum - 1, padding at 0."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def _llm_kwargs(model: VPiTForCausalLM) -> dict[str, Any]:
    # Only the last position's logits are needed; the LLM skips the (B, T, V) projection when it supports it.
    return {"logits_to_keep": 1} if model.keeps_some_logits() else {}


def _split_images(
    sequences: torch.Tensor, visual: torch.Tensor, prompt_length: int, slot_id: int, k: int
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor | None]]:
    """(B, T + N) ids, (B, N, Dv) ẑ of every step -> per row its complete (K, Dv) images and a cut-short one."""
    images: list[list[torch.Tensor]] = []
    partial: list[torch.Tensor | None] = []
    for row, z in zip(sequences[:, prompt_length:], visual, strict=True):
        tokens = z[row == slot_id]  # (n, Dv), n slots in order
        whole = tokens.shape[0] // k * k
        images.append(list(tokens[:whole].reshape(-1, k, tokens.shape[-1]).unbind(0)))
        partial.append(tokens[whole:] if tokens.shape[0] > whole else None)
    return images, partial


def _ordinary(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    return [_ordinary(v) for v in value] if isinstance(value, list) else value


def _output(**fields: Any) -> VPiTGenerationOutput:
    # Decoding runs in inference mode, which costs less per op than no_grad (a step is many small ops). Its tensors
    # can be neither saved for backward nor updated in place afterwards, so the caller gets ordinary copies.
    with torch.inference_mode(False):
        return VPiTGenerationOutput(**{name: _ordinary(value) for name, value in fields.items()})


# ------------------------------------------------------------------------------------------------- generate


@torch.inference_mode()
def generate(
    model: VPiTForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    visual_tokens: torch.Tensor | None = None,
    visual_tokens_given: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    max_images_per_row: int | None = None,
    logits_processor: Sequence[LogitsProcessor] | None = None,
    visual_steps: int | None = None,
    visual_temperature: float | None = None,
    visual_guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
    streamer: Streamer | None = None,
    use_cache: bool = True,
    synced_gpus: bool | None = None,
) -> VPiTGenerationOutput:
    """Generate text and images: text is decoded as usual, each `<image_start>` is followed by K predicted visual
    tokens and a forced `<image_end>` (see the module docstring for the per-row state machine).

    Args:
        input_ids: (B, T) LEFT-padded prompts (e.g. the chat template with add_generation_prompt=True), with K
            slots per prompt image; a prompt may end with `<image_start>` to ask for an image straight away.
        attention_mask: (B, T), 0 on the left padding; all ones when omitted.
        pixel_values: (I, 3, S, S) the prompt images in slot order, row-major; or
        visual_tokens: (I, K, Dv) already encoded prompt images (e.g. a generated image fed back for an edit);
            with `visual_tokens_given` (I,) bool, only the rows it marks, the others encoded from `pixel_values`
            (which then holds exactly those images). A resampling bridge reads the images given as pixels whole and
            those given as tokens token-wise.
        generation_config: a `GenerationConfig`; the explicit arguments below override its fields.
        max_new_tokens: steps to run at most (slots and boundary tokens count); default 256.
        do_sample: sample (with temperature / top_k / top_p) instead of greedy decoding; default False.
        repetition_penalty: transformers' penalty, over the prompt and the new tokens.
        eos_token_id: one id or several ([]: never stop early); default the LLM's generation_config, then its
            config.
        pad_token_id: what finished rows emit; default the LLM's, else the first eos id.
        max_images_per_row: bar `<image_start>` from a row once it started this many images (None: no limit).
        logits_processor: extra transformers `LogitsProcessor`s, applied after the repetition penalty and before
            the warpers, as `GenerationMixin.generate` orders them. They see (B, T') ids and (B, V) float scores.
        visual_steps, visual_temperature, visual_guidance_scale: how a sampling visual head (`diffusion`) samples
            each token: denoising steps, the initial noise's scale, classifier-free guidance (None: the head's
            defaults, `visual_head_options`); an error with a regression head.
        generator: the random generator sampling draws from, text and sampled visual tokens alike (seed it for
            reproducible samples).
        streamer: `TextStreamer`-like; batch size 1 only. Receives the prompt's tokens without its slots (so that
            `skip_prompt=True` works), then every new token except image slots, then `end()`.
        use_cache: keep a `DynamicCache` (one position per step); False recomputes the whole prefix every step.
        synced_gpus: every process runs the same modules at every step and keeps stepping until all are done, as
            DeepSpeed ZeRO-3 needs (a partitioned module gathers its weights collectively when called); default:
            on when the model is ZeRO-3-partitioned across several processes, as transformers' `generate` does.

    Returns:
        `VPiTGenerationOutput` with `sequences` (B, T + N), `attention_mask`, `images` (per row, (K, Dv) each),
        `partial_images`, `num_new_tokens` (B,) and `finished` (B,).

    Raises:
        ValueError: on right padding, an image-slot count that does not match the images, a prompt ending inside
            an image span, max_new_tokens < 1, an image token among the eos ids, temperature / top_k / top_p
            without do_sample=True, or a streamer with more than one row.

    Example:
        >>> prompt = processor.apply_chat_template([{"role": "user", "content": "Draw a red circle."}],
        ...                                        add_generation_prompt=True)
        >>> out = generate(model, **processor(text=[prompt]), max_new_tokens=80)
        >>> processor.decode(out.sequences[0], skip_special_tokens=True), out.images[0]  # text, [(K, Dv), ...]
    """
    settings = _resolve_settings(
        model,
        generation_config,
        {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "repetition_penalty": repetition_penalty,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "max_images_per_row": max_images_per_row,
            "visual_steps": visual_steps,
            "visual_temperature": visual_temperature,
            "visual_guidance_scale": visual_guidance_scale,
        },
    )
    input_ids, attention_mask, open_span = _check_prompt(model, input_ids, attention_mask)
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError(
            f"a streamer takes one row, as transformers' streamers do; got a batch of {input_ids.shape[0]}"
        )
    start_id, end_id, slot_id = model.image_token_ids()
    k = model.image_slots  # slots of a generated image: K visual tokens, or Q queries
    connector = model.connector  # the 'queries' mode's queries and connector; None in the tokens mode
    queries = connector is not None
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    embed_tokens = model.get_input_embeddings()
    eos = torch.tensor(settings.eos_token_ids, dtype=torch.long, device=device)  # (E,)

    inputs_embeds, _ = model.embed(
        cast(torch.LongTensor, input_ids),
        pixel_values=pixel_values,
        visual_tokens=visual_tokens,
        visual_tokens_given=visual_tokens_given,
    )  # (B, T, H)
    image_mask = ImageTokenMask(slot_id, start_id, settings.max_images_per_row, _code_ids(model))
    processors = _processors(settings, image_mask, logits_processor, (attention_mask == 0).sum(-1))
    cache = DynamicCache(config=model.language_model.config) if use_cache else None
    llm_kwargs = _llm_kwargs(model)

    # Per-row state, all (B,).
    visual_left = torch.where(open_span, k, 0)  # visual steps still to run in the current image
    end_pending = torch.zeros(batch, dtype=torch.bool, device=device)  # the next step forces <image_end>
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    image_mask.images_started = open_span.long()
    num_new = torch.zeros(batch, dtype=torch.long, device=device)
    padded = not bool(attention_mask.all())

    sequences = input_ids  # (B, T')
    step_embeds = inputs_embeds  # (B, T, H) for the prefill, then (B, 1, H)
    all_embeds = inputs_embeds  # (B, T', H), kept only without a cache
    predicted: list[tuple[int, torch.Tensor]] = []  # (column, ẑ (B, Dv)) for the steps with a visual row
    # Queries mode: the hidden state at a query, (column, (B, H)); it is computed by the step after the query is fed.
    fed_query = torch.zeros(batch, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(input_ids[:, (input_ids[0] != slot_id) & (attention_mask[0] == 1)].cpu())

    if synced_gpus is None:
        synced_gpus = model.is_partitioned() and dist.is_initialized() and dist.get_world_size() > 1
    finished_here = False  # synced: this process is done and only keeps the others company
    visual_kwargs = _visual_kwargs(model, settings, generator)
    bidirectional = model.config.image_attention != "causal"

    for step in range(settings.max_new_tokens):
        if finished_here:
            # Call every module the other processes call (a one-position forward, the head, the bridge), record
            # nothing, until all of them are done.
            _, idle = model.run_language_model(inputs_embeds=step_embeds[:, -1:], use_cache=False, **llm_kwargs)
            if queries:
                model.query_embeddings(1)
            else:
                model.bridge_tokens(model.predict_visual(idle[:, -1], **visual_kwargs).to(step_embeds.dtype))
            if _all_done(True, device):
                break
            continue
        positions = _positions(attention_mask)  # (B, T')
        feed = step_embeds if use_cache else all_embeds
        # An all-ones mask says nothing; leaving it out spares the LLM rebuilding it at every step.
        mask = attention_mask if padded else None
        if bidirectional and (step == 0 or not use_cache):  # the prompt's images: one 4-D mask for the prefill
            generated = torch.arange(sequences.shape[1], device=device)[None] >= prompt_length  # response slots
            mask = model.llm_attention_mask(
                sequences, feed, mask, positions, cache, response_slots=generated.expand_as(sequences)
            )
        out, hidden = model.run_language_model(
            inputs_embeds=feed,
            attention_mask=mask,
            position_ids=positions[:, -feed.shape[1] :],
            past_key_values=cache,
            use_cache=use_cache,
            **llm_kwargs,
        )
        h_last = hidden[:, -1]  # (B, H), the LM head's input at the newest position
        if queries and bool(fed_query.any()):
            predicted.append((step - 1, h_last))  # the state at the query fed by the previous step

        visual = (visual_left > 0) & ~done  # (B,)
        text = ~(visual | end_pending | done)
        tokens = torch.full((batch,), settings.pad_token_id, dtype=torch.long, device=device)
        if bool(text.any()):
            sampled = _choose(processors, sequences, out.logits[:, -1], settings.do_sample, generator)  # (B,)
            tokens = torch.where(text, sampled, tokens)
        tokens = torch.where(end_pending, end_id, tokens)
        tokens = torch.where(visual, slot_id, tokens)
        next_embeds = embed_tokens(tokens)  # (B, H)
        if connector is not None and (bool(visual.any()) or synced_gpus):  # the row's next query, in order
            index = (k - visual_left).clamp(0, k - 1)  # (B,)
            fed = connector(index=index).to(next_embeds.dtype)  # (B, H)
            next_embeds = torch.where(visual[:, None], fed, next_embeds)
        elif bool(visual.any()) or synced_gpus:  # synced: the head and bridge run on every process at every step
            z_hat = model.predict_visual(h_last, **visual_kwargs)  # (B, Dv)
            bridged = model.bridge_tokens(z_hat.to(next_embeds.dtype)).to(next_embeds.dtype)  # (B, H)
            next_embeds = torch.where(visual[:, None], bridged, next_embeds)  # (B, H)
            if bool(visual.any()):
                predicted.append((step, z_hat))

        # The new column is real for every row that was not DONE before this step (an eos token included).
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, (~done).long()[:, None]], dim=1)
        num_new += (~done).long()
        if streamer is not None and not bool(visual[0] | done[0]):
            streamer.put(tokens[:1].cpu())

        fed_query = visual & queries
        visual_left = visual_left - visual.long()
        end_pending = visual & (visual_left == 0)
        started = text & (tokens == start_id)
        visual_left = torch.where(started, k, visual_left)
        image_mask.images_started = image_mask.images_started + started.long()
        done = done | (text & torch.isin(tokens, eos))
        if bool(done.any()):
            padded = True  # finished rows get attention-mask 0 from the next column on
        step_embeds = next_embeds[:, None]  # (B, 1, H)
        if not use_cache:
            all_embeds = torch.cat([all_embeds, step_embeds], dim=1)
        if synced_gpus:
            if _all_done(bool(done.all()), device):
                break
            finished_here = bool(done.all())
        elif bool(done.all()):
            break

    if streamer is not None:
        streamer.end()
    new_tokens = sequences.shape[1] - prompt_length
    width = h_last.shape[-1] if queries else model.vision_tower.hidden_size
    z_all = h_last.new_zeros(batch, new_tokens, width)  # (B, N, Dv), or the query states (B, N, H)
    for column, z_hat in predicted:
        z_all[:, column] = z_hat.to(z_all.dtype)
    images, partial = _split_images(sequences, z_all, prompt_length, slot_id, k)
    if queries:
        # A row cut off right after its last query never computed that query's state: its image is incomplete.
        images = [row[:-1] if bool(cut) else row for row, cut in zip(images, fed_query.tolist(), strict=True)]
        images, partial = _connect(model, images, h_last if synced_gpus else None), [None] * batch
    return _output(
        sequences=sequences,
        attention_mask=attention_mask,
        images=images,
        partial_images=partial,
        num_new_tokens=num_new,
        finished=done,
    )


def _connect(
    model: VPiTForCausalLM, states: list[list[torch.Tensor]], synced_like: torch.Tensor | None
) -> list[list[torch.Tensor]]:
    """Queries mode: per row, each image's (Q, H) query states -> its (Q, C) condition tokens, every image of the
    batch through the connector in one call; synced (`synced_like`, a tensor of the states' dtype and device), one
    call on zeros when this process made no image, as the others make theirs."""
    flat = [s for row in states for s in row]
    if not flat:
        if synced_like is not None:
            model.conditions(synced_like.new_zeros(1, model.image_slots, synced_like.shape[-1]))
        return [[] for _ in states]
    conditions = list(model.conditions(torch.stack(flat)).unbind(0))  # M x (Q, C)
    return [[conditions.pop(0) for _ in row] for row in states]


def _all_done(done_here: bool, device: torch.device) -> bool:
    """Whether every process is done (an all-reduce; each process calls it at every synced step)."""
    flag = torch.tensor([0.0 if done_here else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return bool(flag.item() == 0.0)


# --------------------------------------------------------------------------------------- reference (no cache)


@torch.inference_mode()
def generate_no_cache(
    model: VPiTForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    visual_tokens: torch.Tensor | None = None,
    visual_tokens_given: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    max_images_per_row: int | None = None,
    logits_processor: Sequence[LogitsProcessor] | None = None,
    visual_steps: int | None = None,
    visual_temperature: float | None = None,
    visual_guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
) -> VPiTGenerationOutput:
    """Reference decoding: each row alone (its padding stripped), no KV cache, the whole prefix re-embedded and
    recomputed at every step, the state machine written out with Python scalars. Same arguments and output as
    `generate` (no streamer); with greedy decoding it gives the same tokens and, to float precision, the same ẑ.
    Sampling draws the rows one after the other, so only a batch of one matches `generate` draw for draw.
    """
    settings = _resolve_settings(
        model,
        generation_config,
        {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "repetition_penalty": repetition_penalty,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "max_images_per_row": max_images_per_row,
            "visual_steps": visual_steps,
            "visual_temperature": visual_temperature,
            "visual_guidance_scale": visual_guidance_scale,
        },
    )
    if model.makes_queries:
        raise ValueError(
            "generate_no_cache is the reference of the 'tokens' generation mode; a 'queries' model's reference is "
            "VPiTForCausalLM.query_forward on the whole sequence (or generate(use_cache=False))"
        )
    input_ids, attention_mask, _ = _check_prompt(model, input_ids, attention_mask)
    _, _, slot_id = model.image_token_ids()
    k = model.config.num_visual_tokens
    # The slot-count check and its error message; and a resampling model's prompt embeddings, whose prompt images
    # the resampler reads whole (the re-embedded prefix below bridges the images token-wise, then takes these).
    prompt_embeds, encoded = model.embed(
        cast(torch.LongTensor, input_ids),
        pixel_values=pixel_values,
        visual_tokens=visual_tokens,
        visual_tokens_given=visual_tokens_given,
    )
    visual_tokens = encoded
    flat = None if visual_tokens is None else visual_tokens.reshape(-1, visual_tokens.shape[-1])  # (I * K, Dv)

    rows: list[list[int]] = []
    images: list[list[torch.Tensor]] = []
    partial: list[torch.Tensor | None] = []
    finished: list[bool] = []
    offset = 0
    for b, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
        prompt = ids[mask == 1][None]  # (1, T_b)
        num_slots = int((prompt == slot_id).sum())
        prompt_z = [] if flat is None else list(flat[offset : offset + num_slots].unbind(0))
        offset += num_slots
        resampled = prompt_embeds[b][mask == 1][None] if model.resamples else None  # (1, T_b, H)
        new, z_new, stopped = _reference_row(model, prompt, prompt_z, settings, logits_processor, generator, resampled)
        rows.append(new)
        finished.append(stopped)
        whole = len(z_new) // k * k
        images.append([torch.stack(z_new[i : i + k]) for i in range(0, whole, k)])
        partial.append(torch.stack(z_new[whole:]) if len(z_new) > whole else None)

    width = max(len(r) for r in rows)
    device = input_ids.device
    new_ids = torch.full((len(rows), width), settings.pad_token_id, dtype=torch.long, device=device)
    new_mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        new_ids[b, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
        new_mask[b, : len(r)] = 1
    return _output(
        sequences=torch.cat([input_ids, new_ids], dim=1),
        attention_mask=torch.cat([attention_mask, new_mask], dim=1),
        images=images,
        partial_images=partial,
        num_new_tokens=new_mask.sum(-1),
        finished=torch.tensor(finished, device=device),
    )


def _reference_row(
    model: VPiTForCausalLM,
    prompt: torch.Tensor,
    prompt_z: list[torch.Tensor],
    settings: _Settings,
    logits_processor: Sequence[LogitsProcessor] | None,
    generator: torch.Generator | None,
    prompt_embeds: torch.Tensor | None = None,
) -> tuple[list[int], list[torch.Tensor], bool]:
    """One row: (1, T) prompt ids and its K-per-image visual tokens (Dv,) each -> new token ids, generated ẑ
    (Dv,) each, and whether it stopped at eos. `prompt_embeds` (1, T, H), a resampling model's: the prompt's
    embeddings as `embed` made them, used for the first T positions."""
    start_id, end_id, slot_id = model.image_token_ids()
    k = model.config.num_visual_tokens
    embed_tokens = model.get_input_embeddings()
    image_mask = ImageTokenMask(slot_id, start_id, settings.max_images_per_row, _code_ids(model))
    processors = _processors(settings, image_mask, logits_processor, None)

    ids = prompt  # (1, T')
    z = list(prompt_z)  # the visual token of every slot in ids, in order
    generated: list[torch.Tensor] = []
    new: list[int] = []
    starts, ends = (ids[0] == start_id).nonzero(), (ids[0] == end_id).nonzero()
    prompt_opens_image = len(starts) > 0 and (len(ends) == 0 or int(starts[-1]) > int(ends[-1]))
    visual_left = k if prompt_opens_image else 0
    end_pending = stopped = False
    image_mask.images_started = torch.tensor([int(prompt_opens_image)], device=ids.device)
    for _ in range(settings.max_new_tokens):
        embeds = embed_tokens(ids)  # (1, T', H)
        slots = ids[0] == slot_id  # (T',)
        if z:
            embeds[0, slots] = model.bridge_tokens(torch.stack(z).to(embeds.dtype)).to(embeds.dtype)  # (n, H)
        if prompt_embeds is not None:
            embeds[:, : prompt_embeds.shape[1]] = prompt_embeds.to(embeds.dtype)
        new_slots = torch.arange(ids.shape[1], device=ids.device)[None] >= prompt.shape[1]  # response slots
        mask = model.llm_attention_mask(ids, embeds, None, response_slots=new_slots)
        out = model.language_model(
            inputs_embeds=embeds, attention_mask=mask, use_cache=False, output_hidden_states=True, return_dict=True
        )
        h_last = out.hidden_states[-1][:, -1]  # (1, H)
        if visual_left > 0:
            z_hat = model.predict_visual(h_last, **_visual_kwargs(model, settings, generator))[0]  # (Dv,)
            z.append(z_hat)
            generated.append(z_hat)
            token = slot_id
            visual_left -= 1
            end_pending = visual_left == 0
        elif end_pending:
            token = end_id
            end_pending = False
        else:
            token = int(_choose(processors, ids, out.logits[:, -1], settings.do_sample, generator)[0])
            stopped = token in settings.eos_token_ids
            if token == start_id:
                visual_left = k
                image_mask.images_started = image_mask.images_started + 1
        new.append(token)
        if stopped:
            return new, generated, True
        ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
    return new, generated, False


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "ImageTokenMask",
    "Streamer",
    "VPiTGenerationOutput",
    "generate",
    "generate_no_cache",
]
