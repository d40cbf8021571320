"""Rows that share a prompt run it through the model once.

GRPO samples `num_generations` completions per prompt, so a batch holds every prompt that many times. Under causal
attention a prompt's keys and values do not depend on what follows it, so each distinct prompt runs through the
decoder once and its KV cache is copied to the rows that hold it. Generation uses this for the prompt's prefill
(`rollout.hf_generate`); the update uses it with the cache still in the autograd graph (`update.completion_hidden`),
so the gradients that reach the prompt positions are summed over its completions, as in the full forward.
`backbone` and `last_hidden` find a causal LM's decoder and read its output, for both.
"""

from __future__ import annotations

import inspect

import torch


def backbone(model):
    """The decoder stack below the LM head (HF causal LMs: `model.model`, `model.transformer`, ...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if decoder is None:
        raise TypeError(f"cannot find the backbone of {type(model).__name__} (get_decoder() returned nothing)")
    return decoder


def last_hidden(out) -> torch.Tensor:
    """The last hidden states of a decoder's output (a ModelOutput or a tuple)."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def distinct_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first, row_to_distinct): the first row of each distinct (ids, mask) row and, for every row, the index of
    its distinct row in `first`. None when every row is distinct (nothing to share)."""
    key = torch.cat([ids, mask], dim=1)
    distinct, row_to_distinct = torch.unique(key, dim=0, return_inverse=True)
    if len(distinct) == len(key):
        return None
    first = torch.full((len(distinct),), len(key), dtype=torch.long, device=key.device)
    first.scatter_reduce_(0, row_to_distinct, torch.arange(len(key), device=key.device), reduce="amin")
    return first, row_to_distinct


def cache_kwarg(forward) -> str | None:
    """The name under which `forward` takes a KV cache ("cache" from transformers 5.2x, "past_key_values" before),
    or None when it takes none."""
    params = inspect.signature(forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def shared_prefill(decoder, ids: torch.Tensor, mask: torch.Tensor):
    """(cache, last_hidden) for left-padded prompts `ids` [B, P]: the decoder's KV cache with one copy per row and
    the last column's hidden state [B, H], each distinct prompt computed once. None when every row is distinct or
    the decoder cannot take a cache and position ids (the caller then runs every row)."""
    groups = distinct_rows(ids, mask)
    name = cache_kwarg(decoder.forward)
    if groups is None or name is None or "position_ids" not in inspect.signature(decoder.forward).parameters:
        return None
    first, row_to_prompt = groups
    p_mask = mask[first]
    # Positions as generate() assigns them under left padding (a pad's position is never attended to).
    out = decoder(input_ids=ids[first], attention_mask=p_mask, position_ids=(p_mask.cumsum(1) - 1).clamp(min=0),
                  use_cache=True)
    cache = getattr(out, name, None)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(row_to_prompt)  # one copy of each prompt's keys/values per row
    return cache, last_hidden(out)[:, -1][row_to_prompt]  # left padding: the last column is a real token
