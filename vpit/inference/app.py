"""`vpit app`: a web app (Gradio Blocks) to chat with a `VPiTPipeline` in text and images, on localhost.

    message box (text + uploaded images) ──pipe.stream(text, images, history=conversation)──► text pieces, shown as
                                                                                           they come
                                                    stream.output ──► the drawn images, in place; the new conversation

The conversation the model sees is a `vpit.inference.pipeline.Conversation`, handled exactly as `vpit chat` handles
it: each turn is one `pipe.stream` call on the history, and the answer's `.conversation` is the next turn's history
(generated images fed back as their visual tokens). Beside it a `ChatSession` keeps what the page shows: the messages
with the uploaded and drawn images in place. "Start the answer with an image" is `vpit chat`'s `/draw`; the sliders
are the `AnswerOptions` of one turn.

The model is loaded once, before the server starts; the queue serves every browser tab, one turn at a time (one model
on one device). gradio is imported here only: `pip install 'vpit[app]'`.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..model.images import load_image
from .pipeline import AnswerOptions, Conversation, VPiTPipeline

try:
    import gradio as gr
except ImportError as error:  # the app is an extra; the rest of vpit runs without gradio
    raise ImportError("`vpit app` needs gradio: pip install 'vpit[app]'") from error

logger = logging.getLogger(__name__)

Part = str | Image.Image
"""One part of a shown message: markdown text or an image."""

DRAWING = "*(drawing the image…)*"  # where an image stands while the answer is still being generated
NOT_DRAWN = "*(an image: no decoder to draw it)*"
EMPTY = "*(an empty answer)*"
# Images in the conversation at least 192 px wide: a toy model's 64x64 images, scaled up, stay readable.
CSS = "#vpit-chat .message img { min-width: 192px; min-height: 192px; object-fit: contain; }"


@dataclass(frozen=True)
class ChatSession:
    """What one browser tab holds: the conversation the model sees and the messages the page shows.

    Args:
        conversation: the history of the next turn (`vpit.inference.pipeline.Conversation`).
        messages: the shown messages, {"role": "user" | "assistant", "content": [text or PIL image, ...]}; a failed
            turn is shown (its message and the error) but is not part of `conversation`.
    """

    conversation: Conversation = field(default_factory=Conversation)
    messages: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class AppExample:
    """An example under the chat: the message it fills in and whether the answer starts with an image."""

    text: str
    image: Path | None = None
    start_with_image: bool = False


def answer(
    pipe: VPiTPipeline, session: ChatSession, text: str, files: Sequence[str | Path], options: AnswerOptions
) -> Iterator[ChatSession]:
    """One turn: yields the session with the user's message, then after each streamed piece of the answer, then once
    more with the images drawn and the conversation extended. An error (a bad image, a marker count that differs from
    the images, a failure in the model) ends the turn as an error message; the conversation stays as it was.

    Args:
        pipe: the pipeline that answers.
        session: the tab's session before the turn.
        text: the user's message; `<image>` markers place the uploaded images, which go in front when it has none.
        files: paths of the uploaded images, in marker order.
        options: this turn's generation options (`AnswerOptions`, without history).

    Example:
        >>> for session in answer(pipe, ChatSession(), "Draw a red circle.", [], {"start_with_image": True}):
        ...     print(session.messages[-1]["content"])
    """
    text = text.strip()
    if not text and not files:
        return
    try:
        images = [load_image(Path(path)) for path in files]
    except ValueError as error:  # ImageError: an upload that is no readable image
        yield _failed(session, [*session.messages, _message("user", [text])], error)
        return
    shown = [*session.messages, _message("user", [*images, text])]
    yield ChatSession(session.conversation, tuple(shown))
    so_far = ""
    turn: AnswerOptions = {**options, "history": session.conversation}
    try:
        stream = pipe.stream(text, images=images, **turn)
        for piece in stream:
            so_far += piece
            partial = _answer_message(pipe, so_far, [], DRAWING)
            yield ChatSession(session.conversation, (*shown, partial) if partial["content"] else tuple(shown))
        out = stream.output
    except Exception as error:  # shown to the user and logged: one failed turn must not end the tab's chat
        if not isinstance(error, ValueError):
            logger.exception("the turn failed")
        yield _failed(session, shown, error)
        return
    final = _answer_message(pipe, out.text, out.images, NOT_DRAWN)
    yield ChatSession(out.conversation, (*shown, final if final["content"] else _message("assistant", [EMPTY])))


def _message(role: str, parts: Sequence[Part]) -> dict[str, Any]:
    return {"role": role, "content": [part for part in parts if not isinstance(part, str) or part]}


def _answer_message(pipe: VPiTPipeline, text: str, images: Sequence[Image.Image], missing: str) -> dict[str, Any]:
    """The answer as shown: its text, each image placeholder replaced by the drawn image (or by `missing`)."""
    segments = text.split(pipe.processor.image_token)
    parts: list[Part] = [segments[0].strip()]
    for index, segment in enumerate(segments[1:]):
        parts += [images[index] if index < len(images) else missing, segment.strip()]
    return _message("assistant", parts)


def _failed(session: ChatSession, shown: Sequence[dict[str, Any]], error: Exception) -> ChatSession:
    return ChatSession(session.conversation, (*shown, _message("assistant", [f"**error:** {error}"])))


def turn_options(
    base: AnswerOptions,
    *,
    start_with_image: bool,
    guidance_scale: float,
    num_inference_steps: int,
    seed: float | None,
    temperature: float,
    max_new_tokens: int,
) -> AnswerOptions:
    """The options of one turn: `base` (the command line's) with the page's settings. A negative (or no) seed is a
    fresh one each turn; temperature 0 is greedy decoding, which drops the options of `base` that only shape sampling
    (top_p, top_k)."""
    sampled = temperature > 0
    options: AnswerOptions = {
        **base,
        "start_with_image": bool(start_with_image),
        "guidance_scale": float(guidance_scale),
        "num_inference_steps": int(num_inference_steps),
        "seed": None if seed is None or seed < 0 else int(seed),
        "do_sample": sampled,
        "temperature": float(temperature) if sampled else None,
        "max_new_tokens": int(max_new_tokens),
    }
    if not sampled:
        options["top_p"] = options["top_k"] = None
    return options


# ---------------------------------------------------------------------------------------------------- the page


def _chatbot_value(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shown messages as the Chatbot's message dicts: images become image components, drawn in the conversation;
    text has its `<` and `>` escaped, so that markers such as `<image>` show instead of vanishing as unknown HTML."""
    return [
        {
            "role": message["role"],
            "content": [
                html.escape(part, quote=False)
                if isinstance(part, str)
                else gr.Image(
                    part,
                    format="png",  # exact pixels (the default, webp, is lossy)
                    show_label=False,
                    container=False,
                    buttons=["download", "fullscreen"],
                )
                for part in message["content"]
            ],
        }
        for message in messages
    ]


def build_app(
    pipe: VPiTPipeline,
    examples: Sequence[AppExample] | None = None,
    system: str | None = None,
    options: AnswerOptions | None = None,
) -> gr.Blocks:
    """The web app: a chat with image upload and a streamed answer whose images appear in the conversation, the
    generation settings beside it, examples under it.

    Args:
        pipe: the loaded pipeline every tab shares.
        examples: examples under the chat (`vpit.toy.examples.toy_examples` gives the toy world's); None: none.
        system: a system message at the start of every conversation.
        options: the default generation options (`AnswerOptions`); the sliders start from them.

    Example:
        >>> app = build_app(VPiTPipeline.from_pretrained("out/vpit", decoder="out/decoder"))
        >>> app.queue(default_concurrency_limit=1).launch(css=CSS)   # what `launch` does
    """
    base: AnswerOptions = {**(options or {})}
    base.pop("history", None)
    examples = examples or ()
    fresh = ChatSession(Conversation([{"role": "system", "content": system}] if system else []))
    default_temperature = (base.get("temperature") or 1.0) if base.get("do_sample") else 0.0
    default_tokens = base.get("max_new_tokens", 256)
    k = pipe.model.config.num_visual_tokens
    drawn = "drawn by the decoder" if pipe.decoder is not None else "kept as visual tokens (no decoder to draw them)"

    with gr.Blocks(title="vpit", analytics_enabled=False) as app:
        session = gr.State(fresh)
        gr.Markdown(
            f"## vpit: chat in text and images\nUpload an image and ask about it, or ask for an image. Each image "
            f"is {k} visual tokens; generated images are {drawn}."
        )
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="conversation", height=600, feedback_options=None, elem_id="vpit-chat")
                box = gr.MultimodalTextbox(
                    placeholder="Ask about an uploaded image, or ask for an image",
                    file_types=["image"],
                    file_count="multiple",
                    sources=["upload"],
                    show_label=False,
                    elem_id="vpit-message",
                )
                with gr.Row():
                    draw = gr.Checkbox(
                        value=pipe.model.makes_queries,
                        label="start the answer with an image (vpit chat's /draw)",
                        elem_id="vpit-draw",
                    )
                    clear = gr.Button("Clear", variant="secondary", elem_id="vpit-clear")
            with gr.Column(scale=1, min_width=240):
                guidance = gr.Slider(0, 15, value=base.get("guidance_scale", 7.5), step=0.5, label="decoder guidance")
                steps = gr.Slider(1, 100, value=base.get("num_inference_steps", 50), step=1, label="decoder steps")
                default_seed = base.get("seed")
                seed = gr.Number(
                    value=-1 if default_seed is None else default_seed, precision=0, label="seed (-1: a fresh one)"
                )
                temperature = gr.Slider(0, 2, value=default_temperature, step=0.05, label="temperature (0: greedy)")
                max_new_tokens = gr.Slider(
                    1,
                    max(1024, default_tokens),
                    value=default_tokens,
                    step=1,
                    label=f"max new tokens (an image takes {k + 2})",
                )
        if examples:
            gr.Examples(
                [[{"text": e.text, "files": [str(e.image)] if e.image else []}, e.start_with_image] for e in examples],
                inputs=[box, draw],
                label="examples (the toy world's grammar, docs/toy_world.md)",
                cache_examples=False,
            )

        def respond(
            message: dict[str, Any] | None,
            state: ChatSession,
            start_with_image: bool,
            guidance_scale: float,
            num_inference_steps: float,
            seed_value: float | None,
            temperature_value: float,
            max_tokens: float,
        ) -> Iterator[tuple[Any, list[dict[str, Any]], ChatSession]]:
            turn = turn_options(
                base,
                start_with_image=start_with_image,
                guidance_scale=guidance_scale,
                num_inference_steps=int(num_inference_steps),
                seed=seed_value,
                temperature=temperature_value,
                max_new_tokens=int(max_tokens),
            )
            message = message or {}
            current = state
            for current in answer(pipe, state, message.get("text") or "", message.get("files") or [], turn):
                yield gr.MultimodalTextbox(value=None, interactive=False), _chatbot_value(current.messages), current
            yield gr.MultimodalTextbox(value=None, interactive=True), _chatbot_value(current.messages), current

        settings = [draw, guidance, steps, seed, temperature, max_new_tokens]
        box.submit(respond, [box, session, *settings], [box, chatbot, session])
        clear.click(
            lambda: (fresh, [], gr.MultimodalTextbox(value=None, interactive=True)), None, [session, chatbot, box]
        )
        chatbot.clear(lambda: fresh, None, session)
    return app


def launch(
    pipe: VPiTPipeline,
    host: str = "127.0.0.1",
    port: int = 7860,
    examples: Sequence[AppExample] | None = None,
    system: str | None = None,
    options: AnswerOptions | None = None,
) -> None:
    """Serve `build_app(pipe, ...)` at http://host:port until interrupted; tabs queue for the model, one turn at a
    time.

    Example:
        >>> launch(VPiTPipeline.from_pretrained("out/vpit", decoder="out/decoder"), port=7860)
    """
    app = build_app(pipe, examples=examples, system=system, options=options)
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, show_error=True, css=CSS
    )


__all__ = ["AppExample", "ChatSession", "answer", "build_app", "launch", "turn_options"]
