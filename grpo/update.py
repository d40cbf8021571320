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

Zero-signal micro-batches: when beta and entropy_coef are 0 and every completion has advantage 0 (all rewards of
its group equal) or no unmasked token, every per-token loss is exactly 0, so the gradient is exactly 0. Such a micro-batch skips
its forward and backward (the forward once ran for the logged entropy alone: about 4 s a step of the default run
on the CPU) and gets zero gradients, which is what the backward would have produced: AdamW, gradient clipping and
the ranks' gradient all-reduce see the same tensors as before. Its clip ratios are 0 without a forward (every clip
flag needs A != 0); its entropy is not measured, so a step's logged entropy averages the micro-batches with signal.
Dropout draws nothing for a skipped micro-batch, so with dropout on the RNG stream differs from a run without
skipping (the models here train with dropout 0).
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from grpo_kernels.options import CLIPPED_LOSS_TYPES

from . import shared_prompts
from .shared_prompts import backbone, last_hidden

GLOBAL_NORM_LOSSES = ("dapo", "cispo", "vespo")  # normalized by the generation batch's token count
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def check_supported(model, args) -> None:
    """Fail early on what the fused loss cannot express."""
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


def autocast(model, enabled: bool):
    """bf16 autocast around the backbone (fp32 master weights); a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def completion_hidden(model, batch) -> torch.Tensor:
    """Last hidden states [B, C, H] at the positions that predict the completion tokens.

    Each distinct prompt runs through the backbone once and its completions run on its copied KV cache
    (`shared_prompts.py`): the same values and gradients as the full forward, for a fraction of the prompt compute.
    Without cache support, or under gradient checkpointing (which turns the cache off), every row runs prompt +
    completion."""
    decoder = backbone(model)
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    p, c = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        out = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        return last_hidden(out)[:, p - 1 : p - 1 + c]
    # Positions as generate() assigned them under left padding, so log-probs match the sampler's.
    positions = (mask.cumsum(1) - 1).clamp(min=0)

    shared = None if _checkpointing(model) else shared_prompts.shared_prefill(decoder, batch.prompt_ids,
                                                                               batch.prompt_mask)
    if shared is not None:
        cache, prompt_last = shared
        if c == 1:
            return prompt_last[:, None]
        out = decoder(input_ids=batch.completion_ids[:, :-1], attention_mask=mask[:, :-1],
                      position_ids=positions[:, p:-1], use_cache=True,
                      **{shared_prompts.cache_kwarg(decoder.forward): cache})
        return torch.cat([prompt_last[:, None], last_hidden(out)], dim=1)

    out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return last_hidden(out)[:, p - 1 : p - 1 + c]


def _checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the name changed in transformers 5
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


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


def has_signal(mb, args) -> bool:
    """False when the micro-batch's loss is exactly 0 for every token (see the module docstring)."""
    if args.beta != 0.0 or args.entropy_coef != 0.0:  # the KL term or the entropy bonus has a gradient
        return True
    live = (mb.advantages != 0) & (mb.completion_mask.sum(1) > 0)  # a NaN advantage counts as live
    return bool(live.any())


def micro_loss(model, loss_fn, mb, args, world_size: int):
    """(scaled loss, scaled policy loss as a float, metrics) of one micro-batch, before backward."""
    with autocast(model, args.bf16):
        hidden = completion_hidden(model, mb)
    weight, bias = _head_for(hidden, model)
    num_items = None
    if args.loss_type in GLOBAL_NORM_LOSSES:
        num_items = torch.tensor(max(1.0, float(mb.num_items_in_batch)), device=hidden.device)
    entropy = token_entropy(hidden, weight, bias, mb.completion_ids, args)
    keep = None
    if args.top_entropy_quantile < 1.0:
        keep = high_entropy_mask(entropy.detach(), mb.completion_mask, args.top_entropy_quantile)
    # token_loss_mask multiplies the policy term before the KL term (ℓ ← ℓ·mask + β·k), where TRL multiplies the
    # entropy mask; the normalizer and metrics still count every completion token, as TRL's do.
    loss, metrics = loss_fn(
        hidden, weight, mb.completion_ids, mb.completion_mask, mb.advantages, bias=bias,
        ref_per_token_logps=mb.ref_logps, old_per_token_logps=mb.old_logps, num_items_in_batch=num_items,
        vllm_is_ratio=mb.importance_sampling_ratio,  # the vLLM ratio (grpo/vllm_importance.py)
        token_loss_mask=keep,
    )
    loss = loss * loss_multiplier(args, world_size)
    policy_loss = float(loss.detach())
    if args.entropy_coef != 0.0:
        loss = loss - args.entropy_coef * entropy_bonus(entropy, mb.completion_mask, keep, args)
    return loss, policy_loss, metrics


def micro_step(model, loss_fn, mb, args, world_size: int, skip_zero_signal: bool = True,
               run=None) -> tuple[float, dict[str, tuple[float, float]]]:
    """Forward + backward on one micro-batch; returns (its scaled loss, {metric: (sum, count)}) for logging.

    `run(fn, *args)` calls `fn(model, *args)` inside a wrapper's forward (FSDP2's root: fsdp.run_in_root), so that
    the backward starts from what that forward returned. Metrics come back as sums and counts so that the caller
    can form TRL's global masked means across ranks. `zero_signal_ratio` counts the micro-batches that skipped the
    forward and backward (skip_zero_signal and no signal; FSDP turns it off: its backward holds collectives every
    rank joins)."""
    tokens = float(mb.completion_mask.sum())
    # Sequence-level ratios are one per sequence: TRL averages their clip flags over sequences.
    clip_count = float(len(mb)) if args.importance_sampling_level == "sequence" else tokens
    if skip_zero_signal and not has_signal(mb, args):
        _zero_missing_grads(model)
        return 0.0, zero_signal_sums(args, clip_count)
    if run is None:
        loss, policy_loss, metrics = micro_loss(model, loss_fn, mb, args, world_size)
    else:
        loss, policy_loss, metrics = run(micro_loss, loss_fn, mb, args, world_size)
    loss.backward()

    sums = {"entropy": (float(metrics.entropy) * tokens, tokens)}
    if args.beta != 0.0:
        sums["kl"] = (float(metrics.kl) * tokens, tokens)
    if args.loss_type in CLIPPED_LOSS_TYPES:
        for name, value in zip(CLIP_METRICS, (metrics.clip_ratio_low, metrics.clip_ratio_high, metrics.clip_ratio)):
            sums[name] = (float(value) * clip_count, clip_count)
    elif args.loss_type == "cispo":
        sums["cispo_clip_ratio"] = (float(metrics.clip_ratio) * tokens, tokens)
    if args.entropy_coef != 0.0:
        # TRL logs the policy term before the bonus, per micro-batch and before its accumulation scaling (except
        # dapo/cispo/vespo, whose normalizer includes it), and the coefficient.
        if args.loss_type not in GLOBAL_NORM_LOSSES:
            policy_loss *= args.gradient_accumulation_steps
        sums["policy_loss"] = (policy_loss, 1.0)
        sums["entropy_coef"] = (args.entropy_coef, 1.0)
    sums["zero_signal_ratio"] = (0.0, 1.0)
    return float(loss.detach()), sums


def zero_signal_sums(args, clip_count: float) -> dict[str, tuple[float, float]]:
    """The metric sums of a micro-batch without signal, known without a forward pass: the same names as
    micro_step's (ranks reduce them together); every clip flag needs A != 0, so the clip ratios count 0 over
    `clip_count`; the entropy has no tokens here (count 0), so the logged entropy is the mean over the
    micro-batches with signal (None for a step without any)."""
    sums = {"entropy": (0.0, 0.0)}
    if args.loss_type in CLIPPED_LOSS_TYPES:
        sums.update({name: (0.0, clip_count) for name in CLIP_METRICS})
    elif args.loss_type == "cispo":
        sums["cispo_clip_ratio"] = (0.0, clip_count)
    sums["zero_signal_ratio"] = (1.0, 1.0)
    return sums


def _zero_missing_grads(model) -> None:
    """The gradients a backward of an all-zero loss would leave: zeros for trainable parameters that have none yet
    (HF causal LMs use every trainable parameter in the forward; one that the forward never reaches would get None
    from a backward, and a zero here)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


# ----------------------------------------------------------------------------------------------------------------
# Entropy: top_entropy_quantile mask and entropy bonus (TRL 1.16's _compute_loss)
# ----------------------------------------------------------------------------------------------------------------
def token_entropy(hidden, weight, bias, completion_ids, args) -> torch.Tensor | None:
    """Per-token entropy [B, C] of the policy at `temperature` when the mask or the bonus needs it, else None.

    Costs one more pass over the LM head (the backbone's hidden states are reused): forward-only (2·N·H·V FLOPs)
    for the mask alone, forward and backward through the differentiable entropy for the bonus (which then also
    gives the mask)."""
    import grpo_kernels as gk

    if args.entropy_coef == 0.0 and args.top_entropy_quantile >= 1.0:
        return None
    kwargs = dict(temperature=args.temperature, return_entropy=True, backend=args.kernel_backend,
                  strategy=args.kernel_strategy, chunk_size=args.kernel_chunk_size)
    if args.entropy_coef != 0.0:
        return gk.linear_logprobs(hidden, weight, completion_ids, bias, **kwargs)[1]
    with torch.no_grad():
        return gk.linear_logprobs(hidden.detach(), weight.detach(), completion_ids,
                                  None if bias is None else bias.detach(), **kwargs)[1]


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """TRL's get_high_entropy_mask: True where a completion token's entropy is at least the (1 - quantile)
    quantile (linear interpolation, torch.quantile) of all completion tokens of this micro-step on all ranks."""
    values = _gather_varlen(entropy[mask.bool()].float())
    if values.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (entropy >= threshold) & mask.bool()


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | None, args) -> torch.Tensor:
    """TRL's entropy term: mean entropy over the tokens that carry policy gradient, divided by
    gradient_accumulation_steps only (not by a loss type's normalizer); the loss subtracts entropy_coef × it."""
    effective = mask.to(entropy.dtype) if keep is None else mask.to(entropy.dtype) * keep.to(entropy.dtype)
    return (entropy * effective).sum() / effective.sum().clamp(min=1.0) / args.gradient_accumulation_steps


def _gather_varlen(values: torch.Tensor) -> torch.Tensor:
    """1-D tensors of different lengths from every rank, concatenated (the tensor itself without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    n = torch.tensor([values.numel()], device=values.device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    width = int(max(int(c) for c in counts))
    padded = torch.zeros(width, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts)])
