"""Loss-from-log-probs phase at token level: the per-token GRPO loss, dL/dlogp and the metric numerators of one
chunk of compacted tokens in a single elementwise launch (the Triton twin of `loss_math.token_loss_and_grad`).

Only VESPO's gamma weight phi needs per-sequence sums; it is computed in torch (`loss_math._gamma_weights`) and
passed in. Sequence-level importance sampling (GSPO) needs per-sequence sums of the gradient too and stays in
`loss_math`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..loss_math import LossParts, TokenTerms, _gamma_weights
from ..options import CLIPPED_LOSS_TYPES, LossOptions
from ._common import FP_FUSION, cdiv, check_grid, prepare_row_vector

BLOCK = 1024
NUM_WARPS = 4
NUM_PARTS = 5  # loss, kl, clip low, clip high, clip region

# min / max that return NaN when either side is NaN, as torch.minimum and clamp do (Triton's default drops it).
NAN = tl.constexpr(tl.PropagateNan.ALL)

# LOSS_KIND values of the kernel.
CLIPPED, CISPO, SAPO, VESPO = 0, 1, 2, 3


def _kind(loss_type: str) -> int:
    if loss_type in CLIPPED_LOSS_TYPES:
        return CLIPPED
    return {"cispo": CISPO, "sapo": SAPO, "vespo": VESPO}[loss_type]


def _f32(x: float) -> float:
    """A hyper-parameter rounded to fp32 on the host, as torch rounds a Python scalar against an fp32 tensor; Triton
    passes a Python float argument as an fp32 scalar."""
    return float(torch.tensor(float(x), dtype=torch.float32))


@triton.jit(do_not_specialize=["M"])  # per-call sizes: no recompiles
def _token_loss_kernel(logp_ptr, w_ptr, m_ptr, adv_ptr, old_ptr, ref_ptr, rho_ptr, phi_ptr, grad_ptr, part_ptr, M,
                       lo, hi, delta, eps_high, beta, kappa_pos, kappa_neg,
                       LOSS_KIND: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
                       HAS_RHO: tl.constexpr, BIAS_CORR: tl.constexpr, HAS_DELTA: tl.constexpr,
                       NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Token-level GRPO loss (fp32). With r = exp(logp - old) (1 without old) and A the advantage, per token:
        clipped family: l = -min(r'A, clip(r, lo, hi) A), r' = min(r, delta) if HAS_DELTA else r
        cispo:          l = -sg(min(r, eps_high)) A logp
        sapo:           l = -sigmoid(k (r - 1)) 4/k A, k = kappa_pos if A > 0 else kappa_neg
        vespo:          l = -sg(phi) A logp  (phi given)
    times rho (vLLM ratio, not vespo); plus beta * kl with kl = exp(ref - logp) - (ref - logp) - 1 (times r when
    BIAS_CORR) when HAS_REF; plus 0 * (logp - logp) in the loss and its gradient, so that a non-finite logp makes
    both NaN (the NaN rule of loss_math). Writes grad_t = d(sum_t w_t l_t)/dlogp_t (the derivative through r included; torch's
    half-half split on min ties and clamp's closed interval) and, per program, the partial sums
        [sum w l, sum m kl, sum m low, sum m high, sum m (low | high)]  into part_ptr[pid, 0:5].
    Grid: (cdiv(M, BLOCK),); each program owns BLOCK consecutive tokens."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < M
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0)
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    m = tl.load(m_ptr + offs, mask=valid, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=valid, other=0.0)
    zero = tl.zeros([BLOCK], tl.float32)
    if HAS_OLD:
        old = tl.load(old_ptr + offs, mask=valid, other=0.0)
        r = tl.exp(logp - old)
    else:
        r = zero + 1.0
    low = zero != zero
    high = low

    # l0: policy term; dl0_dr: its derivative through r; dl0_direct: through logp where r is detached.
    dl0_dr = zero
    dl0_direct = zero
    if LOSS_KIND == 0:
        clipped = tl.minimum(tl.maximum(r, lo, propagate_nan=NAN), hi, propagate_nan=NAN)
        if HAS_DELTA:
            r_cap = tl.minimum(r, delta, propagate_nan=NAN)
        else:
            r_cap = r
        a = r_cap * adv
        b = clipped * adv
        l0 = -tl.minimum(a, b, propagate_nan=NAN)
        if NEED_GRAD:
            if HAS_DELTA:
                d_cap = tl.where(r <= delta, 1.0, 0.0)
            else:
                d_cap = zero + 1.0
            d_clip = tl.where((r >= lo) & (r <= hi), 1.0, 0.0)
            pick = tl.where(a < b, d_cap, tl.where(a > b, d_clip, 0.5 * (d_cap + d_clip)))
            dl0_dr = -adv * pick
        low = (r_cap < lo) & (adv < 0.0)
        high = (r_cap > hi) & (adv > 0.0)
    elif LOSS_KIND == 1:
        coef = tl.minimum(r, eps_high, propagate_nan=NAN)
        l0 = -coef * adv * logp
        dl0_direct = -coef * adv
        high = (r > eps_high) & (adv > 0.0)
    elif LOSS_KIND == 2:
        kappa = tl.where(adv > 0.0, zero + kappa_pos, zero + kappa_neg)
        sig = tl.sigmoid(kappa * (r - 1.0))
        l0 = -sig * 4.0 / kappa * adv
        dl0_dr = -4.0 * sig * (1.0 - sig) * adv
    else:
        phi = tl.load(phi_ptr + offs, mask=valid, other=0.0)
        l0 = -phi * adv * logp
        dl0_direct = -phi * adv

    if HAS_RHO and LOSS_KIND != 3:
        rho = tl.load(rho_ptr + offs, mask=valid, other=0.0)
        l0 = l0 * rho
        dl0_dr = dl0_dr * rho
        dl0_direct = dl0_direct * rho

    loss_t = w * l0
    kl = zero
    via_r = w * dl0_dr
    direct = w * dl0_direct
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0)
        diff = ref - logp
        e = tl.exp(diff)
        k = e - diff - 1.0
        dk = 1.0 - e
        if BIAS_CORR:
            kl = k * r
            direct += beta * w * (dk * r)
            via_r += beta * w * k
        else:
            kl = k
            direct += beta * w * dk
        loss_t += beta * (w * kl)

    # NaN rule (loss_math): + 0 * (logp - logp), 0 for a finite logp, NaN for a non-finite one
    nan_guard = logp - logp
    loss_t += nan_guard
    if NEED_GRAD:
        tl.store(grad_ptr + offs, via_r * r + direct + nan_guard, mask=valid)

    region = low | high
    part = part_ptr + pid.to(tl.int64) * 5
    tl.store(part + 0, tl.sum(tl.where(valid, loss_t, 0.0), axis=0))
    tl.store(part + 1, tl.sum(tl.where(valid, m * kl, 0.0), axis=0))
    tl.store(part + 2, tl.sum(tl.where(valid & low, m, 0.0), axis=0))
    tl.store(part + 3, tl.sum(tl.where(valid & high, m, 0.0), axis=0))
    tl.store(part + 4, tl.sum(tl.where(valid & region, m, 0.0), axis=0))


def token_loss_grad(logp: torch.Tensor, terms: TokenTerms, opts: LossOptions, need_grad: bool = True,
                    phi: Optional[torch.Tensor] = None) -> LossParts:
    """`loss_math.token_loss_and_grad` at token level in one Triton launch. logp: fp32 [M]. For loss_type "vespo",
    phi is VESPO's per-token gamma weight (computed here from `terms` when None). Returns LossParts with the grad
    in fp32 (None unless need_grad) and 0-d fp32 sums; M == 0 launches nothing."""
    if not isinstance(opts, LossOptions):
        raise TypeError(f"opts must be a LossOptions, got {type(opts).__name__}")
    if opts.importance_sampling_level != "token":
        raise ValueError(f"token_loss_grad handles importance_sampling_level='token' only, got "
                         f"{opts.importance_sampling_level!r} (use loss_math.token_loss_and_grad)")
    if not isinstance(logp, torch.Tensor):
        raise TypeError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    if logp.dtype != torch.float32 or logp.dim() != 1:
        raise ValueError(f"logp must be a 1-D float32 tensor, got {logp.dtype} of shape {tuple(logp.shape)}")
    M, device = logp.shape[0], logp.device
    kind = _kind(opts.loss_type)
    if phi is not None and kind != VESPO:
        raise ValueError(f"phi is VESPO's gamma weight; loss_type={opts.loss_type!r} does not take it")
    logp = logp.contiguous()
    w = prepare_row_vector("terms.weight", terms.weight, M, device)
    m = prepare_row_vector("terms.mask", terms.mask, M, device)
    adv = prepare_row_vector("terms.adv", terms.adv, M, device)
    opt = lambda name, t: None if t is None else prepare_row_vector(name, t, M, device)  # noqa: E731
    old = opt("terms.old", terms.old)
    kl_on = terms.ref is not None and opts.beta != 0.0
    ref = opt("terms.ref", terms.ref) if kl_on else None
    rho = opt("terms.rho", terms.rho) if kind != VESPO else None
    if kind == VESPO:
        if phi is None:
            log_ratio = torch.zeros_like(logp) if old is None else logp - old
            phi = _gamma_weights(log_ratio, adv, m, terms, opts)
        phi = prepare_row_vector("phi", phi, M, device)

    zero = logp.new_zeros(())
    if M == 0:
        return LossParts(loss=zero, grad=logp.new_empty(0) if need_grad else None, kl_sum=zero.clone(),
                         clip_low=zero.clone(), clip_high=zero.clone(), clip_region=zero.clone())

    grid = cdiv(M, BLOCK)
    check_grid(grid)
    grad = torch.empty_like(logp) if need_grad else None
    parts = torch.empty((grid, NUM_PARTS), dtype=torch.float32, device=device)
    dummy = logp  # stands in for absent inputs; never read (their flag is off)
    _token_loss_kernel[(grid,)](
        logp, w, m, adv, old if old is not None else dummy, ref if ref is not None else dummy,
        rho if rho is not None else dummy, phi if phi is not None else dummy, grad if need_grad else dummy,
        parts, M,
        _f32(1.0 - opts.epsilon_low), _f32(1.0 + opts.epsilon_high), _f32(opts.delta if opts.delta is not None else 1.0),
        _f32(opts.epsilon_high), _f32(opts.beta), _f32(opts.sapo_temperature_pos), _f32(opts.sapo_temperature_neg),
        LOSS_KIND=kind, HAS_OLD=old is not None, HAS_REF=kl_on, HAS_RHO=rho is not None,
        BIAS_CORR=bool(opts.use_bias_correction_kl), HAS_DELTA=opts.delta is not None, NEED_GRAD=bool(need_grad),
        BLOCK=BLOCK, num_warps=NUM_WARPS, **FP_FUSION)
    sums = parts.sum(0)
    return LossParts(loss=sums[0], grad=grad, kl_sum=sums[1], clip_low=sums[2], clip_high=sums[3],
                     clip_region=sums[4])
