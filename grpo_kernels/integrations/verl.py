"""verl uses grpo_kernels for its fused log-prob/entropy path.

    from grpo_kernels.integrations import verl as gkv
    gkv.patch()        # in every worker; with verl's config: actor_rollout_ref.model.external_lib=grpo_kernels.integrations.verl_patch

`linear_cross_entropy` has the signature and semantics of
`verl.utils.kernel.linear_cross_entropy.linear_cross_entropy` (read from verl 0.9.1):
hidden (..., H) and labels (...) are flattened to N tokens; returns (logprobs, entropy), fp32:
logprobs = log softmax(hidden @ weight.T / temperature)[label] (<= 0), shaped (N,) for reduction="none" or
its sum / mean over the N tokens (0-d) for "sum" / "mean"; entropy is always per token, (N,). Both are
differentiable w.r.t. hidden and weight. There is no bias and no ignore_index (verl passes token ids; a label
outside [0, V) is a ValueError here, where verl's kernel would return an unwritten value).
With `dist_process_group` (vocab-parallel LM head) it uses grpo_kernels' vocab-parallel path.
"""

from __future__ import annotations

import contextlib
import importlib
import math

import torch

import grpo_kernels as gk

from ._patching import Bindings

_HOME = "verl.utils.kernel.linear_cross_entropy"
# Modules that bind the name at import time (Megatron forwards); verl's HF forwards import it on each call.
_IMPORTERS = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")
_REDUCTIONS = ("none", "sum", "mean")

_bindings: Bindings | None = None
_verl_original = None
_counts = {"ours": 0, "verl": 0}


def call_counts() -> dict:
    """{'ours': calls computed by grpo_kernels, 'verl': calls handed to verl's function} since the last reset
    ('verl' stays 0 since every call, vocab-parallel ones included, is ours; kept for callers that read it)."""
    return dict(_counts)


def reset_call_counts() -> None:
    _counts["ours"] = _counts["verl"] = 0


def is_patched() -> bool:
    return _bindings is not None


def _world_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """verl's `linear_cross_entropy` (see the module docstring) computed by grpo_kernels."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not isinstance(reduction, str) or reduction.lower() not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, _REDUCTIONS))}, got {reduction!r}")
    for name, x in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must be (..., hidden_size), got shape {tuple(hidden.shape)}")
    h2d = hidden.reshape(-1, hidden.shape[-1])
    flat = labels.reshape(-1)
    if flat.numel() != h2d.shape[0]:
        raise ValueError(f"labels has {flat.numel()} elements (shape {tuple(labels.shape)}) but hidden has "
                         f"{h2d.shape[0]} tokens (shape {tuple(hidden.shape)})")
    kwargs = {}
    if dist_process_group is not None and _world_size(dist_process_group) > 1:
        kwargs["process_group"] = dist_process_group
    if not kwargs and isinstance(weight, torch.Tensor) and weight.dim() == 2 and flat.numel() \
            and bool(((flat < 0) | (flat >= weight.shape[0])).any()):
        # Vocab-parallel ids are global: grpo_kernels checks those against the whole vocabulary.
        raise ValueError(f"labels must be token ids in [0, {weight.shape[0]}) (verl has no ignore_index); got values "
                         f"in [{int(flat.min())}, {int(flat.max())}]")
    logp, entropy = gk.linear_logprobs(h2d, weight, flat, temperature=float(temperature), return_entropy=True,
                                       validate=bool(kwargs), **kwargs)
    _counts["ours"] += 1
    reduction = reduction.lower()
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.sum() / flat.numel()  # verl divides by the token count (NaN for 0 tokens, as verl)
    return logp, entropy


def patch() -> list[str]:
    """Put `linear_cross_entropy` where verl looks it up; returns the 'module.name' bindings replaced.
    Idempotent. Raises ImportError when verl is not importable."""
    global _bindings, _verl_original
    if _bindings is not None:
        return _bindings.names()
    home = importlib.import_module(_HOME)
    original = home.linear_cross_entropy
    modules = [home]
    for name in _IMPORTERS:
        with contextlib.suppress(ImportError):  # Megatron is optional in verl
            modules.append(importlib.import_module(name))
    bindings = Bindings()
    for module in modules:
        if vars(module).get("linear_cross_entropy") is original:
            bindings.replace(module, "linear_cross_entropy", linear_cross_entropy)
    _verl_original, _bindings = original, bindings
    return bindings.names()


def unpatch() -> None:
    """Restore verl's own function (also in verl modules imported after patch()). No-op when not patched."""
    global _bindings, _verl_original
    if _bindings is None:
        return
    _bindings.restore("verl", {linear_cross_entropy: _verl_original})
    _bindings = None
    _verl_original = None
