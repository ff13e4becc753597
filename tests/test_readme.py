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


def _example(obj) -> str:
    """The `>>>` / `...` lines of an object's docstring, as code."""
    lines = [line.strip() for line in (obj.__doc__ or "").splitlines()]
    return "\n".join(line[4:] for line in lines if line.startswith((">>> ", "... ")))


def test_model_docstring_example_runs(tiny_llama, tiny_clip):
    """VPiTForCausalLM's example, with the tiny local backbones standing in for the Hub names."""
    import math

    import torch
    from PIL import Image

    import vpit

    code = _example(vpit.VPiTForCausalLM)
    code = code.replace('"meta-llama/Llama-3.1-8B-Instruct"', repr(str(tiny_llama)))
    code = code.replace('"ViT-SO400M-14-SigLIP-384",', f'"local-dir:{tiny_clip}", num_visual_tokens=4,')
    code = code.replace('vision_pretrained="webli"', "")
    assert code.count("tiny") >= 1 and "webli" not in code
    scope = {"vpit": vpit, "image": Image.new("RGB", (32, 32), (220, 40, 40))}
    torch.manual_seed(0)
    exec(compile(code, "VPiTForCausalLM example", "exec"), scope)
    out = scope["out"]
    assert math.isfinite(float(out.loss)) and float(out.visual_loss) == 0.0  # a prompt image is input only
    assert torch.equal(out.loss, out.text_loss)
