"""Temperature sampling by inverse CDF, for HF `generate`.

HF's sampler calls `torch.multinomial(probs, 1)`, which on the CPU draws an exponential variate for every vocabulary
entry of every row (the exponential-race trick): 32 rows × 49152 entries cost about 75 ms a token on the 2-core
machine, 3 s of a 40-token rollout. One uniform per row and a binary search over the cumulative probabilities
draw from the same distribution in about 2 ms.

`InverseCDFSampler` is a logits processor that samples and returns scores that are 0 at the drawn token and -inf
elsewhere; generate() then runs greedy (do_sample=False) and picks it. `split_sampling` uses it for plain
temperature sampling only; top-k, top-p and min-p keep HF's own warpers and sampler.
"""

from __future__ import annotations

import torch


class InverseCDFSampler:
    """Draws one token per row from softmax(scores / temperature); returns the draw as one-hot scores (0 / -inf)."""

    def __init__(self, temperature: float):
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        cdf = probs.cumsum(dim=-1)
        # u in [0, total): the total absorbs the cumsum's rounding. right=True skips zero-probability entries, even
        # at u = 0 (the first index whose cumulative probability exceeds u).
        u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token, 0.0)


def split_sampling(sampling: dict) -> tuple[dict, list]:
    """(generate() options, extra logits processors) for `rollout.sampling_kwargs`' options: plain temperature
    sampling becomes greedy decoding over an `InverseCDFSampler`; anything else is returned unchanged."""
    plain = (sampling.get("do_sample") and sampling.get("top_p", 1.0) >= 1.0 and not sampling.get("top_k")
             and sampling.get("min_p") is None)
    if not plain:
        return sampling, []
    options = {k: v for k, v in sampling.items() if k not in ("do_sample", "temperature", "top_p", "top_k")}
    return {**options, "do_sample": False}, [InverseCDFSampler(sampling["temperature"])]
