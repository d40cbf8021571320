"""CUDA tests (skipped without a GPU): the Triton kernels compiled for real, fp32 and bf16, against float64."""

import pytest
import torch

import oracle
from conftest import METRIC_TOL, compare_bf16_run, compare_run, package_run, rel_err

import grpo_kernels as gk
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


# ------------------------------------------------------------------------------------ production shapes (issue 7)
# Llama-3 (V = 128256) and Qwen2 (V = 151936) vocabularies, both divisible by 16 (the epilogue's vector-load
# variant), H = 4096, N = 16k tokens. The reference is fp32 PyTorch on the very same (bf16) inputs, computed in row
# blocks; TF32 is off so that it is a true fp32 reference.

@pytest.fixture
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _lm_head(N, H, V, seed, dtype=torch.bfloat16, scale=3.0):
    """Hidden [N, H], weight [V, H] (logits of std ~scale) and targets, made on the GPU."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    h = torch.randn(N, H, device=DEV, generator=g).to(dtype)
    W = (torch.randn(V, H, device=DEV, generator=g) * (scale / H ** 0.5)).to(dtype)
    y = torch.randint(0, V, (N,), device=DEV, generator=g)
    return h, W, y


def _ref_stats(h, W, y, temperature=1.0, block=4096, rows=None):
    """fp32 lse, logp, entropy of the given rows (all by default), block by block."""
    W32 = W.float()
    idx = torch.arange(h.shape[0], device=DEV) if rows is None else rows
    out = []
    for s in range(0, idx.numel(), block):
        r = idx[s:s + block]
        z = (h.index_select(0, r).float() @ W32.T) / temperature
        lse = torch.logsumexp(z, -1)
        logp = z.gather(1, y.index_select(0, r).unsqueeze(1)).squeeze(1) - lse
        ent = lse - (torch.softmax(z, -1) * z).sum(-1)
        out.append(torch.stack([lse, logp, ent]))
        del z
    return torch.cat(out, 1)


def _ref_grads(h, W, y, g, temperature, block=4096):
    """fp32 dH [N, H] and dW [V, H] of sum_t g_t logp_t (g = dL/dlogp per token)."""
    W32 = W.float()
    dH = torch.empty(h.shape, dtype=torch.float32, device=DEV)
    dW = torch.zeros(W.shape, dtype=torch.float32, device=DEV)
    for s in range(0, h.shape[0], block):
        h32 = h[s:s + block].float()
        z = (h32 @ W32.T) / temperature
        dz = torch.softmax(z, -1).mul_(-g[s:s + block, None])
        dz.scatter_add_(1, y[s:s + block, None], g[s:s + block, None])
        dz /= temperature
        dH[s:s + block] = dz @ W32
        dW += dz.T @ h32
        del z, dz
    return dH, dW


def _loss_problem(h, W, y, B, T, seed, temperature, full_mask=False):
    """A GRPO batch on these rows: ragged masks (or full ones), per-sequence advantages, given reference log-probs;
    plus the fp32 reference loss, metrics and dL/dlogp from the float64 oracle applied to fp32 reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.full((B,), T) if full_mask else torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    adv = torch.randn(B, generator=g)
    stats = _ref_stats(h, W, y, temperature)
    logp_ref = stats[1].reshape(B, T).double().cpu()
    ref = (logp_ref + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    leaf = logp_ref.clone().requires_grad_(True)
    opts = dict(loss_type="dapo", beta=0.04, temperature=temperature)
    e_loss, e_metrics = oracle.grpo_loss(leaf, mask, adv, None, ref, entropy=stats[2].reshape(B, T).double().cpu(),
                                         **opts)
    (e_g,) = torch.autograd.grad(e_loss, leaf)
    problem = dict(selected_token_ids=y.reshape(B, T), attention_mask=mask.to(DEV), advantages=adv.to(DEV),
                   ref_per_token_logps=ref.to(DEV))
    return problem, opts, e_loss, e_metrics, e_g.reshape(-1).float().to(DEV)


@pytest.mark.parametrize("V", [128256, 151936])
def test_production_vocab_stats_loss_and_grads(V, no_tf32):
    """bf16, H = 4096, N = 16384: chunk epilogue on fp32 logits, fused stats, and the loss with its gradients by
    both strategies, against fp32 PyTorch on the same inputs."""
    _check_stats_loss_grads(16, 1024, 4096, V, 4096, torch.bfloat16)


def _check_stats_loss_grads(B, T, H, V, chunk_rows, dtype):
    from grpo_kernels import kernels

    temperature = 0.8
    h, W, y = _lm_head(B * T, H, V, seed=V, dtype=dtype)
    ref = _ref_stats(h, W, y, temperature)
    # chunk epilogue on a 4096-row fp32 buffer (the chunked strategy's buffer for every input dtype)
    z = h[:chunk_rows].float() @ W.float().T
    lse, logp, ent = kernels.chunk_stats(z, y[:chunk_rows], temperature, True)
    del z
    for name, got, exp in (("lse", lse, ref[0, :chunk_rows]), ("logp", logp, ref[1, :chunk_rows]),
                           ("entropy", ent, ref[2, :chunk_rows])):
        assert rel_err(got, exp) < 1e-5, f"chunk_stats {name}: {rel_err(got, exp):.2e}"
    lse, logp, ent = kernels.fused_linear_stats(h, W, None, y, temperature, True)
    for name, got, exp in (("lse", lse, ref[0]), ("logp", logp, ref[1]), ("entropy", ent, ref[2])):
        assert rel_err(got, exp) < 1e-4, f"fused_linear_stats {name}: {rel_err(got, exp):.2e}"
    del ref

    problem, opts, e_loss, e_metrics, e_g = _loss_problem(h, W, y, B, T, seed=V + 1, temperature=temperature)
    e_dH, e_dW = _ref_grads(h, W, y, e_g, temperature)
    for strategy in ("chunked", "fused"):
        hl, Wl = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        loss, metrics = gk.fused_linear_grpo_loss(hl.reshape(B, T, H), Wl, **problem, **opts, strategy=strategy,
                                                  compute_entropy=True)
        loss.backward()
        label = f"[V={V} {strategy}]"
        assert rel_err(loss, e_loss) < 1e-4, f"{label} loss {float(loss)} vs {float(e_loss)}"
        assert rel_err(metrics.kl, e_metrics["kl"]) < 1e-4, label
        assert rel_err(metrics.entropy, e_metrics["entropy"]) < 1e-4, label
        assert rel_err(hl.grad.float(), e_dH) < 1e-2, f"{label} dH {rel_err(hl.grad.float(), e_dH):.2e}"
        assert rel_err(Wl.grad.float(), e_dW) < 1e-2, f"{label} dW {rel_err(Wl.grad.float(), e_dW):.2e}"
        assert hl.grad.dtype == Wl.grad.dtype == dtype
        del hl, Wl, loss, metrics


def test_chunk_buffer_past_int32_offsets():
    """A [17000, 128256] fp32 chunk buffer holds 2.18e9 > 2**31 elements: rows past the int32 boundary must be
    read and written at their own offsets (int64 address arithmetic)."""
    _check_big_buffer(17000, 128256, 2**31 // 128256)


def _check_big_buffer(M, V, boundary):
    from grpo_kernels import kernels

    temperature = 0.9
    g = torch.Generator(device=DEV).manual_seed(17)
    logits = torch.randn(M, V, device=DEV, generator=g).mul_(3.0)
    y = torch.randint(0, V, (M,), device=DEV, generator=g)
    grad = torch.randn(M, device=DEV, generator=g)
    lse, logp, ent = kernels.chunk_stats(logits, y, temperature, True)
    for s in range(0, M, 2048):  # reference block by block
        z = logits[s:s + 2048] / temperature
        e_lse = torch.logsumexp(z, -1)
        e_logp = z.gather(1, y[s:s + 2048, None]).squeeze(1) - e_lse
        e_ent = e_lse - (torch.softmax(z, -1) * z).sum(-1)
        assert rel_err(lse[s:s + 2048], e_lse) < 1e-5, s
        assert rel_err(logp[s:s + 2048], e_logp) < 1e-5, s
        assert rel_err(ent[s:s + 2048], e_ent) < 1e-5, s
        del z
    rows = torch.cat([torch.arange(0, 64), torch.arange(boundary - 32, boundary + 32), torch.arange(M - 64, M)]).to(DEV)
    z = logits.index_select(0, rows) / temperature
    e_dz = torch.softmax(z, -1).mul_(-grad[rows, None])
    e_dz.scatter_add_(1, y[rows, None], grad[rows, None])
    e_dz /= temperature
    kernels.chunk_dlogits_(logits, y, lse, grad, temperature)
    assert rel_err(logits.index_select(0, rows), e_dz) < 1e-5


def test_fused_70k_tokens_extra_memory_is_linear_in_tokens(no_tf32):
    """N = 70000 active tokens through the fused strategy at H = 4096, V = 128256 (bf16): the loss and a sample of
    dH rows match fp32 PyTorch, and the memory the call adds is O(N) + O(V*H): far below the 36 GB of fp32 logits."""
    _check_fused_long(10, 7000, 4096, 128256)


def _check_fused_long(B, T, H, V, check_memory=True):
    temperature = 1.0
    N = B * T
    h, W, y = _lm_head(N, H, V, seed=70)
    # every token active: N > 65535 rows in the GEMMs
    problem, opts, e_loss, _, e_g = _loss_problem(h, W, y, B, T, seed=71, temperature=temperature, full_mask=True)
    hl, Wl = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    del h
    if check_memory:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    loss, _ = gk.fused_linear_grpo_loss(hl.reshape(B, T, H), Wl, **problem, **opts, strategy="fused")
    loss.backward()
    if check_memory:
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        bound = 3 * V * H * 4 + 16 * N * H + 256 * N + (512 << 20)  # dW fp32 + its cast; copies of h, dH; O(N)
        assert extra <= bound, f"extra memory {extra / 2**30:.2f} GiB > {bound / 2**30:.2f} GiB"
        assert extra < N * V * 4 // 3
    assert rel_err(loss, e_loss) < 1e-4
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(72))[:256].to(DEV)
    e_dH, _ = _ref_grads(hl.detach()[rows], W, y[rows], e_g[rows], temperature)
    assert rel_err(hl.grad[rows].float(), e_dH) < 1e-2


def test_bf16_chunked_and_fused_agree_at_production_shape():
    """Same bf16 inputs, both strategies: fp32 logits on both paths, so loss and metrics agree to fp32 precision;
    gradients to bf16 precision (each rounds dL/dlogits to bf16 for its GEMMs). Sequence level, on-policy
    (ratio exactly 1: no clip decision can flip between the two)."""
    _check_agreement(4, 1024, 4096, 151936)


def _check_agreement(B, T, H, V):
    h, W, y = _lm_head(B * T, H, V, seed=5)
    g = torch.Generator().manual_seed(6)
    problem = dict(selected_token_ids=y.reshape(B, T), attention_mask=torch.ones(B, T, device=DEV),
                   advantages=torch.randn(B, generator=g).to(DEV),
                   ref_per_token_logps=(-8 + torch.randn(B, T, generator=g)).to(DEV))
    opts = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, temperature=0.8,
                compute_entropy=True)
    out = {}
    for strategy in ("chunked", "fused"):
        hl, Wl = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        loss, metrics = gk.fused_linear_grpo_loss(hl.reshape(B, T, H), Wl, **problem, **opts, strategy=strategy)
        loss.backward()
        out[strategy] = (loss.detach(), metrics, hl.grad, Wl.grad)
    (lc, mc, hc, wc), (lf, mf, hf, wf) = out["chunked"], out["fused"]
    assert rel_err(lc, lf) < 1e-4
    assert rel_err(mc.kl, mf.kl) < 1e-4 and rel_err(mc.entropy, mf.entropy) < 1e-4
    assert rel_err(hc.float(), hf.float()) < 1e-2 and rel_err(wc.float(), wf.float()) < 1e-2


# ------------------------------------------------------------------------------ device, syncs, recompiles (issue 7)

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_inputs_on_a_device_that_is_not_current():
    """cuda:1 inputs while cuda:0 is current: every launch must go to cuda:1 (else illegal memory access)."""
    p = oracle.make_problem(B=3, T=40, H=64, V=999, seed=8, bias=True, ref="given")
    torch.cuda.set_device(0)
    results = {}
    for dev in ("cuda:0", "cuda:1"):
        q = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
        for strategy in ("chunked", "fused"):
            loss, _, grads = package_run(q, beta=0.04, strategy=strategy, backend="triton", compute_entropy=True)
            lp = gk.linear_logprobs(q["hidden"], q["weight"], q["selected_token_ids"], strategy=strategy)
            torch.cuda.synchronize(dev)
            results[dev, strategy] = (loss.cpu(), grads["hidden"].cpu(), grads["weight"].cpu(), lp.cpu())
    assert torch.cuda.current_device() == 0
    for strategy in ("chunked", "fused"):
        for a, b in zip(results["cuda:0", strategy], results["cuda:1", strategy]):
            assert rel_err(a, b) < 1e-5, strategy


@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_no_syncs_besides_the_plans_one(strategy, monkeypatch):
    """With torch.cuda.set_sync_debug_mode("error"), any host-device sync raises, except inside the plan's one
    documented sync point (plan._to_host), which must run exactly once per call, whatever the number of chunks."""
    from grpo_kernels import plan

    calls = []
    real = plan._to_host

    def to_host(t):
        calls.append(1)
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real(t)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(plan, "_to_host", to_host)
    p = _to(oracle.make_problem(B=6, T=50, H=64, V=1003, seed=9, bias=True, ref="given", vllm=True,
                                num_items="tensor"), DEV)
    cases = [dict(loss_type=lt, importance_sampling_level=lv, chunk_size=c)
             for lt, lv, c in (("dapo", "token", 64), ("vespo", "token", 64), ("grpo", "sequence", 64),
                               ("sapo", "token", 64), ("dapo", "token", None))]  # None: sized from free memory
    for case in cases:
        kw = dict(case, beta=0.04, strategy=strategy, compute_entropy=True, validate=True)
        for debug in (0, "error"):  # warm-up first (compiles, allocator growth), then the checked call
            torch.cuda.synchronize()
            calls.clear()
            torch.cuda.set_sync_debug_mode(debug)
            try:
                package_run(p, **kw)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert len(calls) == 1, (case, len(calls))
    # grpo_loss: the plan's one sync; linear_logprobs without validation: none
    logp = p["old_per_token_logps"].clone().requires_grad_(True)
    h = p["hidden"].clone().requires_grad_(True)
    for debug in (0, "error"):
        torch.cuda.synchronize()
        calls.clear()
        torch.cuda.set_sync_debug_mode(debug)
        try:
            loss, _ = gk.grpo_loss(logp, p["attention_mask"], p["advantages"], loss_type="dapo",
                                   num_items_in_batch=p["num_items_in_batch"])
            loss.backward()
            lp = gk.linear_logprobs(h, p["weight"], p["selected_token_ids"], strategy=strategy, validate=False)
            lp.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert len(calls) == 1
    torch.cuda.synchronize()


def _compiled_variants(kernel):
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        return sum(len(c[0]) for c in caches.values())
    return sum(len(c) for c in kernel.cache.values())  # older Triton


def test_changing_token_counts_do_not_recompile():
    """Token counts differ every step; each kernel compiles once for them (M == 1, M % 16 == 0 and odd M alike)."""
    from grpo_kernels import kernels
    from grpo_kernels.kernels import chunk_epilogue, fused_backward, fused_forward

    g = torch.Generator(device=DEV).manual_seed(10)
    H, V = 256, 5000
    W = torch.randn(V, H, device=DEV, generator=g, dtype=torch.bfloat16) / 16

    def step(M):
        h = torch.randn(M, H, device=DEV, generator=g, dtype=torch.bfloat16)
        y = torch.randint(0, V, (M,), device=DEV, generator=g)
        lse, _, _ = kernels.fused_linear_stats(h, W, None, y, 1.0, True)
        kernels.fused_linear_backward(h, W, None, y, lse, torch.randn(M, device=DEV, generator=g), 1.0,
                                      True, True, False)
        z = h.float() @ W.float().T
        l2, _, _ = kernels.chunk_stats(z, y, 1.0, True)
        kernels.chunk_dlogits_(z, y, l2, torch.randn(M, device=DEV, generator=g), 1.0)

    ks = [fused_forward._fused_stats_kernel, fused_forward._combine_kernel, fused_backward._fused_backward_kernel,
          chunk_epilogue._chunk_stats_kernel, chunk_epilogue._chunk_dlogits_kernel]
    step(37)
    before = [_compiled_variants(k) for k in ks]
    for M in (1, 16, 48, 333, 1024, 1031):
        step(M)
    torch.cuda.synchronize()
    assert [_compiled_variants(k) for k in ks] == before


# ------------------------------------------------------------------------------------ GPU hardening (issue 15)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_output_gemm_fast_path_on_torch_2_8(dtype, recwarn):
    """torch >= 2.8 has mm(out_dtype=fp32) and the in-place addmm(out_dtype=fp32, out=acc) on CUDA: the logits
    and the dW accumulation take them (one cuBLAS call each), never the slice-wise upcast, and nothing warns."""
    from grpo_kernels import torch_ops

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 8):
        pytest.skip(f"torch {torch.__version__} < 2.8 has no out_dtype overloads")
    cap = torch_ops.fp32_gemm("cuda", dtype)
    assert cap.mm, f"torch {torch.__version__}: mm(out_dtype=fp32) probe failed for {dtype}"
    assert cap.addmm, f"torch {torch.__version__}: in-place addmm(out_dtype=fp32) probe failed for {dtype}"
    a = torch.randn(64, 128, device=DEV).to(dtype)
    b = torch.randn(128, 96, device=DEV).to(dtype)
    acc = torch.zeros(64, 96, device=DEV)
    torch_ops.gemm_into(acc, a, b, accumulate=True)
    torch_ops.gemm_into(torch.empty(64, 96, device=DEV), a, b)
    assert not [w for w in recwarn.list if "grpo_kernels" in str(w.message)]


def test_fused_backward_launches_the_devices_first_config():
    """The tile kernels/configs.py picks for this device launches as is: no OutOfResources fallback needed."""
    from grpo_kernels.kernels import configs, fused_backward

    lim = configs.device_limits(torch.device(DEV))
    for dtype in (torch.bfloat16, torch.float32):
        p = _to(oracle.make_problem(B=4, T=64, H=128, V=1000, seed=15, dtype=dtype), DEV)
        fused_backward._chosen.clear()
        loss, _, grads = package_run(p, strategy="fused", backend="triton")
        key = (str(p["hidden"].device), dtype, False)
        assert fused_backward._chosen.get(key) == 0, (lim, fused_backward._chosen)
        assert torch.isfinite(grads["weight"]).all()


@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_autocast_changes_nothing_on_cuda(strategy):
    p = _to(oracle.make_problem(B=4, T=33, H=64, V=1000, seed=16, dtype=torch.bfloat16, ref="given"), DEV)
    opts = dict(strategy=strategy, backend="triton", beta=0.04, chunk_size=48)
    want = package_run(p, **opts)
    with torch.autocast("cuda", torch.bfloat16):
        got = package_run(p, **opts)
    assert torch.equal(got[0], want[0]) and all(torch.equal(got[2][k], want[2][k]) for k in want[2])


@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_nan_hidden_reaches_loss_and_gradients_on_cuda(strategy):
    """One-row epilogue programs and 128-row backward blocks on the GPU: a NaN live row is computed, not skipped."""
    p = _to(oracle.make_problem(B=4, T=40, H=64, V=1000, seed=17, dtype=torch.bfloat16, old=False, ref=None,
                                mask="full"), DEV)
    p["hidden"][1, 3, 5] = float("nan")
    loss, _, grads = package_run(p, strategy=strategy, backend="triton")
    dh = grads["hidden"]
    assert torch.isnan(loss) and torch.isnan(dh[1, 3]).all() and torch.isnan(grads["weight"]).all()
    assert torch.isfinite(dh[0]).all()
