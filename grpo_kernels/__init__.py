"""grpo_kernels: hidden states + LM head -> per-token log-probs and the GRPO loss, forward and backward,
without materializing the [tokens x vocab] logits.

    import grpo_kernels as gk
    loss, metrics = gk.fused_linear_grpo_loss(hidden, lm_head.weight, completion_ids, completion_mask, advantages)

The torch-backed names load on first use (PEP 562), so that importing the package or its torch-free `options`
module (as grpo.config does for LOSS_TYPES, and so `grpo --help`) does not import torch.
"""

from .options import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, LossOptions

__version__ = "0.1.0"

__all__ = ["linear_logprobs", "grpo_loss", "fused_linear_grpo_loss", "FusedLinearGRPOLoss", "LossOptions",
           "LossMetrics", "LOSS_TYPES", "IMPORTANCE_SAMPLING_LEVELS", "__version__"]


def __getattr__(name: str):
    if name in ("linear_logprobs", "grpo_loss", "fused_linear_grpo_loss"):
        from . import api as where
    elif name == "FusedLinearGRPOLoss":
        from . import module as where
    elif name == "LossMetrics":
        from . import metrics as where
    else:
        raise AttributeError(f"module 'grpo_kernels' has no attribute {name!r}")
    value = getattr(where, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
