"""The compaction plan: which tokens reach a GEMM, with what weight, in which chunk.

Host-device syncs (docs/design.md, "Skipping and host syncs"): building a plan costs exactly one (`_to_host`:
the per-sequence counts of active tokens, with the target-range check folded in).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Optional, Union

import torch

from .inputs import count_out_of_range, raise_out_of_range
from .loss_math import TokenTerms
from .options import LossOptions

Tensor = torch.Tensor

@dataclasses.dataclass
class Plan:
    """Compacted view of a GRPO batch. Rows index the flattened [B*T] tokens."""

    B: int
    T: int
    rows: Tensor                      # [M] tokens that carry loss or gradient, sorted (so grouped by sequence)
    entropy_rows: Optional[Tensor]    # masked tokens skipped above whose entropy is still wanted
    targets: Tensor                   # [B*T] int64
    mask: Tensor                      # [B*T] float
    token_weights: Tensor             # [B*T] w_t of L = sum_t w_t l_t
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
        return TokenTerms(weight=pick(self.token_weights), mask=pick(self.mask), adv=pick(self.adv), old=pick(self.old),
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
                mask=mask.reshape(-1), token_weights=token_weights(mask, seq_len, opts, num_items).reshape(-1),
                adv=adv_bt.reshape(-1), old=flat(old), ref=flat(ref) if kl_active else None, rho=rho_bt,
                seq_len=seq_len, vespo_log_rho=vespo_log_rho,
                seq_adv=adv.reshape(B, -1)[:, 0] if per_seq_metrics else None, row_counts=row_counts,
                mask_total=mask.sum().clamp(min=1.0))
