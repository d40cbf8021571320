"""Raw Triton kernels of grpo_kernels, one phase per module (no autograd here).

chunk_stats / chunk_dlogits_   epilogue of the chunked strategy (logits already in a [M, V] buffer)
fused_linear_stats             fused forward: lse, logp, entropy from hidden and the LM head, no logits buffer
fused_linear_backward          fused backward: d_hidden, d_weight, d_bias, logits recomputed tile by tile
token_loss_grad                loss from log-probs: token-level GRPO loss, dL/dlogp and metric sums in one launch
"""
from ._common import IS_INTERPRETER
from .chunk_epilogue import chunk_dlogits_, chunk_stats
from .fused_backward import fused_linear_backward
from .fused_forward import fused_linear_stats
from .token_loss import token_loss_grad

__all__ = ["IS_INTERPRETER", "chunk_stats", "chunk_dlogits_", "fused_linear_stats", "fused_linear_backward",
           "token_loss_grad"]
