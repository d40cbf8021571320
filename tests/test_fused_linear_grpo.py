"""fused_linear_grpo_loss / FusedLinearGRPOLoss against the float64 full-logit oracle (tests/oracle.py).

Every case checks the loss, the gradients of hidden, weight and bias, and every metric. The torch backend takes
the full option matrix on tiny shapes (both strategies per case); the Triton backend (interpreter on CPU) takes,
per strategy, a pairwise covering array (every pair of option values meets at least once). Secondary options (delta, KL bias correction, advantage shape, 2-D hidden,
epsilons, SAPO/VESPO constants, chunk size, entropy, empty rows) rotate across the cases.
"""

import itertools
import warnings

import pytest
import torch

import grpo_kernels as gk
import oracle
from conftest import (METRIC_TOL, TOL, compare_bf16_run, compare_metrics, compare_run, expected_metrics,
                      package_run, rel_err)

STRATEGIES = ("chunked", "fused")
KL_MODES = ("off", "given", "model")  # beta = 0; beta != 0 with ref_per_token_logps; with ref_input/ref_weight


def build_case(i, lt, lv, kl, old, temp, bias, vllm, nib, *, B=3, T=5, H=24, V=37, dtype=torch.float32):
    """Problem + loss options + package-only options of case i (secondary options rotate with i)."""
    adv_shape = "BT" if i % 4 == 1 else "B"
    problem = oracle.make_problem(
        B=B, T=T, H=H, V=V, seed=1000 + i, dtype=dtype, bias=bias, old=old,
        ref={"off": None, "given": "given", "model": "model"}[kl], vllm=vllm, num_items=nib, adv_shape=adv_shape,
        mask="some_empty" if i % 7 == 3 else "ragged", hidden_2d=i % 5 == 2,
    )
    opts = dict(loss_type=lt, importance_sampling_level=lv, temperature=temp, beta=0.0 if kl == "off" else 0.05)
    if kl != "off" and i % 3 != 0:
        opts["use_bias_correction_kl"] = True
    if lt in oracle.CLIPPED_TYPES:
        if i % 2 == 0:
            opts["delta"] = 1.35
        if i % 3 == 1:
            opts.update(epsilon_low=0.15, epsilon_high=0.28)
    if lt == "dr_grpo":
        opts["max_completion_length"] = T + 2
    if lt == "cispo":
        opts["epsilon_high"] = (1.1, 5.0, 0.9)[i % 3]
    if lt == "sapo" and i % 2:
        opts.update(sapo_temperature_pos=0.5, sapo_temperature_neg=2.0)
    if lt == "vespo" and i % 2:
        opts.update(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5)
    run = dict(compute_entropy=i % 2 == 0, chunk_size=(None, 1, 2, 3, 5, 7)[i % 6])
    return problem, opts, run


def _label(lt, lv, kl, old, temp, bias, vllm, nib):
    return f"{lt}-{lv}-kl_{kl}-old{int(old)}-t{temp}-bias{int(bias)}-vllm{int(vllm)}-nib_{nib}"


def _matrix():
    cases = []
    for (lt, lv), kl, old, temp, bias, vllm in itertools.product(
            oracle.valid_combos(), KL_MODES, (True, False), (1.0, 0.7), (False, True), (False, True)):
        for nib in ((None, "tensor") if lt in oracle.NUM_ITEMS_TYPES else (None,)):
            cases.append((lt, lv, kl, old, temp, bias, vllm, nib))
    return cases


MATRIX = _matrix()


def _check_all(i, case, backend, strategies, **shape):
    problem, opts, run = build_case(i, *case, **shape)
    expected = oracle.oracle_run(problem, **opts)
    fails = []
    for strategy in strategies:
        label = f"[{backend}/{strategy} chunk_size={run['chunk_size']} opts={opts}] "
        fails += compare_run(problem, opts, dict(run, backend=backend, strategy=strategy), expected,
                             tol=TOL[torch.float32], metric_tol=METRIC_TOL[torch.float32], label=label)
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("i", range(len(MATRIX)), ids=[_label(*c) for c in MATRIX])
def test_torch_backend_full_matrix(i):
    _check_all(i, MATRIX[i], "torch", STRATEGIES)


TRITON_FACTORS = (oracle.valid_combos(), KL_MODES, (True, False), (1.0, 0.7), (False, True), (False, True))


def _pairs(row):
    return {(i, row[i], j, row[j]) for i in range(len(row)) for j in range(i + 1, len(row))}


def _pairwise_rows(factors, offset):
    """Greedy covering array: every pair of values of any two factors appears in some row (indices)."""
    sizes = [len(f) for f in factors]
    uncovered = {(i, a, j, b) for i in range(len(sizes)) for j in range(i + 1, len(sizes))
                 for a in range(sizes[i]) for b in range(sizes[j])}
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row = [None] * len(sizes)
        row[i], row[j] = a, b
        for k in range(len(sizes)):
            if row[k] is None:
                def gain(v, k=k):
                    return sum((min(k, m), v if k < m else row[m], max(k, m), row[m] if k < m else v) in uncovered
                               for m in range(len(sizes)) if row[m] is not None)
                row[k] = max(range(sizes[k]), key=lambda v: (gain(v), (v + len(rows) + offset) % sizes[k]))
        rows.append(row)
        uncovered -= _pairs(row)
    return rows


def _triton_cases():
    """Per strategy, a pairwise covering array over (loss_type, level) x KL mode x old x temperature x bias x
    vLLM ratio; num_items_in_batch alternates on the loss types that read it."""
    out = []
    for s, strategy in enumerate(STRATEGIES):
        for r, row in enumerate(_pairwise_rows(TRITON_FACTORS, s)):
            (lt, lv), *vals = [f[v] for f, v in zip(TRITON_FACTORS, row)]
            nib = ("tensor" if r % 2 else None) if lt in oracle.NUM_ITEMS_TYPES else None
            out.append((strategy, r + 100 * s, (lt, lv, *vals, nib)))
    return out


TRITON_CASES = _triton_cases()


def test_triton_subset_is_pairwise_with_each_strategy():
    for strategy in STRATEGIES:
        rows = [c for s, _, c in TRITON_CASES if s == strategy]
        idx = [[f.index(v) for f, v in zip(TRITON_FACTORS, ((r[0], r[1]),) + tuple(r[2:7]))] for r in rows]
        covered = set().union(*map(_pairs, idx))
        sizes = [len(f) for f in TRITON_FACTORS]
        need = sum(sizes[i] * sizes[j] for i in range(len(sizes)) for j in range(i + 1, len(sizes)))
        assert len(covered) == need, strategy
        assert {r[7] for r in rows if r[0] in oracle.NUM_ITEMS_TYPES} == {None, "tensor"}


@pytest.mark.parametrize("strategy,k,case", TRITON_CASES, ids=[f"{s}-{_label(*c)}" for s, _, c in TRITON_CASES])
def test_triton_backend_subset(strategy, k, case):
    # B*T = 28 rows: two interpreter row blocks when few are masked, one otherwise (vocab split path)
    V, H = ((37, 24), (70, 40))[k % 2]
    _check_all(k, case, "triton", (strategy,), B=4, T=7, H=H, V=V)


# ------------------------------------------------------------------------------------------- shapes and chunks
BACKENDS = [("torch", s) for s in STRATEGIES] + [("triton", s) for s in STRATEGIES]


def _one(problem, opts, backend, strategy, tol=None, metric_tol=None, **run):
    dtype = problem["hidden"].dtype
    expected = oracle.oracle_run(problem, **opts)
    fails = compare_run(problem, opts, dict(run, backend=backend, strategy=strategy), expected,
                        tol=tol or TOL[dtype], metric_tol=metric_tol or METRIC_TOL[dtype],
                        label=f"[{backend}/{strategy} {run} {opts}] ")
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("B,T,H,V", [(3, 1, 24, 37), (2, 9, 17, 101), (1, 6, 40, 33)])
def test_odd_sizes(backend, strategy, B, T, H, V):
    p = oracle.make_problem(B=B, T=T, H=H, V=V, seed=B * T + V, bias=True, vllm=True, ref="given")
    for lt, lv in (("dapo", "token"), ("grpo", "sequence")):
        _one(p, dict(loss_type=lt, importance_sampling_level=lv, beta=0.1), backend, strategy,
             compute_entropy=True)


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("lv", oracle.LEVELS)
def test_single_token_sequences_with_masked_rows(backend, strategy, lv):
    """T == 1 with masked rows: kl, entropy and token-level clip ratios stay masked means (see oracle.py on
    TRL's shape-based dispatch), the sequence level's clip ratios a mean over all sequences."""
    p = oracle.make_problem(B=6, T=1, seed=77, mask="full", ref="given", vllm=True)
    p["attention_mask"][[1, 4]] = 0.0
    _one(p, dict(loss_type="grpo", importance_sampling_level=lv, beta=0.1), backend, strategy,
         compute_entropy=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("V", [2053, 4099])  # 4099: more than one 4096-wide vocabulary tile of the torch path
def test_large_vocab_torch(strategy, V):
    p = oracle.make_problem(B=2, T=3, H=16, V=V, seed=V, bias=True, ref="given")
    _one(p, dict(loss_type="bnpo", beta=0.1), "torch", strategy, compute_entropy=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("lt,lv", [("dapo", "token"), ("grpo", "sequence"), ("vespo", "token")])
def test_chunk_smaller_than_sequence_and_batch(backend, chunk_size, lt, lv):
    p = oracle.make_problem(B=4, T=7, H=24, V=37, seed=chunk_size, vllm=True, ref="given", bias=True)
    _one(p, dict(loss_type=lt, importance_sampling_level=lv, beta=0.04), backend, "chunked",
         chunk_size=chunk_size, compute_entropy=True)


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("lt,lv,temp", [("dapo", "token", 1.0), ("grpo", "sequence", 0.7), ("cispo", "token", 0.7),
                                        ("sapo", "token", 1.0), ("vespo", "token", 1.0)])
def test_bf16(backend, strategy, lt, lv, temp):
    """bf16 hidden/weight/bias against float64. Budget: DESIGN's 1e-2, or twice what rounding the logits to bf16
    once (a bf16 logits buffer, as TRL's and Liger's bf16 paths have) costs on this very problem, whichever is
    larger: some losses are ill-conditioned in the log-probs (vespo's phi sums log-ratios over a sequence)."""
    p = oracle.make_problem(B=3, T=6, H=32, V=45, seed=7, dtype=torch.bfloat16, bias=True, ref="given", vllm=True)
    opts = dict(loss_type=lt, importance_sampling_level=lv, beta=0.05, temperature=temp, epsilon_high=0.3)
    fails = compare_bf16_run(p, opts, dict(backend=backend, strategy=strategy, compute_entropy=True))
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_float64_inputs_torch_exact(backend, strategy):
    if backend == "triton":  # documented: Triton takes fp16/bf16/fp32 only
        p = oracle.make_problem(seed=3, dtype=torch.float64)
        with pytest.raises(ValueError, match="triton"):
            gk.fused_linear_grpo_loss(**p, backend="triton", strategy=strategy)
        return
    p = oracle.make_problem(seed=3, dtype=torch.float64, bias=True, ref="given", vllm=True)
    # metrics are fp32 by contract (0-d fp32 tensors)
    _one(p, dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1), backend, strategy,
         tol=1e-10, metric_tol=1e-6, compute_entropy=True)


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("lt", ["grpo", "cispo", "vespo"])
def test_large_magnitude_logits(backend, strategy, lt):
    """Logits of order 1e3 (x1e3 weight): online logsumexp and exp must not overflow."""
    p = oracle.make_problem(B=3, T=5, H=24, V=37, seed=11, bias=True, ref="given", logit_scale=1.5e3, old=False)
    loss, metrics, grads = package_run(p, beta=0.1, loss_type=lt, backend=backend, strategy=strategy,
                                       compute_entropy=True)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    # fp32 logits of size 1e3 carry ~1e-4 absolute rounding, which the log-probs inherit
    _one(p, dict(beta=0.1, loss_type=lt), backend, strategy, tol=1e-3, metric_tol=1e-3, compute_entropy=True)


# ---------------------------------------------------------------------------------------- masks and advantages
@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("lt,lv", oracle.valid_combos())
def test_ragged_and_fully_masked_rows(backend, strategy, lt, lv):
    p = oracle.make_problem(B=4, T=6, seed=21, mask="some_empty", ref="given", vllm=True)
    _one(p, dict(loss_type=lt, importance_sampling_level=lv, beta=0.02, max_completion_length=6), backend, strategy,
         compute_entropy=True)


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("lt,lv", oracle.valid_combos())
def test_fully_masked_batch(backend, strategy, lt, lv):
    """Loss exactly 0, gradients exactly 0, metrics 0, nothing NaN, and backward still works."""
    for beta in (0.0, 0.1):
        p = oracle.make_problem(B=3, T=4, seed=5, mask="empty", ref="given", vllm=True, bias=True)
        loss, metrics, grads = package_run(p, loss_type=lt, importance_sampling_level=lv, beta=beta,
                                           max_completion_length=4, backend=backend, strategy=strategy,
                                           compute_entropy=True)
        assert float(loss) == 0.0
        for k, g in grads.items():
            assert g is not None and torch.equal(g, torch.zeros_like(g)), k
        for k in ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "entropy") + (("kl",) if beta else ()):
            assert float(getattr(metrics, k)) == 0.0, k


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("lt,lv,adv_shape", [("dapo", "token", "B"), ("grpo", "sequence", "B"),
                                             ("vespo", "token", "B"), ("cispo", "token", "BT"),
                                             ("luspo", "sequence", "BT"), ("sapo", "token", "BT")])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_zero_advantages(backend, strategy, lt, lv, adv_shape, beta):
    """Sequences (or tokens) with A = 0 may be skipped by the GEMMs, but metrics and entropy must still count
    them (they are in the mask) and, with beta != 0, their KL gradient must remain."""
    p = oracle.make_problem(B=4, T=5, seed=31, adv_shape=adv_shape, ref="given" if beta else None, bias=True)
    adv = p["advantages"].clone()
    adv[1] = 0.0
    adv[3] = 0.0
    if adv_shape == "BT":
        adv[0, ::2] = 0.0
    p["advantages"] = adv
    _one(p, dict(loss_type=lt, importance_sampling_level=lv, beta=beta), backend, strategy, compute_entropy=True)


def test_all_zero_advantages_still_report_entropy_and_kl():
    p = oracle.make_problem(B=3, T=5, seed=32, ref="given")
    p["advantages"] = torch.zeros(3)
    for backend, strategy in BACKENDS:
        _one(p, dict(loss_type="dapo", beta=0.0), backend, strategy, compute_entropy=True)
        _one(p, dict(loss_type="grpo", beta=0.2, importance_sampling_level="sequence"), backend, strategy,
             compute_entropy=True)


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64, torch.int64, torch.int32, torch.bool,
                                        torch.bfloat16])
def test_mask_dtypes(backend, strategy, mask_dtype):
    p = oracle.make_problem(seed=41, ref="given")
    p["attention_mask"] = p["attention_mask"].to(mask_dtype)
    _one(p, dict(loss_type="bnpo", beta=0.1), backend, strategy, compute_entropy=True)


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64, torch.int16, torch.uint8])
def test_ids_dtypes(backend, strategy, ids_dtype):
    p = oracle.make_problem(seed=42)
    p["selected_token_ids"] = p["selected_token_ids"].to(ids_dtype)
    _one(p, dict(loss_type="dapo"), backend, strategy)


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("shape", ["B", "B1", "BT"])
@pytest.mark.parametrize("lv", oracle.LEVELS)
def test_advantage_shapes(backend, strategy, shape, lv):
    p = oracle.make_problem(seed=43, adv_shape="BT" if shape == "BT" else "B")
    if shape == "B1":
        p["advantages"] = p["advantages"].unsqueeze(1)
    _one(p, dict(loss_type="grpo", importance_sampling_level=lv), backend, strategy)


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_hidden_2d_equals_3d(backend, strategy):
    p3 = oracle.make_problem(seed=44, bias=True)
    p2 = dict(p3, hidden=p3["hidden"].reshape(-1, p3["hidden"].shape[-1]))
    _one(p2, dict(loss_type="dapo"), backend, strategy)
    l3, m3, g3 = package_run(p3, backend=backend, strategy=strategy)
    l2, m2, g2 = package_run(p2, backend=backend, strategy=strategy)
    assert torch.equal(l2, l3) and torch.equal(g2["hidden"].reshape(g3["hidden"].shape), g3["hidden"])


@pytest.mark.parametrize("vshape", ["B", "B1"])
@pytest.mark.parametrize("lt", ["dapo", "vespo"])
def test_vllm_ratio_per_sequence(vshape, lt):
    """vLLM ratio of one value per sequence (TRL's sequence_* modes give (B, 1)); (B,) broadcasts the same."""
    p = oracle.make_problem(seed=45, vllm=True)
    rho = p["vllm_is_ratio"][:, :1]
    p_or = dict(p, vllm_is_ratio=rho)
    expected = oracle.oracle_run(p_or, loss_type=lt)
    p_pkg = dict(p, vllm_is_ratio=rho if vshape == "B1" else rho[:, 0])
    for strategy in STRATEGIES:
        fails = compare_run(p_pkg, dict(loss_type=lt), dict(backend="torch", strategy=strategy), expected,
                            tol=1e-4, metric_tol=1e-5)
        assert not fails, "\n".join(fails)


# ----------------------------------------------------------------------------------------- parameters and refs
@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_frozen_weight(backend, strategy):
    """weight.requires_grad=False (frozen LM head): no weight grad, hidden and bias grads still right."""
    p = oracle.make_problem(seed=51, bias=True, ref="given")
    opts = dict(loss_type="dapo", beta=0.1)
    _, _, o_grads = oracle.oracle_run(p, **opts)
    h = p["hidden"].clone().requires_grad_(True)
    w = p["weight"].clone()
    b = p["bias"].clone().requires_grad_(True)
    loss, _ = gk.fused_linear_grpo_loss(**dict(p, hidden=h, weight=w, bias=b), **opts, backend=backend,
                                        strategy=strategy)
    loss.backward()
    assert w.grad is None
    assert rel_err(h.grad, o_grads["hidden"]) < 1e-4
    assert rel_err(b.grad, o_grads["bias"]) < 1e-4
    # and with only hidden requiring grad
    h2 = p["hidden"].clone().requires_grad_(True)
    loss, _ = gk.fused_linear_grpo_loss(**dict(p, hidden=h2), **opts, backend=backend, strategy=strategy)
    loss.backward()
    assert rel_err(h2.grad, o_grads["hidden"]) < 1e-4


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_reference_from_ref_model(backend, strategy, temp):
    """ref log-probs computed inside from ref_input/ref_weight/ref_bias (same temperature), with no gradient
    flowing into them; identical to passing those log-probs in."""
    p = oracle.make_problem(seed=52, bias=True, ref="model", hidden_2d=True)
    opts = dict(loss_type="grpo", beta=0.2, temperature=temp)
    _one(p, opts, backend, strategy, compute_entropy=True)
    refs = {k: p[k].clone().requires_grad_(True) for k in ("ref_input", "ref_weight", "ref_bias")}
    h = p["hidden"].clone().requires_grad_(True)
    loss, m1 = gk.fused_linear_grpo_loss(**dict(p, hidden=h, **refs), **opts, backend=backend, strategy=strategy)
    loss.backward()
    assert all(t.grad is None for t in refs.values())
    ref_lp, _ = oracle.logprobs(p["ref_input"], p["ref_weight"], p["selected_token_ids"], p["ref_bias"], temp)
    given = {k: v for k, v in p.items() if not k.startswith("ref_")}
    loss2, m2 = gk.fused_linear_grpo_loss(**given, ref_per_token_logps=ref_lp.float(), **opts, backend=backend,
                                          strategy=strategy)
    assert rel_err(loss2, loss.detach()) < 1e-5 and rel_err(m2.kl, m1.kl) < 1e-5


def test_ref_per_token_logps_wins_over_ref_model():
    p = oracle.make_problem(seed=53, ref="model")
    given = oracle.make_problem(seed=53, ref="given")["ref_per_token_logps"]
    expected = oracle.oracle_run(dict(p, ref_per_token_logps=given), loss_type="dapo", beta=0.1)
    fails = compare_run(dict(p, ref_per_token_logps=given), dict(loss_type="dapo", beta=0.1), dict(backend="torch"),
                        expected, tol=1e-4, metric_tol=1e-5)
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_beta_without_any_reference_is_liger_behaviour(strategy):
    """beta != 0 with neither ref_per_token_logps nor a ref model: the reference is the policy itself (Liger),
    so the KL term and its gradient are 0 and metrics.kl is 0."""
    p = oracle.make_problem(seed=54, ref=None)
    expected = oracle.oracle_run(p, loss_type="dapo", beta=0.0)
    loss, metrics, grads = package_run(p, loss_type="dapo", beta=0.3, backend="torch", strategy=strategy)
    assert rel_err(loss, expected[0]) < 1e-5 and rel_err(grads["hidden"], expected[2]["hidden"]) < 1e-4
    assert metrics.kl is not None and float(metrics.kl) == 0.0


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_grad_output_scales(backend, strategy):
    p = oracle.make_problem(seed=55, bias=True, ref="given")
    opts = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1)
    _, _, g1 = oracle.oracle_run(p, **opts)
    _, _, g3 = package_run(p, grad_output=3.0, backend=backend, strategy=strategy, **opts)
    for k in g1:
        assert rel_err(g3[k], 3.0 * g1[k]) < 1e-4, k


# -------------------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_module_matches_oracle(backend, strategy):
    p = oracle.make_problem(seed=61, bias=True, ref="model", vllm=True, num_items="int")
    loss_fn = gk.FusedLinearGRPOLoss(beta=0.04, compiled=False, use_ref_model=True, chunk_size=4, epsilon_low=0.2,
                                     epsilon_high=0.28, loss_type="dapo", temperature=0.7, delta=1.6,
                                     use_bias_correction_kl=True, backend=backend, strategy=strategy,
                                     compute_entropy=True)
    opts = dict(beta=0.04, epsilon_high=0.28, loss_type="dapo", temperature=0.7, delta=1.6,
                use_bias_correction_kl=True)
    expected = oracle.oracle_run(p, **opts)
    args = dict(p)
    h = args["hidden"].clone().requires_grad_(True)
    w = args["weight"].clone().requires_grad_(True)
    b = args["bias"].clone().requires_grad_(True)
    args.update(hidden=h, weight=w, bias=b)
    loss, metrics = loss_fn(args.pop("hidden"), args.pop("weight"), args.pop("selected_token_ids"),
                            args.pop("attention_mask"), args.pop("advantages"), **args)
    loss.backward()
    assert rel_err(loss, expected[0]) < 1e-4
    for k, g in (("hidden", h.grad), ("weight", w.grad), ("bias", b.grad)):
        assert rel_err(g, expected[2][k]) < 1e-4, k
    fails = compare_metrics(metrics, expected_metrics("dapo", expected[1], 0.04, True), 1e-5)
    assert not fails, "\n".join(fails)


def test_module_defaults_and_liger_keywords():
    loss_fn = gk.FusedLinearGRPOLoss()
    assert loss_fn.beta == 0.0 and loss_fn.loss_type == "dapo" and loss_fn.importance_sampling_level == "token"
    assert isinstance(loss_fn, torch.nn.Module)
    p = oracle.make_problem(seed=62, ref=None)
    expected = oracle.oracle_run(p)  # oracle defaults: TRL's (beta 0, dapo, token)
    loss, metrics = loss_fn(p["hidden"], p["weight"], p["selected_token_ids"], p["attention_mask"],
                            p["advantages"], old_per_token_logps=p["old_per_token_logps"])
    assert metrics.kl is None and len(metrics) == 1
    assert rel_err(loss, expected[0]) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in (dict(compiled=True), dict(compiled=False), dict(use_ref_model=False), dict(chunk_size=1),
                   dict(chunk_size=3)):
            l2, _ = gk.FusedLinearGRPOLoss(**kw)(p["hidden"], p["weight"], p["selected_token_ids"],
                                                 p["attention_mask"], p["advantages"],
                                                 old_per_token_logps=p["old_per_token_logps"])
            assert rel_err(l2, expected[0]) < 1e-5, kw


def test_module_use_ref_model_false_ignores_ref_inputs():
    p = oracle.make_problem(seed=63, ref="model")
    loss_fn = gk.FusedLinearGRPOLoss(beta=0.1, use_ref_model=False)
    expected = oracle.oracle_run({k: v for k, v in p.items() if not k.startswith("ref_")}, beta=0.0)
    loss, metrics = loss_fn(p["hidden"], p["weight"], p["selected_token_ids"], p["attention_mask"],
                            p["advantages"], old_per_token_logps=p["old_per_token_logps"], ref_input=p["ref_input"],
                            ref_weight=p["ref_weight"])
    assert rel_err(loss, expected[0]) < 1e-5
    assert float(metrics.kl) == 0.0
    loss_fn = gk.FusedLinearGRPOLoss(beta=0.1, use_ref_model=True)
    with_ref = oracle.oracle_run(p, beta=0.1)
    loss, metrics = loss_fn(p["hidden"], p["weight"], p["selected_token_ids"], p["attention_mask"],
                            p["advantages"], old_per_token_logps=p["old_per_token_logps"], ref_input=p["ref_input"],
                            ref_weight=p["ref_weight"])
    assert rel_err(loss, with_ref[0]) < 1e-5 and rel_err(metrics.kl, with_ref[1]["kl"]) < 1e-5


def test_num_items_in_batch_int_and_tensor_agree():
    p = oracle.make_problem(seed=64, num_items="int")
    pt = dict(p, num_items_in_batch=torch.tensor(p["num_items_in_batch"]))
    pf = dict(p, num_items_in_batch=torch.tensor(float(p["num_items_in_batch"])))
    expected = oracle.oracle_run(p, loss_type="cispo", epsilon_high=1.1)
    for q in (p, pt, pf):
        fails = compare_run(q, dict(loss_type="cispo", epsilon_high=1.1), dict(backend="torch"), expected,
                            tol=1e-4, metric_tol=1e-5)
        assert not fails, "\n".join(fails)
    base = oracle.oracle_run({k: v for k, v in p.items() if k != "num_items_in_batch"}, loss_type="cispo")
    assert abs(float(expected[0]) - float(base[0])) > 1e-3  # the normalizer really changed the loss


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_extreme_ratios_stay_finite(backend, strategy):
    """Old log-probs far from the policy (ratios up to ~e^15): TRL's formulas stay finite in fp32 here."""
    p = oracle.make_problem(seed=65, ref="given", vllm=True, old_noise=5.0)
    for lt in ("dapo", "cispo", "sapo", "vespo"):
        _one(p, dict(loss_type=lt, beta=0.01, use_bias_correction_kl=True, epsilon_high=0.3), backend, strategy,
             compute_entropy=True)


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_non_contiguous_inputs(backend, strategy):
    """Views as a trainer passes them: hidden sliced out of the full sequence (TRL keeps the completion part),
    a column slice of a wider weight, transposed/strided per-token tensors."""
    p = oracle.make_problem(B=3, T=5, H=24, V=37, seed=81, bias=True, ref="given", vllm=True)
    g = torch.Generator().manual_seed(0)
    big_h = torch.randn(3, 9, 24, generator=g)
    big_h[:, 2:7] = p["hidden"]
    big_w = torch.randn(37, 30, generator=g)
    big_w[:, 3:27] = p["weight"]
    q = dict(p, hidden=big_h[:, 2:7], weight=big_w[:, 3:27])
    for k in ("selected_token_ids", "attention_mask", "old_per_token_logps", "ref_per_token_logps", "vllm_is_ratio"):
        q[k] = p[k].t().contiguous().t()  # same values, column-major strides
    q["bias"] = torch.stack([p["bias"], p["bias"]], 1)[:, 0]  # stride 2
    assert not q["hidden"].is_contiguous() and not q["weight"].is_contiguous() and not q["bias"].is_contiguous()
    opts = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1)
    expected = oracle.oracle_run(p, **opts)
    fails = compare_run(q, opts, dict(backend=backend, strategy=strategy, compute_entropy=True), expected,
                        tol=1e-4, metric_tol=1e-5)
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_no_grad_forward(backend, strategy):
    """Under torch.no_grad (evaluation), the loss and metrics are the same and nothing needs a backward."""
    p = oracle.make_problem(seed=82, bias=True, ref="given")
    opts = dict(loss_type="dapo", beta=0.1)
    expected = oracle.oracle_run(p, **opts)
    with torch.no_grad():
        loss, metrics = gk.fused_linear_grpo_loss(**p, **opts, backend=backend, strategy=strategy)
    assert not loss.requires_grad
    assert rel_err(loss, expected[0]) < 1e-5 and rel_err(metrics.kl, expected[1]["kl"]) < 1e-5


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("lt,lv", [("dapo", "token"), ("grpo", "sequence"), ("cispo", "token"), ("sapo", "token"),
                                   ("vespo", "token")])
def test_vllm_ratio_with_zeros(backend, strategy, lt, lv):
    """TRL's token_mask mode zeroes the ratio of tokens outside its bounds (log 0 = -inf in vespo's sum)."""
    p = oracle.make_problem(B=3, T=6, seed=83, vllm=True, ref="given", bias=True)
    rho = p["vllm_is_ratio"].clone()
    rho[0, 1] = 0.0
    rho[2, ::2] = 0.0
    p["vllm_is_ratio"] = rho
    _one(p, dict(loss_type=lt, importance_sampling_level=lv, beta=0.05), backend, strategy, compute_entropy=True)


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_frozen_hidden_trainable_head(backend, strategy):
    p = oracle.make_problem(seed=84, bias=True, ref="given")
    opts = dict(loss_type="bnpo", beta=0.1, temperature=0.7)
    _, _, o_grads = oracle.oracle_run(p, **opts)
    w = p["weight"].clone().requires_grad_(True)
    loss, _ = gk.fused_linear_grpo_loss(**dict(p, weight=w), **opts, backend=backend, strategy=strategy)
    loss.backward()
    assert rel_err(w.grad, o_grads["weight"]) < 1e-4


def test_ref_model_ignored_when_beta_is_zero():
    p = oracle.make_problem(seed=85, ref="model", bias=True)
    plain = {k: v for k, v in p.items() if not k.startswith("ref_")}
    expected = oracle.oracle_run(plain)
    for strategy in STRATEGIES:
        fails = compare_run(p, {}, dict(backend="torch", strategy=strategy), expected, tol=1e-4, metric_tol=1e-5)
        assert not fails, "\n".join(fails)


# ------------------------------------------------------------------------------------------------- fp16 + scaler
@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_fp16_small_gradients_survive_grad_scaler(backend, strategy, chunk_size):
    """fp16 inputs, tiny per-token weights (num_items_in_batch = 2e5) and a GradScaler-like grad_output of 2**16.
    Unscaled, dL/dlogits (~1e-8) and the gradients (~1e-7) are below fp16's normal range (6e-5): made in the
    forward with grad_output = 1 and stored in fp16 they underflow (zeros / a few subnormal bits) before the
    factor applies. Scaled gradients must match float64 * 2**16 to fp16 precision."""
    p = oracle.make_problem(B=3, T=6, H=32, V=45, seed=71, dtype=torch.float16, bias=True, ref="given")
    p["num_items_in_batch"] = 200000
    opts = dict(loss_type="dapo", beta=0.05, temperature=0.9)
    _, _, e_grads = oracle.oracle_run(p, **opts)
    scale = 2.0 ** 16
    _, _, grads = package_run(p, grad_output=scale, backend=backend, strategy=strategy, chunk_size=chunk_size,
                              **opts)
    for k, e in e_grads.items():
        assert grads[k].dtype == torch.float16, k
        assert e.abs().max() * scale > 6e-5  # the scaled gradient is a normal fp16 number...
        assert e.abs().max() < 6e-5  # ...the unscaled one is not
        assert rel_err(grads[k], e * scale) < 1e-2, k


# ------------------------------------------------------------------------------------------- token_loss_mask
def _keep(B, T, seed, kind):
    """A top-entropy-like mask (bool, some rows all dropped) or float multipliers >= 0 with zeros, of shape kind."""
    g = torch.Generator().manual_seed(seed)
    if kind == "float":
        w = torch.rand(B, T, generator=g) * 2.0
        return w * (torch.rand(B, T, generator=g) > 0.3)
    keep = torch.rand(B, T, generator=g) > 0.4
    keep[0] = False
    return {"bool": keep, "B1": keep[:, :1].float(), "B": keep[:, 0].float()}[kind]


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("lt", ["dapo", "grpo", "cispo", "sapo", "vespo"])
@pytest.mark.parametrize("kind", ["bool", "float", "B1"])
def test_token_loss_mask(backend, strategy, lt, kind):
    """token_loss_mask multiplies the policy term (TRL's entropy mask) for every loss type, alone and together with
    the vLLM ratio, at odd shapes; metrics and normalizer still count every token."""
    B, T, H, V = 3, 7, 19, 41
    lv = "sequence" if lt == "grpo" else "token"
    for vllm, beta in ((False, 0.0), (True, 0.05)):  # beta = 0: masked-out tokens may be skipped, entropy kept
        p = oracle.make_problem(B=B, T=T, H=H, V=V, seed=61 + vllm, bias=True, vllm=vllm, ref="given")
        p["token_loss_mask"] = _keep(B, T, 7, kind)
        _one(p, dict(loss_type=lt, importance_sampling_level=lv, beta=beta), backend, strategy,
             compute_entropy=True)


def test_token_loss_mask_is_not_the_vllm_ratio():
    """The mask and the vLLM ratio are different inputs for vespo: the ratio enters the sequence weights, the mask
    scales the per-token loss (passing the mask as the ratio gives another loss)."""
    p = oracle.make_problem(B=3, T=7, seed=62, ref="given")
    keep = _keep(3, 7, 8, "bool")
    as_mask, _, _ = package_run(dict(p, token_loss_mask=keep), loss_type="vespo", backend="torch")
    as_ratio, _, _ = package_run(dict(p, vllm_is_ratio=keep.float()), loss_type="vespo", backend="torch")
    expected, _, _ = oracle.oracle_run(dict(p, token_loss_mask=keep), loss_type="vespo")
    assert rel_err(as_mask, expected) < 1e-5 and rel_err(as_ratio, expected) > 1e-2


def test_token_loss_mask_module_and_bad_inputs():
    p = oracle.make_problem(B=2, T=5, seed=63, vllm=True, ref="given")
    keep = _keep(2, 5, 9, "bool")
    expected = oracle.oracle_run(dict(p, token_loss_mask=keep), loss_type="dapo", beta=0.1)
    module = gk.FusedLinearGRPOLoss(beta=0.1, loss_type="dapo")
    args = {k: v for k, v in p.items() if v is not None}
    loss, _ = module(p["hidden"], p["weight"], p["selected_token_ids"], p["attention_mask"], p["advantages"],
                     ref_per_token_logps=p["ref_per_token_logps"], old_per_token_logps=p["old_per_token_logps"],
                     vllm_is_ratio=p["vllm_is_ratio"], token_loss_mask=keep)
    assert rel_err(loss, expected[0]) < 1e-5
    for bad, err, words in ((keep[:, :3], ValueError, "token_loss_mask must have shape"),
                            (keep.long(), TypeError, "token_loss_mask must be a bool or floating"),
                            ([1.0, 0.0], TypeError, "token_loss_mask")):
        with pytest.raises(err, match=words):
            gk.fused_linear_grpo_loss(**args, token_loss_mask=bad)
