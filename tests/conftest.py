"""Shared test setup.

Without CUDA, Triton kernels can only run under the interpreter, and TRITON_INTERPRET is read when the
triton-decorated modules are imported: set it here, before any test module imports grpo_kernels or triton.
"""

import datetime
import math
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402

import oracle  # noqa: E402  (plain torch; no triton import)

TINY = torch.finfo(torch.float64).tiny


def rel_err(a, b):
    """||a - b|| / max(||b||, tiny) in float64. NaN/inf anywhere in ``a`` or ``b`` fails the test outright."""
    a = torch.as_tensor(a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(b).detach().to("cpu", torch.float64)
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != expected {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"non-finite values in result: {a.flatten()[:8].tolist()}"
    assert torch.isfinite(b).all(), f"non-finite values in reference: {b.flatten()[:8].tolist()}"
    return ((a - b).norm() / max(b.norm().item(), TINY)).item()


def pytest_terminal_summary(terminalreporter):
    """The versions the run used, after the results (also under -q, which hides the header); an optional package
    shows 'not installed', and its tests skip with the reason."""
    from importlib import metadata

    names = ("torch", "triton", "transformers", "trl", "peft", "liger-kernel", "accelerate", "datasets")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    terminalreporter.write_line("packages: " + ", ".join(found))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The kernel tests (and the tiny-model trainer tests) run thousands of tiny ops: intra-op threads only add
# spin-wait overhead there (100x on a loaded 2-core machine), so these files run single-threaded; others keep
# torch's default.
_SINGLE_THREAD_FILES = {"test_oracle.py", "test_reference.py", "test_fused_linear_grpo.py", "test_linear_logprobs.py",
                        "test_grpo_loss.py", "test_bad_input.py", "test_properties.py", "test_liger_parity.py",
                        "test_trainer.py", "test_checkpoint.py"}


@pytest.fixture(autouse=True)
def _single_thread_for_tiny_ops(request):
    if request.path.name not in _SINGLE_THREAD_FILES:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def seed():
    """Seeds torch's global RNG (for code under test that draws from it) and returns the seed."""
    torch.manual_seed(1234)
    return 1234


@pytest.fixture
def rng(seed):
    """A seeded torch.Generator for building inputs."""
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ package vs oracle helpers
# Tolerances (docs/design.md, "Testing rules"): relative norm error against float64.
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
METRIC_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
GRAD_KEYS = ("hidden", "weight", "bias")


def leaf_copies(problem):
    """(args, leaves): the problem with fresh leaf copies of hidden / weight / bias that require grad."""
    args = dict(problem)
    leaves = {}
    for k in GRAD_KEYS:
        if args.get(k) is not None:
            leaves[k] = args[k].detach().clone().requires_grad_(True)
            args[k] = leaves[k]
    return args, leaves


def package_run(problem, fn=None, grad_output=1.0, **opts):
    """Run the package on fresh leaf copies of the problem; returns (loss, metrics, grads dict)."""
    import grpo_kernels as gk

    fn = fn or gk.fused_linear_grpo_loss
    args, leaves = leaf_copies(problem)
    loss, metrics = fn(**args, **opts)
    assert loss.requires_grad, "loss has no grad_fn"
    (loss * grad_output).backward()
    grads = {k: v.grad for k, v in leaves.items()}
    return loss.detach(), metrics, grads


def expected_metrics(loss_type, oracle_metrics, beta, compute_entropy):
    """The package's LossMetrics fields expected from the oracle's TRL metrics (cispo: low = 0, high = region =
    TRL's cispo_clip_ratio; sapo/vespo: no clipping, all 0)."""
    o = oracle_metrics
    if o["clip_ratio_low"] is not None:
        clip = {k: o[k] for k in ("clip_ratio", "clip_ratio_low", "clip_ratio_high")}
    elif loss_type == "cispo":
        clip = dict(clip_ratio=o["clip_ratio"], clip_ratio_low=0.0, clip_ratio_high=o["clip_ratio"])
    else:
        clip = dict(clip_ratio=0.0, clip_ratio_low=0.0, clip_ratio_high=0.0)
    out = dict(clip, kl=o["kl"] if beta != 0.0 else None, entropy=o["entropy"] if compute_entropy else None)
    return out


def compare_metrics(metrics, expected, tol, label=""):
    """List of mismatch descriptions (empty when all agree); also checks Liger's positional layout."""
    fails = []
    for k, v in expected.items():
        got = getattr(metrics, k)
        if v is None:
            if got is not None:
                fails.append(f"{label}metric {k}: expected None, got {got}")
            continue
        if got is None:
            fails.append(f"{label}metric {k}: got None, expected {float(v):.6g}")
            continue
        if got.dim() != 0 or got.dtype != torch.float32:
            fails.append(f"{label}metric {k}: shape {tuple(got.shape)} dtype {got.dtype}, expected 0-d float32")
        g = float(got)
        if not math.isfinite(g) or abs(g - float(v)) > tol * max(1.0, abs(float(v))):
            fails.append(f"{label}metric {k}: got {g:.8g}, expected {float(v):.8g}")
    layout = (metrics.clip_ratio,) if expected["kl"] is None else (metrics.kl, metrics.clip_ratio)
    if len(metrics) != len(layout) or any(a is not b for a, b in zip(metrics, layout)):
        fails.append(f"{label}metrics tuple layout: expected (kl?, clip_ratio), got {tuple(metrics)}")
    return fails


def compare_bf16_run(problem, opts, run_opts, label=""):
    """bf16 run against float64, within DESIGN's 1e-2 or twice what rounding the logits to bf16 once costs on this
    very problem, whichever is larger (our logits are fp32, but dL/dlogits is a bf16 GEMM operand; TRL's and
    Liger's bf16 paths round the logits themselves). Checks the loss is fp32 and the grads bf16. Returns a list of
    failure strings."""
    e_loss, e_metrics, e_grads = oracle.oracle_run(problem, **opts)  # float64 on the problem's device
    r_loss, _, r_grads = oracle.oracle_run(problem, logit_dtype=torch.bfloat16, **opts)
    loss, metrics, grads = package_run(problem, **opts, **run_opts)
    fails = []
    for name, got, exact, rounded in [("loss", loss, e_loss, r_loss)] + [
            (f"grad {k}", grads[k], e_grads[k], r_grads[k]) for k in e_grads]:
        budget = max(1e-2, 2 * rel_err(rounded, exact))
        err = rel_err(got, exact)
        if err > budget:
            fails.append(f"{label}{name}: rel err {err:.2e} > budget {budget:.2e}")
        if got.dtype != (torch.float32 if name == "loss" else torch.bfloat16):
            fails.append(f"{label}{name}: dtype {got.dtype}")
    # clip flags sit on thresholds: a bf16 rounding may flip one token of the ~12 (1/12 ~ 0.08)
    fails += compare_metrics(metrics, expected_metrics(opts.get("loss_type", "dapo"), e_metrics,
                                                       opts.get("beta", 0.0), run_opts.get("compute_entropy", False)),
                             0.1, label)
    return fails


def compare_run(problem, opts, run_opts, oracle_result, *, tol, metric_tol, label=""):
    """Compare one package run with a precomputed oracle result; returns a list of failure strings."""
    o_loss, o_metrics, o_grads = oracle_result
    fails = []
    try:
        loss, metrics, grads = package_run(problem, **opts, **run_opts)
    except Exception as e:  # report which configuration raised, then keep checking the others
        return [f"{label}raised {type(e).__name__}: {e}"]
    if loss.dim() != 0:
        fails.append(f"{label}loss shape {tuple(loss.shape)}")
    try:
        e = rel_err(loss, o_loss)
        if e > tol:
            fails.append(f"{label}loss rel err {e:.2e} (got {float(loss):.8g}, expected {float(o_loss):.8g})")
    except AssertionError as err:
        fails.append(f"{label}loss: {err}")
    for k, ref in o_grads.items():
        g = grads.get(k)
        if g is None:
            fails.append(f"{label}grad {k}: missing")
            continue
        if g.dtype != problem[k].dtype or g.shape != problem[k].shape:
            fails.append(f"{label}grad {k}: dtype/shape {g.dtype}{tuple(g.shape)} != {problem[k].dtype}"
                         f"{tuple(problem[k].shape)}")
        try:
            e = rel_err(g, ref)
            if e > tol:
                fails.append(f"{label}grad {k} rel err {e:.2e}")
        except AssertionError as err:
            fails.append(f"{label}grad {k}: {err}")
    beta = opts.get("beta", 0.0)
    entropy_on = {**opts, **run_opts}.get("compute_entropy", False)
    exp = expected_metrics(opts.get("loss_type", "dapo"), o_metrics, beta, entropy_on)
    fails += compare_metrics(metrics, exp, metric_tol, label)
    return fails


@pytest.fixture
def one_rank_group():
    """A single-process gloo group: the vocab-parallel path with its collectives, in this process."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
