"""Hugging Face Hub I/O: a generated model card and folder uploads.

Tokens are handed to `huggingface_hub.HfApi` only (or read by it from HF_TOKEN / the login cache); vpit never
writes them to disk or to logs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

CARD_TEMPLATE = """---
{card_data}
---

# {title}

A unified vision-language model trained with **Visual-Predictive Instruction Tuning** (VPiT,
[MetaMorph](https://arxiv.org/abs/2412.14164)) using [vpit](https://github.com/vpit/vpit): it answers questions
about images and generates images by predicting continuous visual tokens, which a diffusion decoder turns into
pixels.

## Architecture

| part | value |
|---|---|
| language model | {llm} |
| vision encoder ({backend}) | {vision} (feature layer {feature_layer}, frozen) |
| visual tokens per image (K) | {num_visual_tokens} ({pooling} pooling, L2-normalised: {normalize}) |
| bridge | {bridge} |
| visual head | {visual_head} |
| visual loss weight (λ) | {visual_loss_weight} |
{extra_rows}
## Usage

```python
import vpit  # registers the "vpit" model type with the transformers Auto classes
from vpit import VPiTForCausalLM, VPiTProcessor

model = VPiTForCausalLM.from_pretrained("{repo_id}")
processor = VPiTProcessor.from_pretrained("{repo_id}")
batch = processor(text=["<image> Describe the image."], images=["photo.jpg"])
outputs = model(**batch)
```
{training}"""


def _hub_id(name: str | None) -> str | None:
    """`name` if it looks like a Hub repo id (not a local path), else None."""
    if not name:
        return None
    name = name.removeprefix("hf-hub:").rstrip("/")
    if Path(name).exists() or not _REPO_ID.match(name):
        return None
    return name


def _vision_hub_id(vision: dict[str, Any]) -> str | None:
    if vision.get("backend") == "open_clip" and vision.get("pretrained"):
        import open_clip

        tag = open_clip.get_pretrained_cfg(vision["model_name"], vision["pretrained"]) or {}
        if tag.get("hf_hub"):
            return _hub_id(tag["hf_hub"])
    return _hub_id(vision.get("model_name"))


def build_model_card(
    folder: str | Path,
    repo_id: str,
    *,
    license: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    training_config: dict[str, Any] | None = None,
) -> ModelCard:
    """A model card for the VPiT folder `folder`, with YAML metadata (base models, library_name, tags,
    datasets, licence) read from its config.json, an architecture table, a usage snippet, and optionally the
    training config and final metrics."""
    config = json.loads((Path(folder) / "config.json").read_text())
    vision = config.get("vision_config", {})
    base_models = [m for m in (_hub_id(config.get("text_model_name_or_path")), _vision_hub_id(vision)) if m]
    card_data = ModelCardData(
        base_model=base_models or None,
        library_name="vpit",
        pipeline_tag="any-to-any",
        license=license,
        datasets=datasets,
        tags=[
            "vpit",
            "metamorph",
            "multimodal",
            "image-generation",
            "visual-predictive-instruction-tuning",
            *(tags or []),
        ],
    )
    extra_rows = "".join(f"| {name} | {value} |\n" for name, value in (metrics or {}).items())
    training = ""
    if training_config is not None:
        training = "\n## Training configuration\n\n```json\n" + json.dumps(training_config, indent=2) + "\n```\n"
    text = CARD_TEMPLATE.format(
        card_data=card_data.to_yaml(),
        title=repo_id.split("/")[-1],
        llm=config.get("text_model_name_or_path") or config.get("text_config", {}).get("model_type", "?"),
        backend=vision.get("backend", "?"),
        vision=vision.get("model_name", "?") + (f" ({vision['pretrained']})" if vision.get("pretrained") else ""),
        feature_layer=vision.get("feature_layer", -1),
        num_visual_tokens=config.get("num_visual_tokens"),
        pooling=config.get("pooling"),
        normalize=config.get("normalize_visual_tokens"),
        bridge=config.get("bridge"),
        visual_head=config.get("visual_head"),
        visual_loss_weight=config.get("visual_loss_weight"),
        extra_rows=extra_rows,
        repo_id=repo_id,
        training=training,
    )
    return ModelCard(text)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload VPiT model",
    **card_kwargs: Any,
) -> str:
    """Upload a VPiT folder to `repo_id`, writing a model card first when the folder has no README.md.

    Returns the commit URL.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; save the model with save_pretrained first")
    readme = folder / "README.md"
    if not readme.exists():
        build_model_card(folder, repo_id, **card_kwargs).save(readme)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    return str(commit.commit_url)


__all__ = ["build_model_card", "push_folder"]
