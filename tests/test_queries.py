"""The 'queries' generation mode (MetaQuery, NExT-GPT): Q learned queries after <image_start>, a connector from
their hidden states to the decoder's condition, the `queries` stage training it end to end through the diffusion
loss."""

import pytest
import torch
from conftest import UNDERSTANDING, encode_conversations, free_port
from PIL import Image
from safetensors.torch import load_file
from training_helpers import history, run_killed_at_publish, run_training

import vpit
from vpit.data.cards import DataCard
from vpit.data.encode import encode_query_sample
from vpit.data.records import RecordError
from vpit.decoder import VPiTDecoderPipeline, VPiTVisionEncoderModel
from vpit.hub import build_model_card
from vpit.inference.generation import generate, generate_no_cache
from vpit.inference.pipeline import VPiTPipeline
from vpit.model.connector import QueryConnector
from vpit.toy.decoder import toy_decoder_components
from vpit.training.components import enable_queries
from vpit.training.config import DecoderSection, QueriesSection
from vpit.training.stages.queries import QueriesTrainable, check_sizes, decoder_transform

K, Q = 4, 6
SMALL = {"width": 32, "depth": 1, "heads": 4}


def _queries_model(tiny_vpit, num_queries=Q, connector="transformer"):
    model, processor = tiny_vpit
    options = SMALL if connector == "transformer" else {"width": 32}
    model.add_queries(num_queries=num_queries, connector=connector, connector_options=options)
    return model, processor


def _prompt(processor, text, start_id):
    rendered = processor.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = processor.tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return torch.cat([ids, torch.tensor([start_id])])  # the answer opens an image


def test_add_queries_starts_the_queries_among_the_embeddings_and_saves_the_mode(tiny_vpit, tmp_path):
    model, processor = _queries_model(tiny_vpit)
    assert model.makes_queries and model.image_slots == Q and model.condition_size == model.vision_tower.hidden_size
    queries, embeddings = model.connector.queries.weight.detach(), model.get_input_embeddings().weight.detach()
    assert queries.shape == (Q, model.config.get_text_config().hidden_size)
    assert abs(float(queries.std()) - float(embeddings.std())) < 0.5 * float(embeddings.std())
    assert len({tuple(q.tolist()) for q in queries}) == Q  # distinct queries, not one row repeated
    with pytest.raises(ValueError, match="already"):
        model.add_queries()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = vpit.VPiTForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.generation_mode == "queries" and loaded.config.num_queries == Q
    assert isinstance(loaded.connector, QueryConnector)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    card = str(build_model_card(tmp_path, "me/queries"))
    assert "| how images are made | queries: 6 learned queries after <image_start>, their hidden states through a " \
           "transformer (depth 1, heads 4, width 32) connector" in card  # fmt: skip


def test_bad_queries_settings_are_config_errors(tiny_vpit):
    model, _ = tiny_vpit
    with pytest.raises(ValueError, match="connector must be one of"):
        model.add_queries(connector="lstm")
    with pytest.raises(ValueError, match="unknown"):
        model.add_queries(connector_options={"layers": 2})
    with pytest.raises(ValueError, match="not divisible"):
        model.add_queries(connector_options={"width": 30, "heads": 4})
    assert not model.makes_queries and model.config.generation_mode == "tokens"  # a refused switch changes nothing


@pytest.mark.parametrize("connector", ["transformer", "mlp"])
def test_generation_gives_the_conditions_of_one_forward_over_the_whole_sequence(tiny_vpit, connector):
    """Cached and uncached generation of a left-padded batch (rows of different lengths, prompts ending with
    <image_start>) give, per row, exactly the conditions `query_forward` computes over the finished sequence."""
    model, processor = _queries_model(tiny_vpit, connector=connector)
    model.eval()
    start, end, slot = model.image_token_ids()
    rows = [
        _prompt(processor, text, start) for text in ("Draw a red circle.", "Generate an image of a big blue square.")
    ]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]).long() for r in rows])
    cached = generate(model, ids, mask, max_new_tokens=Q + 1, eos_token_id=[])
    uncached = generate(model, ids, mask, max_new_tokens=Q + 1, eos_token_id=[], use_cache=False)
    for row, prompt in enumerate(rows):
        new = cached.sequences[row, width:]
        assert new.tolist() == [slot] * Q + [end]
        sequence = torch.cat([prompt, new])[None]
        with torch.no_grad():
            conditions = model.query_forward(sequence, sequence == slot)
        assert len(cached.images[row]) == 1 and cached.images[row][0].shape == (Q, model.condition_size)
        torch.testing.assert_close(cached.images[row][0], conditions[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(uncached.images[row][0], conditions[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(conditions[0].norm(dim=-1), torch.ones(Q))  # as the encoder's tokens are
    # Cut off right after the last query, that query's state was never computed: no image, not a wrong one.
    short = generate(model, ids, mask, max_new_tokens=Q, eos_token_id=[])
    assert short.images == [[], []]
    with pytest.raises(ValueError, match="query_forward"):
        generate_no_cache(model, ids, mask, max_new_tokens=2)


def _trainable(model, decoder, **section):
    recipe = type("R", (), {})()
    recipe.decoder = DecoderSection(condition_dropout=0.0, prediction_type="epsilon")
    recipe.queries = QueriesSection(**{"num_queries": Q, "connector_options": SMALL, **section})
    from diffusers import DDPMScheduler

    return QueriesTrainable(model, decoder, DDPMScheduler.from_config(decoder.scheduler.config), recipe)


def _decoder(model, num_tokens=Q, width=None):
    parts = toy_decoder_components(width or model.vision_tower.hidden_size, num_tokens, projector_hidden_size=32)
    native = num_tokens == model.config.num_visual_tokens and width is None  # the encoder's tokens fit its projector
    encoder = VPiTVisionEncoderModel.from_vision_encoder(model.vision_tower) if native else None
    return VPiTDecoderPipeline(**parts, vision_encoder=encoder)


def _query_batch(processor, model, samples, num_queries=Q):
    from vpit.data.collator import VPiTCollator

    transform = decoder_transform(32)
    encoded = [
        encode_query_sample(s, processor, num_queries, transform, None, processor.image_transform) for s in samples
    ]
    return VPiTCollator(processor.tokenizer.pad_token_id)(encoded)


def _samples(card, count):
    card = DataCard.load(card)
    return [card.to_sample(i, r, use_sample=True) for i, r in list(card.records(use_sample=True))[:count]]


def test_the_diffusion_loss_trains_the_queries_connector_and_decoder_not_the_frozen_llm(tiny_vpit):
    model, processor = _queries_model(tiny_vpit)
    model.language_model.requires_grad_(False)
    decoder = _decoder(model)
    trainable = _trainable(model, decoder)
    batch = _query_batch(processor, model, _samples("data_cards/toy_generation.yaml", 4))
    assert batch["decoder_images"].shape == (4, 3, 32, 32) and int(batch["visual_target_mask"].sum()) == 4 * Q
    counts = torch.tensor([1, 4 * Q])  # this batch is the whole global batch: 4 images
    loss, terms = trainable(batch, torch.Generator().manual_seed(0), counts, 1)
    loss.backward()
    assert set(terms) == {"loss", "diffusion_loss", "mse"} and torch.isfinite(loss)
    assert float(model.connector.queries.weight.grad.abs().sum()) > 0  # the gradient reaches the queries
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.connector.proj_out.parameters())
    assert all(p.grad is None for p in model.language_model.parameters())  # and flows through the frozen LLM only
    assert float(decoder.unet.conv_in.weight.grad.abs().sum()) > 0 and decoder.projector.mlp[1].weight.grad is not None
    # Half of the global batch on this process: half of the loss (a share of the global batch's mean).
    trainable.zero_grad()
    half, _ = trainable(batch, torch.Generator().manual_seed(0), torch.tensor([1, 8 * Q]), 1)
    torch.testing.assert_close(half, loss / 2)


def test_the_alignment_term_pulls_the_conditions_to_the_targets_encoder_tokens(tiny_vpit):
    """queries.align_loss_weight (NExT-GPT): 1 - cos between each condition token and the target image's encoder
    token, per image, a share of the global batch's mean like the diffusion term."""
    model, processor = tiny_vpit
    model.add_queries(num_queries=K, connector_options=SMALL)
    model.language_model.requires_grad_(False)
    decoder = _decoder(model, num_tokens=K)
    trainable = _trainable(model, decoder, align_loss_weight=2.0, num_queries=K)
    batch = _query_batch(processor, model, _samples("data_cards/toy_generation.yaml", 3), num_queries=K)
    loss, terms = trainable(batch, torch.Generator().manual_seed(0), torch.tensor([1, 3 * K]), 1)
    with torch.no_grad():
        conditions = model.query_forward(batch["input_ids"], batch["visual_target_mask"], batch.get("pixel_values"),
                                         batch["attention_mask"], batch["position_ids"])  # fmt: skip
        native = model.encode_images(batch["target_pixels"])
    expected = (1 - torch.nn.functional.cosine_similarity(conditions, native, dim=-1)).mean()
    torch.testing.assert_close(terms["align_loss"], expected)
    torch.testing.assert_close(terms["loss"], terms["diffusion_loss"] + 2.0 * expected)
    loss.backward()
    assert float(model.connector.queries.weight.grad.abs().sum()) > 0


def test_a_record_becomes_its_prompt_the_queries_and_its_answer_image_as_the_target(tiny_vpit):
    model, processor = _queries_model(tiny_vpit)
    start, end, slot = model.image_token_ids()
    transform = decoder_transform(32)
    edit = _samples("data_cards/toy_editing.yaml", 1)[0]  # "<image> Make it blue." -> "<image>"
    encoded = encode_query_sample(edit, processor, Q, transform)
    ids = encoded["input_ids"]
    assert encoded["pixel_values"].shape[0] == 1  # the source image is read through the bridge
    assert int((ids == slot).sum()) == K + Q and ids[-1] == end and ids[-Q - 2] == start
    assert encoded["visual_target_mask"].tolist() == [False] * (len(ids) - Q - 1) + [True] * Q + [False]
    assert encoded["labels"][-Q - 2] == start and bool((encoded["labels"][-Q - 1 :] == -100).all())
    target = Image.open(edit.image_root / edit.images[1]).convert("RGB")
    torch.testing.assert_close(encoded["decoder_images"][0], transform(target))
    understanding = _samples("data_cards/toy_understanding.yaml", 1)[0]
    with pytest.raises(RecordError, match="no_response_image"):
        encode_query_sample(understanding, processor, Q, transform)
    with pytest.raises(RecordError, match="too_long"):
        encode_query_sample(edit, processor, Q, transform, max_length=len(ids) - 1)


def test_a_decoder_of_another_condition_size_is_refused(tiny_vpit):
    model, processor = _queries_model(tiny_vpit)
    for decoder in (_decoder(model, num_tokens=K), _decoder(model, width=8)):
        with pytest.raises(ValueError, match=r"condition tokens of shape \(6, .*pair it with a decoder"):
            VPiTPipeline(model, processor, decoder)
    section = QueriesSection(num_queries=Q + 1, connector_options=SMALL)
    with pytest.raises(ValueError, match=r"num_queries=6.*num_queries=7"):
        enable_queries(model, section, "the saved folder")
    check_sizes(model, _decoder(model), 0.0, "the model")
    with pytest.raises(ValueError, match=r"align_loss_weight .* needs num_queries = K = 4"):
        check_sizes(model, _decoder(model), 1.0, "the model")  # Q = 6 conditions cannot align with K = 4 tokens


def test_the_pipeline_draws_through_the_queries_and_reads_its_image_back_as_a_picture(tiny_vpit):
    model, processor = _queries_model(tiny_vpit)
    pipe = VPiTPipeline(model.eval(), processor, _decoder(model))
    out = pipe("Draw a red circle.", start_with_image=True, max_new_tokens=Q + 4, num_inference_steps=2, seed=0)
    assert len(out.images) == 1 and out.images[0].size == (32, 32)
    assert out.visual_tokens[0].shape == (Q, model.condition_size)
    assert isinstance(out.conversation.images[-1], Image.Image)  # the history holds the picture
    follow = pipe("What colour is the shape?", history=out.conversation, max_new_tokens=3)
    slots = int((follow.sequences == model.image_token_ids()[2]).sum())
    assert slots == K and follow.conversation.images[0] is out.images[0]  # read back through the bridge, K slots
    with pytest.raises(ValueError, match="back as pictures"):
        VPiTPipeline(model, processor)("Draw it again.", history=out.conversation.extended("user", "<image>", [
            out.visual_tokens[0]]), max_new_tokens=2)  # fmt: skip


def _stage_overrides(folder, out, **extra):
    values = {
        "model.pretrained": str(folder),
        "decoder.init": "toy",
        "decoder.vae": "null",
        "decoder.projector_hidden_size": 32,
        "decoder.ema_decay": 0.9,
        "queries.num_queries": K,
        "queries.connector_options": "{width: 32, depth: 1, heads: 4}",
        "train.output_dir": str(out),
        "train.log_every": 1,
        "train.checkpoint_every": 5,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "data.use_sample": "true",
        "optim.warmup_steps": 2,
        "optim.lr": 3e-3,
        "queries.decoder_lr": 3e-3,
        "tracking.report_to": "[]",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_the_queries_stage_trains_end_to_end_and_saves_the_pair_of_folders(tiny_vpit, tmp_path):
    model, processor = tiny_vpit
    model.save_pretrained(tmp_path / "bridge")
    processor.save_pretrained(tmp_path / "bridge")
    out = tmp_path / "queries"
    run_training("recipes/toy/queries.yaml", _stage_overrides(tmp_path / "bridge", out, **{"train.max_steps": 24}))
    rows = [r for r in history(out) if "loss" in r]
    first, last = (sum(r["loss"] for r in rows[i : i + 5]) / 5 for i in (0, len(rows) - 5))
    assert last < 0.7 * first, (first, last)

    trained = vpit.VPiTForCausalLM.from_pretrained(out / "final" / "model")
    assert trained.makes_queries and trained.image_slots == K
    before = model.language_model.state_dict()
    for name, value in trained.language_model.state_dict().items():  # the frozen LLM, every row of it
        torch.testing.assert_close(value, before[name], msg=name)
    pipe = VPiTPipeline.from_pretrained(out / "final" / "model", decoder=out / "final" / "decoder", device="cpu")
    drawn = pipe(
        "Generate an image of a small red circle on the left.",
        start_with_image=True,
        max_images_per_row=1,
        max_new_tokens=K + 2,
        num_inference_steps=2,
    )
    assert len(drawn.images) == 1 and drawn.visual_tokens[0].shape == (K, trained.condition_size)


@pytest.mark.slow
def test_a_resumed_queries_run_reproduces_the_loss_curve(tiny_vpit, tmp_path):
    model, processor = tiny_vpit
    model.save_pretrained(tmp_path / "bridge")
    processor.save_pretrained(tmp_path / "bridge")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training("recipes/toy/queries.yaml", _stage_overrides(tmp_path / "bridge", straight, **{"train.max_steps": 12}))
    overrides = _stage_overrides(tmp_path / "bridge", resumed, **{"train.max_steps": 12})
    run_killed_at_publish("recipes/toy/queries.yaml", overrides, "checkpoint-00000010")
    run_training("recipes/toy/queries.yaml", overrides)  # resumes from checkpoint-00000005
    assert [r["step"] for r in history(resumed)] == list(range(1, 13))
    for x, y in zip(history(straight), history(resumed), strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5, (x["step"], x["loss"], y["loss"])
    assert (resumed / "checkpoint-00000005" / "ema.safetensors").is_file()  # the EMA of every trained part too
    for part in ("model/model.safetensors", "decoder/unet/diffusion_pytorch_model.safetensors"):
        x, y = load_file(str(straight / "final" / part)), load_file(str(resumed / "final" / part))
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-6, msg=key)


def test_understanding_is_left_alone_by_the_queries(tiny_vpit):
    """A prompt without an image to make never meets a query: the answer is the model's before the switch."""
    model, processor = tiny_vpit
    model.eval()
    batch = encode_conversations(processor, [UNDERSTANDING], [[None]])
    with torch.no_grad():
        before = model(**batch).logits
        model.add_queries(num_queries=Q, connector_options=SMALL)
        after = model(**batch).logits
    torch.testing.assert_close(before, after)


@pytest.mark.multiprocess
def test_two_ranks_under_zero3_train_and_save_the_pair(tiny_vpit, tmp_path):
    """`accelerate launch` with the shipped ZeRO-3 config on 2 CPU processes: the model and the decoder are
    partitioned, both ranks read their own samples, the saved pair is gathered whole (the frozen LLM unchanged) and
    draws; the summary counts both ranks' samples."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    model, processor = tiny_vpit
    model.save_pretrained(tmp_path / "bridge")
    processor.save_pretrained(tmp_path / "bridge")
    out = tmp_path / "zero3"
    root = Path(__file__).resolve().parents[1]
    overrides = _stage_overrides(tmp_path / "bridge", out, **{"train.max_steps": 4, "decoder.ema_decay": "null",
                                                              "data.batch_size": 4, "train.checkpoint_every": 2})  # fmt: skip
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               "recipes/accelerate/deepspeed_zero3.yaml", "--num_processes", "2", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "-m", "vpit.train", "recipes/toy/queries.yaml", *overrides]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 4 * 4 * 2 and summary["skipped"] == 0  # steps x batch x ranks
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history(out) if "loss" in r)
    trained = vpit.VPiTForCausalLM.from_pretrained(out / "final" / "model")
    for name, value in trained.language_model.state_dict().items():
        torch.testing.assert_close(value, model.language_model.state_dict()[name], msg=name)
    assert trained.connector.queries.weight.shape == (K, model.config.get_text_config().hidden_size)
    pipe = VPiTPipeline.from_pretrained(out / "final" / "model", decoder=out / "final" / "decoder", device="cpu")
    assert all(p.numel() > 0 for p in pipe.decoder.unet.parameters())  # whole, not a partition
    drawn = pipe("Draw a red circle.", start_with_image=True, max_new_tokens=K + 2, num_inference_steps=2)
    assert len(drawn.images) == 1
