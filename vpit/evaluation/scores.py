"""CLIP score and Fréchet distance of generated images, with any open_clip model, computed by torchmetrics.

    CLIP score   torchmetrics' `CLIPScore`: 100 * cos(image embedding, prompt embedding) for each (image, prompt)
                 pair, averaged, then floored at 0 (torchmetrics 1.9 floors the mean, not each pair). torchmetrics
                 loads transformers CLIP models by name only, but also takes a callable returning any (model,
                 processor) with transformers' interface (`get_image_features`, `get_text_features`, a processor
                 called with `images=` or `text=`); `_TransformersStyleClip` / `_TransformersStyleProcessor` give an
                 open_clip model that interface, with open_clip's own eval transform and tokenizer. The tokenizer
                 truncates to the text tower's context (77 tokens for the OpenAI-style CLIPs), so DPG-Bench's long
                 prompts are scored on their beginning.
    Fréchet      torchmetrics' `FrechetInceptionDistance` with a custom feature extractor, `ImageEmbedding`: the
    distance     open_clip model's image embedding (`encode_image`, not L2-normalised) of each image after the model's
                 eval transform. ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2)), covariances over n - 1.
                 With a CLIP encoder this is the "FD in CLIP space" of Kynkäänniemi et al. 2023 (arXiv 2203.06026),
                 less tied to ImageNet classes than Inception's FID; it is only comparable between runs that use the
                 same encoder and the same reference images.

An open_clip model is named the way `open_clip_name` reads it:

    ViT-B-32:openai                  a registry architecture and its pretrained tag, as
                                     open_clip.list_pretrained(as_str=True) lists them
    hf-hub:timm/ViT-B-16-SigLIP      a Hub repository holding open_clip_config.json and weights ("org/name" works too)
    local-dir:/path  or  /path       a local folder holding open_clip_config.json and weights (as `vpit toy backbones`
                                     writes outputs/toy/backbones/clip)

A registry name without a tag is refused: open_clip would build it with random weights.

Example:
    >>> clip = load_open_clip("ViT-B-32:openai", device="cuda")
    >>> clip_score(clip, images, prompts), frechet_distance(clip, images, image_files("coco/val2014"))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import open_clip
import torch
from PIL import Image
from torch import nn

from ..errors import REPO_ID_PATTERN, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

ImageItem = Image.Image | str | Path | Callable[[], Image.Image]
"""An image to score: a PIL image, the path of an image file, or a function that loads one (files and loaders are
read when their batch is scored, so that a large set need not fit in memory)."""


@dataclass
class OpenClip:
    """A loaded open_clip model with its eval transform and tokenizer.

    Args:
        name: the name it was loaded by (as given).
        model: the open_clip CLIP, in eval mode.
        preprocess: PIL image -> (3, H, W) float tensor, the model's eval transform.
        tokenizer: list of str -> (N, context_length) token ids.
        image_size: (H, W) the transform's output size.
    """

    name: str
    model: Any  # an open_clip CLIP (open_clip ships no types)
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    image_size: tuple[int, int]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def open_clip_name(name: str) -> tuple[str, str | None]:
    """(model_name, pretrained) for `open_clip.create_model_and_transforms`, from a name as the module docstring
    lists them."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return name, None
    if Path(name).is_dir():
        if not (Path(name) / "open_clip_config.json").is_file():
            raise UsageError(f"{name} has no open_clip_config.json; give an open_clip model folder")
        return f"local-dir:{name}", None
    if REPO_ID_PATTERN.match(name):
        return f"hf-hub:{name}", None
    architecture, _, tag = name.partition(":")
    if architecture not in open_clip.list_models():
        raise UsageError(
            f"{name!r} is no open_clip model: give NAME:TAG (open_clip.list_pretrained(as_str=True)), hf-hub:org/repo "
            "or a local open_clip folder"
        )
    if not tag:
        tags = [t for n, t in open_clip.list_pretrained() if n == architecture]
        raise UsageError(
            f"{name!r} names an architecture without weights (open_clip would initialise it randomly); add a "
            f"pretrained tag: {', '.join(f'{architecture}:{t}' for t in tags) or 'none is registered'}"
        )
    return architecture, tag


def load_open_clip(name: str, device: torch.device | str | None = None) -> OpenClip:
    """Load an open_clip model (see the module docstring for `name`) on `device` (default: cuda when available)."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    model_name, pretrained = open_clip_name(name)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    image_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return OpenClip(name, model.eval(), preprocess, open_clip.get_tokenizer(model_name), image_size)


def image_files(folder: str | Path) -> list[Path]:
    """The image files under `folder` (any depth; .png, .jpg, .jpeg, .webp, .bmp), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder of reference images")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _rgb(image: ImageItem) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if callable(image):
        return image().convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------------------------------------- CLIP score


class _TransformersStyleClip(nn.Module):
    """An open_clip model behind the two methods torchmetrics' CLIPScore calls on a transformers CLIPModel."""

    def __init__(self, clip: OpenClip) -> None:
        super().__init__()
        self.clip: Any = clip.model
        # CLIPScore reads `model.config.text_config` when present (to truncate); the tokenizer truncates already.
        self.config = SimpleNamespace()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixel_values)  # (N, 3, H, W) -> (N, E)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.clip.encode_text(input_ids)  # (N, C) -> (N, E); the causal text tower needs no mask


class _TransformersStyleProcessor:
    """open_clip's eval transform and tokenizer behind the call torchmetrics' CLIPScore makes on a CLIPProcessor."""

    def __init__(self, clip: OpenClip) -> None:
        self.clip = clip

    def __call__(
        self, images: Sequence[torch.Tensor] | None = None, text: Sequence[str] | None = None, **_: Any
    ) -> dict[str, torch.Tensor]:
        from torchvision.transforms.functional import to_pil_image

        if images is not None:  # (3, H, W) uint8 each, as `clip_score` hands them over
            return {"pixel_values": torch.stack([self.clip.preprocess(to_pil_image(image)) for image in images])}
        ids = self.clip.tokenizer(list(text or []))  # (N, C)
        vocabulary = getattr(self.clip.model, "vocab_size", None)
        if vocabulary is not None and int(ids.max()) >= vocabulary:
            raise UsageError(
                f"the tokenizer of {self.clip.name} yields token id {int(ids.max())} but its text tower has a "
                f"vocabulary of {vocabulary}: this model cannot read text; give a CLIP with a text tower for --clip"
            )
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def clip_score(clip: OpenClip, images: Sequence[ImageItem], prompts: Sequence[str], batch_size: int = 64) -> float:
    """torchmetrics' CLIP score of (image, prompt) pairs with an open_clip model: the mean of 100 * cosine of the
    image and text embeddings, floored at 0.

    Args:
        clip: the scoring model (`load_open_clip`).
        images: N images (PIL or paths); prompts: N texts, pair i is (images[i], prompts[i]).
    """
    from torchmetrics.multimodal.clip_score import CLIPScore
    from torchvision.transforms.functional import pil_to_tensor

    if len(images) != len(prompts):
        raise ValueError(f"clip_score pairs images with prompts; got {len(images)} images and {len(prompts)} prompts")
    if not images:
        raise UsageError("the CLIP score needs at least one image; none was generated")
    # torchmetrics types the factory as returning transformers classes; it only calls the methods named above.
    factory: Any = lambda: (_TransformersStyleClip(clip), _TransformersStyleProcessor(clip))  # noqa: E731
    metric = CLIPScore(model_name_or_path=factory)
    metric.to(clip.device)  # its sums live beside the model, which it moves to the images' device
    with torch.no_grad():
        for batch_images, batch_prompts in zip(
            _batches(images, batch_size), _batches(prompts, batch_size), strict=True
        ):
            pixels = [pil_to_tensor(_rgb(image)).to(clip.device) for image in batch_images]  # (3, H, W) uint8 each
            metric.update(pixels, list(batch_prompts))
        return float(metric.compute())


# ------------------------------------------------------------------------------------------- Fréchet distance


class ImageEmbedding(nn.Module):
    """The feature extractor torchmetrics' FrechetInceptionDistance takes: (N, 3, H, W) pixels after the model's
    eval transform -> (N, E) image embeddings. `num_features` tells torchmetrics E without a trial pass."""

    def __init__(self, clip: OpenClip) -> None:
        super().__init__()
        self.model: Any = clip.model
        with torch.no_grad():
            trial = clip.model.encode_image(torch.zeros(1, 3, *clip.image_size, device=clip.device))  # (1, E)
        self.num_features = int(trial.shape[-1])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


def frechet_distance(
    clip: OpenClip, generated: Sequence[ImageItem], reference: Sequence[ImageItem], batch_size: int = 64
) -> float:
    """The Fréchet distance between two image sets in `clip`'s image-embedding space (torchmetrics).

    Raises:
        vpit.errors.UsageError: fewer than 2 images in a set (a covariance needs two).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    for what, images in (("generated", generated), ("reference", reference)):
        if len(images) < 2:
            raise UsageError(f"the Fréchet distance needs at least 2 {what} images (a covariance), got {len(images)}")
    # normalize=True: a custom extractor then receives float pixels as given (here: after the eval transform).
    metric = FrechetInceptionDistance(feature=ImageEmbedding(clip), normalize=True).to(clip.device)
    with torch.no_grad():
        for real, images in ((True, reference), (False, generated)):
            for batch in _batches(images, batch_size):
                pixels = torch.stack([clip.preprocess(_rgb(image)) for image in batch]).to(clip.device)  # (B, 3, H, W)
                metric.update(pixels, real=real)
        return float(metric.compute())


__all__ = [
    "IMAGE_SUFFIXES",
    "ImageEmbedding",
    "OpenClip",
    "clip_score",
    "frechet_distance",
    "image_files",
    "load_open_clip",
    "open_clip_name",
]
