"""grpo_loss (loss from per-token log-probs you already have) against the float64 oracle, for every option.

Checks the loss, its gradient with respect to per_token_logps (the only differentiable input) and the metrics.
"""

import itertools

import pytest
import torch

import grpo_kernels as gk
import oracle
from conftest import compare_metrics, expected_metrics, rel_err

F64 = torch.float64


def _problem(seed, B=4, T=6, adv_shape="B", vllm=None, mask="ragged", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m = oracle.random_mask(B, T, g)
    if mask == "some_empty":
        m[1] = 0.0
    elif mask == "empty":
        m.zero_()
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 4 - 0.01
    adv = torch.randn(B, T, generator=g) if adv_shape == "BT" else torch.randn(B, generator=g)
    if adv_shape == "B1":
        adv = adv.unsqueeze(1)
    old = logp + 0.45 * torch.randn(B, T, generator=g, dtype=F64)
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    rho = torch.exp(0.3 * torch.randn(B, T, generator=g))
    rho = {None: None, "BT": rho, "B1": rho[:, :1], "B": rho[:, 0]}[vllm]
    return dict(per_token_logps=logp.to(dtype), attention_mask=m, advantages=adv, old_per_token_logps=old.float(),
                ref_per_token_logps=ref.float(), vllm_is_ratio=rho)


def _compare(p, opts, tol=1e-5, metric_tol=1e-5, grad_tol=None, **run):
    """Package vs oracle on the same inputs; the oracle sees (B,) vLLM ratios as (B, 1)."""
    q = dict(p)
    if q.get("vllm_is_ratio") is not None and q["vllm_is_ratio"].dim() == 1:
        q["vllm_is_ratio"] = q["vllm_is_ratio"].unsqueeze(1)
    lp_o = p["per_token_logps"].detach().to(F64).requires_grad_(True)
    o_loss, o_metrics = oracle.grpo_loss(**dict(q, per_token_logps=lp_o), **opts)
    (o_grad,) = torch.autograd.grad(o_loss, lp_o)
    lp = p["per_token_logps"].detach().clone().requires_grad_(True)
    loss, metrics = gk.grpo_loss(**dict(p, per_token_logps=lp), **opts, **run)
    loss.backward()
    fails = []
    got, exp = float(loss.detach()), float(o_loss.detach())
    if abs(got - exp) > tol * max(abs(exp), 1e-2):
        fails.append(f"loss {got:.10g} vs {exp:.10g}")
    if lp.grad is None:
        fails.append("no gradient for per_token_logps")
    else:
        e = rel_err(lp.grad, o_grad) if o_grad.abs().max() > 0 else float(lp.grad.abs().max())
        if e > (grad_tol or tol):
            fails.append(f"grad rel err {e:.2e}")
    fails += compare_metrics(metrics, expected_metrics(opts.get("loss_type", "dapo"), o_metrics,
                                                       opts.get("beta", 0.0), False), metric_tol)
    return fails


CASES = [
    (lt, lv, beta, bc, old, vllm, adv_shape, nib)
    for (lt, lv) in oracle.valid_combos()
    for beta, bc in ((0.0, False), (0.04, False), (0.04, True))
    for old in (True, False)
    for vllm in (None, "BT", "B1", "B")
    for adv_shape in ("B", "BT", "B1")
    for nib in ((None, 30) if lt in oracle.NUM_ITEMS_TYPES else (None,))
]


@pytest.mark.parametrize("i", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_grpo_loss_matches_oracle(i):
    lt, lv, beta, bc, old, vllm, adv_shape, nib = CASES[i]
    p = _problem(i, adv_shape=adv_shape, vllm=vllm, mask="some_empty" if i % 5 == 0 else "ragged")
    if not old:
        p["old_per_token_logps"] = None
    if not beta:
        p["ref_per_token_logps"] = None
    p["num_items_in_batch"] = nib
    opts = dict(loss_type=lt, importance_sampling_level=lv, beta=beta, use_bias_correction_kl=bc,
                max_completion_length=8)
    if lt in oracle.CLIPPED_TYPES and i % 2:
        opts["delta"] = 1.35
    if lt == "cispo":
        opts["epsilon_high"] = (0.9, 1.1, 4.0)[i % 3]
    if lt == "sapo" and i % 2:
        opts.update(sapo_temperature_pos=0.6, sapo_temperature_neg=1.7)
    if lt == "vespo" and i % 2:
        opts.update(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.25)
    if i % 3 == 2:
        opts.update(epsilon_low=0.1, epsilon_high=opts.get("epsilon_high", 0.3))
    fails = _compare(p, opts)
    assert not fails, f"{opts}: " + "; ".join(fails)


@pytest.mark.parametrize("lt,lv", oracle.valid_combos())
def test_float64_logps(lt, lv):
    p = _problem(3, vllm="BT", dtype=F64)
    opts = dict(loss_type=lt, importance_sampling_level=lv, beta=0.1, max_completion_length=6)
    loss, _ = gk.grpo_loss(**p, **opts)
    assert loss.dtype == F64
    fails = _compare(p, opts, tol=1e-10, metric_tol=1e-6)  # metrics are fp32 by contract
    assert not fails, fails


@pytest.mark.parametrize("lt,lv", oracle.valid_combos())
def test_bf16_logps(lt, lv):
    p = _problem(4, vllm="BT", dtype=torch.bfloat16)
    # the oracle sees the same bf16 values, so the loss is fp32-accurate; the gradient comes back in bf16
    fails = _compare(p, dict(loss_type=lt, importance_sampling_level=lv, beta=0.1, max_completion_length=6),
                     tol=1e-4, metric_tol=1e-5, grad_tol=1e-2)
    assert not fails, fails


@pytest.mark.parametrize("lt,lv", oracle.valid_combos())
def test_fully_masked_batch(lt, lv):
    p = _problem(5, vllm="BT", mask="empty")
    lp = p["per_token_logps"].clone().requires_grad_(True)
    loss, metrics = gk.grpo_loss(**dict(p, per_token_logps=lp), loss_type=lt, importance_sampling_level=lv,
                                 beta=0.1, max_completion_length=6)
    assert loss.requires_grad
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(lp.grad, torch.zeros_like(lp))
    for k in ("kl", "clip_ratio", "clip_ratio_low", "clip_ratio_high"):
        assert float(getattr(metrics, k)) == 0.0, k
    assert metrics.entropy is None


@pytest.mark.parametrize("lt,lv", [("dapo", "token"), ("grpo", "sequence"), ("vespo", "token"), ("sapo", "token")])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_zero_advantages(lt, lv, beta):
    p = _problem(6, adv_shape="BT" if lv == "token" else "B")
    p["advantages"][0] = 0.0
    p["advantages"][2] = 0.0
    if not beta:
        p["ref_per_token_logps"] = None
    fails = _compare(p, dict(loss_type=lt, importance_sampling_level=lv, beta=beta))
    assert not fails, fails


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.float64])
def test_mask_dtypes(mask_dtype):
    p = _problem(7, vllm="BT")
    p["attention_mask"] = p["attention_mask"].to(mask_dtype)
    fails = _compare(p, dict(loss_type="bnpo", beta=0.1))
    assert not fails, fails


def test_beta_without_reference_is_zero_kl():
    p = _problem(8)
    p["ref_per_token_logps"] = None
    loss0, _ = gk.grpo_loss(**p, loss_type="dapo", beta=0.0)
    loss1, metrics = gk.grpo_loss(**p, loss_type="dapo", beta=0.2)
    assert float(loss0) == pytest.approx(float(loss1), rel=1e-6) and float(metrics.kl) == 0.0


def test_grad_output_scales():
    p = _problem(9)
    lp = p["per_token_logps"].clone().requires_grad_(True)
    loss, _ = gk.grpo_loss(**dict(p, per_token_logps=lp), loss_type="grpo", beta=0.1)
    (loss * 3.0).backward()
    lp2 = p["per_token_logps"].clone().requires_grad_(True)
    loss2, _ = gk.grpo_loss(**dict(p, per_token_logps=lp2), loss_type="grpo", beta=0.1)
    loss2.backward()
    assert rel_err(lp.grad, 3.0 * lp2.grad) < 1e-6


def test_matches_fused_on_the_same_logps():
    """grpo_loss(linear_logprobs(...)) and fused_linear_grpo_loss(...) are the same function of the inputs."""
    prob = oracle.make_problem(seed=10, bias=True, ref="given", vllm=True)
    opts = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1, temperature=0.7)
    h = prob["hidden"].clone().requires_grad_(True)
    lp = gk.linear_logprobs(h, prob["weight"], prob["selected_token_ids"], prob["bias"], temperature=0.7,
                            backend="torch")
    rest = {k: prob.get(k) for k in ("old_per_token_logps", "ref_per_token_logps", "vllm_is_ratio")}
    loss, m1 = gk.grpo_loss(lp, prob["attention_mask"], prob["advantages"], **rest, **opts)
    loss.backward()
    h2 = prob["hidden"].clone().requires_grad_(True)
    loss2, m2 = gk.fused_linear_grpo_loss(**dict(prob, hidden=h2), **opts, backend="torch")
    loss2.backward()
    assert rel_err(loss2, loss.detach()) < 1e-5 and rel_err(h2.grad, h.grad) < 1e-4
    assert float(m1.clip_ratio) == float(m2.clip_ratio)


def test_cases_cover_options():
    assert {c[:2] for c in CASES} == set(oracle.valid_combos())
    assert set(itertools.chain.from_iterable((c[5], c[6]) for c in CASES)) == {None, "BT", "B1", "B"}


@pytest.mark.parametrize("lt,lv", oracle.valid_combos())
@pytest.mark.parametrize("vllm", [None, "BT", "B"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_loss_mask_matches_oracle(lt, lv, vllm, backend):
    """token_loss_mask (TRL's entropy mask) scales each token's policy loss, alone or with the vLLM ratio."""
    p = _problem(71, B=3, T=7, adv_shape="BT" if lt == "dapo" else "B", vllm=vllm)
    g = torch.Generator().manual_seed(72)
    keep = torch.rand(3, 7, generator=g) > 0.4
    keep[0] = False
    p["token_loss_mask"] = keep
    fails = _compare(p, dict(loss_type=lt, importance_sampling_level=lv, beta=0.04, max_completion_length=7),
                     backend=backend)
    assert not fails, "\n".join(fails)
