"""Discrete visual codes (`visual_target: discrete`, SEED / Chameleon / Emu3): a k-means codebook fitted on the
encoder's tokens (`vpit codebook fit`), code tokens in the vocabulary trained with cross-entropy, codes sampled at
generation and handed on as codebook vectors; saved and loaded with the model."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import GENERATION, UNDERSTANDING, encode_conversations
from test_generation import prompts

import vpit
from vpit.cli import main
from vpit.hub import build_model_card
from vpit.inference.generation import generate, generate_no_cache
from vpit.model.codebook import fit_codebook, nearest_codes
from vpit.model.losses import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
K, C = 4, 8


def test_fit_codebook_finds_the_clusters():
    """Four tight clusters of unit vectors: four codes land on their centres, each token picks its own."""
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 16), dim=-1)
    tokens = F.normalize(centres.repeat(50, 1) + 0.01 * torch.randn(200, 16), dim=-1)
    codebook, stats = fit_codebook(tokens, 4, normalised=True, seed=0)
    assert codebook.shape == (4, 16) and torch.allclose(codebook.norm(dim=-1), torch.ones(4))
    assert stats["tokens"] == 200 and stats["used"] == 4 and stats["mean_cosine"] > 0.999
    assert stats["perplexity"] == pytest.approx(4.0, rel=1e-4)  # 50 tokens each: uniform usage
    codes = nearest_codes(tokens, codebook)
    assert torch.equal(codes, codes[:4].repeat(50)) and len(set(codes[:4].tolist())) == 4
    with pytest.raises(ValueError, match="cannot fit 300 codes"):
        fit_codebook(tokens, 300, normalised=True)


def _discrete(model, processor, seed=0):
    """The tiny model made discrete with a codebook of C random unit vectors."""
    torch.manual_seed(seed)
    ids = model.set_visual_codebook(
        F.normalize(torch.randn(C, model.vision_tower.hidden_size), dim=-1), processor.tokenizer
    )
    return ids


def test_codes_are_new_vocabulary_trained_with_cross_entropy(tiny_vpit):
    model, processor = tiny_vpit
    rows = model.get_input_embeddings().weight.shape[0]
    ids = _discrete(model, processor)
    assert ids == list(range(rows, rows + C)) and model.config.visual_code_token_id == rows
    assert processor.tokenizer.convert_ids_to_tokens(ids[:2]) == ["<image_code_0>", "<image_code_1>"]
    assert model.get_output_embeddings().weight.shape[0] == rows + C
    assert sum(p.numel() for p in model.visual_head.parameters()) == 0  # the LM head's code rows predict
    assert set(ids) <= set(model.new_token_ids())  # LoRA / TrainableTokens train their rows

    batch = encode_conversations(processor, [GENERATION], [[None]])
    model.train()
    out = model(**batch)
    # New rows start at the mean row: every code equally likely, CE = log C exactly.
    assert out.visual_loss.item() == pytest.approx(math.log(C), abs=1e-4)
    assert torch.allclose(out.loss, out.text_loss + out.visual_loss)
    out.loss.backward()
    code_grad = model.get_output_embeddings().weight.grad[ids]
    assert code_grad.abs().sum() > 0

    # The target of each slot is its encoder token's nearest code; the prediction is the most likely code's vector.
    model.eval()
    with torch.no_grad():
        evaluated = model(**batch)
    codes = nearest_codes(evaluated.visual_targets, model.visual_codebook)
    logits = model.code_logits(torch.zeros(1, model.config.get_text_config().hidden_size))
    assert logits.shape == (1, C)
    assert evaluated.visual_predictions.shape == (K, model.vision_tower.hidden_size)
    assert all(any(torch.equal(p, c) for c in model.visual_codebook) for p in evaluated.visual_predictions)
    ce = F.cross_entropy(
        model.code_logits(_conditions(model, batch)), codes, reduction="mean"
    )  # the same loss by hand, from the hidden states before each slot
    assert evaluated.visual_loss.item() == pytest.approx(ce.item(), rel=1e-5)


def _conditions(model, batch):
    """The hidden states that predict the response image's slots (next-token shift), by hand."""
    _, _, slot = model.image_token_ids()
    with torch.no_grad():
        embeds, _ = model.embed(batch["input_ids"], batch["pixel_values"], response_slots=batch["input_ids"] == slot)
        _, hidden = model.run_language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    slots = (batch["input_ids"] == slot)[:, 1:]
    return hidden[:, :-1][slots]


def test_teacher_forcing_reads_response_images_as_their_codes(tiny_vpit):
    """Generation feeds back codebook vectors, so training reads a response image's slots the same way; an image
    in the prompt stays continuous (understanding is unchanged)."""
    model, processor = tiny_vpit
    _discrete(model, processor)
    model.eval()
    _, _, slot = model.image_token_ids()
    both = encode_conversations(processor, [UNDERSTANDING + GENERATION[:1] + GENERATION[1:]], [[None, None]])
    ids, pixels = both["input_ids"], both["pixel_values"]
    response = model.response_slot_mask(ids, both["labels"])
    assert int(response.sum()) == K and int((ids == slot).sum()) == 2 * K
    with torch.no_grad():
        embeds, z = model.embed(ids, pixels, response_slots=response)
        read = embeds[ids == slot].view(2, K, -1)
        torch.testing.assert_close(read[0], model.bridge(z[0]))  # the prompt image: its encoder tokens
        torch.testing.assert_close(read[1], model.bridge(model.quantise(z[1])))  # the response image: its codes
        assert not torch.allclose(model.quantise(z[1]), z[1])
        assert (both["labels"][ids == slot] == IGNORE_INDEX).all()


def test_a_few_steps_learn_the_codes_and_generation_draws_them(tiny_vpit, tmp_path):
    """A discrete model fitted to one image's codes generates exactly those codes' vectors (greedy, cached and
    uncached alike), samples others at a high temperature (seeded), never writes a code as text, and round-trips
    through save / load."""
    model, processor = tiny_vpit
    ids = _discrete(model, processor)
    draw = [GENERATION[0], {"role": "assistant", "content": "<image>"}]  # the answer opens with the image
    batch = encode_conversations(processor, [draw], [[None]])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    first = None
    for _ in range(60):
        out = model(**batch)
        first = first if first is not None else out.visual_loss.item()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.visual_loss.item() < 0.05 * first
    model.eval()
    with torch.no_grad():
        target = model.quantise(model(**batch).visual_targets)  # (K, Dv): the image's codes' vectors
    prompt = prompts(processor, [GENERATION[0]["content"]], open_image=[True])
    greedy = generate(model, **prompt, max_new_tokens=K + 1)
    torch.testing.assert_close(greedy.images[0][0], target)
    torch.testing.assert_close(generate_no_cache(model, **prompt, max_new_tokens=K + 1).images[0][0], target)

    def hot(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, **prompt, max_new_tokens=K + 1, visual_temperature=50.0, generator=g).images[0][0]

    assert torch.equal(hot(0), hot(0)) and not torch.equal(hot(0), target)
    with pytest.raises(ValueError, match="must be >= 0"):
        generate(model, **prompt, max_new_tokens=K + 1, visual_temperature=-1.0)
    with pytest.raises(ValueError, match=r"\['visual_steps'\] do not apply to a discrete model"):
        generate(model, **prompt, max_new_tokens=K + 1, visual_steps=4)

    text = generate(model, **prompts(processor, ["What colour is the shape?"]), max_new_tokens=12, do_sample=True,
                    temperature=100.0, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert not set(text.sequences[0].tolist()) & set(ids)

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = vpit.VPiTForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.visual_target == "discrete" and loaded.config.visual_codebook_size == C
    torch.testing.assert_close(loaded.visual_codebook, model.visual_codebook)
    reloaded = vpit.VPiTProcessor.from_pretrained(tmp_path)
    assert reloaded.tokenizer.convert_tokens_to_ids("<image_code_7>") == ids[-1]
    torch.testing.assert_close(generate(loaded, **prompt, max_new_tokens=K + 1).images[0][0], target)

    # The command line passes the code temperature through, and refuses a diffusion head's settings.
    argv = ["generate", "--model", str(tmp_path), "--prompt", GENERATION[0]["content"], "--start-with-image",
            "--max-new-tokens", str(K + 2), "--out", str(tmp_path / "cli"), "--seed", "0"]  # fmt: skip
    assert main([*argv, "--visual-temperature", "50"]) == 0
    with pytest.raises(ValueError, match="do not apply to a discrete model"):
        main([*argv, "--visual-steps", "3", "--debug"])  # --debug: the error itself, not its line


def test_codebook_fit_command_makes_a_folder_discrete(tiny_vpit, tmp_path, capsys):
    model, processor = tiny_vpit
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    cards = tmp_path / "cards"
    shutil.copytree(ROOT / "data_cards", cards)
    broken = sorted((cards / "samples" / "toy_generation").rglob("*.png"))[0]
    broken.write_bytes(b"not a png")
    args = ["codebook", "fit", str(cards / "toy_generation.yaml"), "--model", str(tmp_path / "model"), "--sample"]
    assert main([*args, "--size", str(C), "--out", str(tmp_path / "discrete")]) == 0
    report = json.loads((tmp_path / "discrete" / "codebook.json").read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["images"] == 5 and report["skipped"] == 1 and report["tokens"] == 5 * K and report["size"] == C
    assert report["used"] <= C and 0.0 < report["mean_cosine"] <= 1.0 + 1e-6
    skipped = [json.loads(line) for line in (tmp_path / "discrete" / "skipped.jsonl").read_text().splitlines()]
    assert [s["reason"] for s in skipped] == ["corrupt_image"]
    loaded = vpit.VPiTForCausalLM.from_pretrained(tmp_path / "discrete")
    assert loaded.is_discrete and loaded.visual_codebook.shape == (C, model.vision_tower.hidden_size)
    card = str(build_model_card(tmp_path / "discrete", "me/discrete"))
    assert f"none: the LM head's {C} code tokens" in card and "cross-entropy over the codes" in card
    assert json.loads((tmp_path / "model" / "config.json").read_text())["visual_target"] == "continuous"
    with pytest.raises(ValueError, match="cannot fit 64 codes"):
        main([*args, "--size", "64", "--out", str(tmp_path / "too_many"), "--debug"])


def test_discrete_settings_are_checked(tiny_llama, tiny_clip):
    with pytest.raises(ValueError, match="needs a codebook of >= 2 entries"):
        vpit.VPiTConfig(text_config={"model_type": "llama"}, visual_target="discrete")
    with pytest.raises(ValueError, match="apply to continuous targets"):
        vpit.VPiTConfig(
            text_config={"model_type": "llama"}, visual_target="discrete", visual_codebook_size=8, visual_loss="l2"
        )
    with pytest.raises(ValueError, match="visual_target must be one of"):
        vpit.VPiTConfig(text_config={"model_type": "llama"}, visual_target="codes")
