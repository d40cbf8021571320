"""Vocab-parallel (process_group=...): two gloo processes, each holding a contiguous, uneven shard of the LM head
(V = 1001 -> rows 0..500 on rank 0, 501..1000 on rank 1), give the single-process results: loss, metrics, dH,
each rank's dW and db rows, log-probs and entropy and their gradients. Checked against the same function on the
full weight in one process and against the float64 oracle (full logits, autograd).

One spawn runs every case (starting processes dominates the time); the comparisons run in the test process.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import grpo_kernels as gk
import oracle
from conftest import rel_err

V, B, T, H = 1001, 3, 7, 16
SPLIT = (0, 501, 1001)  # rank r holds rows SPLIT[r]:SPLIT[r + 1]

# name -> (problem kwargs, loss options, frozen head)
LOSS_CASES = {
    "dapo_token_kl_bias": (dict(seed=1, bias=True, ref="given"),
                           dict(loss_type="dapo", beta=0.04, compute_entropy=True, chunk_size=5), False),
    "grpo_sequence_kl_refmodel_bias": (dict(seed=2, bias=True, ref="model"),
                                       dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04,
                                            temperature=0.7, chunk_size=4), False),
    # beta = 0 and one zero advantage: that sequence is skipped, its entropy comes from a forward-only pass
    "dapo_skip_entropy_num_items": (dict(seed=3, bias=True, ref=None, num_items="int", zero_adv=1),
                                    dict(loss_type="dapo", compute_entropy=True, chunk_size=6), False),
    "grpo_token_frozen_head": (dict(seed=4, bias=False, ref="given"), dict(loss_type="grpo", beta=0.1), True),
    "dapo_empty_mask": (dict(seed=6, bias=True, ref="given", mask="empty"), dict(loss_type="dapo", beta=0.04), False),
    "bnpo_token_fp64": (dict(seed=5, bias=True, ref="given", dtype=torch.float64),
                        dict(loss_type="bnpo", beta=0.04, compute_entropy=True, temperature=1.3), False),
}
# bf16 on the CPU: dL/dlogits rounded to bf16 as the GEMM operand (pack_rows_), dW summed in fp32 in place
BF16_LOSS = (dict(seed=9, bias=True, ref="given", dtype=torch.bfloat16),
             dict(loss_type="dapo", beta=0.04, compute_entropy=True, temperature=0.9, chunk_size=5))
# fp16, tiny per-token weights and a GradScaler-like grad_output: gradients deferred to the backward
FP16_LOSS = (dict(seed=10, bias=True, ref="given", dtype=torch.float16, num_items=200000),
             dict(loss_type="dapo", beta=0.05, temperature=0.9, chunk_size=5))
FP16_SCALE = 2.0 ** 16
# name -> (seed, temperature, bias, return_entropy, frozen head, chunk_size)
LOGP_CASES = {
    "logp_entropy_bias": (11, 0.7, True, True, False, 4),
    "logp_frozen_head": (12, 1.0, False, True, True, None),
    "logp_only": (13, 1.2, True, False, False, 8),
}


def _problem(seed, zero_adv=None, dtype=torch.float32, num_items=None, **kw):
    if isinstance(num_items, int):
        p = oracle.make_problem(B, T, H, V, seed=seed, dtype=dtype, **kw)
        p["num_items_in_batch"] = num_items
    else:
        p = oracle.make_problem(B, T, H, V, seed=seed, dtype=dtype, num_items=num_items, **kw)
    if zero_adv is not None:
        p["advantages"][zero_adv] = 0.0
    return p


def _shard(p: dict, rank: int) -> dict:
    lo, hi = SPLIT[rank], SPLIT[rank + 1]
    out = dict(p)
    for k in ("weight", "bias", "ref_weight", "ref_bias"):
        if out.get(k) is not None:
            out[k] = out[k][lo:hi].clone()
    return out


def _leaves(p: dict, frozen: bool) -> dict:
    out = dict(p)
    for k in ("hidden", "weight", "bias"):
        if out.get(k) is not None:
            out[k] = out[k].detach().clone().requires_grad_(not (frozen and k != "hidden"))
    return out


def _run_loss(p, opts, frozen, pg=None, grad_output=0.75):
    a = _leaves(p, frozen)
    loss, metrics = gk.fused_linear_grpo_loss(**a, process_group=pg, backend="torch", **opts)
    (loss * grad_output).backward()  # grad_output != 1 reaches every gradient
    grads = {k: a[k].grad for k in ("hidden", "weight", "bias") if a.get(k) is not None and a[k].requires_grad}
    return dict(loss=loss.detach(), metrics=metrics.as_dict(), grads=grads)


def _logp_inputs(seed, bias):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.4
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    g_logp, g_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    return hidden, weight, b, targets, g_logp, g_ent


def _run_logp(case, rank=None, pg=None, dtype=torch.float32):
    seed, tau, bias, with_ent, frozen, chunk = LOGP_CASES[case]
    hidden, weight, b, targets, g_logp, g_ent = _logp_inputs(seed, bias)
    hidden, weight, b = hidden.to(dtype), weight.to(dtype), None if b is None else b.to(dtype)
    if rank is not None:
        lo, hi = SPLIT[rank], SPLIT[rank + 1]
        weight, b = weight[lo:hi].clone(), None if b is None else b[lo:hi].clone()
    a = _leaves(dict(hidden=hidden, weight=weight, bias=b), frozen)
    out = gk.linear_logprobs(a["hidden"], a["weight"], targets, a["bias"], temperature=tau, return_entropy=with_ent,
                             chunk_size=chunk, process_group=pg)
    logp, ent = out if with_ent else (out, None)
    objective = (logp * g_logp).sum() + (0.0 if ent is None else (ent * g_ent).sum())
    objective.backward()
    grads = {k: a[k].grad for k in ("hidden", "weight", "bias") if a.get(k) is not None and a[k].requires_grad}
    with torch.no_grad():  # the forward alone, no autograd graph
        nograd = gk.linear_logprobs(hidden, weight, targets, b, temperature=tau, chunk_size=chunk, process_group=pg)
    return dict(logp=logp.detach(), entropy=None if ent is None else ent.detach(), grads=grads, nograd=nograd)


def _expect_error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _bad_inputs(rank, pg) -> dict:
    p = _shard(_problem(21, ref="given"), rank)
    out = {}
    hidden = p["hidden"].clone()
    if rank == 1:
        hidden[1, 3, 5] += 0.25  # one element of one token
    differ = dict(p, hidden=hidden)
    out["hidden_differs"] = _expect_error(lambda: gk.fused_linear_grpo_loss(**differ, process_group=pg, beta=0.04))
    bad_ids = p["selected_token_ids"].clone()
    bad_ids[0, 0] = V  # inside no shard; ids in [501, 1001) are fine on rank 0 (see the cases above)
    out["ids_out_of_range"] = _expect_error(lambda: gk.fused_linear_grpo_loss(
        **dict(p, selected_token_ids=bad_ids, attention_mask=torch.ones(B, T)), process_group=pg))
    out["logp_ids_out_of_range"] = _expect_error(lambda: gk.linear_logprobs(
        p["hidden"], p["weight"], bad_ids, process_group=pg))
    n = B * T - rank  # rank 1 holds one token fewer
    out["token_count_differs"] = _expect_error(lambda: gk.linear_logprobs(
        p["hidden"].reshape(B * T, H)[:n], p["weight"], p["selected_token_ids"].reshape(-1)[:n], process_group=pg))
    out["fused_strategy"] = _expect_error(lambda: gk.fused_linear_grpo_loss(**p, process_group=pg, strategy="fused"))
    out["not_a_group"] = _expect_error(lambda: gk.linear_logprobs(p["hidden"], p["weight"], p["selected_token_ids"],
                                                                  process_group="world"))
    return out


def _chunk_agreement(rank, pg) -> dict:
    """Ranks asking for different chunk rows (their own memory on a GPU, or chunk_size) run with the smallest;
    a rank that cannot fit a chunk makes every rank raise instead of leaving the others in a collective."""
    from grpo_kernels import vocab_parallel as vp

    p = _shard(_problem(**LOSS_CASES["dapo_token_kl_bias"][0]), rank)
    shard = vp.shard_layout(pg, p["weight"], B * T)
    h = p["hidden"].reshape(-1, H)
    out = dict(given=vp.agreed_chunk_rows(shard, "test", 3 if rank == 0 else 5, B * T, h, True),
               sized={dt: vp.agreed_chunk_rows(shard, "test", None, 10 ** 6, h.to(dt), wg)
                      for dt, wg in ((torch.float32, True), (torch.bfloat16, False))})
    opts = dict(LOSS_CASES["dapo_token_kl_bias"][1], chunk_size=3 if rank == 0 else 5)
    out["mixed_chunk_loss"] = _run_loss(p, opts, False, pg)
    real = vp.size_call

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("rank 1: no memory (test). Pass strategy='fused' (O(tokens) extra "
                                          "memory), a smaller chunk_size, or free memory.")  # sizing's wording

    vp.size_call = no_memory if rank == 1 else real
    try:
        out["oom"] = "no error"
        vp.agreed_chunk_rows(shard, "test", None, B * T, h, True)
    except torch.cuda.OutOfMemoryError as e:
        out["oom"] = str(e)
    finally:
        vp.size_call = real
    return out


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    pg = dist.group.WORLD
    try:
        res = {}
        for name, (prob, opts, frozen) in LOSS_CASES.items():
            res[name] = _run_loss(_shard(_problem(**prob), rank), opts, frozen, pg)
        prob, opts, _ = LOSS_CASES["dapo_token_kl_bias"]
        module = gk.FusedLinearGRPOLoss(process_group=pg, backend="torch", **opts)
        res["module"] = _module_run(module, _shard(_problem(**prob), rank))
        for name in LOGP_CASES:
            res[name] = _run_logp(name, rank, pg)
        res["errors"] = _bad_inputs(rank, pg)
        res["bf16_loss"] = _run_loss(_shard(_problem(**BF16_LOSS[0]), rank), BF16_LOSS[1], False, pg)
        res["bf16_logp"] = _run_logp("logp_entropy_bias", rank, pg, dtype=torch.bfloat16)
        res["chunks"] = _chunk_agreement(rank, pg)
        res["fp16_loss"] = _run_loss(_shard(_problem(**FP16_LOSS[0]), rank), FP16_LOSS[1], False, pg, FP16_SCALE)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _module_run(module, p):
    a = _leaves(p, False)
    loss, metrics = module(a["hidden"], a["weight"], a["selected_token_ids"], a["attention_mask"], a["advantages"],
                           bias=a["bias"], ref_per_token_logps=a["ref_per_token_logps"],
                           old_per_token_logps=a["old_per_token_logps"])
    (loss * 0.75).backward()
    return dict(loss=loss.detach(), metrics=metrics.as_dict(),
                grads={k: a[k].grad for k in ("hidden", "weight", "bias")})


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_parallel")
    mp.spawn(_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


# ----------------------------------------------------------------------------------------------- comparisons

def _check_grads(got_by_rank, expected, tol, label, dtype):
    """dH: the full gradient on every rank; dW and db: each rank's rows of the full gradient."""
    for r, got in enumerate(got_by_rank):
        assert set(got) == set(expected), f"{label} rank {r}: grads {sorted(got)} != {sorted(expected)}"
        for k, ref in expected.items():
            want = ref if k == "hidden" else ref[SPLIT[r]:SPLIT[r + 1]]
            assert got[k].dtype == dtype, f"{label} rank {r} grad {k}: dtype {got[k].dtype}"
            err = rel_err(got[k], want)
            assert err <= tol, f"{label} rank {r} grad {k}: rel err {err:.2e}"


@pytest.mark.parametrize("case", sorted(LOSS_CASES) + ["module"])
def test_loss_matches_single_process_and_float64(ranks, case):
    prob, opts, frozen = LOSS_CASES["dapo_token_kl_bias" if case == "module" else case]
    p = _problem(**prob)
    dtype = p["hidden"].dtype
    single = _run_loss(p, opts, frozen)
    o_loss, o_metrics, o_grads = oracle.oracle_run(p, **{k: v for k, v in opts.items()
                                                         if k not in ("compute_entropy", "chunk_size")})
    o_grads = {k: v * 0.75 for k, v in o_grads.items() if k == "hidden" or not frozen}
    single_tol, oracle_tol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    for r in range(2):
        got = ranks[r][case]
        assert rel_err(got["loss"], single["loss"]) <= single_tol, (r, float(got["loss"]), float(single["loss"]))
        assert rel_err(got["loss"], o_loss) <= oracle_tol
        assert got["metrics"].keys() == single["metrics"].keys()
        for k, v in single["metrics"].items():
            assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (r, k)
    if opts.get("compute_entropy"):
        assert ranks[0][case]["metrics"]["entropy"] == pytest.approx(float(o_metrics["entropy"]), rel=1e-5)
    if opts.get("beta"):
        assert ranks[0][case]["metrics"]["kl"] == pytest.approx(float(o_metrics["kl"]), rel=1e-5)
    _check_grads([ranks[r][case]["grads"] for r in range(2)], single["grads"], single_tol, f"{case} vs single",
                 dtype)
    _check_grads([ranks[r][case]["grads"] for r in range(2)], o_grads, oracle_tol, f"{case} vs float64", dtype)


@pytest.mark.parametrize("case", sorted(LOGP_CASES))
def test_logprobs_and_entropy_with_gradients_match_float64(ranks, case):
    seed, tau, bias, with_ent, frozen, chunk = LOGP_CASES[case]
    hidden, weight, b, targets, g_logp, g_ent = _logp_inputs(seed, bias)
    leaves = _leaves(dict(hidden=hidden.double(), weight=weight.double(), bias=None if b is None else b.double()),
                     frozen)
    logp, ent = oracle.logprobs(leaves["hidden"], leaves["weight"], targets, leaves["bias"], temperature=tau)
    objective = (logp * g_logp.double()).sum() + ((ent * g_ent.double()).sum() if with_ent else 0.0)
    objective.backward()
    o_grads = {k: leaves[k].grad for k in ("hidden", "weight", "bias") if leaves.get(k) is not None and
               leaves[k].requires_grad}
    single = gk.linear_logprobs(hidden, weight, targets, b, temperature=tau, backend="torch")
    for r in range(2):
        got = ranks[r][case]
        assert got["logp"].dtype == torch.float32 and got["logp"].shape == targets.shape
        assert rel_err(got["logp"], logp) <= 1e-5
        assert rel_err(got["logp"], single) <= 1e-5
        assert rel_err(got["nograd"], logp) <= 1e-5
        if with_ent:
            assert got["entropy"].dtype == torch.float32 and rel_err(got["entropy"], ent) <= 1e-5
        else:
            assert got["entropy"] is None
    _check_grads([ranks[r][case]["grads"] for r in range(2)], o_grads, 1e-4, case,
                 torch.float32)


def test_bf16_loss_and_logprobs_match_float64(ranks):
    """16-bit inputs: fp32 logits and statistics, bf16 dL/dlogits as the GEMM operand, grads in bf16."""
    p = _problem(**BF16_LOSS[0])
    opts = {k: v for k, v in BF16_LOSS[1].items() if k not in ("compute_entropy", "chunk_size")}
    e_loss, e_metrics, e_grads = oracle.oracle_run(p, **opts)
    r_loss, _, r_grads = oracle.oracle_run(p, logit_dtype=torch.bfloat16, **opts)
    for r in range(2):
        got = ranks[r]["bf16_loss"]
        assert got["loss"].dtype == torch.float32
        assert rel_err(got["loss"], e_loss) <= max(1e-2, 2 * rel_err(r_loss, e_loss))
        assert got["metrics"]["entropy"] == pytest.approx(float(e_metrics["entropy"]), rel=1e-2)
    assert all(set(ranks[r]["bf16_loss"]["grads"]) == set(e_grads) for r in range(2))
    for k in e_grads:
        budget = max(1e-2, 2 * rel_err(r_grads[k], e_grads[k]))
        _check_grads([{k: ranks[r]["bf16_loss"]["grads"][k]} for r in range(2)], {k: e_grads[k] * 0.75}, budget,
                     f"bf16 loss grad {k}", torch.bfloat16)
    seed, tau, bias, _, _, _ = LOGP_CASES["logp_entropy_bias"]
    hidden, weight, b, targets, g_logp, g_ent = _logp_inputs(seed, bias)
    leaves = _leaves(dict(hidden=hidden.bfloat16().double(), weight=weight.bfloat16().double(),
                          bias=b.bfloat16().double()), False)
    logp, ent = oracle.logprobs(leaves["hidden"], leaves["weight"], targets, leaves["bias"], temperature=tau)
    ((logp * g_logp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    for r in range(2):
        got = ranks[r]["bf16_logp"]
        assert got["logp"].dtype == torch.float32 and rel_err(got["logp"], logp) <= 1e-4  # logits stay fp32
        assert rel_err(got["entropy"], ent) <= 1e-4 and rel_err(got["nograd"], logp) <= 1e-4
    _check_grads([ranks[r]["bf16_logp"]["grads"] for r in range(2)],
                 {k: leaves[k].grad for k in ("hidden", "weight", "bias")}, 1e-2, "bf16 logp", torch.bfloat16)


def test_fp16_small_gradients_survive_grad_scaler(ranks):
    """As tests/test_fused_linear_grpo.py's test of that name: unscaled, dL/dlogits and the gradients sit below
    fp16's normal range, so made in the forward with grad_output = 1 they would underflow; scaled gradients must
    match float64 * 2**16 to fp16 precision on every rank."""
    p = _problem(**FP16_LOSS[0])
    opts = {k: v for k, v in FP16_LOSS[1].items() if k != "chunk_size"}
    _, _, e_grads = oracle.oracle_run(p, **opts)
    for k, e in e_grads.items():
        assert e.abs().max() * FP16_SCALE > 6e-5 and e.abs().max() < 6e-5, k
    _check_grads([ranks[r]["fp16_loss"]["grads"] for r in range(2)], {k: e * FP16_SCALE for k, e in e_grads.items()},
                 1e-2, "fp16 scaled", torch.float16)


def test_ranks_agree_on_chunk_rows_and_fail_together(ranks):
    from grpo_kernels.sizing import default_chunk_size

    rows = [SPLIT[r + 1] - SPLIT[r] for r in range(2)]
    for r in range(2):
        got = ranks[r]["chunks"]
        assert got["given"] == 3
        for dt, wg in ((torch.float32, True), (torch.bfloat16, False)):
            # per row: z, p and one transient, all fp32 whatever the input dtype = the fp32 torch-epilogue row
            want = min(default_chunk_size(10 ** 6, v, H, torch.float32, torch.device("cpu"), torch_epilogue=True,
                                          weight_grad=wg) for v in rows)
            assert got["sized"][dt] == want, (r, dt, got["sized"][dt], want)
        assert "rank 1: no memory (test)" in got["oom"] if r == 1 else "another rank of process_group" in got["oom"]
        assert "strategy='fused'" not in got["oom"] and "chunk_size" in got["oom"]  # the advice that applies here
    single = _run_loss(_problem(**LOSS_CASES["dapo_token_kl_bias"][0]), LOSS_CASES["dapo_token_kl_bias"][1], False)
    for r in range(2):
        got = ranks[r]["chunks"]["mixed_chunk_loss"]
        assert rel_err(got["loss"], single["loss"]) <= 1e-5
    _check_grads([ranks[r]["chunks"]["mixed_chunk_loss"]["grads"] for r in range(2)], single["grads"], 1e-5,
                 "chunk_size 3 on rank 0, 5 on rank 1", torch.float32)


def test_bad_inputs_raise_the_same_clear_error_on_every_rank(ranks):
    for r in range(2):
        e = ranks[r]["errors"]
        assert e["hidden_differs"].startswith("ValueError") and "hidden differs" in e["hidden_differs"], e
        for k in ("ids_out_of_range", "logp_ids_out_of_range"):
            assert e[k].startswith("ValueError") and f"[0, {V})" in e[k], e[k]
        assert e["token_count_differs"].startswith("ValueError") and "[21, 20] tokens" in e["token_count_differs"]
        assert e["fused_strategy"].startswith("ValueError") and "strategy='fused'" in e["fused_strategy"]
        assert e["not_a_group"].startswith("TypeError") and "process_group" in e["not_a_group"]


def test_process_group_without_initialized_distributed_is_a_value_error():
    assert not dist.is_initialized()
    p = _problem(31, ref=None)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        gk.fused_linear_grpo_loss(**p, process_group=object())
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        gk.linear_logprobs(p["hidden"], p["weight"], p["selected_token_ids"], process_group=object())
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        gk.FusedLinearGRPOLoss(process_group=object())(p["hidden"], p["weight"], p["selected_token_ids"],
                                                       p["attention_mask"], p["advantages"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_single_rank_group_matches_float64(tmp_path, dtype):
    """The CUDA path (fp32-output GEMM on 16-bit operands, NCCL collectives) on a one-rank NCCL group: the same
    numbers as the float64 oracle (bf16: within what rounding the logits to bf16 once would cost, or 1e-2)."""
    from conftest import compare_bf16_run, compare_run

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        p = oracle.make_problem(4, 33, 64, 5003, seed=7, bias=True, ref="model", dtype=dtype)
        p = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
        opts = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, temperature=0.9)
        run = dict(process_group=dist.group.WORLD, compute_entropy=True, chunk_size=40)
        if dtype == torch.float32:
            fails = compare_run(p, opts, run, oracle.oracle_run(p, **opts), tol=1e-4, metric_tol=1e-5)
        else:
            fails = compare_bf16_run(p, opts, run)
        assert not fails, "\n".join(fails)
        h = p["hidden"].detach().clone().requires_grad_(True)
        logp, ent = gk.linear_logprobs(h, p["weight"], p["selected_token_ids"], p["bias"], temperature=0.9,
                                       return_entropy=True, process_group=dist.group.WORLD)
        o_h = p["hidden"].detach().double().requires_grad_(True)
        o_logp, o_ent = oracle.logprobs(o_h, p["weight"], p["selected_token_ids"], p["bias"], 0.9)
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        assert rel_err(logp, o_logp) <= tol and rel_err(ent, o_ent) <= tol
        (logp.sum() + 0.5 * ent.sum()).backward()
        (o_logp.sum() + 0.5 * o_ent.sum()).backward()
        assert h.grad.dtype == dtype and rel_err(h.grad, o_h.grad) <= tol
    finally:
        dist.destroy_process_group()
