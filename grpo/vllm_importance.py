"""Importance-sampling correction for completions sampled by vLLM, with TRL 1.16's modes and metric names.

vLLM samples with its own kernels (and possibly other weights' precision), so its log-probs of the sampled tokens,
log π_vLLM, differ from the trainer's, log π_old (the trainer's log-probs at sampling time). The loss is then
multiplied per token by ρ = π_old / π_vLLM (the fused loss's `vllm_is_ratio` input):

- token_*:    ρ_t = exp(m_t (log π_old,t − log π_vLLM,t))                                  shape [B, C]
- sequence_*: ρ_b = exp(Σ_t m_t (log π_old,t − log π_vLLM,t)), shared by the sequence's tokens  shape [B, 1]
- *_truncate: ρ ← clamp(ρ, clip_min, clip_max) (a None bound is no bound);
- *_mask:     ρ ← 0 where ρ < clip_min or ρ > clip_max.
A token whose vLLM log-prob is NaN (vLLM could not score it) gets a zero difference, i.e. ρ = 1 there.

Metrics (per rank, then combined over ranks as TRL combines them): `sampling/sampling_logp_difference/mean|max`
(|log π_old − log π_vLLM| over completion tokens, NaN excluded), `sampling/importance_sampling_ratio/min|mean|max`
(over completion tokens for token modes, over sequences for sequence modes), and `sampling/mismatch_fraction`: the
share of completion tokens with |π_old/π_vLLM − 1| > 0.1 (TRL issue 6789's measure), over all ranks' tokens.
"""

from __future__ import annotations

import math

import torch

MISMATCH_THRESHOLD = 0.1


def importance_ratio(old_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, mode: str,
                     clip_min: float | None, clip_max: float | None) -> torch.Tensor:
    """ρ = π_old / π_vLLM per token ([B, C]) or per sequence ([B, 1]), truncated or masked per `mode`."""
    from .vllm_config import IS_MODES

    if mode not in IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode={mode!r} is not supported; valid values: "
                         f"{', '.join(map(repr, IS_MODES))}")
    if old_logps.shape != sampling_logps.shape or old_logps.shape != mask.shape:
        raise ValueError(f"old_logps {tuple(old_logps.shape)}, sampling_logps {tuple(sampling_logps.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same [B, C] shape")
    diff = torch.nan_to_num((old_logps.float() - sampling_logps.float()) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):  # with no bound at all TRL 1.16 fails in torch.clamp; here nothing is clipped
        return ratio if clip_min is None and clip_max is None else torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def local_stats(old_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor,
                ratio: torch.Tensor | None, sequence_level: bool = False) -> torch.Tensor:
    """This rank's [mean |Δ|, max |Δ|, ratio min, ratio mean, ratio max, mismatched tokens, scored tokens] as
    float64 (NaN where a ratio is absent); `combine_stats` turns every rank's row into the logged metrics."""
    m = mask.bool()
    delta = (old_logps.float() - sampling_logps.float()).abs()
    delta = delta[m & ~torch.isnan(delta)]
    zero = torch.tensor(0.0)
    stats = [delta.mean() if delta.numel() else zero, delta.max() if delta.numel() else zero]
    if ratio is None:
        stats += [torch.tensor(math.nan)] * 3
    else:
        flat = ratio.flatten() if sequence_level else ratio[m]
        stats += [flat.min(), flat.mean(), flat.max()] if flat.numel() else [zero, zero, zero]
    # |π_old/π_vLLM − 1| = |exp(Δ) − 1| per token, NaN (unscored) excluded.
    signed = (old_logps.float() - sampling_logps.float())[m]
    signed = signed[~torch.isnan(signed)]
    stats += [(torch.expm1(signed).abs() > MISMATCH_THRESHOLD).sum(), torch.tensor(float(signed.numel()))]
    return torch.stack([torch.as_tensor(s, dtype=torch.float64).cpu() for s in stats])


def combine_stats(rows: torch.Tensor) -> dict[str, float]:
    """[world_size, 7] rows of `local_stats` → TRL's metrics (mean of the ranks' means, max of maxima, min of
    minima, nan-mean of ratio means) plus the global mismatch fraction."""
    out = {
        "sampling/sampling_logp_difference/mean": rows[:, 0].mean().item(),
        "sampling/sampling_logp_difference/max": rows[:, 1].max().item(),
        "sampling/mismatch_fraction": (rows[:, 5].sum() / rows[:, 6].sum().clamp(min=1)).item(),
    }
    if not torch.isnan(rows[:, 3]).all():
        out["sampling/importance_sampling_ratio/min"] = rows[:, 2][~torch.isnan(rows[:, 2])].min().item()
        out["sampling/importance_sampling_ratio/mean"] = rows[:, 3].nanmean().item()
        out["sampling/importance_sampling_ratio/max"] = rows[:, 4][~torch.isnan(rows[:, 4])].max().item()
    return out


def correct_rollout(batch, args, info) -> dict[str, float]:
    """Set `batch.importance_sampling_ratio` (when the correction is on) from `batch.old_logps` and
    `batch.sampling_logps`, and return the sampling metrics combined over ranks."""
    from . import distributed

    ratio = None
    if args.vllm_importance_sampling_correction:
        ratio = importance_ratio(batch.old_logps, batch.sampling_logps, batch.completion_mask,
                                 args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_min,
                                 args.vllm_importance_sampling_clip_max)
        batch.importance_sampling_ratio = ratio
    stats = local_stats(batch.old_logps, batch.sampling_logps, batch.completion_mask, ratio,
                        sequence_level=args.vllm_importance_sampling_mode.startswith("sequence"))
    rows = distributed.all_gather_tensor(stats[None].to(info.device), info).cpu()
    return combine_stats(rows)
