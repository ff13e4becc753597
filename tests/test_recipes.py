"""Every recipe and launch config in recipes/ loads and validates; recipe errors are actionable."""

import json
from pathlib import Path

import pytest
import yaml

from vpit.data.cards import parse_mixture
from vpit.training import config as recipe_config
from vpit.training.config import (
    DecoderRecipe,
    InstructionRecipe,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
)
from vpit.training.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
LAUNCH = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_recipes_exist_for_every_stage():
    stages = {load_recipe(p).stage for p in RECIPES}
    assert stages == {"bridge", "vpit", "decoder", "queries"}
    assert any("examples" in p.parts for p in RECIPES) and any("toy" in p.parts for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_loads_and_its_cards_exist(path):
    recipe = load_recipe(path)
    for entry in parse_mixture(recipe.data.mixture):
        assert (ROOT / entry.card).is_file(), entry.card
    if recipe.stage == "bridge":
        assert recipe.freeze.llm and recipe.freeze.visual_head and not recipe.lora.enabled
    if recipe.stage == "queries":  # the tokens mode's head is unused: frozen, so no decay shrinks it unseen
        assert recipe.freeze.visual_head and recipe.train.eval_every == 0


@pytest.mark.parametrize("path", LAUNCH, ids=lambda p: p.name)
def test_launch_configs_parse_and_point_at_deepspeed_configs(path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in {"NO", "MULTI_GPU", "DEEPSPEED", "FSDP"}
    if config["distributed_type"] == "FSDP":  # FSDP2 (fully_shard), decoder layers wrapped from _no_split_modules
        fsdp = config["fsdp_config"]
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_state_dict_type"] in {"SHARDED_STATE_DICT", "FULL_STATE_DICT"}
    if config["distributed_type"] == "DEEPSPEED":
        ds = json.loads((ROOT / config["deepspeed_config"]["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] in (2, 3)
        if ds["zero_optimization"]["stage"] == 3:
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert (ROOT / "recipes" / "accelerate" / "slurm_multinode.sh").is_file()


def _minimal(**sections):
    data = {"stage": "vpit", "model": {"llm": "x"}, "data": {"mixture": [{"card": "c.yaml"}]}}
    data.update(sections)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_minimal(optim={"lrr": 1}), r"optim: unknown keys \['lrr'\]"),
        (_minimal(stage="pretrain"), r"stage must be one of \['bridge', 'vpit', 'decoder', 'queries'\]"),
        (_minimal(model={"llm": "x", "pretrained": "y"}), "exactly one of `pretrained`"),
        (_minimal(optim={"schedule": "step"}), r"optim.schedule must be one of"),
        (_minimal(train={"mixed_precision": "fp8"}), r"train.mixed_precision must be one of"),
        (_minimal(data={"mixture": []}), "data.mixture must list at least one data card"),
        (_minimal(stage="bridge"), "stage 'bridge' trains the bridge with the LLM frozen"),
        (
            _minimal(stage="bridge", freeze={"llm": True}),
            "stage 'bridge' does not train the visual head .* set freeze.visual_head: true",
        ),
        (_minimal(hub={"push": True}), "hub.push needs hub.repo_id"),
        (_minimal(lora={"r": 0}), "lora: need r >= 1"),
        ({"stage": "vpit", "model": {"llm": "x"}}, "missing 1 required"),
        (_minimal(colour="red"), r"unknown keys \['colour'\]"),
    ],
)
def test_invalid_recipes(data, message):
    with pytest.raises(ValueError, match=message):
        recipe_from_dict(data)


@pytest.mark.parametrize(
    ("stage", "section"), [("decoder", "lora"), ("decoder", "freeze"), ("bridge", "decoder"), ("vpit", "decoder")]
)
def test_a_section_the_stage_does_not_use_is_an_error(stage, section):
    data = {"stage": stage, "model": {"pretrained": "some/folder"}, "data": {"mixture": [{"card": "x.yaml"}]}}
    if stage == "bridge":
        data["freeze"] = {"llm": True, "visual_head": True}
    recipe_from_dict(data)  # valid without it
    with pytest.raises(ValueError, match=rf"unknown keys \['{section}'\]: stage '{stage}' .* does not use them"):
        recipe_from_dict({**data, section: {}})


def test_each_stage_reads_its_own_recipe_class():
    data = {"model": {"pretrained": "f"}, "data": {"mixture": [{"card": "x.yaml"}]}}
    assert type(recipe_from_dict({**data, "stage": "vpit"})) is InstructionRecipe
    assert type(recipe_from_dict({**data, "stage": "decoder"})) is DecoderRecipe
    with pytest.raises(
        ValueError, match=r"stage must be one of \['bridge', 'vpit', 'decoder', 'queries'\], got 'pretrain'"
    ):
        recipe_from_dict({**data, "stage": "pretrain"})
    with pytest.raises(ValueError, match=r"model: unknown keys \['llm'\]"):  # the decoder reads an encoder only
        recipe_from_dict({"stage": "decoder", "model": {"llm": "x"}, "data": data["data"]})
    assert set(STAGES) == set(recipe_config.RECIPES)


def test_dotted_overrides_parse_yaml_values():
    data = apply_overrides(
        _minimal(),
        [
            "optim.lr=3e-4",
            "train.max_steps=7",
            "lora.enabled=true",
            "tracking.report_to=[]",
            "model.vision_pretrained=null",
        ],
    )
    recipe = recipe_from_dict(data)
    assert (recipe.optim.lr, recipe.train.max_steps, recipe.lora.enabled) == (3e-4, 7, True)
    assert recipe.tracking.report_to == [] and recipe.model.vision_pretrained is None
    with pytest.raises(ValueError, match=r"must look like section\.key=value"):
        apply_overrides(_minimal(), ["optim.lr"])


def test_numbers_are_coerced_and_checked():
    assert recipe_from_dict(_minimal(optim={"lr": "3e-4", "warmup_steps": "5"})).optim.lr == 3e-4
    with pytest.raises(ValueError, match=r"optim\.lr must be a number, got 'fast'"):
        recipe_from_dict(_minimal(optim={"lr": "fast"}))


def test_torch_threads_key_sets_torch_threads(tmp_path):
    import torch

    from vpit.training.components import build_accelerator

    before = torch.get_num_threads()
    recipe = recipe_from_dict(_minimal(train={"output_dir": str(tmp_path), "torch_threads": 1}))
    try:
        torch.set_num_threads(2)
        build_accelerator(recipe)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("std", [0.02, 0.3])
def test_model_initializer_range_sets_the_new_bridge_and_head(std, tiny_llama, tiny_clip, tmp_path):
    from vpit.training.components import build_model

    recipe = recipe_from_dict(
        {
            "stage": "vpit",
            "model": {"llm": str(tiny_llama), "vision": f"local-dir:{tiny_clip}", "initializer_range": std},
            "data": {"mixture": [{"card": "x.yaml"}]},
        }
    )
    model, processor = build_model(recipe)
    assert model.config.initializer_range == std
    weight = model.bridge[0].weight
    assert abs(weight.std().item() - std) < 0.15 * std
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"model.initializer_range is 0.5 but .* was saved with initializer_range="):
        build_model(
            recipe_from_dict({**recipe.to_dict(), "model": {"pretrained": str(folder), "initializer_range": 0.5}})
        )


def test_a_recipe_states_only_what_it_changes_over_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "stage: vpit\nmodel: {llm: x, bridge: linear}\ndata: {mixture: [{card: a.yaml}, {card: b.yaml}]}\n"
        "train: {max_steps: 7, output_dir: out/base}\n"
    )
    (tmp_path / "variant").mkdir()
    (tmp_path / "variant" / "v.yaml").write_text(
        "base: ../base.yaml\nmodel: {visual_loss: l2}\ndata: {mixture: [{card: c.yaml}]}\ntrain: {output_dir: out/v}\n"
    )
    recipe = load_recipe(tmp_path / "variant" / "v.yaml", ["train.max_steps=9"])
    assert (recipe.model.llm, recipe.model.bridge, recipe.model.visual_loss) == ("x", "linear", "l2")  # merged
    assert [m["card"] for m in recipe.data.mixture] == ["c.yaml"]  # a list replaces
    assert (recipe.train.output_dir, recipe.train.max_steps) == ("out/v", 9)
    (tmp_path / "base.yaml").write_text("base: variant/v.yaml\nstage: vpit\n")
    with pytest.raises(ValueError, match="recipe bases form a cycle"):
        load_recipe(tmp_path / "variant" / "v.yaml")
    (tmp_path / "w.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ValueError, match=r"base recipe .*missing\.yaml does not exist"):
        load_recipe(tmp_path / "w.yaml")


def test_toy_loss_variants_differ_from_the_toy_recipe_only_where_they_say():
    base = load_recipe(ROOT / "recipes" / "toy" / "vpit.yaml").to_dict()
    for name, model_keys, train_keys in [
        ("vpit_l2", {"visual_loss": "l2"}, {}),
        ("vpit_smooth_l1", {"visual_loss": "smooth_l1", "visual_loss_beta": 0.05}, {}),
        ("vpit_z_loss", {"text_loss_weight": 1.0, "visual_loss_weight": 1.0}, {"z_loss": 1e-4}),
    ]:
        variant = load_recipe(ROOT / "recipes" / "toy" / f"{name}.yaml").to_dict()
        expected = {**base, "model": {**base["model"], **model_keys}}
        expected["train"] = {**base["train"], **train_keys, "output_dir": f"outputs/toy/{name}"}
        assert variant == expected, name
