"""Chunked and fused drivers: the autograd Functions that call the kernel phases and the GEMMs.

chunked: per chunk of tokens, logits = one GEMM into an fp32 [chunk, V] buffer (16-bit operands, fp32 output:
    logits are never rounded to 16 bits); an epilogue gives lse / logp / entropy; `loss_math` gives
    g_t = dL/dlogp_t; the epilogue overwrites the buffer with dL/dlogits in place (for 16-bit inputs rounded to
    16 bits over the first half of each row, read back as a strided matrix); two GEMMs give dH and dW, dW summed
    into one fp32 accumulator in place. Gradients are made in the forward (6·N·H·V FLOPs in all); backward only
    scales them by grad_output.
fused: the logits never exist, not even a chunk: forward streams the vocabulary with an online logsumexp
    (2·N·H·V), backward recomputes the logits tile by tile (6·N·H·V) — O(N) extra memory.
linear_logprobs: the same passes for logp and entropy, both differentiable; the logits gradient of the two is
    [g (onehot - p) - e p (log p + H)] / T (see `torch_ops`).
`ops` is `grpo_kernels.torch_ops` or `grpo_kernels.kernels` (same signatures).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional

import torch

from .plan import Plan
from . import torch_ops
from .loss_math import token_loss_and_grad
from .no_autocast import no_autocast
from .options import LossOptions
from .sizing import CHUNK_FLOOR, log

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------- shared pieces

class FirstChunkOutOfMemory(torch.OutOfMemoryError):
    """An OutOfMemoryError raised while the first chunk of a sized call was being processed."""


@contextlib.contextmanager
def _chunk_guard(index: int):
    """Mark an OutOfMemoryError in chunk 0 as FirstChunkOutOfMemory (the sizing was too optimistic: retry smaller);
    later chunks' errors pass as they are (memory that fit once was taken away: halving would not help)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        if index == 0 and not isinstance(e, FirstChunkOutOfMemory):
            raise FirstChunkOutOfMemory(str(e)) from e
        raise


def retry_smaller_chunks(run: Callable, chunk_size: int, chunk_given: bool, what: str):
    """(run(rows), rows) with rows = chunk_size, and on an OutOfMemoryError in the first chunk run it again with half the rows, down to
    CHUNK_FLOOR: sizing reads a snapshot of free memory that another process (a colocated vLLM) can take before the
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


def loss_parts(ops, logp: Tensor, terms, opts: LossOptions, need_grad: bool):
    """The loss-from-log-probs phase: one Triton launch at token level on the Triton backend, else PyTorch
    (sequence level needs per-sequence sums, which stay in `loss_math`)."""
    if ops is not torch_ops and not opts.sequence_level and logp.dtype == torch.float32:
        return ops.token_loss_grad(logp, terms, opts, need_grad)
    return token_loss_and_grad(logp, terms, opts, need_grad)


def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The chunk's logits buffer: fp32 for fp32/bf16/fp16 inputs (fp64 for fp64), never rounded to 16 bits."""
    return torch_ops.linear_fp32(h, weight, bias)


def _operand_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    """dtype of dL/dlogits as a backward-GEMM operand: the input's 16-bit dtype, else the buffer's (None)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


@dataclasses.dataclass
class _Grads:
    """Gradient accumulators of the chunked strategy, fed one chunk of dL/dlogits at a time (16-bit for 16-bit
    inputs). d_hidden rows are written per chunk; dW and db are summed across chunks in fp32 in place
    (`torch_ops.gemm_into`: only the accumulator exists, no per-chunk [V, H] result), one cast at the end. A single
    chunk writes dW straight in the weight's dtype (its accumulation is fp32 inside the GEMM)."""

    d_hidden: Optional[Tensor]
    d_weight: Optional[Tensor]
    d_bias: Optional[Tensor]
    single_chunk: bool

    @classmethod
    def make(cls, N: int, hidden: Tensor, weight: Tensor, needs: tuple, single_chunk: bool) -> "_Grads":
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        return cls(
            d_hidden=hidden.new_zeros(N, hidden.shape[1]) if needs[0] else None,
            d_weight=None if not needs[1] or single_chunk else weight.new_zeros(weight.shape, dtype=acc),
            d_bias=weight.new_zeros(weight.shape[0], dtype=acc) if needs[2] else None,
            single_chunk=single_chunk)

    def add(self, dlogits: Tensor, idx: Tensor, h_chunk: Tensor, weight: Tensor, needs: tuple) -> None:
        if self.d_hidden is not None:
            self.d_hidden.index_copy_(0, idx, torch_ops.matmul(dlogits, weight))
        if needs[1]:
            if self.d_weight is None:
                self.d_weight = torch_ops.matmul(dlogits.T, h_chunk)
            else:
                torch_ops.gemm_into(self.d_weight, dlogits.T, h_chunk, accumulate=True)
        if self.d_bias is not None:
            self.d_bias += dlogits.sum(0, dtype=self.d_bias.dtype)

    def finish(self, weight: Tensor, bias: Optional[Tensor], needs: tuple):
        dw = self.d_weight
        if needs[1] and dw is None:  # no rows at all
            dw = torch.zeros_like(weight)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if self.d_bias is None or bias is None else self.d_bias.to(bias.dtype)
        return self.d_hidden, dw, db


def chunked_grads(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor, grad: Tensor,
                  temperature: float, needs: tuple, ops, chunk_size: int, entropy: Optional[Tensor] = None,
                  grad_entropy: Optional[Tensor] = None):
    """Gradients w.r.t. (h, weight, bias) of sum_i grad_i logp_i (+ grad_entropy_i entropy_i), recomputing the
    fp32 logits chunk by chunk; returns (d_h [M, H] in h's dtype, d_weight, d_bias), None where not needed."""
    M = h.shape[0]
    op_dtype = _operand_dtype(h.dtype)
    grads = _Grads.make(M, h, weight, needs, single_chunk=M <= chunk_size)
    for s in range(0, M, chunk_size):
        e = min(M, s + chunk_size)
        dlogits = ops.chunk_dlogits_(
            _logits(h[s:e], weight, bias), targets[s:e], lse[s:e], grad[s:e], temperature,
            entropy=None if grad_entropy is None else entropy[s:e],
            grad_entropy=None if grad_entropy is None else grad_entropy[s:e], out_dtype=op_dtype)
        grads.add(dlogits, torch.arange(s, e, device=h.device), h[s:e], weight, needs)
        del dlogits
    return grads.finish(weight, bias, needs)


def forward_stats(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
                  return_entropy: bool, strategy: str, ops, chunk_size: int):
    """lse, logp and entropy of every row of h, without gradients (old/ref log-probs, skipped-token entropy)."""
    if strategy == "fused":
        return ops.fused_linear_stats(h, weight, bias, targets, temperature, return_entropy)
    M = h.shape[0]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    lse = torch.empty(M, dtype=acc, device=h.device)
    logp = torch.empty(M, dtype=acc, device=h.device)
    ent = torch.empty(M, dtype=acc, device=h.device) if return_entropy else None
    for s in range(0, M, chunk_size):
        e = min(M, s + chunk_size)
        with _chunk_guard(s):
            c_lse, c_logp, c_ent = ops.chunk_stats(_logits(h[s:e], weight, bias), targets[s:e], temperature,
                                                   return_entropy)
        lse[s:e], logp[s:e] = c_lse, c_logp
        if ent is not None:
            ent[s:e] = c_ent
    return lse, logp, ent


# ------------------------------------------------------------------------------------------------ GRPO loss

@dataclasses.dataclass
class _Totals:
    loss: Tensor
    kl: Tensor
    low: Tensor
    high: Tensor
    region: Tensor
    entropy: Tensor

    @classmethod
    def zeros(cls, device, dtype):
        z = lambda: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
        return cls(z(), z(), z(), z(), z(), z())

    def add(self, parts) -> None:
        self.loss += parts.loss
        self.kl += parts.kl_sum
        self.low += parts.clip_low
        self.high += parts.clip_high
        self.region += parts.clip_region


def _finish_metrics(t: _Totals, plan: Plan, opts: LossOptions, kl_on: bool):
    clip_den = float(max(plan.B, 1)) if plan.seq_adv is not None else plan.mask_total
    f32 = lambda x: x.detach().to(torch.float32)  # noqa: E731
    kl = f32(t.kl / plan.mask_total) if opts.beta != 0.0 else None
    if opts.beta != 0.0 and not kl_on:
        kl = torch.zeros((), dtype=torch.float32, device=t.loss.device)
    entropy = f32(t.entropy / plan.mask_total) if opts.compute_entropy else None
    return (t.loss, kl, f32(t.region / clip_den), f32(t.low / clip_den), f32(t.high / clip_den), entropy)


def _skipped_entropy(h2d, weight, bias, plan, opts, strategy, ops, chunk_size) -> Optional[Tensor]:
    rows = plan.entropy_rows
    if rows is None or rows.numel() == 0:
        return None
    _, _, ent = forward_stats(h2d.index_select(0, rows), weight, bias, plan.targets.index_select(0, rows),
                              opts.temperature, True, strategy, ops, chunk_size)
    return (plan.mask.index_select(0, rows).to(ent.dtype) * ent).sum()


def _needs(ctx, bias, grad_on: bool) -> tuple:
    """Which of (hidden, weight, bias) get gradients. ctx.needs_input_grad alone stays True under torch.no_grad
    (the caller passes torch.is_grad_enabled()), and the forward must not pay for gradients nobody will read."""
    n = ctx.needs_input_grad
    return (grad_on and n[0], grad_on and n[1], grad_on and bias is not None and n[2])


def scaled_saved_grads(saved, grad_loss: Tensor) -> tuple:
    """The gradients a forward made with grad_output = 1, times the real grad_output (None stays None)."""
    return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in saved)


def scatter_rows(d_rows: Optional[Tensor], plan: Plan, h2d: Tensor) -> Optional[Tensor]:
    """dH of the plan's active rows -> dH of every row (zeros for the rows the loss does not see)."""
    return None if d_rows is None else h2d.new_zeros(h2d.shape).index_copy_(0, plan.rows, d_rows)


class ChunkedGRPOLoss(torch.autograd.Function):
    """Loss and metrics; gradients computed chunk by chunk during the forward (grad_output = 1), the backward only
    scales them. fp16 inputs defer the gradient GEMMs to the backward instead (logits recomputed: 8·N·H·V FLOPs):
    made with grad_output = 1, the fp16 dL/dlogits (g·p / T) and gradients would underflow before GradScaler's
    factor reaches them; in the backward they carry that factor."""

    @staticmethod
    @no_autocast
    def forward(ctx, h2d, weight, bias, plan: Plan, opts: LossOptions, ops, chunk_size: int, kl_on: bool,
                grad_on: bool):
        needs = _needs(ctx, bias, grad_on)
        need_grad = any(needs)
        defer = need_grad and h2d.dtype == torch.float16
        acc = torch.float64 if h2d.dtype == torch.float64 else torch.float32
        totals = _Totals.zeros(h2d.device, acc)
        chunks = plan.chunks(chunk_size, opts.needs_whole_sequences)
        grads = None if defer else _Grads.make(h2d.shape[0], h2d, weight, needs, single_chunk=len(chunks) <= 1)
        if defer:  # per row of plan.rows: what the backward needs to rebuild dL/dlogits
            lse_rows = torch.empty(plan.num_rows, dtype=acc, device=h2d.device)
            g_rows = torch.empty(plan.num_rows, dtype=acc, device=h2d.device)
        op_dtype = _operand_dtype(h2d.dtype)
        for i, (start, end) in enumerate(chunks):
            with _chunk_guard(i):
                idx = plan.rows[start:end]
                h_chunk = h2d.index_select(0, idx)
                targets = plan.targets.index_select(0, idx)
                logits = _logits(h_chunk, weight, bias)
                lse, logp, ent = ops.chunk_stats(logits, targets, opts.temperature, opts.compute_entropy)
                parts = loss_parts(ops, logp, plan.terms(start, end), opts, need_grad)
                totals.add(parts)
                if ent is not None:
                    totals.entropy += (plan.mask.index_select(0, idx).to(acc) * ent).sum()
                if defer:
                    lse_rows[start:end], g_rows[start:end] = lse, parts.grad
                elif need_grad:
                    dlogits = ops.chunk_dlogits_(logits, targets, lse, parts.grad, opts.temperature,
                                                 out_dtype=op_dtype)
                    grads.add(dlogits, idx, h_chunk, weight, needs)
                    del dlogits
                del logits
        skipped = _skipped_entropy(h2d, weight, bias, plan, opts, "chunked", ops, chunk_size)
        if skipped is not None:
            totals.entropy += skipped
        ctx.defer = defer
        if defer:
            ctx.save_for_backward(h2d, weight, bias, lse_rows, g_rows)
            ctx.plan, ctx.ops, ctx.needs, ctx.chunk_size, ctx.temperature = (plan, ops, needs, chunk_size,
                                                                              opts.temperature)
        else:
            ctx.save_for_backward(*grads.finish(weight, bias, needs))
        out = _finish_metrics(totals, plan, opts, kl_on)
        ctx.mark_non_differentiable(*[x for x in out[1:] if x is not None])
        return out

    @staticmethod
    @no_autocast
    def backward(ctx, grad_loss, *unused):
        if not ctx.defer:
            return (*scaled_saved_grads(ctx.saved_tensors, grad_loss), None, None, None, None, None, None)
        h2d, weight, bias, lse_rows, g_rows = ctx.saved_tensors
        plan, needs = ctx.plan, ctx.needs
        h_rows = h2d.index_select(0, plan.rows)
        targets = plan.targets.index_select(0, plan.rows)
        d_rows, d_weight, d_bias = chunked_grads(h_rows, weight, bias, targets, lse_rows,
                                                 g_rows * grad_loss.to(g_rows.dtype), ctx.temperature, needs, ctx.ops,
                                                 ctx.chunk_size)
        return scatter_rows(d_rows, plan, h2d), d_weight, d_bias, None, None, None, None, None, None


class FusedGRPOLoss(torch.autograd.Function):
    """Loss and metrics from streamed statistics; the backward recomputes the logits tile by tile."""

    @staticmethod
    @no_autocast
    def forward(ctx, h2d, weight, bias, plan: Plan, opts: LossOptions, ops, chunk_size: int, kl_on: bool,
                grad_on: bool):
        needs = _needs(ctx, bias, grad_on)
        acc = torch.float64 if h2d.dtype == torch.float64 else torch.float32
        totals = _Totals.zeros(h2d.device, acc)
        h_rows = h2d.index_select(0, plan.rows)
        targets = plan.targets.index_select(0, plan.rows)
        lse, logp, ent = ops.fused_linear_stats(h_rows, weight, bias, targets, opts.temperature, opts.compute_entropy)
        grad = None
        if plan.num_rows:
            parts = loss_parts(ops, logp, plan.terms(0, plan.num_rows), opts, any(needs))
            totals.add(parts)
            grad = parts.grad
        if ent is not None:
            totals.entropy += (plan.mask.index_select(0, plan.rows).to(acc) * ent).sum()
        skipped = _skipped_entropy(h2d, weight, bias, plan, opts, "fused", ops, chunk_size)
        if skipped is not None:
            totals.entropy += skipped
        ctx.plan, ctx.opts, ctx.ops, ctx.needs, ctx.n = plan, opts, ops, needs, h2d.shape[0]
        ctx.save_for_backward(h_rows, weight, bias, targets, lse, grad)
        out = _finish_metrics(totals, plan, opts, kl_on)
        ctx.mark_non_differentiable(*[x for x in out[1:] if x is not None])
        return out

    @staticmethod
    @no_autocast
    def backward(ctx, grad_loss, *unused):
        h_rows, weight, bias, targets, lse, grad = ctx.saved_tensors
        needs, plan = ctx.needs, ctx.plan
        d_hidden = d_weight = d_bias = None
        if grad is not None and h_rows.shape[0] > 0:
            d_rows, d_weight, d_bias = ctx.ops.fused_linear_backward(
                h_rows, weight, bias, targets, lse, grad * grad_loss.to(grad.dtype), ctx.opts.temperature, *needs)
        if needs[0]:
            d_hidden = h_rows.new_zeros(ctx.n, h_rows.shape[1])
            if grad is not None and h_rows.shape[0] > 0:
                d_hidden.index_copy_(0, plan.rows, d_rows)
        if needs[1]:
            d_weight = torch.zeros_like(weight) if d_weight is None else d_weight.to(weight.dtype)
        if needs[2]:
            d_bias = torch.zeros_like(bias) if d_bias is None else d_bias.to(bias.dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------ log-probs only

class LinearLogprobs(torch.autograd.Function):
    """logp and entropy of every row, both differentiable; the backward recomputes the logits (chunk by chunk or
    tile by tile) and makes dL/dlogits = [g (onehot - p) - e p (log p + H)] / T of both outputs in one pass; the
    entropy term is computed only when the entropy's gradient e is given, nothing at all when neither is."""

    @staticmethod
    @no_autocast
    def forward(ctx, h2d, weight, bias, targets, temperature: float, return_entropy: bool, strategy: str, ops,
                chunk_size: int):
        lse, logp, ent = forward_stats(h2d, weight, bias, targets, temperature, return_entropy, strategy, ops,
                                       chunk_size)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (and costs nothing)
        ctx.save_for_backward(h2d, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.strategy, ctx.ops, ctx.chunk_size = temperature, strategy, ops, chunk_size
        logp = logp.to(torch.float32) if logp.dtype != torch.float64 else logp
        if ent is None:
            return logp, None
        return logp, ent.to(logp.dtype)

    @staticmethod
    @no_autocast
    def backward(ctx, grad_logp, grad_entropy):
        h2d, weight, bias, targets, lse, ent = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if (grad_logp is None and grad_entropy is None) or not any(needs):
            return None, None, None, None, None, None, None, None, None
        grad = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype)
        g_ent = None if grad_entropy is None else grad_entropy.to(lse.dtype)
        ent_arg = ent if g_ent is not None else None
        T = ctx.temperature
        if ctx.strategy == "fused":
            dh, dw, db = ctx.ops.fused_linear_backward(h2d, weight, bias, targets, lse, grad, T, *needs,
                                                       entropy=ent_arg, grad_entropy=g_ent)
        else:
            dh, dw, db = chunked_grads(h2d, weight, bias, targets, lse, grad, T, needs, ctx.ops, ctx.chunk_size,
                                       entropy=ent_arg, grad_entropy=g_ent)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None, None, None, None, None
