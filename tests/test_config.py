"""VPiTConfig / VPiTVisionConfig: defaults, validation with actionable errors, serialisation, Auto classes."""

import math

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from vpit import VPiTConfig, VPiTVisionConfig
from vpit.model.adapters import build_bridge

TINY_TEXT = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "vocab_size": 100,
}


def test_defaults_follow_the_published_recipe():
    config = VPiTConfig(text_config=TINY_TEXT)
    assert config.model_type == "vpit"
    assert isinstance(config.text_config, LlamaConfig)
    assert isinstance(config.vision_config, VPiTVisionConfig)
    assert config.vision_config.model_name == "ViT-SO400M-14-SigLIP-384"
    assert config.vision_config.feature_layer == -1
    assert config.num_visual_tokens == 64
    assert (config.pooling, config.bridge, config.visual_head) == ("bilinear", "mlp2x_gelu", "mlp")
    assert config.visual_loss_weight == 1.0 and config.normalize_visual_tokens is True


def test_every_field_has_help_text():
    import dataclasses
    import inspect

    for cls in (VPiTConfig, VPiTVisionConfig):
        own = [f for f in dataclasses.fields(cls) if f.name in inspect.get_annotations(cls)]
        assert own, cls
        for f in own:
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_visual_tokens": 60}, "num_visual_tokens must be a square number .* got 60; the nearest square is 64"),
        ({"num_visual_tokens": 0}, "num_visual_tokens must be a square number"),
        ({"pooling": "max"}, r"pooling must be one of \['bilinear', 'avg'\], got 'max'"),
        ({"bridge": "mlp2x_relu"}, "bridge must be 'linear', 'mlpNx_gelu' with N >= 1 .* or a resampler"),
        ({"bridge": "mlp0x_gelu"}, "bridge must be 'linear', 'mlpNx_gelu' with N >= 1"),
        ({"visual_head": "transformer"}, r"visual_head must be one of \['diffusion', 'linear', 'mlp'\]"),
        ({"visual_loss_weight": -1.0}, "visual_loss_weight must be a finite number >= 0, got -1.0"),
        ({"visual_loss_weight": math.nan}, "visual_loss_weight must be a finite number"),
        ({"image_token": "<image_start>"}, "three distinct non-empty strings"),
        ({"image_end_token": " <e>"}, "without surrounding whitespace"),
    ],
)
def test_invalid_fields_raise_actionable_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VPiTConfig(text_config=TINY_TEXT, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "timm"}, r"backend must be one of \['open_clip', 'hf'\], got 'timm'"),
        ({"feature_layer": 0}, "feature_layer indexes transformer blocks"),
        ({"backend": "hf", "model_name": "google/siglip", "pretrained": "webli"}, "pretrained is an open_clip tag"),
        ({"model_name": ""}, "model_name must name an encoder"),
    ],
)
def test_invalid_vision_fields_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VPiTVisionConfig(**kwargs)


def test_bridge_depth_parsing():
    linears = [
        sum(isinstance(m, torch.nn.Linear) for m in build_bridge(b, 8, 16).modules())
        for b in ("linear", "mlp1x_gelu", "mlp3x_gelu")
    ]
    assert linears == [1, 1, 3]


def test_save_load_round_trip_and_auto_config(tmp_path):
    config = VPiTConfig(
        text_config=TINY_TEXT,
        num_visual_tokens=16,
        pooling="avg",
        visual_loss_weight=0.5,
        vision_config={"model_name": "ViT-B-16", "feature_layer": -2},
    )
    config.save_pretrained(tmp_path)
    for loaded in (VPiTConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is VPiTConfig
        assert loaded.to_diff_dict() == config.to_diff_dict()
        assert loaded.vision_config.feature_layer == -2
        assert loaded.text_config.hidden_size == 64


def test_text_config_from_a_local_path_records_the_name(tiny_llama):
    config = VPiTConfig(text_config=str(tiny_llama))
    assert config.text_model_name_or_path == str(tiny_llama)
    assert config.text_config.hidden_size == 64


def test_composite_keeps_the_llm_attention_backend():
    text = LlamaConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})
    text._attn_implementation = "eager"
    config = VPiTConfig(text_config=text)
    assert config.text_config._attn_implementation == "eager"
    assert config._attn_implementation == "eager"
