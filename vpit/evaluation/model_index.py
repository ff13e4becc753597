"""The figures of vpit's evaluations as Hub `model-index` entries (huggingface_hub `EvalResult`s), which
`vpit.hub.write_eval_results` writes into a folder's model card so that the Hub shows them on the model's page.

    vpit eval toy         dataset "vpit-toy-world", one config per measure, accuracies in percent:
        understanding     visual-question-answering  accuracy                 all question types
        in-distribution   text-to-image              accuracy                 decoded image judged, all four attributes
                                                     token_space_accuracy     predicted tokens' nearest composition
        held-out          text-to-image              the same two             the held-out compositions
        editing           image-to-image             accuracy                 edited image judged, all four attributes
        reconstruction    image-to-image             accuracy                 decoder round trip judged, all four
    vpit eval generation  text-to-image on the prompt set (dataset "geneval", "dpg-bench", or the plain file's stem):
                          clip_score (config: the CLIP) and frechet_distance (config: the encoder whose image
                          embeddings it is measured in; not "fid", which means Inception features)

A result is identified by task, dataset (type, config, split) and metric (type, config); writing a result again
replaces the one with the same identity, so reruns update a card instead of piling up. `write_eval_results` turns
local paths (a local CLIP folder named as metric config) into "<local path>", as everywhere in vpit's cards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult

TOY_DATASET_TYPE, TOY_DATASET_NAME = "vpit-toy-world", "vpit toy world"
# The Hub dataset (type, name) of each prompt format; plain prompts are named after their file.
BENCHMARKS = {"geneval": ("geneval", "GenEval"), "dpg": ("dpg-bench", "DPG-Bench")}


def _percent(value: float) -> float:
    return round(100 * float(value), 2)


def toy_eval_results(report: dict[str, Any]) -> list[EvalResult]:
    """The headline figures of a `vpit eval toy` report (`vpit.toy.evaluate.evaluate_toy`), in percent."""
    results = [
        EvalResult(
            task_type="visual-question-answering",
            task_name="Understanding",
            dataset_config="understanding",
            metric_type="accuracy",
            metric_name="Accuracy, all question types (%)",
            metric_value=_percent(report["understanding"]["overall"]),
            metric_args={"n": int(report["understanding"]["n"])},
            dataset_type=TOY_DATASET_TYPE,
            dataset_name=TOY_DATASET_NAME,
        )
    ]
    generation = report["generation"]
    for split in ("in_distribution", "held_out"):
        config = split.replace("_", "-")
        figures = [("accuracy", "All four attributes right, decoded image (%)", generation[split])]
        if "tokens" in generation:
            figures.append(
                ("token_space_accuracy", "All four attributes right, token space (%)", generation["tokens"][split])
            )
        for metric_type, metric_name, accuracy in figures:
            results.append(
                EvalResult(
                    task_type="text-to-image",
                    task_name="Generation",
                    dataset_config=config,
                    metric_type=metric_type,
                    metric_name=f"{metric_name}, {config}",
                    metric_value=_percent(accuracy["all"]),
                    metric_args={"n": int(accuracy["n"])},
                    dataset_type=TOY_DATASET_TYPE,
                    dataset_name=TOY_DATASET_NAME,
                )
            )
    for measure in ("editing", "reconstruction"):
        accuracy = report.get(measure)
        if accuracy:
            results.append(
                EvalResult(
                    task_type="image-to-image",
                    task_name=measure.capitalize(),
                    dataset_config=measure,
                    metric_type="accuracy",
                    metric_name=f"All four attributes right, {measure} (%)",
                    metric_value=_percent(accuracy["all"]),
                    metric_args={"n": int(accuracy["n"])},
                    dataset_type=TOY_DATASET_TYPE,
                    dataset_name=TOY_DATASET_NAME,
                )
            )
    return results


def generation_eval_results(report: dict[str, Any]) -> list[EvalResult]:
    """The CLIP score and Fréchet distance of a `vpit eval generation` report (none when it has neither)."""
    dataset_type, dataset_name = BENCHMARKS.get(report["format"], (Path(report["prompts"]).stem,) * 2)
    samples = report["settings"]["samples_per_prompt"]
    results = []
    if report.get("clip_score"):
        score = report["clip_score"]
        results.append(
            EvalResult(
                metric_type="clip_score",
                metric_name="CLIP score",
                metric_value=round(float(score["value"]), 4),
                metric_config=score["model"],
                metric_args={"n": int(score["n"]), "samples_per_prompt": samples},
                task_type="text-to-image",
                task_name="Text-to-image generation",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
            )
        )
    if report.get("fid"):
        fid = report["fid"]
        results.append(
            EvalResult(
                # Not "fid": that type means Inception features, and leaderboards compare it as such.
                metric_type="frechet_distance",
                metric_name="Fréchet distance, image embeddings of the config's encoder",
                metric_value=round(float(fid["value"]), 4),
                metric_config=fid["encoder"],
                metric_args={"n_generated": int(fid["n_generated"]), "n_reference": int(fid["n_reference"])},
                task_type="text-to-image",
                task_name="Text-to-image generation",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
            )
        )
    return results


__all__ = ["generation_eval_results", "toy_eval_results"]
