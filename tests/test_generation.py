"""Unified text + image generation (vpit.inference.generation) on the tiny VPiT (K = 4, Dv = 48): cache vs no cache, batch vs
rows alone, the image state machine, sampling, eos, the streamer, and the errors."""

import pytest
import torch
from PIL import Image
from transformers import GenerationConfig, TextIteratorStreamer
from transformers.generation import LogitsProcessor

import vpit
from vpit.inference.generation import generate, generate_no_cache

K, DV = 4, 48
RED, BLUE = (220, 40, 40), (40, 80, 220)


class Boost(LogitsProcessor):
    """+100 on `token` for the rows where `when(input_ids)` (B,) bool holds: forces the token on a random model."""

    def __init__(self, token, when):
        self.token, self.when = token, when

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[self.when(input_ids), self.token] += 100.0
        return scores


class Spy(LogitsProcessor):
    """Records the scores it sees (after the repetition penalty, before the image mask and the warpers)."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        return scores


class Recorder:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def real_length_is(pad_id, *lengths):
    """Trigger on the number of non-pad tokens of each row: the same in a left-padded batch and in a row alone."""
    return lambda ids: torch.isin((ids != pad_id).sum(1), torch.tensor(lengths))


def after(token):
    return lambda ids: ids[:, -1] == token


def prompts(processor, texts, images=(), open_image=None):
    """Left-padded chat prompts; rows flagged in `open_image` end with <image_start> (their first step is visual)."""
    processor.tokenizer.padding_side = "left"
    open_image = open_image or [False] * len(texts)
    chat = [
        processor.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        + (processor.image_start_token if o else "")
        for t, o in zip(texts, open_image, strict=True)
    ]
    pil = [Image.new("RGB", (32, 32), colour) for colour in images]
    return dict(processor(text=chat, images=pil or None, add_special_tokens=False))


def new_tokens(out, row, prompt_length):
    n = int(out.num_new_tokens[row])
    return out.sequences[row, prompt_length : prompt_length + n].tolist()


def assert_same_images(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape == (K, DV)
        assert torch.allclose(x, y, atol=atol)


def ids_of(model):
    c = model.config
    return c.image_start_token_id, c.image_end_token_id, c.image_token_id


# ---------------------------------------------------------------------------------------------- equivalence


def test_cache_no_cache_and_reference_agree_on_a_text_prompt(tiny_vpit):
    model, processor = tiny_vpit
    model.eval()
    start, end, slot = ids_of(model)
    batch = prompts(processor, ["Draw a small red circle on the left."])
    length = batch["input_ids"].shape[1]
    pad = processor.tokenizer.pad_token_id
    force = [Boost(start, real_length_is(pad, length + 3))]  # an image from the 4th new token on
    kwargs = {"max_new_tokens": 14, "logits_processor": force}
    cached = generate(model, **batch, **kwargs)
    uncached = generate(model, **batch, **kwargs, use_cache=False)
    reference = generate_no_cache(model, **batch, **kwargs)
    assert cached.sequences.shape == (1, length + 14)
    new = new_tokens(cached, 0, length)
    assert new[3:9] == [start, slot, slot, slot, slot, end] and slot not in new[9:]
    for other in (uncached, reference):
        assert torch.equal(cached.sequences, other.sequences)
        assert torch.equal(cached.attention_mask, other.attention_mask)
        assert_same_images(cached.images[0], other.images[0])
    assert len(cached.images[0]) == 1
    # Decoding runs in inference mode; what comes back are ordinary tensors (usable with autograd, in place).
    assert not cached.sequences.is_inference() and not cached.images[0][0].is_inference()


def test_cache_no_cache_and_reference_agree_on_a_prompt_with_an_image(tiny_vpit):
    model, processor = tiny_vpit
    model.eval()
    start, end, slot = ids_of(model)
    batch = prompts(processor, ["<image> Make it blue."], images=[RED], open_image=[True])
    length = batch["input_ids"].shape[1]
    # The first image starts at once; a second one right after its <image_end>; then no more.
    kwargs = {"max_new_tokens": 16, "logits_processor": [Boost(start, after(end))], "max_images_per_row": 2}
    cached = generate(model, **batch, **kwargs)
    reference = generate_no_cache(model, **batch, **kwargs)
    uncached = generate(model, **batch, **kwargs, use_cache=False)
    new = new_tokens(cached, 0, length)
    assert new[:11] == [slot] * K + [end, start] + [slot] * K + [end]
    assert start not in new[11:]  # barred: the row started max_images_per_row images
    for other in (reference, uncached):
        assert torch.equal(cached.sequences, other.sequences)
        assert_same_images(cached.images[0], other.images[0])
    assert len(cached.images[0]) == 2


def test_batch_matches_each_row_alone(tiny_vpit):
    model, processor = tiny_vpit
    model.eval()
    start, end, _ = ids_of(model)
    pad = processor.tokenizer.pad_token_id
    texts = ["Describe a large blue square at the top of the image, please.", "<image> Make it blue.", "Draw it."]
    batch = prompts(processor, texts, images=[RED], open_image=[False, True, False])
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and lengths[2] + 2 < min(lengths[:2])
    # Row 2 starts an image at its 3rd new token; every row chains a second image after its first one.
    force = [Boost(start, real_length_is(pad, lengths[2] + 2)), Boost(start, after(end))]
    kwargs = {"max_new_tokens": 20, "logits_processor": force, "max_images_per_row": 2}
    batched = generate(model, **batch, **kwargs)
    width = batch["input_ids"].shape[1]
    assert batch["attention_mask"][2, 0] == 0  # left padding

    for row in range(3):
        real = batch["attention_mask"][row].bool()
        alone_ids = batch["input_ids"][row, real][None]
        alone_pixels = batch["pixel_values"] if row == 1 else None
        alone = generate(model, alone_ids, pixel_values=alone_pixels, **kwargs)
        assert new_tokens(batched, row, width) == new_tokens(alone, 0, alone_ids.shape[1])
        assert_same_images(batched.images[row], alone.images[0])
    assert [len(i) for i in batched.images] == [0, 2, 2]

    reference = generate_no_cache(model, **batch, **kwargs)
    assert torch.equal(batched.sequences, reference.sequences)
    for row in range(3):
        assert_same_images(batched.images[row], reference.images[row])


def test_one_llm_forward_per_step_with_positions_from_the_mask(tiny_vpit):
    """RoPE hides a constant position offset, so the left-padding positions are checked directly."""
    model, processor = tiny_vpit
    model.eval()
    batch = prompts(processor, ["Describe a small red circle on the left.", "Draw."], open_image=[False, True])
    calls = []
    hook = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True
    )
    try:
        generate(model, **batch, max_new_tokens=6, eos_token_id=[])
    finally:
        hook.remove()
    assert len(calls) == 6  # one forward per step for the whole batch, the prefill included
    width = batch["input_ids"].shape[1]
    real = batch["attention_mask"].sum(1)  # (B,)
    prefill = calls[0]["position_ids"]
    assert prefill.shape == (2, width) and prefill[1, : width - int(real[1])].eq(0).all()
    assert prefill[:, -1].tolist() == (real - 1).tolist()
    for step, call in enumerate(calls[1:], start=1):
        assert call["inputs_embeds"].shape == (2, 1, 64)
        assert call["position_ids"][:, 0].tolist() == (real - 1 + step).tolist()
        assert call["attention_mask"].shape == (2, width + step)


def test_tokens_and_visual_tokens_match_a_teacher_forced_forward(tiny_vpit):
    """Greedy text tokens are the argmax of `model.forward` on the generated sequence, and each ẑ is the
    (normalised) head output one position before its slot: generation agrees with the training-time shift."""
    model, processor = tiny_vpit
    model.eval()
    start, _, slot = ids_of(model)
    batch = prompts(processor, ["<image> Move it to the left."], images=[BLUE], open_image=[True])
    out = generate(model, **batch, max_new_tokens=12, max_images_per_row=1)
    sequence = out.sequences
    prompt_z = model.encode_images(batch["pixel_values"])  # (1, K, Dv)
    z = torch.cat([prompt_z, torch.stack(out.images[0])])  # (2, K, Dv)
    forward = model(input_ids=sequence, visual_tokens=z, output_hidden_states=True)
    hidden = forward.hidden_states[-1][0]  # (T, H)
    slots = (sequence[0] == slot).nonzero().squeeze(1)[K:]  # the generated image's slots
    assert torch.allclose(model.predict_visual(hidden[slots - 1]), out.images[0][0], atol=1e-5)
    length = batch["input_ids"].shape[1]
    logits = forward.logits[0].clone()
    logits[:, [slot, start]] = -float("inf")  # what the image-token mask bars here
    for t in range(length + K + 1, sequence.shape[1]):  # the text after the forced <image_end>
        assert sequence[0, t] == logits[t - 1].argmax()


def test_image_start_gives_k_slots_then_image_end_then_text(tiny_vpit):
    model, processor = tiny_vpit
    model.eval()
    start, end, slot = ids_of(model)
    pad = processor.tokenizer.pad_token_id
    batch = prompts(processor, ["Draw two circles."])
    length = batch["input_ids"].shape[1]
    force = [Boost(start, real_length_is(pad, length + 1, length + 9))]
    out = generate(model, **batch, max_new_tokens=16, logits_processor=force)
    new = new_tokens(out, 0, length)
    assert new[1] == start and new[2:6] == [slot] * K and new[6] == end
    assert new[9] == start and new[10:14] == [slot] * K and new[14] == end
    text = [t for i, t in enumerate(new) if i not in range(1, 7) and i not in range(9, 15)]
    assert not {start, end, slot} & set(text)
    assert len(out.images[0]) == 2 and out.partial_images == [None]
    assert model.config.normalize_visual_tokens
    for image in out.images[0]:
        assert image.shape == (K, DV)
        assert torch.allclose(image.norm(dim=-1), torch.ones(K), atol=1e-5)
    assert not torch.allclose(out.images[0][0], out.images[0][1], atol=1e-3)


def test_unnormalised_heads_are_returned_as_they_are(tiny_vpit):
    model, processor = tiny_vpit
    model.eval()
    model.config.normalize_visual_tokens = False
    batch = prompts(processor, ["Draw."], open_image=[True])
    out = generate(model, **batch, max_new_tokens=K, max_images_per_row=1)
    norms = out.images[0][0].norm(dim=-1)
    assert not torch.allclose(norms, torch.ones(K), atol=1e-2)
    reference = generate_no_cache(model, **batch, max_new_tokens=K, max_images_per_row=1)
    assert_same_images(out.images[0], reference.images[0])


def test_an_image_cut_short_is_partial(tiny_vpit):
    model, processor = tiny_vpit
    model.eval()
    _, _, slot = ids_of(model)
    batch = prompts(processor, ["Draw."], open_image=[True])
    out = generate(model, **batch, max_new_tokens=2)
    assert out.sequences[0, -2:].tolist() == [slot, slot]
    assert out.images == [[]] and out.partial_images[0].shape == (2, DV)
    assert out.finished.tolist() == [False] and out.num_new_tokens.tolist() == [2]


# -------------------------------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible_and_matches_the_reference(tiny_vpit):
    model, processor = tiny_vpit
    model.eval()
    batch = prompts(processor, ["Describe a small red circle."])
    kwargs = {"max_new_tokens": 20, "do_sample": True, "temperature": 1.5, "eos_token_id": []}

    def sample(seed, fn=generate):
        return fn(model, **batch, **kwargs, generator=torch.Generator().manual_seed(seed)).sequences

    first, again, other = sample(0), sample(0), sample(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, generate(model, **batch, max_new_tokens=20, eos_token_id=[]).sequences)
    assert torch.equal(first, sample(0, generate_no_cache))  # one row: the same draws in the same order


@pytest.mark.parametrize("warper", [{"top_k": 1}, {"top_p": 1e-6}, {"temperature": 1e-4}])
def test_degenerate_warpers_equal_greedy(tiny_vpit, warper):
    model, processor = tiny_vpit
    model.eval()
    batch = prompts(processor, ["Describe a small red circle.", "Draw it."])
    greedy = generate(model, **batch, max_new_tokens=12, eos_token_id=[])
    sampled = generate(
        model, **batch, max_new_tokens=12, eos_token_id=[], do_sample=True, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.equal(greedy.sequences, sampled.sequences)  # plain sampling differs ...
    warped = generate(
        model,
        **batch,
        max_new_tokens=12,
        eos_token_id=[],
        do_sample=True,
        generator=torch.Generator().manual_seed(0),
        **warper,
    )
    assert torch.equal(greedy.sequences, warped.sequences)  # ... a degenerate warper is greedy


@pytest.mark.parametrize(("warper", "check"), [({"top_k": 3}, "k"), ({"top_p": 0.3}, "p")])
def test_top_k_and_top_p_are_honoured(tiny_vpit, warper, check):
    model, processor = tiny_vpit
    model.eval()
    start, _, slot = ids_of(model)
    batch = prompts(processor, ["Describe a small red circle."])
    spy = Spy()
    temperature = 2.0
    out = generate(
        model,
        **batch,
        max_new_tokens=24,
        eos_token_id=[],
        do_sample=True,
        temperature=temperature,
        generator=torch.Generator().manual_seed(0),
        logits_processor=[spy],
        max_images_per_row=0,  # text only: spy call i is new token i
        **warper,
    )
    length = batch["input_ids"].shape[1]
    chosen = out.sequences[0, length:]
    assert len(spy.seen) == len(chosen) == 24
    ranks = []
    for scores, token in zip(spy.seen, chosen, strict=True):
        scores = scores[0].clone()
        scores[[slot, start]] = -float("inf")
        probs = torch.softmax(scores / temperature, dim=-1)
        ranks.append(int((probs > probs[token]).sum()))
        if check == "k":
            assert ranks[-1] < 3
        else:
            assert probs[probs > probs[token]].sum() < 0.3  # inside the nucleus
    assert max(ranks) > 0  # and it did sample, not always the argmax


def test_repetition_penalty_is_honoured(tiny_vpit):
    model, processor = tiny_vpit
    model.eval()
    batch = prompts(processor, ["Draw a small red circle."])
    length = batch["input_ids"].shape[1]
    plain = generate(model, **batch, max_new_tokens=16, eos_token_id=[], max_images_per_row=0)
    penalised = generate(
        model, **batch, max_new_tokens=16, eos_token_id=[], max_images_per_row=0, repetition_penalty=1e4
    )
    plain_new = plain.sequences[0, length:].tolist()
    new = penalised.sequences[0, length:].tolist()
    assert len(set(plain_new)) < len(plain_new)  # greedy on a random model repeats itself
    assert len(set(new)) == len(new)  # with a huge penalty, no token is used twice
    assert not set(new) & set(batch["input_ids"][0].tolist())  # nor one of the prompt's


# ---------------------------------------------------------------------------------------- eos and lengths


def test_eos_stops_a_row_while_the_others_continue(tiny_vpit):
    model, processor = tiny_vpit
    model.eval()
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    batch = prompts(processor, ["Describe a small red circle.", "Draw it.", "<image> Make it blue."], images=[RED])
    width = batch["input_ids"].shape[1]

    def row_zero_at(step):
        return lambda ids: (torch.arange(ids.shape[0]) == 0) & (ids.shape[1] == width + step)

    free = generate(model, **batch, max_new_tokens=10)
    assert free.finished.tolist() == [False] * 3 and free.num_new_tokens.tolist() == [10] * 3
    assert free.sequences.shape == (3, width + 10)  # max_new_tokens respected
    stopped = generate(model, **batch, max_new_tokens=10, logits_processor=[Boost(eos, row_zero_at(3))])
    assert stopped.sequences.shape == (3, width + 10)
    assert stopped.sequences[0, width:].tolist() == [*free.sequences[0, width : width + 3].tolist(), eos] + [pad] * 6
    assert stopped.attention_mask[0, width:].tolist() == [1] * 4 + [0] * 6
    assert torch.equal(stopped.sequences[1:], free.sequences[1:])  # the other rows are untouched
    assert stopped.finished.tolist() == [True, False, False] and stopped.num_new_tokens.tolist() == [4, 10, 10]

    everyone = generate(model, **batch, max_new_tokens=10, logits_processor=[Boost(eos, lambda ids: ids[:, 0] >= 0)])
    assert everyone.sequences.shape == (3, width + 1)  # all rows done: the loop ends early
    assert everyone.sequences[:, -1].tolist() == [eos] * 3 and everyone.finished.all()


def test_generation_config_and_explicit_arguments(tiny_vpit):
    model, processor = tiny_vpit
    model.eval()
    batch = prompts(processor, ["Draw it."])
    width = batch["input_ids"].shape[1]
    config = GenerationConfig(max_new_tokens=5, do_sample=True, top_k=1)
    out = generate(model, **batch, generation_config=config, eos_token_id=[])
    assert out.sequences.shape[1] == width + 5
    greedy = generate(model, **batch, max_new_tokens=3, eos_token_id=[])
    assert torch.equal(generate(model, **batch, generation_config=config, max_new_tokens=3).sequences, greedy.sequences)


# -------------------------------------------------------------------------------------------------- streamer


def test_streamer_receives_exactly_the_text_tokens(tiny_vpit):
    model, processor = tiny_vpit
    model.eval()
    start, end, slot = ids_of(model)
    batch = prompts(processor, ["<image> Make it blue."], images=[RED], open_image=[True])
    length = batch["input_ids"].shape[1]
    recorder = Recorder()
    kwargs = {"max_new_tokens": 12, "logits_processor": [Boost(start, after(end))], "max_images_per_row": 2}
    out = generate(model, **batch, **kwargs, streamer=recorder)
    prompt = batch["input_ids"][0]
    assert recorder.puts[0].tolist() == [prompt[prompt != slot].tolist()]  # the prompt first, as transformers does
    streamed = [t for put in recorder.puts[1:] for t in put.tolist()]
    new = out.sequences[0, length:].tolist()
    assert streamed == [t for t in new if t != slot] and streamed[:2] == [end, start]
    assert recorder.ended == 1

    text_streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    generate(model, **batch, **kwargs, streamer=text_streamer)
    assert "".join(text_streamer) == processor.decode([t for t in new if t != slot])


# ---------------------------------------------------------------------------------------------------- errors


def test_bad_input_raises_clear_errors(tiny_vpit):
    model, processor = tiny_vpit
    start, end, slot = ids_of(model)
    batch = prompts(processor, ["<image> Make it blue.", "Draw it."], images=[RED])
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0"):
        generate(model, **batch, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"hold 4 image slots .* but 0 image\(s\)"):
        generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"hold 4 image slots .* but 0 image\(s\)"):
        generate_no_cache(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=2)
    right = {"input_ids": batch["input_ids"].flip(1), "attention_mask": batch["attention_mask"].flip(1)}
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, **right, pixel_values=batch["pixel_values"], max_new_tokens=2)
    with pytest.raises(ValueError, match="a streamer takes one row"):
        generate(model, **batch, max_new_tokens=2, streamer=Recorder())
    inside = torch.tensor([[1, 5, start, slot, slot]])
    with pytest.raises(ValueError, match="ends inside an image span"):
        generate(model, inside, max_new_tokens=2)
    with pytest.raises(ValueError, match="must not contain an image token id"):
        generate(model, **batch, max_new_tokens=2, eos_token_id=end)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, **batch, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_k only shape sampling; pass do_sample=True"):
        generate(model, **batch, max_new_tokens=2, top_k=5)
    with pytest.raises(ValueError, match="max_images_per_row"):
        generate(model, **batch, max_new_tokens=2, max_images_per_row=-1)
    with pytest.raises(ValueError, match=r"non-empty \(B, T\)"):
        generate(model, batch["input_ids"][0], max_new_tokens=2)


def test_model_generate_method_delegates(tiny_vpit):
    model, processor = tiny_vpit
    model.eval()
    ids = processor.tokenizer(["USER: Draw a red circle.\nASSISTANT:"], return_tensors="pt")["input_ids"]
    start = torch.tensor([[model.config.image_start_token_id]])
    prompt = torch.cat([ids, start], dim=1)
    out = model.generate(prompt, max_new_tokens=8)
    direct = vpit.generate(model, prompt, max_new_tokens=8)
    assert torch.equal(out.sequences, direct.sequences)
    assert len(out.images[0]) == 1 and out.images[0][0].shape == (4, 48)


def test_regression_heads_generate_the_values_they_learnt(tiny_vpit):
    """With an l2 visual loss the head regresses the tokens' values: generation returns them unnormalised, and
    each is the head's output one position before its slot, as with the cosine."""
    model, processor = tiny_vpit
    model.eval()
    batch = prompts(processor, ["Draw."], open_image=[True])
    cosine = generate(model, **batch, max_new_tokens=K, max_images_per_row=1).images[0][0]
    assert torch.allclose(cosine.norm(dim=-1), torch.ones(K), atol=1e-5)
    model.config.visual_loss = "l2"
    out = generate(model, **batch, max_new_tokens=K, max_images_per_row=1)
    raw = out.images[0][0]
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(K), atol=1e-2)
    assert torch.allclose(torch.nn.functional.normalize(raw[0], dim=-1), cosine[0], atol=1e-5)  # same first head call
    assert_same_images(
        out.images[0], generate_no_cache(model, **batch, max_new_tokens=K, max_images_per_row=1).images[0]
    )
