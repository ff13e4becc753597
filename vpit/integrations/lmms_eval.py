"""lmms-eval plugin: `lmms-eval --model vpit --model_args pretrained=DIR` scores a saved VPiT model on lmms-eval's
benchmarks, and `write_lmms_eval_task` writes the toy world's understanding questions as a local lmms-eval task.

Registration is the `lmms_eval.models` entry point in vpit's pyproject.toml (`model_manifest`), so a stock
lmms-eval 0.7 finds an installed vpit: no fork, no LMMS_EVAL_PLUGINS. `VPiT` is a "simple" lmms-eval model:
lmms-eval hands it a context string and the doc's images, and the model applies its own chat template.

- generate_until: requests are grouped by their generation kwargs and answered `batch_size` at a time, one
  `VPiTPipeline` call per batch (left-padded, KV-cached), in the order lmms-eval gives them, so that a batch holds
  what `vpit eval toy` would batch together; each answer is cut at its first `until` stop string.
- loglikelihood: log P(continuation | context) from one forward of the model per batch, the context rendered by the
  chat template with its generation prompt (as generation renders it) and the continuation appended to it;
  is_greedy when every continuation token is the argmax of its position.

A context without `<image>` markers gets one per image in front ("<image>\\n{context}" for one image, the prompt of
`vpit eval toy`); a context with markers keeps them and must hold one per image.

Example:
    lmms-eval --model vpit --model_args pretrained=outputs/demo/model --batch_size 8 --tasks mmbench_en_dev

    >>> write_lmms_eval_task("toy_task")  # then: lmms-eval ... --include_path toy_task --tasks vpit_toy_understanding
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm

from ..inference.generation import DEFAULT_MAX_NEW_TOKENS
from ..inference.pipeline import AnswerOptions, VPiTPipeline
from ..toy.evaluate import UNDERSTANDING_MAX_NEW_TOKENS, EvalSettings, understanding_items
from ..training.evaluation import normalize_answer

logger = logging.getLogger(__name__)

MODEL_NAME = "vpit"
TOY_TASK = "vpit_toy_understanding"

# The generation kwargs `VPiT` reads; others (e.g. seedbench's `image_aspect_ratio`, meant for LLaVA) are ignored
# with a warning.
GENERATION_KWARGS = frozenset({"until", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams"})


def model_manifest() -> Any:
    """The `lmms_eval.models` entry point: `--model vpit` is `VPiT`, a simple (not chat) model."""
    # Imported here, not at the top: importing lmms_eval.models reads the entry points, this one among them.
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{VPiT.__name__}")


class VPiT(lmms):
    """A saved VPiT model as an lmms-eval model (`--model vpit`); its arguments are lmms-eval's `--model_args`.

    Args:
        pretrained: a VPiT folder (model + processor, as training or `save_pretrained` writes it).
        device: where to run ("cuda", "cuda:1", "cpu"); default: the GPU of this process's LOCAL_RANK under a
            multi-process launch (lmms-eval shards the docs), else "cuda" when available, else "cpu".
        dtype: the weights' dtype ("bfloat16", "float16", "float32"); default as saved.
        batch_size: requests per pipeline call or forward (lmms-eval's `--batch_size`; a whole number, not "auto").
        max_new_tokens: tokens to generate when a task's generation kwargs name no `max_new_tokens`.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        super().__init__()
        self.batch_size = _whole_number("batch_size", batch_size)
        self.max_new_tokens = _whole_number("max_new_tokens", max_new_tokens)
        if device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.pipe = VPiTPipeline.from_pretrained(str(pretrained), dtype=dtype, device=device)
        self._ignored_reported: set[tuple[str, ...]] = set()

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    # ------------------------------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer each request (args: context, gen_kwargs, doc_to_visual, doc_id, task, split) as its gen_kwargs say:
        greedy unless they sample, at most `max_new_tokens`, cut at the first of their `until` strings.

        Raises:
            ValueError: naming the request, for what vpit cannot do: non-image visuals (video, audio), beam search,
                a context whose `<image>` markers differ in number from its images.
        """
        answers = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=repr), []).append(index)
        bar = tqdm(total=len(requests), desc="vpit: generate_until", disable=self.rank != 0)
        for indices in groups.values():
            until, options = self._generation_options(requests[indices[0]])
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                prompts: list[str] = []
                images: list[Image.Image] = []
                for index in batch:
                    visuals = self._visuals(requests[index])
                    prompts.append(self._user_message(requests[index], len(visuals)))
                    images += visuals
                outputs = self.pipe(prompts, images=images, **options)
                for index, output in zip(batch, outputs, strict=True):
                    answers[index] = cut_at_stop(output.text, until)
                bar.update(len(batch))
        bar.close()
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "vpit answers one round per request (generate_until); multi-round tasks "
            "(output_type: generate_until_multi_round) are not supported"
        )

    def _generation_options(self, request: Instance) -> tuple[list[str], AnswerOptions]:
        """A request's gen_kwargs -> (its stop strings, the pipeline's options). temperature 0 means greedy, as in
        lmms-eval's tasks, whatever do_sample says."""
        gen_kwargs = dict(request.args[1] or {})
        where = _name(request)
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, list | tuple) or not all(isinstance(stop, str) for stop in until):
            raise ValueError(f"{where}: gen_kwargs 'until' must be a string or a list of strings, got {until!r}")
        if gen_kwargs.get("num_beams") not in (None, 1):
            raise ValueError(
                f"{where}: vpit decodes greedily or by sampling, not by beam search "
                f"(num_beams={gen_kwargs['num_beams']!r}); set num_beams to 1"
            )
        temperature = gen_kwargs.get("temperature")
        do_sample = gen_kwargs.get("do_sample")
        if do_sample is None:
            do_sample = temperature is not None and temperature > 0
        sample = bool(do_sample) and temperature != 0
        options: AnswerOptions = {
            "max_new_tokens": _whole_number(
                f"{where}: gen_kwargs max_new_tokens", gen_kwargs.get("max_new_tokens", self.max_new_tokens)
            ),
            "do_sample": sample,
        }
        if sample:
            options["temperature"] = None if temperature is None else float(temperature)
            options["top_p"] = None if gen_kwargs.get("top_p") is None else float(gen_kwargs["top_p"])
            options["top_k"] = None if gen_kwargs.get("top_k") is None else int(gen_kwargs["top_k"])
        ignored = tuple(sorted(set(gen_kwargs) - GENERATION_KWARGS))
        if ignored and ignored not in self._ignored_reported:
            self._ignored_reported.add(ignored)
            logger.warning("vpit ignores the gen_kwargs %s of task %r", list(ignored), request.task_name)
        return list(until), options

    # ------------------------------------------------------------------------------------------ likelihood

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) per request (args: context, continuation or doc_to_target,
        doc_to_visual, doc_id, task, split; or just context, continuation), `batch_size` rows per forward."""
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), desc="vpit: loglikelihood", disable=self.rank != 0)
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            results += self._score([self._scored_sequence(request) for request in batch])
            bar.update(len(batch))
        bar.close()
        return results

    def _scored_sequence(self, request: Instance) -> tuple[list[int], int, list[Image.Image]]:
        """(ids of the templated context followed by the continuation, how many of them are the context, images).
        The whole text is tokenised at once, as generation would have produced it; the context's share is the
        length of the context tokenised alone."""
        continuation = request.args[1]
        if callable(continuation):
            continuation = continuation(self._doc(request))
        visuals = self._visuals(request)
        message = {"role": "user", "content": self._user_message(request, len(visuals))}
        prompt = str(self.pipe.processor.apply_chat_template([message], add_generation_prompt=True))
        context_length = len(self._ids(prompt))
        if context_length == 0:
            raise ValueError(f"{_name(request)}: the chat template rendered an empty prompt")
        return self._ids(prompt + str(continuation)), context_length, visuals

    def _ids(self, text: str) -> list[int]:
        """Token ids of a rendered prompt, markers expanded; no special tokens added (the template writes them)."""
        processor = self.pipe.processor
        return list(processor.tokenizer(processor.expand_image_markers(text)[0], add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def _score(self, rows: list[tuple[list[int], int, list[Image.Image]]]) -> list[tuple[float, bool]]:
        """One forward over the right-padded rows (B, T); each row's continuation scored from its own logits."""
        tokenizer = self.pipe.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        length = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), length), int(pad), dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)
        for row, (ids, _, _) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        images = [image for _, _, row_images in rows for image in row_images]
        pixel_values = self.pipe.processor.preprocess_images(images).to(self.device) if images else None  # (I, 3, S, S)
        logits = self.pipe.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            pixel_values=pixel_values,
        ).logits  # (B, T, V)
        results = []
        for row, (ids, context_length, _) in enumerate(rows):
            targets = torch.tensor(ids[context_length:], device=logits.device)  # (C,)
            if not len(targets):
                results.append((0.0, True))
                continue
            # The logits at position t predict token t + 1.
            logprobs = torch.log_softmax(logits[row, context_length - 1 : len(ids) - 1].float(), dim=-1)  # (C, V)
            total = float(logprobs.gather(-1, targets[:, None]).sum())
            results.append((total, bool((logprobs.argmax(-1) == targets).all())))
        return results

    # ---------------------------------------------------------------------------------------------- inputs

    def _doc(self, request: Instance) -> Any:
        _, _, _, doc_id, task, split = request.args
        return self.task_dict[task][split][doc_id]

    def _visuals(self, request: Instance) -> list[Image.Image]:
        """The request's images, from its doc_to_visual; none for a request without one.

        Raises:
            ValueError: naming the request, when a visual is not a PIL image (a video path, audio, ...).
        """
        if len(request.args) < 6 or request.args[2] is None:
            return []
        visuals = request.args[2](self._doc(request))
        if visuals is None:
            return []
        visuals = [visuals] if isinstance(visuals, Image.Image) else list(visuals)
        others = sorted({type(v).__name__ for v in visuals if not isinstance(v, Image.Image)})
        if others:
            raise ValueError(
                f"{_name(request)}: vpit reads images (PIL) only, but doc_to_visual gave {others}; video and audio "
                "tasks are not supported"
            )
        return visuals

    def _user_message(self, request: Instance, images: int) -> str:
        """The context as the user's message: one `<image>` marker per image in front unless it holds its own."""
        context = str(request.args[0])
        marker = self.pipe.processor.image_token
        markers = self.pipe.processor.expand_image_markers(context)[1]
        if markers == 0:
            return f"{' '.join([marker] * images)}\n{context}" if images else context
        if markers != images:
            raise ValueError(
                f"{_name(request)}: the context holds {markers} {marker!r} marker(s) but {images} image(s)"
            )
        return context


def cut_at_stop(text: str, until: list[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any of the stop strings `until`."""
    cuts = [text.find(stop) for stop in until if stop and stop in text]
    return text[: min(cuts)] if cuts else text


def _name(request: Instance) -> str:
    return f"task {request.task_name!r} doc {request.doc_id}"


def _whole_number(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------- the toy task

_TASK_YAML = """\
# The toy world's understanding questions, as `vpit eval toy` asks them ({count} items: questions_per_type={per_type},
# seed={seed}); written by vpit.integrations.lmms_eval.write_lmms_eval_task.
task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function vpit.integrations.lmms_eval.toy_doc_to_visual
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  until: []
  max_new_tokens: {max_new_tokens}
  do_sample: false
process_results: !function vpit.integrations.lmms_eval.toy_process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 1.0
"""


def write_lmms_eval_task(out_dir: str | os.PathLike[str], settings: EvalSettings | None = None) -> Path:
    """Write the understanding questions of `vpit eval toy` (`vpit.toy.evaluate.understanding_items`, the same
    items in the same order) as a local lmms-eval task `vpit_toy_understanding`: the dataset (image, question,
    answer, kind, caption) saved with `datasets.save_to_disk` in OUT/data, and OUT/vpit_toy_understanding.yaml,
    scored by exact match after vpit's `normalize_answer`, generated greedily without stop strings, as `vpit eval
    toy` generates. The YAML names the dataset by its absolute path.

    Args:
        out_dir: the task folder, for lmms-eval's `--include_path`.
        settings: questions_per_type and seed select the items (the rest is unused); default `EvalSettings()`.

    Returns:
        the YAML's path.

    Example:
        >>> write_lmms_eval_task("toy_task", EvalSettings(questions_per_type=20))
        # lmms-eval --model vpit --model_args pretrained=outputs/demo/model --include_path toy_task \\
        #     --tasks vpit_toy_understanding
    """
    import datasets

    settings = settings or EvalSettings()
    items = understanding_items(settings)
    out = Path(out_dir).resolve()
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "kind": datasets.Value("string"),
            "caption": datasets.Value("string"),
        }
    )
    columns = {
        "image": [item.image for item in items],
        "question": [item.question for item in items],
        "answer": [item.answer for item in items],
        "kind": [item.kind for item in items],
        "caption": [item.obj.caption for item in items],
    }
    dataset = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(out / "data"))
    path = out / f"{TOY_TASK}.yaml"
    path.write_text(
        _TASK_YAML.format(
            count=len(items),
            per_type=settings.questions_per_type,
            seed=settings.seed,
            task=TOY_TASK,
            data=json.dumps(str(out / "data")),
            max_new_tokens=UNDERSTANDING_MAX_NEW_TOKENS,
        )
    )
    return path


def toy_doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The toy task's doc_to_visual: its one render."""
    return [doc["image"]]


def toy_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The toy task's score: 1 when the answer equals the grammar's after `normalize_answer`, as `vpit eval toy`."""
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
