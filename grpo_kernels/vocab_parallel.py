"""Vocab-parallel strategy: every rank of a process group holds the same tokens and a contiguous shard of the LM
head's rows (rank order, shards may differ in size), as in Megatron / verl tensor parallelism.

Math (DESIGN.md, "Vocab-parallel" and "Entropy gradient"). A rank forms z = (h W_r^T + b_r)/tau for its rows only.
Per token: m = max over ranks of the shard maxima (all-reduce MAX); then one all-reduce SUM of
S_r = sum_{v in r} exp(z_v - m), the target logit (z_y - m on the owning rank, 0 elsewhere) and, for the entropy,
A_r = sum_{v in r} exp(z_v - m) (z_v - m). So lse = m + log S, logp = (z_y - m) - log S and
entropy = log S - A/S (two non-negative terms: no cancellation). dL/dz_v = g (1[v = y] - p_v) - e p_v (log p_v +
entropy) needs only these per-token numbers, so dW and db rows stay local and dH is one all-reduce SUM of N x H.

Backend: PyTorch ops on the local shard whatever the device (the Triton epilogues assume the whole vocabulary);
memory is one [chunk, V_r] buffer of fp32 logits plus its softmax. Communication per call: one all_gather of
3 ints per rank (shard layout), per chunk of c tokens one MAX all-reduce of c floats and one SUM all-reduce of 2c
(3c with entropy) floats, and, when hidden needs a gradient, one SUM all-reduce of N x H fp32 (dH).
The returned dH is the full gradient on every rank: do not all-reduce it again (e.g. Megatron's
copy_to_tensor_model_parallel_region in front of the head would double it). Every rank must make the same calls
with the same gradient needs (the all-reduces are collectives); the plan of active tokens is the same everywhere
because the tokens are.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from . import batch as checks
from .batch import make_plan
from .loss_math import token_loss_and_grad
from .metrics import LossMetrics
from .options import LossOptions
from .strategies import _finish_metrics, _Totals

Tensor = torch.Tensor
_GIB = 1 << 30


# ------------------------------------------------------------------------------------------ the shard layout

@dataclasses.dataclass(frozen=True)
class Shard:
    """This rank's rows [offset, offset + size) of a vocabulary of `vocab` ids, split over `world` ranks."""

    group: object
    rank: int
    world: int
    offset: int
    size: int
    vocab: int


def shard_layout(group, weight: Tensor, num_tokens: int, weight_name: str = "weight",
                 hidden_name: str = "hidden") -> Shard:
    """One all_gather of (rows, tokens, hidden size) per rank: offsets from the rank order, and a clear error
    (on every rank alike) when the ranks disagree about the token count or the hidden size."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("process_group does not contain this process")
    mine = torch.tensor([weight.shape[0], num_tokens, weight.shape[1]], dtype=torch.int64, device=weight.device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    rows, tokens, hidden = torch.stack(every).cpu().T.tolist()
    if len(set(tokens)) != 1:
        raise ValueError(f"vocab-parallel ranks must hold the same tokens, but {hidden_name} has {tokens} tokens "
                         "on the ranks of process_group")
    if len(set(hidden)) != 1:
        raise ValueError(f"{weight_name} has hidden sizes {hidden} on the ranks of process_group; they must agree")
    return Shard(group=group, rank=rank, world=world, offset=sum(rows[:rank]), size=rows[rank], vocab=sum(rows))


def check_same_inputs(shard: Shard, named: dict) -> None:
    """validate=True: a cheap checksum (the sum of the row sums, and their sum weighted by the row position) of
    each input, compared across ranks with one MAX and one MIN all-reduce; every rank raises the same ValueError
    on a mismatch. The tolerance (1e-6 of the absolute sums) absorbs summation order (thread counts may differ);
    one differing token still shows in batches of up to about 1e5 tokens, a whole differing batch always."""
    first = next(t for t in named.values() if t is not None)
    sums, scales = [], []
    for t in named.values():
        if t is None or t.numel() == 0:
            sums += [0.0 if t is None else 1.0, 0.0, 0.0]
            scales += [0.0, 0.0, 0.0]
            continue
        rows = t.detach().reshape(t.shape[0], -1).sum(1, dtype=torch.float64)  # no float64 copy of t
        # weights in [1, 2) that differ between neighbours (golden-ratio sequence): swapped rows change the sum
        pos = 1.0 + torch.frac(torch.arange(rows.numel(), dtype=torch.float64, device=rows.device) * 0.6180339887)
        sums += [1.0, rows.sum(), (rows * pos).sum()]
        scales += [0.0, rows.abs().sum(), (rows.abs() * pos).sum()]
    vec = torch.stack([torch.as_tensor(s, dtype=torch.float64, device=first.device) for s in sums + scales])
    hi, lo = vec.clone(), vec.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=shard.group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=shard.group)
    n = len(sums)
    bad = ((hi[:n] - lo[:n]).abs() > 1e-6 * hi[n:] + 1e-12).view(-1, 3).any(1).tolist()
    for name, b in zip(named, bad):
        if b:
            raise ValueError(f"vocab-parallel ranks must hold the same tokens, but {name} differs across the ranks "
                             "of process_group (checksum mismatch)")


def _check_options(opts: LossOptions) -> None:
    if opts.backend == "triton":
        raise ValueError("backend='triton' is not available with process_group: the vocab-parallel path runs "
                         "PyTorch ops on the local shard; use backend='auto' or 'torch'")
    if opts.strategy == "fused":
        raise ValueError("strategy='fused' is not available with process_group: the vocab-parallel path is "
                         "chunked over tokens; use strategy='auto' or 'chunked'")


def _chunk_rows(num_rows: int, shard_rows: int, device: torch.device, chunk_size: Optional[int]) -> int:
    """Rows per chunk so that the fp32 logits buffer and its softmax (two [chunk, V_r] buffers, plus a transient
    one during the backward) stay modest."""
    if chunk_size:
        return chunk_size
    per_row = 3 * shard_rows * 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 4, int(2.5 * _GIB))
    else:
        budget = 96 << 20
    rows = max(16, budget // per_row)
    if rows > 256:
        rows -= rows % 256
    return int(min(rows, max(num_rows, 1)))


# --------------------------------------------------------------------------------------- per-chunk pieces

def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a @ b with a result in `acc`. On CUDA the operands stay in b's dtype (a is cast to it: dL/dlogits may be
    16-bit as a GEMM operand) with an fp32 output; the CPU has no mixed-precision GEMM, so it upcasts."""
    if b.dtype == acc:
        return a.to(acc) @ b
    if b.is_cuda:
        return torch.mm(a.to(b.dtype), b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


def _shard_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float) -> Tensor:
    """z = (h W_r^T + b_r) / tau in fp32 (fp64 for fp64 inputs): never rounded to 16 bits."""
    acc = _acc(h.dtype)
    z = _mm(h, weight.T, acc)
    if bias is not None:
        z.add_(bias.to(acc))
    if temperature != 1.0:
        z.mul_(1.0 / temperature)
    return z


def _local_targets(targets: Tensor, shard: Shard):
    """Target column in this shard (clamped into range) and whether this rank owns the target."""
    t = targets.long() - shard.offset
    owned = (t >= 0) & (t < shard.size)
    return t.clamp(0, shard.size - 1), owned


def _stats(z: Tensor, targets: Tensor, shard: Shard, with_entropy: bool):
    """lse, logp, entropy (None unless asked) over the whole vocabulary, and p = softmax restricted to this shard
    (a second buffer). z is shifted in place to z - m, m the global row max. Two all-reduces of O(rows)."""
    m = z.amax(1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=shard.group)
    z.sub_(m.unsqueeze(1))
    p = torch.exp(z)
    col, owned = _local_targets(targets, shard)
    z_y = torch.where(owned, z.gather(1, col.unsqueeze(1)).squeeze(1), torch.zeros_like(m))
    parts = [p.sum(1), z_y]
    if with_entropy:  # sum_v exp(z_v - m) (z_v - m) as a batched dot: no [rows, V_r] temporary
        parts.append(torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1))
    packed = torch.stack(parts)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=shard.group)
    log_s = packed[0].log()
    entropy = log_s - packed[2] / packed[0] if with_entropy else None
    p.div_(packed[0].unsqueeze(1))
    return m + log_s, packed[1] - log_s, entropy, p


def _dlogits_(p: Tensor, targets: Tensor, shard: Shard, grad: Tensor, temperature: float) -> Tensor:
    """In place on p (this shard's softmax): dL/d(W h + b) = grad (1[v = y] - p_v) / tau."""
    scale = (grad.to(p.dtype) / temperature).unsqueeze(1)
    col, owned = _local_targets(targets, shard)
    p.mul_(-scale)
    p.scatter_add_(1, col.unsqueeze(1), torch.where(owned.unsqueeze(1), scale, torch.zeros_like(scale)))
    return p


class _ShardGrads:
    """dH rows (partial sums over this shard's vocabulary, fp32, all-reduced once at the end), dW and db rows of
    this shard (fp32 across chunks, local, one cast at the end)."""

    def __init__(self, rows: int, h: Tensor, weight: Tensor, bias: Optional[Tensor], needs: tuple):
        acc = _acc(weight.dtype)
        self.needs = needs
        self.d_rows = h.new_zeros(rows, h.shape[1], dtype=acc) if needs[0] else None
        self.d_weight = weight.new_zeros(weight.shape, dtype=acc) if needs[1] else None
        self.d_bias = weight.new_zeros(weight.shape[0], dtype=acc) if needs[2] and bias is not None else None

    def add(self, dz: Tensor, s: int, e: int, h_chunk: Tensor, weight: Tensor) -> None:
        if self.d_rows is not None:
            self.d_rows[s:e] = _mm(dz, weight, self.d_rows.dtype)
        if self.d_weight is not None:
            self.d_weight += _mm(dz.T, h_chunk, self.d_weight.dtype)
        if self.d_bias is not None:
            self.d_bias += dz.sum(0, dtype=self.d_bias.dtype)

    def finish(self, shard: Shard, h: Tensor, weight: Tensor, bias: Optional[Tensor]):
        d_rows = self.d_rows
        if d_rows is not None:
            dist.all_reduce(d_rows, op=dist.ReduceOp.SUM, group=shard.group)
            d_rows = d_rows.to(h.dtype)
        dw = None if self.d_weight is None else self.d_weight.to(weight.dtype)
        db = None if self.d_bias is None else self.d_bias.to(bias.dtype)
        return d_rows, dw, db


def forward_stats(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
                  with_entropy: bool, shard: Shard, chunk: int):
    """lse, logp and entropy of every row of h, without gradients (reference log-probs, skipped-token entropy)."""
    M = h.shape[0]
    acc = _acc(h.dtype)
    lse = torch.empty(M, dtype=acc, device=h.device)
    logp = torch.empty(M, dtype=acc, device=h.device)
    ent = torch.empty(M, dtype=acc, device=h.device) if with_entropy else None
    for s in range(0, M, chunk):
        e = min(M, s + chunk)
        c_lse, c_logp, c_ent, _ = _stats(_shard_logits(h[s:e], weight, bias, temperature), targets[s:e], shard,
                                         with_entropy)
        lse[s:e], logp[s:e] = c_lse, c_logp
        if ent is not None:
            ent[s:e] = c_ent
    return lse, logp, ent


# ------------------------------------------------------------------------------------------------ log-probs

class VocabParallelLogprobs(torch.autograd.Function):
    """logp and entropy of every row, both differentiable; the backward recomputes this shard's logits chunk by
    chunk, needs no communication per chunk (lse and entropy are saved) and all-reduces dH once."""

    @staticmethod
    def forward(ctx, h2d, weight, bias, targets, temperature: float, return_entropy: bool, shard: Shard,
                chunk: int):
        lse, logp, ent = forward_stats(h2d, weight, bias, targets, temperature, return_entropy, shard, chunk)
        ctx.save_for_backward(h2d, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.shard, ctx.chunk = temperature, shard, chunk
        out_dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
        return logp.to(out_dtype), None if ent is None else ent.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        h2d, weight, bias, targets, lse, ent = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = (n[0], n[1], bias is not None and n[2])
        if not any(needs):
            return None, None, None, None, None, None, None, None
        tau, shard = ctx.temperature, ctx.shard
        g = grad_logp.to(lse.dtype) if grad_logp is not None else torch.zeros_like(lse)
        e_grad = None if grad_entropy is None or ent is None else grad_entropy.to(lse.dtype)
        M = h2d.shape[0]
        grads = _ShardGrads(M, h2d, weight, bias, needs)
        for s in range(0, M, ctx.chunk):
            e = min(M, s + ctx.chunk)
            logp_v = _shard_logits(h2d[s:e], weight, bias, tau).sub_(lse[s:e].unsqueeze(1))  # log p_v
            p = torch.exp(logp_v)
            col, owned = _local_targets(targets[s:e], shard)
            g_c = g[s:e].unsqueeze(1)
            if e_grad is None:
                dz = p.mul_(-g_c)
            else:  # -p (g + e (log p + entropy)), built in the log p buffer
                dz = logp_v.add_(ent[s:e].unsqueeze(1)).mul_(e_grad[s:e].unsqueeze(1)).add_(g_c).mul_(p).neg_()
                del p
            dz.scatter_add_(1, col.unsqueeze(1), torch.where(owned.unsqueeze(1), g_c, torch.zeros_like(g_c)))
            if tau != 1.0:
                dz.mul_(1.0 / tau)
            grads.add(dz, s, e, h2d[s:e], weight)
        dh, dw, db = grads.finish(shard, h2d, weight, bias)
        return dh, dw, db, None, None, None, None, None


def linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], opts: LossOptions,
                    return_entropy: bool, process_group):
    """`gk.linear_logprobs(..., process_group=pg)`: `weight`/`bias` are this rank's rows, `targets` global ids.
    Called after the local input checks."""
    _check_options(opts)
    H = weight.shape[1]
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    h2d = hidden.reshape(-1, H)
    flat = targets.reshape(-1)
    shard = shard_layout(process_group, weight, flat.numel())
    if opts.validate:
        check_same_inputs(shard, {"hidden": h2d, "targets": flat.reshape(-1, 1)})
    checks.check_targets("targets", targets, shard.vocab, None, opts.validate)
    chunk = _chunk_rows(flat.numel(), shard.size, hidden.device, opts.chunk_size)
    logp, entropy = VocabParallelLogprobs.apply(h2d, weight, bias, flat.long(), float(opts.temperature),
                                                return_entropy, shard, chunk)
    logp = logp.reshape(targets.shape)
    if return_entropy:
        return logp, entropy.reshape(targets.shape)
    return logp


# ------------------------------------------------------------------------------------------------ GRPO loss

class VocabParallelGRPOLoss(torch.autograd.Function):
    """Loss and metrics; like the chunked strategy, gradients are made chunk by chunk in the forward (dH
    all-reduced once at its end), and backward only scales them by grad_output."""

    @staticmethod
    def forward(ctx, h2d, weight, bias, plan, opts: LossOptions, shard: Shard, chunk: int, kl_on: bool,
                grad_on: bool):
        n = ctx.needs_input_grad  # stays True under torch.no_grad: grad_on is the caller's grad mode
        needs = (grad_on and n[0], grad_on and n[1], grad_on and bias is not None and n[2])
        need_grad = any(needs)
        acc = _acc(h2d.dtype)
        totals = _Totals.zeros(h2d.device, acc)
        grads = _ShardGrads(plan.num_rows, h2d, weight, bias, needs)
        for start, end in plan.chunks(chunk, opts.needs_whole_sequences):
            idx = plan.rows[start:end]
            h_chunk = h2d.index_select(0, idx)
            targets = plan.targets.index_select(0, idx)
            z = _shard_logits(h_chunk, weight, bias, opts.temperature)
            _, logp, ent, p = _stats(z, targets, shard, opts.compute_entropy)
            del z
            parts = token_loss_and_grad(logp, plan.terms(start, end), opts, need_grad)
            totals.add(parts)
            if ent is not None:
                totals.entropy += (plan.mask.index_select(0, idx).to(acc) * ent).sum()
            if need_grad:
                grads.add(_dlogits_(p, targets, shard, parts.grad, opts.temperature), start, end, h_chunk, weight)
            del p
        rows = plan.entropy_rows
        if rows is not None and rows.numel() > 0:  # masked-in tokens skipped above still count in the entropy
            _, _, ent = forward_stats(h2d.index_select(0, rows), weight, bias, plan.targets.index_select(0, rows),
                                      opts.temperature, True, shard, chunk)
            totals.entropy += (plan.mask.index_select(0, rows).to(ent.dtype) * ent).sum()
        d_rows, d_weight, d_bias = grads.finish(shard, h2d, weight, bias)
        d_hidden = None
        if d_rows is not None:
            d_hidden = h2d.new_zeros(h2d.shape).index_copy_(0, plan.rows, d_rows)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        out = _finish_metrics(totals, plan, opts, kl_on)
        ctx.mark_non_differentiable(*[x for x in out[1:] if x is not None])
        return out

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        d_hidden, d_weight, d_bias = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return scale(d_hidden), scale(d_weight), scale(d_bias), None, None, None, None, None, None


def fused_linear_grpo_loss(opts: LossOptions, process_group, hidden, weight, bias, ids, mask, adv, old, ref, rho,
                           num_items, ref_input, ref_weight, ref_bias):
    """`gk.fused_linear_grpo_loss(..., process_group=pg)` after the local input checks. `weight`, `bias`,
    `ref_weight` and `ref_bias` are this rank's rows (the caller checked they match weight's); `ids` are global
    vocabulary ids. ref_input is None unless
    the reference log-probs are to be computed from (ref_input, ref_weight, ref_bias)."""
    _check_options(opts)
    H = weight.shape[1]
    h2d = hidden.reshape(-1, H)
    shard = shard_layout(process_group, weight, h2d.shape[0])
    if opts.validate:
        check_same_inputs(shard, {"hidden": h2d, "selected_token_ids": ids, "attention_mask": mask,
                                  "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
                                  "vllm_is_ratio": rho,
                                  "ref_input": None if ref_input is None else ref_input.reshape(-1, H)})
    ids = checks.check_targets("selected_token_ids", ids, shard.vocab, mask, opts.validate)
    acc = _acc(hidden.dtype)
    kl_on = opts.beta != 0.0 and (ref is not None or ref_input is not None)
    plan = make_plan(ids, mask, adv, old, ref, rho, num_items, opts, kl_on, acc)  # the same on every rank
    chunk = _chunk_rows(plan.num_rows, shard.size, hidden.device, opts.chunk_size)
    if ref_input is not None:  # reference log-probs of the tokens that need them, without grad
        with torch.no_grad():
            ref_h = ref_input.reshape(-1, H).index_select(0, plan.rows)
            _, ref_rows, _ = forward_stats(ref_h, ref_weight, ref_bias, plan.targets.index_select(0, plan.rows),
                                           opts.temperature, False, shard, chunk)
        plan.ref = torch.zeros_like(plan.mask).index_copy_(0, plan.rows, ref_rows.to(plan.mask.dtype))
    loss, kl, clip, low, high, entropy = VocabParallelGRPOLoss.apply(h2d, weight, bias, plan, opts, shard, chunk,
                                                                     kl_on, torch.is_grad_enabled())
    return loss, LossMetrics(kl, clip, low, high, entropy)
