"""VPiT training throughput (tokens/s) and model FLOPs utilisation (MFU) against the device's measured matmul peak.

    python -m benchmarks.mfu --device cpu|cuda [--size small|1b] [--repeats 5] [--threads 1] [--out PATH]

Sizes (random init, built from configs; the encoder is transformers' `SiglipVisionModel`, loaded by VPiT's `hf`
backend from a saved folder; K = 64 visual tokens per image, bilinear-pooled from the patch grid):
- `1b` (the default on cuda; bf16 weights, fused AdamW, SDPA): a Llama-3.2-1B-shaped LLM (hidden 2048, 16 layers,
  32 heads, 8 KV heads, MLP 8192, vocab 128256, tied embeddings) + a SigLIP-SO400M-shaped encoder (hidden 1152,
  27 layers, 16 heads, MLP 4304, 384 px, patch 14: 27 x 27 = 729 patches); 8 rows of 2048 tokens, 4 images a row.
- `small` (the default on cpu; fp32, AdamW): Llama 4 layers x 512, 8 heads, MLP 1376, vocab 32000 + a SigLIP-like
  encoder of 6 layers x 384, 6 heads, MLP 1536, 224 px, patch 14 (256 patches); 2 rows of 1024 tokens, 2 images a
  row.
Each row alternates an understanding image (prompt: input only) and a generation image (response: its K slots are
cosine-loss targets, its boundary tokens CE targets); every other text token after the first chunk is labelled.
The LLM, bridge and visual head train; the encoder is frozen.

A step is forward + backward + AdamW step + zero_grad. The peak is a dense matmul measured on the same device in
the same run (cuda: 8192^3 in bf16; cpu: 2048^3 in fp32 on the same threads), interleaved with the steps: one
warm-up each, then the median of `repeats` rounds. On cpu both are timed in process CPU time (one thread: the
machines are shared, and CPU time is what the work cost whatever else ran); on cuda in wall time between
`torch.cuda.synchronize()` calls.

Model FLOPs per step (the usual count: matmuls only; norms, activations, softmax and the optimizer are overhead):
    LLM      6 * N_llm * B*T  +  6 * N_head * B*P  +  6 * L * d_attn * T * B*T   (N_llm: the LLM's Linear weights
             but the LM head, N_head; P: positions a label follows; the embedding lookup not counted; attention is causal, so each position attends to half the row on average:
             half PaLM's full-row 12 * L * d_attn * T; d_attn = heads x head dim)
    bridge   6 * N_bridge * I*K          head  6 * N_head * M   (M: response slots)
    encoder  I * (2 * N_enc * P + 4 * L_enc * D_enc * P^2)   (frozen: forward only; N_enc: the Linear and patch-
             convolution weights of the blocks up to the feature layer, P patches per image; the post-norm and the
             SigLIP pooling head, which VPiT does not use, are not counted)
MFU = model FLOPs per step / step time / peak, against both peaks: the matmul measured here, and the device's
published dense peak (bf16 tensor cores on the GPUs of `SPEC_PEAK_TFLOPS`; none for a CPU, whose virtual cores
publish none). No goal: the figure tracks regressions; the cuda figure is the one that says how well VPiT uses a
GPU. The step is the training loop's (`return_logits=False`): the LM head runs, and is counted, only at the
positions a label follows (every row at those positions), the rest of the LLM at every token.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

import vpit
from vpit.toy.tiny import train_bpe_tokenizer

from .common import describe_machine, median_ratio, timed_runs, write_json

IGNORE = -100


@dataclass
class Size:
    """One benchmark setting: LLM and encoder shapes, batch layout, matmul size for the peak."""

    llm: dict[str, Any]
    vision: dict[str, Any]
    batch: int
    row: int
    images_per_row: int
    num_visual_tokens: int = 64
    peak_matmul: int = 2048
    peak_matmul_repeats: int = 4


SIZES = {
    "1b": Size(
        llm={
            "hidden_size": 2048,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 8192,
            "vocab_size": 128256,
            "tie_word_embeddings": True,
            "rope_theta": 500000.0,
        },
        vision={
            "hidden_size": 1152,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "intermediate_size": 4304,
            "image_size": 384,
            "patch_size": 14,
        },
        batch=8,
        row=2048,
        images_per_row=4,
        peak_matmul=8192,
        peak_matmul_repeats=50,
    ),
    "small": Size(
        llm={
            "hidden_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "intermediate_size": 1376,
            "vocab_size": 32000,
            "tie_word_embeddings": False,
        },
        vision={
            "hidden_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
            "intermediate_size": 1536,
            "image_size": 224,
            "patch_size": 14,
        },
        batch=2,
        row=1024,
        images_per_row=2,
        peak_matmul=2048,
        peak_matmul_repeats=4,
    ),
}


def synchronize(device: torch.device) -> Callable[[], None]:
    """What to call before reading the clock: waits for queued kernels on cuda, nothing on cpu."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def build_model(size: Size, device: torch.device, dtype: torch.dtype, folder: Path) -> vpit.VPiTForCausalLM:
    """VPiT from a Llama built on `device` and a SigLIP tower saved as a transformers folder (the `hf` backend)."""
    torch.manual_seed(0)
    with torch.device(device):
        tower = SiglipVisionModel(SiglipVisionConfig(**size.vision))
        tower.to(dtype)  # type: ignore[arg-type]  # transformers' decorated `to` confuses mypy
        tower.save_pretrained(folder / "siglip")
        config = LlamaConfig(**size.llm, max_position_embeddings=max(2048, size.row))
        config._attn_implementation = "sdpa"
        llm = LlamaForCausalLM(config)
    model, _ = vpit.assemble(
        llm,
        str(folder / "siglip"),
        vision_backend="hf",
        tokenizer=train_bpe_tokenizer(),
        num_visual_tokens=size.num_visual_tokens,
        dtype=dtype,
    )
    return model.to(device)  # type: ignore[arg-type]  # transformers' decorated `to` confuses mypy


def build_batch(model: vpit.VPiTForCausalLM, size: Size, device: torch.device) -> dict[str, torch.Tensor]:
    """Rows of `size.row` tokens, each: [text][prompt image][text][response image]...[text]; see the docstring."""
    start, end, slot = model.image_token_ids()
    k, n = size.num_visual_tokens, size.images_per_row
    text_total = size.row - n * (k + 2)
    chunk = text_total // (n + 1)
    g = torch.Generator().manual_seed(1)
    vocab = int(size.llm["vocab_size"])
    rows, labels = [], []
    for _ in range(size.batch):
        ids_parts: list[torch.Tensor] = []
        label_parts: list[torch.Tensor] = []
        for j in range(n + 1):
            length = chunk if j < n else text_total - n * chunk
            text = torch.randint(400, vocab, (length,), generator=g)
            ids_parts.append(text)
            label_parts.append(text if j > 0 else torch.full_like(text, IGNORE))
            if j == n:
                break
            span = torch.tensor([start, *[slot] * k, end])
            response = j % 2 == 1  # a response image's boundary tokens are CE targets; its slots never are
            span_labels = torch.full_like(span, IGNORE)
            if response:
                span_labels[0], span_labels[-1] = start, end
            ids_parts.append(span)
            label_parts.append(span_labels)
        rows.append(torch.cat(ids_parts))
        labels.append(torch.cat(label_parts))
    side = int(size.vision["image_size"])
    pixels = torch.randn(size.batch * n, 3, side, side, generator=g)
    batch = {"input_ids": torch.stack(rows), "labels": torch.stack(labels), "pixel_values": pixels}
    assert batch["input_ids"].shape == (size.batch, size.row)
    return {key: value.to(device) for key, value in batch.items()}


def matmul_weights(module: nn.Module) -> int:
    """Elements of the Linear and convolution weights of `module` (each used once per token / patch)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


# Published dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name.
SPEC_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}


def spec_peak(device: torch.device) -> float | None:
    """The device's published dense peak in TFLOP/s, or None (a CPU, or a GPU missing from the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in SPEC_PEAK_TFLOPS.items() if key in name), None)


def model_flops(model: vpit.VPiTForCausalLM, size: Size, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Model FLOPs of one training step, by part (see the module docstring for the formula)."""
    b, t = batch["input_ids"].shape
    images = batch["pixel_values"].shape[0]
    k = size.num_visual_tokens
    start, _, slot = model.image_token_ids()
    responses = int(((batch["input_ids"] == start) & (batch["labels"] != IGNORE)).sum())
    llm = size.llm
    d_attn = int(llm["hidden_size"])  # heads x head dim
    tokens = b * t
    vision = model.vision_tower
    tower: Any = getattr(vision.tower, "vision_model", vision.tower)  # transformers 4 nests the ViT one level down
    feature_layer = vision.config.feature_layer
    used_layers = feature_layer + 1 + len(tower.encoder.layers) if feature_layer < 0 else feature_layer
    n_enc = matmul_weights(tower.embeddings.patch_embedding) + sum(
        matmul_weights(layer) for layer in tower.encoder.layers[:used_layers]
    )
    patches = (int(size.vision["image_size"]) // int(size.vision["patch_size"])) ** 2
    d_enc = int(size.vision["hidden_size"])
    assert int((batch["input_ids"] == slot).sum()) == images * k
    head = model.language_model.get_output_embeddings()
    head_weights = matmul_weights(head)
    kept = b * int((batch["labels"][:, 1:] != IGNORE).any(dim=0).sum())  # rows x positions the LM head runs at
    return {
        "llm": 6.0 * (matmul_weights(model.language_model) - head_weights) * tokens,
        "lm_head": 6.0 * head_weights * kept,  # the loop runs the LM head only where a label follows
        "llm_attention": 6.0 * int(llm["num_hidden_layers"]) * d_attn * t * tokens,  # causal: half the row
        "bridge": 6.0 * matmul_weights(model.bridge) * images * k,
        "visual_head": 6.0 * matmul_weights(model.visual_head) * responses * k,
        "encoder_forward": images * (2.0 * n_enc * patches + 4.0 * used_layers * d_enc * patches**2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), help="default: 1b on cuda, small on cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on cpu")
    parser.add_argument("--out", help="default: benchmarks/results/mfu_<device>.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    device = torch.device(args.device)
    size = copy.deepcopy(SIZES[args.size or ("1b" if device.type == "cuda" else "small")])
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sync = synchronize(device)
    start_time = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(size, device, dtype, Path(tmp))
    model.train()
    batch = build_batch(model, size, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Fused AdamW: one kernel for all tensors on cuda; the plain loop on cpu.
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")

    def step() -> None:
        loss = model(**batch, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    n = size.peak_matmul
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def matmuls() -> None:
        for _ in range(size.peak_matmul_repeats):
            torch.mm(a, b)

    wall, cpu = timed_runs({"step": step, "matmul": matmuls}, args.repeats, warmup=2, sync=sync)
    times = cpu if device.type == "cpu" else wall
    clock = "process CPU time" if device.type == "cpu" else "wall time, synchronised"
    matmul_flops = 2.0 * n**3 * size.peak_matmul_repeats
    peak = matmul_flops / statistics.median(times["matmul"])
    step_s = statistics.median(times["step"])
    flops = model_flops(model, size, batch)
    step_flops = sum(flops.values())
    tokens = batch["input_ids"].numel()
    # Per-round MFU (the step and the peak of the same round), its median: load that drifts between rounds cancels.
    mfu_paired = median_ratio([step_flops * m for m in times["matmul"]], [matmul_flops * s for s in times["step"]])
    result: dict[str, Any] = {
        "machine": describe_machine(device.type),
        "device": device.type,
        "precision": precision,
        "size": asdict(size),
        "parameters": {
            "total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in trainable),
            "llm": sum(p.numel() for p in model.language_model.parameters()),
            "encoder": sum(p.numel() for p in model.vision_tower.parameters()),
        },
        "tokens_per_step": tokens,
        "clock": clock,
        "repeats": args.repeats,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "model_flops_per_step": flops,
        "model_tflops_per_step": step_flops / 1e12,
        "achieved_tflops_per_s": step_flops / step_s / 1e12,
        "peak_matmul_tflops_per_s": peak / 1e12,
        "mfu": step_flops / step_s / peak,
        "peak_spec_tflops_per_s": spec_peak(device),
        "mfu_spec": (step_flops / step_s / (spec_peak(device) * 1e12)) if spec_peak(device) else None,
        "mfu_paired_rounds": mfu_paired,
        "runs": {"step": times["step"], "matmul": times["matmul"]},
        "wall_s": time.perf_counter() - start_time,
    }
    if device.type == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out = write_json(args.out or f"benchmarks/results/mfu_{device.type}.json", result)

    params = result["parameters"]
    print(
        f"VPiT training step on {device.type} ({precision}), size {args.size or ('1b' if device.type == 'cuda' else 'small')}: "
        f"LLM {params['llm'] / 1e6:.1f}M + encoder {params['encoder'] / 1e6:.1f}M parameters, "
        f"{size.batch} x {size.row} tokens, {batch['pixel_values'].shape[0]} images, K={size.num_visual_tokens}; "
        f"median of {args.repeats} ({clock})"
    )
    print(f"  step                           {step_s:10.3f} s")
    print(f"  throughput                     {result['tokens_per_s']:10.0f} tokens/s")
    print(f"  model FLOPs per step           {step_flops / 1e12:10.3f} TFLOP")
    for part, value in flops.items():
        print(f"    {part:28} {value / 1e12:10.3f}")
    print(f"  achieved                       {result['achieved_tflops_per_s']:10.3f} TFLOP/s")
    print(f"  measured matmul peak ({n}^3)  {result['peak_matmul_tflops_per_s']:10.3f} TFLOP/s")
    print(f"  MFU (measured peak)            {result['mfu']:10.1%}   (per-round median {mfu_paired:.1%})")
    if result["mfu_spec"] is not None:
        print(f"  MFU (spec {result['peak_spec_tflops_per_s']:.0f} TFLOP/s)        {result['mfu_spec']:10.1%}")
    else:
        print("  MFU (spec peak)                       -   (no published peak for this device)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
