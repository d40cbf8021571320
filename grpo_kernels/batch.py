"""Input checks and the compaction plan: which tokens reach a GEMM, with what weight, in which chunk.

Checks run on the host before any kernel. Host-device syncs (docs/design.md, "Skipping and host syncs"): building
a plan costs exactly one (`_to_host`: the per-sequence counts of active tokens, with the target-range check folded
in); `check_targets` without a plan costs one when validating; nothing else here syncs.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Optional, Union

import torch

from .loss_math import TokenTerms
from .options import LossOptions

Tensor = torch.Tensor
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------- checks

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


def check_vllm_ratio(x, B: int, T: int, device) -> Optional[Tensor]:
    if x is None:
        return None
    x = _need_tensor("vllm_is_ratio", x)
    if not x.dtype.is_floating_point:
        raise TypeError(f"vllm_is_ratio must be a floating tensor, got {x.dtype}")
    if tuple(x.shape) not in ((B, T), (B, 1), (B,)):
        raise ValueError(f"vllm_is_ratio must have shape ({B}, {T}), ({B}, 1) or ({B},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"vllm_is_ratio is on {x.device} but the inputs are on {device}")
    return x


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


# ------------------------------------------------------------------------------------------------------ plan

@dataclasses.dataclass
class Plan:
    """Compacted view of a GRPO batch. Rows index the flattened [B*T] tokens."""

    B: int
    T: int
    rows: Tensor                      # [M] tokens that carry loss or gradient, sorted (so grouped by sequence)
    entropy_rows: Optional[Tensor]    # masked tokens skipped above whose entropy is still wanted
    targets: Tensor                   # [B*T] int64
    mask: Tensor                      # [B*T] float
    weight: Tensor                    # [B*T] w_t
    adv: Tensor                       # [B*T]
    old: Optional[Tensor]
    ref: Optional[Tensor]
    rho: Optional[Tensor]
    seq_len: Tensor                   # [B] max(1, sum of mask)
    vespo_log_rho: Optional[Tensor]   # [B]
    seq_adv: Optional[Tensor]         # [B] when clip metrics are averaged over sequences
    row_counts: list                  # active rows per sequence (host ints)
    mask_total: Tensor                # max(1, sum of mask): denominator of token-mean metrics

    @property
    def num_rows(self) -> int:
        return int(self.rows.numel())

    @property
    def num_entropy_rows(self) -> int:
        return 0 if self.entropy_rows is None else int(self.entropy_rows.numel())

    def terms(self, start: int, end: int) -> TokenTerms:
        """Loss inputs of rows[start:end] (must start and end on sequence boundaries at sequence level)."""
        idx = self.rows[start:end]
        seq_global = torch.div(idx, self.T, rounding_mode="floor")
        b0 = self.seq_of(start)
        b1 = self.seq_of(end - 1) + 1 if end > start else b0
        pick = lambda x: None if x is None else x.index_select(0, idx)  # noqa: E731
        return TokenTerms(weight=pick(self.weight), mask=pick(self.mask), adv=pick(self.adv), old=pick(self.old),
                          ref=pick(self.ref), rho=pick(self.rho), seq=seq_global - b0, num_seqs=b1 - b0,
                          seq_len=self.seq_len[b0:b1],
                          vespo_log_rho=None if self.vespo_log_rho is None else self.vespo_log_rho[b0:b1],
                          seq_adv=None if self.seq_adv is None else self.seq_adv[b0:b1])

    def seq_of(self, row: int) -> int:
        """Sequence index of the row-th active token (host-side, from the per-sequence counts)."""
        return bisect.bisect_right(self._cum, row)

    def __post_init__(self):
        self._cum = []
        total = 0
        for c in self.row_counts:
            total += c
            self._cum.append(total)

    def chunks(self, chunk_size: int, whole_sequences: bool) -> list[tuple[int, int]]:
        """[start, end) ranges of rows, at most chunk_size long unless one sequence alone is longer."""
        M = self.num_rows
        if not whole_sequences:
            return [(s, min(M, s + chunk_size)) for s in range(0, M, chunk_size)]
        out, start, end = [], 0, 0
        for c in self.row_counts:
            if c == 0:
                continue
            if end > start and end - start + c > chunk_size:
                out.append((start, end))
                start = end
            end += c
        if end > start:
            out.append((start, end))
        return out


def token_weights(mask: Tensor, seq_len: Tensor, opts: LossOptions,
                  num_items: Optional[Union[float, Tensor]]) -> Tensor:
    """w_t of L = sum_t w_t l_t for each loss type (docs/design.md, "Aggregation"). mask is [B, T] float."""
    B = max(mask.shape[0], 1)
    lt = opts.loss_type
    if lt in ("grpo", "sapo"):
        return mask / (B * seq_len).unsqueeze(1)
    if lt == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if lt == "dr_grpo":
        return mask / (B * opts.max_completion_length)
    if lt == "luspo":
        return mask / B
    if num_items is None:
        normalizer = mask.sum()
    elif isinstance(num_items, torch.Tensor):
        normalizer = num_items.to(device=mask.device, dtype=mask.dtype)
    else:  # a fill kernel, not a host-to-device copy (which would sync)
        normalizer = mask.new_full((), num_items)
    return mask / normalizer.clamp(min=1.0)


def _to_host(counts: Tensor) -> list:
    """THE device->host sync of a plan (one per call): chunk boundaries and row counts are host decisions."""
    return counts.tolist()


def _indices(flag: Tensor, count: int) -> Tensor:
    """flag.nonzero().squeeze(1) (sorted) without the sync nonzero makes, given the number of set flags."""
    n = flag.numel()
    if count == n:
        return torch.arange(n, device=flag.device)
    pos = torch.where(flag, flag.cumsum(0) - 1, count)  # unset flags all land in the spare slot `count`
    out = torch.empty(count + 1, dtype=torch.long, device=flag.device)
    out.scatter_(0, pos, torch.arange(n, device=flag.device))
    return out[:count]


def make_plan(targets: Tensor, attention_mask: Tensor, advantages: Tensor, old: Optional[Tensor],
              ref: Optional[Tensor], rho: Optional[Tensor], num_items, opts: LossOptions,
              kl_active: bool, acc_dtype: torch.dtype, vocab: Optional[int] = None,
              targets_name: str = "selected_token_ids") -> Plan:
    """Decide which tokens need the GEMMs. With beta = 0 (or no reference), a token whose advantage is exactly 0
    has zero loss and zero gradient under every loss type, so it is skipped (a whole sequence at a time when
    a token's gradient depends on its sequence). With `vocab`, also checks that the targets under the mask lie in
    [0, vocab), inside the plan's one sync."""
    B, T = targets.shape
    mask = attention_mask.to(acc_dtype)
    seq_len = mask.sum(-1).clamp(min=1.0)
    adv = advantages.to(acc_dtype)
    adv = adv.view(B, 1) if adv.dim() == 1 or adv.shape[1] == 1 else adv
    adv_bt = adv.expand(B, T)
    active = mask != 0
    contributes = active if kl_active else active & (adv_bt != 0)
    if opts.needs_whole_sequences:
        contributes = active & contributes.any(-1, keepdim=True)
    skipped = (active & ~contributes).reshape(-1) if opts.compute_entropy else None
    counts = [contributes.sum(-1)]
    if skipped is not None:
        counts.append(skipped.sum().view(1))
    if vocab is not None and targets.numel() > 0:
        counts.append(count_out_of_range(targets, vocab, attention_mask).view(1))
    host = _to_host(torch.cat(counts))
    if vocab is not None and targets.numel() > 0 and host[-1] > 0:
        raise_out_of_range(targets_name, targets, vocab, attention_mask)
    row_counts = host[:B]
    rows = _indices(contributes.reshape(-1), sum(row_counts))
    entropy_rows = None if skipped is None else _indices(skipped, host[B])

    rho_bt = None
    vespo_log_rho = None
    if rho is not None:
        rho = rho.to(acc_dtype)
        rho = rho.view(B, 1) if rho.dim() == 1 else rho
        if opts.loss_type == "vespo":  # TRL sums log(rho) over all T positions of the row, padding included
            vespo_log_rho = rho.log().clamp(min=math.log(1e-8), max=20.0).sum(-1)
        rho_bt = rho.expand(B, T).reshape(-1)
    per_seq_metrics = opts.sequence_level and (advantages.dim() == 1 or advantages.shape[1] == 1)
    flat = lambda x: None if x is None else x.to(acc_dtype).reshape(-1)  # noqa: E731
    return Plan(B=B, T=T, rows=rows, entropy_rows=entropy_rows, targets=targets.reshape(-1).long(),
                mask=mask.reshape(-1), weight=token_weights(mask, seq_len, opts, num_items).reshape(-1),
                adv=adv_bt.reshape(-1), old=flat(old), ref=flat(ref) if kl_active else None, rho=rho_bt,
                seq_len=seq_len, vespo_log_rho=vespo_log_rho,
                seq_adv=adv.reshape(B, -1)[:, 0] if per_seq_metrics else None, row_counts=row_counts,
                mask_total=mask.sum().clamp(min=1.0))
