"""Image generation speed: KV-cached decoding vs the no-cache reference, and a visual step vs a text step.

    python -m benchmarks.generation [--repeats 5] [--out benchmarks/results/generation.json]

Model: a 4-layer Llama of width 256 + the tiny open_clip ViT, K = 64 visual tokens per image (the published
recipe's K), random weights. Prompt: 512 tokens, the last one `<image_start>`, so that the first 64 steps are
exactly one image. Every figure is the median of `repeats` timed runs after one warm-up, all in one process; the
measurements are interleaved (one run of each per round, the order rotating) so that a change in the machine's
load hits them alike, and timed in process CPU time (with one thread, the work of the run, whatever else the
machine runs; the wall-clock medians are in the JSON too).
Torch runs on `--threads` threads, 1 by default: the machines are shared, and with 2 OpenMP threads on a busy
2-core machine every parallel op of the 512-token forward waits for a descheduled thread (5-10x slower, erratic).

1. One image (64 visual tokens) with `vpit.inference.generation.generate` (KV cache, one position per step) vs
   `generate_no_cache` (MetaMorph's released inference style: the whole prefix recomputed every step).
   Goal: >= 10x.
2. Cost of a step: 64 visual steps of `generate` vs 64 text steps of transformers'
   `model.language_model.generate` (greedy, same LLM, same 512-token prompt), each total divided by 64 (the
   prefill included, as a user sees it); also without the prefill, (t(64 steps) - t(1 step)) / 63.
   Goal: visual step <= 1.2x the text step. For reference, 64 text steps of `generate` on the same prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM

import vpit
from vpit.inference.generation import generate, generate_no_cache
from vpit.toy.tiny import save_tiny_llama, save_tiny_open_clip

from .common import timed_runs

PROMPT_LENGTH = 512
K = 64


def build(folder: Path) -> tuple[vpit.VPiTForCausalLM, vpit.VPiTProcessor]:
    save_tiny_llama(folder / "llm", hidden_size=256, num_layers=4)
    # The tiny Llama allows 512 positions; the prompt and the image need 576 (RoPE computes any position).
    config_file = folder / "llm" / "config.json"
    config = json.loads(config_file.read_text())
    config["max_position_embeddings"] = 1024
    config_file.write_text(json.dumps(config, indent=2))
    save_tiny_open_clip(folder / "clip")
    model, processor = vpit.assemble(folder / "llm", f"local-dir:{folder / 'clip'}", num_visual_tokens=K)
    return model.eval(), processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/generation.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build(Path(tmp))
    params = sum(p.numel() for p in model.parameters())
    start_id, _, _ = model.image_token_ids()
    tokenizer = processor.tokenizer
    text_vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids and i < start_id]
    picks = torch.randint(len(text_vocab), (PROMPT_LENGTH - 1,), generator=torch.Generator().manual_seed(0))
    text_ids = torch.tensor([text_vocab[i] for i in picks.tolist()])
    image_prompt = torch.cat([text_ids, torch.tensor([start_id])])[None]  # (1, 512), ends with <image_start>
    text_prompt = torch.cat([text_ids, text_ids[-1:]])[None]  # (1, 512), text only
    llm = model.language_model
    assert isinstance(llm, LlamaForCausalLM)
    text_generate: Callable[..., Any] = llm.generate  # type: ignore[misc]  # transformers types generate's self twice
    no_eos: dict[str, Any] = {"eos_token_id": []}

    # Sanity: both paths generate the same image.
    cached_out = generate(model, image_prompt, max_new_tokens=K)
    reference_out = generate_no_cache(model, image_prompt, max_new_tokens=K)
    assert cached_out.images is not None and reference_out.images is not None
    assert len(cached_out.images[0]) == 1, "the 64 steps after <image_start> must be exactly one image"
    max_diff = float((cached_out.images[0][0] - reference_out.images[0][0]).abs().max())

    wall, cpu = timed_runs(
        {
            "image_cached": lambda: generate(model, image_prompt, max_new_tokens=K),
            "image_no_cache": lambda: generate_no_cache(model, image_prompt, max_new_tokens=K),
            "image_cached_1": lambda: generate(model, image_prompt, max_new_tokens=1),
            "hf_text": lambda: text_generate(text_prompt, max_new_tokens=K, min_new_tokens=K, do_sample=False),
            "hf_text_1": lambda: text_generate(text_prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False),
            "vpit_text": lambda: generate(model, text_prompt, max_new_tokens=K, max_images_per_row=0, **no_eos),
            "vpit_text_1": lambda: generate(model, text_prompt, max_new_tokens=1, max_images_per_row=0, **no_eos),
        },
        args.repeats,
    )
    t = {name: statistics.median(values) for name, values in cpu.items()}
    per_step = {
        "visual": t["image_cached"] / K,
        "hf_text": t["hf_text"] / K,
        "vpit_text": t["vpit_text"] / K,
    }
    decode_step = {
        "visual": (t["image_cached"] - t["image_cached_1"]) / (K - 1),
        "hf_text": (t["hf_text"] - t["hf_text_1"]) / (K - 1),
        "vpit_text": (t["vpit_text"] - t["vpit_text_1"]) / (K - 1),
    }
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "model": f"VPiT: Llama 4x256 + open_clip ViT 2x48 @32px, K={K}, {params / 1e6:.2f} M parameters",
        "prompt_length": PROMPT_LENGTH,
        "repeats": args.repeats,
        "clock": "process CPU time",
        "seconds": t,
        "wall_seconds": {name: statistics.median(values) for name, values in wall.items()},
        "image_speedup_cache_vs_no_cache": t["image_no_cache"] / t["image_cached"],
        "per_step_seconds_with_prefill": per_step,
        "per_step_seconds_decode_only": decode_step,
        "visual_vs_hf_text_step": per_step["visual"] / per_step["hf_text"],
        "visual_vs_hf_text_step_decode_only": decode_step["visual"] / decode_step["hf_text"],
        "max_abs_diff_cached_vs_reference": max_diff,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    ms = 1000.0
    print(f"model: {result['model']}; prompt {PROMPT_LENGTH} tokens; median of {args.repeats}")
    print(f"1. one image, {K} visual tokens                 seconds")
    print(f"   generate (KV cache)                        {t['image_cached']:8.3f}")
    print(f"   generate_no_cache (reference)              {t['image_no_cache']:8.3f}")
    print(
        f"   speed-up                                   {result['image_speedup_cache_vs_no_cache']:8.1f} x  (goal >= 10x)"
    )
    print(f"   max |ẑ cached - ẑ reference|               {max_diff:8.1e}")
    print("2. cost of a step, ms                      with prefill / 64   decode only")
    print(
        f"   visual step, vpit generate                 {per_step['visual'] * ms:8.2f}   {decode_step['visual'] * ms:8.2f}"
    )
    print(
        f"   text step, transformers generate           {per_step['hf_text'] * ms:8.2f}   {decode_step['hf_text'] * ms:8.2f}"
    )
    print(
        f"   text step, vpit generate                   {per_step['vpit_text'] * ms:8.2f}   {decode_step['vpit_text'] * ms:8.2f}"
    )
    print(
        f"   visual / transformers text                 {result['visual_vs_hf_text_step']:8.2f} x "
        f"{result['visual_vs_hf_text_step_decode_only']:8.2f} x  (goal <= 1.2x)"
    )


if __name__ == "__main__":
    main()
