"""Self-tests of tests/oracle.py, so the oracle the other files trust is itself trustworthy.

The oracle is autograd over TRL's formulas; here its values and its gradient with respect to the log-probs are
checked against the closed forms of docs/design.md, computed element by element with Python floats (a different route:
per-token weights w_t instead of TRL's aggregation code, hand-written derivatives instead of autograd), plus the
chain rule through the logits and a few hand-computed TRL corner cases.
"""

import itertools
import math

import pytest
import torch

import oracle
from conftest import rel_err

F64 = torch.float64
LOG_FLOOR = math.log(1e-8)


# ------------------------------------------------------------------------------------------- closed forms (floats)
def _weights(lt, mask, num_items, max_len):
    """The aggregation weights w_t (L = sum_t w_t * l_t)."""
    B, T = len(mask), len(mask[0])
    total = sum(map(sum, mask))
    w = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n_b = sum(mask[b])
        for t in range(T):
            m = mask[b][t]
            if lt in ("grpo", "sapo"):
                w[b][t] = m / (B * max(1.0, n_b))
            elif lt == "bnpo":
                w[b][t] = m / max(1.0, total)
            elif lt == "dr_grpo":
                w[b][t] = m / (B * max_len)
            elif lt in ("dapo", "cispo", "vespo"):
                w[b][t] = m / max(1.0, total if num_items is None else num_items)
            else:  # luspo
                w[b][t] = m / B
    return w


def _clipped_term(r, A, o):
    """(l, dl/dlog r) of -min(min(r, delta) A, clip(r) A), ties split evenly as torch.minimum does."""
    lo, hi, delta = 1 - o["epsilon_low"], 1 + o["epsilon_high"], o["delta"]
    r1 = r if delta is None else min(r, delta)
    t1, t2 = r1 * A, min(max(r, lo), hi) * A
    d1 = r * A if (delta is None or r < delta) else 0.0
    d2 = r * A if lo < r < hi else 0.0
    if t1 < t2:
        return -t1, -d1
    if t2 < t1:
        return -t2, -d2
    return -t1, -(d1 + d2) / 2


def _phi(A, logp_row, old_row, mask_row, rho_row, o):
    s = sum(m * min(max(lp - od, -20.0), 20.0) for lp, od, m in zip(logp_row, old_row, mask_row))
    if rho_row is not None:
        s += sum(min(max(math.log(x), LOG_FLOOR), 20.0) for x in rho_row)
    log_w = min(max(s, LOG_FLOOR), 20.0)
    k, lam = (o["vespo_k_pos"], o["vespo_lambda_pos"]) if A >= 0 else (o["vespo_k_neg"], o["vespo_lambda_neg"])
    return math.exp(lam + k * log_w - lam * math.exp(log_w))


def closed_form(logp, mask, adv, old, ref, rho, num_items, entropy, o):
    """(L, g = dL/dlogp, metrics) from docs/design.md's formulas, element by element."""
    lt, seq = o["loss_type"], o["importance_sampling_level"] == "sequence"
    L_ = lambda x: None if x is None else x.tolist()  # noqa: E731
    logp, mask, old, ref, rho, entropy = map(L_, (logp, mask, old, ref, rho, entropy))
    B, T = len(mask), len(mask[0])
    adv = adv.tolist()
    A_ = lambda b, t: adv[b][t] if isinstance(adv[b], list) else adv[b]  # noqa: E731
    w = _weights(lt, mask, num_items, o["max_completion_length"])
    beta, bc = o["beta"], o["use_bias_correction_kl"]
    loss, g = 0.0, [[0.0] * T for _ in range(B)]
    low = high = region = cis = 0.0
    kl_sum = 0.0
    for b in range(B):
        n_b = sum(mask[b])
        if seq:
            r_seq = math.exp(sum(m * (lp - od) for lp, od, m in zip(logp[b], old[b], mask[b])) / max(1.0, n_b))
        via_r = 0.0  # sum_t' w_t' * dl_t'/dlog r  (sequence level: every token's loss depends on r_b)
        for t in range(T):
            r = r_seq if seq else math.exp(logp[b][t] - old[b][t])
            A = A_(b, t)
            p = rho[b][t] if (rho is not None and lt != "vespo") else 1.0
            if lt in oracle.CLIPPED_TYPES:
                l, dr = _clipped_term(r, A, o)
                dlp = 0.0
            elif lt == "cispo":
                c = min(r, o["epsilon_high"])
                l, dr, dlp = -c * A * logp[b][t], 0.0, -c * A
            elif lt == "sapo":
                kap = o["sapo_temperature_pos"] if A > 0 else o["sapo_temperature_neg"]
                s = 1.0 / (1.0 + math.exp(-kap * (r - 1.0)))
                l, dr, dlp = -s * 4.0 / kap * A, -4.0 * s * (1.0 - s) * r * A, 0.0
            else:
                phi = _phi(A, logp[b], old[b], mask[b], None if rho is None else rho[b], o)
                l, dr, dlp = -phi * A * logp[b][t], 0.0, -phi * A
            l, dr, dlp = l * p, dr * p, dlp * p
            if beta:
                d = ref[b][t] - logp[b][t]
                k = math.exp(d) - d - 1.0
                kl_sum += mask[b][t] * (k * r if bc else k)
                l += beta * (k * r if bc else k)
                dlp += beta * (1.0 - math.exp(d)) * (r if bc else 1.0)
                dr += beta * k * r if bc else 0.0
            loss += w[b][t] * l
            g[b][t] += w[b][t] * dlp
            if seq:
                via_r += w[b][t] * dr
            else:
                g[b][t] += w[b][t] * dr
            # clip metrics, token level (masked) - sequence level handled below
            if not seq:
                lo_c = lt in oracle.CLIPPED_TYPES and _capped(r, o) < 1 - o["epsilon_low"] and A < 0
                hi_c = lt in oracle.CLIPPED_TYPES and _capped(r, o) > 1 + o["epsilon_high"] and A > 0
                low += mask[b][t] * lo_c
                high += mask[b][t] * hi_c
                region += mask[b][t] * (lo_c or hi_c)
                cis += mask[b][t] * (lt == "cispo" and r > o["epsilon_high"] and A > 0)
        if seq:
            for t in range(T):
                g[b][t] += mask[b][t] / max(1.0, n_b) * via_r
            A = adv[b]  # sequence-level metrics: adv is (B,) here
            lo_c = _capped(r_seq, o) < 1 - o["epsilon_low"] and A < 0
            hi_c = _capped(r_seq, o) > 1 + o["epsilon_high"] and A > 0
            low, high, region = low + lo_c, high + hi_c, region + (lo_c or hi_c)
    total = max(1.0, sum(map(sum, mask)))
    denom = B if seq else total
    metrics = dict(kl=kl_sum / total if beta else None, entropy=None)
    if lt in oracle.CLIPPED_TYPES:
        metrics.update(clip_ratio_low=low / denom, clip_ratio_high=high / denom, clip_ratio=region / denom)
    elif lt == "cispo":
        metrics.update(clip_ratio=cis / total)
    if entropy is not None:
        metrics["entropy"] = sum(e * m for er, mr in zip(entropy, mask) for e, m in zip(er, mr)) / total
    return loss, torch.tensor(g, dtype=F64), metrics


def _capped(r, o):
    return r if o["delta"] is None else min(r, o["delta"])


# --------------------------------------------------------------------------------------------------------- tests
def _problem(seed, B=4, T=6, adv_bt=False, old=True, vllm=False, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    mask = oracle.random_mask(B, T, g)
    if empty_row:
        mask[1] = 0.0
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 3 - 0.05
    adv = torch.randn(B, T, generator=g, dtype=F64) if adv_bt else torch.randn(B, generator=g, dtype=F64)
    oldl = logp + 0.35 * torch.randn(B, T, generator=g, dtype=F64) if old else None
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    rho = torch.exp(0.25 * torch.randn(B, T, generator=g, dtype=F64)) if vllm else None
    ent = torch.rand(B, T, generator=g, dtype=F64) * 2
    return logp, mask, adv, oldl, ref, rho, ent


CASES = [
    (lt, lv, beta, bc, delta, vllm, old, adv_bt, nib)
    for (lt, lv) in oracle.valid_combos()
    for beta, bc in ((0.0, False), (0.04, False), (0.3, True))
    for delta in ((None, 1.5) if lt in oracle.CLIPPED_TYPES else (None,))
    for vllm in (False, True)
    for old in (True, False)
    for adv_bt in ((False, True) if lv == "token" else (False,))
    for nib in ((None, 40) if lt in oracle.NUM_ITEMS_TYPES else (None,))
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_oracle_matches_closed_form(case):
    lt, lv, beta, bc, delta, vllm, old, adv_bt, nib = CASES[case]
    logp, mask, adv, oldl, ref, rho, ent = _problem(case, adv_bt=adv_bt, old=old, vllm=vllm)
    o = dict(oracle.DEFAULTS, loss_type=lt, importance_sampling_level=lv, beta=beta, use_bias_correction_kl=bc,
             delta=delta, max_completion_length=8, sapo_temperature_neg=1.3)
    lp = logp.clone().requires_grad_(True)
    loss, metrics = oracle.grpo_loss(lp, mask, adv, oldl, ref if beta else None, rho, nib, entropy=ent, **o)
    (grad,) = torch.autograd.grad(loss, lp)
    exp_loss, exp_grad, exp_metrics = closed_form(
        logp, mask, adv, logp if oldl is None else oldl, ref, rho, nib, ent, o
    )
    assert abs(loss.item() - exp_loss) <= 1e-12 * max(1.0, abs(exp_loss)), (loss.item(), exp_loss)
    assert rel_err(grad, exp_grad) < 1e-11
    assert grad[1].abs().max() == 0  # the fully masked row gets no gradient
    for k, v in exp_metrics.items():
        got = metrics[k]
        if v is None:
            assert got is None, k
        else:
            assert abs(float(got) - v) < 1e-12, (k, float(got), v)


def test_problems_exercise_every_branch():
    """The random problems above really hit clipping on both sides, delta, and vespo's phi away from 1."""
    seen = dict(low=0.0, high=0.0, delta=0)
    for seed in range(6):
        logp, mask, adv, oldl, *_ = _problem(seed)
        _, m = oracle.grpo_loss(logp, mask, adv, oldl, loss_type="grpo")
        seen["low"] += float(m["clip_ratio_low"])
        seen["high"] += float(m["clip_ratio_high"])
        r = torch.exp(logp - oldl)
        seen["delta"] += int(((r > 1.5) & (adv[:, None] < 0) & (mask > 0)).sum())
    assert seen["low"] > 0 and seen["high"] > 0 and seen["delta"] > 0, seen
    logp, mask, adv, oldl, *_ = _problem(0)
    phi = oracle.vespo_phi(adv[:, None], logp - oldl, mask, None, 2.0, 3.0, 3.0, 2.0)
    assert (phi - 1).abs().max() > 0.05


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("lt,lv", [("dapo", "token"), ("grpo", "sequence"), ("vespo", "token"), ("sapo", "token")])
def test_oracle_chain_rule_through_logits(lt, lv, temperature):
    """dL/dz = g (onehot - p): the fused oracle's hidden/weight/bias grads follow from g = dL/dlogp."""
    p = oracle.make_problem(B=3, T=5, H=16, V=29, seed=3, bias=True, ref="model", vllm=True, num_items="int")
    opts = dict(loss_type=lt, importance_sampling_level=lv, beta=0.1, temperature=temperature, max_completion_length=7)
    loss, _, grads = oracle.oracle_run(p, **opts)
    h = p["hidden"].to(F64).reshape(-1, 16)
    W, b = p["weight"].to(F64), p["bias"].to(F64)
    z = (h @ W.t() + b) / temperature
    prob = torch.softmax(z, -1)
    with torch.no_grad():
        ref, _ = oracle.logprobs(p["ref_input"], p["ref_weight"], p["selected_token_ids"], p["ref_bias"], temperature)
    lp, _ = oracle.logprobs(h, W, p["selected_token_ids"], b, temperature)
    lp = lp.detach().requires_grad_(True)
    args = {k: p.get(k) for k in ("old_per_token_logps", "vllm_is_ratio", "num_items_in_batch")}
    loss2, _ = oracle.grpo_loss(lp, p["attention_mask"], p["advantages"], args["old_per_token_logps"], ref,
                                args["vllm_is_ratio"], args["num_items_in_batch"], **opts)
    (g,) = torch.autograd.grad(loss2, lp)
    assert abs(loss.item() - loss2.item()) < 1e-12
    onehot = torch.nn.functional.one_hot(p["selected_token_ids"].reshape(-1), 29).to(F64)
    dz = g.reshape(-1, 1) * (onehot - prob) / temperature
    assert rel_err(grads["hidden"].reshape(-1, 16), dz @ W) < 1e-11
    assert rel_err(grads["weight"], dz.t() @ h) < 1e-11
    assert rel_err(grads["bias"], dz.sum(0)) < 1e-11


def test_logprobs_and_entropy_by_hand():
    g = torch.Generator().manual_seed(0)
    h, W, b = torch.randn(7, 5, generator=g), torch.randn(11, 5, generator=g), torch.randn(11, generator=g)
    y = torch.randint(0, 11, (7,), generator=g)
    lp, ent = oracle.logprobs(h, W, y, b, temperature=0.7)
    for i in range(7):
        z = [(sum(W[v, j].item() * h[i, j].item() for j in range(5)) + b[v].item()) / 0.7 for v in range(11)]
        lse = math.log(sum(math.exp(x) for x in z))
        p = [math.exp(x - lse) for x in z]
        assert abs(lp[i].item() - (z[y[i]] - lse)) < 1e-12
        assert abs(ent[i].item() - (lse - sum(pi * zi for pi, zi in zip(p, z)))) < 1e-12


def test_sequence_level_clip_metric_is_a_mean_over_sequences():
    """TRL's global_masked_mean on a (B, 1) flag: plain mean over sequences, not weighted by their length."""
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]])
    logp = torch.full((2, 4), -1.0, dtype=F64)
    old = logp.clone()
    old[0, 0] = -1.5  # row 0: r = e^0.5 > 1.2, A > 0 -> high-clipped; row 1: r = 1
    _, m = oracle.grpo_loss(logp, mask, torch.tensor([1.0, 1.0]), old, loss_type="grpo",
                            importance_sampling_level="sequence")
    assert float(m["clip_ratio_high"]) == 0.5 and float(m["clip_ratio"]) == 0.5  # token-weighted would be 1/5
    _, m = oracle.grpo_loss(logp, mask, torch.tensor([1.0, 1.0]), old, loss_type="grpo")
    assert float(m["clip_ratio_high"]) == 0.2


def test_delta_caps_the_ratio_seen_by_clip_metrics_but_not_kl_correction():
    logp = torch.tensor([[-1.0]], dtype=F64)
    old = torch.tensor([[-1.7]], dtype=F64)  # r = e^0.7 ~ 2.01
    ref = torch.tensor([[-1.3]], dtype=F64)
    one = torch.ones(1, 1)
    _, m = oracle.grpo_loss(logp, one, torch.tensor([1.0]), old, loss_type="bnpo", delta=1.1)
    assert float(m["clip_ratio_high"]) == 0.0  # capped ratio 1.1 < 1.2
    _, m = oracle.grpo_loss(logp, one, torch.tensor([1.0]), old, loss_type="bnpo")
    assert float(m["clip_ratio_high"]) == 1.0
    loss, m = oracle.grpo_loss(logp, one, torch.tensor([-1.0]), old, ref, loss_type="bnpo", delta=1.1, beta=0.5,
                               use_bias_correction_kl=True)
    d = -0.3
    kl = (math.exp(d) - d - 1) * math.exp(0.7)  # un-capped ratio
    assert abs(float(m["kl"]) - kl) < 1e-12
    assert abs(loss.item() - (1.2 + 0.5 * kl)) < 1e-12  # A < 0: -min(1.1 * -1, 1.2 * -1) = 1.2
    loss, _ = oracle.grpo_loss(logp, one, torch.tensor([-1.0]), old, loss_type="bnpo", delta=1.5)
    assert abs(loss.item() - 1.5) < 1e-12  # delta above 1 + eps_high caps the negative-advantage ratio


@pytest.mark.parametrize("lt,lv", oracle.valid_combos())
def test_fully_masked_batch_is_exactly_zero(lt, lv):
    p = oracle.make_problem(seed=5, mask="empty", ref="given", vllm=True)
    loss, metrics, grads = oracle.oracle_run(p, loss_type=lt, importance_sampling_level=lv, beta=0.1,
                                             max_completion_length=5)
    assert loss.item() == 0.0
    assert all(v.abs().max() == 0 for v in grads.values())
    for k, v in metrics.items():
        if k != "phi_seq_mean":  # TRL averages phi over sequences, masked or not
            assert v is None or float(v) == 0.0, k


def test_num_items_in_batch_normalizer():
    logp, mask, adv, oldl, *_ = _problem(2, empty_row=False)
    base, _ = oracle.grpo_loss(logp, mask, adv, oldl, loss_type="dapo")
    for n in (50, torch.tensor(50), torch.tensor(50.0)):
        loss, _ = oracle.grpo_loss(logp, mask, adv, oldl, num_items_in_batch=n, loss_type="dapo")
        assert abs(loss.item() - base.item() * mask.sum().item() / 50) < 1e-12
    zero, _ = oracle.grpo_loss(logp, mask, adv, oldl, num_items_in_batch=0, loss_type="dapo")
    assert abs(zero.item() - base.item() * mask.sum().item()) < 1e-12  # clamp(min=1)
    for lt in ("grpo", "bnpo", "luspo", "sapo"):  # the others ignore it
        a, _ = oracle.grpo_loss(logp, mask, adv, oldl, num_items_in_batch=50, loss_type=lt)
        b, _ = oracle.grpo_loss(logp, mask, adv, oldl, loss_type=lt)
        assert a.item() == b.item()


def test_vespo_phi_is_one_on_policy():
    logp, mask, adv, *_ = _problem(1)
    phi = oracle.vespo_phi(adv[:, None], logp - logp, mask, None, 2.0, 3.0, 3.0, 2.0)
    assert torch.allclose(phi, torch.ones_like(phi), rtol=0, atol=1e-14)


@pytest.mark.parametrize("opts,exc", [
    (dict(loss_type="nope"), ValueError),
    (dict(importance_sampling_level="nope"), ValueError),
    (dict(loss_type="dr_grpo"), ValueError),
    (dict(loss_type="sapo", importance_sampling_level="sequence"), ValueError),
    (dict(bogus=1), TypeError),
])
def test_oracle_rejects_what_trl_rejects(opts, exc):
    logp, mask, adv, *_ = _problem(0)
    with pytest.raises(exc):
        oracle.grpo_loss(logp, mask, adv, **opts)


def test_oracle_combos_cover_trl():
    assert len(oracle.valid_combos()) == 13
    assert not set(itertools.chain(oracle.TOKEN_ONLY_TYPES)) & set(oracle.CLIPPED_TYPES)
