"""Decoder training steps from the frozen cache (`decoder.cache_frozen`) vs from the pixels, on the toy world.

    python -m benchmarks.decoder_cache --work outputs/toy [--steps 10] [--repeats 5] [--out benchmarks/results/decoder_cache.json]

Needs a toy work folder (`make demo` writes outputs/toy: the data, the backbones and the bridge-stage model). The
settings are `recipes/toy/decoder.yaml`'s (batch 32, one DataLoader worker, one torch thread, the toy VAE and the
toy CLIP), pointed at WORK. First the cache is written (every image of the generation and understanding sets
through the frozen encoder and VAE, into a temporary folder) and timed; then `repeats` rounds of `steps` training
steps from each side, alternating so that load on the machine hits both alike, each step the next batch from vpit's
own loader + the loss + backward + AdamW, in wall time (the loader's worker is part of the cost). The figures:
seconds per step of each side, their ratio (median of the per-round ratios), and after how many steps the cache
has paid for its writing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vpit.data.cards import parse_mixture
from vpit.toy.demo import toy_mixture
from vpit.training.components import IMAGE_BATCH_KEYS, build_image_batches
from vpit.training.config import load_recipe
from vpit.training.diffusion import decoder_schedulers
from vpit.training.stages.decoder import (
    DecoderTrainable,
    ImageEncoder,
    build_decoder,
    frozen_fingerprint,
    open_frozen_cache,
    write_frozen_cache,
)

from .common import describe_machine, median_ratio, write_json


def measure(work: Path, steps: int, repeats: int) -> dict[str, Any]:
    mixture = toy_mixture(work, {"generation": 1.0, "understanding": 1.0})
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(
            "recipes/toy/decoder.yaml",
            [
                f"model.pretrained={work / 'bridge' / 'final'}",
                f"decoder.vae={work / 'backbones' / 'vae'}",
                f"data.mixture={mixture}",
                f"train.output_dir={tmp}",
            ],
        )
        torch.manual_seed(0)
        pipeline = build_decoder(recipe)
        pipeline.scheduler, noise_scheduler = decoder_schedulers(
            pipeline.scheduler, recipe.decoder.prediction_type, recipe.decoder.flow_shift
        )
        assert pipeline.vision_encoder is not None
        resolution = pipeline.unet.config["sample_size"] * pipeline.vae_scale_factor
        transform = pipeline.vision_encoder.image_transform()
        cards = [entry.load() for entry in parse_mixture(recipe.data.mixture)]
        folder = Path(tmp) / "frozen_cache"
        start = time.perf_counter()
        fingerprint = frozen_fingerprint(pipeline, resolution)
        counts = write_frozen_cache(pipeline, transform, resolution, cards, folder, fingerprint)
        write_seconds = time.perf_counter() - start
        images = sum(c["encoded"] for part, c in counts.items() if part.endswith("/tokens"))

        trainable = DecoderTrainable(pipeline, noise_scheduler, recipe)
        optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-4)
        frozen = open_frozen_cache(pipeline, cards, folder, fingerprint)
        loaders = {
            side: iter(
                build_image_batches(recipe.data, ImageEncoder(transform, resolution, frozen=cache), 0, 1, Path(tmp))
            )
            for side, cache in (("pixels", None), ("cached", frozen))
        }
        generator = torch.Generator().manual_seed(0)

        def run(side: str) -> float:
            start = time.perf_counter()
            for _ in range(steps):
                batch = next(loaders[side])
                inputs = {key: batch[key] for key in IMAGE_BATCH_KEYS if key in batch}
                out = trainable(inputs.pop("encoder_pixels", None), inputs.pop("images", None), generator, **inputs)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            return (time.perf_counter() - start) / steps

        run("pixels"), run("cached")  # warm-up: the workers start, the first batches arrive
        times: dict[str, list[float]] = {"pixels": [], "cached": []}
        for _ in range(repeats):
            for side in times:
                times[side].append(run(side))
    pixels, cached = (sorted(times[side])[len(times[side]) // 2] for side in ("pixels", "cached"))
    return {
        "images": images,
        "cache_write_seconds": round(write_seconds, 1),
        "seconds_per_step": {"pixels": round(pixels, 4), "cached": round(cached, 4)},
        "speedup": round(median_ratio(times["pixels"], times["cached"]), 3),
        "break_even_steps": round(write_seconds / max(pixels - cached, 1e-9)),
        "steps": steps,
        "repeats": repeats,
        "batch_size": recipe.data.batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("outputs/toy"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/decoder_cache.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the recipe trains (train.torch_threads: 1)
    result = {"machine": describe_machine()} | measure(args.work, args.steps, args.repeats)
    write_json(args.out, result)
    s = result["seconds_per_step"]
    print(f"decoder step: pixels {s['pixels']:.3f} s, cached {s['cached']:.3f} s ({result['speedup']:.2f}x); "
          f"cache of {result['images']} images written in {result['cache_write_seconds']:.0f} s, "
          f"paid back after {result['break_even_steps']} steps")  # fmt: skip


if __name__ == "__main__":
    main()
