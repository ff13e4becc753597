"""`VPiTPipeline`: chat with a VPiT model in text and images, in one call.

    prompt (+ history, + images) ──chat template──► <image> markers expanded to K slots ──► left-padded ids (B, T)
    images: given ones ──vision encoder──► z (I, K, Dv); generated ones are already z ──┘ spliced at the slots
                                    vpit.inference.generation.generate ──► new ids (B, N) + predicted ẑ (K, Dv) per image
    new ids ──decode──► text, `<image>` where each complete image was      ẑ ──decoder (optional)──► PIL images

History. A `Conversation` holds the messages so far (content strings with `<image>` markers, the chat format of
`vpit.data`) and the images those markers stand for, in order: an image the user gave (PIL image or path) is
encoded by the model's vision tower when the prompt is built; an image the model generated is kept as its predicted
visual tokens ẑ (K, Dv) and fed back as they are (`generate(visual_tokens=...)`), never decoded to pixels and
re-encoded. ẑ is what the model saw itself produce, so a later turn ("make it blue") conditions on exactly the
tokens of its own image, and no decoder is needed to continue a conversation.

Letters as in `vpit.model.configuration_vpit`: B rows, T prompt length, N new tokens, I images, K visual tokens per image,
Dv their width.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict, overload

import torch
from PIL import Image
from transformers import TextIteratorStreamer
from transformers.generation import LogitsProcessor

from ..decoder import VPiTDecoderPipeline
from ..errors import check_decoder_folder, check_model_folder
from ..model.images import ImageSource
from ..model.modeling_vpit import VPiTForCausalLM
from ..model.processing_vpit import VPiTProcessor
from .generation import DEFAULT_MAX_NEW_TOKENS, Streamer, VPiTGenerationOutput, generate

if TYPE_CHECKING:
    from typing import Unpack

ConversationImage = ImageSource | torch.Tensor
"""An image of a conversation: one the user gave (PIL image, path, bytes) or one the model generated, kept as its
predicted visual tokens, a (K, Dv) tensor."""

Message = dict[str, Any]
"""A chat message, {"role": "system" | "user" | "assistant", "content": str with `<image>` markers}."""

# How answers are decoded, by `answer_text` and by the stream alike (so that the two give the same text).
_DECODE_KWARGS: dict[str, Any] = {"skip_special_tokens": True}


@dataclass
class Conversation:
    """The messages of a chat so far and the images their `<image>` markers stand for, in marker order.

    Args:
        messages: chat messages whose `content` is a string; each `<image>` marker is one image.
        images: one entry per marker, in order: a given image (PIL image, path, bytes), or the (K, Dv) visual tokens
            of an image the model generated (fed back as they are, not re-encoded from pixels).

    Example:
        >>> out = pipe("Generate an image of a red circle.", start_with_image=True)
        >>> out.conversation.messages[-1]
        {'role': 'assistant', 'content': '<image> ...'}
        >>> pipe("Make it blue.", history=out.conversation).images   # the red circle's tokens are in the prompt
    """

    messages: list[Message] = field(default_factory=list)
    images: list[ConversationImage] = field(default_factory=list)

    def extended(self, role: str, content: str, images: Sequence[ConversationImage] = ()) -> Conversation:
        """A new conversation: this one plus one message (and the images of its markers). This one is unchanged."""
        return Conversation([*self.messages, {"role": role, "content": content}], [*self.images, *images])


class AnswerOptions(TypedDict, total=False):
    """Keyword arguments of `VPiTPipeline.__call__` and `.stream`; every one is optional.

    Args:
        history: the `Conversation` the prompt continues (single prompts only): `out.conversation` of an answer.
        max_new_tokens: tokens to generate at most (K slots and two boundary tokens per image count); 256.
        do_sample, temperature, top_p, top_k: sampling (default greedy), as in `vpit.inference.generation.generate`.
        start_with_image: the answer starts with a generated image: the prompt is rendered as an answer that opens
            with `<image_start>` (as training renders an answer that is an image), and the image follows.
        max_images_per_row: images an answer may start at most (None: no limit).
        logits_processor: extra transformers `LogitsProcessor`s, passed to `generate`.
        visual_steps, visual_temperature, visual_guidance_scale: how a sampling visual head (`diffusion`) samples
            the visual tokens, as in `generate` (None: the head's defaults).
        num_inference_steps: the decoder's denoising steps; 50.
        guidance_scale: the decoder's classifier-free guidance scale; 7.5.
        seed: seeds both sampling and the decoder's initial noise (None: the global RNG).
    """

    history: Conversation | None
    max_new_tokens: int
    do_sample: bool
    temperature: float | None
    top_p: float | None
    top_k: int | None
    start_with_image: bool
    max_images_per_row: int | None
    logits_processor: Sequence[LogitsProcessor] | None
    visual_steps: int | None
    visual_temperature: float | None
    visual_guidance_scale: float | None
    num_inference_steps: int
    guidance_scale: float
    seed: int | None


@dataclass
class VPiTPipelineOutput:
    """One answer of `VPiTPipeline`.

    Args:
        text: the answer as decoded (special tokens skipped; a leading space may come from the chat template), with
            the image placeholder (`processor.image_token`, "<image>") where each complete generated image stands.
        images: the generated images decoded to pixels, in order; empty when the pipeline has no decoder.
        visual_tokens: the predicted visual tokens of each complete generated image, (K, Dv) each, in order.
        sequences: (L,) the row's token ids, prompt then answer (image slots as `image_token_id`), padding dropped.
        prompt_length: how many of `sequences` are the prompt.
        finished: whether the answer stopped at an eos token (False: it ran out of `max_new_tokens`).
        conversation: the history, this turn's user message and the answer (its images as visual tokens); pass it
            as `history=` to continue the chat.
    """

    text: str
    images: list[Image.Image]
    visual_tokens: list[torch.Tensor]
    sequences: torch.Tensor
    prompt_length: int
    finished: bool
    conversation: Conversation


class VPiTPipeline:
    """A VPiT model, its processor and (optionally) the diffusion decoder that turns visual tokens into pixels.

    Args:
        model: the VPiT model.
        processor: its processor (tokenizer with chat template, image transform).
        decoder: a `VPiTDecoderPipeline` for the model's visual tokens (same K and Dv; a 'queries' model's: its
            Q condition tokens of width C); None: answers carry the tokens of their images but no pixels.

    Example:
        >>> pipe = VPiTPipeline.from_pretrained("out/vpit", decoder="out/decoder")
        >>> out = pipe("Generate an image of a small red circle on the left.", seed=0)
        >>> out.text, out.images                 # 'Here is an image based on your request: <image>', [PIL image]
        >>> pipe("<image> What colour is the shape?", images=["circle.png"]).text
    """

    def __init__(
        self, model: VPiTForCausalLM, processor: VPiTProcessor, decoder: VPiTDecoderPipeline | None = None
    ) -> None:
        processor.check_config(model.config)
        if decoder is not None and model.makes_queries:
            decoder.check_condition(model.image_slots, model.condition_size, "the model (the 'queries' mode)")
        elif decoder is not None:
            projector = decoder.projector.config
            expected = (model.config.num_visual_tokens, model.vision_tower.hidden_size)
            found = (projector["num_visual_tokens"], projector["vision_hidden_size"])
            if found != expected:
                raise ValueError(
                    f"the decoder reads K={found[0]} visual tokens of width Dv={found[1]} but the model predicts "
                    f"K={expected[0]} of width Dv={expected[1]}; pass the decoder trained for this model's encoder"
                )
        self.model = model
        self.processor = processor
        self.decoder = decoder
        self.image_start_id, self.image_end_id, self.image_slot_id = model.image_token_ids()

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike[str],
        decoder: str | os.PathLike[str] | VPiTDecoderPipeline | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
    ) -> VPiTPipeline:
        """Load a saved VPiT folder (model + processor) and, optionally, a decoder.

        Args:
            model_dir: a folder written by `model.save_pretrained` + `processor.save_pretrained`.
            decoder: a decoder folder (written by `VPiTDecoderPipeline.save_pretrained`), a loaded decoder, or None.
            dtype: weights dtype ("bfloat16", torch.float16, ...); default as saved.
            device: where to run; default "cuda" when available, else "cpu".

        Raises:
            vpit.errors.FolderError: a local path that is missing or not a folder of the kind asked for.
        """
        if isinstance(dtype, str):
            resolved = getattr(torch, dtype, None)
            if not isinstance(resolved, torch.dtype):
                raise ValueError(f"dtype must name a torch dtype (float32, bfloat16, float16), got {dtype!r}")
            dtype = resolved
        check_model_folder(model_dir)
        if decoder is not None and not isinstance(decoder, VPiTDecoderPipeline):
            check_decoder_folder(decoder)
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        model = VPiTForCausalLM.from_pretrained(model_dir, **({"dtype": dtype} if dtype is not None else {}))
        # PreTrainedModel.to is declared through functools.wraps, which mypy reads as unbound; call Module.to.
        torch.nn.Module.to(model, device).eval()
        processor = VPiTProcessor.from_pretrained(os.fspath(model_dir))
        if decoder is not None and not isinstance(decoder, VPiTDecoderPipeline):
            loaded = VPiTDecoderPipeline.from_pretrained(decoder, **({"dtype": dtype} if dtype is not None else {}))
            if not isinstance(loaded, VPiTDecoderPipeline):
                raise ValueError(f"{decoder} holds a {type(loaded).__name__}, not a VPiTDecoderPipeline")
            decoder = loaded
        if decoder is not None:
            decoder.to(device)
        return cls(model, processor, decoder)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------------------------------------ call

    @overload
    def __call__(
        self, prompt: str | list[Message], images: Sequence[ImageSource] | None = None, **options: Unpack[AnswerOptions]
    ) -> VPiTPipelineOutput: ...

    @overload
    def __call__(
        self, prompt: list[str], images: Sequence[ImageSource] | None = None, **options: Unpack[AnswerOptions]
    ) -> list[VPiTPipelineOutput]: ...

    def __call__(
        self,
        prompt: str | list[str] | list[Message],
        images: Sequence[ImageSource] | None = None,
        **options: Unpack[AnswerOptions],
    ) -> VPiTPipelineOutput | list[VPiTPipelineOutput]:
        """Answer a prompt, a batch of prompts, or a list of chat messages, in text and images.

        Args:
            prompt: a user message (str), a batch of user messages (list of str: one answer each, generated together
                in one left-padded batch), or chat messages ([{"role", "content"}, ...]). Each `<image>` marker
                stands for one image; a single str prompt with images but no marker gets one "<image> " per image
                in front.
            images: the prompt images (PIL images or paths) in marker order (row-major for a batch).
            options: the keyword arguments of `AnswerOptions` (history, max_new_tokens, sampling, start_with_image,
                num_inference_steps, guidance_scale, seed, ...).

        Returns:
            a `VPiTPipelineOutput`, or a list of them for a list of str.

        Raises:
            ValueError: on a marker count that differs from the images, a message whose content is not a string, a
                history with a batch, or bad generation arguments (see `vpit.inference.generation.generate`).
        """
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return self._run([str(p) for p in prompt], list(images or []), **options)
        return self._run([_single(prompt)], list(images or []), **options)[0]

    def stream(
        self, prompt: str | list[Message], images: Sequence[ImageSource] | None = None, **options: Unpack[AnswerOptions]
    ) -> VPiTStream:
        """Answer one prompt, yielding its text while it is generated: whole words, as transformers'
        `TextIteratorStreamer` yields them, and the image placeholder when an image completes.

        Takes the arguments of `__call__` (a single prompt). Generation, then decoding the images, runs in a
        background thread; iterate the returned `VPiTStream` for the text pieces (they concatenate to
        `output.text`), then read its `.output`, the whole `VPiTPipelineOutput`. An error in the thread is raised by
        the iteration.

        Example:
            >>> stream = pipe.stream("Describe a red circle.")
            >>> for piece in stream:
            ...     print(piece, end="", flush=True)
            >>> stream.output.images
        """
        single = _single(prompt)
        streamer = _TextPieces(self.processor, self.image_end_id)
        return VPiTStream(streamer, lambda: self._run([single], list(images or []), streamer=streamer, **options)[0])

    # ---------------------------------------------------------------------------------------------- steps

    def _run(
        self,
        prompts: list[str | list[Message]],
        images: list[ImageSource],
        *,
        history: Conversation | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        start_with_image: bool = False,
        max_images_per_row: int | None = None,
        logits_processor: Sequence[LogitsProcessor] | None = None,
        visual_steps: int | None = None,
        visual_temperature: float | None = None,
        visual_guidance_scale: float | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        seed: int | None = None,
        streamer: Streamer | None = None,
    ) -> list[VPiTPipelineOutput]:
        if history is not None and len(prompts) > 1:
            raise ValueError("history= continues one conversation; pass a single prompt with it, not a batch")
        conversations = self._conversations(prompts, images, history or Conversation())
        texts = [self._prompt_text(c, start_with_image) for c in conversations]
        expanded = [self.processor.expand_image_markers(t)[0] for t in texts]
        encoding = self.processor.tokenizer(
            expanded, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
        all_images = [image for c in conversations for image in c.images]
        visual_tokens, visual_tokens_given, pixel_values = self._visual_inputs(all_images)
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        out = generate(
            self.model,
            encoding["input_ids"].to(self.device),
            encoding["attention_mask"].to(self.device),
            pixel_values,
            visual_tokens=visual_tokens,
            visual_tokens_given=visual_tokens_given,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_images_per_row=max_images_per_row,
            logits_processor=logits_processor,
            visual_steps=visual_steps,
            visual_temperature=visual_temperature,
            visual_guidance_scale=visual_guidance_scale,
            generator=generator,
            streamer=streamer,
        )
        pixels = self._decode_images(out, num_inference_steps, guidance_scale, seed)
        return self._outputs(out, conversations, pixels, encoding["input_ids"].shape[1])

    def _prompt_text(self, conversation: Conversation, start_with_image: bool) -> str:
        """The chat template's prompt; with `start_with_image`, rendered as an answer that begins with an image and
        continues from its `<image_start>`, so the model sees exactly what training showed it before an image that
        opens an answer (the template's own separator included, e.g. the space after "ASSISTANT:"), not
        `<image_start>` glued to the generation prompt."""
        if not start_with_image:
            return str(self.processor.apply_chat_template(conversation.messages, add_generation_prompt=True))
        opened = [*conversation.messages, {"role": "assistant", "content": self.processor.image_start_token}]
        return str(self.processor.apply_chat_template(opened, continue_final_message=True))

    def _conversations(
        self, prompts: list[str | list[Message]], images: list[ImageSource], history: Conversation
    ) -> list[Conversation]:
        """Each prompt as the history plus its new messages, with its share of `images` (markers counted)."""
        marker = self.processor.image_token
        conversations = []
        remaining = list(images)
        for prompt in prompts:
            if isinstance(prompt, str):
                if marker not in prompt and len(prompts) == 1 and remaining:
                    prompt = f"{marker} " * len(remaining) + prompt
                messages: list[Message] = [{"role": "user", "content": prompt}]
            else:
                messages = list(prompt)
            for message in messages:
                if not isinstance(message.get("content"), str) or "role" not in message:
                    raise ValueError(
                        "each message must be {'role': ..., 'content': str} with <image> markers, got "
                        f"{message!r:.200}"
                    )
            count = sum(self.processor.expand_image_markers(m["content"])[1] for m in messages)
            if count > len(remaining):
                raise ValueError(f"the prompt(s) hold more {marker!r} markers than the {len(images)} image(s) given")
            conversation = history
            for message in messages:
                n = self.processor.expand_image_markers(message["content"])[1]
                conversation = conversation.extended(message["role"], message["content"], remaining[:n])
                remaining = remaining[n:]
            conversations.append(conversation)
        if remaining:
            raise ValueError(
                f"{len(images)} image(s) were given but the prompt(s) hold only "
                f"{len(images) - len(remaining)} {marker!r} marker(s)"
            )
        for conversation in conversations:
            count = sum(self.processor.expand_image_markers(m["content"])[1] for m in conversation.messages)
            if count != len(conversation.images):
                raise ValueError(
                    f"the conversation holds {count} {marker!r} marker(s) but {len(conversation.images)} image(s)"
                )
        return conversations

    def _visual_inputs(
        self, images: list[ConversationImage]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Images in marker order -> `generate`'s visual_tokens (I, K, Dv): given images through the vision tower (in
        one batch), generated ones as their own predicted tokens. A resampling model gets the given images' pixels
        instead, since its bridge reads their patch tokens. Returns (visual_tokens, visual_tokens_given, pixel_values)."""
        if not images:
            return None, None, None
        k, dv = self.model.config.num_visual_tokens, self.model.vision_tower.hidden_size
        given = [image for image in images if not isinstance(image, torch.Tensor)]
        encoded: list[torch.Tensor] = []
        pixels = None
        if given:
            pixels = self.processor.preprocess_images(given).to(self.device)  # (I', 3, S, S)
            if self.model.resamples:
                encoded = [pixels.new_zeros(k, dv)] * len(given)  # placeholders: embed encodes these rows
            else:
                with torch.inference_mode():
                    encoded = list(self.model.encode_images(pixels).unbind(0))  # I' x (K, Dv)
        tokens = []
        for image in images:
            if isinstance(image, torch.Tensor):
                if self.model.makes_queries:
                    raise ValueError(
                        "a 'queries' model reads earlier generated images back as pictures, not as tokens: give the "
                        "pipeline a decoder, so that the conversation's history holds the decoded images"
                    )
                if tuple(image.shape) != (k, dv):
                    raise ValueError(
                        f"a generated image's visual tokens must be (K, Dv) = ({k}, {dv}), got {tuple(image.shape)}"
                    )
                tokens.append(image.to(self.device))
            else:
                tokens.append(encoded.pop(0))
        stacked = torch.stack([t.to(tokens[0].dtype) for t in tokens])  # (I, K, Dv)
        if not self.model.resamples or pixels is None:
            return stacked, None, None
        tokens_given = torch.tensor([isinstance(image, torch.Tensor) for image in images], device=self.device)
        return stacked, tokens_given, pixels

    def _decode_images(
        self, out: VPiTGenerationOutput, steps: int, guidance_scale: float, seed: int | None
    ) -> list[list[Image.Image]]:
        """Per row, its generated images as PIL (all rows' images in one decoder batch); empty without decoder."""
        assert out.images is not None  # generate always fills it
        counts = [len(row) for row in out.images]
        if self.decoder is None or not sum(counts):
            return [[] for _ in counts]
        decoder = self.decoder
        tokens = torch.stack([z for row in out.images for z in row])  # (I, K, Dv)
        tokens = tokens.to(device=decoder.device, dtype=decoder.projector.dtype)
        generator = None if seed is None else torch.Generator(decoder.device).manual_seed(seed)
        result = decoder(
            visual_tokens=tokens,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pil",
        )
        pil: list[Image.Image] = list(result.images if not isinstance(result, tuple) else result[0])
        rows, start = [], 0
        for count in counts:
            rows.append(pil[start : start + count])
            start += count
        return rows

    def _outputs(
        self,
        out: VPiTGenerationOutput,
        conversations: list[Conversation],
        pixels: list[list[Image.Image]],
        prompt_width: int,
    ) -> list[VPiTPipelineOutput]:
        assert out.sequences is not None and out.attention_mask is not None and out.images is not None
        assert out.num_new_tokens is not None and out.finished is not None
        outputs = []
        for row, conversation in enumerate(conversations):
            mask = out.attention_mask[row].bool()
            sequence = out.sequences[row][mask].cpu()  # (L,)
            prompt_length = int(mask[:prompt_width].sum())
            new = out.sequences[row, prompt_width : prompt_width + int(out.num_new_tokens[row])].tolist()
            text = self.answer_text(new)
            images = [z.detach().cpu() for z in out.images[row]]
            # A 'queries' model reads its own images back as pictures (its condition tokens are no encoder tokens).
            decoded = self.model.makes_queries and self.decoder is not None
            history: list[ConversationImage] = list(pixels[row]) if decoded else list(images)
            outputs.append(
                VPiTPipelineOutput(
                    text=text,
                    images=pixels[row],
                    visual_tokens=images,
                    sequences=sequence,
                    prompt_length=prompt_length,
                    finished=bool(out.finished[row]),
                    conversation=conversation.extended("assistant", text.strip(), history),
                )
            )
        return outputs

    def answer_text(self, new_tokens: Sequence[int]) -> str:
        """New token ids -> the answer text: special tokens skipped, the image placeholder at each `<image_end>` (so a
        complete image shows as one "<image>", an image cut short by max_new_tokens not at all). Decoded piece by
        piece between images, exactly as `stream` yields it."""
        pieces: list[str] = []
        segment: list[int] = []
        for token in new_tokens:
            if token == self.image_end_id:
                pieces += [self.processor.decode(segment, **_DECODE_KWARGS), self.processor.image_token]
                segment = []
            else:
                segment.append(token)
        pieces.append(self.processor.decode(segment, **_DECODE_KWARGS))
        return "".join(pieces)


def _single(prompt: object) -> str | list[Message]:
    """A single prompt, checked: a str or a non-empty list of message dicts."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return prompt
    raise ValueError(
        "prompt must be a str, a non-empty list of str (a batch) or a non-empty list of message dicts, got "
        f"{prompt!r:.200}"
    )


# --------------------------------------------------------------------------------------------------- streaming


class _TextPieces(TextIteratorStreamer):
    """transformers' `TextIteratorStreamer` that also yields the image placeholder when an image completes, and
    whose end of stream the pipeline signals itself, after the images are decoded (generation's `end()` only flushes
    the text)."""

    def __init__(self, processor: VPiTProcessor, image_end_id: int) -> None:
        super().__init__(processor.tokenizer, skip_prompt=True, **_DECODE_KWARGS)
        self.placeholder = processor.image_token
        self.image_end_id = image_end_id

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        for token in value.flatten().tolist():
            if token == self.image_end_id:
                self._flush()
                self.on_finalized_text(self.placeholder)
            else:
                super().put(torch.tensor([token]))

    def end(self) -> None:
        self._flush()
        self.next_tokens_are_prompt = True

    def close(self) -> None:
        self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def _flush(self) -> None:
        if self.token_cache:
            text = str(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))
            self.on_finalized_text(text[self.print_len :])
        self.token_cache, self.print_len = [], 0

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.close()


class VPiTStream(Iterator[str]):
    """The text of one answer, piece by piece, while a background thread generates it; then `.output`.

    Iterating yields str pieces whose concatenation is `output.text`. The thread starts on creation; an exception
    raised there is re-raised by the iteration (and by `.output`).
    """

    def __init__(self, streamer: _TextPieces, run: Callable[[], VPiTPipelineOutput]) -> None:
        self._streamer = streamer
        self._output: VPiTPipelineOutput | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, args=(run,), daemon=True)
        self._thread.start()

    def _work(self, run: Callable[[], VPiTPipelineOutput]) -> None:
        try:
            self._output = run()
        except BaseException as error:  # handed to the consumer's thread, re-raised there
            self._error = error
        finally:
            self._streamer.close()

    def __iter__(self) -> VPiTStream:
        return self

    def __next__(self) -> str:
        piece = self._streamer.text_queue.get()
        if piece is self._streamer.stop_signal:
            self._thread.join()
            if self._error is not None:
                raise self._error
            raise StopIteration
        return str(piece)

    @property
    def output(self) -> VPiTPipelineOutput:
        """The whole answer (text, images, visual tokens, conversation); waits for the thread to end."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._output is not None  # the thread ended without an error
        return self._output
