"""The loss functions on hand-made numbers."""

import pytest
import torch
import torch.nn.functional as F

from vpit.model.losses import VISUAL_LOSSES, cosine_loss, text_and_z_loss, text_loss, visual_loss


def test_cosine_loss_identical_orthogonal_opposite():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert cosine_loss(a, a.clone()).item() == 0.0
    assert cosine_loss(a, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])).item() == 1.0
    assert cosine_loss(a, -a).item() == 2.0
    # Mean over rows: one identical row (0) and one orthogonal row (1).
    assert cosine_loss(a, torch.tensor([[5.0, 0.0, 0.0], [1.0, 0.0, 0.0]])).item() == 0.5


def test_cosine_loss_on_nothing_is_exact_zero_with_a_graph():
    pred = torch.zeros(0, 8, requires_grad=True)
    loss = cosine_loss(pred, torch.zeros(0, 8))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert pred.grad is not None and pred.grad.shape == (0, 8)


def test_text_loss_is_shifted_and_ignores_minus_100():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, -100, 7], [-100, -100, -100, 1, 2]])
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(text_loss(logits, labels), expected)
    # With a global count (gradient accumulation), the sum is divided by that count instead.
    assert torch.allclose(text_loss(logits, labels, num_items_in_batch=10), expected * 5 / 10)


def test_text_loss_with_no_labelled_token_is_zero_not_nan():
    loss = text_loss(torch.randn(1, 4, 7), torch.full((1, 4), -100))
    assert loss.item() == 0.0


def test_chunked_cross_entropy_equals_the_plain_one_without_a_full_fp32_copy(monkeypatch):
    """The CE is summed a chunk of rows at a time, recomputed in backward: same value and gradient as one fp32 CE."""
    import vpit.model.losses as losses

    torch.manual_seed(0)
    logits = torch.randn(37, 50, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[::5] = -100
    reference = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
    (grad_ref,) = torch.autograd.grad(reference, logits)
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", 50 * 8)  # 8 rows a chunk: 5 chunks
    chunks = []
    monkeypatch.setattr(losses, "_ce_sum", lambda x, y: chunks.append(x.shape[0]) or _plain(x, y))
    total = losses.cross_entropy_sum(logits, targets)
    (grad,) = torch.autograd.grad(total, logits)
    assert chunks[:5] == [8, 8, 8, 8, 5] and total.dtype == torch.float32
    torch.testing.assert_close(total, reference, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)


def _plain(x, y):
    return torch.nn.functional.cross_entropy(x.float(), y, ignore_index=-100, reduction="sum")


def test_loss_only_logits_give_the_same_loss_and_gradients(tiny_vpit):
    """return_logits=False: the LM head runs at the labelled positions only, the loss and gradients are unchanged,
    and the LLM is never asked for every layer's hidden states."""
    from conftest import GENERATION, UNDERSTANDING, encode_conversations

    model, processor = tiny_vpit
    batch = encode_conversations(processor, [UNDERSTANDING, GENERATION], [[None], [None]])
    full = model(**batch)
    full.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    seen = {}
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda m, i, o: seen.update(rows=i[0].shape[1]))  # returns None: output kept
    model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(asked=kwargs.get("output_hidden_states")), with_kwargs=True
    )
    lean = model(**batch, return_logits=False)
    lean.loss.backward()
    assert lean.logits is None and seen["asked"] is None
    labelled = int((batch["labels"][:, 1:] != -100).any(dim=0).sum())
    assert seen["rows"] == labelled < batch["input_ids"].shape[1]
    torch.testing.assert_close(lean.loss, full.loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6)


class _StandInFusedLoss(torch.nn.Module):
    """What liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss computes (its Triton kernel needs CUDA):
    CE(input @ weight.T + bias, target), with its constructor and argument order. Counts its calls."""

    calls: list = []  # noqa: RUF012

    def __init__(self, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, lin_weight, _input, target, bias=None):
        self.calls.append((tuple(_input.shape), self.reduction))
        logits = F.linear(_input, lin_weight, bias)
        return F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction=self.reduction)


def test_fused_cross_entropy_path_gives_the_same_loss_and_gradients(tiny_vpit, monkeypatch):
    """With liger-kernel on a CUDA device the text loss comes from the LM head's input through the fused kernel: the
    LM head never runs as a module (no logits stored), the kernel sees only the labelled positions' rows, and the
    loss and gradients equal the chunked CE's. Required but unavailable is an error, not a silent fallback."""
    import sys
    import types

    import pytest
    from conftest import GENERATION, UNDERSTANDING, encode_conversations

    import vpit.model.modeling_vpit as modeling

    model, processor = tiny_vpit
    batch = encode_conversations(processor, [UNDERSTANDING, GENERATION], [[None], [None]])
    model.fused_cross_entropy = True
    with pytest.raises(RuntimeError, match="needs a CUDA device, liger-kernel installed"):
        model(**batch, return_logits=False)

    model.fused_cross_entropy = None  # auto: on this CPU the chunked CE runs
    chunked = model(**batch, return_logits=False)
    chunked.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    liger = types.ModuleType("liger_kernel.transformers")
    liger.LigerFusedLinearCrossEntropyLoss = _StandInFusedLoss
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", liger)
    monkeypatch.setattr(modeling, "fused_cross_entropy_available", lambda device: True)
    head_rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape[1]))
    fused = model(**batch, return_logits=False)
    fused.loss.backward()
    labelled = int((batch["labels"][:, 1:] != -100).any(dim=0).sum())
    batch_size = batch["input_ids"].shape[0]
    assert _StandInFusedLoss.calls == [((batch_size * labelled, model.config.get_text_config().hidden_size), "sum")]
    assert head_rows in ([], [0])  # the LM head module saw no row (0 rows where the LLM calls it on an empty slice)
    torch.testing.assert_close(fused.text_loss, chunked.text_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.loss, chunked.loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6)


def test_the_recipe_key_reaches_the_model(tiny_llama, tiny_clip, tmp_path):
    """train.fused_cross_entropy is the model's `fused_cross_entropy`: true on a machine without CUDA fails the first
    training forward, naming what is missing; unset (auto) trains with the chunked CE."""
    import pytest
    from conftest import GENERATION, encode_conversations

    from vpit.training.components import build_model
    from vpit.training.config import recipe_from_dict

    def built(value):
        recipe = recipe_from_dict(
            {
                "stage": "vpit",
                "model": {"llm": str(tiny_llama), "vision": f"local-dir:{tiny_clip}", "num_visual_tokens": 4},
                "data": {"mixture": [{"card": "data_cards/toy_generation.yaml"}]},
                "train": {"output_dir": str(tmp_path), "fused_cross_entropy": value},
            }
        )
        return build_model(recipe)

    model, processor = built(True)
    assert model.fused_cross_entropy is True
    batch = encode_conversations(processor, [GENERATION], [[None]])
    with pytest.raises(RuntimeError, match="needs a CUDA device, liger-kernel installed"):
        model(**batch, return_logits=False)
    model, _ = built(None)
    assert model.fused_cross_entropy is None and model(**batch, return_logits=False).loss.isfinite()


def test_loss_recipe_keys_reach_the_model(tiny_llama, tiny_clip, tmp_path):
    """model.visual_loss / text_loss_weight go into the assembled model's config, train.z_loss onto the model."""
    from conftest import GENERATION, encode_conversations

    from vpit.training.components import build_model
    from vpit.training.config import recipe_from_dict

    model_keys = {"llm": str(tiny_llama), "vision": f"local-dir:{tiny_clip}", "num_visual_tokens": 4}
    recipe = recipe_from_dict(
        {
            "stage": "vpit",
            "model": {**model_keys, "visual_loss": "smooth_l1", "visual_loss_beta": 0.1, "text_loss_weight": 0.5},
            "data": {"mixture": [{"card": "data_cards/toy_generation.yaml"}]},
            "train": {"output_dir": str(tmp_path), "z_loss": 1e-3},
        }
    )
    model, processor = build_model(recipe)
    assert (model.config.visual_loss, model.config.visual_loss_beta, model.config.text_loss_weight) == (
        "smooth_l1",
        0.1,
        0.5,
    )
    assert model.z_loss_weight == 1e-3
    out = model(**encode_conversations(processor, [GENERATION], [[None]]), return_logits=False)
    assert torch.allclose(out.loss, 0.5 * out.text_loss + out.visual_loss + 1e-3 * out.z_loss)
    with pytest.raises(ValueError, match="visual_loss must be one of"):  # checked where the config is built
        build_model(recipe_from_dict({**recipe.to_dict(), "model": {**model_keys, "visual_loss": "huber"}}))
    with pytest.raises(ValueError, match=r"train\.z_loss is a weight >= 0"):
        recipe_from_dict({**recipe.to_dict(), "train": {"output_dir": str(tmp_path), "z_loss": -1.0}})


def test_visual_loss_kinds_on_hand_made_numbers():
    pred = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    target = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # cosine: 1 - 0 and 1 - 1, mean 0.5; l2: squared distances 2 and 0.25, mean 1.125.
    assert visual_loss(pred, target, "cosine").item() == 0.5
    assert visual_loss(pred, target, "l2").item() == 1.125
    # smooth_l1 (beta 0.5): per feature 0.5 * d^2 / beta below beta, d - beta / 2 above; errors 1, 1 | 0, 0.5.
    expected = ((1 - 0.25) + (1 - 0.25) + 0.0 + (0.5 - 0.25)) / 2
    assert abs(visual_loss(pred, target, "smooth_l1", beta=0.5).item() - expected) < 1e-6
    # A global count divides the sum instead of the rows here.
    assert visual_loss(pred, target, "l2", num_items_in_batch=4).item() == 2.25 / 4
    # l2 and smooth_l1 see the norm, cosine does not.
    assert visual_loss(2 * target, target, "cosine").item() == 0.0
    assert visual_loss(2 * target, target, "l2").item() == 1.0
    with pytest.raises(ValueError, match="visual loss must be one of"):
        visual_loss(pred, target, "l1")


def test_visual_loss_on_nothing_is_exact_zero_for_every_kind():
    for kind in VISUAL_LOSSES:
        pred = torch.zeros(0, 8, requires_grad=True)
        loss = visual_loss(pred, torch.zeros(0, 8), kind)
        assert loss.item() == 0.0
        loss.backward()


def z_loss(logits, labels, num_items_in_batch=None):
    """The z-loss half of `text_and_z_loss`."""
    return text_and_z_loss(logits, labels, num_items_in_batch)[1]


def squared_log_partition(logits, labels, count):
    """The reference: log Z^2 at the positions whose next token is labelled, summed, over `count`."""
    predicting = labels[:, 1:] != -100
    return torch.logsumexp(logits[:, :-1][predicting], dim=-1).square().sum() / count


def test_z_loss_is_the_squared_log_partition_at_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, -100, 7], [-100, -100, -100, 1, 2]])
    predicting = labels[:, 1:] != -100  # positions 0..3 whose next token is labelled
    expected = torch.logsumexp(logits[:, :-1][predicting], dim=-1).square().mean()
    assert torch.allclose(z_loss(logits, labels), expected)
    assert torch.allclose(z_loss(logits, labels, num_items_in_batch=10), expected * 5 / 10)
    # Shifting every logit by c moves log Z by c: the loss sees the normaliser that CE ignores.
    assert torch.allclose(text_loss(logits + 3.0, labels), text_loss(logits, labels), atol=1e-5)
    assert z_loss(logits + 3.0, labels) > z_loss(logits, labels) + 5


def test_z_loss_chunks_like_the_cross_entropy(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 13, requires_grad=True)
    labels = torch.randint(0, 13, (3, 7))
    labels[0, :3] = -100
    whole = z_loss(logits, labels)
    (grad_whole,) = torch.autograd.grad(whole, logits)
    monkeypatch.setattr("vpit.model.losses.CE_CHUNK_ELEMENTS", 13 * 2)  # two rows per chunk
    chunked = z_loss(logits, labels)
    (grad_chunked,) = torch.autograd.grad(chunked, logits)
    assert torch.allclose(whole, chunked) and torch.allclose(grad_whole, grad_chunked, atol=1e-6)


def test_text_and_z_loss_share_one_log_partition_and_equal_the_references(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 13, requires_grad=True)
    labels = torch.randint(0, 13, (3, 7))
    labels[1, 2:5] = -100
    for chunk in (None, 13 * 2):  # whole, then two rows per chunk
        if chunk:
            monkeypatch.setattr("vpit.model.losses.CE_CHUNK_ELEMENTS", chunk)
        ce, z = text_and_z_loss(logits, labels, num_items_in_batch=9)
        assert torch.allclose(ce, text_loss(logits, labels, num_items_in_batch=9), atol=1e-6)
        assert torch.allclose(z, squared_log_partition(logits, labels, 9), atol=1e-6)
        grads = torch.autograd.grad(ce + 0.1 * z, logits)[0]
        reference = text_loss(logits, labels, 9) + 0.1 * squared_log_partition(logits, labels, 9)
        separate = torch.autograd.grad(reference, logits)[0]
        assert torch.allclose(grads, separate, atol=1e-6)
