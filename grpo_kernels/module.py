"""`FusedLinearGRPOLoss`: the drop-in nn.Module (Liger's constructor keywords and forward signature)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .api import _fused_linear_grpo_loss
from .options import LossOptions


class FusedLinearGRPOLoss(torch.nn.Module):
    """Drop-in replacement for `liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`.

    Same keywords and forward call as Liger, plus every `LossOptions` field (backend, strategy,
    compute_entropy, validate, ...). Differences a Liger user should know:
    - defaults follow TRL's GRPOConfig: beta = 0.0 (Liger's module defaults to 0.04);
    - `chunk_size` counts tokens (None = chosen from the vocabulary size and free memory); Liger's counts
      sequences, so Liger's `chunk_size=1` would be a very slow setting here and is treated as None;
    - `compiled` is accepted and ignored (the work is in Triton kernels and GEMMs, not torch.compile);
    - `use_ref_model=False` ignores ref_input/ref_weight, as in Liger;
    - `process_group` (not in Liger): vocab-parallel, lin_weight/bias/ref_weight/ref_bias hold this rank's
      contiguous rows of the LM head (see `gk.fused_linear_grpo_loss`).
    forward returns (loss, metrics) with metrics[0] = KL when beta != 0 and metrics[-1] = clip ratio, and
    named fields kl, clip_ratio, clip_ratio_low, clip_ratio_high, entropy.
    """

    def __init__(self, beta: float = 0.0, compiled: bool = True, use_ref_model: bool = True,
                 chunk_size: Optional[int] = None, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: str = "dapo", max_completion_length: Optional[int] = None,
                 importance_sampling_level: str = "token", sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, temperature: float = 1.0, delta: Optional[float] = None,
                 use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                 vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, process_group=None, **options):
        super().__init__()
        if chunk_size == 1:
            warnings.warn("FusedLinearGRPOLoss: chunk_size counts tokens, not sequences as in Liger; "
                          "chunk_size=1 is treated as None (chosen for you)", stacklevel=2)
            chunk_size = None
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.process_group = process_group
        self.options = LossOptions.from_kwargs(
            beta=beta, chunk_size=chunk_size, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
            loss_type=loss_type, max_completion_length=max_completion_length,
            importance_sampling_level=importance_sampling_level, sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg, temperature=temperature, delta=delta,
            use_bias_correction_kl=use_bias_correction_kl, vespo_k_pos=vespo_k_pos,
            vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg,
            **options)

    def __getattr__(self, name):
        # Liger exposes its options as attributes (loss_fn.beta, loss_fn.loss_type, ...): so do we.
        try:
            return super().__getattr__(name)
        except AttributeError:
            options = self.__dict__.get("options")
            if options is not None and hasattr(options, name):
                return getattr(options, name)
            raise

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                vllm_is_ratio=None, num_items_in_batch=None, token_loss_mask=None):
        if not self.use_ref_model:
            ref_input = ref_weight = ref_bias = None
        return _fused_linear_grpo_loss(self.options, _input, lin_weight, selected_token_ids, attention_mask,
                                       advantages, bias, ref_per_token_logps, old_per_token_logps, ref_input,
                                       ref_weight, ref_bias, vllm_is_ratio, num_items_in_batch, self.process_group,
                                       token_loss_mask)

    def extra_repr(self) -> str:
        o = self.options
        return (f"loss_type={o.loss_type!r}, beta={o.beta}, epsilon=({o.epsilon_low}, {o.epsilon_high}), "
                f"importance_sampling_level={o.importance_sampling_level!r}, backend={o.backend!r}, "
                f"strategy={o.strategy!r}")
