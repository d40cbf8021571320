"""What the GRPO-loss autograd Functions (chunked, fused, vocab-parallel) share around their logits passes: the
loss-from-log-probs phase, the running totals of the loss and the metric numerators and their finish, the entropy
of masked-in rows the loss skipped, and which inputs need gradients."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from . import torch_ops
from .loss_math import token_loss_and_grad
from .options import LossOptions
from .plan import Plan

Tensor = torch.Tensor


def loss_parts(ops, logp: Tensor, terms, opts: LossOptions, need_grad: bool):
    """The loss-from-log-probs phase: one Triton launch at token level on the Triton backend, else PyTorch
    (sequence level needs per-sequence sums, which stay in `loss_math`)."""
    if ops is not torch_ops and not opts.sequence_level and logp.dtype == torch.float32:
        return ops.token_loss_grad(logp, terms, opts, need_grad)
    return token_loss_and_grad(logp, terms, opts, need_grad)


def grad_needs(ctx, bias, grad_on: bool) -> tuple:
    """Which of (hidden, weight, bias) get gradients. ctx.needs_input_grad alone stays True under torch.no_grad
    (the caller passes torch.is_grad_enabled()), and the forward must not pay for gradients nobody will read."""
    n = ctx.needs_input_grad
    return (grad_on and n[0], grad_on and n[1], grad_on and bias is not None and n[2])


@dataclasses.dataclass
class Totals:
    """Sums over the rows of a call: the loss and the numerators of the metrics."""

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


def finish_metrics(t: Totals, plan: Plan, opts: LossOptions, kl_on: bool):
    """(loss, kl, clip region, clip low, clip high, entropy): the metrics as detached fp32 means."""
    clip_den = float(max(plan.B, 1)) if plan.seq_adv is not None else plan.mask_total
    f32 = lambda x: x.detach().to(torch.float32)  # noqa: E731
    kl = f32(t.kl / plan.mask_total) if opts.beta != 0.0 else None
    if opts.beta != 0.0 and not kl_on:
        kl = torch.zeros((), dtype=torch.float32, device=t.loss.device)
    entropy = f32(t.entropy / plan.mask_total) if opts.compute_entropy else None
    return (t.loss, kl, f32(t.region / clip_den), f32(t.low / clip_den), f32(t.high / clip_den), entropy)


def skipped_entropy(h2d: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, opts: LossOptions,
                    row_stats: Callable) -> Optional[Tensor]:
    """Masked sum of the entropy of the masked-in rows the loss skipped (None when there are none);
    row_stats(h, weight, bias, targets, temperature, return_entropy) -> (lse, logp, entropy) of every row of h."""
    rows = plan.entropy_rows
    if rows is None or rows.numel() == 0:
        return None
    _, _, ent = row_stats(h2d.index_select(0, rows), weight, bias, plan.targets.index_select(0, rows),
                          opts.temperature, True)
    return (plan.mask.index_select(0, rows).to(ent.dtype) * ent).sum()
