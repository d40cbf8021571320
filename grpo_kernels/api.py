"""Public functions: linear_logprobs, grpo_loss and fused_linear_grpo_loss."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional

import torch

from . import inputs as checks
from . import vocab_parallel
from .backends import get_ops, resolve_backend
from .plan import make_plan
from .metrics import LossMetrics
from .no_autocast import no_autocast
from .options import LossOptions
from .sizing import size_call
from .chunk_driver import retry_smaller_chunks
from .loss_totals import loss_parts
from .strategies import ChunkedGRPOLoss, FusedGRPOLoss, LinearLogprobs, forward_stats
from .torch_ops import acc_dtype

Tensor = torch.Tensor


def _on_device_of(arg: str):
    """Run the call with the CUDA device of argument `arg` current: Triton launches on the current device, not
    the tensors' (cuda:1 inputs with cuda:0 current would be an illegal memory access). Backward needs no guard:
    the autograd engine runs each node under an OptionalStreamGuard on the stream its forward used (which sets that
    stream's device), on a worker thread whose device was set to it (engine.cpp, evaluate_function/thread_init)."""
    def wrap(fn):
        pos = list(inspect.signature(fn).parameters).index(arg)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            x = args[pos] if len(args) > pos else kwargs.get(arg)
            if isinstance(x, torch.Tensor) and x.is_cuda:
                guard = torch.cuda.device(x.device)
            else:
                guard = contextlib.nullcontext()
            with guard:
                return fn(*args, **kwargs)
        return call
    return wrap


def _hidden_grad_rows(hidden: Tensor, rows: int) -> int:
    """Rows of the d_hidden buffer a call holds (sizing counts it): all of them when hidden needs a gradient."""
    return rows if torch.is_grad_enabled() and hidden.requires_grad else 0


@_on_device_of("hidden")
@no_autocast
def linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                    temperature: float = 1.0, return_entropy: bool = False, backend: str = "auto",
                    strategy: str = "auto", chunk_size: Optional[int] = None, validate: bool = True,
                    process_group=None):
    """Per-token log-probs of `targets` under softmax((hidden @ weight.T + bias) / temperature), without the
    [tokens x vocab] logits.

    hidden: (..., H) with leading dims equal to targets' shape, or (targets.numel(), H); weight: (V, H).
    Returns fp32 log-probs shaped like `targets` and, with return_entropy=True, the entropy of each token's
    distribution, both differentiable w.r.t. hidden, weight and bias (dentropy/dz_v = -p_v (log p_v + entropy),
    z the logits / temperature). Both gradients come from one recomputation of the logits; an entropy nobody
    differentiates costs nothing in the backward. Logits are fp32 on every path, also for bf16/fp16 inputs.
    process_group: vocab-parallel (see `vocab_parallel`): weight/bias are this rank's contiguous rows, targets
    global ids; logp and entropy are over the whole vocabulary and both differentiable (torch ops, chunked).
    """
    opts = LossOptions(temperature=temperature, backend=backend, strategy=strategy, chunk_size=chunk_size,
                       validate=validate)
    targets = checks._need_tensor("targets", targets)
    V, H = checks.check_linear(hidden, weight, bias, tuple(targets.shape))
    if process_group is not None:
        return vocab_parallel.linear_logprobs(hidden, weight, targets, bias, opts, return_entropy, process_group)
    targets = checks.check_targets("targets", targets, V, None, validate)
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    backend = resolve_backend(opts.backend, hidden.device, hidden.dtype)
    ops = get_ops(backend)
    h2d = hidden.reshape(-1, H)
    flat = targets.reshape(-1).long()
    N = flat.numel()
    wgrad = torch.is_grad_enabled() and weight.requires_grad
    size = size_call("linear_logprobs", opts.strategy, opts.chunk_size, N, V, H, hidden.dtype, hidden.device,
                     backend == "torch", wgrad, _hidden_grad_rows(hidden, N))
    (logp, entropy), _ = retry_smaller_chunks(
        lambda rows: LinearLogprobs.apply(h2d, weight, bias, flat, float(temperature), return_entropy, size.strategy,
                                          ops, rows), size.chunk_size, opts.chunk_size is not None, "linear_logprobs")
    logp = logp.reshape(targets.shape)
    if return_entropy:
        return logp, entropy.reshape(targets.shape)
    return logp


def _apply_token_loss_mask(keep: Optional[Tensor], adv: Tensor, rho: Optional[Tensor], loss_type: str):
    """Fold the policy term's per-token multiplier m into the inputs that already scale it, so the plan and the
    kernels need no extra operand: ℓ·ρ·m for every loss but vespo (m joins the vLLM ratio's per-token product;
    vespo reads ρ only inside its sequence weights), and -φ·(A·m)·log p for vespo, which is ℓ·m since φ depends
    on A only through its sign (m ≥ 0)."""
    if keep is None:
        return adv, rho
    B = adv.shape[0]
    m = (keep if keep.is_floating_point() else keep.to(torch.float32)).reshape(B, -1)
    if loss_type == "vespo":
        return adv.reshape(B, -1) * m, rho
    return adv, m if rho is None else rho.reshape(B, -1) * m


def _check_grpo_inputs(ids, attention_mask, advantages, old, ref, vllm_is_ratio, num_items_in_batch, device,
                       token_loss_mask=None, loss_type: str = "dapo"):
    B, T = ids.shape
    mask = checks.check_mask(attention_mask, (B, T), device)
    adv = checks.check_advantages(advantages, B, T, device)
    old = checks.check_per_token("old_per_token_logps", old, (B, T), device)
    ref = checks.check_per_token("ref_per_token_logps", ref, (B, T), device)
    rho = checks.check_vllm_ratio(vllm_is_ratio, B, T, device)
    keep = checks.check_token_multiplier("token_loss_mask", token_loss_mask, B, T, device, allow_bool=True)
    adv, rho = _apply_token_loss_mask(keep, adv, rho, loss_type)
    return mask, adv, old, ref, rho, checks.check_num_items(num_items_in_batch)


class _LossFromLogprobs(torch.autograd.Function):
    @staticmethod
    @no_autocast
    def forward(ctx, logp_flat, plan, opts, ops, grad_on: bool):
        parts = None
        grad = torch.zeros_like(logp_flat)
        if plan.num_rows:  # ctx.needs_input_grad stays True under torch.no_grad: grad_on is the caller's grad mode
            parts = loss_parts(ops, logp_flat.index_select(0, plan.rows), plan.terms(0, plan.num_rows), opts,
                               grad_on and ctx.needs_input_grad[0])
            if parts.grad is not None:
                grad.index_copy_(0, plan.rows, parts.grad)
        ctx.save_for_backward(grad)
        zero = logp_flat.new_zeros(())
        clip_den = float(max(plan.B, 1)) if plan.seq_adv is not None else plan.mask_total
        if parts is None:
            return zero, zero, zero, zero, zero
        return (parts.loss, parts.kl_sum / plan.mask_total, parts.clip_region / clip_den,
                parts.clip_low / clip_den, parts.clip_high / clip_den)

    @staticmethod
    @no_autocast
    def backward(ctx, grad_loss, *unused):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None


@_on_device_of("per_token_logps")
@no_autocast
def grpo_loss(per_token_logps: Tensor, attention_mask: Tensor, advantages: Tensor,
              old_per_token_logps: Optional[Tensor] = None, ref_per_token_logps: Optional[Tensor] = None,
              vllm_is_ratio: Optional[Tensor] = None, num_items_in_batch=None,
              token_loss_mask: Optional[Tensor] = None, **loss_options):
    """TRL's GRPO loss from per-token log-probs you already have: (loss, LossMetrics).

    Differentiable w.r.t. per_token_logps (closed-form gradient, O(tokens)): one Triton launch at token level
    on the Triton backend, PyTorch otherwise. Options are `LossOptions`'s; strategy/chunk_size do not apply
    (no logits here) and compute_entropy has nothing to measure.
    """
    opts = LossOptions.from_kwargs(**loss_options)
    logp = checks._need_tensor("per_token_logps", per_token_logps)
    checks._check_float("per_token_logps", logp)
    if logp.dim() != 2:
        raise ValueError(f"per_token_logps must be (B, T), got shape {tuple(logp.shape)}")
    mask, adv, old, ref, rho, num_items = _check_grpo_inputs(logp, attention_mask, advantages, old_per_token_logps,
                                                             ref_per_token_logps, vllm_is_ratio, num_items_in_batch,
                                                             logp.device, token_loss_mask, opts.loss_type)
    acc = acc_dtype(logp.dtype)
    kl_on = opts.beta != 0.0 and ref is not None
    plan = make_plan(torch.zeros_like(logp, dtype=torch.long), mask, adv, old, ref, rho, num_items,
                     opts.replace(compute_entropy=False), kl_on, acc)
    ops = get_ops(resolve_backend(opts.backend, logp.device, acc))
    loss, kl, clip, low, high = _LossFromLogprobs.apply(logp.reshape(-1).to(acc), plan, opts, ops,
                                                         torch.is_grad_enabled())
    kl = (kl.detach().float() if kl_on else torch.zeros((), device=logp.device)) if opts.beta != 0.0 else None
    return loss, LossMetrics(kl, clip.detach().float(), low.detach().float(), high.detach().float(), None)


def fused_linear_grpo_loss(hidden: Tensor, weight: Tensor, selected_token_ids: Tensor, attention_mask: Tensor,
                           advantages: Tensor, bias: Optional[Tensor] = None,
                           ref_per_token_logps: Optional[Tensor] = None, old_per_token_logps: Optional[Tensor] = None,
                           ref_input: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                           ref_bias: Optional[Tensor] = None, vllm_is_ratio: Optional[Tensor] = None,
                           num_items_in_batch=None, process_group=None, token_loss_mask: Optional[Tensor] = None,
                           **loss_options):
    """Hidden states + LM head -> TRL's GRPO loss and metrics, with gradients for hidden, weight and bias,
    never holding the [tokens x vocab] logits. Returns (loss, LossMetrics). See `LossOptions` for options.
    process_group: vocab-parallel (see `vocab_parallel`): weight, bias, ref_weight and ref_bias are this rank's
    contiguous rows; selected_token_ids are global ids; dH comes back already summed over the group.
    token_loss_mask: [B, T], [B, 1] or [B] bool or float ≥ 0, a per-token multiplier of the policy term
    (ℓ ← ℓ·ρ·mask + β·k; TRL's top-entropy mask); the normalizer and the metrics still count every token.
    vllm_is_ratio is only the vLLM importance-sampling ratio."""
    return _fused_linear_grpo_loss(LossOptions.from_kwargs(**loss_options), hidden, weight, selected_token_ids,
                                   attention_mask, advantages, bias, ref_per_token_logps, old_per_token_logps,
                                   ref_input, ref_weight, ref_bias, vllm_is_ratio, num_items_in_batch, process_group,
                                   token_loss_mask)


@_on_device_of("hidden")
@no_autocast
def _fused_linear_grpo_loss(opts: LossOptions, hidden, weight, selected_token_ids, attention_mask, advantages, bias,
                            ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, ref_bias, vllm_is_ratio,
                            num_items_in_batch, process_group=None, token_loss_mask=None):
    ids = checks._need_tensor("selected_token_ids", selected_token_ids)
    if ids.dim() != 2:
        raise ValueError(f"selected_token_ids must be (B, T), got shape {tuple(ids.shape)}")
    V, H = checks.check_linear(hidden, weight, bias, tuple(ids.shape))
    if ids.device != hidden.device:
        raise ValueError(f"selected_token_ids is on {ids.device} but hidden is on {hidden.device}")
    mask, adv, old, ref, rho, num_items = _check_grpo_inputs(ids, attention_mask, advantages, old_per_token_logps,
                                                             ref_per_token_logps, vllm_is_ratio, num_items_in_batch,
                                                             hidden.device, token_loss_mask, opts.loss_type)
    ref_from_model = ref is None and opts.beta != 0.0 and (ref_input is not None or ref_weight is not None)
    if ref_from_model:
        if ref_input is None or ref_weight is None:
            raise ValueError("computing the reference log-probs needs both ref_input and ref_weight "
                             "(or pass ref_per_token_logps)")
        ref_v, _ = checks.check_linear(ref_input, ref_weight, ref_bias, tuple(ids.shape), "ref_input", "ref_weight",
                                       "ref_bias")
        if ref_v != V:
            raise ValueError(f"ref_weight has vocab size {ref_v} (shape {tuple(ref_weight.shape)}) but weight has {V}")
        if ref_input.device != hidden.device:
            raise ValueError(f"ref_input is on {ref_input.device} but hidden is on {hidden.device}")
    if process_group is not None:  # weight holds this rank's rows: ids are checked against the whole vocabulary
        return vocab_parallel.fused_linear_grpo_loss(opts, process_group, hidden, weight, bias, ids, mask, adv, old,
                                                     ref, rho, num_items, ref_input if ref_from_model else None,
                                                     ref_weight, ref_bias)
    ids = checks.check_targets("selected_token_ids", ids, V, mask, False)  # range: in make_plan's one sync
    backend = resolve_backend(opts.backend, hidden.device, hidden.dtype)
    ops = get_ops(backend)
    acc = acc_dtype(hidden.dtype)
    kl_on = opts.beta != 0.0 and (ref is not None or ref_from_model)
    plan = make_plan(ids, mask, adv, old, ref, rho, num_items, opts, kl_on, acc, vocab=V if opts.validate else None)
    # Sized by the rows the GEMMs actually see: the active rows, or the skipped rows' entropy pass when it is larger
    # (with every advantage 0 that pass is all there is).
    wgrad = torch.is_grad_enabled() and weight.requires_grad
    h2d = hidden.reshape(-1, H)
    size = size_call("fused_linear_grpo_loss", opts.strategy, opts.chunk_size,
                     max(plan.num_rows, plan.num_entropy_rows), V, H, hidden.dtype, hidden.device,
                     backend == "torch", wgrad, _hidden_grad_rows(hidden, h2d.shape[0]))
    strategy, chunk = size.strategy, size.chunk_size
    given = opts.chunk_size is not None
    what = "fused_linear_grpo_loss"
    if ref_from_model:  # reference log-probs of the tokens that need them, without grad
        ref_h = ref_input.reshape(-1, ref_input.shape[-1]).index_select(0, plan.rows)
        ref_t = plan.targets.index_select(0, plan.rows)
        with torch.no_grad():
            (_, ref_rows, _), chunk = retry_smaller_chunks(
                lambda rows: forward_stats(ref_h, ref_weight, ref_bias, ref_t, opts.temperature, False, strategy, ops,
                                           rows), chunk, given, what)
        plan.ref = torch.zeros_like(plan.mask).index_copy_(0, plan.rows, ref_rows.to(plan.mask.dtype))
    fn = FusedGRPOLoss if strategy == "fused" else ChunkedGRPOLoss
    grad_on = torch.is_grad_enabled()
    (loss, kl, clip, low, high, entropy), _ = retry_smaller_chunks(
        lambda rows: fn.apply(h2d, weight, bias, plan, opts, ops, rows, kl_on, grad_on), chunk, given, what)
    return loss, LossMetrics(kl, clip, low, high, entropy)
