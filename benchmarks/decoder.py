"""Decoder sampling speed: `VPiTDecoderPipeline` vs a bare diffusers denoising loop with the same parts.

    python -m benchmarks.decoder [--steps 20] [--batch 4] [--repeats 5] [--threads 1] [--out benchmarks/results/decoder.json]

Both sides run the same UNet, scheduler (DDIM), number of steps, classifier-free guidance (scale 7.5, the negative
being the all-zero context, batched with the condition as diffusers pipelines do), VAE decode and conversion to a
[0, 1] tensor; the pipeline also runs the projector and its input checks. The bare loop is the loop of diffusers'
text-to-image pipelines written out, with the context computed once outside the timing. Each measure is images/s,
the median of `repeats` timed runs after a warm-up, the two sides alternating so that load on the (shared)
machine hits both alike, timed in process CPU time (one thread: the work of a run, not the time it waited for a
core). The ratio is the median of the per-round ratios (a run of each side per round). Goal: pipeline >= 0.95x
the bare loop. The pipeline's progress bar is disabled.

Threads: one by default. On a 2-core machine that anything else is also using, torch's two OpenMP threads spin
against the other load and a ~1 M-parameter UNet call goes from ~20 ms to ~1.5 s; one thread keeps the figures
about the code under test.

Settings: the toy world decoder (toy VAE, 32x32 images -> 8x8x4 latents, ~1 M-parameter UNet, K = 16 tokens of
Dv = 128) and its pixel-space variant (the UNet denoises 32x32x3 images, no VAE).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vpit.decoder import VPiTDecoderPipeline
from vpit.toy.decoder import toy_decoder_components

from .common import median_ratio

DV, K, GUIDANCE = 128, 16, 7.5


@torch.no_grad()
def bare_loop(pipe: VPiTDecoderPipeline, context: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """diffusers' denoising loop without the pipeline: (B, L, D) context -> (B, 3, H, W) images in [0, 1]."""
    unet, scheduler, vae = pipe.unet, pipe.scheduler, pipe.vae
    batch = context.shape[0]
    both = torch.cat([torch.zeros_like(context), context])  # [∅, c]
    factor = 2 ** (len(vae.config["block_out_channels"]) - 1) if vae is not None else 1
    size = unet.config["sample_size"]
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, unet.config["in_channels"], size, size, generator=generator)
    latents = latents * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        unconditional, conditional = unet(model_input, t, encoder_hidden_states=both).sample.chunk(2)
        noise = unconditional + GUIDANCE * (conditional - unconditional)
        latents = scheduler.step(noise, t, latents, eta=0.0, generator=generator).prev_sample
    pixels = vae.decode(latents / vae.config["scaling_factor"]).sample if vae is not None else latents
    assert pixels.shape[-1] == size * factor
    return (pixels / 2 + 0.5).clamp(0, 1)


def timed(run: Callable[[], torch.Tensor]) -> float:
    """Images/s of one call, in process CPU time (with one thread, the work of the call whatever else runs)."""
    start = time.process_time()
    images = run()
    elapsed = time.process_time() - start
    return images.shape[0] / elapsed


def measure(latent: bool, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    pipe = VPiTDecoderPipeline(**toy_decoder_components(DV, K, latent=latent))
    pipe.set_progress_bar_config(disable=True)
    z = F.normalize(torch.randn(batch, K, DV, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        context = pipe.projector(z)

    def pipeline() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        output = pipe(
            visual_tokens=z, generator=generator, num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="pt"
        )
        assert not isinstance(output, tuple) and isinstance(output.images, torch.Tensor)
        return output.images

    def bare() -> torch.Tensor:
        return bare_loop(pipe, context, steps, seed=0)

    # Same computation: the two produce the same images (up to float reassociation).
    difference = (pipeline() - bare()).abs().max().item()
    timed(pipeline), timed(bare)  # warm-up
    pipeline_rates, bare_rates = [], []
    for _ in range(repeats):
        pipeline_rates.append(timed(pipeline))
        bare_rates.append(timed(bare))
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    return {
        "setting": "toy latent (VAE 32px -> 8x8x4)" if latent else "toy pixel space (32x32x3)",
        "unet_parameters": unet_params,
        "batch": batch,
        "steps": steps,
        "guidance_scale": GUIDANCE,
        "max_abs_difference": difference,
        "pipeline_images_per_s": statistics.median(pipeline_rates),
        "bare_loop_images_per_s": statistics.median(bare_rates),
        "ratio": median_ratio(pipeline_rates, bare_rates),
        "pipeline_runs": pipeline_rates,
        "bare_loop_runs": bare_rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the module docstring)")
    parser.add_argument("--out", default="benchmarks/results/decoder.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    rows = [measure(latent, args.batch, args.steps, args.repeats) for latent in (True, False)]
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__,
        "goal": "pipeline >= 0.95x bare loop",
        "settings": rows,
        "wall_s": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"decoder sampling, {args.steps} DDIM steps, CFG {GUIDANCE}, batch {args.batch}, median of {args.repeats}")
    print(f"{'setting':34} {'UNet':>8} {'pipeline img/s':>15} {'bare loop img/s':>16} {'ratio':>7}")
    for row in rows:
        print(
            f"{row['setting']:34} {row['unet_parameters'] / 1e6:7.2f}M {row['pipeline_images_per_s']:15.2f} "
            f"{row['bare_loop_images_per_s']:16.2f} {row['ratio']:6.3f}x"
        )
    print(f"goal: ratio >= 0.95; wrote {out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
