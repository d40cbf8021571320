"""The chunk driver: the loops over chunks of token rows that serve the chunked strategy (`ChunkedGRPOLoss`,
`LinearLogprobs`) and the vocab-parallel path alike.

Per chunk: logits = one GEMM into an fp32 [rows, V] buffer (16-bit operands, fp32 output: never rounded to 16
bits); the shard ops give lse, logp and entropy over the whole vocabulary; `loss_parts` gives g_t = dL/dlogp_t;
the shard ops turn the buffer into dL/dlogits (the GEMM operand: 16-bit for 16-bit inputs, packed over the first
half of each row of its own buffer); two GEMMs give dH rows and dW, dW summed into one fp32 accumulator in place.
Gradients are made in the forward with grad_output = 1 and the backward only scales them, except for fp16 inputs,
which defer them to the backward (logits recomputed): made with grad_output = 1, fp16 dL/dlogits (g·p / T) would
underflow before GradScaler's factor reaches them.

What differs between the whole vocabulary on one process and one rank's vocab shard goes through a shard-ops
object: `FullVocab` here (the backend's chunk epilogues), `vocab_parallel.VocabShard` (all-reduces). Its members:
    ops                                       the backend module `loss_parts` is given
    stats(logits, targets, T, with_entropy)   -> lse, logp, entropy (None unless asked), buf: what dlogits_ takes
    grad_buffer(logits, lse, T, entropy_grad) recomputed logits -> the buf that stats would have left
    dlogits_(buf, targets, lse, grad, T, out_dtype, entropy=None, grad_entropy=None) -> dL/dlogits, GEMM operand
    hidden_dtype(dtype), reduce_hidden_(d)    the dtype dH rows are summed in, and the sum over the shards
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional

import torch

from . import torch_ops
from .loss_totals import Totals, finish_metrics, grad_needs, loss_parts, skipped_entropy
from .options import LossOptions
from .plan import Plan
from .sizing import CHUNK_FLOOR, log
from .torch_ops import acc_dtype

Tensor = torch.Tensor
_HALF = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------ OOM retry

class FirstChunkOutOfMemory(torch.OutOfMemoryError):
    """An OutOfMemoryError raised while the first chunk of a sized call was being processed."""


@contextlib.contextmanager
def chunk_guard(index: int):
    """Mark an OutOfMemoryError in chunk 0 as FirstChunkOutOfMemory (the sizing was too optimistic: retry smaller);
    later chunks' errors pass as they are (memory that fit once was taken away: halving would not help)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        if index == 0 and not isinstance(e, FirstChunkOutOfMemory):
            raise FirstChunkOutOfMemory(str(e)) from e
        raise


def retry_smaller_chunks(run: Callable, chunk_size: int, chunk_given: bool, what: str):
    """(run(rows), rows) with rows = chunk_size, and on an OutOfMemoryError in the first chunk run it again with half
    the rows, down to CHUNK_FLOOR: sizing reads a snapshot of free memory that another process (a colocated vLLM) can take before the
    chunk is allocated. A chunk_size the caller gave is not changed. At the floor the error says what to do."""
    rows = int(chunk_size)
    while True:
        try:
            return run(rows), rows
        except FirstChunkOutOfMemory as e:
            if chunk_given or rows <= CHUNK_FLOOR:
                raise torch.OutOfMemoryError(
                    f"grpo_kernels: {what}: out of memory in the first chunk of {rows} token rows"
                    + ("" if chunk_given else f" (halved from {chunk_size}; {CHUNK_FLOOR} is the floor)")
                    + ". Pass strategy='fused' (O(tokens) extra memory), a smaller chunk_size, or free memory. "
                    f"The allocator said: {e}") from e
            rows = max(CHUNK_FLOOR, rows // 2)
            log.debug("grpo_kernels %s: out of memory in the first chunk, retrying with %d rows", what, rows)


# ------------------------------------------------------------------------------------------- per-chunk pieces

def chunk_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The chunk's logits buffer: fp32 for fp32/bf16/fp16 inputs (fp64 for fp64), never rounded to 16 bits."""
    return torch_ops.linear_fp32(h, weight, bias)


def operand_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    """dtype of dL/dlogits as a backward-GEMM operand: the input's 16-bit dtype, else the buffer's (None)."""
    return dtype if dtype in _HALF else None


class FullVocab:
    """Shard ops for the whole vocabulary on this process: the backend's chunk epilogues (`ops` is
    `grpo_kernels.torch_ops` or `grpo_kernels.kernels`); the buffer stays the raw logits, dH rows are complete."""

    def __init__(self, ops):
        self.ops = ops

    def stats(self, logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool):
        lse, logp, entropy = self.ops.chunk_stats(logits, targets, temperature, with_entropy)
        return lse, logp, entropy, logits

    def grad_buffer(self, logits: Tensor, lse: Tensor, temperature: float, entropy_grad: bool) -> Tensor:
        return logits

    def dlogits_(self, buf: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, temperature: float,
                 out_dtype: Optional[torch.dtype], entropy: Optional[Tensor] = None,
                 grad_entropy: Optional[Tensor] = None) -> Tensor:
        return self.ops.chunk_dlogits_(buf, targets, lse, grad, temperature, entropy=entropy,
                                       grad_entropy=grad_entropy, out_dtype=out_dtype)

    def hidden_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype  # each row's dH is made whole by one GEMM: one rounding

    def reduce_hidden_(self, d_rows: Tensor) -> None:
        pass


@dataclasses.dataclass
class Grads:
    """Gradient accumulators fed one chunk of dL/dlogits at a time (16-bit for 16-bit inputs). d_rows holds dH of
    the rows in the order the chunks see them, in the shard ops' hidden dtype (fp32 partial sums for a vocab
    shard); dW and db are summed across chunks in fp32 in place (`torch_ops.gemm_into`: only the accumulator exists,
    no per-chunk [V, H] result), one cast at the end. A single chunk writes dW straight in the weight's dtype (its
    accumulation is fp32 inside the GEMM)."""

    d_rows: Optional[Tensor]
    d_weight: Optional[Tensor]
    d_bias: Optional[Tensor]
    needs: tuple
    single_chunk: bool

    @classmethod
    def make(cls, rows: int, hidden: Tensor, weight: Tensor, needs: tuple, hidden_dtype: torch.dtype,
             single_chunk: bool) -> "Grads":
        acc = acc_dtype(weight.dtype)
        return cls(
            d_rows=hidden.new_zeros(rows, hidden.shape[1], dtype=hidden_dtype) if needs[0] else None,
            d_weight=None if not needs[1] or single_chunk else weight.new_zeros(weight.shape, dtype=acc),
            d_bias=weight.new_zeros(weight.shape[0], dtype=acc) if needs[2] else None,
            needs=needs, single_chunk=single_chunk)

    def add(self, dlogits: Tensor, start: int, end: int, h_chunk: Tensor, weight: Tensor) -> None:
        if self.d_rows is not None:
            if self.d_rows.dtype in _HALF:  # whole rows: one 16-bit result
                self.d_rows[start:end] = torch_ops.matmul(dlogits, weight)
            else:
                torch_ops.gemm_into(self.d_rows[start:end], dlogits, weight)
        if self.needs[1]:
            if self.d_weight is None:
                self.d_weight = torch_ops.matmul(dlogits.T, h_chunk)
            else:
                torch_ops.gemm_into(self.d_weight, dlogits.T, h_chunk, accumulate=True)
        if self.d_bias is not None:
            self.d_bias += dlogits.sum(0, dtype=self.d_bias.dtype)

    def finish(self, shard, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
        """(d_rows, d_weight, d_bias) in the inputs' dtypes, None where not needed; dH summed over the shards."""
        d_rows = self.d_rows
        if d_rows is not None:
            shard.reduce_hidden_(d_rows)
            d_rows = d_rows.to(hidden.dtype)
        dw = self.d_weight
        if self.needs[1] and dw is None:  # no rows at all
            dw = torch.zeros_like(weight)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if self.d_bias is None or bias is None else self.d_bias.to(bias.dtype)
        return d_rows, dw, db


def scaled_saved_grads(saved, grad_loss: Tensor) -> tuple:
    """The gradients a forward made with grad_output = 1, times the real grad_output (None stays None)."""
    return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in saved)


def scatter_rows(d_rows: Optional[Tensor], plan: Plan, h2d: Tensor) -> Optional[Tensor]:
    """dH of the plan's active rows -> dH of every row (zeros for the rows the loss does not see)."""
    return None if d_rows is None else h2d.new_zeros(h2d.shape).index_copy_(0, plan.rows, d_rows)


# ---------------------------------------------------------------------------------------------- the driver

class ChunkDriver:
    """The chunk loops over token rows, with `shard` (FullVocab or vocab_parallel.VocabShard) for what differs."""

    def __init__(self, shard, chunk_size: int):
        self.shard, self.chunk_size = shard, int(chunk_size)

    def stats(self, h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
              with_entropy: bool):
        """lse, logp and entropy (None unless asked) of every row of h, without gradients."""
        M, acc = h.shape[0], acc_dtype(h.dtype)
        lse = torch.empty(M, dtype=acc, device=h.device)
        logp = torch.empty(M, dtype=acc, device=h.device)
        ent = torch.empty(M, dtype=acc, device=h.device) if with_entropy else None
        for s in range(0, M, self.chunk_size):
            e = min(M, s + self.chunk_size)
            with chunk_guard(s):
                c_lse, c_logp, c_ent, _ = self.shard.stats(chunk_logits(h[s:e], weight, bias), targets[s:e],
                                                           temperature, with_entropy)
            lse[s:e], logp[s:e] = c_lse, c_logp
            if ent is not None:
                ent[s:e] = c_ent
        return lse, logp, ent

    def grads(self, h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor, grad: Tensor,
              temperature: float, needs: tuple, entropy: Optional[Tensor] = None,
              grad_entropy: Optional[Tensor] = None):
        """Gradients w.r.t. (h, weight, bias) of sum_i grad_i logp_i (+ grad_entropy_i entropy_i), recomputing the
        logits chunk by chunk from the saved lse (and entropy): no communication per chunk, dH summed over the
        shards once. Returns (d_h [M, H] in h's dtype, d_weight, d_bias), None where not needed."""
        M, chunk, shard = h.shape[0], self.chunk_size, self.shard
        op_dtype = operand_dtype(h.dtype)
        grads = Grads.make(M, h, weight, needs, shard.hidden_dtype(h.dtype), single_chunk=M <= chunk)
        for s in range(0, M, chunk):
            e = min(M, s + chunk)
            buf = shard.grad_buffer(chunk_logits(h[s:e], weight, bias), lse[s:e], temperature,
                                    grad_entropy is not None)
            dz = shard.dlogits_(buf, targets[s:e], lse[s:e], grad[s:e], temperature, op_dtype,
                                entropy=None if grad_entropy is None else entropy[s:e],
                                grad_entropy=None if grad_entropy is None else grad_entropy[s:e])
            grads.add(dz, s, e, h[s:e], weight)
            del buf, dz
        return grads.finish(shard, h, weight, bias)

    def loss_forward(self, ctx, h2d: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, opts: LossOptions,
                     kl_on: bool, grad_on: bool):
        """The GRPO loss's autograd forward: (loss, kl, clip region, low, high, entropy), the gradients made chunk
        by chunk (or, for fp16, what the backward needs to make them) saved on ctx."""
        shard = self.shard
        needs = grad_needs(ctx, bias, grad_on)
        need_grad = any(needs)
        defer = need_grad and h2d.dtype == torch.float16
        acc = acc_dtype(h2d.dtype)
        totals = Totals.zeros(h2d.device, acc)
        chunks = plan.chunks(self.chunk_size, opts.needs_whole_sequences)
        grads = None
        if need_grad and not defer:
            grads = Grads.make(plan.num_rows, h2d, weight, needs, shard.hidden_dtype(h2d.dtype),
                               single_chunk=len(chunks) <= 1)
        if defer:  # per row of plan.rows: what the backward needs to rebuild dL/dlogits
            lse_rows = torch.empty(plan.num_rows, dtype=acc, device=h2d.device)
            g_rows = torch.empty(plan.num_rows, dtype=acc, device=h2d.device)
        op_dtype = operand_dtype(h2d.dtype)
        for i, (start, end) in enumerate(chunks):
            with chunk_guard(i):
                idx = plan.rows[start:end]
                h_chunk = h2d.index_select(0, idx)
                targets = plan.targets.index_select(0, idx)
                lse, logp, ent, buf = shard.stats(chunk_logits(h_chunk, weight, bias), targets, opts.temperature,
                                                  opts.compute_entropy)
                parts = loss_parts(shard.ops, logp, plan.terms(start, end), opts, need_grad)
                totals.add(parts)
                if ent is not None:
                    totals.entropy += (plan.mask.index_select(0, idx).to(acc) * ent).sum()
                if defer:
                    lse_rows[start:end], g_rows[start:end] = lse, parts.grad
                elif need_grad:
                    grads.add(shard.dlogits_(buf, targets, lse, parts.grad, opts.temperature, op_dtype), start, end,
                              h_chunk, weight)
                del buf
        skipped = skipped_entropy(h2d, weight, bias, plan, opts, self.stats)
        if skipped is not None:  # masked-in tokens skipped above still count in the entropy
            totals.entropy += skipped
        ctx.driver, ctx.defer = self, defer
        if defer:
            ctx.save_for_backward(h2d, weight, bias, lse_rows, g_rows)
            ctx.plan, ctx.needs, ctx.temperature = plan, needs, opts.temperature
        elif grads is not None:
            d_rows, d_weight, d_bias = grads.finish(shard, h2d, weight, bias)
            grads = None  # the fp32 dW accumulator goes before d_rows are scattered into [N, H]
            ctx.save_for_backward(scatter_rows(d_rows, plan, h2d), d_weight, d_bias)
        else:
            ctx.save_for_backward(None, None, None)
        out = finish_metrics(totals, plan, opts, kl_on)
        ctx.mark_non_differentiable(*[x for x in out[1:] if x is not None])
        return out

    @staticmethod
    def loss_backward(ctx, grad_loss: Tensor):
        """(d_hidden, d_weight, d_bias) for the GRPO loss's autograd backward."""
        if not ctx.defer:
            return scaled_saved_grads(ctx.saved_tensors, grad_loss)
        h2d, weight, bias, lse_rows, g_rows = ctx.saved_tensors
        plan = ctx.plan
        d_rows, d_weight, d_bias = ctx.driver.grads(
            h2d.index_select(0, plan.rows), weight, bias, plan.targets.index_select(0, plan.rows), lse_rows,
            g_rows * grad_loss.to(g_rows.dtype), ctx.temperature, ctx.needs)
        return scatter_rows(d_rows, plan, h2d), d_weight, d_bias
