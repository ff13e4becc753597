"""VPiTForCausalLM: splicing, the loss terms, gradients, and the next-token shift, on tiny models."""

import pytest
import torch
import torch.nn.functional as F
from conftest import GENERATION, TEXT_ONLY, UNDERSTANDING, encode_conversations

import vpit
from vpit.model.losses import visual_loss


def test_new_token_rows_start_at_the_mean(tiny_vpit, tiny_llama):
    from transformers import AutoModelForCausalLM

    model, processor = tiny_vpit
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    old = original.get_input_embeddings().weight.shape[0]
    ids = [model.config.image_start_token_id, model.config.image_end_token_id, model.config.image_token_id]
    assert sorted(ids) == [old, old + 1, old + 2]
    assert len(processor.tokenizer) == model.get_input_embeddings().weight.shape[0] == old + 3
    for matrix, ref in (
        (model.get_input_embeddings(), original.get_input_embeddings()),
        (model.get_output_embeddings(), original.get_output_embeddings()),
    ):
        assert torch.equal(matrix.weight[:old], ref.weight)
        expected = ref.weight.mean(dim=0).expand(3, -1)
        assert torch.allclose(matrix.weight[old:], expected, atol=1e-7)
    assert model.config.text_config.vocab_size == old + 3


def test_tied_embeddings_stay_tied(tiny_llama_tied, tiny_clip):
    import vpit

    model, _ = vpit.assemble(tiny_llama_tied, f"local-dir:{tiny_clip}", num_visual_tokens=4)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_output_shapes_and_loss_terms(tiny_vpit):
    model, processor = tiny_vpit
    batch = encode_conversations(processor, [UNDERSTANDING, GENERATION], [[None], [None]])
    out = model(**batch)
    b, t = batch["input_ids"].shape
    assert out.logits.shape == (b, t, model.config.text_config.vocab_size)
    # Only the generation row's image is a target: K = 4 predictions of Dv = 48.
    assert out.visual_predictions.shape == (4, 48) and out.visual_targets.shape == (4, 48)
    assert out.visual_loss > 0 and out.text_loss > 0
    assert torch.allclose(out.loss, out.text_loss + out.visual_loss)


def test_count_mismatch_raises_clear_error(tiny_vpit):
    model, processor = tiny_vpit
    batch = encode_conversations(processor, [UNDERSTANDING, GENERATION], [[None], [None]])
    with pytest.raises(ValueError, match=r"hold 8 image slots .* but 1 image\(s\) x K=4 = 4 visual tokens"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:1]})
    with pytest.raises(ValueError, match="hold 4 image slots"):
        model(**encode_conversations(processor, [UNDERSTANDING], [[None, None]]))
    ids = batch["input_ids"].clone()
    ids[ids == model.config.image_token_id] = processor.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="hold 0 image slots"):
        model(input_ids=ids, pixel_values=batch["pixel_values"])


def test_labels_on_slots_are_rejected(tiny_vpit):
    model, processor = tiny_vpit
    batch = encode_conversations(processor, [GENERATION], [[None]])
    slots = batch["input_ids"] == model.config.image_token_id
    batch["labels"][slots] = model.config.image_token_id
    with pytest.raises(ValueError, match="labels must be -100 at image slots"):
        model(**batch)


def test_prompt_images_give_no_visual_loss(tiny_vpit):
    model, processor = tiny_vpit
    out = model(**encode_conversations(processor, [UNDERSTANDING], [[None]]))
    assert out.visual_loss.item() == 0.0
    assert out.visual_predictions.shape == (0, 48)
    assert torch.equal(out.loss, out.text_loss)


def test_no_image_batch_gives_exact_zero_and_keeps_every_module_in_the_graph(tiny_vpit):
    model, processor = tiny_vpit
    model.train()
    out = model(**encode_conversations(processor, [TEXT_ONLY, TEXT_ONLY], [[], []]))
    assert out.visual_loss.item() == 0.0 and not torch.isnan(out.loss)
    assert torch.equal(out.loss, out.text_loss + 0.0)
    out.loss.backward()
    # Head and bridge ran (zero gradients, not missing ones), so DDP / ZeRO ranks stay in step.
    for name, p in model.named_parameters():
        if name.startswith(("bridge", "visual_head")):
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


def test_gradient_reaches_bridge_head_llm_but_not_encoder(tiny_vpit):
    model, processor = tiny_vpit
    model.train()
    model(**encode_conversations(processor, [UNDERSTANDING, GENERATION], [[None], [None]])).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for prefix in ("bridge.", "visual_head.", "language_model.model.layers.0.", "language_model.lm_head"):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
    encoder = [n for n in grads if n.startswith("vision_tower.")]
    assert encoder and all(grads[n] is None for n in encoder)
    assert all(not p.requires_grad for p in model.vision_tower.parameters())


def test_next_token_shift_and_targets(tiny_vpit):
    """The hidden state one position before each response slot predicts that slot's encoder token."""
    model, processor = tiny_vpit
    model.eval()
    batch = encode_conversations(processor, [UNDERSTANDING, GENERATION], [[None], [None]])
    out = model(**batch, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    slot_rows, slot_cols = (batch["input_ids"] == model.config.image_token_id).nonzero(as_tuple=True)
    # Row 1's slots are the targets; their predictions come from the positions just before them.
    response = slot_rows == 1
    expected = F.normalize(model.visual_head(hidden[1, slot_cols[response] - 1]), dim=-1)
    assert torch.allclose(out.visual_predictions, expected, atol=1e-6)
    z = model.encode_images(batch["pixel_values"])  # (2, 4, 48): image 1 is the response image
    assert torch.equal(out.visual_targets, z[1])
    manual = (1 - F.cosine_similarity(expected, z[1], dim=-1)).mean()
    assert torch.allclose(out.visual_loss, manual, atol=1e-6)


def test_final_hidden_state_is_the_lm_head_input(tiny_vpit):
    model, processor = tiny_vpit
    batch = encode_conversations(processor, [GENERATION], [[None]])
    out = model(**batch, output_hidden_states=True)
    assert torch.allclose(model.get_output_embeddings()(out.hidden_states[-1]), out.logits, atol=1e-5)


def test_text_loss_matches_the_llm_own_loss_on_text(tiny_vpit):
    model, processor = tiny_vpit
    batch = encode_conversations(processor, [TEXT_ONLY], [[]])
    ours = model(**batch).text_loss
    theirs = model.language_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_splice_puts_bridge_outputs_at_the_slots(tiny_vpit):
    model, processor = tiny_vpit
    batch = encode_conversations(processor, [UNDERSTANDING, GENERATION], [[None], [None]])
    embeds, z = model.embed(batch["input_ids"], batch["pixel_values"])
    slots = batch["input_ids"] == model.config.image_token_id
    assert torch.equal(embeds[slots], model.bridge(z).reshape(-1, embeds.shape[-1]))
    plain = model.get_input_embeddings()(batch["input_ids"])
    assert torch.equal(embeds[~slots], plain[~slots])


def test_visual_loss_weight_and_explicit_target_mask(tiny_vpit):
    model, processor = tiny_vpit
    model.config.visual_loss_weight = 0.25
    batch = encode_conversations(processor, [UNDERSTANDING, GENERATION], [[None], [None]])
    out = model(**batch)
    assert torch.allclose(out.loss, out.text_loss + 0.25 * out.visual_loss)
    # An explicit mask overrides the default: mark both images as targets.
    all_slots = batch["input_ids"] == model.config.image_token_id
    both = model(**batch, visual_target_mask=all_slots)
    assert both.visual_predictions.shape == (8, 48)
    with pytest.raises(ValueError, match="marks positions that are not image slots"):
        model(**batch, visual_target_mask=torch.ones_like(all_slots))


def test_response_slot_mask_counts_k_per_response_image(tiny_vpit):
    model, processor = tiny_vpit
    batch = encode_conversations(processor, [GENERATION, UNDERSTANDING, GENERATION], [[None], [None], [None]])
    mask = model.response_slot_mask(batch["input_ids"], batch["labels"])
    assert mask.sum(dim=1).tolist() == [4, 0, 4]


def test_visual_tokens_can_be_fed_directly(tiny_vpit):
    model, processor = tiny_vpit
    model.eval()
    batch = encode_conversations(processor, [GENERATION], [[None]])
    z = model.encode_images(batch["pixel_values"])
    a = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    b = model(input_ids=batch["input_ids"], visual_tokens=z).logits
    assert torch.equal(a, b)


def test_bf16_model(tiny_llama, tiny_clip):
    import vpit

    model, processor = vpit.assemble(tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=4, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(**encode_conversations(processor, [GENERATION], [[None]]))
    assert torch.isfinite(out.loss) and out.visual_loss > 0


def test_gradient_checkpointing_gives_the_same_gradients(tiny_vpit):
    model, processor = tiny_vpit
    model.train()
    batch = encode_conversations(processor, [UNDERSTANDING, GENERATION], [[None], [None]])

    def grads():
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.language_model.model.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


@pytest.mark.parametrize("std", [0.02, 0.5])
def test_bridge_and_head_start_from_initializer_range(tiny_llama, tiny_clip, std):
    torch.manual_seed(0)
    model, _ = vpit.assemble(tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=4, initializer_range=std)
    linears = [
        m for part in (model.bridge, model.visual_head) for m in part.modules() if isinstance(m, torch.nn.Linear)
    ]
    assert len(linears) == 4
    for layer in linears:
        assert abs(layer.weight.std().item() - std) < 0.15 * std  # N(0, std), thousands of entries
        assert not layer.bias.any()


@pytest.mark.parametrize("kind", ["l2", "smooth_l1"])
def test_regression_visual_losses(tiny_vpit, kind, tmp_path):
    """l2 / smooth_l1: the loss is that regression on the head's raw outputs (not normalised), the gradient differs
    from the cosine's, and the setting survives save / load."""
    model, processor = tiny_vpit
    batch = encode_conversations(processor, [GENERATION], [[None]])
    cosine = model(**batch)
    model.config.visual_loss = kind
    out = model(**batch)
    assert not torch.allclose(out.visual_predictions.norm(dim=-1), torch.ones(4), atol=1e-2)
    expected = visual_loss(out.visual_predictions, out.visual_targets, kind, beta=model.config.visual_loss_beta)
    assert torch.allclose(out.visual_loss, expected) and not torch.allclose(out.visual_loss, cosine.visual_loss)
    assert torch.allclose(out.loss, out.text_loss + out.visual_loss)
    head = model.visual_head[-1].weight
    (grad,) = torch.autograd.grad(out.loss, head)
    model.config.visual_loss = "cosine"
    (cosine_grad,) = torch.autograd.grad(model(**batch).loss, head)
    assert not torch.allclose(grad, cosine_grad)
    model.config.visual_loss = kind
    model.save_pretrained(tmp_path)
    loaded = vpit.VPiTForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.visual_loss == kind
    assert torch.allclose(loaded(**batch).visual_loss, out.visual_loss, atol=1e-6)


def test_per_modality_weights_and_z_loss(tiny_vpit):
    model, processor = tiny_vpit
    batch = encode_conversations(processor, [UNDERSTANDING, GENERATION], [[None], [None]])
    plain = model(**batch)
    assert plain.z_loss is None  # off by default
    model.config.text_loss_weight, model.config.visual_loss_weight = 0.5, 2.0
    weighted = model(**batch)
    assert torch.allclose(weighted.loss, 0.5 * plain.text_loss + 2.0 * plain.visual_loss)
    model.z_loss_weight = 1e-2
    for return_logits in (True, False):  # all positions, or the labelled ones only (the training loop's)
        out = model(**batch, return_logits=return_logits)
        logits = model(**batch).logits
        predicting = batch["labels"][:, 1:] != -100
        expected = torch.logsumexp(logits[:, :-1][predicting], dim=-1).square().mean()
        assert torch.allclose(out.z_loss, expected, atol=1e-6) and out.z_loss > 0
        assert torch.allclose(out.loss, weighted.loss + 1e-2 * expected, atol=1e-6)
    model.fused_cross_entropy = True
    with pytest.raises(RuntimeError, match="never materialises the logits, which the z-loss reads"):
        model(**batch, return_logits=False)
