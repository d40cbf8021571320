"""Chunked and fused drivers: the autograd Functions that call the kernel phases and the GEMMs.

chunked: the chunk driver (`chunk_driver`, `FullVocab` shard ops) over chunks of tokens: per chunk one GEMM into
    an fp32 [chunk, V] buffer, the backend's epilogues for lse / logp / entropy and dL/dlogits, two GEMMs for dH
    and dW (6·N·H·V FLOPs in all). Gradients are made in the forward; backward only scales them by grad_output.
fused: the logits never exist, not even a chunk: forward streams the vocabulary with an online logsumexp
    (2·N·H·V), backward recomputes the logits tile by tile (6·N·H·V) — O(N) extra memory.
linear_logprobs: the same passes for logp and entropy, both differentiable; the logits gradient of the two is
    [g (onehot - p) - e p (log p + H)] / T (see `torch_ops`).
`ops` is `grpo_kernels.torch_ops` or `grpo_kernels.kernels` (same signatures).
"""

from __future__ import annotations

from typing import Optional

import torch

from .chunk_driver import ChunkDriver, FullVocab
from .loss_totals import Totals, finish_metrics, grad_needs, loss_parts, skipped_entropy
from .no_autocast import no_autocast
from .options import LossOptions
from .plan import Plan
from .torch_ops import acc_dtype

Tensor = torch.Tensor


def forward_stats(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
                  return_entropy: bool, strategy: str, ops, chunk_size: int):
    """lse, logp and entropy of every row of h, without gradients (old/ref log-probs, skipped-token entropy)."""
    if strategy == "fused":
        return ops.fused_linear_stats(h, weight, bias, targets, temperature, return_entropy)
    return ChunkDriver(FullVocab(ops), chunk_size).stats(h, weight, bias, targets, temperature, return_entropy)


# ------------------------------------------------------------------------------------------------ GRPO loss

class ChunkedGRPOLoss(torch.autograd.Function):
    """Loss and metrics from the chunk driver over the whole vocabulary: gradients computed chunk by chunk during
    the forward (grad_output = 1), the backward only scales them; fp16 inputs defer them to the backward."""

    @staticmethod
    @no_autocast
    def forward(ctx, h2d, weight, bias, plan: Plan, opts: LossOptions, ops, chunk_size: int, kl_on: bool,
                grad_on: bool):
        return ChunkDriver(FullVocab(ops), chunk_size).loss_forward(ctx, h2d, weight, bias, plan, opts, kl_on,
                                                                     grad_on)

    @staticmethod
    @no_autocast
    def backward(ctx, grad_loss, *unused):
        return (*ChunkDriver.loss_backward(ctx, grad_loss), None, None, None, None, None, None)


class FusedGRPOLoss(torch.autograd.Function):
    """Loss and metrics from streamed statistics; the backward recomputes the logits tile by tile."""

    @staticmethod
    @no_autocast
    def forward(ctx, h2d, weight, bias, plan: Plan, opts: LossOptions, ops, chunk_size: int, kl_on: bool,
                grad_on: bool):
        needs = grad_needs(ctx, bias, grad_on)
        acc = acc_dtype(h2d.dtype)
        totals = Totals.zeros(h2d.device, acc)
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
        skipped = skipped_entropy(h2d, weight, bias, plan, opts, ops.fused_linear_stats)
        if skipped is not None:
            totals.entropy += skipped
        ctx.plan, ctx.opts, ctx.ops, ctx.needs, ctx.n = plan, opts, ops, needs, h2d.shape[0]
        ctx.save_for_backward(h_rows, weight, bias, targets, lse, grad)
        out = finish_metrics(totals, plan, opts, kl_on)
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
            dh, dw, db = ChunkDriver(FullVocab(ctx.ops), ctx.chunk_size).grads(
                h2d, weight, bias, targets, lse, grad, T, needs, entropy=ent_arg, grad_entropy=g_ent)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None, None, None, None, None
