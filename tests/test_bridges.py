"""The input side of the family: resampling bridges (`model.bridge: perceiver | qformer | qformer_instruct |
causal_query`) read a prompt image's patch tokens; response images keep entering token-wise (`token_bridge`)."""

import pytest
import torch
from conftest import GENERATION, UNDERSTANDING, encode_conversations
from PIL import Image
from test_generation import prompts

import vpit
from vpit.hub import build_model_card
from vpit.inference.generation import generate, generate_no_cache
from vpit.inference.pipeline import VPiTPipeline
from vpit.model.resamplers import PerceiverBridge, QFormerBridge, build_resampler
from vpit.training.components import param_groups

K = 4
SMALL = {"width": 32, "depth": 2, "heads": 4}
RESAMPLERS = ("perceiver", "qformer", "qformer_instruct", "causal_query")


def _assemble(tiny_llama, tiny_clip, bridge):
    torch.manual_seed(0)
    return vpit.assemble(tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=K, bridge=bridge, bridge_options=SMALL)


@pytest.mark.parametrize("bridge", RESAMPLERS)
def test_prompt_images_are_resampled_and_response_images_bridged_token_wise(tiny_llama, tiny_clip, bridge):
    """The prompt image's slots hold the resampler's output on its patch tokens (not the token-wise bridge's), the
    response image's the token-wise bridge on its pooled tokens; the loss reaches both bridges."""
    model, processor = _assemble(tiny_llama, tiny_clip, bridge)
    assert type(model.bridge) is (PerceiverBridge if bridge == "perceiver" else QFormerBridge)
    assert model.resamples and model.token_bridge is not None
    batch = encode_conversations(processor, [UNDERSTANDING + GENERATION], [[None, None]])
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    _, _, slot = model.image_token_ids()
    model.eval()  # (the Q-Former's dropout off: the same outputs twice)
    with torch.no_grad():
        responses = model.response_slot_mask(ids, batch["labels"])
        embeds, z = model.embed(ids, pixels, response_slots=responses, labels=batch["labels"])
        read = embeds[ids == slot].view(2, K, -1)
        pooled, patches = model.vision_tower.encode_with_patches(pixels)
        torch.testing.assert_close(z, pooled)
        assert patches.shape[1] > K  # the whole patch grid, not the pooled tokens
        extra = ()
        if bridge == "qformer_instruct":  # the instruction: the text after the image, up to the labelled answer
            token_embeds = model.get_input_embeddings()(ids)
            instruction, mask = model._instructions(ids, token_embeds, torch.tensor([True, False]), batch["labels"])
            after, answer = int((ids[0] == slot).nonzero()[K - 1]) + 1, int((batch["labels"][0] != -100).nonzero()[0])
            assert instruction.shape[0] == 1 and int(mask.sum()) == answer - after > 3
            torch.testing.assert_close(instruction[0], token_embeds[0, after:answer])
            extra = (instruction, mask)
        expected = model.bridge(patches[:1], *extra)[0]
        torch.testing.assert_close(read[0], expected)
        assert not torch.allclose(read[0], model.token_bridge(z[0]), atol=1e-3)  # the option did something
        torch.testing.assert_close(read[1], model.token_bridge(z[1]))

    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.visual_loss > 0
    out.loss.backward()
    for part in (model.bridge, model.token_bridge, model.visual_head):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), type(part).__name__


def test_a_batch_without_prompt_images_still_calls_the_resampler(tiny_llama, tiny_clip):
    """DDP / ZeRO need every trained module used on every rank at every step: a generation-only batch (no prompt
    image) still calls the resampler (times 0), so its parameters get a (zero) gradient rather than none."""
    model, processor = _assemble(tiny_llama, tiny_clip, "qformer")
    model.train()
    batch = encode_conversations(processor, [GENERATION], [[None]])
    model(**batch).loss.backward()
    grads = [p.grad for p in model.bridge.parameters()]
    assert all(g is not None for g in grads) and all(float(g.abs().sum()) == 0.0 for g in grads)


@pytest.mark.parametrize(("bridge", "reads"), [("qformer_instruct", True), ("qformer", False)])
def test_the_instruction_enters_the_instruct_qformer_only(tiny_llama, tiny_clip, bridge, reads):
    """InstructBLIP: the question after the image changes what the queries read; the plain Q-Former ignores it; the
    answer (labelled) never enters, so teacher forcing does not leak it."""
    model, processor = _assemble(tiny_llama, tiny_clip, bridge)
    model.eval()
    colour = _prompt_image(model, processor, "What colour is the shape?", "red")
    assert torch.allclose(colour, _prompt_image(model, processor, "What colour is the shape?", "a blue square"))
    assert torch.allclose(colour, _prompt_image(model, processor, "Where is the shape?", "red")) is not reads


def _prompt_image(model, processor, question, answer):
    """The embeddings at the image slots of "<image> {question}" -> answer."""
    _, _, slot = model.image_token_ids()
    conversation = [{"role": "user", "content": f"<image> {question}"}, {"role": "assistant", "content": answer}]
    batch = encode_conversations(processor, [conversation], [[None]])
    with torch.no_grad():
        embeds, _ = model.embed(batch["input_ids"], batch["pixel_values"], labels=batch["labels"])
    return embeds[batch["input_ids"] == slot]


def test_causal_queries_see_only_earlier_queries():
    """causal_query: query i's output does not depend on the queries after it; the Q-Former's does (the change
    is not a constant shift, which the Q-Former's input LayerNorm would remove)."""
    for name, causal in (("causal_query", True), ("qformer", False)):
        torch.manual_seed(0)
        resampler = build_resampler(name, 16, 24, 4, SMALL).eval()
        patches = torch.randn(2, 9, 16)
        before = resampler(patches)
        with torch.no_grad():
            resampler.query_tokens[:, 3] += torch.randn(resampler.query_tokens.shape[-1])  # not a shift: LayerNorm
        after = resampler(patches)
        assert torch.allclose(before[:, :3], after[:, :3], atol=1e-6) is causal
        assert not torch.allclose(before[:, 3], after[:, 3])


@pytest.mark.parametrize("bridge", ["perceiver", "qformer_instruct"])
def test_save_load_and_generation(tiny_llama, tiny_clip, tmp_path, bridge):
    """A resampling model saves and loads (config and weights), and generates the same with and without the KV
    cache, and through the pipeline, from a prompt with an image."""
    model, processor = _assemble(tiny_llama, tiny_clip, bridge)
    model.eval()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    loaded = vpit.VPiTForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.bridge == bridge and loaded.config.bridge_options == SMALL
    card = str(build_model_card(tmp_path / "m", "me/resampled"))
    assert f"| bridge | {bridge} (depth 2, heads 4, width 32) on the patch tokens of prompt images; response " in card
    batch = encode_conversations(processor, [UNDERSTANDING + GENERATION], [[None, None]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)

    prompt = prompts(
        processor,
        ["<image> What colour is the shape?", "Draw a red circle."],
        images=[(220, 40, 40)],
        open_image=[False, True],
    )
    cached = generate(loaded, **prompt, max_new_tokens=K + 3)
    reference = generate_no_cache(loaded, **prompt, max_new_tokens=K + 3)
    assert torch.equal(cached.sequences, reference.sequences)
    torch.testing.assert_close(cached.images[1][0], reference.images[1][0], atol=1e-5, rtol=1e-4)

    # The pipeline hands the resampler the image's pixels: the same answer as `generate` from pixel_values.
    pipe = VPiTPipeline(loaded, vpit.VPiTProcessor.from_pretrained(tmp_path / "m"))
    red = Image.new("RGB", (32, 32), (220, 40, 40))
    out = pipe("<image> What colour is the shape?", images=[red], max_new_tokens=6)
    direct = generate(
        loaded, **prompts(processor, ["<image> What colour is the shape?"], images=[(220, 40, 40)]), max_new_tokens=6
    )
    assert out.sequences.tolist() == direct.sequences[0][direct.attention_mask[0] == 1].tolist()
    # A generated image in the history comes back as tokens (token-wise), a new one as pixels (resampled).
    drawn = pipe("Draw a red circle.", start_with_image=True, max_images_per_row=1, max_new_tokens=K + 2)
    assert len(drawn.visual_tokens) == 1
    again = pipe("<image> And this one?", images=[red], history=drawn.conversation, max_new_tokens=4)
    assert again.sequences.shape[0] > drawn.sequences.shape[0]


def test_bridge_configuration_errors(tiny_llama, tiny_clip):
    with pytest.raises(ValueError, match="token_bridge must be token-wise"):
        vpit.VPiTConfig(
            text_config={"model_type": "llama", "hidden_size": 64}, bridge="qformer", token_bridge="perceiver"
        )
    with pytest.raises(ValueError, match="bridge_options apply to the resamplers"):
        vpit.VPiTConfig(text_config={"model_type": "llama", "hidden_size": 64}, bridge_options={"depth": 2})
    with pytest.raises(ValueError, match=r"take \['depth', 'heads', 'width'\], got unknown \['layers'\]"):
        vpit.VPiTConfig(
            text_config={"model_type": "llama", "hidden_size": 64}, bridge="perceiver", bridge_options={"layers": 2}
        )
    with pytest.raises(ValueError, match="width 30 must be a multiple of heads 4"):
        vpit.VPiTConfig(
            text_config={"model_type": "llama", "hidden_size": 64},
            bridge="qformer",
            bridge_options={"width": 30, "heads": 4},
        )
    with pytest.raises(ValueError, match="or a resampler"):
        vpit.VPiTConfig(text_config={"model_type": "llama", "hidden_size": 64}, bridge="resampler")


# ------------------------------------------------------------------------------------- image attention


def _slots_and_mask(model, batch, responses=None):
    _, _, slot = model.image_token_ids()
    with torch.no_grad():
        embeds, _ = model.embed(batch["input_ids"], batch["pixel_values"])
        mask = model.llm_attention_mask(
            batch["input_ids"], embeds, batch.get("attention_mask"), batch.get("position_ids"), None, responses
        )
    return (batch["input_ids"] == slot), mask


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_bidirectional_image_attention_within_prompt_images_only(tiny_llama, tiny_clip, backend):
    """`image_attention: bidirectional`: a prompt image's slots see each other; the response image's slots and the
    text stay causal; the mask is in the LLM backend's own format and changes what the model computes."""
    torch.manual_seed(0)
    model, processor = vpit.assemble(
        tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=K, attn_implementation=backend
    )
    model.eval()
    batch = encode_conversations(processor, [UNDERSTANDING + GENERATION], [[None, None]])
    with torch.no_grad():
        causal = model(**batch)
    model.config.image_attention = "bidirectional"
    responses = model.response_slot_mask(batch["input_ids"], batch["labels"])
    slots, mask = _slots_and_mask(model, batch, responses)
    assert mask.dim() == 4
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0  # (T, T): query x key
    prompt_slots = (slots & ~responses)[0].nonzero().squeeze(1)
    response_slots = responses[0].nonzero().squeeze(1)
    assert bool(allowed[prompt_slots[0], prompt_slots[-1]])  # the first slot sees the last: bidirectional
    assert not bool(allowed[response_slots[0], response_slots[-1]])  # the response image: causal
    after = int(prompt_slots[-1]) + 2  # the text after the prompt image's <image_end>
    assert not bool(allowed[prompt_slots[0], after]) and not bool(allowed[after, after + 1])
    assert bool(allowed.tril().diagonal().all())
    with torch.no_grad():
        bidirectional = model(**batch)
    assert not torch.allclose(bidirectional.logits, causal.logits, atol=1e-4)  # the option does something
    # the response image's predictions do not see its own later slots: changing them leaves earlier ones alone
    changed = dict(batch)
    changed["pixel_values"] = batch["pixel_values"].clone()
    changed["pixel_values"][1] = batch["pixel_values"][0]
    with torch.no_grad():
        again = model(**changed)
    first = int(response_slots[0]) - 1  # the position that predicts the first response slot
    torch.testing.assert_close(again.logits[0, : first + 1], bidirectional.logits[0, : first + 1])


def test_bidirectional_mask_keeps_packed_samples_apart(tiny_llama, tiny_clip):
    """Two samples packed in one row (position ids restarting, no 2-D mask): the second never sees the first,
    and each prompt image is still one bidirectional block."""
    torch.manual_seed(0)
    model, processor = vpit.assemble(tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=K)
    model.config.image_attention = "bidirectional"
    one = encode_conversations(processor, [UNDERSTANDING], [[None]])
    length = one["input_ids"].shape[1]
    packed = {
        "input_ids": one["input_ids"].repeat(1, 2),
        "pixel_values": one["pixel_values"].repeat(2, 1, 1, 1),
        "position_ids": torch.arange(length).repeat(1, 2),
    }
    slots, mask = _slots_and_mask(model, packed)
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0
    assert not bool(allowed[length:, :length].any())  # no attention across the samples
    first, second = slots[0, :length].nonzero().squeeze(1), length + slots[0, :length].nonzero().squeeze(1)
    assert bool(allowed[first[0], first[-1]]) and bool(allowed[second[0], second[-1]])


def test_bidirectional_generation_cached_equals_reference(tiny_llama, tiny_clip, tmp_path):
    torch.manual_seed(0)
    model, processor = vpit.assemble(tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=K)
    model.config.image_attention = "bidirectional"
    model.eval()
    prompt = prompts(
        processor,
        ["<image> What colour is the shape?", "Draw a red circle."],
        images=[(220, 40, 40)],
        open_image=[False, True],
    )
    masks = []  # the attention mask of every LLM call: 4-D for a prefill with a prompt image
    hook = model.language_model.register_forward_pre_hook(
        lambda _m, _a, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    cached = generate(model, **prompt, max_new_tokens=K + 3)
    assert masks[0] is not None and masks[0].dim() == 4  # the prefill
    assert all(m is None or m.dim() == 2 for m in masks[1:])  # then one causal step at a time
    masks.clear()
    reference = generate_no_cache(model, **prompt, max_new_tokens=K + 3)
    hook.remove()
    assert masks[0] is not None and masks[0].dim() == 4
    assert torch.equal(cached.sequences, reference.sequences)
    torch.testing.assert_close(cached.images[1][0], reference.images[1][0], atol=1e-5, rtol=1e-4)


def test_the_bridge_stage_trains_the_resampler_and_the_token_bridge(tiny_llama, tiny_clip):
    """A bridge-stage recipe with a resampler: the resampler, the token-wise bridge and the image-token rows train,
    at the bridge's learning rate; the LLM and the head stay frozen."""
    from vpit.training.components import build_model
    from vpit.training.config import recipe_from_dict

    recipe = recipe_from_dict(
        {
            "stage": "bridge",
            "model": {
                "llm": str(tiny_llama),
                "vision": f"local-dir:{tiny_clip}",
                "num_visual_tokens": K,
                "bridge": "perceiver",
                "bridge_options": SMALL,
            },
            "freeze": {"llm": True, "visual_head": True},
            "data": {"mixture": [{"card": "data_cards/toy_understanding.yaml"}], "use_sample": True},
            "optim": {"lr": 1e-4, "bridge_lr": 1e-3},
            "train": {"output_dir": "unused", "max_steps": 1},
            "tracking": {"report_to": []},
        }
    )
    model, _ = build_model(recipe)
    base = model.get_base_model()
    hidden = base.config.get_text_config().hidden_size
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    bridges = sum(p.numel() for part in (base.bridge, base.token_bridge) for p in part.parameters())
    assert sum(trained.values()) == bridges + 2 * 3 * hidden  # + the 3 image-token rows of embedding and LM head
    groups = param_groups(model, recipe)
    assert {g["lr"] for g in groups if g["name"] == "bridge"} == {1e-3}
    in_bridge_groups = sum(p.numel() for g in groups if g["name"] == "bridge" for p in g["params"])
    assert in_bridge_groups == bridges


def test_bidirectional_image_attention_refuses_a_flash_backend(tiny_llama, tiny_clip):
    torch.manual_seed(0)
    model, processor = vpit.assemble(tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=K)
    model.config.image_attention = "bidirectional"
    model.language_model.config._attn_implementation = "flash_attention_2"
    batch = encode_conversations(processor, [UNDERSTANDING], [[None]])
    with pytest.raises(ValueError, match="needs an attention backend that takes a mask"):
        _slots_and_mask(model, batch)
