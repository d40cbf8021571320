"""The fp32-output GEMM probe of torch_ops: mm(out_dtype=fp32) and the in-place addmm(out_dtype=fp32, out=acc) are
probed separately, and each outcome has its own path, checked here on the CPU by forcing the probe result and
standing in an exact emulation for the two cuBLAS overloads (CPU torch registers them for Meta only):

    mm  addmm   logits (plain product)        dW accumulation
    yes yes     mm(out_dtype)                 addmm(out_dtype, out=acc)
    yes no      mm(out_dtype)                 mm(out_dtype) per row block into a bounded temporary, then +=
    no  yes     slice-wise upcast             addmm(out_dtype, out=acc)
    no  no      slice-wise upcast             slice-wise upcast

The fallbacks are sized by a byte budget and warn once on CUDA. Before this, one probe decided both: a torch
without the in-place addmm upcast the logits too, in 32-column slices at V = 128256."""

import warnings

import pytest
import torch

import oracle
from conftest import compare_bf16_run, rel_err

from grpo_kernels import torch_ops
from grpo_kernels.torch_ops import Fp32Gemm

F64 = torch.float64
# the forced "CUDA" fallbacks warn by design (counted where it matters)
pytestmark = pytest.mark.filterwarnings("ignore:grpo_kernels.*on CUDA:RuntimeWarning")
OUTCOMES = [(True, True), (True, False), (False, True), (False, False)]
IDS = [f"mm{int(m)}-addmm{int(a)}" for m, a in OUTCOMES]


class Overloads:
    """Exact stand-ins for the two CUDA overloads, recording each call's output shape."""

    def __init__(self):
        self.mm, self.addmm = [], []

    def mm_out_dtype(self, a, b, out):
        assert a.dtype in (torch.bfloat16, torch.float16) and out.dtype == torch.float32
        self.mm.append(tuple(out.shape))
        out.copy_(a.to(F64) @ b.to(F64))

    def addmm_out_dtype_(self, out, a, b):
        self.addmm.append(tuple(out.shape))
        out.copy_(out.to(F64) + a.to(F64) @ b.to(F64))


@pytest.fixture
def force(monkeypatch):
    """force(mm, addmm, device_type="cuda", budget=None) -> Overloads: gemm_into now believes the probe said so."""
    def apply(mm, addmm, device_type="cuda", budget=None):
        ov = Overloads()
        monkeypatch.setattr(torch_ops, "fp32_gemm", lambda dev, dt: Fp32Gemm(device_type, mm, addmm))
        monkeypatch.setattr(torch_ops, "_mm_out_dtype", ov.mm_out_dtype)
        monkeypatch.setattr(torch_ops, "_addmm_out_dtype_", ov.addmm_out_dtype_)
        monkeypatch.setattr(torch_ops, "_warned", set())
        if budget is not None:
            monkeypatch.setattr(torch_ops, "fallback_bytes", lambda device: budget)
        return ov
    return apply


def _mats(m, k, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mm,addmm", OUTCOMES, ids=IDS)
def test_each_probe_outcome_takes_its_path_and_matches_float64(force, mm, addmm, dtype):
    budget = 4 * 13 * 5  # 5 rows of 13 fp32 columns: the bounded temporary needs several blocks
    ov = force(mm, addmm, budget=budget)
    a, b = _mats(23, 40, 13, dtype, 1)
    exact = a.to(F64) @ b.to(F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch_ops.gemm_into(torch.empty(23, 13), a, b)
        start = torch.randn(23, 13)
        acc = start.clone()
        torch_ops.gemm_into(acc, a, b, accumulate=True)
        torch_ops.gemm_into(acc, a, b, accumulate=True)  # a second fallback call does not warn again
    assert rel_err(out, exact) < 1e-6
    assert rel_err(acc, start.double() + 2 * exact) < 1e-6
    # the plain product (the logits) takes mm(out_dtype) whenever it exists, whatever addmm does
    plain_mm = ov.mm[:1] if mm else []
    assert plain_mm == ([(23, 13)] if mm else [])
    if addmm:  # accumulation in place, no temporary
        assert ov.addmm == [(23, 13), (23, 13)]
    elif mm:  # per block of rows through a temporary of at most `budget` bytes
        blocks = ov.mm[1:]
        assert len(blocks) == 2 * 5 and all(r * c * 4 <= budget for r, c in blocks), blocks
        assert ov.addmm == []
    else:
        assert ov.mm == [] and ov.addmm == []
    messages = [str(w.message) for w in caught if "grpo_kernels" in str(w.message)]
    want = int(not mm) + int(mm and not addmm)  # each missing overload warns once on CUDA
    assert len(messages) == want, messages


def test_no_warning_for_the_cpu_fallback(force):
    force(False, False, device_type="cpu")
    a, b = _mats(5, 8, 7, torch.bfloat16, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch_ops.gemm_into(torch.empty(5, 7), a, b)


def test_cpu_has_no_out_dtype_overloads_without_probing():
    assert torch_ops.fp32_gemm("cpu", torch.bfloat16) == Fp32Gemm("cpu", False, False)


def test_upcast_fallback_slices_fit_the_budget(force, monkeypatch):
    """Without mm(out_dtype) the reduction is split in slices whose fp32 copies of a and b fit the budget: the
    slice count is set by bytes, not by a fixed element count (32 columns at V = 128256 before)."""
    force(False, False, budget=4 * (9 + 11) * 6)  # 6 reduction columns per slice
    sliced = []
    real_addmm_ = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, x, y: sliced.append(x.shape[1]) or real_addmm_(self, x, y))
    a, b = _mats(9, 40, 11, torch.bfloat16, 3)
    acc = torch.zeros(9, 11)
    torch_ops.gemm_into(acc, a, b, accumulate=True)
    assert sliced == [6] * 6 + [4]
    assert rel_err(acc, a.to(F64) @ b.to(F64)) < 1e-6


def test_cuda_fallback_budget_is_a_share_of_available_memory(monkeypatch):
    from grpo_kernels import sizing

    dev = torch.device("cuda", 0)  # never touched: the memory query is patched
    monkeypatch.setattr(sizing, "available_bytes", lambda device: 40 << 30)
    assert torch_ops.fallback_bytes(dev) == torch_ops.CUDA_FALLBACK_BYTES
    monkeypatch.setattr(sizing, "available_bytes", lambda device: 1 << 30)
    assert torch_ops.fallback_bytes(dev) == (1 << 30) // 4


# ------------------------------------------------------------------------------------------------ the probes

@pytest.mark.parametrize("which", ["mm", "addmm"])
def test_probes_are_separate_and_check_values(monkeypatch, which):
    """Each probe calls only its own overload: a torch whose addmm rejects the fp32 `self` still has mm(out_dtype)
    for the logits. A result rounded to 16 bits (a wrong overload) counts as absent."""
    ok = Overloads()
    good = dict(mm=lambda a, b, out_dtype, out: ok.mm_out_dtype(a, b, out),
                addmm=lambda acc, a, b, out_dtype, out: ok.addmm_out_dtype_(out, a, b))

    def reject(*args, **kwargs):
        raise RuntimeError("self and mat2 must have the same dtype")

    def rounded_mm(a, b, out_dtype, out):
        out.copy_((a.float() @ b.float() + 1e-3).to(torch.bfloat16))

    def rounded_addmm(acc, a, b, out_dtype, out):
        out.copy_((acc + a.float() @ b.float()).to(torch.bfloat16))

    probe = {"mm": torch_ops.probe_mm, "addmm": torch_ops.probe_addmm}[which]
    other = "addmm" if which == "mm" else "mm"
    monkeypatch.setattr(torch, which, good[which])
    monkeypatch.setattr(torch, other, reject)  # the other overload missing changes nothing
    assert probe("cpu", torch.bfloat16)
    monkeypatch.setattr(torch, which, reject)
    assert not probe("cpu", torch.bfloat16)
    monkeypatch.setattr(torch, which, rounded_mm if which == "mm" else rounded_addmm)
    assert not probe("cpu", torch.bfloat16)


# --------------------------------------------------------------------------------------- whole loss, each path

@pytest.mark.parametrize("mm,addmm", OUTCOMES, ids=IDS)
def test_loss_on_each_path_matches_float64(force, mm, addmm):
    """bf16 chunked loss (logits GEMM, dW accumulated over chunks) on the torch backend, each forced probe
    outcome, against the float64 oracle (a small budget: the temporaries come in several blocks)."""
    force(mm, addmm, budget=4 * 24 * 8)
    p = oracle.make_problem(B=3, T=7, H=24, V=37, seed=41, dtype=torch.bfloat16, bias=True, ref="given")
    fails = compare_bf16_run(p, dict(loss_type="dapo", beta=0.04), dict(strategy="chunked", backend="torch",
                                                                         chunk_size=5), f"[mm={mm} addmm={addmm}] ")
    assert not fails, "\n".join(fails)
