"""grpo_kernels: hidden states + LM head -> per-token log-probs and the GRPO loss, forward and backward,
without materializing the [tokens x vocab] logits.

    import grpo_kernels as gk
    loss, metrics = gk.fused_linear_grpo_loss(hidden, lm_head.weight, completion_ids, completion_mask, advantages)
"""

from .api import fused_linear_grpo_loss, grpo_loss, linear_logprobs
from .metrics import LossMetrics
from .module import FusedLinearGRPOLoss
from .options import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, LossOptions

__version__ = "0.1.0"

__all__ = ["linear_logprobs", "grpo_loss", "fused_linear_grpo_loss", "FusedLinearGRPOLoss", "LossOptions",
           "LossMetrics", "LOSS_TYPES", "IMPORTANCE_SAMPLING_LEVELS", "__version__"]
