"""Training-step time of VPiT vs LLaVA (transformers' `LlavaForConditionalGeneration`) with the same parts.

    python -m benchmarks.training_step [--repeats 11] [--threads 1] [--profile] [--out benchmarks/results/training_step.json]

Both models, random init, fp32, SDPA attention:
- LLM: a Llama of 8 layers, hidden 512, 8 heads (head dim 64, no GQA), MLP 1376 (Llama's 2.6875x), a vocabulary
  of 32000 (Llama 2's size; the token ids are drawn at random, vpit's tiny BPE tokenizer only decides the three
  image-token ids). Trained in full in both.
- Vision tower: transformers' `CLIPVisionModel` of ViT-B/16 size (12 layers, width 768, 224 px, 14x14 = 196
  patches), frozen in both, features of the second-to-last block (LLaVA's default; VPiT is given
  `feature_layer=-2` so that both run the same tower). VPiT loads it from a saved folder through its `hf` backend.
- Projector: 2-layer MLP with GELU, 768 -> 512 -> 512, in both (LLaVA's `multi_modal_projector`, VPiT's
  `mlp2x_gelu` bridge). VPiT also trains its visual head (512 -> 512 -> 768) with the cosine loss.
- Batch: 4 rows of 256 tokens, one 224 px image per row, 196 image tokens each (VPiT: K = 196, the 14x14 grid
  without pooling, plus its two boundary tokens; LLaVA's rows carry two more text tokens instead). LLaVA: 4
  understanding rows (image, question, labelled answer). VPiT: 2 such rows + 2 generation rows (prompt, labelled
  response text, a labelled response image whose 196 slots are cosine-loss targets).

A step is forward + backward + AdamW step + zero_grad. One warm-up step each, then `repeats` rounds of one step
of each (the order alternating between rounds). The figure is the median over rounds of the per-round ratio of
process CPU time: torch runs on one thread, so CPU time is the work of the step, while the wall time of a shared
2-core machine also counts the time the process waited for a core (the wall-time ratio is reported as well).
Goal: VPiT <= 1.05x LLaVA.

Also measured: the FLOPs of a step of each (torch's FlopCounterMode: the work, whatever the load), and the text
loss alone, forward + backward on (4, 256, 32000) logits, `vpit.model.losses.text_loss` vs transformers'
`ForCausalLMLoss` (which LLaVA uses): the one part of the step where VPiT moves more memory for the same result
(it copies the shifted logits and their gradient). `--profile` also compares the two steps operator by operator
under torch.profiler (the least time of each operator over 3 steps of each side).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.loss.loss_utils import ForCausalLMLoss

import vpit
from vpit.model.losses import text_loss
from vpit.toy.tiny import train_bpe_tokenizer

from .common import describe_machine, median_ratio, timed_runs, write_json

VOCAB = 32000
K = 196  # 14 x 14 patches of a 224 px image at patch 16: LLaVA's image tokens, VPiT's K without pooling
ROW = 256
BATCH = 4
TEXT_IDS = (400, VOCAB)  # random text tokens, clear of the tokenizer's special and image tokens
IGNORE = -100


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
    )


def clip_config() -> CLIPVisionConfig:
    """ViT-B/16 at 224 px (CLIP's image tower)."""
    return CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
    )


def build_vpit(folder: Path) -> vpit.VPiTForCausalLM:
    """VPiT from a Llama object and a CLIP vision tower saved as a transformers folder (the `hf` backend)."""
    return build_vpit_and_processor(folder)[0]


def build_vpit_and_processor(folder: Path) -> tuple[vpit.VPiTForCausalLM, vpit.VPiTProcessor]:
    """`build_vpit`, with its processor."""
    torch.manual_seed(0)
    CLIPVisionModel(clip_config()).save_pretrained(folder / "clip")
    config = llama_config()
    config._attn_implementation = "sdpa"
    llm = LlamaForCausalLM(config)
    return vpit.assemble(
        llm,
        str(folder / "clip"),
        vision_backend="hf",
        feature_layer=-2,
        tokenizer=train_bpe_tokenizer(),
        num_visual_tokens=K,
        bridge="mlp2x_gelu",
    )


def build_llava(image_token_id: int) -> LlavaForConditionalGeneration:
    """LLaVA-1.5's layout: CLIP tower (second-to-last block, class token dropped), 2-layer GELU projector, Llama."""
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=clip_config(),
        text_config=llama_config(),
        image_token_index=image_token_id,
        image_seq_length=K,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = "sdpa"  # the default here; named so that both sides surely run the same kernels
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(False)  # frozen, as in LLaVA-1.5's instruction tuning
    return model


def _text(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(*TEXT_IDS, (n,), generator=generator)


def _row(parts: list[tuple[torch.Tensor, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (ids, labelled) segments into (ids, labels) of length ROW."""
    ids = torch.cat([p for p, _ in parts])
    labels = torch.cat([p if labelled else torch.full_like(p, IGNORE) for p, labelled in parts])
    assert ids.shape == (ROW,), ids.shape
    return ids, labels


def vpit_batch(model: vpit.VPiTForCausalLM, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """2 understanding rows (prompt image, labelled answer) + 2 generation rows (labelled response image)."""
    start, end, slot = model.image_token_ids()
    g = torch.Generator().manual_seed(1)

    def span(labelled: bool) -> list[tuple[torch.Tensor, bool]]:
        # Boundary tokens of a response image are CE targets; its slots are cosine-loss targets (label -100).
        return [(torch.tensor([start]), labelled), (torch.full((K,), slot), False), (torch.tensor([end]), labelled)]

    understanding = [(_text(8, g), False), *span(False), (_text(14, g), False), (_text(36, g), True)]
    generation = [(_text(40, g), False), (_text(16, g), True), *span(True), (_text(2, g), True)]
    rows = [_row(understanding), _row(understanding), _row(generation), _row(generation)]
    return {
        "input_ids": torch.stack([ids for ids, _ in rows]),
        "labels": torch.stack([labels for _, labels in rows]),
        "pixel_values": pixels,
    }


def llava_batch(image_token_id: int, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """4 understanding rows: text, 196 image tokens, a question, a labelled answer."""
    g = torch.Generator().manual_seed(1)
    parts = [(_text(8, g), False), (torch.full((K,), image_token_id), False), (_text(16, g), False)]
    rows = [_row([*parts, (_text(36, g), True)]) for _ in range(BATCH)]
    return {
        "input_ids": torch.stack([ids for ids, _ in rows]),
        "labels": torch.stack([labels for _, labels in rows]),
        "pixel_values": pixels,
    }


def training_step(model: nn.Module, batch: dict[str, torch.Tensor], frozen: nn.Module) -> Callable[[], float]:
    """forward + backward + AdamW step + zero_grad on the trainable parameters; returns the loss."""
    model.train()
    frozen.eval()  # the frozen tower runs without dropout in both methods
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def count(model: nn.Module, trainable: bool) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def counted_flops(steps: dict[str, Callable[[], float]]) -> dict[str, float]:
    """FLOPs of one step of each side as torch's FlopCounterMode counts them (matmuls, convolutions, attention):
    the work, independent of the machine's load."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for name, step in steps.items():
        with FlopCounterMode(display=False) as counter:
            step()
        flops[name] = float(counter.get_total_flops())
    return flops


def profile(steps: dict[str, Callable[[], float]], rounds: int = 3, rows: int = 12) -> dict[str, Any]:
    """Per operator, the least self CPU time over `rounds` profiled steps of each side (the least filters out the
    load of a shared machine), summed per side; prints the operators where VPiT and LLaVA differ most."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    least: dict[str, dict[str, float]] = {name: {} for name in steps}
    calls: dict[str, dict[str, int]] = {name: {} for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            for event in prof.key_averages():
                ms = event.self_cpu_time_total / 1000
                least[name][event.key] = min(least[name].get(event.key, ms), ms)
                calls[name][event.key] = event.count
    ops = sorted(set(least["vpit"]) | set(least["llava"]))
    table: list[dict[str, Any]] = [
        {
            "op": op,
            "vpit_ms": least["vpit"].get(op, 0.0),
            "llava_ms": least["llava"].get(op, 0.0),
            "vpit_calls": calls["vpit"].get(op, 0),
            "llava_calls": calls["llava"].get(op, 0),
        }
        for op in ops
    ]
    table.sort(key=lambda row: abs(row["vpit_ms"] - row["llava_ms"]), reverse=True)
    totals = {name: sum(values.values()) for name, values in least.items()}
    print(f"profile: least self CPU time per operator over {rounds} steps, summed")
    print(f"  vpit {totals['vpit']:.0f} ms, llava {totals['llava']:.0f} ms ({totals['vpit'] / totals['llava']:.3f}x)")
    print(f"  {'operator (largest differences)':56} {'vpit ms':>9} {'llava ms':>9} {'calls':>11}")
    for row in table[:rows]:
        print(
            f"  {row['op'][:56]:56} {row['vpit_ms']:9.1f} {row['llava_ms']:9.1f} "
            f"{row['vpit_calls']:5d}/{row['llava_calls']:<5d}"
        )
    return {"total_ms": totals, "ratio": totals["vpit"] / totals["llava"], "operators": table[:40]}


def loss_functions(repeats: int) -> dict[str, Any]:
    """The text loss alone, forward + backward on (4, 256, 32000) fp32 logits with LLaVA-like labels:
    `vpit.model.losses.text_loss` vs transformers' `ForCausalLMLoss` (what `LlavaForConditionalGeneration` uses)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(BATCH, ROW, VOCAB, generator=g)
    labels = torch.randint(*TEXT_IDS, (BATCH, ROW), generator=g)
    labels[:, : ROW - 40] = IGNORE

    def run(loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], float]:
        def once() -> float:
            x = logits.detach().requires_grad_()
            loss = loss_fn(x)
            loss.backward()
            return float(loss.detach())

        return once

    fns = {
        "vpit_text_loss": run(lambda x: text_loss(x, labels)),
        "transformers_causal_lm_loss": run(lambda x: ForCausalLMLoss(x, labels, VOCAB)),
    }
    values = {name: fn() for name, fn in fns.items()}
    assert abs(values["vpit_text_loss"] - values["transformers_causal_lm_loss"]) < 1e-4, values
    wall, cpu = timed_runs(fns, repeats)
    return {
        "cpu_seconds": {name: statistics.median(v) for name, v in cpu.items()},
        "wall_seconds": {name: statistics.median(v) for name, v in wall.items()},
        "ratio_cpu": median_ratio(cpu["vpit_text_loss"], cpu["transformers_causal_lm_loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--profile", action="store_true", help="also compare the two steps operator by operator")
    parser.add_argument("--out", default="benchmarks/results/training_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start_time = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        vpit_model = build_vpit(Path(tmp))
    _, _, slot = vpit_model.image_token_ids()
    llava_model = build_llava(image_token_id=slot)
    pixels = torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    steps = {
        "vpit": training_step(vpit_model, vpit_batch(vpit_model, pixels), vpit_model.vision_tower),
        "llava": training_step(llava_model, llava_batch(slot, pixels), llava_model.model.vision_tower),
    }
    attention = {
        "vpit_llm": vpit_model.language_model.config._attn_implementation,
        "vpit_vision": vpit_model.vision_tower.tower.config._attn_implementation,
        "llava_llm": llava_model.model.language_model.config._attn_implementation,
        "llava_vision": llava_model.model.vision_tower.config._attn_implementation,
    }
    assert set(attention.values()) == {"sdpa"}, attention
    wall, cpu = timed_runs(steps, args.repeats)
    losses = {name: step() for name, step in steps.items()}
    assert all(math.isfinite(v) for v in losses.values()), losses
    loss_only = loss_functions(args.repeats)
    flops = counted_flops(steps)
    profiled = profile(steps) if args.profile else None

    ratio = median_ratio(cpu["vpit"], cpu["llava"])
    result: dict[str, Any] = {
        "machine": describe_machine(),
        "llm": "Llama 8 layers x 512, 8 heads, MLP 1376, vocab 32000, fp32, SDPA",
        "vision": "CLIPVisionModel ViT-B/16 @224 px (196 patches), frozen, block -2",
        "projector": "2-layer MLP GELU 768 -> 512 -> 512",
        "batch": f"{BATCH} rows x {ROW} tokens, {BATCH} images, {K} image tokens each",
        "vpit_batch": "2 understanding rows + 2 generation rows (response image: 196 cosine targets)",
        "llava_batch": "4 understanding rows",
        "parameters": {
            "vpit_trainable": count(vpit_model, True),
            "vpit_total": count(vpit_model, False),
            "llava_trainable": count(llava_model, True),
            "llava_total": count(llava_model, False),
        },
        "repeats": args.repeats,
        "cpu_seconds_per_step": {name: statistics.median(v) for name, v in cpu.items()},
        "wall_seconds_per_step": {name: statistics.median(v) for name, v in wall.items()},
        "cpu_runs": cpu,
        "wall_runs": wall,
        "ratio_vpit_over_llava": ratio,
        "ratio_wall": median_ratio(wall["vpit"], wall["llava"]),
        "goal": "<= 1.05",
        "met": ratio <= 1.05,
        "counted_flops_per_step": flops,
        "counted_flops_ratio": flops["vpit"] / flops["llava"],
        "text_loss_only": loss_only,
        "wall_s": time.perf_counter() - start_time,
    }
    if profiled is not None:
        result["profile"] = profiled
    out = write_json(args.out, result)

    params = result["parameters"]
    cpu_s, wall_s = result["cpu_seconds_per_step"], result["wall_seconds_per_step"]
    print(f"training step (forward + backward + AdamW), {result['batch']}; median of {args.repeats}, alternating")
    print(f"{'model':8} {'trainable':>10} {'total':>9} {'CPU s/step':>11} {'wall s/step':>12}")
    for name in ("vpit", "llava"):
        print(
            f"{name:8} {params[name + '_trainable'] / 1e6:9.1f}M {params[name + '_total'] / 1e6:8.1f}M "
            f"{cpu_s[name]:11.3f} {wall_s[name]:12.3f}"
        )
    print(
        f"VPiT / LLaVA {ratio:.3f}x CPU time, {result['ratio_wall']:.3f}x wall "
        f"(goal <= 1.05x: {'met' if result['met'] else 'MISSED'})"
    )
    print(
        f"FLOPs per step (torch FlopCounterMode): vpit {flops['vpit'] / 1e9:.1f} G, llava {flops['llava'] / 1e9:.1f} G "
        f"({result['counted_flops_ratio']:.4f}x)"
    )
    loss_cpu = loss_only["cpu_seconds"]
    print(
        f"text loss alone, fwd+bwd on ({BATCH}, {ROW}, {VOCAB}) logits: vpit {loss_cpu['vpit_text_loss']:.3f} s, "
        f"transformers {loss_cpu['transformers_causal_lm_loss']:.3f} s ({loss_only['ratio_cpu']:.2f}x); wrote {out}"
    )


if __name__ == "__main__":
    main()
