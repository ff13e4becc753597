"""Decoder robustness: reconstruction when the tokens it decodes are off the encoder's, as predicted tokens are.

    python -m benchmarks.decoder_robustness [--model outputs/demo/model] [--decoder outputs/demo/decoder]
                                            [--repeats 1] [--out benchmarks/results/decoder_robustness.json]

Every toy composition (180, freshly jittered renders, `--repeats` times) is encoded by the model's frozen vision
encoder, and the decoder reconstructs the image from:

- the exact encoder tokens (the reconstruction figure of `vpit eval toy`);
- the tokens perturbed to cosine 0.99, 0.97 and 0.95 with their originals: each token rotated by a random direction
  orthogonal to it (the tokens are unit vectors), the angle set so that its cosine is exactly that;
- the VPiT model's teacher-forced predictions of the same image: the visual head's output at each slot of the image
  in "Generate an image of {caption}." -> "Here is an image based on your request: <image>" (the toy data's own
  answer), with the true tokens as context.

Each reconstruction is judged by the toy world's pixel judge (all four attributes right). A decoder trained only on
exact tokens falls off quickly; one trained on the model's predictions too should degrade gracefully. Needs
`make demo`'s outputs (the model and the decoder); 25 sampling steps, guidance 3, as `vpit eval toy`.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import torch

from vpit.data.formats import GENERATION_RESPONSE
from vpit.inference.pipeline import VPiTPipeline
from vpit.toy.evaluate import wilson_interval
from vpit.toy.judge import judge
from vpit.toy.world import compositions, jittered, render

from .common import describe_machine, write_json

COSINES = (0.99, 0.97, 0.95)


def perturbed(tokens: torch.Tensor, cosine: float, generator: torch.Generator) -> torch.Tensor:
    """(..., Dv) unit tokens rotated to exactly `cosine` with themselves, each in a random orthogonal direction."""
    noise = torch.randn(tokens.shape, generator=generator).to(tokens)
    noise = noise - (noise * tokens).sum(-1, keepdim=True) * tokens  # orthogonal to each token
    noise = torch.nn.functional.normalize(noise, dim=-1)
    return cosine * tokens + (1 - cosine**2) ** 0.5 * noise


def teacher_forced(pipe: VPiTPipeline, captions: list[str], images: list[Any]) -> torch.Tensor:
    """(B, K, Dv): the visual head's predictions at the image slots, the true image tokens as context."""
    processor, model = pipe.processor, pipe.model
    messages = [
        [
            {"role": "user", "content": f"Generate an image of {c}."},
            {"role": "assistant", "content": GENERATION_RESPONSE},
        ]
        for c in captions
    ]
    batch = processor.apply_chat_template(messages, tokenize=True, images=images)  # labels: the answer
    out = model(**{k: v.to(pipe.device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
    return out.visual_predictions.reshape(len(captions), model.config.num_visual_tokens, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/demo/model")
    parser.add_argument("--decoder", default="outputs/demo/decoder")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="benchmarks/results/decoder_robustness.json")
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file() or not (Path(args.decoder) / "model_index.json").is_file():
        raise SystemExit(f"needs `make demo`'s outputs: {args.model} and {args.decoder} (run `make demo` first)")
    start = time.perf_counter()
    pipe = VPiTPipeline.from_pretrained(args.model, decoder=args.decoder)
    decoder = pipe.decoder
    assert decoder is not None
    decoder.set_progress_bar_config(disable=True)
    rng = random.Random(f"decoder-robustness:{args.seed}")
    objects = [jittered(rng, *c) for c in compositions() for _ in range(args.repeats)]
    conditions = ["encoder", *(f"cosine {c}" for c in COSINES), "teacher-forced"]
    right: dict[str, int] = dict.fromkeys(conditions, 0)
    cosine_tf: list[float] = []
    noise = torch.Generator().manual_seed(args.seed)
    for first in range(0, len(objects), args.batch_size):
        batch = objects[first : first + args.batch_size]
        images = [render(o) for o in batch]
        pixels = pipe.processor.preprocess_images(images).to(pipe.device)
        with torch.inference_mode():
            tokens = pipe.model.encode_images(pixels).float()
            inputs = {"encoder": tokens}
            inputs |= {f"cosine {c}": perturbed(tokens, c, noise) for c in COSINES}
            predicted = teacher_forced(pipe, [o.caption for o in batch], images).float()
            inputs["teacher-forced"] = predicted
            cosine_tf.append(float(torch.nn.functional.cosine_similarity(predicted, tokens, dim=-1).mean()))
            for name, condition in inputs.items():
                generator = torch.Generator(decoder.device).manual_seed(args.seed + first)
                out = decoder(
                    visual_tokens=condition, num_inference_steps=25, guidance_scale=3.0, generator=generator
                ).images
                right[name] += sum(judge(image).matches(o)["all"] for image, o in zip(out, batch, strict=True))
    n = len(objects)
    result: dict[str, Any] = {
        "machine": describe_machine(),
        "model": args.model,
        "decoder": args.decoder,
        "n": n,
        "accuracy": {name: right[name] / n for name in conditions},
        "ci95": {name: wilson_interval(right[name], n) for name in conditions},
        "teacher_forced_mean_cosine": sum(cosine_tf) / len(cosine_tf),
        "seconds": time.perf_counter() - start,
    }
    print(f"{describe_machine()}; {n} renders, 25 steps, guidance 3")
    print("| tokens decoded | reconstruction, all four right |\n| --- | --- |")
    for name in conditions:
        low, high = result["ci95"][name]
        label = (
            name if name != "teacher-forced" else f"teacher-forced (cosine {result['teacher_forced_mean_cosine']:.3f})"
        )
        print(f"| {label} | {100 * result['accuracy'][name]:.1f}% [{100 * low:.1f}, {100 * high:.1f}] |")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
