"""Independent float64 oracle for the tests (never imports grpo_kernels).

Written from docs/design.md ("The math") and TRL 1.16's ``GRPOTrainer._compute_loss`` / ``get_gamma_weights``
semantics, with full logits and autograd, so that every derivative comes from PyTorch rather than from a
hand-written backward.
Also holds the random-problem builders the test files share.

Deliberate choice: TRL's ``global_masked_mean`` switches to a plain mean over sequences whenever its argument has
a last dimension of 1. That is meant for the per-sequence clip flags of the sequence level; with T == 1 it would
also drop the mask from the per-token KL, entropy and token-level clip flags. Here per-token quantities always take
the masked token mean and only the sequence level's (B, 1) flags the plain mean over sequences (identical to TRL
for every T > 1).
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
TOKEN_ONLY_TYPES = ("cispo", "sapo", "vespo")  # TRL/Liger reject the sequence level for these
LEVELS = ("token", "sequence")
NUM_ITEMS_TYPES = ("dapo", "cispo", "vespo")  # the only ones whose normalizer reads num_items_in_batch

DEFAULTS = dict(
    beta=0.0,
    epsilon_low=0.2,
    epsilon_high=0.2,
    loss_type="dapo",
    max_completion_length=None,
    importance_sampling_level="token",
    temperature=1.0,
    delta=None,
    use_bias_correction_kl=False,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
)


def valid_combos():
    """Every (loss_type, importance_sampling_level) pair TRL accepts."""
    return [(lt, lv) for lt in LOSS_TYPES for lv in LEVELS if not (lv == "sequence" and lt in TOKEN_ONLY_TYPES)]


def _options(opts):
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"oracle: unknown options {sorted(unknown)}")
    o = dict(DEFAULTS)
    o.update(opts)
    if o["loss_type"] not in LOSS_TYPES:
        raise ValueError(f"oracle: loss_type {o['loss_type']!r}")
    if o["importance_sampling_level"] not in LEVELS:
        raise ValueError(f"oracle: importance_sampling_level {o['importance_sampling_level']!r}")
    if o["importance_sampling_level"] == "sequence" and o["loss_type"] in TOKEN_ONLY_TYPES:
        raise ValueError("oracle: sequence level with a token-only loss type")
    if o["loss_type"] == "dr_grpo" and o["max_completion_length"] is None:
        raise ValueError("oracle: dr_grpo needs max_completion_length")
    return o


# ----------------------------------------------------------------------------------------------------------- logits
def logprobs(hidden, weight, targets, bias=None, temperature=1.0, logit_dtype=None):
    """(logp, entropy) of ``targets`` in float64 from the full logits z = (h W^T + b) / temperature.

    Differentiable w.r.t. hidden, weight and bias (autograd through log_softmax). Output shape = targets.shape.
    logit_dtype (e.g. bf16) rounds h W^T + b to that dtype once, with a straight-through gradient: what a
    low-precision logits buffer alone costs, used to bound the error a bf16 implementation may have.
    """
    H = weight.shape[-1]
    z = hidden.to(F64).reshape(-1, H) @ weight.to(F64).t()
    if bias is not None:
        z = z + bias.to(F64)
    if logit_dtype is not None:
        z = z + (z.detach().to(logit_dtype).to(F64) - z.detach())
    z = z / temperature
    logsm = torch.log_softmax(z, dim=-1)
    idx = targets.reshape(-1, 1).long()
    logp = logsm.gather(1, idx).squeeze(1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp.reshape(targets.shape), entropy.reshape(targets.shape)


# ------------------------------------------------------------------------------------------------------ VESPO gamma
@torch.no_grad()
def vespo_phi(adv, log_ratio, mask, is_ratio, k_pos, lambda_pos, k_neg, lambda_neg):
    """phi(w) = exp(lambda + k log w - lambda w), w the sequence's importance weight (log-space clamps as TRL)."""
    floor = math.log(1e-8)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
    if is_ratio is not None:
        # TRL sums the (clamped) log vLLM ratio over every position, padding included
        log_w = log_w + torch.log(is_ratio.to(F64)).clamp(floor, 20.0).sum(-1, keepdim=True)
    log_w = log_w.clamp(floor, 20.0)
    nonneg = adv >= 0
    k = torch.where(nonneg, torch.tensor(float(k_pos), dtype=F64), torch.tensor(float(k_neg), dtype=F64))
    lam = torch.where(nonneg, torch.tensor(float(lambda_pos), dtype=F64), torch.tensor(float(lambda_neg), dtype=F64))
    lam = lam.clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp())
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


# ------------------------------------------------------------------------------------------------------------- loss
def grpo_loss(
    per_token_logps,
    attention_mask,
    advantages,
    old_per_token_logps=None,
    ref_per_token_logps=None,
    vllm_is_ratio=None,
    num_items_in_batch=None,
    *,
    entropy=None,
    token_loss_mask=None,
    **opts,
):
    """TRL 1.16's GRPO loss (one process, no gradient accumulation) in float64. token_loss_mask is TRL's
    entropy_mask: it multiplies every loss type's per-token policy loss, before the vLLM ratio and the KL term.

    Returns (loss, metrics) where metrics is a dict: kl (None when beta == 0), clip_ratio_low, clip_ratio_high,
    clip_ratio (region; for cispo TRL's cispo_clip_ratio; None for sapo/vespo, which TRL does not clip),
    entropy (masked mean of ``entropy`` when given, else None), phi_seq_mean (vespo only).
    """
    o = _options(opts)
    lt, level = o["loss_type"], o["importance_sampling_level"]
    logp = per_token_logps.to(F64)
    mask = attention_mask.to(F64)
    B = mask.shape[0]
    adv = advantages.to(F64)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    old = logp.detach() if old_per_token_logps is None else old_per_token_logps.to(F64)
    rho = None if vllm_is_ratio is None else vllm_is_ratio.to(F64)

    log_ratio = logp - old
    if level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = log_w.exp()

    kl = None
    if o["beta"] != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("oracle: beta != 0 needs ref_per_token_logps")
        d = ref_per_token_logps.to(F64) - logp
        kl = d.exp() - d - 1.0
        if o["use_bias_correction_kl"]:
            kl = kl * ratio  # un-clamped ratio, before delta

    eps_lo, eps_hi = o["epsilon_low"], o["epsilon_high"]
    phi = None
    if lt == "cispo":
        loss_tok = -ratio.clamp(max=eps_hi).detach() * adv * logp
    elif lt in CLIPPED_TYPES:
        clipped = ratio.clamp(1.0 - eps_lo, 1.0 + eps_hi)
        if o["delta"] is not None:
            ratio = ratio.clamp(max=o["delta"])  # TRL's clip metrics below see this capped ratio too
        loss_tok = -torch.minimum(ratio * adv, clipped * adv)
    elif lt == "sapo":
        pos, neg = (torch.tensor(float(o[k]), dtype=F64) for k in ("sapo_temperature_pos", "sapo_temperature_neg"))
        kappa = torch.where(adv > 0, pos, neg)
        loss_tok = -(torch.sigmoid(kappa * (ratio - 1.0)) * 4.0 / kappa) * adv
    else:  # vespo
        phi = vespo_phi(
            adv, log_ratio, mask, rho,
            o["vespo_k_pos"], o["vespo_lambda_pos"], o["vespo_k_neg"], o["vespo_lambda_neg"],
        )
        loss_tok = -phi * adv * logp

    if token_loss_mask is not None:
        keep = token_loss_mask.to(F64)
        loss_tok = loss_tok * (keep.unsqueeze(1) if keep.dim() == 1 else keep)
    if rho is not None and lt != "vespo":
        loss_tok = loss_tok * rho
    if kl is not None:
        loss_tok = loss_tok + o["beta"] * kl

    masked = loss_tok * mask  # broadcasts (B, 1) sequence-level terms over the tokens
    if lt in ("grpo", "sapo"):
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif lt == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif lt == "dr_grpo":
        loss = masked.sum() / (B * o["max_completion_length"])
    elif lt in NUM_ITEMS_TYPES:
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=F64)
        loss = masked.sum() / n.clamp(min=1.0)
    else:  # luspo
        loss = masked.sum(-1).mean()

    def global_masked_mean(x, per_sequence=False):
        x = x.to(F64)
        if per_sequence and x.shape[-1] == 1:
            return x.sum() / max(1, x.shape[0])  # one value per sequence: a plain mean over sequences
        x = x.expand_as(mask)
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    seq_flags = level == "sequence"

    metrics = dict(kl=None, clip_ratio_low=None, clip_ratio_high=None, clip_ratio=None, entropy=None)
    with torch.no_grad():
        if kl is not None:
            metrics["kl"] = global_masked_mean(kl.detach())
        if entropy is not None:
            metrics["entropy"] = global_masked_mean(entropy.detach())
        r = ratio.detach()
        if lt in CLIPPED_TYPES:
            low = (r < 1.0 - eps_lo) & (adv < 0)
            high = (r > 1.0 + eps_hi) & (adv > 0)
            metrics["clip_ratio_low"] = global_masked_mean(low, seq_flags)
            metrics["clip_ratio_high"] = global_masked_mean(high, seq_flags)
            metrics["clip_ratio"] = global_masked_mean(low | high, seq_flags)
        elif lt == "cispo":
            metrics["clip_ratio"] = global_masked_mean((r > eps_hi) & (adv > 0))
        elif lt == "vespo":
            metrics["phi_seq_mean"] = global_masked_mean(phi, per_sequence=True)
    return loss, metrics


def fused_linear_grpo_loss(
    hidden,
    weight,
    selected_token_ids,
    attention_mask,
    advantages,
    bias=None,
    ref_per_token_logps=None,
    old_per_token_logps=None,
    ref_input=None,
    ref_weight=None,
    ref_bias=None,
    vllm_is_ratio=None,
    num_items_in_batch=None,
    logit_dtype=None,
    token_loss_mask=None,
    **opts,
):
    """Full-logit float64 version of the fused API: logits -> log-probs (+ entropy) -> ``grpo_loss``.

    With beta != 0 and no ref_per_token_logps, the reference log-probs come from ref_input/ref_weight/ref_bias at
    the same temperature, without gradient. The entropy metric is always filled in.
    """
    o = _options(opts)
    logp, ent = logprobs(hidden, weight, selected_token_ids, bias, o["temperature"], logit_dtype)
    ref = ref_per_token_logps
    if o["beta"] != 0.0 and ref is None:
        if ref_input is None or ref_weight is None:
            raise ValueError("oracle: beta != 0 needs ref_per_token_logps or ref_input + ref_weight")
        with torch.no_grad():
            ref, _ = logprobs(ref_input, ref_weight, selected_token_ids, ref_bias, o["temperature"])
    return grpo_loss(
        logp, attention_mask, advantages, old_per_token_logps, ref, vllm_is_ratio, num_items_in_batch,
        entropy=ent, token_loss_mask=token_loss_mask, **opts,
    )


# --------------------------------------------------------------------------------------------- problem builders
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def random_mask(B, T, g, kind="ragged"):
    """Right-padded completion mask with random lengths in [1, T] and a few interior holes (tool masks)."""
    if kind == "full":
        return torch.ones(B, T)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    m = (torch.arange(T)[None, :] < lengths[:, None]).float()
    holes = torch.rand(B, T, generator=g) < 0.15
    m[holes] = 0.0
    return m


def make_problem(
    B=3,
    T=5,
    H=24,
    V=37,
    *,
    seed=0,
    dtype=torch.float32,
    bias=False,
    old=True,
    ref="given",  # None | "given" | "model" (ref_input/ref_weight/ref_bias)
    vllm=False,
    num_items=None,  # None | "int" | "tensor"
    adv_shape="B",  # "B" | "BT"
    mask="ragged",  # "ragged" | "full" | "some_empty" | "empty"
    hidden_2d=False,
    logit_scale=1.5,
    old_noise=0.45,
):
    """Random inputs (never zeros) for the fused API, as a dict of its keyword arguments.

    old/ref log-probs are the true log-probs plus noise so that ratios straddle the clip range on both sides.
    """
    g = _gen(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (logit_scale / math.sqrt(H))
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    m = random_mask(B, T, g, "full" if mask == "full" else "ragged")
    if mask == "some_empty":
        m[torch.arange(B) % 2 == 1] = 0.0  # every other row fully masked
    elif mask == "empty":
        m.zero_()
    adv = torch.randn(B, generator=g) if adv_shape == "B" else torch.randn(B, T, generator=g)
    true_logp, _ = logprobs(hidden, weight, ids, b)
    p = dict(
        hidden=hidden.reshape(B * T, H) if hidden_2d else hidden,
        weight=weight,
        selected_token_ids=ids,
        attention_mask=m,
        advantages=adv,
        bias=b,
    )
    if old:
        p["old_per_token_logps"] = (true_logp + old_noise * torch.randn(B, T, generator=g, dtype=F64)).float()
    if ref == "given":
        p["ref_per_token_logps"] = (true_logp + 0.5 * torch.randn(B, T, generator=g, dtype=F64)).float()
    elif ref == "model":
        p["ref_input"] = (hidden + 0.3 * torch.randn(B, T, H, generator=g)).reshape(p["hidden"].shape)
        p["ref_weight"] = weight + 0.1 * torch.randn(V, H, generator=g) / math.sqrt(H)
        p["ref_bias"] = (b + 0.1 * torch.randn(V, generator=g)) if bias else None
    if vllm:
        p["vllm_is_ratio"] = torch.exp(0.25 * torch.randn(B, T, generator=g))
    if num_items is not None:
        n = int(m.sum().item()) + 7  # as if the generation batch held more tokens than this micro-batch
        p["num_items_in_batch"] = n if num_items == "int" else torch.tensor(n)
    for k in ("hidden", "weight", "bias", "ref_input", "ref_weight", "ref_bias"):
        if p.get(k) is not None:
            p[k] = p[k].to(dtype)
    return p


GRAD_KEYS = ("hidden", "weight", "bias")


def oracle_run(problem, logit_dtype=None, **opts):
    """Float64 loss, metrics and grads (dict keyed by GRAD_KEYS, for the tensors present) of a problem."""
    leaves = {}
    args = dict(problem)
    for k in GRAD_KEYS:
        if args.get(k) is not None:
            leaves[k] = args[k].detach().to(F64).requires_grad_(True)
            args[k] = leaves[k]
    loss, metrics = fused_linear_grpo_loss(**args, logit_dtype=logit_dtype, **opts)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
    grads = {k: (torch.zeros_like(leaves[k]) if v is None else v) for k, v in grads.items()}
    return loss.detach(), metrics, grads
