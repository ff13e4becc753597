"""Tokenise a `Sample` with the tokenizer's own chat template into an encoded sample for the collator.

The response (assistant) mask is the processor's (`vpit.model.processing_vpit.assistant_mask`), exact or refused:
a template whose mask cannot be computed exactly refuses the sample (reason `tokenization`). A sample whose mask
ends up empty is refused too (`no_labels`): it would train on nothing, silently.

Encoded sample (the collator's input):
    input_ids (L,) | labels (L,) = ids on assistant tokens except image slots, -100 elsewhere
    visual_target_mask (L,) = image slots of response images (`vpit.model.modeling_vpit.response_slot_mask`)
    pixel_values (J, 3, S, S) the images to encode: all I of them, or those not in the feature cache
    visual_tokens (I, K, Dv), visual_tokens_given (I,) bool: present when some image's tokens came from the feature
        cache (`vpit.data.features`); rows not given are zeros and their pixels are in pixel_values, in order
    id, source, index: where it came from
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from ..model.losses import IGNORE_INDEX
from ..model.modeling_vpit import response_slot_mask
from ..model.processing_vpit import ChatTemplateError, VPiTProcessor, assistant_mask, token_id
from .features import FeatureCache
from .formats import check_sample, with_image_token
from .records import RecordError, Sample, load_record_image


def encode_sample(
    sample: Sample, processor: VPiTProcessor, max_length: int | None = None, features: FeatureCache | None = None
) -> dict[str, Any]:
    """Check, load the images of, and tokenise one sample; an image whose encoder tokens are in `features` is not
    loaded at all.

    Raises:
        RecordError: for any structural, image or tokenisation problem (the reason says which).
    """
    check_sample(sample)
    cached = [features.get(image, sample.image_root) if features is not None else None for image in sample.images]
    pixels = [
        processor.image_transform(load_record_image(image, sample.image_root))
        for image, tokens in zip(sample.images, cached, strict=True)
        if tokens is None
    ]
    size = processor.preprocess_config.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else size
    pixel_values = torch.stack(pixels) if pixels else torch.zeros(0, 3, height, width)
    given = [tokens for tokens in cached if tokens is not None]

    messages = [
        {**m, "content": processor.expand_image_markers(m["content"])[0]}
        for m in with_image_token(sample.messages, processor.image_token)
    ]
    try:
        ids, mask = assistant_mask(processor.tokenizer, messages)
    except ChatTemplateError as err:
        raise RecordError("tokenization", str(err)) from err
    input_ids = torch.tensor(ids, dtype=torch.long)  # (L,)
    in_response = torch.tensor(mask, dtype=torch.bool)  # (L,)
    tokenizer = processor.tokenizer
    slot = input_ids == token_id(tokenizer, processor.image_token)
    start = input_ids == token_id(tokenizer, processor.image_start_token)
    end = input_ids == token_id(tokenizer, processor.image_end_token)
    k = processor.num_visual_tokens
    if int(slot.sum()) != k * len(sample.images) or int(start.sum()) != len(sample.images):
        raise RecordError(
            "tokenization",
            f"tokenised text holds {int(slot.sum())} image slots / {int(start.sum())} spans for "
            f"{len(sample.images)} image(s) x K={k}: the tokenizer split or merged an image token",
        )

    if max_length is not None and len(input_ids) > max_length:
        # Cut only after the last complete image span; never through one.
        span_ends = torch.nonzero(end).flatten()
        if len(span_ends) and int(span_ends[-1]) >= max_length:
            raise RecordError(
                "truncates_image",
                f"{len(input_ids)} tokens > max_length={max_length} and image span ending at token "
                f"{int(span_ends[-1])} would be cut",
            )
        input_ids, in_response, slot = input_ids[:max_length], in_response[:max_length], slot[:max_length]

    labels = torch.where(in_response & ~slot, input_ids, IGNORE_INDEX)
    if not bool((labels != IGNORE_INDEX).any()):
        raise RecordError("no_labels", f"no assistant token among the {len(input_ids)} tokens kept")
    start_id = token_id(tokenizer, processor.image_start_token)
    targets = response_slot_mask(input_ids[None], labels[None], start_id, token_id(tokenizer, processor.image_token))
    encoded = {
        "input_ids": input_ids,
        "labels": labels,
        "visual_target_mask": targets[0],
        "pixel_values": pixel_values,
        "id": sample.id,
        "source": sample.source,
        "index": sample.index,
    }
    if given:
        zeros = torch.zeros_like(given[0])
        encoded["visual_tokens"] = torch.stack([zeros if t is None else t for t in cached])  # (I, K, Dv)
        encoded["visual_tokens_given"] = torch.tensor([t is not None for t in cached])  # (I,)
    return encoded


def encode_query_sample(
    sample: Sample,
    processor: VPiTProcessor,
    num_queries: int,
    decoder_transform: Callable[[Image.Image], torch.Tensor],
    max_length: int | None = None,
    encoder_transform: Callable[[Image.Image], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """A sample for the 'queries' mode (`vpit.training.stages.queries`): the conversation up to and including the
    `<image_start>` of its first response image, then Q query slots and `<image_end>`; that image is the decoder's
    target (`decoder_images` (1, 3, R, R) through `decoder_transform`), not an input. Earlier images (the prompt's,
    or an edit's source) are read through the bridge as usual; the text after the target image is dropped.

    Encoded sample: as `encode_sample`'s, with visual_target_mask marking the Q query slots and labels on the answer
    text before the image and its `<image_start>` (the slots and `<image_end>` unlabelled); with
    `encoder_transform`, also the target through it (`target_pixels` (1, 3, S, S), for the vision encoder).

    Raises:
        RecordError: `no_response_image` when no answer holds an image, `too_long` past max_length, and
            `encode_sample`'s reasons.
    """
    encoded = encode_sample(sample, processor)
    input_ids, labels = encoded["input_ids"], encoded["labels"]
    tokenizer = processor.tokenizer
    start_id, end_id = token_id(tokenizer, processor.image_start_token), token_id(tokenizer, processor.image_end_token)
    slot_id = token_id(tokenizer, processor.image_token)
    starts = torch.nonzero(input_ids == start_id).flatten()  # (I,), one per image in order
    answered = [i for i, position in enumerate(starts.tolist()) if int(labels[position]) != IGNORE_INDEX]
    if not answered:
        raise RecordError("no_response_image", "the queries stage trains on answers that hold an image; none does")
    target, cut = answered[0], int(starts[answered[0]]) + 1
    tail = torch.tensor([slot_id] * num_queries + [end_id])
    ids = torch.cat([input_ids[:cut], tail])  # (L,)
    if max_length is not None and len(ids) > max_length:
        raise RecordError("too_long", f"{len(ids)} tokens up to the target image's queries > max_length={max_length}")
    queries = torch.zeros(len(ids), dtype=torch.bool)
    queries[cut : cut + num_queries] = True
    image = load_record_image(sample.images[target], sample.image_root)
    extra = {"target_pixels": encoder_transform(image)[None]} if encoder_transform is not None else {}
    return {
        **extra,
        **{key: encoded[key] for key in ("id", "source", "index")},
        "input_ids": ids,
        "labels": torch.cat([labels[:cut], torch.full((num_queries + 1,), IGNORE_INDEX)]),
        "visual_target_mask": queries,
        "pixel_values": encoded["pixel_values"][:target],  # the images before the target, in slot order
        "decoder_images": decoder_transform(image)[None],  # (1, 3, R, R)
    }


__all__ = ["encode_query_sample", "encode_sample"]
