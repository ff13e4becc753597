"""The vision encoder wrapper on both backends: patch tokens, the chosen layer, pooling, freezing, transforms."""

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from vpit import VisionEncoder, VPiTVisionConfig
from vpit.model.vision import resolve_vision_config


def open_clip_encoder(folder, k=4, **kwargs):
    spec = VPiTVisionConfig(model_name=f"local-dir:{folder}", **kwargs.pop("spec", {}))
    return VisionEncoder.from_pretrained_spec(spec, k, **kwargs)


def test_open_clip_local_folder_loads_its_weights_and_config(tiny_clip):
    enc = open_clip_encoder(tiny_clip)
    saved = load_file(tiny_clip / "open_clip_model.safetensors")
    assert torch.equal(enc.tower.conv1.weight, saved["visual.conv1.weight"])
    cfg = json.loads((tiny_clip / "open_clip_config.json").read_text())
    assert enc.config.model_config == cfg["model_cfg"]
    assert enc.config.preprocess_config["mean"] == [0.5, 0.5, 0.5]
    assert enc.config.hidden_size == 48
    assert enc.patch_grid(torch.zeros(1, 3, 32, 32)).shape[-2:] == (8, 8)  # 32 px / patch 4


def test_shapes_and_unit_norm(tiny_clip):
    enc = open_clip_encoder(tiny_clip, k=4)
    x = torch.randn(3, 3, 32, 32)
    assert enc.patch_tokens(x).shape == (3, 64, 48)
    z = enc(x)
    assert z.shape == (3, 4, 48)
    assert torch.allclose(z.norm(dim=-1), torch.ones(3, 4), atol=1e-5)
    raw = open_clip_encoder(tiny_clip, k=4, normalize=False)(x)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3, 4), atol=1e-2)
    assert torch.allclose(F.normalize(raw, dim=-1), z, atol=1e-6)


def test_feature_layer_is_the_block_output_before_the_final_norm(tiny_clip):
    enc = open_clip_encoder(tiny_clip)
    captured = {}
    enc.tower.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: captured.setdefault("last", o))
    enc.tower.transformer.resblocks[-2].register_forward_hook(lambda m, i, o: captured.setdefault("prev", o))
    x = torch.randn(2, 3, 32, 32)
    tokens = enc.patch_tokens(x)
    assert torch.allclose(tokens, captured["last"][:, 1:], atol=1e-6)  # class token dropped, no ln_post
    second_last = open_clip_encoder(tiny_clip, spec={"feature_layer": -2}).patch_tokens(x)
    assert torch.allclose(second_last, captured["prev"][:, 1:], atol=1e-6)
    first_block = open_clip_encoder(tiny_clip, spec={"feature_layer": 1}).patch_tokens(x)
    assert torch.allclose(first_block, captured["prev"][:, 1:], atol=1e-6)  # 2 blocks: block 1 == block -2


def test_feature_layer_out_of_range(tiny_clip):
    with pytest.raises(ValueError, match="feature_layer=-3 is out of range for a 2-block encoder"):
        open_clip_encoder(tiny_clip, spec={"feature_layer": -3})


def test_pooling_numbers(tiny_clip):
    x = torch.randn(2, 3, 32, 32)
    avg = open_clip_encoder(tiny_clip, k=4, pooling="avg", normalize=False)
    grid = avg.patch_grid(x)  # (2, 48, 8, 8)
    # avg: each of the 2x2 tokens is the mean of a 4x4 block of patches.
    assert torch.allclose(avg(x)[:, 0], grid[:, :, :4, :4].mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(avg(x)[:, 3], grid[:, :, 4:, 4:].mean(dim=(2, 3)), atol=1e-5)
    # bilinear 8 -> 2 (half-pixel centres at 1.5 and 5.5): the mean of the 2x2 patches around each centre.
    bil = open_clip_encoder(tiny_clip, k=4, pooling="bilinear", normalize=False)
    assert torch.allclose(bil(x)[:, 0], grid[:, :, 1:3, 1:3].mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(bil(x)[:, 3], grid[:, :, 5:7, 5:7].mean(dim=(2, 3)), atol=1e-5)


def test_frozen_in_train_mode(tiny_clip):
    enc = open_clip_encoder(tiny_clip)
    enc.train()
    assert not enc.tower.training
    assert all(not p.requires_grad for p in enc.parameters())
    assert enc(torch.randn(1, 3, 32, 32)).grad_fn is None


def test_image_transform_uses_the_encoder_preprocessing(tiny_clip):
    enc = open_clip_encoder(tiny_clip)
    pixels = enc.image_transform()(Image.new("RGB", (50, 40), (255, 255, 255)))
    assert pixels.shape == (3, 32, 32)
    assert torch.allclose(pixels, torch.ones_like(pixels))  # white, mean 0.5 / std 0.5 -> 1.0


def test_registry_architecture_without_weights_is_randomly_initialised():
    config = resolve_vision_config(VPiTVisionConfig(model_name="ViT-B-32"))
    assert config.model_config == open_clip.get_model_config("ViT-B-32")
    assert config.preprocess_config["size"] == 224


def test_non_vit_tower_is_rejected():
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}}
    spec = VPiTVisionConfig(model_name="RN-tiny", model_config=cfg, preprocess_config={"size": 32})
    with pytest.raises(ValueError, match="ModifiedResNet is not a ViT"):
        VisionEncoder(spec, 4)


@pytest.mark.parametrize(("kind", "prefix"), [("siglip", 0), ("clip", 1), ("siglip-full", 0)])
def test_transformers_towers(hf_vision, kind, prefix):
    folder = hf_vision(kind)
    enc = VisionEncoder.from_pretrained_spec(VPiTVisionConfig(backend="hf", model_name=str(folder)), 4)
    x = torch.randn(2, 3, 32, 32)
    hidden = enc.tower(pixel_values=x, output_hidden_states=True).hidden_states
    tokens = enc.patch_tokens(x)
    assert tokens.shape == (2, 16, 32)  # 4 x 4 patches, class token (CLIP) dropped
    assert torch.allclose(tokens, hidden[-1][:, prefix:], atol=1e-6)  # last block, before post_layernorm
    assert enc(x).shape == (2, 4, 32)
    assert all(not p.requires_grad for p in enc.parameters())
    # Weights really came from the folder (not a fresh init).
    rebuilt = VisionEncoder(enc.config, 4)
    assert not torch.allclose(rebuilt.patch_tokens(x), tokens)
    rebuilt.load_state_dict(enc.state_dict())
    assert torch.equal(rebuilt.patch_tokens(x), tokens)


def test_siglip_preprocessing_defaults(hf_vision):
    config = resolve_vision_config(VPiTVisionConfig(backend="hf", model_name=str(hf_vision("siglip"))))
    assert config.preprocess_config["mean"] == [0.5, 0.5, 0.5]
    assert config.preprocess_config["resize_mode"] == "squash"


@pytest.mark.slow
def test_real_siglip_so400m_architecture_pools_27x27_to_64():
    """The published recipe's encoder, randomly initialised: 27 x 27 patches of 1152-d pool to 8 x 8."""
    torch.manual_seed(0)
    config = resolve_vision_config(VPiTVisionConfig(model_name="ViT-SO400M-14-SigLIP-384"))
    enc = VisionEncoder(config, 64)
    assert enc.image_size == (384, 384)
    assert enc.hidden_size == 1152
    x = torch.randn(1, 3, 384, 384)
    grid = enc.patch_grid(x)
    assert grid.shape == (1, 1152, 27, 27)
    z = enc.pool(grid)
    assert z.shape == (1, 64, 1152)
    assert torch.allclose(z.norm(dim=-1), torch.ones(1, 64), atol=1e-4)


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_transformers_tower_runs_only_up_to_the_feature_layer(hf_vision, kind):
    """Neither the blocks after the chosen one, nor the post-LayerNorm, nor SigLIP's pooling head run."""
    folder = hf_vision(kind)
    enc = VisionEncoder.from_pretrained_spec(VPiTVisionConfig(backend="hf", model_name=str(folder), feature_layer=1), 4)
    x = torch.randn(2, 3, 32, 32)
    expected = enc.tower(pixel_values=x, output_hidden_states=True).hidden_states[1][:, 1 if kind == "clip" else 0 :]

    class Forbidden(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("ran a module after the feature layer")

    vision = getattr(enc.tower, "vision_model", enc.tower)
    vision.encoder.layers[1] = Forbidden()  # the second (last) block: feature_layer=1 is the first
    vision.post_layernorm = Forbidden()
    if hasattr(vision, "head"):
        vision.head = Forbidden()
    torch.testing.assert_close(enc.patch_tokens(x), expected, rtol=0, atol=1e-6)
