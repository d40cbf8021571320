"""Group-relative advantages (GRPO), as TRL's ``GRPOTrainer`` computes them for ``sum_then_normalize``.

Completions come in consecutive groups of ``num_generations`` (one group per prompt). A completion's advantage is
its reward minus its group's mean reward, divided by

- ``"group"``: the group's standard deviation (+1e-4),
- ``"batch"``: the whole batch's standard deviation (+1e-4), still centred on the group mean (PPO-Lite),
- ``"none"``:  nothing (Dr. GRPO: scaling by the std biases towards easy and hard questions).

NaN rewards mark completions no reward function could score: they are left out of the means and stds and get
advantage 0. Standard deviations are unbiased (Bessel-corrected), as ``torch.std`` and TRL's ``nanstd``; a group
with fewer than two scorable rewards has an undefined std, and its advantages become 0.
"""

from __future__ import annotations

import torch

_EPS = 1e-4  # TRL's: keeps a zero-std group's advantages at 0 rather than NaN
SCALE_REWARDS = ("group", "batch", "none")


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaNs; NaN where fewer than two values are present."""
    valid = ~torch.isnan(x)
    count = valid.sum(dim=dim) if dim is not None else valid.sum()
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x))
    total = sq.sum(dim=dim) if dim is not None else sq.sum()
    var = total / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))


def compute_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages [N] (fp32, never NaN) and TRL's reward metrics for rewards [N] (NaN = not scorable).

    Metrics: ``reward`` (mean of the scorable rewards), ``reward_std`` (std of the scorable rewards over the batch,
    TRL 1.16's logged value), ``frac_reward_zero_std`` (fraction of groups whose rewards are all equal: those
    groups carry no learning signal).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [N], got {getattr(rewards, 'shape', type(rewards))}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be a positive integer, got {num_generations!r}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not supported; valid values: {SCALE_REWARDS}")
    n = rewards.numel()
    if n == 0 or n % num_generations != 0:
        raise ValueError(
            f"got {n} rewards, which is not a positive multiple of num_generations={num_generations}: the rewards must "
            f"hold whole groups of {num_generations} consecutive completions per prompt"
        )
    r = rewards.detach().double()  # squares of rewards near float32's limit must not overflow the std
    groups = r.view(-1, num_generations)
    group_mean = torch.nanmean(groups, dim=1, keepdim=True)
    group_std = nanstd(groups, dim=1) if num_generations > 1 else torch.zeros(groups.shape[0], device=r.device)
    centred = groups - group_mean
    if scale_rewards == "group":
        adv = centred / (group_std.unsqueeze(1) + _EPS)
    elif scale_rewards == "batch":
        adv = centred / (nanstd(r) + _EPS)
    else:
        adv = centred
    adv = torch.nan_to_num(adv.reshape(-1), nan=0.0).float()

    zero_std = torch.isclose(group_std, torch.zeros_like(group_std))
    scored = r[~torch.isnan(r)]
    metrics = {
        "reward": scored.mean().item() if scored.numel() else float("nan"),
        "reward_std": nanstd(r).item(),
        "frac_reward_zero_std": zero_std.float().mean().item(),
    }
    return adv, metrics
