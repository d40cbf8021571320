"""The whole math in plain PyTorch, shaped like TRL's `GRPOTrainer._compute_loss` (padded [B, T] tensors).

This module is the spec and the tests' oracle: run it in float64. It materializes the full [B, T, V] logits and
uses autograd, so it is only for small shapes. The production path (`loss_math` + `strategies`) computes the
same numbers on compacted tokens with closed-form gradients; the tests hold the two together.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .options import CLIPPED_LOSS_TYPES, LossOptions

Tensor = torch.Tensor


def reference_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                       temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-token log-prob of `targets` and entropy under softmax((hidden @ weight.T + bias) / temperature)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def gamma_weights(advantages: Tensor, log_ratio: Tensor, mask: Tensor, vllm_is_ratio: Optional[Tensor],
                  opts: LossOptions) -> Tensor:
    """VESPO's detached per-sequence weight phi(w) = exp(lambda + k log w - lambda w), w the sequence ratio."""
    with torch.no_grad():
        lower = math.log(1e-8)
        seq_log_ratio = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
        if vllm_is_ratio is not None:
            seq_log_ratio = seq_log_ratio + vllm_is_ratio.log().clamp(lower, 20.0).sum(-1, keepdim=True)
        log_w = seq_log_ratio.clamp(lower, 20.0)
        nonneg = advantages >= 0
        c = lambda v: torch.tensor(v, dtype=log_w.dtype, device=log_w.device)  # noqa: E731  (not via fp32)
        k = torch.where(nonneg, c(opts.vespo_k_pos), c(opts.vespo_k_neg))
        lam = torch.where(nonneg, c(opts.vespo_lambda_pos), c(opts.vespo_lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * log_w.exp())
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def reference_grpo_loss(per_token_logps: Tensor, attention_mask: Tensor, advantages: Tensor,
                        old_per_token_logps: Optional[Tensor] = None, ref_per_token_logps: Optional[Tensor] = None,
                        vllm_is_ratio: Optional[Tensor] = None, num_items_in_batch=None,
                        entropy: Optional[Tensor] = None, token_loss_mask: Optional[Tensor] = None,
                        **loss_options) -> tuple[Tensor, dict]:
    """TRL's loss and metrics from [B, T] log-probs. Returns (loss, {"kl", "clip_ratio", "clip_ratio_low",
    "clip_ratio_high", "entropy"}); kl is None when beta == 0, entropy None when not given."""
    opts = loss_options.pop("options", None) or LossOptions.from_kwargs(**loss_options)
    logp = per_token_logps
    mask = attention_mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    old = logp.detach() if old_per_token_logps is None else old_per_token_logps.to(logp.dtype)
    rho = None
    if vllm_is_ratio is not None:
        rho = vllm_is_ratio.to(logp.dtype)
        rho = rho.unsqueeze(1) if rho.dim() == 1 else rho

    log_ratio = logp - old
    if opts.sequence_level:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_w = log_ratio
    coef_1 = torch.exp(log_w)

    per_token_kl = None
    if opts.beta != 0.0:
        ref = logp.detach() if ref_per_token_logps is None else ref_per_token_logps.to(logp.dtype)
        per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
        if opts.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    zero = torch.zeros_like(coef_1, dtype=torch.bool)
    low = high = zero
    if opts.loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=opts.epsilon_high).detach() * adv * logp
        high = (coef_1 > opts.epsilon_high) & (adv > 0)
    elif opts.loss_type in CLIPPED_LOSS_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - opts.epsilon_low, 1 + opts.epsilon_high)
        if opts.delta is not None:
            coef_1 = torch.clamp(coef_1, max=opts.delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
        low = (coef_1 < 1 - opts.epsilon_low) & (adv < 0)
        high = (coef_1 > 1 + opts.epsilon_high) & (adv > 0)
    elif opts.loss_type == "sapo":
        c = lambda v: torch.tensor(v, dtype=logp.dtype, device=logp.device)  # noqa: E731  (not via fp32)
        kappa = torch.where(adv > 0, c(opts.sapo_temperature_pos), c(opts.sapo_temperature_neg))
        per_token_loss = -torch.sigmoid(kappa * (coef_1 - 1)) * 4 / kappa * adv
    else:  # vespo
        phi = gamma_weights(adv, log_ratio, mask, rho, opts)
        per_token_loss = -phi * adv * logp

    if token_loss_mask is not None:  # TRL's entropy mask: every loss type, before the vLLM ratio and the KL term
        keep = token_loss_mask.to(logp.dtype)
        per_token_loss = per_token_loss * (keep.unsqueeze(1) if keep.dim() == 1 else keep)
    if rho is not None and opts.loss_type != "vespo":
        per_token_loss = per_token_loss * rho
    if per_token_kl is not None:
        per_token_loss = per_token_loss + opts.beta * per_token_kl

    B = per_token_loss.size(0)
    if opts.loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif opts.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif opts.loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (B * opts.max_completion_length)
    elif opts.loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
    else:  # dapo, cispo, vespo
        normalizer = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).to(logp)
        loss = (per_token_loss * mask).sum() / normalizer.clamp(min=1.0)

    def masked_mean(x: Tensor, per_sequence: bool = False) -> Tensor:
        x = x.to(logp.dtype)
        if per_sequence:  # TRL's global_masked_mean on a (B, 1) quantity: a plain mean over sequences
            return x.sum() / max(x.shape[0], 1)
        x = x.expand_as(mask)
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    # TRL decides by shape (x.shape[1] == 1), which at T == 1 would also count masked tokens of per-token
    # quantities; we take the per-sequence mean only for the sequence-level ratio's flags (same for every T > 1).
    seq_flags = opts.sequence_level and low.shape[1] == 1
    metrics = {
        "kl": masked_mean(per_token_kl).detach() if per_token_kl is not None else None,
        "clip_ratio": masked_mean(low | high, seq_flags).detach(),
        "clip_ratio_low": masked_mean(low, seq_flags).detach(),
        "clip_ratio_high": masked_mean(high, seq_flags).detach(),
        "entropy": masked_mean(entropy).detach() if entropy is not None else None,
    }
    return loss, metrics


def reference_fused_linear_grpo_loss(hidden: Tensor, weight: Tensor, selected_token_ids: Tensor,
                                     attention_mask: Tensor, advantages: Tensor, bias: Optional[Tensor] = None,
                                     ref_per_token_logps: Optional[Tensor] = None,
                                     old_per_token_logps: Optional[Tensor] = None, ref_input: Optional[Tensor] = None,
                                     ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                                     vllm_is_ratio: Optional[Tensor] = None, num_items_in_batch=None,
                                     token_loss_mask: Optional[Tensor] = None,
                                     **loss_options) -> tuple[Tensor, dict]:
    """Full-logits version of `fused_linear_grpo_loss`: differentiable w.r.t. hidden, weight and bias."""
    opts = LossOptions.from_kwargs(**loss_options)
    B, T = selected_token_ids.shape
    h = hidden.reshape(B, T, hidden.shape[-1])
    logp, entropy = reference_logprobs(h, weight, selected_token_ids, bias, opts.temperature)
    if ref_per_token_logps is None and opts.beta != 0.0 and ref_input is not None and ref_weight is not None:
        with torch.no_grad():
            ref_h = ref_input.reshape(B, T, ref_input.shape[-1])
            ref_per_token_logps, _ = reference_logprobs(ref_h, ref_weight, selected_token_ids, ref_bias,
                                                        opts.temperature)
    return reference_grpo_loss(logp, attention_mask, advantages, old_per_token_logps, ref_per_token_logps,
                               vllm_is_ratio, num_items_in_batch,
                               entropy=entropy if opts.compute_entropy else None, token_loss_mask=token_loss_mask,
                               options=opts)
