"""PyTorch versions of the kernel phases, with the same signatures as `grpo_kernels.kernels`.

They are the CPU path (backend="torch") and make every strategy available without Triton. Math is in fp32
(fp64 for fp64 inputs); GEMM operands stay in the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

# The fused strategy on the torch backend streams the vocabulary in tiles of about this many logits
# (M x tile), so its extra memory stays O(M) with a small constant.
TILE_ELEMENTS = 4 << 20


def _vocab_tile(rows: int, vocab: int) -> int:
    return int(min(vocab, max(128, TILE_ELEMENTS // max(rows, 1))))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """logits / T in the accumulation dtype (no copy for fp32 logits at T = 1)."""
    z = logits.to(_acc_dtype(logits.dtype))
    return z if temperature == 1.0 else z * (1.0 / temperature)


def chunk_stats(logits: Tensor, targets: Tensor, temperature: float, return_entropy: bool):
    """lse, logp and entropy of z = logits / temperature, row by row (see kernels.chunk_epilogue)."""
    z = _scaled(logits, temperature)
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets.long().unsqueeze(1)).squeeze(1) - lse
    entropy = None
    if return_entropy:  # -sum p*log p, not lse - sum p*z: the latter cancels catastrophically for |z| ~ 1e3
        logprobs = z - lse.unsqueeze(1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    return lse, logp, entropy


def chunk_dlogits_(logits: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, temperature: float) -> None:
    """In place: logits <- grad * (onehot(target) - softmax(logits / T)) / T.

    For fp32/fp64 buffers every step is in place (no temporary of the chunk's size)."""
    acc = _acc_dtype(logits.dtype)
    p = logits if logits.dtype == acc else logits.to(acc)
    if temperature != 1.0:
        p.mul_(1.0 / temperature)
    scale = (grad.to(acc) / temperature).unsqueeze(1)
    p.sub_(lse.to(acc).unsqueeze(1)).exp_().mul_(-scale)
    p.scatter_add_(1, targets.long().unsqueeze(1), scale)
    if p is not logits:
        logits.copy_(p)


def _logits_tile(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], v0: int, v1: int) -> Tensor:
    w = weight[v0:v1]
    if bias is None:
        return hidden @ w.T
    return torch.addmm(bias[v0:v1], hidden, w.T)


def fused_linear_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
                       return_entropy: bool):
    """Vocabulary-tiled forward with an online logsumexp: never holds more than one M x tile block of logits."""
    M, V = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    tgt = targets.long()
    run_max = torch.full((M,), float("-inf"), dtype=acc, device=hidden.device)
    run_sum = torch.zeros(M, dtype=acc, device=hidden.device)
    run_pz = torch.zeros(M, dtype=acc, device=hidden.device)  # sum_v exp(z_v - max) * z_v
    target_z = torch.zeros(M, dtype=acc, device=hidden.device)
    tile = _vocab_tile(M, V)
    for v0 in range(0, V, tile):
        v1 = min(V, v0 + tile)
        z = _logits_tile(hidden, weight, bias, v0, v1).to(acc) / temperature
        new_max = torch.maximum(run_max, z.max(dim=1).values)
        scale = torch.exp(run_max - new_max)
        e = torch.exp(z - new_max.unsqueeze(1))
        run_sum = run_sum * scale + e.sum(1)
        if return_entropy:
            run_pz = run_pz * scale + (e * z).sum(1)
        run_max = new_max
        in_tile = (tgt >= v0) & (tgt < v1)
        picked = z.gather(1, (tgt - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
        target_z = torch.where(in_tile, picked, target_z)
    lse = run_max + torch.log(run_sum)
    entropy = lse - run_pz / run_sum if return_entropy else None
    return lse, target_z - lse, entropy


def fused_linear_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                          grad: Tensor, temperature: float, need_hidden: bool, need_weight: bool, need_bias: bool):
    """Recompute logits tile by tile and accumulate d_hidden (hidden's dtype), d_weight and d_bias (fp32)."""
    M, H = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    d_hidden = torch.zeros(M, H, dtype=acc, device=hidden.device) if need_hidden else None
    d_weight = torch.zeros(V, H, dtype=acc, device=hidden.device) if need_weight else None
    d_bias = torch.zeros(V, dtype=acc, device=hidden.device) if need_bias else None
    tgt = targets.long()
    tile = _vocab_tile(M, V)
    for v0 in range(0, V, tile):
        v1 = min(V, v0 + tile)
        dz = _logits_tile(hidden, weight, bias, v0, v1)
        shifted = tgt - v0
        in_tile = (shifted >= 0) & (shifted < v1 - v0)
        local = torch.where(in_tile, shifted, torch.zeros_like(shifted))
        p = torch.exp(dz.to(acc) / temperature - lse.to(acc).unsqueeze(1))
        p.neg_().scatter_add_(1, local.unsqueeze(1), in_tile.to(acc).unsqueeze(1))
        p.mul_((grad.to(acc) / temperature).unsqueeze(1))
        dz = p.to(hidden.dtype)
        if need_hidden:
            d_hidden += (dz @ weight[v0:v1]).to(acc)
        if need_weight:
            d_weight[v0:v1] += (dz.T @ hidden).to(acc)
        if need_bias:
            d_bias[v0:v1] += p.sum(0)
    if d_hidden is not None:
        d_hidden = d_hidden.to(hidden.dtype)
    return d_hidden, d_weight, d_bias
