"""The C++ CPU chunk epilogue (grpo_kernels/csrc/chunk_epilogue.cpp via grpo_kernels.native) against float64 and
against the PyTorch path it replaces. Skipped, with the reason, only where the extension cannot be built on this
machine."""
import warnings

import pytest
import torch

from grpo_kernels import native, torch_ops

with warnings.catch_warnings(record=True) as _caught:
    warnings.simplefilter("always")
    _OK = native.available()
_WHY = "; ".join(str(w.message) for w in _caught) or "native extension not built"
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)


def rel(out, ref):
    assert torch.isfinite(out).all(), "non-finite output"
    ref = ref.double()
    assert ref.norm() > 0
    return ((out.double() - ref).norm() / ref.norm()).item()


def torch_path(fn, *args, **kwargs):
    """The PyTorch path of torch_ops.<fn>, with the native dispatch turned off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRPO_KERNELS_NATIVE", "0")
        return getattr(torch_ops, fn)(*args, **kwargs)


def make(m, v, scale, dtype, seed=0, int32=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, v, (m,), generator=gen)
    return x, (t.to(torch.int32) if int32 else t)


def ref_stats(x, t, temperature):
    z = x.double() / temperature
    lse = torch.logsumexp(z, 1)
    lp = z - lse[:, None]
    return lse, lp.gather(1, t.long()[:, None]).squeeze(1), -(lp.exp() * lp).sum(1)


def ref_dlogits(x, t, grad, temperature, gent=None):
    z = x.double() / temperature
    lp = torch.log_softmax(z, 1)
    p = lp.exp()
    ent = -(p * lp).sum(1, keepdim=True)
    onehot = torch.nn.functional.one_hot(t.long(), x.shape[1]).double()
    d = grad.double()[:, None] * (onehot - p)
    if gent is not None:
        d = d - gent.double()[:, None] * p * (lp + ent)
    return d / temperature


TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,v,scale,temperature", [(7, 37, 2.0, 1.0), (13, 1003, 3.0, 0.7), (5, 2051, 1e3, 1.3),
                                                   (3, 1, 1.0, 1.0)])
@pytest.mark.parametrize("int32", [False, True])
def test_stats_match_float64_and_the_torch_path(dtype, m, v, scale, temperature, int32):
    x, t = make(m, v, scale, dtype, int32=int32)
    assert native.chunk_stats(x, t, temperature, True) is not None  # the native path is the one tested
    lse, logp, ent = torch_ops.chunk_stats(x, t, temperature, True)
    r_lse, r_logp, r_ent = ref_stats(x, t, temperature)
    t_lse, t_logp, t_ent = torch_path("chunk_stats", x, t, temperature, True)
    assert lse.dtype == logp.dtype == ent.dtype == dtype and lse.shape == (m,)
    assert rel(lse, r_lse) <= TOL[dtype] and rel(lse, t_lse) <= TOL[dtype]
    # logp and entropy can be ~0 (v = 1, or |z| ~ 1e3: one token holds all the mass): compare absolutely too
    atol = 1e-4 * max(1.0, temperature) if dtype == torch.float32 else 1e-9
    assert (logp.double() - r_logp).abs().max() <= atol + TOL[dtype] * r_logp.abs().max()
    assert (logp.double() - t_logp.double()).abs().max() <= 2 * atol + TOL[dtype] * r_logp.abs().max()
    assert (ent.double() - r_ent).abs().max() <= atol + TOL[dtype] * r_ent.abs().max()
    _, _, none = torch_ops.chunk_stats(x, t, temperature, False)
    assert none is None


def test_stats_target_and_entropy_values_are_used():
    x, t = make(9, 101, 2.0, torch.float32)
    _, logp, ent = torch_ops.chunk_stats(x, t, 1.0, True)
    _, logp2, _ = torch_ops.chunk_stats(x, (t + 1) % 101, 1.0, True)
    assert (logp != logp2).all()
    assert (ent > 0).all() and (ent <= torch.log(torch.tensor(101.0)) + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,v,scale,temperature", [(11, 37, 2.0, 1.0), (9, 1003, 3.0, 0.7), (6, 517, 1e3, 1.3)])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_dlogits_match_float64_and_the_torch_path(dtype, m, v, scale, temperature, with_entropy):
    x, t = make(m, v, scale, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    grad = torch.randn(m, generator=gen)
    grad[::3] = 0.0  # masked-out rows: zero gradient, output must be zeros (or the entropy term alone)
    gent = torch.randn(m, generator=gen) if with_entropy else None
    lse, _, ent = torch_path("chunk_stats", x, t, temperature, True)
    kw = dict(entropy=ent, grad_entropy=gent) if with_entropy else {}
    buf = x.clone()
    out = torch_ops.chunk_dlogits_(buf, t, lse, grad, temperature, **kw)
    assert out is buf and out.dtype == dtype
    want = torch_path("chunk_dlogits_", x.clone(), t, lse, grad, temperature, **kw)
    ref = ref_dlogits(x, t, grad, temperature, gent)
    tol = 1e-4 if dtype == torch.float32 and scale >= 1e3 else TOL[dtype]  # |z| ~ 1e3: z - lse keeps 1e-4 abs
    assert rel(out, ref) <= tol and rel(out, want) <= tol
    if not with_entropy:
        assert torch.equal(out[::3], torch.zeros_like(out[::3]))


def test_dlogits_all_rows_masked_give_zeros():
    x, t = make(4, 77, 2.0, torch.float32)
    lse, _, _ = torch_ops.chunk_stats(x, t, 1.0, False)
    out = torch_ops.chunk_dlogits_(x, t, lse, torch.zeros(4), 1.0)
    assert torch.equal(out, torch.zeros(4, 77))


def test_row_strided_view_and_int32_targets_in_place():
    big, _ = make(10, 120, 2.0, torch.float32)
    x = big[1:8, :53]  # unit column stride, row stride 120
    t = torch.randint(0, 53, (7,), generator=torch.Generator().manual_seed(5)).to(torch.int32)
    lse, logp, _ = torch_ops.chunk_stats(x, t, 1.0, False)
    r_lse, r_logp, _ = ref_stats(x, t, 1.0)
    assert rel(lse, r_lse) <= 2e-5 and rel(logp, r_logp) <= 2e-5
    grad = torch.randn(7, generator=torch.Generator().manual_seed(6))
    before = big.clone()
    out = torch_ops.chunk_dlogits_(x, t, lse, grad, 1.0)
    assert out.data_ptr() == x.data_ptr()
    assert rel(out, ref_dlogits(before[1:8, :53], t, grad, 1.0)) <= 2e-5
    untouched = torch.ones_like(big, dtype=torch.bool)
    untouched[1:8, :53] = False
    assert torch.equal(big[untouched], before[untouched])  # nothing outside the view is written


def test_bad_targets_raise_before_writing():
    x, t = make(5, 41, 1.0, torch.float32)
    for bad in (41, -1):
        tb = t.clone()
        tb[2] = bad
        with pytest.raises(RuntimeError, match="out of bounds"):
            torch_ops.chunk_stats(x, tb, 1.0, False)
        buf = x.clone()
        with pytest.raises(RuntimeError, match="out of bounds"):
            torch_ops.chunk_dlogits_(buf, tb, torch.zeros(5), torch.ones(5), 1.0)
        assert torch.equal(buf, x)


def test_not_applicable_cases_fall_back_to_torch():
    x, t = make(6, 29, 2.0, torch.float32)
    lse = torch.logsumexp(x, 1)
    assert native.chunk_dlogits_(x.clone(), t, lse, torch.ones(6), 1.0, out_dtype=torch.bfloat16) is None
    assert native.chunk_stats(x.to(torch.bfloat16), t, 1.0, False) is None
    assert native.chunk_stats(x.t().contiguous().t(), t, 1.0, False) is None  # column-major
    leaf = x.clone().requires_grad_()
    assert native.chunk_stats(leaf, t, 1.0, False) is None  # autograd through the torch path stays intact
    packed = torch_ops.chunk_dlogits_(x.clone(), t, lse, torch.ones(6), 1.0, out_dtype=torch.bfloat16)
    assert packed.dtype == torch.bfloat16 and rel(packed.float(), ref_dlogits(x, t, torch.ones(6), 1.0)) < 1e-2


def test_switch_off_with_env(monkeypatch):
    x, t = make(3, 17, 1.0, torch.float32)
    monkeypatch.setenv("GRPO_KERNELS_NATIVE", "0")
    assert not native.enabled() and native.chunk_stats(x, t, 1.0, False) is None
    monkeypatch.setenv("GRPO_KERNELS_NATIVE", "1")
    assert native.enabled() and native.chunk_stats(x, t, 1.0, False) is not None


def test_whole_loss_same_with_and_without_native(monkeypatch):
    import grpo_kernels as gk
    gen = torch.Generator().manual_seed(7)
    B, T, H, V = 3, 11, 24, 301
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    ids = torch.randint(0, V, (B, T), generator=gen)
    adv = torch.randn(B, generator=gen)
    mask = torch.ones(B, T)
    mask[1, 7:] = 0

    def run():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, *_ = gk.fused_linear_grpo_loss(h, w, ids, mask, adv, temperature=0.9, strategy="chunked",
                                             backend="torch")
        loss.backward()
        return loss.detach(), h.grad, w.grad

    got = run()
    monkeypatch.setenv("GRPO_KERNELS_NATIVE", "0")
    want = run()
    for a, b in zip(got, want):
        assert rel(a, b) <= 1e-5


def test_differentiable_entropy_same_with_and_without_native(monkeypatch):
    import grpo_kernels as gk
    gen = torch.Generator().manual_seed(8)
    N, H, V = 19, 16, 257
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    bias = torch.randn(V, generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    up_logp, up_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)

    def run():
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        logp, ent = gk.linear_logprobs(h, w, targets, b, temperature=0.8, return_entropy=True, backend="torch",
                                       strategy="chunked", chunk_size=7)
        ((logp * up_logp).sum() + (ent * up_ent).sum()).backward()
        return logp.detach(), ent.detach(), h.grad, w.grad, b.grad

    got = run()
    monkeypatch.setenv("GRPO_KERNELS_NATIVE", "0")
    want = run()
    for a, b in zip(got, want):
        assert rel(a, b) <= 1e-5


def _fresh_process(code: str, tmp_path, **env):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    full = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": str(root), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=root,
                          timeout=300)


def test_no_compiler_warns_once_and_uses_the_torch_path(tmp_path):
    code = ("import torch, warnings\n"
            "from grpo_kernels import native, torch_ops\n"
            "x = torch.randn(4, 33); t = torch.randint(0, 33, (4,))\n"
            "a = torch_ops.chunk_stats(x, t, 1.0, False); b = torch_ops.chunk_stats(x, t, 1.0, False)\n"
            "print('ok', native.available(), torch.allclose(a[0], torch.logsumexp(x, 1)))\n")
    res = _fresh_process(code, tmp_path, CXX="no-such-compiler-grpo")  # empty extensions dir: would need a build
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok False True"
    warned = [ln for ln in res.stderr.splitlines() if "native CPU epilogue unavailable" in ln]
    assert len(warned) == 1 and "no C++ compiler" in warned[0]


def test_failed_build_warns_once_and_uses_the_torch_path(tmp_path):
    code = ("import torch\n"
            "from grpo_kernels import native, torch_ops\n"
            "x = torch.randn(4, 33); t = torch.randint(0, 33, (4,))\n"
            "a = torch_ops.chunk_stats(x, t, 1.0, False); b = torch_ops.chunk_stats(x, t, 1.0, False)\n"
            "print('ok', native.available(), torch.allclose(a[0], torch.logsumexp(x, 1)))\n")
    for attempt in ("build fails", "earlier failure remembered"):
        res = _fresh_process(code, tmp_path, CXX="false")  # a "compiler" that always fails
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "ok False True"
        warned = [ln for ln in res.stderr.splitlines() if "native CPU epilogue unavailable" in ln]
        assert len(warned) == 1, res.stderr
        building = [ln for ln in res.stderr.splitlines() if "building the native" in ln]
        assert len(building) == (1 if attempt == "build fails" else 0), (attempt, res.stderr)


def test_no_ninja_warns_once_and_uses_the_torch_path(tmp_path):
    import os
    import shutil
    gxx = shutil.which(os.environ.get("CXX", "c++"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "c++").symlink_to(gxx)
    code = ("import sys, torch\n"
            "sys.modules['ninja'] = None  # hide the pip package too\n"
            "from grpo_kernels import native, torch_ops\n"
            "x = torch.randn(4, 33); t = torch.randint(0, 33, (4,))\n"
            "a = torch_ops.chunk_stats(x, t, 1.0, False)\n"
            "print('ok', native.available(), torch.allclose(a[0], torch.logsumexp(x, 1)))\n")
    res = _fresh_process(code, tmp_path, PATH=str(bindir), CXX="c++")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok False True"
    warned = [ln for ln in res.stderr.splitlines() if "native CPU epilogue unavailable" in ln]
    assert len(warned) == 1 and "no `ninja`" in warned[0], res.stderr
