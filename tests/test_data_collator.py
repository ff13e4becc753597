"""VPiTCollator on hand-written samples: exact padded and packed tensors, image order, bookkeeping, errors; and a
tiny Llama showing that a packed row gives each sample the logits it gets alone."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vpit.data.collator import MODEL_INPUT_KEYS, VPiTCollator, model_inputs, plan_packing
from vpit.model.losses import text_loss

PAD = 0
SLOT = 99  # stands for the image placeholder token; the collator never looks at token values
S = 2  # image side


def sample(ids, labels=None, targets=None, images=(), **extra):
    """An encoded sample; labels default to all supervised, image k is an (3, S, S) image filled with k."""
    ids = torch.tensor(ids)
    return {
        "input_ids": ids,
        "labels": ids.clone() if labels is None else torch.tensor(labels),
        "visual_target_mask": torch.zeros(len(ids), dtype=torch.bool) if targets is None else torch.tensor(targets),
        "pixel_values": torch.stack([torch.full((3, S, S), float(k)) for k in images])
        if images
        else torch.zeros(0, 3, S, S),
        **extra,
    }


def image_values(batch):
    return batch["pixel_values"][:, 0, 0, 0].tolist()


# ------------------------------------------------------------------------------------------------ padding


def test_right_padding_exact_tensors():
    samples = [
        sample([5, 6, 7, 8], labels=[-100, -100, 7, 8], num_skipped=2, id="a", source="x"),
        sample([9, 10], targets=[False, True], num_skipped=1),
    ]
    batch = VPiTCollator(pad_token_id=PAD)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert batch["visual_target_mask"].tolist() == [[False] * 4, [False, True, False, False]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long and batch["visual_target_mask"].dtype == torch.bool
    assert batch["padding_fraction"] == 0.25
    assert batch["num_skipped"] == 3 and batch["num_samples"] == 2
    optional = {"pixel_values", "visual_tokens", "visual_tokens_given"}  # images / cached tokens only
    assert set(batch) == {*MODEL_INPUT_KEYS, "padding_fraction", "num_skipped", "num_samples"} - optional


def test_left_padding_exact_tensors():
    samples = [sample([5, 6, 7, 8], labels=[-100, -100, 7, 8]), sample([9, 10], targets=[False, True])]
    batch = VPiTCollator(pad_token_id=PAD, padding_side="left")(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [0, 0, 9, 10]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, -100, -100, 10]]
    assert batch["visual_target_mask"].tolist() == [[False] * 4, [False, False, False, True]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    # Real tokens count from 0 and padding gets 0, as transformers' generation computes them from the mask.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    expected = (batch["attention_mask"].cumsum(-1) - 1).masked_fill(batch["attention_mask"] == 0, 0)
    assert torch.equal(batch["position_ids"], expected)


def test_first_token_is_never_a_target_and_inputs_are_not_mutated():
    # A left-padded row would otherwise predict its first token from a pad token.
    first = sample([SLOT, 3, 4], labels=[SLOT, 3, 4], targets=[True, False, False])
    batch = VPiTCollator(pad_token_id=PAD, padding_side="left")([first, sample([1, 2, 3, 4, 5])])
    assert batch["labels"].tolist() == [[-100, -100, -100, 3, 4], [-100, 2, 3, 4, 5]]
    assert batch["visual_target_mask"][0].tolist() == [False] * 5
    assert first["labels"].tolist() == [SLOT, 3, 4] and first["visual_target_mask"].tolist() == [True, False, False]


def test_pixel_values_follow_rows_and_slots():
    samples = [
        sample([1, SLOT, SLOT, 2], images=[1, 2]),
        sample([3, 4]),
        sample([5, SLOT, 6], images=[3]),
    ]
    for side in ("right", "left"):
        batch = VPiTCollator(pad_token_id=PAD, padding_side=side)(samples)
        assert batch["pixel_values"].shape == (3, 3, S, S)
        assert image_values(batch) == [1.0, 2.0, 3.0]


def test_batch_without_images_has_no_pixel_values():
    batch = VPiTCollator(pad_token_id=PAD)([sample([1, 2]), sample([3])])
    assert "pixel_values" not in batch
    assert "pixel_values" not in model_inputs(batch)


def test_padding_fraction_is_exact():
    batch = VPiTCollator(pad_token_id=PAD)([sample([1, 2, 3, 4]), sample([1, 2]), sample([1])])
    assert batch["input_ids"].shape == (3, 4)
    assert batch["padding_fraction"] == 5 / 12


def test_pad_to_multiple_of():
    samples = [sample([1, 2, 3, 4, 5]), sample([6, 7, 8])]
    right = VPiTCollator(pad_token_id=PAD, pad_to_multiple_of=4)(samples)
    assert right["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 0, 0, 0, 0, 0]]
    assert right["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0]]
    assert right["attention_mask"].sum(1).tolist() == [5, 3]
    assert right["labels"][:, 5:].eq(-100).all()
    assert right["padding_fraction"] == 8 / 16
    left = VPiTCollator(pad_token_id=PAD, padding_side="left", pad_to_multiple_of=4)(samples)
    assert left["input_ids"].tolist() == [[0, 0, 0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 6, 7, 8]]
    assert left["position_ids"].tolist() == [[0, 0, 0, 0, 1, 2, 3, 4], [0, 0, 0, 0, 0, 0, 1, 2]]
    assert left["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]]
    # Already a multiple: no extra padding.
    assert VPiTCollator(pad_token_id=PAD, pad_to_multiple_of=4)([sample([1, 2, 3, 4])])["input_ids"].shape == (1, 4)


def test_too_long_sample_is_an_error_never_truncated():
    collate = VPiTCollator(pad_token_id=PAD, max_length=3)
    assert collate([sample([1, 2, 3])])["input_ids"].shape == (1, 3)
    with pytest.raises(ValueError, match=r"sample 1 has 4 tokens, more than max_length=3"):
        collate([sample([1, 2]), sample([1, 2, 3, 4])])


def test_model_inputs_keeps_only_forward_arguments():
    batch = VPiTCollator(pad_token_id=PAD)([sample([1, SLOT], images=[7], id="x", num_skipped=4)])
    assert set(model_inputs(batch)) == set(MODEL_INPUT_KEYS) - {"visual_tokens", "visual_tokens_given"}  # no cache
    assert set(batch) - set(MODEL_INPUT_KEYS) == {"padding_fraction", "num_skipped", "num_samples"}
    assert model_inputs(batch)["input_ids"] is batch["input_ids"]


# ------------------------------------------------------------------------------------------------ packing


def test_plan_packing_first_fit_decreasing():
    # Longest first: 5 -> row 0, 4 -> row 1 (row 0 has 3 left), 3 -> row 0, 2 -> row 1.
    assert plan_packing([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    assert plan_packing([2, 2, 2], 8) == [[0, 1, 2]]
    assert plan_packing([8, 8], 8) == [[0], [1]]
    with pytest.raises(ValueError, match=r"sample 1 has 9 tokens"):
        plan_packing([2, 9], 8)


def test_packed_rows_exact_contents():
    a = sample([11, 12, 13, 14, 15], targets=[False, False, True, False, False], num_skipped=1)
    b = sample([21, 22, 23], labels=[-100, -100, 23])
    c = sample([31, 32, 33, 34], num_skipped=2)
    d = sample([41, 42])
    batch = VPiTCollator(pad_token_id=PAD, pack=True, max_length=8)([a, b, c, d])
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15, 21, 22, 23], [31, 32, 33, 34, 41, 42, 0, 0]]
    # Positions restart at every sample, and at the tail padding (its own segment).
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 1]]
    # The first token of every packed sample is -100: it would be predicted from the previous sample.
    assert batch["labels"].tolist() == [
        [-100, 12, 13, 14, 15, -100, -100, 23],
        [-100, 32, 33, 34, -100, 42, -100, -100],
    ]
    assert batch["visual_target_mask"].tolist() == [[False, False, True, *[False] * 5], [False] * 8]
    assert batch["padding_fraction"] == 2 / 16
    assert batch["num_skipped"] == 3 and batch["num_samples"] == 4


def test_packed_pixel_values_follow_slots_row_major():
    # Packing reorders samples (longest first), and images must follow the slots, not the input order.
    d = sample([41, SLOT], images=[1])
    c = sample([31, SLOT, 33, 34], images=[2])
    b = sample([21, SLOT, 23], images=[3])
    a = sample([11, SLOT, SLOT, 14, 15], images=[4, 5])
    batch = VPiTCollator(pad_token_id=PAD, pack=True, max_length=8)([d, c, b, a])
    assert batch["input_ids"].tolist() == [[11, SLOT, SLOT, 14, 15, 21, SLOT, 23], [31, SLOT, 33, 34, 41, SLOT, 0, 0]]
    assert image_values(batch) == [4.0, 5.0, 3.0, 2.0, 1.0]


def test_packing_pads_less_than_padding_a_skewed_mix():
    samples = [sample(list(range(1, 17)))] + [sample([1, 2]) for _ in range(6)]
    padded = VPiTCollator(pad_token_id=PAD, max_length=16)(samples)
    packed = VPiTCollator(pad_token_id=PAD, pack=True, max_length=16)(samples)
    assert padded["input_ids"].shape == (7, 16) and padded["padding_fraction"] == 84 / 112
    assert packed["input_ids"].shape == (2, 16) and packed["padding_fraction"] == 4 / 32
    assert packed["num_samples"] == 7


def test_packing_too_long_sample_is_an_error():
    with pytest.raises(ValueError, match=r"sample 0 has 9 tokens, more than max_length=8"):
        VPiTCollator(pad_token_id=PAD, pack=True, max_length=8)([sample(list(range(1, 10))), sample([1])])


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pad_token_id": -1}, "pad_token_id must be a non-negative int"),
        ({"pad_token_id": None}, "pad_token_id must be a non-negative int"),
        ({"pad_token_id": True}, "pad_token_id must be a non-negative int"),
        ({"pad_token_id": 0, "padding_side": "middle"}, "padding_side must be one of"),
        ({"pad_token_id": 0, "max_length": 0}, "max_length must be a positive int"),
        ({"pad_token_id": 0, "pad_to_multiple_of": 0}, "pad_to_multiple_of must be a positive int"),
        ({"pad_token_id": 0, "pack": True}, "pack=True needs max_length"),
        ({"pad_token_id": 0, "pack": True, "max_length": 8, "padding_side": "left"}, "use padding_side='right'"),
        ({"pad_token_id": 0, "pack": True, "max_length": 10, "pad_to_multiple_of": 4}, "not a multiple of"),
    ],
)
def test_invalid_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VPiTCollator(**kwargs)


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        ([], "empty list of samples"),
        ([{"input_ids": torch.tensor([1])}], r"sample 0 lacks \['labels', 'visual_target_mask', 'pixel_values'\]"),
        ([sample([1, 2]), sample([1, 2], labels=[1])], "sample 1: input_ids, labels and visual_target_mask"),
        ([sample([])], "sample 0: input_ids, labels and visual_target_mask must be non-empty"),
        ([{**sample([1]), "visual_target_mask": torch.tensor([1])}], "must be a bool tensor"),
        ([{**sample([1]), "pixel_values": torch.zeros(3, S, S)}], r"must be \(n, 3, S, S\)"),
        ([sample([1], images=[1]), {**sample([1]), "pixel_values": torch.zeros(1, 3, 4, 4)}], "differ in size"),
    ],
)
def test_invalid_samples(samples, message):
    with pytest.raises(ValueError, match=message):
        VPiTCollator(pad_token_id=PAD)(samples)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_row_gives_each_sample_its_own_logits(attn_implementation):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation=attn_implementation,
    )
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == attn_implementation
    lengths = [5, 6, 4]
    samples = [sample(torch.randint(1, 64, (n,)).tolist()) for n in lengths]
    batch = VPiTCollator(pad_token_id=PAD, pack=True, max_length=17)(samples)
    assert batch["input_ids"].shape == (1, 17)  # one row: 6 + 5 + 4 tokens and 2 of padding
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits
        alone = [model(input_ids=s["input_ids"][None], use_cache=False).logits[0] for s in samples]
        # Controls, so that the comparison below is not vacuous: the row read as one sequence mixes the samples,
        # and so does a forward that builds a cache (transformers reads packing from position_ids only without one).
        unpacked = model(input_ids=batch["input_ids"], use_cache=False).logits
        cached = model(**inputs, use_cache=True).logits

    (row,) = plan_packing(lengths, 17)
    assert row == [1, 0, 2]
    start = 0
    for i in row:
        end = start + lengths[i]
        assert torch.equal(batch["input_ids"][0, start:end], samples[i]["input_ids"])
        torch.testing.assert_close(packed[0, start:end], alone[i], atol=1e-5, rtol=0)
        if start > 0:
            assert not torch.allclose(unpacked[0, start:end], alone[i], atol=1e-3)
            assert not torch.allclose(cached[0, start:end], alone[i], atol=1e-3)
        start = end

    # Per-sample losses add up: summed CE over the packed row equals the sum of each sample's own summed CE
    # (this needs label -100 at each sample's first token).
    packed_sum = text_loss(packed, batch["labels"], num_items_in_batch=1)
    alone_sum = sum(
        text_loss(logits[None], s["labels"][None], num_items_in_batch=1)
        for logits, s in zip(alone, samples, strict=True)
    )
    torch.testing.assert_close(packed_sum, alone_sum, atol=1e-4, rtol=1e-6)
