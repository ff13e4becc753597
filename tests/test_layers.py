"""The package's imports point down its layers. Every import in vpit/, also inside functions, is an edge; an edge
that points up fails here, naming the module, the line and the import."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vpit"

# layer (a module prefix) -> prefixes it must never import
FORBIDDEN = {
    # The model core: what a saved folder is. `model.generate` calls into vpit.inference.generation, as
    # transformers keeps `generate` with its models; nothing else above the core is reachable from it.
    "vpit.model": [
        "vpit.data",
        "vpit.training",
        "vpit.train",
        "vpit.inference.pipeline",
        "vpit.inference.chat",
        "vpit.decoder",
        "vpit.hub",
        "vpit.cli",
        "vpit.toy",
    ],
    # The decoder sits beside the core and knows nothing of the LLM side: only the vision encoder and its config.
    "vpit.decoder": [
        "vpit.model.modeling_vpit",
        "vpit.model.processing_vpit",
        "vpit.model.assembly",
        "vpit.model.lora",
        "vpit.model.adapters",
        "vpit.model.losses",
        "vpit.inference",
        "vpit.data",
        "vpit.training",
        "vpit.train",
        "vpit.hub",
        "vpit.cli",
        "vpit.toy",
    ],
    "vpit.inference": ["vpit.data", "vpit.training", "vpit.train", "vpit.hub", "vpit.cli", "vpit.toy"],
    "vpit.data": ["vpit.inference", "vpit.decoder", "vpit.training", "vpit.train", "vpit.hub", "vpit.cli", "vpit.toy"],
    "vpit.hub": ["vpit.data", "vpit.training", "vpit.train", "vpit.inference", "vpit.cli", "vpit.toy"],
    # Training may build the toy world's small from-config decoder (`decoder.init: toy`), nothing else of it.
    "vpit.training": ["vpit.cli", "vpit.train", "vpit.toy.world", "vpit.toy.demo", "vpit.toy.evaluate"],
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            edges += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            edges.append((node.lineno, target))
            # `from . import x` / `from .. import x` import submodules too
            edges += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return edges


def upward_edges() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for layer, forbidden in FORBIDDEN.items():
            if not (name == layer or name.startswith(layer + ".")):
                continue
            for line, target in imports(path):
                hit = [f for f in forbidden if target == f or target.startswith(f + ".")]
                where = f"{path.relative_to(PACKAGE.parent)}:{line}"
                if hit and not any(b.startswith(f"{where} ") for b in bad):  # one report per import statement
                    bad.append(f"{where} imports {target} (layer {layer})")
    return bad


def test_imports_point_down_the_layers():
    assert upward_edges() == []


def test_the_walk_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    """The checker itself: a lazy relative import from the core into the Hub is found."""
    fake = tmp_path / "vpit" / "model"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "thing.py").write_text("def f():\n    from ..hub import push_folder\n    from . import images\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path / "vpit")
    assert upward_edges() == ["vpit/model/thing.py:2 imports vpit.hub (layer vpit.model)"]


@pytest.mark.parametrize("module", ["vpit.model", "vpit.decoder"])
def test_the_lower_layers_import_alone(module):
    """Importing the core (or the decoder) in a fresh interpreter loads nothing of the layers above it."""
    import subprocess
    import sys

    code = (
        f"import sys, {module}; "
        "above = ['vpit.data', 'vpit.training', 'vpit.hub', 'vpit.cli', 'vpit.toy', 'vpit.inference.pipeline']; "
        "print(sorted(m for m in sys.modules if any(m == a or m.startswith(a + '.') for a in above)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
