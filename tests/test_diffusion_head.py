"""The per-token diffusion head (`model.visual_head: diffusion`, MAR): it learns a conditional distribution, trains
through the VPiT loss, samples in generation (seeded, steps / temperature / guidance as arguments) and round-trips
through save / load."""

import pytest
import torch
from conftest import GENERATION, encode_conversations
from test_generation import ids_of, prompts

import vpit
from vpit.inference.generation import generate, generate_no_cache
from vpit.model.diffusion_head import DiffusionHead

K, DV = 4, 48
OPTIONS = {"width": 32, "depth": 2, "steps": 6}


@pytest.fixture
def diffusion_vpit(tiny_llama, tiny_clip):
    torch.manual_seed(0)
    return vpit.assemble(
        tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=K, visual_head="diffusion", visual_head_options=OPTIONS
    )


def test_the_head_learns_a_conditional_distribution():
    """Two conditions, two unit-norm targets: after training, each condition's samples land on its own target
    (an untrained head's samples are noise), and guidance does not move them off it."""
    torch.manual_seed(0)
    head = DiffusionHead(hidden_size=16, vision_size=8, width=64, depth=2, steps=20, condition_dropout=0.1)
    for layer in head.zero_initialised():
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    conditions = torch.randn(2, 16)
    targets = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(400):
        loss = head.loss(conditions.repeat(16, 1), targets.repeat(16, 1)).mean()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    head.eval()
    generator = torch.Generator().manual_seed(0)
    samples = head.sample(conditions.repeat_interleave(8, 0), generator=generator)  # (16, 8)
    cosine = torch.nn.functional.cosine_similarity(samples, targets.repeat_interleave(8, 0), dim=-1)
    other = torch.nn.functional.cosine_similarity(samples, targets.flip(0).repeat_interleave(8, 0), dim=-1)
    assert cosine.min() > 0.9 and (cosine > other).all()
    guided = head.sample(conditions, guidance_scale=2.0, generator=generator)
    assert (torch.nn.functional.cosine_similarity(guided, targets, dim=-1) > 0.9).all()


def test_trains_through_the_vpit_loss(diffusion_vpit):
    model, processor = diffusion_vpit
    assert isinstance(model.visual_head, DiffusionHead) and model.visual_head.width == 32
    assert torch.equal(model.visual_head.output.weight, torch.zeros_like(model.visual_head.output.weight))  # adaLN-Zero
    batch = encode_conversations(processor, [GENERATION], [[None]])
    model.train()
    out = model(**batch)
    assert out.visual_predictions is None  # no sampling in training
    assert torch.allclose(out.loss, out.text_loss + out.visual_loss) and out.visual_loss > 0.5
    out.loss.backward()
    assert model.visual_head.output.weight.grad.abs().sum() > 0
    llm_grads = [p.grad for p in model.language_model.parameters() if p.grad is not None]
    assert llm_grads and sum(g.abs().sum() for g in llm_grads) > 0  # the condition carries gradient into the LLM
    model.eval()
    evaluated = model(**batch)
    assert evaluated.visual_predictions.shape == (K, DV)
    assert torch.allclose(evaluated.visual_predictions.norm(dim=-1), torch.ones(K), atol=1e-5)


def test_generation_samples_seeded_tokens_with_the_given_settings(diffusion_vpit, tmp_path):
    model, processor = diffusion_vpit
    model.eval()
    for layer in model.visual_head.zero_initialised():  # a head whose output depends on its condition
        torch.nn.init.normal_(layer.weight, std=0.5)
    batch = prompts(processor, ["Draw."], open_image=[True])

    def draw(seed, **settings):
        out = generate(model, **batch, max_new_tokens=K + 1, generator=torch.Generator().manual_seed(seed), **settings)
        return out.images[0][0]

    first = draw(0)
    assert first.shape == (K, DV) and torch.allclose(first.norm(dim=-1), torch.ones(K), atol=1e-5)
    assert torch.equal(first, draw(0))
    assert not torch.allclose(first, draw(1), atol=1e-3)
    assert not torch.allclose(first, draw(0, visual_steps=2), atol=1e-3)
    assert not torch.allclose(first, draw(0, visual_guidance_scale=3.0), atol=1e-3)
    cold = draw(0, visual_temperature=0.0)  # no noise: the same tokens whatever the seed
    assert torch.allclose(cold, draw(1, visual_temperature=0.0), atol=1e-6)
    reference = generate_no_cache(model, **batch, max_new_tokens=K + 1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(reference.images[0][0], first, atol=1e-5)
    _, end, _ = ids_of(model)
    assert generate(model, **batch, max_new_tokens=K + 1).sequences[0, -1] == end

    model.save_pretrained(tmp_path)
    loaded = vpit.VPiTForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.visual_head == "diffusion" and loaded.config.visual_head_options == OPTIONS
    assert isinstance(loaded.visual_head, DiffusionHead) and loaded.visual_head.steps == 6
    out = generate(loaded, **batch, max_new_tokens=K + 1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.images[0][0], first, atol=1e-5)


def test_settings_that_do_not_apply_are_errors(tiny_vpit, tiny_llama, tiny_clip):
    model, processor = tiny_vpit  # the mlp head regresses its tokens
    batch = prompts(processor, ["Draw."], open_image=[True])
    with pytest.raises(ValueError, match=r"do not apply to the .mlp. visual head"):
        generate(model, **batch, max_new_tokens=K, visual_steps=4)
    with pytest.raises(ValueError, match=r"trains with its own .* loss"):
        vpit.VPiTConfig(text_config={"model_type": "llama"}, visual_head="diffusion", visual_loss="l2")
    with pytest.raises(ValueError, match="visual_head_options apply to the"):
        vpit.assemble(tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=K, visual_head_options={"width": 8})


def test_every_class_named_for_sharding_is_in_the_model(diffusion_vpit, tiny_vpit):
    """accelerate's FSDP wrap (transformer-based, from `_no_split_modules`) fails on a listed class the model lacks."""
    for model, head in ((diffusion_vpit[0], "DiffusionHead"), (tiny_vpit[0], "VisualHead")):
        assert head in model._no_split_modules
        present = {type(m).__name__ for m in model.modules()}
        assert set(model._no_split_modules) <= present
