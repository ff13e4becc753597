"""VPiTProcessor: the tokenizer (with a chat template) + the encoder's image transform, saved as one folder.

Text may carry `<image>` markers; each bare marker becomes `<image_start>` + K slot tokens + `<image_end>`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase

from .configuration_vpit import VPiTConfig
from .images import ImageSource, load_image
from .vision import build_image_transform

PROCESSOR_CONFIG_NAME = "processor_config.json"

# Used when the LLM's tokenizer has no chat template (base models). `{% generation %}` marks the assistant
# tokens so that `return_assistant_tokens_mask=True` gives the exact response mask; the space after "ASSISTANT:"
# sits inside the response so that byte-level BPE tokenises a reply the same in training and at generation time.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT:"
    "{% generation %} {{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template with which the response mask cannot be computed exactly."""


def _template(tokenizer: PreTrainedTokenizerBase) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default", next(iter(template.values())))
    if not isinstance(template, str):
        raise ValueError("the tokenizer has no chat template; VPiTProcessor installs a default one")
    return template


_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def assistant_mask(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it belongs to an assistant turn.

    Raises:
        ChatTemplateError: when the mask cannot be computed exactly.
    """
    if _GENERATION_TAG.search(_template(tokenizer)):
        encoded: Any = tokenizer.apply_chat_template(  # a BatchEncoding here (return_dict=True)
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(encoded["input_ids"]), [bool(m) for m in encoded["assistant_masks"]]

    def render(turns: list[dict[str, str]], generation_prompt: bool = False) -> str:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        return str(text)

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], generation_prompt=True)
        through = render(messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatTemplateError(
                f"the chat template is not prefix-stable at turn {i}: rendering the conversation up to that turn "
                "is not a prefix of the whole; add {% generation %} markers to the template",
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for start, end in encoded["offset_mapping"]:
        inside = any(s <= start and end <= e for s, e in spans)
        if not inside and any(start < e and end > s for s, e in spans):
            raise ChatTemplateError(
                f"a token spans the boundary of an assistant turn (characters {start}-{end}); the response mask "
                "would be approximate",
            )
        mask.append(inside)
    return list(encoded["input_ids"]), mask


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of one token string, looked up in the tokenizer (never hard-coded)."""
    ids = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(ids, int) or ids == tokenizer.unk_token_id:
        raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
    return ids


class VPiTProcessor:
    """Tokenizer + image transform for a VPiT model.

    Args:
        tokenizer: the LLM's tokenizer, already holding the image tokens (see `VPiTForCausalLM.add_image_tokens`).
        preprocess_config: the encoder's open_clip PreprocessCfg fields (size, mean, std, interpolation, ...).
        num_visual_tokens: K, slots per image.
        image_start_token / image_end_token / image_token: the span strings (the image marker is image_token).

    Example:
        >>> batch = processor(text=["<image> What colour is the shape?"], images=[pil_image])
        >>> batch["input_ids"].shape, batch["pixel_values"].shape
        (torch.Size([1, T]), torch.Size([1, 3, S, S]))
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        preprocess_config: dict[str, Any],
        num_visual_tokens: int,
        image_start_token: str = "<image_start>",
        image_end_token: str = "<image_end>",
        image_token: str = "<image>",
    ):
        self.tokenizer = tokenizer
        self.preprocess_config = dict(preprocess_config)
        self.num_visual_tokens = num_visual_tokens
        self.image_start_token = image_start_token
        self.image_end_token = image_end_token
        self.image_token = image_token
        self.image_transform = build_image_transform(self.preprocess_config)
        missing = [t for t in (image_start_token, image_end_token, image_token) if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"tokenizer lacks the image tokens {missing}; build with vpit.assemble(...) or call "
                "model.add_image_tokens(tokenizer) first"
            )
        if tokenizer.chat_template is None:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        start, end, slot = map(re.escape, (image_start_token, image_end_token, image_token))
        # Already-expanded spans are kept as they are; bare markers outside them are expanded.
        self._span_or_marker = re.compile(f"({start}(?:{slot})*{end})|{slot}")

    @classmethod
    def from_config(cls, tokenizer: PreTrainedTokenizerBase, config: VPiTConfig) -> VPiTProcessor:
        preprocess_config = config.get_vision_config().preprocess_config
        if preprocess_config is None:
            raise ValueError("config.vision_config.preprocess_config is not resolved (see resolve_vision_config)")
        return cls(
            tokenizer,
            preprocess_config,
            config.num_visual_tokens,
            config.image_start_token,
            config.image_end_token,
            config.image_token,
        )

    def check_config(self, config: VPiTConfig) -> None:
        """The model config is the one home of K and the image token strings; a processor holds copies of them.

        Raises:
            ValueError: naming both values, when a copy differs (e.g. a processor saved for another model).
        """
        ours = (self.num_visual_tokens, self.image_start_token, self.image_end_token, self.image_token)
        theirs = (config.num_visual_tokens, config.image_start_token, config.image_end_token, config.image_token)
        names = ("num_visual_tokens", "image_start_token", "image_end_token", "image_token")
        wrong = [
            f"{n}: processor {a!r}, model config {b!r}" for n, a, b in zip(names, ours, theirs, strict=True) if a != b
        ]
        if wrong:
            raise ValueError(
                f"the processor does not match the model config ({'; '.join(wrong)}); load both from the same folder"
            )

    # ------------------------------------------------------------------------------------------- text

    @property
    def image_span(self) -> str:
        return self.image_start_token + self.image_token * self.num_visual_tokens + self.image_end_token

    def expand_image_markers(self, text: str) -> tuple[str, int]:
        """Expand bare `<image>` markers into full spans. Returns the text and its number of images.

        Raises:
            ValueError: if an existing span holds a number of slots other than K.
        """
        count = 0

        def replace(match: re.Match) -> str:
            nonlocal count
            count += 1
            span = match.group(1)
            if span is None:
                return self.image_span
            slots = span.count(self.image_token)
            if slots != self.num_visual_tokens:
                raise ValueError(f"an image span holds {slots} slots, expected K={self.num_visual_tokens}")
            return span

        return self._span_or_marker.sub(replace, text), count

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        images: Sequence[ImageSource] | None = None,
        *,
        tokenize: bool = False,
        return_dict: bool = True,
        add_generation_prompt: bool = False,
        **template_kwargs: Any,
    ) -> Any:
        """The tokenizer's own chat template: text by default, or model inputs with `tokenize=True`.

        With `tokenize=True` the conversation (or a list of them) is rendered once and tokenised without adding
        special tokens again (the template writes BOS), each `image_token` marker becomes a full span of K slots,
        and the result is a BatchFeature with `input_ids`, `attention_mask`, `pixel_values` (images in marker
        order) and, unless `add_generation_prompt`, `labels`: the assistant tokens (their image boundary tokens
        included), -100 on prompts, image slots and padding. Rows are right-padded, or left-padded for a
        generation prompt.

        Example:
            >>> batch = processor.apply_chat_template(
            ...     [{"role": "user", "content": "Draw a red square."},
            ...      {"role": "assistant", "content": "Here is an image based on your request: <image>"}],
            ...     images=[red_square], tokenize=True)
            >>> model(**batch).loss

        Raises:
            ValueError: when the markers and the images differ in number; ChatTemplateError when the response mask
                cannot be computed exactly.
        """
        if not tokenize:
            return self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
            )
        if not return_dict:
            raise ValueError("tokenize=True returns a BatchFeature (input_ids, labels, pixel_values); keep return_dict")
        conversations = [conversation] if conversation and isinstance(conversation[0], dict) else conversation
        images = list(images or [])
        slot_id = token_id(self.tokenizer, self.image_token)
        rows, label_rows, counts = [], [], []
        for messages in cast(list[list[dict[str, Any]]], conversations):
            expanded, count = [], 0
            for message in messages:
                content, n = self.expand_image_markers(message["content"])
                expanded.append({**message, "content": content})
                count += n
            counts.append(count)
            if add_generation_prompt:
                ids = list(
                    self.tokenizer.apply_chat_template(
                        expanded, tokenize=True, add_generation_prompt=True, return_dict=False, **template_kwargs
                    )
                )
                mask = [False] * len(ids)
            else:
                ids, mask = assistant_mask(self.tokenizer, expanded)
            row = torch.tensor(ids, dtype=torch.long)  # (L,)
            rows.append(row)
            label_rows.append(torch.where(torch.tensor(mask) & (row != slot_id), row, -100))
        if sum(counts) != len(images):
            raise ValueError(
                f"the conversations hold {sum(counts)} image marker(s) ({self.image_token!r}) per row {counts} "
                f"but {len(images)} image(s) were given"
            )
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), int(pad), dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, label_rows, strict=True)):
            cut = slice(length - len(row), length) if add_generation_prompt else slice(0, len(row))
            input_ids[i, cut], labels[i, cut], attention_mask[i, cut] = row, label, 1
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if not add_generation_prompt:
            data["labels"] = labels
        if images:
            data["pixel_values"] = self.preprocess_images(images)
        return BatchFeature(data=data)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return str(self.tokenizer.decode(*args, **kwargs))

    # ----------------------------------------------------------------------------------------- images

    def preprocess_images(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Images (PIL, paths, bytes) -> (I, 3, S, S): decoded, EXIF-oriented and converted to RGB by
        `vpit.model.images.load_image` (transparency onto white, 16-bit scaled), then the encoder's transform."""
        return torch.stack([self.image_transform(load_image(image)) for image in images])

    # ------------------------------------------------------------------------------------------- call

    def __call__(
        self,
        text: str | list[str],
        images: list[ImageSource] | None = None,
        return_tensors: str = "pt",
        padding: bool | str = True,
        **tokenizer_kwargs: Any,
    ) -> BatchFeature:
        """Tokenise `text` (markers expanded) and transform `images` (in the order their markers appear).

        Returns a BatchFeature with input_ids, attention_mask and (when there are images) pixel_values.

        Raises:
            ValueError: when the number of markers differs from the number of images, or the tokenizer did not
                keep every span whole (e.g. truncation cut through one).
        """
        texts = [text] if isinstance(text, str) else list(text)
        images = list(images or [])
        expanded, counts = zip(*(self.expand_image_markers(t) for t in texts), strict=True)
        if sum(counts) != len(images):
            raise ValueError(
                f"the text holds {sum(counts)} image marker(s) ({self.image_token!r}) per row {list(counts)} "
                f"but {len(images)} image(s) were given"
            )
        encoding = self.tokenizer(list(expanded), return_tensors=return_tensors, padding=padding, **tokenizer_kwargs)
        slot_id = token_id(self.tokenizer, self.image_token)
        slots = int(torch.as_tensor(encoding["input_ids"]).eq(slot_id).sum())
        if slots != len(images) * self.num_visual_tokens:
            raise ValueError(
                f"tokenised text holds {slots} image slots, expected {len(images)} x {self.num_visual_tokens}; "
                "was an image span truncated?"
            )
        data = dict(encoding)
        if images:
            data["pixel_values"] = self.preprocess_images(images)
        return BatchFeature(data=data, tensor_type=return_tensors)

    # --------------------------------------------------------------------------------------- save/load

    def to_dict(self) -> dict[str, Any]:
        return {
            "processor_class": type(self).__name__,
            "preprocess_config": self.preprocess_config,
            "num_visual_tokens": self.num_visual_tokens,
            "image_start_token": self.image_start_token,
            "image_end_token": self.image_end_token,
            "image_token": self.image_token,
        }

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write the tokenizer (with its chat template) and processor_config.json into `save_directory`."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        (save_directory / PROCESSOR_CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, trust_remote_code: bool = False, **hub_kwargs: Any
    ) -> VPiTProcessor:
        """Load from a local VPiT folder or a Hub repo id (`hub_kwargs` go to `hf_hub_download`)."""
        folder = Path(name_or_path)
        if folder.is_dir():
            config_file = folder / PROCESSOR_CONFIG_NAME
            if not config_file.is_file():
                raise FileNotFoundError(f"{folder} has no {PROCESSOR_CONFIG_NAME}; is it a VPiT folder?")
        else:
            from huggingface_hub import hf_hub_download

            config_file = Path(hf_hub_download(str(name_or_path), PROCESSOR_CONFIG_NAME, **hub_kwargs))
        config = json.loads(config_file.read_text())
        config.pop("processor_class", None)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **hub_kwargs)
        processor = cls(tokenizer, **config)
        model_config = config_file.with_name("config.json")
        if model_config.is_file():  # a VPiT model folder: the model's config is the one home of K and the tokens
            processor.check_config(VPiTConfig.from_pretrained(model_config.parent))
        return processor


__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ChatTemplateError",
    "VPiTProcessor",
    "assistant_mask",
    "token_id",
]
