"""Tokenisation with the chat template: exact labels and masks on hand-written conversations."""

import copy

import pytest
import torch
from PIL import Image

from vpit.data.collator import VPiTCollator, model_inputs
from vpit.data.encode import encode_sample
from vpit.data.records import RecordError, Sample
from vpit.model.processing_vpit import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, assistant_mask

RED = Image.new("RGB", (32, 32), (220, 40, 40))
BLUE = Image.new("RGB", (32, 32), (40, 80, 220))


def _tokens(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens(ids)


def _supervised_text(processor, encoded):
    kept = encoded["labels"][encoded["labels"] != -100]
    return processor.tokenizer.decode(kept)


def test_understanding_sample_labels_only_the_answer(tiny_vpit):
    model, processor = tiny_vpit
    sample = Sample(
        [{"role": "user", "content": "<image> What colour is the shape?"}, {"role": "assistant", "content": "red"}],
        images=[RED],
    )
    enc = encode_sample(sample, processor)
    assert _supervised_text(processor, enc) == " red</s>"
    ids = enc["input_ids"]
    slots = ids == model.config.image_token_id
    assert int(slots.sum()) == 4
    assert not enc["visual_target_mask"].any()  # a prompt image is input only
    assert (enc["labels"][slots] == -100).all()
    assert enc["pixel_values"].shape == (1, 3, 32, 32)


def test_generation_sample_targets_the_response_image(tiny_vpit):
    model, processor = tiny_vpit
    sample = Sample(
        [
            {"role": "user", "content": "Draw a red circle."},
            {"role": "assistant", "content": "Here is an image based on your request: <image>"},
        ],
        images=[RED],
        task="generation",
    )
    enc = encode_sample(sample, processor)
    ids, labels, target = enc["input_ids"], enc["labels"], enc["visual_target_mask"]
    slots = ids == model.config.image_token_id
    assert torch.equal(target, slots) and int(target.sum()) == 4
    # The boundary tokens of a response image are CE targets; the slots are not.
    for boundary in (model.config.image_start_token_id, model.config.image_end_token_id):
        position = int((ids == boundary).nonzero())
        assert labels[position] == boundary
    assert (labels[slots] == -100).all()
    assert _supervised_text(processor, enc).endswith("<image_start><image_end></s>")
    # The model derives the same targets from the labels alone.
    derived = model.response_slot_mask(ids[None], labels[None])[0]
    assert torch.equal(derived, target)


def test_multi_image_prompt_and_multi_turn(tiny_vpit):
    _, processor = tiny_vpit
    sample = Sample(
        [
            {"role": "user", "content": "<image><image> Same colour?"},
            {"role": "assistant", "content": "No."},
            {"role": "user", "content": "Which is red?"},
            {"role": "assistant", "content": "The first."},
        ],
        images=[RED, BLUE],
    )
    enc = encode_sample(sample, processor)
    assert _supervised_text(processor, enc) == " No.</s> The first.</s>"
    # Image order follows the markers.
    assert enc["pixel_values"][0, 0, 0, 0] > enc["pixel_values"][1, 0, 0, 0]
    assert not enc["visual_target_mask"].any()


def test_templates_without_generation_markers_use_offsets(tiny_vpit):
    _, processor = tiny_vpit
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "blue"},
    ]
    marked_ids, marked_mask = assistant_mask(processor.tokenizer, messages)
    plain = copy.deepcopy(processor.tokenizer)
    plain.chat_template = DEFAULT_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids, mask = assistant_mask(plain, messages)
    assert ids == marked_ids
    assert mask == marked_mask


def test_non_prefix_stable_template_is_refused(tiny_vpit):
    _, processor = tiny_vpit
    tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(ChatTemplateError, match="the chat template is not prefix-stable at turn 1"):
        assistant_mask(tokenizer, messages)
    refused = copy.copy(processor)
    refused.tokenizer = tokenizer
    with pytest.raises(RecordError, match="tokenization: the chat template is not prefix-stable at turn 1"):
        encode_sample(Sample(messages), refused)


def test_token_straddling_a_turn_boundary_is_refused(tiny_vpit):
    _, processor = tiny_vpit
    tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} cir{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    assert tokenizer.tokenize(" circle") == ["Ġcircle"]  # one token across "cir|cle"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "cle"}]
    with pytest.raises(ChatTemplateError, match="a token spans the boundary of an assistant turn"):
        assistant_mask(tokenizer, messages)
    refused = copy.copy(processor)
    refused.tokenizer = tokenizer
    with pytest.raises(RecordError, match="tokenization: a token spans the boundary of an assistant turn"):
        encode_sample(Sample(messages), refused)


def test_truncation_cuts_text_never_an_image(tiny_vpit):
    _, processor = tiny_vpit
    long_answer = "a small red circle on the left " * 10
    sample = Sample(
        [{"role": "user", "content": "<image> Describe."}, {"role": "assistant", "content": long_answer}], images=[RED]
    )
    full = encode_sample(sample, processor)
    cut = encode_sample(sample, processor, max_length=30)
    assert len(cut["input_ids"]) == 30
    assert torch.equal(cut["input_ids"], full["input_ids"][:30])
    assert (cut["labels"] != -100).any()
    with pytest.raises(RecordError, match="truncates_image"):
        encode_sample(sample, processor, max_length=8)
    late = Sample(
        [{"role": "user", "content": long_answer + "<image>"}, {"role": "assistant", "content": "ok"}], images=[RED]
    )
    with pytest.raises(RecordError, match="truncates_image"):
        encode_sample(late, processor, max_length=40)
    question = Sample(
        [{"role": "user", "content": "<image> " + long_answer}, {"role": "assistant", "content": "ok"}], images=[RED]
    )
    with pytest.raises(RecordError, match="no_labels"):
        encode_sample(question, processor, max_length=40)


def test_encoded_batch_trains_the_model(tiny_vpit):
    """encode -> collate (padded and packed) -> forward: the same losses either way."""
    model, processor = tiny_vpit
    model.eval()
    samples = [
        Sample(
            [{"role": "user", "content": "<image> What colour?"}, {"role": "assistant", "content": "red"}], images=[RED]
        ),
        Sample(
            [
                {"role": "user", "content": "Draw a blue square."},
                {"role": "assistant", "content": "Here is an image based on your request: <image>"},
            ],
            images=[BLUE],
        ),
        Sample([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]),
    ]
    encoded = [encode_sample(s, processor) for s in samples]
    pad = processor.tokenizer.pad_token_id
    padded = VPiTCollator(pad)(encoded)
    longest = max(len(e["input_ids"]) for e in encoded)
    packed = VPiTCollator(pad, pack=True, max_length=2 * longest)(encoded)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    with torch.no_grad():
        a = model(**model_inputs(padded))
        b = model(**model_inputs(packed))
    assert a.visual_predictions.shape == (4, 48)
    assert torch.allclose(a.visual_loss, b.visual_loss, atol=1e-5)
    assert torch.allclose(a.text_loss, b.text_loss, atol=1e-5)


def test_a_configured_image_token_replaces_the_data_marker(tiny_llama, tiny_clip):
    """Data files mark images with LLaVA's `<image>`; a model whose image token is another string still reads them."""
    import vpit

    torch.manual_seed(0)
    model, processor = vpit.assemble(tiny_llama, f"local-dir:{tiny_clip}", num_visual_tokens=4, image_token="<img>")
    sample = Sample(
        [
            {"role": "user", "content": "Generate an image of a red square."},
            {"role": "assistant", "content": "Here is an image based on your request: <image>"},
        ],
        images=[RED],
    )
    enc = encode_sample(sample, processor)
    slots = enc["input_ids"] == model.config.image_token_id
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == "<img>"
    assert int(slots.sum()) == 4 and torch.equal(enc["visual_target_mask"], slots)
    out = model(**model_inputs(VPiTCollator(processor.tokenizer.pad_token_id)([enc])))
    assert out.visual_predictions.shape == (4, 48) and out.visual_loss > 0
