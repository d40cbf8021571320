"""GRPO loss and its derivative with respect to the log-prob, on compacted tokens, in closed form.

The strategies call this between the logits pass (which gives logp_t) and the gradient pass (which needs
g_t = dL/dlogp_t). Everything here is O(tokens), never O(tokens x vocab). The formulas are in docs/design.md
("The math"); the tests check them against `reference.py` (TRL's code shape, autograd) in float64.

Layout: a chunk holds M active tokens, sorted by sequence; `seq` maps each token to a chunk-local sequence
index, so per-sequence sums are `index_add` over `num_seqs` slots. The loss is L = sum_t w_t * l_t with the
normalizer folded into the token weight w_t, so chunks simply add up.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .options import CLIPPED_LOSS_TYPES, LossOptions

Tensor = torch.Tensor


@dataclasses.dataclass
class TokenTerms:
    """Per-token inputs of the loss for one chunk of active tokens (all 1-D of length M unless noted)."""

    weight: Tensor                 # w_t: mask value times the loss type's normalizer
    mask: Tensor                   # m_t (float; masks may be fractional)
    adv: Tensor                    # A_t (advantage broadcast to tokens)
    old: Optional[Tensor]          # old log-probs; None -> ratio 1 (on-policy)
    ref: Optional[Tensor]          # reference log-probs; None -> no KL term
    rho: Optional[Tensor]          # vLLM importance-sampling ratio per token
    seq: Tensor                    # chunk-local sequence index of each token (int64)
    num_seqs: int                  # S
    seq_len: Tensor                # [S] max(1, sum of the mask over the whole sequence)
    vespo_log_rho: Optional[Tensor] = None   # [S] VESPO: sum over the sequence of clamped log(rho)
    seq_adv: Optional[Tensor] = None          # [S] per-sequence advantage when clip metrics are per sequence


@dataclasses.dataclass
class LossParts:
    """What one chunk contributes: loss, dL/dlogp and the numerators of the metrics."""

    loss: Tensor                   # 0-d
    grad: Optional[Tensor]         # [M] dL/dlogp_t, None when not asked for
    kl_sum: Tensor                 # sum_t m_t * kl_t
    clip_low: Tensor               # numerators of the clip metrics (token: sum m_t*flag_t; sequence: sum_b flag_b)
    clip_high: Tensor
    clip_region: Tensor


def _pick(cond: Tensor, if_true: float, if_false: float, like: Tensor) -> Tensor:
    """Per token, one of two hyper-parameters in `like`'s dtype. Python scalars go to the kernels as arguments: no
    host-to-device copy (torch.tensor(value, device=cuda) syncs), and no detour through fp32 (torch.where on two
    Python floats)."""
    return torch.full_like(like, if_false).masked_fill_(cond, if_true)


def _seq_sum(x: Tensor, terms: TokenTerms) -> Tensor:
    return torch.zeros(terms.num_seqs, dtype=x.dtype, device=x.device).index_add_(0, terms.seq, x)


def token_loss_and_grad(logp: Tensor, terms: TokenTerms, opts: LossOptions, need_grad: bool = True) -> LossParts:
    """Loss contribution, dL/dlogp and metric numerators for one chunk. `logp` is fp32 (or fp64)."""
    dt = logp.dtype
    cast = lambda x: None if x is None else x.to(dt)  # noqa: E731
    m, w, adv, old, ref, rho = cast(terms.mask), cast(terms.weight), cast(terms.adv), cast(terms.old), \
        cast(terms.ref), cast(terms.rho)

    log_ratio = torch.zeros_like(logp) if old is None else logp - old
    if opts.sequence_level:
        seq_log_w = _seq_sum(m * log_ratio, terms) / terms.seq_len.to(dt)
        seq_r = torch.exp(seq_log_w)
        r = seq_r[terms.seq]
    else:
        r = torch.exp(log_ratio)

    # l0: the policy term; dl0_dr: its derivative through the ratio; dl0_direct: its derivative through logp
    # where the ratio is detached (cispo, vespo).
    dl0_dr = dl0_direct = None
    zero_flags = torch.zeros_like(r, dtype=torch.bool)
    low = high = zero_flags
    if opts.loss_type in CLIPPED_LOSS_TYPES:
        lo, hi = 1.0 - opts.epsilon_low, 1.0 + opts.epsilon_high
        clipped = r.clamp(lo, hi)
        r_cap = r if opts.delta is None else r.clamp(max=opts.delta)
        a, b = r_cap * adv, clipped * adv
        l0 = -torch.minimum(a, b)
        if need_grad:
            d_cap = torch.ones_like(r) if opts.delta is None else (r <= opts.delta).to(dt)
            d_clip = ((r >= lo) & (r <= hi)).to(dt)
            # torch.minimum sends the gradient to the smaller side, half to each on a tie; clamp passes it inside
            # its closed interval. Matching both keeps us bit-compatible with TRL's autograd at ratio 1.
            pick = torch.where(a < b, d_cap, torch.where(a > b, d_clip, 0.5 * (d_cap + d_clip)))
            dl0_dr = -adv * pick
        low = (r_cap < lo) & (adv < 0)
        high = (r_cap > hi) & (adv > 0)
    elif opts.loss_type == "cispo":
        coef = r.clamp(max=opts.epsilon_high)
        l0 = -coef * adv * logp
        dl0_direct = -coef * adv
        high = (r > opts.epsilon_high) & (adv > 0)
    elif opts.loss_type == "sapo":
        kappa = _pick(adv > 0, opts.sapo_temperature_pos, opts.sapo_temperature_neg, adv)
        sig = torch.sigmoid(kappa * (r - 1))
        l0 = -sig * 4 / kappa * adv
        dl0_dr = -4 * sig * (1 - sig) * adv
    else:  # vespo
        phi = _gamma_weights(log_ratio, adv, m, terms, opts)
        l0 = -phi * adv * logp
        dl0_direct = -phi * adv

    if rho is not None and opts.loss_type != "vespo":
        l0 = l0 * rho
        dl0_dr = None if dl0_dr is None else dl0_dr * rho
        dl0_direct = None if dl0_direct is None else dl0_direct * rho

    # k3 KL estimator, optionally times the (unclamped) ratio.
    kl = None
    if ref is not None and opts.beta != 0.0:
        diff = ref - logp
        e = torch.exp(diff)
        k = e - diff - 1
        dk = 1 - e
        if opts.use_bias_correction_kl:
            kl = k * r
            kl_direct, kl_via_r = dk * r, k
        else:
            kl, kl_direct, kl_via_r = k, dk, None
    loss = (w * l0).sum()
    if kl is not None:
        loss = loss + opts.beta * (w * kl).sum()
    # NaN rule: a non-finite logp of a live token makes the loss and its gradient NaN, as autograd's
    # exp(logp - logp.detach()) does; the closed form above drops logp where the ratio is 1 (no old log-probs) or
    # where a coefficient is 0, so add 0 * (logp - logp): 0 for a finite logp (the values do not change), NaN else.
    nan_guard = logp - logp
    loss = loss + nan_guard.sum()

    grad = None
    if need_grad:
        via_r = torch.zeros_like(logp) if dl0_dr is None else w * dl0_dr   # dL/dr_t
        direct = torch.zeros_like(logp) if dl0_direct is None else w * dl0_direct
        if kl is not None:
            direct = direct + opts.beta * w * kl_direct
            if kl_via_r is not None:
                via_r = via_r + opts.beta * w * kl_via_r
        if opts.sequence_level:
            # r_b = exp(sum_t m_t log_ratio_t / n_b): dr_b/dlogp_t = r_b m_t / n_b.
            seq_dr = _seq_sum(via_r, terms) * seq_r / terms.seq_len.to(dt)
            grad = seq_dr[terms.seq] * m + direct
        else:
            grad = via_r * r + direct
        grad = grad + nan_guard

    kl_sum = (m * kl).sum() if kl is not None else logp.new_zeros(())
    region = low | high
    if terms.seq_adv is not None:  # sequence level with one advantage per sequence: TRL averages over sequences
        first = torch.ones_like(terms.seq, dtype=torch.bool)
        first[1:] = terms.seq[1:] != terms.seq[:-1]
        count = lambda f: (f & first).to(dt).sum()  # noqa: E731
    else:
        count = lambda f: (m * f.to(dt)).sum()  # noqa: E731
    return LossParts(loss=loss, grad=grad, kl_sum=kl_sum, clip_low=count(low), clip_high=count(high),
                     clip_region=count(region))


def _gamma_weights(log_ratio: Tensor, adv: Tensor, m: Tensor, terms: TokenTerms, opts: LossOptions) -> Tensor:
    """VESPO's phi(w) (detached by construction: it enters the loss as a coefficient)."""
    lower = math.log(1e-8)
    seq_log_w = _seq_sum(log_ratio.clamp(-20.0, 20.0) * m, terms)
    if terms.vespo_log_rho is not None:
        seq_log_w = seq_log_w + terms.vespo_log_rho.to(seq_log_w.dtype)
    log_w = seq_log_w.clamp(lower, 20.0)[terms.seq]
    nonneg = adv >= 0
    k = _pick(nonneg, opts.vespo_k_pos, opts.vespo_k_neg, log_w)
    lam = _pick(nonneg, opts.vespo_lambda_pos, opts.vespo_lambda_neg, log_w).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp())
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
