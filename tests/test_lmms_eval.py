"""The lmms-eval plugin (vpit.integrations.lmms_eval) on the tiny VPiT (K = 4): lmms-eval's own evaluator, which
finds `--model vpit` through the `lmms_eval.models` entry point, scores the toy understanding task written from
`vpit eval toy`'s items as `evaluate_understanding` scores them, answer for answer; batches follow the gen_kwargs
groups and stop strings cut; loglikelihood is the log-softmax of the model's own logits; what vpit cannot do is
refused, naming the request."""

from __future__ import annotations

import ast
import glob
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import vpit
from vpit.inference.pipeline import VPiTPipeline
from vpit.toy.evaluate import UNDERSTANDING_MAX_NEW_TOKENS, EvalSettings, evaluate_understanding, understanding_items

pytest.importorskip("lmms_eval", reason="lmms-eval is the optional extra vpit[lmms-eval]")

from lmms_eval.api.instance import Instance

from vpit.integrations.lmms_eval import (
    TOY_TASK,
    VPiT,
    cut_at_stop,
    toy_process_results,
    write_lmms_eval_task,
)

K = 4
SETTINGS = EvalSettings(questions_per_type=2, batch_size=4)  # 10 items, batches of 4, 4 and 2
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tiny_llama, tiny_clip, tmp_path_factory) -> Path:
    """A saved tiny VPiT (model + processor)."""
    root = tmp_path_factory.mktemp("lmms-eval-model")
    torch.manual_seed(0)
    model, processor = vpit.assemble(tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=K)
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def pipe(folder) -> VPiTPipeline:
    return VPiTPipeline.from_pretrained(folder, device="cpu")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lmms-eval-task")
    write_lmms_eval_task(out, SETTINGS)
    return out


@pytest.fixture(scope="module")
def expected(pipe) -> dict:
    """What `vpit eval toy` makes of the items: its understanding score, and each item's answer as its batches
    (SETTINGS.batch_size, in item order) give it; on one thread, as the plugin runs in these tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        items = understanding_items(SETTINGS)
        texts = []
        for start in range(0, len(items), SETTINGS.batch_size):
            batch = items[start : start + SETTINGS.batch_size]
            outputs = pipe(
                [f"{pipe.processor.image_token}\n{item.question}" for item in batch],
                images=[item.image for item in batch],
                max_new_tokens=UNDERSTANDING_MAX_NEW_TOKENS,
            )
            texts += [output.text for output in outputs]
        score = evaluate_understanding(pipe, SETTINGS, progress=False)["overall"]
    finally:
        torch.set_num_threads(threads)
    return {"score": score, "texts": texts}


@pytest.fixture(scope="module")
def lm(folder) -> VPiT:
    return VPiT(pretrained=str(folder), device="cpu", batch_size=2)


def request(kind: str, arguments: tuple, doc_id: int, task: str = "toy") -> Instance:
    return Instance(
        request_type=kind, arguments=arguments, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1}
    )


def images(doc: dict) -> list[Image.Image]:
    return [doc["image"]]


DOCS = [
    {"image": Image.new("RGB", (64, 64), (220, 40, 40)), "answer": " red"},
    {"image": Image.new("RGB", (64, 64), (40, 80, 220)), "answer": " blue"},
    {"image": Image.new("RGB", (64, 64), (40, 170, 60)), "answer": " a large green circle"},
]


# ------------------------------------------------------------------------------------ registration, task


def test_entry_point_registers_vpit_as_a_simple_model():
    (point,) = [p for p in entry_points(group="lmms_eval.models") if p.name == "vpit"]
    assert point.value == "vpit.integrations.lmms_eval:model_manifest"
    from lmms_eval.models import get_model

    assert get_model("vpit") is VPiT and VPiT.is_simple


def test_only_the_plugin_imports_lmms_eval():
    """vpit imports without lmms-eval: lmms_eval appears only in the plugin module, which nothing in vpit imports."""
    root = Path(vpit.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path == root / "integrations" / "lmms_eval.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names, relative = [alias.name for alias in node.names], False
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(f"{node.module}.{alias.name}" for alias in node.names)]
                relative = node.level > 0
            else:
                continue
            for name in names:
                if (name.split(".")[0] == "lmms_eval" and not relative) or name.endswith("integrations.lmms_eval"):
                    offenders.append(f"{path.relative_to(root)}: {name}")
    assert offenders == []


def test_task_holds_the_items_of_vpit_eval_toy(task_dir):
    import datasets

    docs = datasets.load_from_disk(str(task_dir / "data"))["test"]
    items = understanding_items(SETTINGS)
    assert len(docs) == len(items) == 10
    for doc, item in zip(docs, items, strict=True):
        assert (doc["question"], doc["answer"], doc["kind"]) == (item.question, item.answer, item.kind)
        assert doc["image"].tobytes() == item.image.tobytes() and doc["image"].size == item.image.size
    assert toy_process_results({"answer": "a small red circle on the left"}, ["A small red circle, on the left."]) == {
        "exact_match": 1.0
    }
    assert toy_process_results({"answer": "red"}, ["blue"]) == {"exact_match": 0.0}


# ------------------------------------------------------------------------------ lmms-eval's own evaluator


def run_lmms_eval(folder: Path, task_dir: Path) -> dict:
    """lmms-eval's evaluator on the toy task, in this process, `--model vpit` resolved through the entry point."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(
        model="vpit",
        model_args=f"pretrained={folder},device=cpu",
        tasks=[TOY_TASK],
        batch_size=str(SETTINGS.batch_size),  # as the CLI passes it
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        verbosity="WARNING",
    )


def test_lmms_eval_scores_the_toy_task_as_vpit_eval_toy(folder, task_dir, expected):
    results = run_lmms_eval(folder, task_dir)
    assert results["results"][TOY_TASK]["exact_match,none"] == expected["score"]
    samples = sorted(results["samples"][TOY_TASK], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in samples] == expected["texts"]


def test_scores_agree_when_some_answers_are_right(folder, task_dir, pipe, monkeypatch):
    """The untrained model scores 0 both ways; a stand-in pipeline that gets the colour and shape questions right
    (in its own case and punctuation) and no others scores 4 / 10 both ways."""
    items = understanding_items(SETTINGS)
    replies = {
        (item.image.tobytes(), item.question): f"{item.answer.upper()}." if item.kind in ("colour", "shape") else "no"
        for item in items
    }

    def stand_in(self, prompts, images=None, **options):
        questions = [prompt.split("\n", 1)[1] for prompt in prompts]
        return [SimpleNamespace(text=replies[(i.tobytes(), q)]) for i, q in zip(images, questions, strict=True)]

    monkeypatch.setattr(VPiTPipeline, "__call__", stand_in)
    assert evaluate_understanding(pipe, SETTINGS, progress=False)["overall"] == 0.4
    assert run_lmms_eval(folder, task_dir)["results"][TOY_TASK]["exact_match,none"] == 0.4


@pytest.mark.slow
def test_lmms_eval_cli_with_the_plugin(folder, task_dir, expected, tmp_path):
    """The real command line, in a fresh process: `lmms-eval --model vpit` with the written task folder."""
    command = [
        *(sys.executable, "-m", "lmms_eval", "--model", "vpit"),
        *("--model_args", f"pretrained={folder},device=cpu", "--batch_size", str(SETTINGS.batch_size)),
        *("--tasks", TOY_TASK, "--include_path", str(task_dir)),
        *("--output_path", str(tmp_path / "out"), "--log_samples", "--verbosity", "WARNING"),
    ]
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results,) = glob.glob(str(tmp_path / "out" / "*" / "*_results.json"))
    assert json.loads(Path(results).read_text())["results"][TOY_TASK]["exact_match,none"] == expected["score"]
    (samples,) = glob.glob(str(tmp_path / "out" / "*" / f"*_samples_{TOY_TASK}.jsonl"))
    rows = sorted((json.loads(line) for line in Path(samples).read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [row["filtered_resps"] for row in rows] == expected["texts"]


# ---------------------------------------------------------------------------------------- generate_until


def test_generate_until_batches_per_gen_kwargs_and_cuts_at_stop_strings(lm, monkeypatch):
    lm.task_dict = {"toy": {"test": DOCS}}
    calls = []
    original = VPiTPipeline.__call__

    def spy(self, prompt, images=None, **options):
        calls.append((len(prompt), options))
        return original(self, prompt, images, **options)

    monkeypatch.setattr(VPiTPipeline, "__call__", spy)
    plain = {"until": [], "max_new_tokens": 8, "temperature": 0, "num_beams": 1}
    free = lm.generate_until(
        [request("generate_until", ("Describe it.", plain, images, i, "toy", "test"), i) for i in range(3)]
    )
    greedy = {"max_new_tokens": 8, "do_sample": False}
    assert calls == [(2, greedy), (1, greedy)]  # batch_size 2, the options read from gen_kwargs
    stop = free[0][2:4]
    assert len(stop) == 2 and all(free)  # a stop string from inside the first answer

    calls.clear()
    cut = {**plain, "until": [stop, "never in any answer"]}
    mixed = [
        request("generate_until", ("Describe it.", gen_kwargs, images, i, "toy", "test"), i)
        for i in range(3)
        for gen_kwargs in (plain, cut)
    ]
    answers = lm.generate_until(mixed)
    assert [n for n, _ in calls] == [2, 1, 2, 1]  # the uncut group, then the cut one, each in batches of 2
    assert answers[0::2] == free
    assert answers[1::2] == [cut_at_stop(text, [stop]) for text in free]
    assert len(answers[1]) <= 2 < len(free[0])


def test_generate_until_sampling_options(lm, monkeypatch, caplog):
    lm.task_dict = {"toy": {"test": DOCS}}
    seen = []
    original = VPiTPipeline.__call__

    def spy(self, prompt, images=None, **options):
        seen.append(options)
        return original(self, prompt, images, **options)

    monkeypatch.setattr(VPiTPipeline, "__call__", spy)
    sampled = {"until": "\n\n", "max_new_tokens": 3, "temperature": 0.7, "top_p": 0.9, "image_aspect_ratio": "pad"}
    greedy = {"max_new_tokens": 3, "temperature": 0, "do_sample": True}  # lmms-eval's tasks: temperature 0 is greedy
    lm.generate_until([request("generate_until", ("Hi", g, images, 0, "toy", "test"), 0) for g in (sampled, greedy)])
    assert seen == [
        {"max_new_tokens": 3, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": None},
        {"max_new_tokens": 3, "do_sample": False},
    ]
    assert "vpit ignores the gen_kwargs ['image_aspect_ratio'] of task 'toy'" in caplog.text


def test_what_vpit_cannot_do_is_refused_by_name(lm, folder):
    lm.task_dict = {"toy": {"test": [{"video": "clip.mp4", "image": DOCS[0]["image"]}]}}
    greedy = {"until": [], "max_new_tokens": 2}
    with pytest.raises(ValueError, match=r"task 'toy' doc 0: vpit reads images \(PIL\) only.*\['str'\].*video"):
        lm.generate_until([request("generate_until", ("Hi", greedy, lambda d: [d["video"]], 0, "toy", "test"), 0)])
    with pytest.raises(ValueError, match="task 'toy' doc 0: vpit decodes greedily or by sampling, not by beam search"):
        lm.generate_until([request("generate_until", ("Hi", {"num_beams": 4}, images, 0, "toy", "test"), 0)])
    with pytest.raises(ValueError, match=r"task 'toy' doc 0: the context holds 2 '<image>' marker\(s\) but 1 image"):
        lm.generate_until([request("generate_until", ("<image><image> Hi", greedy, images, 0, "toy", "test"), 0)])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 'auto'"):
        VPiT(pretrained=str(folder), batch_size="auto")


def test_cut_at_stop():
    assert cut_at_stop("a red. circle\n\nmore", ["\n\n", "."]) == "a red"
    assert cut_at_stop("a red circle", ["", "blue"]) == "a red circle"


# ----------------------------------------------------------------------------------------- loglikelihood


def reference(pipe: VPiTPipeline, context: str, continuation: str, image: Image.Image | None):
    """log P(continuation | templated context) and is_greedy from one forward of the model on the whole sequence,
    one row, no padding; and the argmax token after the context."""
    processor = pipe.processor
    content = f"{processor.image_token}\n{context}" if image is not None else context
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    pictures = [image] if image is not None else []
    n = processor(text=[prompt], images=pictures, add_special_tokens=False)["input_ids"].shape[1]
    batch = processor(text=[prompt + continuation], images=pictures, add_special_tokens=False)
    with torch.no_grad():
        logits = pipe.model(**batch).logits[0].double()  # (T, V)
    ids = batch["input_ids"][0]
    logprobs = torch.log_softmax(logits[:-1], dim=-1)  # row t: the next token t + 1
    targets = ids[n:]
    total = float(logprobs[n - 1 :].gather(-1, targets[:, None]).sum())
    return total, bool((logprobs[n - 1 :].argmax(-1) == targets).all()), int(logits[n - 1].argmax())


def test_loglikelihood_is_the_log_softmax_of_the_models_logits(lm, pipe):
    lm.task_dict = {"toy": {"test": DOCS}}
    # A continuation the model would generate greedily: its argmax token after this context, when the token's text
    # tokenises back to it (the untrained model's argmax is often a byte fragment, which does not).
    context = "Is it small or large?"
    greedy_token = reference(pipe, context, "", DOCS[0]["image"])[2]
    greedy_text = pipe.processor.tokenizer.decode([greedy_token])
    assert reference(pipe, context, greedy_text, DOCS[0]["image"])[1], "pick a context whose argmax round-trips"

    def answer(doc: dict) -> str:
        return doc["answer"]

    requests = [
        request("loglikelihood", ("What colour is the shape?", " red", images, 0, "toy", "test"), 0),
        request("loglikelihood", ("What colour is it?", answer, images, 1, "toy", "test"), 1),  # doc_to_target
        request("loglikelihood", ("Describe the image.", answer, images, 2, "toy", "test"), 2),
        request("loglikelihood", (context, greedy_text, images, 0, "toy", "test"), 0),
        request("loglikelihood", ("", " a small red circle"), 3),  # acc_mutual_info's unconditional request
    ]
    results = lm.loglikelihood(requests)  # batches of 2: rows of different lengths, right-padded
    expected = [
        reference(pipe, "What colour is the shape?", " red", DOCS[0]["image"]),
        reference(pipe, "What colour is it?", " blue", DOCS[1]["image"]),
        reference(pipe, "Describe the image.", " a large green circle", DOCS[2]["image"]),
        reference(pipe, context, greedy_text, DOCS[0]["image"]),
        reference(pipe, "", " a small red circle", None),
    ]
    for (total, greedy), (want, want_greedy, _) in zip(results, expected, strict=True):
        assert isinstance(total, float) and total < 0
        assert total == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
    assert [greedy for _, greedy in results] == [False, False, False, True, False]
