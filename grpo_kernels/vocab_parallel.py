"""Vocab-parallel strategy: every rank of a process group holds the same tokens and a contiguous shard of the LM
head's rows (rank order, shards may differ in size), as in Megatron / verl tensor parallelism.

A rank forms only its shard's logits; per chunk of c tokens one MAX all-reduce of c floats and one SUM of 2c (3c
with entropy) give the global lse, logp and entropy, so dW and db rows stay local and dH is one SUM all-reduce of
N x H fp32 per call. The math and traffic: docs/design.md, "Vocab-parallel combine". PyTorch ops on the local
shard whatever the device (the Triton epilogues assume the whole vocabulary); chunk rows come from
`grpo_kernels.sizing`, the smallest over the ranks.
The returned dH is the full gradient on every rank: do not all-reduce it again (e.g. Megatron's
copy_to_tensor_model_parallel_region in front of the head would double it). Every rank must make the same calls
with the same gradient needs (the all-reduces are collectives).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from . import inputs as checks
from . import torch_ops
from .plan import make_plan
from .loss_math import token_loss_and_grad
from .no_autocast import no_autocast
from .metrics import LossMetrics
from .options import LossOptions
from .sizing import size_call
from .strategies import (_finish_metrics, _Grads, _needs, _operand_dtype, _skipped_entropy, _Totals,
                         forward_stats, scaled_saved_grads, scatter_rows)
from .torch_ops import _acc_dtype

Tensor = torch.Tensor


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


def agreed_chunk_rows(shard: Shard, what: str, chunk_size: Optional[int], num_rows: int, h: Tensor,
                      weight_grad: bool) -> int:
    """Rows per chunk, the same on every rank: the per-chunk all-reduces must match in count and size.

    Each rank sizes the call as every other path does (`sizing.size_call`, always chunked) for its shard: per
    token row an fp32 z and its softmax p ([rows, V_r] each), plus one more such row as headroom for transients
    (GEMM fallback slices, pack_rows_' first block) -- exactly `chunk_row_bytes(V_r, fp32, torch_epilogue=True)`,
    so the sizing dtype is the accumulation dtype even for 16-bit inputs (no 16-bit buffer is upcast here) -- and
    the fp32 [V_r, H] dW accumulator when the weight needs a gradient. The ranks then take the smallest (one MIN
    all-reduce; a given chunk_size goes through it too). A rank where even the 1024-row floor does not fit sends
    0, and every rank raises torch.cuda.OutOfMemoryError instead of one rank leaving the others in a collective."""
    try:
        rows, oom = size_call(what, "chunked", chunk_size, num_rows, shard.size, h.shape[1], _acc_dtype(h.dtype),
                              h.device, True, weight_grad).chunk_size, None
    except torch.cuda.OutOfMemoryError as e:  # sizing's advice to pass strategy='fused' does not apply here
        rows = 0
        oom = torch.cuda.OutOfMemoryError(str(e).split(" Pass strategy='fused'")[0]
                                          + " The vocab-parallel path has no fused strategy: pass a smaller "
                                          "chunk_size, use more ranks, or free memory.")
    agreed = torch.tensor([rows], dtype=torch.int64, device=h.device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=shard.group)
    if int(agreed) > 0:
        return int(agreed)
    if oom is not None:
        raise oom
    raise torch.cuda.OutOfMemoryError(
        f"grpo_kernels: {what}: another rank of process_group lacks the memory for a chunk of "
        "logits of its shard (its error says how much); pass a smaller chunk_size or free memory there")


# --------------------------------------------------------------------------------------- per-chunk pieces

def _shard_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float) -> Tensor:
    """z = (h W_r^T + b_r) / tau in fp32 (fp64 for fp64 inputs): never rounded to 16 bits."""
    z = torch_ops.linear_fp32(h, weight, bias)
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


def _dlogits_(buf: Tensor, targets: Tensor, shard: Shard, grad: Tensor, temperature: float,
              entropy: Optional[Tensor] = None, grad_entropy: Optional[Tensor] = None) -> Tensor:
    """In place on buf, this shard's columns of dL/d(W h + b) = [g (1[v = y] - p_v) - e p_v (log p_v + H)] / tau
    (p the global softmax, H the entropy): buf holds p_v, or log p_v when grad_entropy (e) is given (the e-term
    needs both; p is then one transient buffer). The one-hot lands only on the rows whose target this rank owns."""
    scale = (grad.to(buf.dtype) / temperature).unsqueeze(1)
    if grad_entropy is None:
        buf.mul_(-scale)
    else:  # -p (g + e (log p + H)) / tau, built in the log p buffer
        p = torch.exp(buf)
        e = (grad_entropy.to(buf.dtype) / temperature).unsqueeze(1)
        buf.add_(entropy.to(buf.dtype).unsqueeze(1)).mul_(e).add_(scale).mul_(p).neg_()
        del p
    col, owned = _local_targets(targets, shard)
    buf.scatter_add_(1, col.unsqueeze(1), torch.where(owned.unsqueeze(1), scale, torch.zeros_like(scale)))
    return buf


class _ShardOps:
    """The `ops.chunk_stats` that `strategies.forward_stats` / `_skipped_entropy` call, over the whole vocabulary
    from this rank's shard of logits (collectives inside: every rank makes the same calls)."""

    def __init__(self, shard: Shard):
        self.shard = shard

    def chunk_stats(self, logits: Tensor, targets: Tensor, temperature: float, return_entropy: bool):
        if temperature != 1.0:  # logits is the chunk's own fp32 buffer (strategies._logits)
            logits.mul_(1.0 / temperature)
        lse, logp, entropy, _ = _stats(logits, targets, self.shard, return_entropy)
        return lse, logp, entropy


def _forward_stats(h, weight, bias, targets, temperature, with_entropy, shard, chunk):
    """lse, logp and entropy of every row of h, without gradients (log-probs forward, reference log-probs)."""
    return forward_stats(h, weight, bias, targets, temperature, with_entropy, "chunked", _ShardOps(shard), chunk)


class _ShardGrads:
    """dH rows: partial sums over this shard's vocabulary in fp32 (written per chunk with gemm_into, all-reduced
    once at the end, then cast); dW and db rows of this shard: the chunked strategy's `_Grads` (fp32 accumulated in
    place across chunks, one cast at the end). dL/dlogits is a GEMM operand in the input's 16-bit dtype, rounded
    over the first half of each row of its own fp32 buffer (`torch_ops.pack_rows_`: no second buffer)."""

    def __init__(self, rows: int, h: Tensor, weight: Tensor, needs: tuple, single_chunk: bool):
        self.d_rows = h.new_zeros(rows, h.shape[1], dtype=_acc_dtype(h.dtype)) if needs[0] else None
        self.local_needs = (False, needs[1], needs[2])
        self.local = _Grads.make(rows, h, weight, self.local_needs, single_chunk)
        self.op_dtype = _operand_dtype(h.dtype)

    def add(self, dz: Tensor, s: int, e: int, h_chunk: Tensor, weight: Tensor) -> None:
        op = dz if self.op_dtype is None else torch_ops.pack_rows_(dz, self.op_dtype)
        if self.d_rows is not None:
            torch_ops.gemm_into(self.d_rows[s:e], op, weight)
        self.local.add(op, None, h_chunk, weight, self.local_needs)

    def finish(self, shard: Shard, h: Tensor, weight: Tensor, bias: Optional[Tensor]):
        d_rows = self.d_rows
        if d_rows is not None:
            dist.all_reduce(d_rows, op=dist.ReduceOp.SUM, group=shard.group)
            d_rows = d_rows.to(h.dtype)
        _, dw, db = self.local.finish(weight, bias, self.local_needs)
        return d_rows, dw, db


def _recomputed_grads(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor, g: Tensor,
                      temperature: float, shard: Shard, chunk: int, needs: tuple, entropy: Optional[Tensor] = None,
                      grad_entropy: Optional[Tensor] = None):
    """Gradients w.r.t. (h, weight, bias) of sum_i g_i logp_i (+ e_i entropy_i), this shard's logits recomputed
    chunk by chunk from the saved global lse (and entropy): no communication per chunk, dH all-reduced once."""
    M = h.shape[0]
    grads = _ShardGrads(M, h, weight, needs, single_chunk=M <= chunk)
    for s in range(0, M, chunk):
        e = min(M, s + chunk)
        buf = _shard_logits(h[s:e], weight, bias, temperature).sub_(lse[s:e].unsqueeze(1))  # log p_v
        if grad_entropy is None:
            dz = _dlogits_(buf.exp_(), targets[s:e], shard, g[s:e], temperature)
        else:
            dz = _dlogits_(buf, targets[s:e], shard, g[s:e], temperature, entropy[s:e], grad_entropy[s:e])
        grads.add(dz, s, e, h[s:e], weight)
        del buf, dz
    return grads.finish(shard, h, weight, bias)


# ------------------------------------------------------------------------------------------------ log-probs

class VocabParallelLogprobs(torch.autograd.Function):
    """logp and entropy of every row, both differentiable; the backward recomputes this shard's logits chunk by
    chunk, needs no communication per chunk (lse and entropy are saved) and all-reduces dH once."""

    @staticmethod
    @no_autocast
    def forward(ctx, h2d, weight, bias, targets, temperature: float, return_entropy: bool, shard: Shard,
                chunk: int):
        lse, logp, ent = _forward_stats(h2d, weight, bias, targets, temperature, return_entropy, shard, chunk)
        ctx.save_for_backward(h2d, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.shard, ctx.chunk = temperature, shard, chunk
        out_dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
        return logp.to(out_dtype), None if ent is None else ent.to(out_dtype)

    @staticmethod
    @no_autocast
    def backward(ctx, grad_logp, grad_entropy):
        h2d, weight, bias, targets, lse, ent = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = (n[0], n[1], bias is not None and n[2])
        if not any(needs):
            return None, None, None, None, None, None, None, None
        g = grad_logp.to(lse.dtype) if grad_logp is not None else torch.zeros_like(lse)
        e_grad = None if grad_entropy is None or ent is None else grad_entropy.to(lse.dtype)
        dh, dw, db = _recomputed_grads(h2d, weight, bias, targets, lse, g, ctx.temperature, ctx.shard, ctx.chunk,
                                       needs, ent, e_grad)
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
    chunk = agreed_chunk_rows(shard, "linear_logprobs (vocab-parallel)", opts.chunk_size, flat.numel(), h2d,
                              torch.is_grad_enabled() and weight.requires_grad)
    logp, entropy = VocabParallelLogprobs.apply(h2d, weight, bias, flat.long(), float(opts.temperature),
                                                return_entropy, shard, chunk)
    logp = logp.reshape(targets.shape)
    if return_entropy:
        return logp, entropy.reshape(targets.shape)
    return logp


# ------------------------------------------------------------------------------------------------ GRPO loss

class VocabParallelGRPOLoss(torch.autograd.Function):
    """Loss and metrics; like the chunked strategy, gradients are made chunk by chunk in the forward (dH
    all-reduced once at its end), and backward only scales them by grad_output. fp16 inputs defer them to the
    backward as the chunked strategy does (logits recomputed): made with grad_output = 1, fp16 dL/dlogits would
    underflow before GradScaler's factor reaches them."""

    @staticmethod
    @no_autocast
    def forward(ctx, h2d, weight, bias, plan, opts: LossOptions, shard: Shard, chunk: int, kl_on: bool,
                grad_on: bool):
        needs = _needs(ctx, bias, grad_on)
        need_grad = any(needs)
        defer = need_grad and h2d.dtype == torch.float16
        acc = _acc_dtype(h2d.dtype)
        totals = _Totals.zeros(h2d.device, acc)
        chunks = plan.chunks(chunk, opts.needs_whole_sequences)
        grads = None if defer else _ShardGrads(plan.num_rows, h2d, weight, needs, single_chunk=len(chunks) <= 1)
        if defer:  # per row of plan.rows: what the backward needs to rebuild dL/dlogits
            lse_rows = torch.empty(plan.num_rows, dtype=acc, device=h2d.device)
            g_rows = torch.empty(plan.num_rows, dtype=acc, device=h2d.device)
        for start, end in chunks:
            idx = plan.rows[start:end]
            h_chunk = h2d.index_select(0, idx)
            targets = plan.targets.index_select(0, idx)
            z = _shard_logits(h_chunk, weight, bias, opts.temperature)
            lse, logp, ent, p = _stats(z, targets, shard, opts.compute_entropy)
            del z
            parts = token_loss_and_grad(logp, plan.terms(start, end), opts, need_grad)
            totals.add(parts)
            if ent is not None:
                totals.entropy += (plan.mask.index_select(0, idx).to(acc) * ent).sum()
            if defer:
                lse_rows[start:end], g_rows[start:end] = lse, parts.grad
            elif need_grad:
                grads.add(_dlogits_(p, targets, shard, parts.grad, opts.temperature), start, end, h_chunk, weight)
            del p
        skipped = _skipped_entropy(h2d, weight, bias, plan, opts, "chunked", _ShardOps(shard), chunk)
        if skipped is not None:  # masked-in tokens skipped above still count in the entropy
            totals.entropy += skipped
        ctx.defer = defer
        if defer:
            ctx.save_for_backward(h2d, weight, bias, lse_rows, g_rows)
            ctx.plan, ctx.needs, ctx.shard, ctx.chunk, ctx.temperature = plan, needs, shard, chunk, opts.temperature
        else:
            d_rows, d_weight, d_bias = grads.finish(shard, h2d, weight, bias)
            ctx.save_for_backward(scatter_rows(d_rows, plan, h2d), d_weight, d_bias)
        out = _finish_metrics(totals, plan, opts, kl_on)
        ctx.mark_non_differentiable(*[x for x in out[1:] if x is not None])
        return out

    @staticmethod
    @no_autocast
    def backward(ctx, grad_loss, *unused):
        if not ctx.defer:
            return (*scaled_saved_grads(ctx.saved_tensors, grad_loss), None, None, None, None, None, None)
        h2d, weight, bias, lse_rows, g_rows = ctx.saved_tensors
        plan = ctx.plan
        d_rows, d_weight, d_bias = _recomputed_grads(
            h2d.index_select(0, plan.rows), weight, bias, plan.targets.index_select(0, plan.rows), lse_rows,
            g_rows * grad_loss.to(g_rows.dtype), ctx.temperature, ctx.shard, ctx.chunk, ctx.needs)
        return scatter_rows(d_rows, plan, h2d), d_weight, d_bias, None, None, None, None, None, None


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
    acc = _acc_dtype(hidden.dtype)
    kl_on = opts.beta != 0.0 and (ref is not None or ref_input is not None)
    plan = make_plan(ids, mask, adv, old, ref, rho, num_items, opts, kl_on, acc)  # the same on every rank
    # sized by the rows the GEMMs see: the active rows, or the skipped rows' entropy pass when it is larger
    chunk = agreed_chunk_rows(shard, "fused_linear_grpo_loss (vocab-parallel)", opts.chunk_size,
                              max(plan.num_rows, plan.num_entropy_rows), h2d,
                              torch.is_grad_enabled() and weight.requires_grad)
    if ref_input is not None:  # reference log-probs of the tokens that need them, without grad
        with torch.no_grad():
            ref_h = ref_input.reshape(-1, H).index_select(0, plan.rows)
            _, ref_rows, _ = _forward_stats(ref_h, ref_weight, ref_bias, plan.targets.index_select(0, plan.rows),
                                            opts.temperature, False, shard, chunk)
        plan.ref = torch.zeros_like(plan.mask).index_copy_(0, plan.rows, ref_rows.to(plan.mask.dtype))
    loss, kl, clip, low, high, entropy = VocabParallelGRPOLoss.apply(h2d, weight, bias, plan, opts, shard, chunk,
                                                                     kl_on, torch.is_grad_enabled())
    return loss, LossMetrics(kl, clip, low, high, entropy)
