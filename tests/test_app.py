"""`vpit app` (vpit.inference.app) on the tiny VPiT (K = 4, Dv = 48) and the toy decoder (32x32 images): a turn streams
its text, then shows the drawn image and extends the conversation exactly as the pipeline does; seeds reproduce;
errors end a turn as a message; and the real command serves a page that headless Chromium drives end to end."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, save_tiny_pipeline
from PIL import Image

import vpit.inference.pipeline as pipeline_module
from vpit.cli import build_parser
from vpit.inference.app import DRAWING, EMPTY, ChatSession, answer, turn_options
from vpit.inference.pipeline import VPiTPipeline
from vpit.toy.examples import toy_examples

K, DV = 4, 48
STEPS = 2  # decoder denoising steps: enough to exercise the loop, cheap on the toy UNet
DRAW: dict = {"start_with_image": True, "max_images_per_row": 1, "max_new_tokens": 10, "num_inference_steps": STEPS}
CHROMIUM = Path("/usr/bin/chromium")
# Headless and offline: the machine's network is closed, and Chromium must not wait on any of its own services.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 is never behind a proxy


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tiny_llama, tiny_clip, tmp_path_factory) -> dict[str, Path]:
    """A saved tiny VPiT (model + processor), a saved toy decoder for its tokens, and a red 32x32 PNG."""
    root = tmp_path_factory.mktemp("app")
    Image.new("RGB", (32, 32), (220, 40, 40)).save(root / "red.png")
    return {**save_tiny_pipeline(root, tiny_llama, tiny_clip, K, DV), "red": root / "red.png"}


@pytest.fixture(scope="module")
def pipe(folders) -> VPiTPipeline:
    loaded = VPiTPipeline.from_pretrained(folders["model"], decoder=folders["decoder"], device="cpu")
    assert loaded.decoder is not None
    loaded.decoder.set_progress_bar_config(disable=True)
    return loaded


def images_of(message: dict) -> list[Image.Image]:
    return [part for part in message["content"] if isinstance(part, Image.Image)]


def texts_of(message: dict) -> list[str]:
    return [part for part in message["content"] if isinstance(part, str)]


# ------------------------------------------------------------------------------------------------ handlers


def test_a_draw_turn_streams_then_shows_the_image_and_extends_the_conversation_as_the_pipeline_does(pipe):
    sessions = list(answer(pipe, ChatSession(), " Draw a red circle. ", [], {**DRAW, "seed": 0}))
    reference = pipe("Draw a red circle.", **DRAW, seed=0)
    assert len(reference.images) == 1

    user = {"role": "user", "content": ["Draw a red circle."]}
    assert sessions[0].messages == (user,)  # the user's message shows before the answer starts
    streamed = [s for s in sessions[1:-1] if len(s.messages) == 2]
    assert streamed and all(s.conversation.messages == [] for s in streamed)  # history changes only at the end
    assert streamed[-1].messages[1]["content"][0] == DRAWING  # the image's place, before the decoder has drawn it

    last = sessions[-1]
    assert last.messages[0] == user and last.messages[1]["role"] == "assistant"
    (shown,) = images_of(last.messages[1])
    assert shown.size == (32, 32) and np.array_equal(np.asarray(shown), np.asarray(reference.images[0]))
    after_image = reference.text.split(pipe.processor.image_token)[1].strip()
    assert texts_of(last.messages[1]) == ([after_image] if after_image else [])
    assert texts_of(streamed[-1].messages[1]) == [DRAWING, *texts_of(last.messages[1])]  # the same text, streamed
    assert last.conversation.messages == reference.conversation.messages
    assert torch.equal(last.conversation.images[0], reference.visual_tokens[0])  # fed back as its tokens


def test_the_next_turn_continues_the_conversation_with_an_uploaded_image(pipe, folders):
    drawn = list(answer(pipe, ChatSession(), "Draw a red circle.", [], {**DRAW, "seed": 0}))[-1]
    question = "What colour is the shape?"
    last = list(answer(pipe, drawn, question, [str(folders["red"])], {"max_new_tokens": 6}))[-1]
    reference = pipe(question, images=[Image.open(folders["red"])], history=drawn.conversation, max_new_tokens=6)

    assert last.messages[:2] == drawn.messages and len(last.messages) == 4
    (uploaded,) = images_of(last.messages[2])
    assert uploaded.size == (32, 32) and uploaded.getpixel((0, 0)) == (220, 40, 40)
    assert texts_of(last.messages[2]) == [question]
    assert texts_of(last.messages[3]) == [reference.text.strip() or EMPTY] and not images_of(last.messages[3])
    assert last.conversation.messages == reference.conversation.messages and len(last.conversation.messages) == 4
    assert isinstance(last.conversation.images[0], torch.Tensor) and isinstance(
        last.conversation.images[1], Image.Image
    )


def test_the_page_settings_become_answer_options_and_a_seed_reproduces_the_turn(pipe):
    base = {"max_images_per_row": 1, "top_p": 0.9, "top_k": 5, "do_sample": True, "temperature": 0.7}
    greedy = turn_options(
        base,
        start_with_image=False,
        guidance_scale=3,
        num_inference_steps=15.0,
        seed=-1,
        temperature=0,
        max_new_tokens=20.0,
    )
    assert greedy == {
        "max_images_per_row": 1,
        "top_p": None,
        "top_k": None,
        "do_sample": False,
        "temperature": None,
        "start_with_image": False,
        "guidance_scale": 3.0,
        "num_inference_steps": 15,
        "seed": None,
        "max_new_tokens": 20,
    }

    def drawn(seed: int) -> tuple[list[str], np.ndarray]:
        options = turn_options(
            {"max_images_per_row": 1},
            start_with_image=True,
            guidance_scale=2.0,
            num_inference_steps=STEPS,
            seed=seed,
            temperature=1.0,
            max_new_tokens=10,
        )
        assert options["seed"] == seed and options["do_sample"] and options["temperature"] == 1.0
        message = list(answer(pipe, ChatSession(), "Draw a red circle.", [], options))[-1].messages[-1]
        (image,) = images_of(message)
        return texts_of(message), np.asarray(image)

    first, again, other = drawn(7), drawn(7), drawn(8)
    assert first[0] == again[0] and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])  # the decoder's noise follows the seed


def test_errors_end_the_turn_as_a_message_and_keep_the_conversation(pipe, folders, tmp_path, monkeypatch):
    before = list(answer(pipe, ChatSession(), "Draw a red circle.", [], {**DRAW, "seed": 0}))[-1]

    two_markers = list(answer(pipe, before, "<image> <image> Which is larger?", [str(folders["red"])], {}))[-1]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    unreadable = list(answer(pipe, before, "What is this?", [str(not_an_image)], {}))[-1]

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(pipeline_module, "generate", out_of_memory)
    failed = list(answer(pipe, before, "Describe the image.", [], {}))[-1]

    for session, user_text, cause in (
        (two_markers, "<image> <image> Which is larger?", "marker"),
        (unreadable, "What is this?", "corrupt_image"),
        (failed, "Describe the image.", "CUDA out of memory"),
    ):
        assert session.conversation is before.conversation  # the failed turn is not part of the history
        assert session.messages[:2] == before.messages and len(session.messages) == 4
        assert user_text in texts_of(session.messages[2])
        (error,) = session.messages[3]["content"]
        assert error.startswith("**error:**") and cause in error


def test_an_empty_message_is_no_turn(pipe):
    assert list(answer(pipe, ChatSession(), "   ", [], {})) == []


def test_toy_examples_render_their_images(tmp_path):
    examples = toy_examples(tmp_path, start_with_image=True)
    drawing = [e for e in examples if e.image is None]
    questions = [e for e in examples if e.image is not None]
    assert drawing and all(e.start_with_image for e in drawing)
    assert questions and sum(e.start_with_image for e in questions) == 1  # the edit: its answer is an image
    for example in questions:
        assert example.image is not None and Image.open(example.image).size == (64, 64)


def test_the_app_command_serves_this_machine_by_default():
    args = build_parser().parse_args(["app", "--model", "m", "--decoder", "d"])
    assert (args.host, args.port, args.examples, args.func.__name__) == ("127.0.0.1", 7860, True, "_app")


# ------------------------------------------------------------------------------------------------- browser


def serve(folders: dict[str, Path], log: Path, port: int) -> subprocess.Popen:
    """`vpit app` in a subprocess (the real entry point), on 127.0.0.1:port; returns once the page answers."""
    command = [
        *(sys.executable, "-m", "vpit.cli", "app", "--model", str(folders["model"]), "--decoder"),
        *(str(folders["decoder"]), "--device", "cpu", "--port", str(port), "--seed", "0", "--max-new-tokens", "12"),
        *("--max-images", "1", "--steps", "50"),  # 50 steps: the decoder takes long enough to see the text first
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1"}
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"vpit app exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with DIRECT.open(f"http://127.0.0.1:{port}/", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise AssertionError(f"vpit app did not answer on port {port} in 90 s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_in_a_browser_a_draw_prompt_shows_its_image_and_an_uploaded_image_gets_an_answer(pipe, folders, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):  # .ci/run installs the browser: there, a missing one is a failure, not a skip
            pytest.fail(f"CI without chromium at {CHROMIUM}: .ci/run should have installed Debian's chromium")
        pytest.skip(
            f"no chromium at {CHROMIUM}: install Debian's chromium (apt-get install chromium) to drive the app in a "
            "headless browser; .ci/run installs it"
        )
    from playwright.sync_api import sync_playwright

    reference = pipe("Draw a red circle.", start_with_image=True, max_images_per_row=1, max_new_tokens=12, seed=0)
    port = free_port()
    server = serve(folders, tmp_path / "server.log", port)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#vpit-message textarea")
            # Every state the conversation passes through, to see the text arrive before the image.
            page.evaluate(
                """() => {
                    window.frames_seen = [];
                    const chat = document.querySelector('#vpit-chat');
                    new MutationObserver(() => window.frames_seen.push(
                        {text: chat.innerText, images: chat.querySelectorAll('img').length}
                    )).observe(chat, {subtree: true, childList: true, characterData: true});
                }"""
            )

            page.check("#vpit-draw input[type=checkbox]")
            page.fill("#vpit-message textarea", "Draw a red circle.")
            page.press("#vpit-message textarea", "Enter")
            page.wait_for_selector("#vpit-chat [data-testid=bot] img")
            page.wait_for_selector("#vpit-message textarea:enabled")  # the turn is over

            frames = page.evaluate("window.frames_seen")
            drawing = DRAWING.strip("*")
            assert any(drawing in f["text"] and f["images"] == 0 for f in frames), frames[-5:]
            assert not any(drawing in f["text"] for f in frames[-1:])
            page.wait_for_function("[...document.querySelectorAll('#vpit-chat img')].every(i => i.complete)")
            shown = page.eval_on_selector_all(
                "#vpit-chat [data-testid=bot] img", "images => images.map(i => [i.src, i.naturalWidth])"
            )
            assert len(shown) == 1 and shown[0][1] == 32, shown  # the browser has drawn it
            sources = [source for source, _ in shown]
            body = page.request.get(sources[0]).body()
            image = Image.open(io.BytesIO(body))
            assert image.format == "PNG" and image.size == (32, 32)
            # The page shows the pipeline's own image: seeded, in another process.
            difference = np.abs(np.asarray(image.convert("RGB"), int) - np.asarray(reference.images[0], int))
            assert difference.max() <= 1

            bots = page.locator("#vpit-chat [data-testid=bot]").count()
            page.uncheck("#vpit-draw input[type=checkbox]")
            page.set_input_files("#vpit-message input[type=file]", str(folders["red"]))
            page.wait_for_selector("#vpit-message .thumbnails img")  # uploaded
            page.fill("#vpit-message textarea", "What colour is the shape?")
            page.press("#vpit-message textarea", "Enter")
            page.wait_for_function(f"document.querySelectorAll('#vpit-chat [data-testid=bot]').length > {bots}")
            page.wait_for_selector("#vpit-message textarea:enabled")
            users = page.eval_on_selector_all(
                "#vpit-chat [data-testid=user]",
                "ms => ms.map(m => [m.innerText.trim(), m.querySelectorAll('img').length])",
            )
            assert users == [["Draw a red circle.", 0], ["", 1], ["What colour is the shape?", 0]]
            answers = page.eval_on_selector_all("#vpit-chat [data-testid=bot]", "ms => ms.map(m => m.innerText.trim())")
            assert len(answers) == bots + 1 and answers[-1]  # the answer's text is on the page

            # A marker without an image: the error is the answer (its `<image>` shown, not eaten as HTML).
            page.fill("#vpit-message textarea", "<image> Which is larger?")
            page.press("#vpit-message textarea", "Enter")
            page.wait_for_function(f"document.querySelectorAll('#vpit-chat [data-testid=bot]').length > {bots + 1}")
            page.wait_for_selector("#vpit-message textarea:enabled")
            answers = page.eval_on_selector_all("#vpit-chat [data-testid=bot]", "ms => ms.map(m => m.innerText.trim())")
            assert answers[-1].startswith("error:") and "'<image>' markers" in answers[-1], answers[-1]
            assert "<image> Which is larger?" in page.locator("#vpit-chat [data-testid=user]").last.inner_text()

            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert Image.open(tmp_path / "app.png").size[0] == 1200
