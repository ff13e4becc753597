"""VPiTPipeline (vpit.inference.pipeline), `vpit generate` and `vpit chat` on the tiny VPiT (K = 4, Dv = 48) and the toy
decoder (32x32 images): answers equal `model.generate`, forced images are drawn, history feeds generated visual
tokens back, the stream concatenates to the answer, the CLI writes readable files and keeps the conversation."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_pipeline
from PIL import Image
from transformers.generation import LogitsProcessor

import vpit.inference.pipeline as pipeline_module
from vpit.cli import main
from vpit.decoder import VPiTDecoderPipeline
from vpit.inference.chat import run_chat
from vpit.inference.generation import generate
from vpit.inference.pipeline import Conversation, VPiTPipeline
from vpit.toy.decoder import toy_decoder_components

K, DV = 4, 48
STEPS = 2  # decoder denoising steps: enough to exercise the loop, cheap on the toy UNet


class Script(LogitsProcessor):
    """Forces `tokens` one TEXT step after another (a single row): a random model then says what a test expects."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.step = tokens, 0

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.tokens[min(self.step, len(self.tokens) - 1)]] += 1000.0
        self.step += 1
        return scores


class GenerateSpy:
    """Wraps vpit.inference.generation.generate as the pipeline calls it; keeps every call's inputs and output."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, input_ids, attention_mask=None, pixel_values=None, **kwargs):
        out = generate(model, input_ids, attention_mask, pixel_values, **kwargs)
        self.calls.append({"input_ids": input_ids.cpu(), "visual_tokens": kwargs.get("visual_tokens"), "out": out})
        return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tiny_llama, tiny_clip, tmp_path_factory) -> dict[str, Path]:
    """A saved tiny VPiT (model + processor), a saved toy decoder for its tokens, and a red 32x32 PNG."""
    root = tmp_path_factory.mktemp("pipeline")
    Image.new("RGB", (32, 32), (220, 40, 40)).save(root / "red.png")
    return {**save_tiny_pipeline(root, tiny_llama, tiny_clip, K, DV), "red": root / "red.png", "root": root}


@pytest.fixture(scope="module")
def pipe(folders) -> VPiTPipeline:
    loaded = VPiTPipeline.from_pretrained(folders["model"], decoder=folders["decoder"], device="cpu")
    assert loaded.decoder is not None
    loaded.decoder.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture
def spy(monkeypatch) -> GenerateSpy:
    recorder = GenerateSpy()
    monkeypatch.setattr(pipeline_module, "generate", recorder)
    return recorder


def ids(pipe: VPiTPipeline, text: str) -> list[int]:
    return pipe.processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def image_answer_script(pipe: VPiTPipeline) -> tuple[list[int], str]:
    """Tokens of "Here is an image ...:<image> a small red circle</s>" and the text the pipeline must make of them."""
    first, last = " Here is an image based on your request:", " a small red circle"
    eos = pipe.processor.tokenizer.eos_token_id
    return [*ids(pipe, first), pipe.image_start_id, *ids(pipe, last), eos], f"{first}<image>{last}"


def chat_prompt(pipe: VPiTPipeline, text: str) -> str:
    return pipe.processor.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


# ------------------------------------------------------------------------------------------------ answers


def test_text_answer_equals_decoded_model_generate(pipe):
    model, processor = pipe.model, pipe.processor
    red = Image.new("RGB", (32, 32), (220, 40, 40))
    for prompt, images in (("Describe the image.", []), ("<image> What colour is the shape?", [red])):
        out = pipe(prompt, images=images, max_new_tokens=12)
        batch = processor(text=[chat_prompt(pipe, prompt)], images=images or None, add_special_tokens=False)
        reference = model.generate(**batch, max_new_tokens=12)
        length = batch["input_ids"].shape[1]
        new = reference.sequences[0, length : length + int(reference.num_new_tokens[0])]
        assert torch.equal(out.sequences, reference.sequences[0][reference.attention_mask[0] == 1])
        assert out.prompt_length == length and out.sequences.shape == (length + len(new),)
        assert out.text == processor.decode(new, skip_special_tokens=True)
        assert out.images == [] and out.visual_tokens == [] and out.finished == bool(reference.finished[0])
        assert out.conversation.messages == [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": out.text.strip()},
        ]


def test_a_single_str_prompt_gets_markers_for_its_images_and_a_batch_is_left_padded(pipe):
    red, blue = Image.new("RGB", (32, 32), (220, 40, 40)), Image.new("RGB", (32, 32), (40, 80, 220))
    marked = pipe("<image> What colour is the shape?", images=[red], max_new_tokens=6)
    unmarked = pipe("What colour is the shape?", images=[red], max_new_tokens=6)
    assert torch.equal(marked.sequences, unmarked.sequences)
    prompts = ["Describe.", "<image> <image> Which shape is larger?"]
    batch = pipe(prompts, images=[red, blue], max_new_tokens=6)
    alone = [pipe(prompts[0], max_new_tokens=6), pipe(prompts[1], images=[red, blue], max_new_tokens=6)]
    assert [o.prompt_length for o in batch] == [o.prompt_length for o in alone]
    assert batch[0].prompt_length < batch[1].prompt_length  # row 0 was left-padded to row 1's width
    for row, single in zip(batch, alone, strict=True):
        assert torch.equal(row.sequences, single.sequences) and row.text == single.text


def test_forced_image_is_drawn_by_the_decoder(pipe):
    script, expected = image_answer_script(pipe)
    out = pipe(
        "Draw a red circle.", logits_processor=[Script(script)], max_new_tokens=40, seed=0, num_inference_steps=STEPS
    )
    assert out.text == expected and out.finished
    assert len(out.images) == len(out.visual_tokens) == 1
    assert out.images[0].size == (32, 32) and out.images[0].mode == "RGB"
    assert out.visual_tokens[0].shape == (K, DV)
    # the image is the decoder's rendering of the predicted tokens, with the seed's noise
    drawn = pipe.decoder(
        visual_tokens=out.visual_tokens[0][None], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert np.array_equal(np.asarray(drawn), np.asarray(out.images[0]))
    # a prompt ending with <image_start> starts the answer with the image
    first = pipe(
        "Draw a red circle.", start_with_image=True, max_images_per_row=1, max_new_tokens=10, num_inference_steps=STEPS
    )
    start, end, slot = pipe.image_start_id, pipe.image_end_id, pipe.image_slot_id
    assert first.sequences[first.prompt_length - 1] == start
    assert first.sequences[first.prompt_length :][: K + 1].tolist() == [slot] * K + [end]
    assert first.text.startswith("<image>") and first.text.count("<image>") == 1 and len(first.images) == 1
    # ... and the prompt is what training shows before an answer that is an image: the template's separator after
    # "ASSISTANT:" included (Llama's tokenizer makes it a token of its own), not <image_start> glued to the colon
    trained = pipe.processor.apply_chat_template(
        [{"role": "user", "content": "Draw a red circle."}, {"role": "assistant", "content": "<image>"}],
        images=[Image.new("RGB", (32, 32))],
        tokenize=True,
    )["input_ids"][0]
    opened = trained[: int((trained == start).nonzero()[0]) + 1]
    assert first.sequences[: first.prompt_length].tolist() == opened.tolist()
    glued = pipe.processor.apply_chat_template(
        [{"role": "user", "content": "Draw a red circle."}], add_generation_prompt=True
    )
    assert len(pipe.processor.tokenizer(glued + "<image_start>", add_special_tokens=False)["input_ids"]) < len(opened)


def test_without_a_decoder_answers_keep_the_visual_tokens(pipe):
    bare = VPiTPipeline(pipe.model, pipe.processor)
    out = bare("Draw.", start_with_image=True, max_images_per_row=1, max_new_tokens=8)
    assert out.images == [] and len(out.visual_tokens) == 1 and out.visual_tokens[0].shape == (K, DV)


# ------------------------------------------------------------------------------------------------ history


def test_history_feeds_given_images_encoded_and_generated_images_as_their_tokens(pipe, spy, folders):
    script, expected = image_answer_script(pipe)
    first = pipe(
        "<image> Draw this shape again.",
        images=[folders["red"]],
        logits_processor=[Script(script)],
        max_new_tokens=40,
        num_inference_steps=STEPS,
    )
    assert first.text == expected
    assert first.conversation.images[0] == folders["red"]
    assert torch.equal(first.conversation.images[1], first.visual_tokens[0])
    second = pipe("Make it blue.", history=first.conversation, max_new_tokens=6, num_inference_steps=STEPS)
    fed = spy.calls[1]
    prompt = pipe.processor.decode(fed["input_ids"][0])
    expanded = pipe.processor.expand_image_markers
    assert expanded("USER: <image> Draw this shape again.")[0] in prompt
    assert expanded(f"ASSISTANT: {expected.strip()}</s>USER: Make it blue.\nASSISTANT:")[0] in prompt
    assert int((fed["input_ids"] == pipe.image_slot_id).sum()) == 2 * K
    encoded = pipe.model.encode_images(pipe.processor.preprocess_images([folders["red"]]))[0]
    assert fed["visual_tokens"].shape == (2, K, DV)
    assert torch.allclose(fed["visual_tokens"][0], encoded)  # the given image, through the vision tower
    assert torch.equal(fed["visual_tokens"][1], first.visual_tokens[0])  # the generated one, as predicted
    assert len(second.conversation.messages) == 4 and len(second.conversation.images) == 2
    assert first.conversation.messages[-1]["role"] == "assistant" and len(first.conversation.messages) == 2


def test_messages_prompt_equals_the_same_history(pipe):
    history = Conversation([{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}])
    via_history = pipe("Draw.", history=history, max_new_tokens=6)
    via_messages = pipe([*history.messages, {"role": "user", "content": "Draw."}], max_new_tokens=6)
    assert torch.equal(via_history.sequences, via_messages.sequences)


# ------------------------------------------------------------------------------------------------ stream


def test_stream_pieces_concatenate_to_the_answer(pipe):
    script, expected = image_answer_script(pipe)
    kwargs = {"max_new_tokens": 40, "num_inference_steps": STEPS, "seed": 0}
    stream = pipe.stream("Draw a red circle.", logits_processor=[Script(script)], **kwargs)
    pieces = list(stream)
    assert "".join(pieces) == expected == stream.output.text
    assert "<image>" in pieces and len(pieces) >= 5  # word by word, the placeholder on its own
    assert len(stream.output.images) == 1 and stream.output.images[0].size == (32, 32)
    # greedy, unscripted: the same text as the call
    plain = pipe.stream("Describe the image.", max_new_tokens=12)
    assert "".join(plain) == pipe("Describe the image.", max_new_tokens=12).text


def test_errors_are_clear_and_reach_the_stream_consumer(pipe):
    red = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match=r"more '<image>' markers than the 1 image"):
        pipe("<image> <image> Compare.", images=[red])
    with pytest.raises(ValueError, match=r"2 image\(s\) were given but the prompt\(s\) hold only 1"):
        pipe(["<image> a", "b"], images=[red, red])
    with pytest.raises(ValueError, match="pass a single prompt with it"):
        pipe(["a", "b"], history=Conversation())
    with pytest.raises(ValueError, match="prompt must be a str"):
        pipe([])
    stream = pipe.stream("<image> <image> Compare.", images=[red])
    with pytest.raises(ValueError, match="markers than the 1 image"):
        list(stream)
    wrong = VPiTDecoderPipeline(**toy_decoder_components(32, K))
    with pytest.raises(
        ValueError, match=r"reads K=4 visual tokens of width Dv=32 but the model predicts K=4 of width Dv=48"
    ):
        VPiTPipeline(pipe.model, pipe.processor, wrong)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_generate_writes_the_answer_and_readable_pngs(folders, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "generate",
        "--model",
        str(folders["model"]),
        "--decoder",
        str(folders["decoder"]),
        "--device",
        "cpu",
        "--prompt",
        "<image> Draw it bigger.",
        "--image",
        str(folders["red"]),
        "--out",
        str(out),
        "--start-with-image",
        "--max-images",
        "1",
        "--max-new-tokens",
        "12",
        "--steps",
        str(STEPS),
        "--seed",
        "0",
    ]
    assert main(argv) == 0
    answer = (out / "answer.txt").read_text()
    assert answer.startswith("<image>") and answer.count("<image>") == 1 and answer.endswith("\n")
    with Image.open(out / "image_0.png") as image:
        assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
        pixels = np.asarray(image)
    assert not (out / "image_1.png").exists()
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == [str(out / "answer.txt"), str(out / "image_0.png")]
    assert "\n".join(lines[:-2]) == answer.rstrip("\n")
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0  # seeded: the same pixels
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "image_0.png")), pixels)


def test_cli_chat_keeps_history_saves_images_and_exits(folders, pipe, spy, tmp_path, monkeypatch, capsys):
    lines = [
        f"/image {folders['red']}",
        "What colour is it?",
        "/draw a red circle",
        "Make it blue.",
        "/image missing.png",
        "/reset",
        "Hello.",
        "/exit",
        "Never read.",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    argv = [
        "chat",
        "--model",
        str(folders["model"]),
        "--decoder",
        str(folders["decoder"]),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "images"),
        "--max-new-tokens",
        "10",
        "--max-images",
        "1",
        "--steps",
        str(STEPS),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert len(spy.calls) == 4  # three turns, then one after /reset; nothing after /exit

    def prompt(i: int) -> str:
        return pipe.processor.decode(spy.calls[i]["input_ids"][0])

    def answer(i: int) -> str:
        out = spy.calls[i]["out"]
        width = spy.calls[i]["input_ids"].shape[1]
        return pipe.answer_text(out.sequences[0, width : width + int(out.num_new_tokens[0])].tolist()).strip()

    expand = pipe.processor.expand_image_markers
    assert expand("USER: <image> What colour is it?")[0] in prompt(0)
    for turn in (1, 2):  # each prompt holds the previous answer, with its image spans
        assert expand(f"ASSISTANT: {answer(turn - 1)}</s>")[0] in prompt(turn)
    assert prompt(1).endswith("USER: a red circle\nASSISTANT: <image_start>")  # /draw opens an image, as training does
    assert torch.equal(spy.calls[2]["visual_tokens"][1], spy.calls[1]["out"].images[0][0])
    assert prompt(3) == "<s>USER: Hello.\nASSISTANT:" and spy.calls[3]["visual_tokens"] is None  # after /reset

    saved = sorted((tmp_path / "images").glob("*.png"))
    drawn = sum(len(call["out"].images[0]) for call in spy.calls)
    assert drawn >= 1 and [p.name for p in saved] == [f"image_{i}.png" for i in range(drawn)]
    for path in saved:
        assert f"[image] {path}" in printed
        with Image.open(path) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    assert f"[attached {folders['red']}]" in printed and "missing.png does not exist" in printed
    assert "[conversation reset]" in printed and "> " not in printed  # no prompt sign when stdin is a pipe


def test_chat_console_script_with_piped_stdin_stops_at_eof(folders, tmp_path):
    script = Path(sys.executable).parent / "vpit"
    argv = [
        str(script),
        "chat",
        "--model",
        str(folders["model"]),
        "--decoder",
        str(folders["decoder"]),
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
        "--max-new-tokens",
        "8",
        "--max-images",
        "1",
        "--steps",
        str(STEPS),
    ]
    done = subprocess.run(argv, input="/draw a red circle\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"[image] {tmp_path / 'image_0.png'}" in done.stdout
    with Image.open(tmp_path / "image_0.png") as image:
        assert image.size == (32, 32)


def test_run_chat_passes_options_drops_bad_attachments_and_never_overwrites(pipe, folders, spy, tmp_path):
    script, expected = image_answer_script(pipe)
    Image.new("RGB", (8, 8)).save(tmp_path / "image_0.png")  # from an earlier session
    output = io.StringIO()
    lines = io.StringIO(f"/image {folders['red']}\n<image> <image> Compare.\nDraw a red circle.\n")
    options = {"logits_processor": [Script(script)], "max_new_tokens": 40, "num_inference_steps": STEPS}
    assert run_chat(pipe, lines, output, tmp_path, system="Be brief.", **options) == 0
    assert output.getvalue() == (
        f"[attached {folders['red']}]\n"
        "\n[error: the prompt(s) hold more '<image>' markers than the 1 image(s) given] (attachments dropped)\n"
        f"{expected}\n[image] {tmp_path / 'image_1.png'}\n"
    )
    assert len(spy.calls) == 1 and spy.calls[0]["visual_tokens"] is None  # the failed turn's image was dropped
    assert pipe.processor.decode(spy.calls[0]["input_ids"][0]).startswith("<s>Be brief.\n\nUSER: Draw a red circle.")
    with Image.open(tmp_path / "image_0.png") as kept:
        assert kept.size == (8, 8)
