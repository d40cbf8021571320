"""The package's own float64 spec, grpo_kernels.reference, against this suite's independent oracle.

Both are full-logit float64 autograd, so they must agree to rounding (1e-12): values, gradients and metrics.
"""

import itertools

import pytest
import torch

import oracle
from conftest import expected_metrics, rel_err
from grpo_kernels import reference as gref

F64 = torch.float64
GRAD_KEYS = ("hidden", "weight", "bias")


def _f64(problem):
    return {k: (v.to(F64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in problem.items()}


def _metrics_match(got, expected):
    bad = []
    for k, v in expected.items():
        g = got.get(k)
        if v is None or g is None:
            if (v is None) != (g is None):
                bad.append(f"{k}: got {g}, expected {v}")
        elif abs(float(g) - float(v)) > 1e-12:
            bad.append(f"{k}: got {float(g):.15g}, expected {float(v):.15g}")
    return bad


CASES = [
    (lt, lv, beta, bc, vllm, old, adv_shape, temp)
    for (lt, lv) in oracle.valid_combos()
    for beta, bc in ((0.0, False), (0.05, False), (0.05, True))
    for vllm, old in ((False, True), (True, False), (True, True))
    for adv_shape in ("B", "BT")
    for temp in (1.0, 0.7)
]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_reference_fused_matches_oracle(case):
    lt, lv, beta, bc, vllm, old, adv_shape, temp = case
    i = CASES.index(case)
    p = _f64(oracle.make_problem(seed=i, bias=i % 2 == 0, old=old, vllm=vllm, adv_shape=adv_shape,
                                 ref=("given", "model")[i % 2] if beta else None, mask="some_empty" if i % 5 == 0
                                 else "ragged", num_items="int" if i % 3 == 0 else None, hidden_2d=i % 4 == 1))
    opts = dict(loss_type=lt, importance_sampling_level=lv, beta=beta, use_bias_correction_kl=bc, temperature=temp,
                max_completion_length=6, delta=1.35 if i % 3 == 1 and lt in oracle.CLIPPED_TYPES else None)
    o_loss, o_metrics, o_grads = oracle.oracle_run(p, **opts)
    args = dict(p)
    leaves = {k: args[k].clone().requires_grad_(True) for k in GRAD_KEYS if args.get(k) is not None}
    args.update(leaves)
    loss, metrics = gref.reference_fused_linear_grpo_loss(**args, **opts, compute_entropy=True)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    assert abs(loss.item() - o_loss.item()) <= 1e-12 * max(1.0, abs(o_loss.item()))
    for k, g in zip(leaves, grads):
        assert rel_err(g, o_grads[k]) < 1e-11, k
    bad = _metrics_match(metrics, expected_metrics(lt, o_metrics, beta, True))
    assert not bad, bad


@pytest.mark.parametrize("lt,lv", oracle.valid_combos())
@pytest.mark.parametrize("nib", [None, 17, torch.tensor(23.0)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_reference_grpo_loss_matches_oracle(lt, lv, nib, with_mask):
    g = torch.Generator().manual_seed(3)
    B, T = 4, 6
    mask = oracle.random_mask(B, T, g)
    logp0 = -torch.rand(B, T, generator=g, dtype=F64) * 3
    adv = torch.randn(B, generator=g, dtype=F64)
    old = logp0 + 0.45 * torch.randn(B, T, generator=g, dtype=F64)
    ref = logp0 + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    rho = torch.exp(0.3 * torch.randn(B, T, generator=g, dtype=F64))
    ent = torch.rand(B, T, generator=g, dtype=F64)
    keep = torch.rand(B, T, generator=g) > 0.4 if with_mask else None  # token_loss_mask (TRL's entropy mask)
    opts = dict(loss_type=lt, importance_sampling_level=lv, beta=0.1, max_completion_length=6,
                sapo_temperature_pos=0.8, vespo_lambda_neg=1.5)
    results = []
    for fn in (oracle.grpo_loss, gref.reference_grpo_loss):
        lp = logp0.clone().requires_grad_(True)
        loss, metrics = fn(lp, mask, adv, old, ref, rho, nib, entropy=ent, token_loss_mask=keep, **opts)
        results.append((loss, torch.autograd.grad(loss, lp)[0], metrics))
    (l1, g1, m1), (l2, g2, m2) = results
    assert abs(l1.item() - l2.item()) <= 1e-12 * max(1.0, abs(l1.item()))
    assert rel_err(g2, g1) < 1e-11
    bad = _metrics_match(m2, expected_metrics(lt, m1, 0.1, True))
    assert not bad, bad


@pytest.mark.parametrize("shape", ["BTH", "NH"])
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_reference_logprobs_matches_oracle(shape, temp):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(3, 5, 16, generator=g, dtype=F64)
    W = torch.randn(29, 16, generator=g, dtype=F64) / 3
    b = torch.randn(29, generator=g, dtype=F64)
    y = torch.randint(0, 29, (3, 5), generator=g)
    if shape == "NH":
        h, y = h.reshape(15, 16), y.reshape(15)
    lp1, e1 = oracle.logprobs(h, W, y, b, temp)
    lp2, e2 = gref.reference_logprobs(h, W, y, b, temp)
    assert rel_err(lp2, lp1) < 1e-13 and rel_err(e2, e1) < 1e-13


def test_reference_t1_with_masked_tokens():
    """T == 1 with a masked token: per-token metrics (kl, entropy, token-level clip flags) stay masked means.

    TRL's global_masked_mean dispatches on the last dimension being 1, so at T == 1 it would average masked tokens
    too; the production path (fused_linear_grpo_loss) masks them, and the spec should say the same thing.
    """
    p = _f64(oracle.make_problem(B=5, T=1, seed=9, ref="given", mask="full"))
    p["attention_mask"][[1, 3]] = 0.0
    for lv in oracle.LEVELS:
        opts = dict(loss_type="grpo", importance_sampling_level=lv, beta=0.1)
        _, o_metrics, _ = oracle.oracle_run(p, **opts)
        _, metrics = gref.reference_fused_linear_grpo_loss(**p, **opts, compute_entropy=True)
        bad = _metrics_match(metrics, expected_metrics("grpo", o_metrics, 0.1, True))
        assert not bad, (lv, bad)


def test_cases_cover_every_combination():
    assert len({c[:2] for c in CASES}) == 13
    assert set(itertools.chain.from_iterable((c[2], c[3]) for c in CASES)) >= {0.0, 0.05, True, False}
