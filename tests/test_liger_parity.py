"""Parity with Liger-Kernel's LigerFusedLinearGRPOLoss (CPU, fp32, compiled=False) where Liger follows TRL.

Skipped when liger_kernel is not installed. Not compared: luspo (Liger normalizes it by B*T instead of TRL's
per-sequence sum / B) and, at the sequence level, the clip ratio (Liger weights it by tokens, TRL averages
over sequences).
"""

import itertools

import pytest

import oracle
from conftest import package_run, rel_err

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

LIGER_COMBOS = [c for c in oracle.valid_combos() if c[0] != "luspo"]


def _liger_run(problem, opts, chunk_size):
    beta = opts.get("beta", 0.0)
    use_ref = beta != 0.0
    loss_fn = liger_grpo.LigerFusedLinearGRPOLoss(compiled=False, use_ref_model=use_ref, chunk_size=chunk_size, **opts)
    h = problem["hidden"].detach().clone().requires_grad_(True)
    w = problem["weight"].detach().clone().requires_grad_(True)
    b = None if problem.get("bias") is None else problem["bias"].detach().clone().requires_grad_(True)
    kw = {k: problem.get(k) for k in ("ref_per_token_logps", "old_per_token_logps", "ref_input", "ref_weight",
                                      "ref_bias", "vllm_is_ratio", "num_items_in_batch")}
    loss, metrics = loss_fn(h, w, problem["selected_token_ids"], problem["attention_mask"], problem["advantages"],
                            bias=b, **kw)
    loss.backward()
    grads = {"hidden": h.grad, "weight": w.grad}
    if b is not None:
        grads["bias"] = b.grad
    return loss.detach(), metrics, grads


CASES = [
    (lt, lv, kl, bias, vllm, temp)
    for (lt, lv), kl, bias, vllm, temp in itertools.product(LIGER_COMBOS, ("off", "given", "model"), (False, True),
                                                           (False, True), (1.0, 0.7))
]


@pytest.mark.parametrize("i", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_parity_with_liger(i):
    lt, lv, kl, bias, vllm, temp = CASES[i]
    p = oracle.make_problem(B=4, T=6, H=24, V=37, seed=500 + i, bias=bias, ref=None if kl == "off" else kl,
                            vllm=vllm, old=i % 3 != 0, num_items="int" if i % 4 == 1 else None)
    opts = dict(loss_type=lt, importance_sampling_level=lv, beta=0.0 if kl == "off" else 0.05, temperature=temp)
    if lt == "dr_grpo":
        opts["max_completion_length"] = 8
    if kl != "off" and i % 2:
        opts["use_bias_correction_kl"] = True
    if lt in oracle.CLIPPED_TYPES and i % 3 == 1:
        opts["delta"] = 1.35
    if lt == "cispo":
        opts["epsilon_high"] = 1.1
    if lt == "sapo" and i % 2:
        opts.update(sapo_temperature_pos=0.7, sapo_temperature_neg=1.5)
    if lt == "vespo" and i % 2:
        opts.update(vespo_k_pos=1.5, vespo_lambda_pos=2.5)
    l_loss, l_metrics, l_grads = _liger_run(p, opts, chunk_size=1 + i % 2)
    loss, metrics, grads = package_run(p, backend="torch", **opts)
    assert rel_err(loss, l_loss) < 1e-4, (float(loss), float(l_loss))
    for k, g in l_grads.items():
        assert rel_err(grads[k], g) < 1e-4, k
    if opts["beta"] != 0.0:
        assert abs(float(metrics.kl) - float(l_metrics[0])) < 1e-5
    if lv == "token":
        assert abs(float(metrics.clip_ratio) - float(l_metrics[-1])) < 1e-5
    # and both against the float64 oracle, so that agreeing with Liger means agreeing with TRL
    o_loss, _, o_grads = oracle.oracle_run(p, **opts)
    assert rel_err(l_loss, o_loss) < 1e-4 and rel_err(l_grads["hidden"], o_grads["hidden"]) < 1e-4


def test_liger_luspo_differs_from_trl_as_documented():
    """Keeps the exclusion honest: Liger's luspo normalizer is not TRL's on ragged masks, ours is TRL's."""
    p = oracle.make_problem(B=4, T=6, seed=7)
    l_loss, _, _ = _liger_run(p, dict(loss_type="luspo"), chunk_size=1)
    o_loss, _, _ = oracle.oracle_run(p, loss_type="luspo")
    loss, _, _ = package_run(p, backend="torch", loss_type="luspo")
    assert rel_err(loss, o_loss) < 1e-5
    assert rel_err(l_loss, o_loss) > 1e-3
