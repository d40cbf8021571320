"""Input checks of the public entry points: types, shapes, devices and target ranges, on the host before any
kernel, each failure a ValueError/TypeError naming the argument. `check_targets` costs one host sync when it
validates; nothing else here syncs (a plan folds the target-range check into its own one sync, plan.py)."""

from __future__ import annotations

from typing import Optional, Union

import torch

Tensor = torch.Tensor
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _need_tensor(name: str, x) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_float(name: str, x: Tensor) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32 or fp64), got {x.dtype}")


def _check_shape(name: str, x: Tensor, shape: tuple, other: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {other} needs {tuple(shape)}")


def check_linear(hidden, weight, bias, targets_shape: Optional[tuple], hidden_name="hidden", weight_name="weight",
                 bias_name="bias") -> tuple[int, int]:
    """Check an (input, LM-head weight, bias) triple; returns (V, H)."""
    hidden, weight = _need_tensor(hidden_name, hidden), _need_tensor(weight_name, weight)
    _check_float(hidden_name, hidden)
    _check_float(weight_name, weight)
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must be 2-D (vocab, hidden), got shape {tuple(weight.shape)}")
    V, H = weight.shape
    if V == 0 or H == 0:
        raise ValueError(f"{weight_name} must have a non-empty vocab and hidden size, got shape {tuple(weight.shape)}")
    if hidden.dim() < 2:
        raise ValueError(f"{hidden_name} must be (B, T, H) or (B*T, H), got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != H:
        raise ValueError(f"{hidden_name} has hidden size {hidden.shape[-1]} (shape {tuple(hidden.shape)}) but "
                         f"{weight_name} has {H} (shape {tuple(weight.shape)})")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{hidden_name} is {hidden.dtype} but {weight_name} is {weight.dtype}; cast them to one dtype")
    if hidden.device != weight.device:
        raise ValueError(f"{hidden_name} is on {hidden.device} but {weight_name} is on {weight.device}")
    if targets_shape is not None:
        n = 1
        for s in targets_shape:
            n *= s
        lead = tuple(hidden.shape[:-1])
        if lead != tuple(targets_shape) and not (hidden.dim() == 2 and hidden.shape[0] == n):
            raise ValueError(f"{hidden_name} has shape {tuple(hidden.shape)}, which does not match the targets' "
                             f"shape {tuple(targets_shape)} (expected {tuple(targets_shape) + (H,)} or ({n}, {H}))")
    if bias is not None:
        bias = _need_tensor(bias_name, bias)
        _check_float(bias_name, bias)
        _check_shape(bias_name, bias, (V,), f"{weight_name} of shape {tuple(weight.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"{bias_name} is {bias.dtype} but {weight_name} is {weight.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"{bias_name} is on {bias.device} but {weight_name} is on {weight.device}")
    return V, H


def check_targets(name: str, targets, V: int, mask: Optional[Tensor], validate: bool) -> Tensor:
    """Type check; with validate, also the range check (one sync). A caller that builds a plan passes
    validate=False here and vocab= to make_plan instead, which folds the check into the plan's one sync."""
    targets = _need_tensor(name, targets)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {targets.dtype}")
    if validate and targets.numel() > 0 and int(count_out_of_range(targets, V, mask)) > 0:
        raise_out_of_range(name, targets, V, mask)
    return targets


def count_out_of_range(targets: Tensor, V: int, mask: Optional[Tensor]) -> Tensor:
    """0-d device count of targets outside [0, V) where the mask is set (no sync)."""
    bad = (targets < 0) | (targets >= V)
    if mask is not None:
        bad = bad & (mask != 0)
    return bad.sum()


def raise_out_of_range(name: str, targets: Tensor, V: int, mask: Optional[Tensor]):
    """The error path (syncs freely): report the range of the targets in use."""
    used = targets if mask is None else targets[mask != 0]
    lo, hi = int(used.min()), int(used.max())
    raise ValueError(f"{name} must lie in [0, {V}) (the weight's vocab size) where the mask is set, "
                     f"got values in [{lo}, {hi}]")


def check_per_token(name: str, x, shape: tuple, device) -> Optional[Tensor]:
    if x is None:
        return None
    x = _need_tensor(name, x)
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise TypeError(f"{name} must be a real tensor, got {x.dtype}")
    _check_shape(name, x, shape, f"selected_token_ids of shape {tuple(shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the inputs are on {device}")
    return x


def check_mask(mask, shape: tuple, device) -> Tensor:
    mask = _need_tensor("attention_mask", mask)
    if mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be bool, integer or float, got {mask.dtype}")
    _check_shape("attention_mask", mask, shape, f"selected_token_ids of shape {tuple(shape)}")
    if mask.device != device:
        raise ValueError(f"attention_mask is on {mask.device} but the inputs are on {device}")
    return mask


def check_advantages(advantages, B: int, T: int, device) -> Tensor:
    advantages = _need_tensor("advantages", advantages)
    if advantages.dtype == torch.bool or advantages.dtype.is_complex:
        raise TypeError(f"advantages must be a real tensor, got {advantages.dtype}")
    if tuple(advantages.shape) not in ((B,), (B, 1), (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}) to match selected_token_ids of shape "
                         f"({B}, {T}), got {tuple(advantages.shape)}")
    if advantages.device != device:
        raise ValueError(f"advantages is on {advantages.device} but the inputs are on {device}")
    return advantages


def check_token_multiplier(name: str, x, B: int, T: int, device, allow_bool: bool = False) -> Optional[Tensor]:
    """A per-token (or per-sequence) multiplier of the policy term: `vllm_is_ratio`, `token_loss_mask`."""
    if x is None:
        return None
    x = _need_tensor(name, x)
    if not (x.dtype.is_floating_point or (allow_bool and x.dtype == torch.bool)):
        raise TypeError(f"{name} must be a {'bool or ' if allow_bool else ''}floating tensor, got {x.dtype}")
    if tuple(x.shape) not in ((B, T), (B, 1), (B,)):
        raise ValueError(f"{name} must have shape ({B}, {T}), ({B}, 1) or ({B},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the inputs are on {device}")
    return x


def check_vllm_ratio(x, B: int, T: int, device) -> Optional[Tensor]:
    return check_token_multiplier("vllm_is_ratio", x, B, T, device)


def check_num_items(num_items_in_batch) -> Optional[Union[float, Tensor]]:
    """A float, or a 0-d tensor for a device tensor (kept on the device: reading it would be a sync)."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.dtype.is_complex:
            raise TypeError(f"num_items_in_batch must be a real number, got a {num_items_in_batch.dtype} tensor")
        if num_items_in_batch.device.type == "cpu":
            return float(num_items_in_batch)
        return num_items_in_batch.reshape(())
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise TypeError(f"num_items_in_batch must be a number or a 0-d tensor, got {type(num_items_in_batch).__name__}")
    return float(num_items_in_batch)
