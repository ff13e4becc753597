"""The locally pretrained toy backbones: standard folder layouts, loading through vpit, training, determinism."""

import json

import open_clip
import pytest
import torch
from conftest import encode_conversations
from diffusers import AutoencoderKL
from open_clip.pos_embed import get_2d_sincos_pos_embed
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import vpit
from vpit.model.processing_vpit import DEFAULT_CHAT_TEMPLATE
from vpit.toy.backbones import build_toy_backbones, pixels, pretrain_toy_clip
from vpit.toy.world import ToyObject, render


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests train for a few steps on small batches, where a second thread costs more than it gains on a
    shared CPU (measured: 2 threads up to 5x slower than 1 when other jobs load the machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("toy-backbones")
    return out, build_toy_backbones(out, seed=0, fast=True)


def test_folders_have_the_standard_layouts(backbones):
    out, report = backbones
    assert {p.name for p in (out / "clip").iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors"}
    llm = {p.name for p in (out / "llm").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= llm
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= {p.name for p in (out / "vae").iterdir()}
    assert json.loads((out / "backbones.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["seconds"]) == {"clip", "tokenizer", "llm", "vae", "wall"}
    clip_config = json.loads((out / "clip" / "open_clip_config.json").read_text())
    assert clip_config["preprocess_cfg"] == {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}


@pytest.mark.slow
def test_two_workers_train_the_same_backbones(backbones, tmp_path):
    """workers=2 trains the CLIP and the Llama + VAE in two processes (one thread each, like this module): the same
    seeds, so the same weights as training them here one after the other."""
    from safetensors.torch import load_file

    out, report = backbones
    parallel = build_toy_backbones(tmp_path, seed=0, fast=True, workers=2)
    assert parallel["workers"] == 2 and parallel["metrics"] == report["metrics"]
    for weights in (
        "clip/open_clip_model.safetensors",
        "llm/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        ours, theirs = load_file(out / weights), load_file(tmp_path / weights)
        assert ours.keys() == theirs.keys(), weights
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), weights
    with pytest.raises(ValueError, match="workers must be 1"):
        build_toy_backbones(tmp_path, fast=True, workers=3)


def test_training_reduced_every_loss(backbones):
    _, report = backbones
    for part in ("clip", "llm", "vae"):
        metrics = report["metrics"][part]
        assert metrics["loss_last"] < metrics["loss_first"], part
    llm = report["metrics"]["llm"]
    assert llm["perplexity_after"] < llm["perplexity_before"]
    for key in ("retrieval", "probe"):
        assert set(report["metrics"]["clip"][key]) == {"size", "colour", "shape", "position", "all", "n"}


def test_clip_loads_through_open_clip_and_vpit_assembles_the_backbones(backbones):
    out, _ = backbones
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out / 'clip'}")
    image = preprocess(render(ToyObject("small", "red", "circle", "left"))).unsqueeze(0)
    assert torch.equal(image, pixels([render(ToyObject("small", "red", "circle", "left"))]))
    # The fixed 2-D sin-cos position table (8x8 grid + a zero row for the unused class token), untouched by training.
    table = torch.from_numpy(get_2d_sincos_pos_embed(128, 8, cls_token=True)).float()
    assert torch.equal(model.visual.positional_embedding, table)
    assert not model.visual.positional_embedding.requires_grad

    torch.manual_seed(0)
    model, processor = vpit.assemble(out / "llm", f"local-dir:{out / 'clip'}", num_visual_tokens=16)
    obj = ToyObject("small", "red", "circle", "left")
    understanding = [
        {"role": "user", "content": "<image>\nDescribe the image."},
        {"role": "assistant", "content": obj.caption},
    ]
    generation = [
        {"role": "user", "content": f"Draw {obj.caption}."},
        {"role": "assistant", "content": "Here is an image based on your request: <image>"},
    ]
    batch = encode_conversations(processor, [understanding, generation], [[render(obj)], [render(obj)]])
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    output = model(**batch)
    assert output.visual_targets.shape == (16, 128)  # K = 16 pooled tokens of Dv = 128
    for loss in (output.loss, output.text_loss, output.visual_loss):
        assert torch.isfinite(loss) and loss > 0


def test_vae_round_trips_a_render_with_its_scaling_factor(backbones):
    out, report = backbones
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    assert vae.config.scaling_factor == pytest.approx(report["metrics"]["vae"]["scaling_factor"])
    assert vae.config.scaling_factor != 0.18215  # set from the latents, not diffusers' default
    x = pixels([render(ToyObject("large", "blue", "square", "center"))])
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        recon = vae.decode(latents / vae.config.scaling_factor).sample
    assert latents.shape == (1, 4, 16, 16)  # 64 px, two downsamplings
    assert recon.shape == x.shape and torch.isfinite(recon).all()


def test_tokenizer_has_the_chat_template_and_round_trips_a_caption(backbones):
    out, _ = backbones
    tokenizer = AutoTokenizer.from_pretrained(out / "llm")
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    caption = "a large purple triangle at the bottom"
    ids = tokenizer(caption).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) <= 8  # BPE merges whole toy words: 7 words + BOS
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Draw " + caption + "."}], tokenize=False)
    assert text.startswith("<s>USER: Draw a large")
    llm = AutoModelForCausalLM.from_pretrained(out / "llm")
    assert llm.config.vocab_size == len(tokenizer) and not llm.config.tie_word_embeddings


def test_clip_pretraining_is_deterministic(tmp_path):
    kwargs = {"steps": 2, "batch_size": 8, "seed": 3, "eval_samples": 8, "probe_samples": (16, 8)}
    first = pretrain_toy_clip(tmp_path / "a", **kwargs)
    second = pretrain_toy_clip(tmp_path / "b", **kwargs)
    assert first == second
    a = load_file(tmp_path / "a" / "open_clip_model.safetensors")
    b = load_file(tmp_path / "b" / "open_clip_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_clip_batch_size_is_validated(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size must be in 2\.\.180"):
        pretrain_toy_clip(tmp_path, steps=1, batch_size=181)


def test_vae_config_validates_its_downsamplings():
    from vpit.toy.decoder import toy_vae_config

    assert len(toy_vae_config(downsamplings=3)["block_out_channels"]) == 4
    with pytest.raises(ValueError, match="downsamplings must be 2"):
        toy_vae_config(downsamplings=4)


def test_lm_pretraining_asks_for_pictures_in_many_phrasings_but_never_the_evaluations():
    """The toy LM learns request phrasings beyond the VPiT data's templates (as a real LLM knows them), while every
    wording the evaluation's paraphrase mode sends stays unseen: neither the words before the caption nor after it."""
    import random

    from vpit.data.formats import GENERATION_TEMPLATES
    from vpit.toy.backbones import REQUEST_PHRASINGS, toy_conversation, toy_tokenizer_corpus
    from vpit.toy.evaluate import PARAPHRASES

    rng = random.Random(0)
    chats = [m["content"] for _ in range(3000) for m in toy_conversation(rng)]
    text = "\n".join(toy_tokenizer_corpus(seed=0) + chats)
    phrasings = (*GENERATION_TEMPLATES, *REQUEST_PHRASINGS)
    seen = {t for t in phrasings if any(c.startswith(t.split("{caption}")[0] + "a ") for c in chats)}
    assert seen == set(phrasings)  # every phrasing is used
    for paraphrase in PARAPHRASES:
        before, after = paraphrase.split("{caption}")
        assert paraphrase not in phrasings
        assert before not in text, f"{paraphrase!r}: {before!r} occurs in the LM's pretraining text"
        if after not in (".", "?"):
            assert after not in text
