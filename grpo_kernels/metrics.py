"""The metrics returned next to the loss: Liger's positional order plus named fields."""

from __future__ import annotations

from typing import Optional

import torch


class LossMetrics(tuple):
    """`metrics[0]` is the masked mean KL when beta != 0 and `metrics[-1]` the clip ratio (Liger's order, which
    TRL's Liger path reads); the same values, and more, are attributes:

    kl: masked mean of the (bias-corrected, when asked) k3 KL; None when beta == 0.
    clip_ratio, clip_ratio_low, clip_ratio_high: TRL's clip_ratio/region_mean, low_mean and high_mean (token
        level: masked token means; sequence level with one advantage per sequence: means over sequences).
        For cispo, high and region are TRL's cispo_clip_ratio and low is 0; sapo and vespo clip nothing.
    entropy: masked mean entropy of the policy; None unless compute_entropy=True.
    All are detached 0-d fp32 tensors.
    """

    kl: Optional[torch.Tensor]
    clip_ratio: torch.Tensor
    clip_ratio_low: torch.Tensor
    clip_ratio_high: torch.Tensor
    entropy: Optional[torch.Tensor]

    def __new__(cls, kl, clip_ratio, clip_ratio_low, clip_ratio_high, entropy=None):
        values = (clip_ratio,) if kl is None else (kl, clip_ratio)
        self = super().__new__(cls, values)
        self.kl, self.clip_ratio, self.clip_ratio_low, self.clip_ratio_high = kl, clip_ratio, clip_ratio_low, \
            clip_ratio_high
        self.entropy = entropy
        return self

    def as_dict(self) -> dict:
        """Plain floats under TRL's metric names (only the ones that were computed)."""
        out = {"clip_ratio/low_mean": float(self.clip_ratio_low), "clip_ratio/high_mean": float(self.clip_ratio_high),
               "clip_ratio/region_mean": float(self.clip_ratio)}
        if self.kl is not None:
            out["kl"] = float(self.kl)
        if self.entropy is not None:
            out["entropy"] = float(self.entropy)
        return out

    def __reduce__(self):
        return (LossMetrics, (self.kl, self.clip_ratio, self.clip_ratio_low, self.clip_ratio_high, self.entropy))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.as_dict().items())
        return f"LossMetrics({fields})"
