"""CUDA tests (skipped without a GPU): the Triton kernels compiled for real, fp32 and bf16, against float64."""

import pytest
import torch

import oracle
from conftest import METRIC_TOL, compare_bf16_run, compare_run, rel_err
from test_fused_linear_grpo import TRITON_CASES, build_case

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _to(problem, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in problem.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strategy,k,case", TRITON_CASES, ids=[f"{s}-{k}" for s, k, _ in TRITON_CASES])
def test_matrix_subset_on_cuda(strategy, k, case, dtype):
    problem, opts, run = build_case(k, *case, B=4, T=7, H=40, V=70)
    problem = _to(problem, DEV)
    for key in ("hidden", "weight", "bias", "ref_input", "ref_weight", "ref_bias"):
        if problem.get(key) is not None:
            problem[key] = problem[key].to(dtype)
    run = dict(run, strategy=strategy, backend="triton")
    label = f"[cuda {dtype} {strategy} {run} {opts}] "
    if dtype == torch.float32:
        expected = oracle.oracle_run(problem, **opts)
        fails = compare_run(problem, opts, run, expected, tol=1e-4, metric_tol=METRIC_TOL[dtype], label=label)
    else:
        fails = compare_bf16_run(problem, opts, run, label)
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strategy", ["chunked", "fused"])
@pytest.mark.parametrize("lt,lv", [("dapo", "token"), ("grpo", "sequence"), ("vespo", "token")])
def test_realistic_shape(dtype, strategy, lt, lv):
    """Production block sizes: N = 2048 tokens, H = 512, odd V = 32003; oracle in float64 on the GPU."""
    p = oracle.make_problem(B=8, T=256, H=512, V=32003, seed=3, bias=False, ref="given", vllm=True, dtype=dtype)
    opts = dict(loss_type=lt, importance_sampling_level=lv, beta=0.04, temperature=0.9)
    run = dict(strategy=strategy, backend="auto", compute_entropy=True)
    p = _to(p, DEV)
    if dtype == torch.float32:
        expected = oracle.oracle_run(p, **opts)
        fails = compare_run(p, opts, run, expected, tol=1e-4, metric_tol=1e-5, label=f"[{strategy}] ")
    else:
        fails = compare_bf16_run(p, opts, run, f"[{strategy}] ")
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_more_than_65535_tokens(dtype):
    """N = 70000 active rows: more rows than a 16-bit grid dimension (65535) could index one per program."""
    B, T, H, V = 10, 7000, 32, 64
    p = _to(oracle.make_problem(B=B, T=T, H=H, V=V, seed=4, bias=True, ref="given", dtype=dtype, mask="full"), DEV)
    assert int(p["attention_mask"].sum()) == B * T > 65535
    opts = dict(loss_type="dapo", beta=0.04)
    run = dict(strategy="fused", backend="triton", compute_entropy=True)
    if dtype == torch.float32:
        expected = oracle.oracle_run(p, **opts)
        fails = compare_run(p, opts, run, expected, tol=1e-4, metric_tol=1e-5)
    else:
        fails = compare_bf16_run(p, opts, run, "")
    assert not fails, "\n".join(fails)


def test_auto_backend_is_triton_on_cuda():
    import grpo_kernels as gk

    p = _to(oracle.make_problem(seed=5, bias=True, ref="given"), DEV)
    l_auto, m_auto = gk.fused_linear_grpo_loss(**p, beta=0.1, strategy="fused")
    l_tri, m_tri = gk.fused_linear_grpo_loss(**p, beta=0.1, strategy="fused", backend="triton")
    l_tor, _ = gk.fused_linear_grpo_loss(**p, beta=0.1, strategy="fused", backend="torch")
    from grpo_kernels.backends import resolve_backend

    assert resolve_backend("auto", p["hidden"].device, p["hidden"].dtype) == "triton"
    assert rel_err(l_auto, l_tri) < 1e-6 and rel_err(m_auto.kl, m_tri.kl) < 1e-6
    assert rel_err(l_tor, l_tri) < 1e-5


def test_linear_logprobs_on_cuda():
    import grpo_kernels as gk

    g = torch.Generator().manual_seed(6)
    h = torch.randn(300, 96, generator=g)
    W = torch.randn(1001, 96, generator=g) / 8
    y = torch.randint(0, 1001, (300,), generator=g)
    e_lp, e_ent = oracle.logprobs(h, W, y)
    for strategy in ("chunked", "fused"):
        lp, ent = gk.linear_logprobs(h.to(DEV), W.to(DEV), y.to(DEV), return_entropy=True, strategy=strategy)
        assert rel_err(lp, e_lp) < 1e-5 and rel_err(ent, e_ent) < 1e-5, strategy
