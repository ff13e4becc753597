"""`vpit chat`: an interactive chat loop over a `VPiTPipeline`, reading lines from any text stream.

One line is one user message, except the commands:

    /image PATH [PATH ...]   attach image file(s) to the next message (quote paths with spaces)
    /draw TEXT               send TEXT and start the answer with a generated image
    /reset                   forget the conversation (and any attached images)
    /help                    show this list
    /exit, /quit, or EOF     leave

An attached image goes where the message has an `<image>` marker, or in front of the message when it has none.
The answer is printed while it is generated, `<image>` standing for each generated image; each image the decoder
draws is saved as a PNG in the output folder and its path printed on a line of its own ("[image] PATH"). The
conversation, generated images included (as their visual tokens, see `vpit.inference.pipeline`), is the prompt of the next
turn. The loop works on any stream, a terminal or a pipe; the prompt sign is printed only to a terminal.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from PIL import Image

from ..model.images import ImageError, load_image
from .pipeline import Conversation, VPiTPipeline

if TYPE_CHECKING:
    from typing import Unpack

    from .pipeline import AnswerOptions

HELP = """commands:
  /image PATH [PATH ...]  attach image file(s) to the next message
  /draw TEXT              send TEXT and start the answer with a generated image
  /reset                  forget the conversation
  /help                   show this list
  /exit, /quit (or EOF)   leave"""


def run_chat(
    pipe: VPiTPipeline,
    lines: TextIO,
    output: TextIO,
    out_dir: str | Path,
    system: str | None = None,
    interactive: bool = False,
    **options: Unpack[AnswerOptions],
) -> int:
    """Run the chat loop until `/exit`, `/quit` or the end of `lines`. Returns 0.

    Args:
        pipe: the pipeline that answers.
        lines: where user lines come from (sys.stdin, a file, a StringIO).
        output: where answers, image paths and errors go.
        out_dir: folder for the generated images, `image_0.png`, `image_1.png`, ... (existing files are kept).
        system: an optional system message, kept across `/reset`.
        interactive: print a prompt sign before each line (for a terminal).
        options: generation options for every turn (`AnswerOptions`: max_new_tokens, seed, ...; not history).

    Example:
        >>> run_chat(VPiTPipeline.from_pretrained("out/vpit", decoder="out/decoder"), sys.stdin, sys.stdout, "chat")
    """
    out_dir = Path(out_dir)
    fresh = Conversation([{"role": "system", "content": system}] if system else [])
    history = fresh
    attached: list[Image.Image] = []  # loaded when attached: a later turn sees the same pixels
    saved = 0
    while True:
        if interactive:
            output.write("> ")
            output.flush()
        line = lines.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/exit", "/quit"):
            break
        if command == "/help":
            print(HELP, file=output)
            continue
        if command == "/reset":
            history, attached = fresh, []
            print("[conversation reset]", file=output)
            continue
        if command == "/image":
            attached += _attach(rest, output)
            continue
        start_with_image = command == "/draw"
        if start_with_image:
            line = rest.strip()
        elif command.startswith("/"):
            print(f"[unknown command {command}; /help lists them]", file=output)
            continue

        try:
            turn: AnswerOptions = {**options, "history": history, "start_with_image": start_with_image}
            stream = pipe.stream(line, images=list(attached), **turn)
            for piece in stream:
                output.write(piece)
                output.flush()
            answer = stream.output
        except ValueError as error:  # a marker / image count mismatch, an unreadable image, ...
            print(f"\n[error: {error}]" + (" (attachments dropped)" if attached else ""), file=output)
            attached = []
            continue
        print(file=output)
        history, attached = answer.conversation, []
        for image in answer.images:
            out_dir.mkdir(parents=True, exist_ok=True)
            while (out_dir / f"image_{saved}.png").exists():  # never overwrite, e.g. an earlier session's
                saved += 1
            path = out_dir / f"image_{saved}.png"
            image.save(path)
            print(f"[image] {path}", file=output)
        if answer.visual_tokens and not answer.images:
            print(f"[{len(answer.visual_tokens)} image(s) generated; no decoder to draw them]", file=output)
    return 0


def _attach(arguments: str, output: TextIO) -> list[Image.Image]:
    """The readable image files among `/image` arguments, loaded; an error line for each other one."""
    try:
        paths = [Path(p) for p in shlex.split(arguments)]
    except ValueError as error:
        print(f"[error: {error}]", file=output)
        return []
    if not paths:
        print("[usage: /image PATH [PATH ...]]", file=output)
    good = []
    for path in paths:
        try:
            good.append(load_image(path))
        except ImageError as error:
            print(f"[error: {error}]", file=output)
            continue
        print(f"[attached {path}]", file=output)
    return good


__all__ = ["HELP", "run_chat"]
