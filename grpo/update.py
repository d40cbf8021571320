"""Stage 3-4 of the loop: log-probs and the policy-gradient step, never materializing [tokens x vocab] logits.

The backbone (`model.get_decoder()`) runs to its last hidden states; only the completion positions are kept
(the hidden state at position p predicts token p+1), and `grpo_kernels` turns them and the LM-head weight into
log-probs (old / reference, under no_grad) or into the GRPO loss and its gradients (the update).

Gradient accumulation follows TRL 1.16's `_compute_loss` (its loss is already scaled for accumulation):
- grpo, bnpo, dr_grpo, sapo, luspo: each micro-batch's loss is divided by gradient_accumulation_steps;
- dapo, cispo, vespo: the loss is normalized by `num_items_in_batch / world_size * gas / steps_per_generation`,
  where num_items_in_batch counts the completion tokens of the whole generation batch on all ranks. We give the
  kernel the global count and multiply its loss by `world_size * steps_per_generation / gas`, which is the same
  number without a clamp of the scaled normalizer.
After all-reducing (averaging) gradients across ranks, the accumulated gradient equals TRL's.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

GLOBAL_NORM_LOSSES = ("dapo", "cispo", "vespo")  # normalized by the generation batch's token count
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def check_supported(model, args) -> None:
    """Fail early on what the fused loss cannot express."""
    if args.top_entropy_quantile < 1.0:
        raise NotImplementedError(
            f"top_entropy_quantile={args.top_entropy_quantile}: masking all but the highest-entropy tokens needs the "
            "per-token entropy before the loss is formed, and the fused GRPO loss only returns the masked mean "
            "entropy. Use top_entropy_quantile=1.0."
        )
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_softcapping"):
        if getattr(config, name, None):
            raise NotImplementedError(
                f"{type(model).__name__} applies {name}={getattr(config, name)} to its logits; the fused loss computes "
                "plain (W h + b) / temperature logits"
            )
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        raise NotImplementedError(f"{type(model).__name__} scales its logits by logit_scale={scale}; not supported")
    lm_head(model)


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the model's output projection."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        raise TypeError(f"{type(model).__name__} has no linear output embedding (get_output_embeddings().weight)")
    return head.weight, getattr(head, "bias", None)


def backbone(model):
    """The decoder stack below the LM head (HF causal LMs: `model.model`, `model.transformer`, ...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if decoder is None:
        raise TypeError(f"cannot find the backbone of {type(model).__name__} (get_decoder() returned nothing)")
    return decoder


def autocast(model, enabled: bool):
    """bf16 autocast around the backbone (fp32 master weights); a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def completion_hidden(model, batch) -> torch.Tensor:
    """Last hidden states [B, C, H] at the positions that predict the completion tokens.

    The num_generations completions of a prompt share it: when prompts repeat inside the batch, each distinct
    prompt runs through the backbone once and its KV cache (still in the autograd graph) is expanded to its
    completions, which then run on top of it. Same values and gradients as the full forward (causal attention),
    for a fraction of the prompt compute. Without cache support, or under gradient checkpointing (which turns
    the cache off), every row runs prompt + completion."""
    decoder = backbone(model)
    params = inspect.signature(decoder.forward).parameters
    cache_arg = "cache" if "cache" in params else ("past_key_values" if "past_key_values" in params else None)
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    # Positions as generate() assigned them under left padding, so log-probs match the sampler's.
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    p, c = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    if "position_ids" not in params:
        out = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        return _last_hidden(out)[:, p - 1 : p - 1 + c]

    if cache_arg is not None and not _checkpointing(model):
        key = torch.cat([batch.prompt_ids, batch.prompt_mask], dim=1)
        distinct, row_to_prompt = torch.unique(key, dim=0, return_inverse=True)
        if len(distinct) < len(key):
            first = torch.full((len(distinct),), len(key), dtype=torch.long, device=key.device)
            first.scatter_reduce_(0, row_to_prompt, torch.arange(len(key), device=key.device), reduce="amin")
            p_mask = batch.prompt_mask[first]
            out = decoder(input_ids=batch.prompt_ids[first], attention_mask=p_mask,
                          position_ids=(p_mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
            cache = getattr(out, cache_arg, None)
            if cache is not None and hasattr(cache, "batch_select_indices"):
                cache.batch_select_indices(row_to_prompt)  # one copy of the prompt's keys/values per completion
                prompt_last = _last_hidden(out)[:, -1][row_to_prompt]  # left padding: the last column is real
                if c == 1:
                    return prompt_last[:, None]
                out = decoder(input_ids=batch.completion_ids[:, :-1], attention_mask=mask[:, :-1],
                              position_ids=positions[:, p:-1], use_cache=True, **{cache_arg: cache})
                return torch.cat([prompt_last[:, None], _last_hidden(out)], dim=1)

    out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return _last_hidden(out)[:, p - 1 : p - 1 + c]


def _checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the name changed in transformers 5
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _head_for(hidden: torch.Tensor, model):
    weight, bias = lm_head(model)
    if weight.dtype != hidden.dtype:  # bf16 autocast: GEMM operands in the activations' dtype (DESIGN precision)
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    return weight, bias


@torch.no_grad()
def per_token_logps(model, batch, args) -> torch.Tensor:
    """fp32 log-probs [B, C] of the completion tokens (old policy or reference), micro-batch by micro-batch."""
    import grpo_kernels as gk

    out, size = [], args.per_device_train_batch_size
    for start in range(0, len(batch), size):
        mb = batch.select(list(range(start, min(start + size, len(batch)))))
        with autocast(model, args.bf16):
            hidden = completion_hidden(model, mb)
        weight, bias = _head_for(hidden, model)
        logp = gk.linear_logprobs(hidden, weight, mb.completion_ids, bias, temperature=args.temperature,
                                  backend=args.kernel_backend, strategy=args.kernel_strategy,
                                  chunk_size=args.kernel_chunk_size)
        full = torch.zeros(len(mb), batch.completion_ids.shape[1], dtype=torch.float32, device=logp.device)
        full[:, : logp.shape[1]] = logp.float()
        out.append(full)
    return torch.cat(out)


def make_loss_fn(args):
    """The fused linear + GRPO loss module configured from GRPOConfig."""
    import grpo_kernels as gk

    return gk.FusedLinearGRPOLoss(
        beta=args.beta, epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, loss_type=args.loss_type,
        max_completion_length=args.max_completion_length, importance_sampling_level=args.importance_sampling_level,
        temperature=args.temperature, delta=args.delta, use_bias_correction_kl=args.use_bias_correction_kl,
        compute_entropy=True, backend=args.kernel_backend, strategy=args.kernel_strategy,
        chunk_size=args.kernel_chunk_size,
    )


def loss_multiplier(args, world_size: int) -> float:
    """Factor applied to the kernel's micro-batch loss so that accumulated gradients equal TRL's."""
    if args.loss_type in GLOBAL_NORM_LOSSES:
        return world_size * args.steps_per_generation / args.gradient_accumulation_steps
    return 1.0 / args.gradient_accumulation_steps


def micro_loss(model, loss_fn, mb, args, world_size: int):
    """(scaled loss, metrics) of one micro-batch, before backward."""
    with autocast(model, args.bf16):
        hidden = completion_hidden(model, mb)
    weight, bias = _head_for(hidden, model)
    num_items = None
    if args.loss_type in GLOBAL_NORM_LOSSES:
        num_items = torch.tensor(max(1.0, float(mb.num_items_in_batch)), device=hidden.device)
    loss, metrics = loss_fn(
        hidden, weight, mb.completion_ids, mb.completion_mask, mb.advantages, bias=bias,
        ref_per_token_logps=mb.ref_logps, old_per_token_logps=mb.old_logps, num_items_in_batch=num_items,
    )
    return loss * loss_multiplier(args, world_size), metrics


def micro_step(model, loss_fn, mb, args, world_size: int, run=None) -> tuple[float, dict[str, tuple[float, float]]]:
    """Forward + backward on one micro-batch; returns (its scaled loss, {metric: (sum, count)}) for logging.

    `run(fn, *args)` calls `fn(model, *args)` inside a wrapper's forward (FSDP2's root, see fsdp.py), so that
    the backward starts from what that forward returned. Metrics come back as sums and counts so that the caller
    can form TRL's global masked means across ranks."""
    if run is None:
        loss, metrics = micro_loss(model, loss_fn, mb, args, world_size)
    else:
        loss, metrics = run(micro_loss, loss_fn, mb, args, world_size)
    loss.backward()

    tokens = float(mb.completion_mask.sum())
    # Sequence-level ratios are one per sequence: TRL averages their clip flags over sequences.
    clip_count = float(len(mb)) if args.importance_sampling_level == "sequence" else tokens
    sums = {"entropy": (float(metrics.entropy) * tokens, tokens)}
    if args.beta != 0.0:
        sums["kl"] = (float(metrics.kl) * tokens, tokens)
    if args.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        for name, value in zip(CLIP_METRICS, (metrics.clip_ratio_low, metrics.clip_ratio_high, metrics.clip_ratio)):
            sums[name] = (float(value) * clip_count, clip_count)
    elif args.loss_type == "cispo":
        sums["cispo_clip_ratio"] = (float(metrics.clip_ratio) * tokens, tokens)
    return float(loss.detach()), sums
