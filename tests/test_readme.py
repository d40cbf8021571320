"""The README's usage example must run as pasted on a CPU machine."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs_and_gives_gradients():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # the drop-in loss example
    loss, hidden, weight = namespace["loss"], namespace["hidden"], namespace["lm_head"].weight
    assert loss.ndim == 0 and bool(loss.isfinite())
    assert hidden.grad is not None and weight.grad is not None
    assert float(hidden.grad.abs().sum()) > 0 and float(weight.grad.abs().sum()) > 0
