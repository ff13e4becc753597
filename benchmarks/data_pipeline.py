"""Data pipeline throughput vs training-step consumption, and padding with and without packing.

    python -m benchmarks.data_pipeline [--workers 2] [--repeats 5] [--threads 1] [--out benchmarks/results/data_pipeline.json]

1. Throughput. LLaVA-style records (a 256x256 JPEG, a question, an answer of LLaVA-like length) go through the
   whole pipeline — JSONL read, JPEG decode, transform, chat-template tokenisation, collation — in a DataLoader
   with the given workers; a training step (forward + backward + AdamW) of a small VPiT model consumes
   pre-collated batches of the same data. Both are samples/s, median of `repeats` timed runs (each after its own
   warm-up), the two interleaved in the same process. Goal: pipeline >= 5x the step. The step runs on one torch
   thread (as in the other benchmarks: on a shared 2-core machine two OpenMP threads make it erratic); the
   DataLoader workers are processes of their own.
2. Padding. Sequence lengths drawn from a LLaVA-like distribution (log-normal body, mean ~ 640 tokens, long
   tail clipped at 2048) are padded per batch of 16 (the usual padded batch) and packed first-fit-decreasing
   into rows of 2048 from buffers of 64 samples. Goal: packed padding < 5%.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

import vpit
from vpit.data.cards import DataCard
from vpit.data.collator import VPiTCollator, model_inputs, plan_packing
from vpit.data.dataset import VPiTDataset
from vpit.toy.tiny import save_tiny_llama, save_tiny_open_clip

from .common import describe_machine

WORDS = [
    "the",
    "a",
    "shape",
    "small",
    "large",
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "triangle",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "of",
    "on",
    "in",
]
SMALL_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def make_data(folder: Path, n: int, rng: np.random.Generator) -> DataCard:
    images = folder / "images"
    images.mkdir(parents=True)
    rows = []
    for i in range(n):
        pixels = (rng.random((256, 256, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.jpg", quality=90)
        answer_words = int(np.clip(rng.lognormal(3.3, 0.7), 3, 200))
        answer = " ".join(rng.choice(WORDS, answer_words))
        rows.append(
            {
                "id": str(i),
                "image": f"{i}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image in detail."},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    card = {
        "name": "bench",
        "description": "synthetic LLaVA-style records",
        "task": "understanding",
        "format": "llava",
        "license": "Apache-2.0",
        "citation": "none",
        "source": {"data_files": ["data.jsonl"], "image_folder": "images"},
    }
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    return DataCard.load(folder / "card.yaml")


def time_pipeline(card: DataCard, processor: vpit.VPiTProcessor, workers: int, batch: int, batches: int) -> float:
    dataset = VPiTDataset([card], processor, max_length=512)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        num_workers=workers,
        collate_fn=VPiTCollator(processor.tokenizer.pad_token_id),
        persistent_workers=False,
    )
    stream = iter(loader)
    next(stream)  # warm-up: worker start, first decode
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch / (time.perf_counter() - start)


def time_training(model: vpit.VPiTForCausalLM, batches: list[dict], steps: int) -> float:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch: dict) -> None:
        out = model(**model_inputs(batch))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in itertools.islice(itertools.cycle(batches), steps):
        step(batch)
    return steps * batches[0]["num_samples"] / (time.perf_counter() - start)


def padding_fractions(rng: np.random.Generator, n: int = 4096, row: int = 2048) -> dict[str, float]:
    lengths = np.clip(rng.lognormal(6.3, 0.55, n), 64, row).astype(int)
    padded_tokens = real_tokens = 0
    for i in range(0, n, 16):
        chunk = lengths[i : i + 16]
        padded_tokens += len(chunk) * int(chunk.max())
        real_tokens += int(chunk.sum())
    packed_tokens = 0
    for i in range(0, n, 64):
        plan = plan_packing([int(x) for x in lengths[i : i + 64]], row)
        packed_tokens += len(plan) * row
    return {
        "mean_length": float(lengths.mean()),
        "padded_batch16": 1 - real_tokens / padded_tokens,
        "packed_buffer64_row2048": 1 - real_tokens / packed_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the training step")
    parser.add_argument("--out", default="benchmarks/results/data_pipeline.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        card = make_data(folder / "data", 256, rng)
        save_tiny_llama(folder / "llm", hidden_size=256, num_layers=4)
        save_tiny_open_clip(folder / "clip", model_cfg=SMALL_CLIP)
        model, processor = vpit.assemble(folder / "llm", f"local-dir:{folder / 'clip'}", num_visual_tokens=16)
        params = sum(p.numel() for p in model.parameters())
        collate = VPiTCollator(processor.tokenizer.pad_token_id)
        stream = iter(VPiTDataset([card], processor, max_length=512))
        batches = [collate([next(stream) for _ in range(args.batch)]) for _ in range(4)]
        pipeline, training = [], []
        for _ in range(args.repeats):  # interleaved, so that a change in the machine's load hits both alike
            pipeline.append(time_pipeline(card, processor, args.workers, args.batch, 12))
            training.append(time_training(model, batches, 6))
    result = {
        "machine": describe_machine(),
        "model": f"VPiT: Llama 4x256 + open_clip ViT 4x128 @64px, K=16, {params / 1e6:.2f} M parameters",
        "batch": args.batch,
        "workers": args.workers,
        "repeats": args.repeats,
        "pipeline_samples_per_s": statistics.median(pipeline),
        "training_samples_per_s": statistics.median(training),
        "ratio": statistics.median(pipeline) / statistics.median(training),
        "padding": padding_fractions(np.random.default_rng(1)),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"model: {result['model']}, batch {args.batch}, {args.workers} workers, median of {args.repeats}")
    print(f"  data pipeline   {result['pipeline_samples_per_s']:8.1f} samples/s")
    print(f"  training step   {result['training_samples_per_s']:8.1f} samples/s")
    print(f"  ratio           {result['ratio']:8.1f} x   (goal >= 5x)")
    pad = result["padding"]
    print(f"padding, LLaVA-like lengths (mean {pad['mean_length']:.0f}):")
    print(f"  padded, batch 16             {pad['padded_batch16']:6.1%}")
    print(f"  packed, rows 2048, buffer 64 {pad['packed_buffer64_row2048']:6.1%}   (goal < 5%)")


if __name__ == "__main__":
    main()
