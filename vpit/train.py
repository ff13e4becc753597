"""`python -m vpit.train RECIPE.yaml [section.key=value ...]` — run under `accelerate launch` for several
processes or DeepSpeed:

    accelerate launch --config_file recipes/accelerate/deepspeed_zero3.yaml -m vpit.train recipes/vpit.yaml
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import report_error
from .training.config import load_recipe
from .training.stages import run_stage


def main(argv: Sequence[str] | None = None) -> Path:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if args else 2)
    return run_stage(load_recipe(args[0], args[1:]))


if __name__ == "__main__":
    # As `vpit train`: an error is one line (exit 2 for usage, 1 for a failure), the traceback with --debug.
    debug = "--debug" in sys.argv or os.environ.get("VPIT_DEBUG", "") not in ("", "0")
    sys.argv = [arg for arg in sys.argv if arg != "--debug"]
    try:
        main()
    except Exception as error:
        if debug:
            raise
        sys.exit(report_error("vpit.train", error))
