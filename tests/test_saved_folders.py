"""Folders saved by an earlier vpit keep loading, through the ecosystem's own entry points, and give the same outputs.

`tests/fixtures/v0/` was written by vpit 0.1 (commit a873890, before the package layout moved; see
`tests/fixtures/make_v0_fixtures.py`): a model folder, a decoder folder whose model_index.json names vpit's
component modules, and the outputs they gave then.
"""

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import vpit  # registers the "vpit" model type and the decoder pipeline
from vpit.decoder import VPiTDecoderPipeline, VPiTDecoderProjector, VPiTVisionEncoderModel

V0 = Path(__file__).parent / "fixtures" / "v0"


@pytest.fixture(scope="module")
def expected():
    return load_file(str(V0 / "expected.safetensors"))


def test_v0_model_folder_loads_through_auto_classes_and_gives_the_same_outputs(expected):
    model = AutoModelForCausalLM.from_pretrained(V0 / "model")
    assert type(model) is vpit.VPiTForCausalLM
    processor = vpit.VPiTProcessor.from_pretrained(V0 / "model")
    model.eval()
    batch = {"input_ids": expected["input_ids"], "pixel_values": expected["pixel_values"]}
    with torch.no_grad():
        out = model(**batch, labels=expected["labels"])
    torch.testing.assert_close(out.logits, expected["logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.visual_predictions, expected["visual_predictions"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss.reshape(1), expected["loss"], rtol=0, atol=1e-6)
    # The processor reads the same image into the same pixels.
    image = Image.new("RGB", (32, 32), (220, 40, 40))
    torch.testing.assert_close(processor.preprocess_images([image]), expected["pixel_values"], rtol=0, atol=0)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "Generate an image of a small red circle on the left."}],
        add_generation_prompt=True,
    )
    inputs = processor.tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated.sequences, expected["generated_ids"])


def test_v0_decoder_folder_loads_through_diffusion_pipeline_and_gives_the_same_images(expected):
    decoder = DiffusionPipeline.from_pretrained(V0 / "decoder")
    assert type(decoder) is VPiTDecoderPipeline
    assert type(decoder.projector) is VPiTDecoderProjector and type(decoder.vision_encoder) is VPiTVisionEncoderModel
    decoder.set_progress_bar_config(disable=True)
    settings = {"num_inference_steps": 4, "guidance_scale": 2.0, "output_type": "pt"}
    tokens = decoder.encode_image([Image.new("RGB", (32, 32), (220, 40, 40))])
    torch.testing.assert_close(tokens, expected["visual_tokens"], rtol=0, atol=1e-6)
    decoded = decoder(visual_tokens=expected["visual_tokens"], generator=torch.Generator().manual_seed(0), **settings)
    torch.testing.assert_close(decoded.images, expected["decoded"], rtol=0, atol=1e-5)
    image = Image.new("RGB", (32, 32), (220, 40, 40))
    reconstructed = decoder(image=[image], generator=torch.Generator().manual_seed(0), **settings)
    torch.testing.assert_close(reconstructed.images, expected["reconstructed"], rtol=0, atol=1e-5)


def test_k_and_the_image_tokens_have_one_home_the_model_config(tmp_path):
    """Every other holder of K is checked against the model's config at load, with an error naming both values."""
    import json
    import shutil

    from vpit.training.components import build_model
    from vpit.training.config import recipe_from_dict

    folder = tmp_path / "model"
    shutil.copytree(V0 / "model", folder)
    processor_config = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({**processor_config, "num_visual_tokens": 9}))
    with pytest.raises(ValueError, match=r"num_visual_tokens: processor 9, model config 4"):
        vpit.VPiTProcessor.from_pretrained(folder)

    model = AutoModelForCausalLM.from_pretrained(V0 / "model")
    processor = vpit.VPiTProcessor.from_pretrained(V0 / "model")
    processor.image_token = "<img>"
    with pytest.raises(ValueError, match=r"image_token: processor '<img>', model config '<image>'"):
        vpit.VPiTPipeline(model, processor)

    def recipe(**model_keys):
        data = {"mixture": [{"card": "x.yaml"}]}
        return recipe_from_dict(
            {"stage": "vpit", "model": {"pretrained": str(V0 / "model"), **model_keys}, "data": data}
        )

    with pytest.raises(ValueError, match=r"model.num_visual_tokens is 16 but .* was saved with num_visual_tokens=4"):
        build_model(recipe(num_visual_tokens=16))
    with pytest.raises(ValueError, match=r"model.bridge is 'linear' but .* was saved with bridge='mlp2x_gelu'"):
        build_model(recipe(bridge="linear"))
    built, _ = build_model(recipe(num_visual_tokens=4, visual_loss_weight=0.5))  # agreeing keys are fine
    assert built.config.visual_loss_weight == 0.5  # a loss weight is the stage's to set
    assert built.config.visual_loss == "cosine"  # saved before the key existed: MetaMorph's loss
    built, _ = build_model(recipe(visual_loss="l2", text_loss_weight=0.5))  # so is the loss itself
    assert (built.config.visual_loss, built.config.text_loss_weight) == ("l2", 0.5)
    with pytest.raises(ValueError, match="visual_loss must be one of"):
        build_model(recipe(visual_loss="huber"))

    decoder = DiffusionPipeline.from_pretrained(V0 / "decoder")
    decoder.vision_encoder.encoder.num_visual_tokens = 9
    with pytest.raises(ValueError, match=r"the vision encoder emits K = 9 .* projector.num_visual_tokens is 4"):
        VPiTDecoderPipeline(**decoder.components)


def test_the_decoder_stage_loads_the_vision_encoder_alone(monkeypatch):
    """The decoder trains from the frozen encoder: it reads the folder's vision_tower.* weights, never the LLM."""
    from vpit.training.config import recipe_from_dict
    from vpit.training.stages.decoder import build_decoder

    reference = AutoModelForCausalLM.from_pretrained(V0 / "model").vision_tower

    def refuse(*args, **kwargs):
        raise AssertionError("the decoder stage loaded the whole VPiT model")

    monkeypatch.setattr(vpit.VPiTForCausalLM, "from_pretrained", refuse)
    encoder = vpit.VPiTForCausalLM.load_vision_encoder(V0 / "model")
    assert encoder.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key
    assert not any(p.requires_grad for p in encoder.parameters())
    recipe = recipe_from_dict(
        {
            "stage": "decoder",
            "model": {"pretrained": str(V0 / "model")},
            "decoder": {"init": "toy", "latent": False, "projector_hidden_size": 32},
            "data": {"mixture": [{"card": "x.yaml"}]},
        }
    )
    decoder = build_decoder(recipe)
    pixels = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(decoder.vision_encoder(pixels), reference(pixels), rtol=0, atol=0)
