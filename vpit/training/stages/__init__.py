"""The training stages, each one short linear module, registered by name.

    bridge, vpit   instruction_tuning  (an `InstructionRecipe`)
    decoder        decoder             (a `DecoderRecipe`)
    queries        queries             (a `QueriesRecipe`)

`vpit.training.config.RECIPES` maps the same names to their recipe classes; adding a stage is one module, one
recipe class and one line in each registry.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..config import RECIPES, Recipe

# stage name -> the module whose `run(recipe)` trains it (imported when the stage runs)
STAGES: dict[str, str] = {
    "bridge": "instruction_tuning",
    "vpit": "instruction_tuning",
    "decoder": "decoder",
    "queries": "queries",
}
assert set(STAGES) == set(RECIPES), "every stage needs a recipe class and a runner"


def run_stage(recipe: Recipe) -> Path:
    """Run the stage `recipe.stage` and return its final folder."""
    module = importlib.import_module(f"{__name__}.{STAGES[recipe.stage]}")
    final: Path = module.run(recipe)
    return final


__all__ = ["STAGES", "run_stage"]
