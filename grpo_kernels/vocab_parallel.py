"""Vocab-parallel strategy: every rank of a process group holds the same tokens and a contiguous shard of the LM
head's rows (rank order, shards may differ in size), as in Megatron / verl tensor parallelism.

A rank forms only its shard's logits; per chunk of c tokens one MAX all-reduce of c floats and one SUM of 2c (3c
with entropy) give the global lse, logp and entropy, so dW and db rows stay local and dH is one SUM all-reduce of
N x H fp32 per call. The math and traffic: docs/design.md, "Vocab-parallel combine". The chunk loops are the
chunked strategy's (`chunk_driver`); `VocabShard` holds what a shard does differently. PyTorch ops on the local
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
from .chunk_driver import ChunkDriver
from .plan import make_plan
from .no_autocast import no_autocast
from .metrics import LossMetrics
from .options import LossOptions
from .sizing import size_call
from .torch_ops import acc_dtype

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
        rows, oom = size_call(what, "chunked", chunk_size, num_rows, shard.size, h.shape[1], acc_dtype(h.dtype),
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


class VocabShard:
    """Shard ops of the chunk driver (`chunk_driver`) for this rank's shard of the vocabulary: statistics over the
    whole vocabulary from the shard's logits (collectives inside: every rank makes the same calls), the one-hot
    of dL/dlogits only on the rank that owns the target, dH partial sums in fp32 all-reduced once per call. The
    chunk's buffer after `stats` is this shard's p (its logits are dropped); recomputed, p, or log p when the
    entropy has a gradient. PyTorch ops whatever the device (the Triton epilogues assume the whole vocabulary)."""

    ops = torch_ops

    def __init__(self, shard: Shard):
        self.shard = shard

    def stats(self, logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool):
        if temperature != 1.0:  # logits is the chunk's own fp32 buffer
            logits.mul_(1.0 / temperature)
        return _stats(logits, targets, self.shard, with_entropy)

    def grad_buffer(self, logits: Tensor, lse: Tensor, temperature: float, entropy_grad: bool) -> Tensor:
        if temperature != 1.0:
            logits.mul_(1.0 / temperature)
        logits.sub_(lse.unsqueeze(1))  # log p_v
        return logits if entropy_grad else logits.exp_()

    def dlogits_(self, buf: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, temperature: float,
                 out_dtype: Optional[torch.dtype], entropy: Optional[Tensor] = None,
                 grad_entropy: Optional[Tensor] = None) -> Tensor:
        col, owned = _local_targets(targets, self.shard)
        torch_ops.logits_grad_(buf, col, grad, temperature, entropy, grad_entropy, owned=owned)
        return buf if out_dtype is None else torch_ops.pack_rows_(buf, out_dtype)

    def hidden_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return acc_dtype(dtype)  # partial sums over this shard's vocabulary

    def reduce_hidden_(self, d_rows: Tensor) -> None:
        dist.all_reduce(d_rows, op=dist.ReduceOp.SUM, group=self.shard.group)


def _driver(shard: Shard, chunk: int) -> ChunkDriver:
    return ChunkDriver(VocabShard(shard), chunk)


# ------------------------------------------------------------------------------------------------ log-probs

class VocabParallelLogprobs(torch.autograd.Function):
    """logp and entropy of every row, both differentiable; the backward recomputes this shard's logits chunk by
    chunk, needs no communication per chunk (lse and entropy are saved) and all-reduces dH once."""

    @staticmethod
    @no_autocast
    def forward(ctx, h2d, weight, bias, targets, temperature: float, return_entropy: bool, shard: Shard,
                chunk: int):
        lse, logp, ent = _driver(shard, chunk).stats(h2d, weight, bias, targets, temperature, return_entropy)
        ctx.save_for_backward(h2d, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.shard, ctx.chunk = temperature, shard, chunk
        out_dtype = acc_dtype(logp.dtype)
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
        dh, dw, db = _driver(ctx.shard, ctx.chunk).grads(h2d, weight, bias, targets, lse, g, ctx.temperature, needs,
                                                         ent, e_grad)
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
        return _driver(shard, chunk).loss_forward(ctx, h2d, weight, bias, plan, opts, kl_on, grad_on)

    @staticmethod
    @no_autocast
    def backward(ctx, grad_loss, *unused):
        return (*ChunkDriver.loss_backward(ctx, grad_loss), None, None, None, None, None, None)


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
    acc = acc_dtype(hidden.dtype)
    kl_on = opts.beta != 0.0 and (ref is not None or ref_input is not None)
    plan = make_plan(ids, mask, adv, old, ref, rho, num_items, opts, kl_on, acc)  # the same on every rank
    # sized by the rows the GEMMs see: the active rows, or the skipped rows' entropy pass when it is larger
    chunk = agreed_chunk_rows(shard, "fused_linear_grpo_loss (vocab-parallel)", opts.chunk_size,
                              max(plan.num_rows, plan.num_entropy_rows), h2d,
                              torch.is_grad_enabled() and weight.requires_grad)
    if ref_input is not None:  # reference log-probs of the tokens that need them, without grad
        with torch.no_grad():
            ref_h = ref_input.reshape(-1, H).index_select(0, plan.rows)
            _, ref_rows, _ = _driver(shard, chunk).stats(ref_h, ref_weight, ref_bias,
                                                         plan.targets.index_select(0, plan.rows), opts.temperature,
                                                         False)
        plan.ref = torch.zeros_like(plan.mask).index_copy_(0, plan.rows, ref_rows.to(plan.mask.dtype))
    loss, kl, clip, low, high, entropy = VocabParallelGRPOLoss.apply(h2d, weight, bias, plan, opts, shard, chunk,
                                                                     kl_on, torch.is_grad_enabled())
    return loss, LossMetrics(kl, clip, low, high, entropy)
