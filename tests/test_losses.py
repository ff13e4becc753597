"""The loss functions on hand-made numbers."""

import torch
import torch.nn.functional as F

from vpit.model.losses import cosine_loss, text_loss


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
