"""Training-step throughput with the encoder-token cache (`vpit data cache-features`) vs encoding the pixels.

    python -m benchmarks.feature_cache [--repeats 7] [--images 48] [--out benchmarks/results/feature_cache.json]

The model is benchmarks.training_step's VPiT (a Llama of 8 layers x 512, a 32000 vocabulary; transformers' CLIP
ViT-B/16 at 224 px, frozen, second-to-last block, K = 196), saved as a folder. The data: a caption card of
`--images` random 224 px PNG images ("Generate an image of ..." -> the image as the response: every image is a
cosine-loss target), batches of 4, read by vpit's own loader (`build_batches`, no worker: image decoding counts).
A step is: the next batch from the loader + forward + backward + AdamW step. One warm-up step each, then
`repeats` rounds of one step of each side (alternating), process CPU time on one torch thread (see
benchmarks.training_step). The cache is written first, and its writing speed is reported too.

The figure: cached / pixels samples per second (the median of per-round ratios). ViT-B/16 is small next to
MetaMorph's SigLIP SO400M at 384 px (about 10x the FLOPs per image): the saving grows with the encoder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import vpit
from vpit.data.features import cache_card_features, encoder_fingerprint
from vpit.training.components import build_batches
from vpit.training.config import DataSection

from .common import describe_machine, median_ratio, timed_runs, write_json
from .training_step import K, build_vpit_and_processor

BATCH = 4


def write_card(folder: Path, images: int) -> Path:
    """A caption card of random 224 px PNGs."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    with (folder / "records.jsonl").open("w") as out:
        for i in range(images):
            pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "images" / f"{i:04d}.png")
            out.write(json.dumps({"id": str(i), "image": f"{i:04d}.png", "caption": f"pattern number {i}"}) + "\n")
    card = folder / "card.yaml"
    card.write_text(
        "name: bench_generation\ndescription: random 224 px images\ntask: generation\nformat: caption\n"
        "license: Apache-2.0\ncitation: none\nsource: {data_files: [records.jsonl], image_folder: images}\n"
    )
    return card


def build(folder: Path) -> tuple[vpit.VPiTForCausalLM, vpit.VPiTProcessor]:
    """benchmarks.training_step's VPiT, saved as a folder (what `vpit data cache-features` reads)."""
    model, processor = build_vpit_and_processor(folder)
    model.save_pretrained(folder / "vpit")
    processor.save_pretrained(folder / "vpit")
    return model, processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/feature_cache.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        card = write_card(folder / "data", args.images)
        model, processor = build(folder)
        start = time.perf_counter()
        _, counts = cache_card_features(card, folder / "vpit", batch_size=8, device="cpu")
        cache_seconds = time.perf_counter() - start
        data = DataSection(mixture=[{"card": str(card)}], batch_size=BATCH, num_workers=0, max_length=512)
        fingerprint = encoder_fingerprint(model.config, processor.preprocess_config)
        streams = {
            "pixels": iter(build_batches(data, processor, 0, 1, folder / "pixels")),
            "cached": iter(build_batches(data, processor, 0, 1, folder / "cached", encoder_fingerprint=fingerprint)),
        }
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        keys = ("input_ids", "labels", "visual_target_mask", "attention_mask", "pixel_values", "visual_tokens",
                "visual_tokens_given")  # fmt: skip

        def step(name: str) -> Any:
            def run() -> None:
                batch = next(streams[name])
                assert ("visual_tokens" in batch) == (name == "cached")
                loss = model(**{k: batch[k] for k in keys if k in batch}, return_logits=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            return run

        wall, cpu = timed_runs({"pixels": step("pixels"), "cached": step("cached")}, args.repeats)
    ratio = median_ratio(cpu["pixels"], cpu["cached"])  # time ratio = throughput ratio (same batch size)
    result = {
        "machine": describe_machine(),
        "images_cached": counts["encoded"],
        "cache_images_per_s": counts["encoded"] / cache_seconds,
        "pixels_samples_per_s": BATCH / float(np.median(cpu["pixels"])),
        "cached_samples_per_s": BATCH / float(np.median(cpu["cached"])),
        "speedup_cached_vs_pixels": ratio,
        "speedup_wall": median_ratio(wall["pixels"], wall["cached"]),
        "cpu_seconds": cpu,
    }
    print(f"{describe_machine()}; ViT-B/16 224 px (K={K}) + Llama 8x512, batches of {BATCH}")
    print(f"cache written: {counts['encoded']} images at {result['cache_images_per_s']:.1f} img/s")
    print("| side | samples/s (CPU time) |\n| --- | --- |")
    print(f"| pixels (encoder in the step) | {result['pixels_samples_per_s']:.2f} |")
    print(f"| cached encoder tokens | {result['cached_samples_per_s']:.2f} |")
    print(f"| speedup | **{ratio:.2f}x** (wall {result['speedup_wall']:.2f}x) |")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
