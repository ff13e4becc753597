"""The README's quickstart runs as written, and every other Python block in it at least parses."""

import ast
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_runs(tmp_path):
    quickstart = _python_blocks()[0]
    assert "vpit.assemble" in quickstart
    result = subprocess.run(
        [sys.executable, "-c", quickstart], cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"loss (\d+\.\d+) = text (\d+\.\d+) \+ visual (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    loss, text, visual = map(float, match.groups())
    assert abs(loss - (text + visual)) < 2e-3
    assert visual > 0  # the generated image is a target
    assert (tmp_path / "tiny" / "vpit" / "model.safetensors").is_file()


def test_every_python_block_parses():
    blocks = _python_blocks()
    assert len(blocks) >= 3
    for block in blocks:
        ast.parse(block)
