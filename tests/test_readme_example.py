"""The README's "main job from Python" block runs as written, with a smaller budget: the
numbers of its budget are swapped for small ones and its output folder for a temporary one
(a change of any API it uses breaks this test, and so the documentation stays true)."""
import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = {"num_images=512": "num_images=32", "steps=200": "steps=2", "epochs=34": "epochs=2",
         "iters_per_epoch=24": "iters_per_epoch=2"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _block() -> str:
    text = README.read_text()
    section = text[text.index("### The main job from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path):
    from synq.data import fashion_mnist_dataset
    try:
        fashion_mnist_dataset("test")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    code = _block()
    for big, small in SMALL.items():
        assert code.count(big) == 1, big  # the budget as the README gives it
        code = code.replace(big, small)
    code = code.replace('"runs/py/', f'"{tmp_path}/')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    top1 = [float(v) for v in out.getvalue().split()]
    assert len(top1) == 2 and all(t > 50 for t in top1), top1  # chance is 10%
    assert abs(top1[0] - top1[1]) < 1.0, top1  # fake-quantized and integer agree
    from synq.deploy import load_int
    assert load_int(tmp_path / "int") is not None


def test_readme_python_example_uses_the_commands_budget():
    from synq.cli import QUICK_FINETUNE, QUICK_SYNTH
    code = _block()
    got = {k: float(v) for k, v in re.findall(r"\b(\w+)=([0-9.e-]+)\b", code)}
    for k in ("num_images", "steps"):
        assert got[k] == QUICK_SYNTH[k], k
    for k in ("epochs", "calib_epochs", "iters_per_epoch", "batch_size", "lr"):
        assert got[k] == QUICK_FINETUNE[k], k
