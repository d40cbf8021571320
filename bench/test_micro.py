"""pytest-benchmark micro-benchmarks on CPU-sized shapes, so regressions show in a familiar format.

Not part of the unit tests (pyproject's testpaths is tests/). Run:
    pytest bench/                                   # table of min/median/mean per case
    pytest bench/ --benchmark-autosave              # keep a run under .benchmarks/
    pytest bench/ --benchmark-compare               # compare with the last saved run
Each implementation is checked against the float64 reference first (bench.measure.correctness), so a fast
wrong kernel fails here instead of posting a good number.
"""

import pytest
import torch

from bench import measure, shapes
from bench.impls import REGISTRY

H, V = shapes.PRESETS["quick"]
TOKENS = (1024, 4096)
SEQ_LEN = 256
OPTS = {"beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.2, "loss_type": "dapo", "temperature": 1.0}
# ours-fused on the torch backend: the CPU path of the fused strategy, not the Triton interpreter
IMPLS = {"ours-chunked": {}, "ours-fused": {"backend": "torch"}, "torch": {}}

_gates: dict = {}


def _gate(name: str, mode: str, opts: dict) -> None:
    key = (name, mode)
    if key not in _gates:
        _gates[key] = measure.correctness(REGISTRY[name], mode, "fp32", opts, torch.device("cpu"))
    gate = _gates[key]
    assert gate["ok"], f"{name} failed the correctness gate: {gate['error']}"


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("mode", ["loss", "logprobs"])
@pytest.mark.parametrize("name", list(IMPLS))
def test_micro(benchmark, name, mode, tokens):
    impl = REGISTRY[name]
    device = torch.device("cpu")
    reason = impl.unavailable(device, mode)
    if reason:
        pytest.skip(reason)
    opts = {**OPTS, **IMPLS[name]}
    _gate(name, mode, opts)
    case = shapes.Case(mode, "quick", H, V, tokens, SEQ_LEN, "fp32")
    x = shapes.make_inputs(case, device)
    run = measure.make_runner(mode, impl.make(mode, x, opts), x)
    benchmark.group = f"{mode} H={H} V={V} N={tokens} fp32"
    benchmark.extra_info.update(flops=case.flops, impl=name, **IMPLS[name])
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
