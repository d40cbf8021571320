"""Every loss option in one place: its default, its meaning and its validation.

Defaults follow TRL's `GRPOConfig` (beta = 0.0), not Liger's `LigerFusedLinearGRPOLoss` (beta = 0.04).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Optional

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
BACKENDS = ("auto", "torch", "triton")
STRATEGIES = ("auto", "chunked", "fused")

# Loss types whose per-token loss is -min(r*A, clip(r)*A) (the PPO-style clipped family).
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Loss types that TRL (and Liger) only define with token-level importance weights.
TOKEN_LEVEL_ONLY = ("cispo", "sapo", "vespo")


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Options of the GRPO loss (keyword names shared by every function and the module).

    beta: KL coefficient (k3 estimator against the reference log-probs); 0 disables the KL term.
    epsilon_low / epsilon_high: clipping range [1 - epsilon_low, 1 + epsilon_high]; for cispo,
        epsilon_high is the cap of the (detached) ratio.
    loss_type: one of LOSS_TYPES; decides the per-token loss and the normalizer (docs/design.md, "The math").
    max_completion_length: the dr_grpo normalizer (required by it).
    importance_sampling_level: "token" (GRPO) or "sequence" (GSPO: one length-normalised ratio per sequence).
    temperature: logits are divided by it before the softmax.
    delta: upper clamp of the unclipped ratio (two-sided clipping, INTELLECT-2); None disables it.
    use_bias_correction_kl: multiply the KL term by the importance ratio (DeepSeek-V3.2).
    sapo_temperature_pos / _neg: SAPO's gate temperatures for positive / non-positive advantages.
    vespo_*: shape k and rate lambda of VESPO's gamma weights for non-negative / negative advantages.
    backend: "torch", "triton" or "auto" (Triton on CUDA tensors, torch on CPU tensors).
    strategy: "chunked" (one chunk of logits at a time, 6·N·H·V FLOPs), "fused" (never holds logits,
        8·N·H·V FLOPs, O(N) memory) or "auto" (chunked when its buffer fits comfortably).
    chunk_size: tokens per chunk for the chunked strategy; None chooses from V and free memory.
    compute_entropy: also return the masked mean entropy of the policy (costs a little per token).
    validate: check target ids are inside [0, V) (one device sync); turn off in hot loops.
    """

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "dapo"
    max_completion_length: Optional[int] = None
    importance_sampling_level: str = "token"
    temperature: float = 1.0
    delta: Optional[float] = None
    use_bias_correction_kl: bool = False
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    backend: str = "auto"
    strategy: str = "auto"
    chunk_size: Optional[int] = None
    compute_entropy: bool = False
    validate: bool = True

    def __post_init__(self) -> None:
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("strategy", self.strategy, STRATEGIES)
        for name in ("beta", "epsilon_low", "epsilon_high", "temperature", "sapo_temperature_pos",
                     "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            _check_real(name, getattr(self, name))
        for name in ("temperature", "sapo_temperature_pos", "sapo_temperature_neg"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {self.epsilon_low} and {self.epsilon_high}")
        if self.delta is not None:
            _check_real("delta", self.delta)
            if self.delta <= 0:
                raise ValueError(f"delta must be > 0 (or None to disable two-sided clipping), got {self.delta}")
        if self.loss_type == "dr_grpo":
            if self.max_completion_length is None:
                raise ValueError("loss_type='dr_grpo' normalizes by max_completion_length: pass max_completion_length")
        if self.max_completion_length is not None:
            if isinstance(self.max_completion_length, bool) or not isinstance(self.max_completion_length, int) \
                    or self.max_completion_length <= 0:
                raise ValueError(f"max_completion_length must be a positive int, got {self.max_completion_length!r}")
        if self.importance_sampling_level == "sequence" and self.loss_type in TOKEN_LEVEL_ONLY:
            raise ValueError(
                f"importance_sampling_level='sequence' is not supported for loss_type='{self.loss_type}' "
                f"(defined for token-level ratios only, as in TRL); use importance_sampling_level='token'")
        if self.chunk_size is not None:
            if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
                raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "LossOptions":
        """Build from keyword arguments; an unknown keyword is a TypeError naming the closest option."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise TypeError(f"unknown loss option '{key}'{hint}; valid options: {', '.join(names)}")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "LossOptions":
        return dataclasses.replace(self, **changes)

    @property
    def sequence_level(self) -> bool:
        return self.importance_sampling_level == "sequence"

    @property
    def needs_whole_sequences(self) -> bool:
        """True when a token's gradient depends on the other tokens of its sequence."""
        return self.sequence_level or self.loss_type == "vespo"


def _check_choice(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid values: {', '.join(repr(v) for v in valid)}")


def _check_real(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
