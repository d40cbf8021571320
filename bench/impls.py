"""The implementations the suite compares, behind one small interface.

An `Impl` says whether it can run here (`unavailable(device)` returns the reason it cannot, else None) and
builds a zero-argument callable for a mode and a set of inputs (see bench.shapes.make_inputs):
  mode "loss":     fn() -> scalar loss; the harness calls .backward() and reads hidden.grad / weight.grad.
  mode "logprobs": fn() -> (B, T) fp32 log-probs; run under torch.no_grad() (old/ref log-probs).
Loss options (`opts`) are the same for every implementation: beta, epsilon_low, epsilon_high, loss_type,
temperature, importance_sampling_level, max_completion_length; plus `compiled` for Liger and `backend`
("auto" | "torch" | "triton") for ours.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

LOSS_OPTION_KEYS = (
    "beta",
    "epsilon_low",
    "epsilon_high",
    "loss_type",
    "temperature",
    "importance_sampling_level",
    "max_completion_length",
)


@dataclass
class Impl:
    name: str
    modes: tuple[str, ...]
    doc: str
    make: Callable[[str, dict, dict], Callable[[], torch.Tensor]]
    unavailable: Callable[[torch.device, str], str | None] = lambda device, mode: None
    # holds the full [N, V] logits (and their gradient): used to skip shapes that cannot fit
    materializes_logits: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)


def loss_options(opts: dict) -> dict:
    return {k: opts[k] for k in LOSS_OPTION_KEYS if k in opts}


def _missing(module: str) -> str | None:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{module} is not installed"


def _import_error(module: str) -> str | None:
    """None when `module` imports cleanly, else a one-line reason."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install is 'unavailable', not a crash of the suite
        return f"import {module} failed: {type(exc).__name__}: {exc}".splitlines()[0][:200]
    return None


def _needs_cuda(device: torch.device, what: str) -> str | None:
    return None if device.type == "cuda" else f"{what} needs a CUDA device"


# ----------------------------------------------------------------------------------------------------------
# torch: what TRL does. Full logits from the LM head in the input dtype, then fp32 log_softmax + gather (TRL's
# selective_log_softmax on fp32 logits), then the loss from log-probs in plain torch, all through autograd.
# ----------------------------------------------------------------------------------------------------------


def torch_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0):
    shape = ids.shape
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    logits = logits.float() / temperature
    logp = logits.gather(-1, ids.reshape(-1, 1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp.view(shape)


def loss_from_logprobs(logp: torch.Tensor, x: dict, opts: dict) -> torch.Tensor:
    """The GRPO loss from per-token log-probs: grpo_kernels.reference's plain-torch function (TRL's math)."""
    from grpo_kernels.reference import reference_grpo_loss

    kw = loss_options(opts)
    loss, _ = reference_grpo_loss(
        logp,
        x["mask"],
        x["advantages"],
        old_per_token_logps=x["old"],
        ref_per_token_logps=x.get("ref"),
        **kw,
    )
    return loss


def _torch_fn(mode: str, x: dict, opts: dict):
    t = opts.get("temperature", 1.0)
    if mode == "loss":
        return lambda: loss_from_logprobs(torch_logprobs(x["hidden"], x["weight"], x["ids"], t), x, opts)
    return lambda: torch_logprobs(x["hidden"], x["weight"], x["ids"], t)


def _make_torch(mode, x, opts):
    return _torch_fn(mode, x, opts)


def _make_torch_compile(mode, x, opts):
    import torch._dynamo

    # a fresh cache per case: otherwise many shapes hit the recompile limit and silently fall back to eager
    torch._dynamo.reset()
    t = opts.get("temperature", 1.0)
    if mode == "loss":

        def body(hidden, weight, ids, mask, adv, old, ref):
            xx = {"mask": mask, "advantages": adv, "old": old, "ref": ref}
            return loss_from_logprobs(torch_logprobs(hidden, weight, ids, t), xx, opts)

        compiled = torch.compile(body, dynamic=False)
        return lambda: compiled(x["hidden"], x["weight"], x["ids"], x["mask"], x["advantages"], x["old"], x.get("ref"))
    compiled = torch.compile(torch_logprobs, dynamic=False)
    return lambda: compiled(x["hidden"], x["weight"], x["ids"], t)


def _compile_unavailable(device, mode):
    if device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        return "torch.compile on CPU needs a C++ compiler"
    return None


# ----------------------------------------------------------------------------------------------------------
# ours: grpo_kernels
# ----------------------------------------------------------------------------------------------------------


def _ours_logprobs_kwargs(strategy: str) -> dict | None:
    """linear_logprobs keyword that selects `strategy`, or None when it cannot be selected."""
    import grpo_kernels as gk

    params = inspect.signature(gk.linear_logprobs).parameters
    if "strategy" in params:
        return {"strategy": strategy}
    return {} if strategy == "auto" else None


def _ours_unavailable(strategy: str):
    def check(device, mode):
        reason = _import_error("grpo_kernels")
        if reason or mode != "logprobs":
            return reason
        if _ours_logprobs_kwargs(strategy) is None:
            return f"gk.linear_logprobs has no strategy option, so '{strategy}' cannot be chosen (see ours-auto)"
        return None

    return check


def _make_ours(strategy: str, chunk_size: int | None = None):
    def make(mode, x, opts):
        import grpo_kernels as gk

        common = {"backend": opts["backend"]} if opts.get("backend") else {}
        if chunk_size is not None:
            common["chunk_size"] = chunk_size
        if mode == "loss":
            kw = {**loss_options(opts), **common}

            def fn():
                loss, _ = gk.fused_linear_grpo_loss(
                    x["hidden"],
                    x["weight"],
                    x["ids"],
                    x["mask"],
                    x["advantages"],
                    old_per_token_logps=x["old"],
                    ref_per_token_logps=x.get("ref"),
                    strategy=strategy,
                    **kw,
                )
                return loss

            return fn
        skw = {**(_ours_logprobs_kwargs(strategy) or {}), **common}
        t = opts.get("temperature", 1.0)
        return lambda: gk.linear_logprobs(x["hidden"], x["weight"], x["ids"], temperature=t, **skw)

    return make


# ----------------------------------------------------------------------------------------------------------
# Liger-Kernel: the chunked fused-linear GRPO loss, and its Triton GRPO loss on materialised logits
# ----------------------------------------------------------------------------------------------------------


def _make_liger(mode, x, opts):
    t = opts.get("temperature", 1.0)
    if mode == "loss":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        kw = loss_options(opts)
        beta = kw.pop("beta", 0.0)
        module = LigerFusedLinearGRPOLoss(
            beta=beta,
            use_ref_model=beta != 0.0,
            # Liger compiles its loss math with torch.compile; on CPU that is not what it is built for
            compiled=bool(opts.get("compiled", x["hidden"].device.type == "cuda")),
            **kw,
        )

        def fn():
            loss, _ = module(
                x["hidden"],
                x["weight"],
                x["ids"],
                x["mask"],
                x["advantages"],
                ref_per_token_logps=x.get("ref"),
                old_per_token_logps=x["old"],
            )
            return loss

        return fn
    from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

    return lambda: LigerFusedLinearPPOBase.chunk_forward(x["hidden"], x["weight"], x["ids"], temperature=t)


def _liger_unavailable(device, mode):
    reason = _missing("liger_kernel") or _import_error("liger_kernel.chunked_loss")
    if reason is None and mode == "logprobs":
        from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

        if not hasattr(LigerFusedLinearPPOBase, "chunk_forward"):
            return "this liger-kernel has no LigerFusedLinearPPOBase.chunk_forward (added in 0.8)"
    return reason


def _logits_plus_one(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Liger's Triton GRPO kernels take TRL's (B, T+1, V) logits and ignore the last position: append one row
    # (a copy of the last real one; its logits are never read) instead of copying the [N, V] logits.
    ext = torch.cat([hidden, hidden[:, -1:, :]], dim=1)
    return ext @ weight.T


def _make_liger_triton(mode, x, opts):
    t = opts.get("temperature", 1.0)
    if mode == "loss":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        kw = loss_options(opts)

        def fn():
            logits = _logits_plus_one(x["hidden"], x["weight"])
            loss, _ = triton_grpo_loss(
                logits,
                x["old"],
                x.get("ref"),
                x["ids"],
                x["advantages"],
                x["mask"],
                temperature=t,
                beta=kw.get("beta", 0.0),
                eps_low=kw.get("epsilon_low", 0.2),
                eps_high=kw.get("epsilon_high", 0.2),
                inplace=True,
                loss_type=kw.get("loss_type", "dapo"),
                max_completion_length=kw.get("max_completion_length"),
                importance_sampling_level=kw.get("importance_sampling_level", "token"),
                reduce=True,
            )
            return loss

        return fn
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

    return lambda: fused_selective_log_softmax(_logits_plus_one(x["hidden"], x["weight"]), x["ids"], t, x["mask"])


def _liger_triton_unavailable(device, mode):
    return _needs_cuda(device, "Liger's Triton GRPO kernel") or _missing("liger_kernel") or _import_error(
        "liger_kernel.transformers.grpo_loss"
    )


# ----------------------------------------------------------------------------------------------------------
# Cut Cross-Entropy: per-token log-probs = -linear_cross_entropy(reduction="none"); the loss in torch
# ----------------------------------------------------------------------------------------------------------


def _cce_logprobs(x: dict, t: float) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    h = x["hidden"]
    e = h.reshape(-1, h.shape[-1])
    if t != 1.0:
        e = e / t  # logits / t == (h / t) @ W.T
    nll = linear_cross_entropy(e, x["weight"], x["ids"].reshape(-1), reduction="none")
    return (-nll.float()).view(x["ids"].shape)


def _make_cce(mode, x, opts):
    t = opts.get("temperature", 1.0)
    if mode == "loss":
        return lambda: loss_from_logprobs(_cce_logprobs(x, t), x, opts)
    return lambda: _cce_logprobs(x, t)


def _cce_unavailable(device, mode):
    return (
        _needs_cuda(device, "cut-cross-entropy (Triton kernels)")
        or _missing("cut_cross_entropy")
        or _import_error("cut_cross_entropy")
    )


# ----------------------------------------------------------------------------------------------------------
# TRL 1.16's own path: its GRPOTrainer patches the model's forward (`trl.trainer.utils.add_fused_lm_head`) to call
# `trl.kernels.ChunkedLogProbFunction` on the real (unmasked) tokens, 4096-token x 32768-vocab tiles, with
# outputs ("log_probs", "entropy") for the policy and ("log_probs",) for the reference model; the loss is plain
# torch (the same formula as grpo_kernels.reference.reference_grpo_loss, which mirrors TRL's _compute_loss).
# Only trl.kernels is imported; trl's trainer stack (datasets, accelerate, ...) is needed by one call in the
# backward, `trl.trainer.utils.maybe_gather_lm_head_ctx`: where that module does not import, it is replaced by
# what it returns without DeepSpeed ZeRO-3, a null context (see `trl_backward_context`).
# ----------------------------------------------------------------------------------------------------------

TRL_CHUNK_SIZE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16, read from TRL when importable
TRL_POLICY_OUTPUTS = ("log_probs", "entropy")  # GRPOTrainer: add_fused_lm_head(model, ..., outputs=these)
TRL_REF_OUTPUTS = ("log_probs",)  # GRPOTrainer: add_fused_lm_head(self.ref_model, ...) with the default outputs


def trl_backward_context() -> str | None:
    """Make `trl.trainer.utils` importable for ChunkedLogProbFunction.backward. None when TRL's own module
    imports; else installs a stand-in whose `maybe_gather_lm_head_ctx` returns a null context (TRL's own
    returns exactly that unless DeepSpeed ZeRO-3 is enabled) and returns why."""
    try:
        importlib.import_module("trl.trainer.utils")
        return None
    except Exception as exc:
        import contextlib
        import types

        why = f"import trl.trainer.utils failed ({type(exc).__name__}: {exc})".splitlines()[0][:200]
        stand_in = types.ModuleType("trl.trainer.utils")
        stand_in.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        stand_in.__doc__ = "bench stand-in: " + why
        sys.modules["trl.trainer.utils"] = stand_in
        return why + "; its maybe_gather_lm_head_ctx replaced by a null context (no ZeRO-3 here)"


def trl_chunk_size() -> int:
    return int(getattr(sys.modules.get("trl.trainer.utils"), "_CHUNKED_LOGPROB_CHUNK_SIZE", TRL_CHUNK_SIZE))


def trl_logprobs(x: dict, temperature: float, outputs: tuple[str, ...]) -> torch.Tensor:
    """(B, T) fp32 log-probs as TRL 1.16's fused LM head makes them (zeros at masked positions)."""
    from trl.kernels import ChunkedLogProbFunction

    h, ids = x["hidden"], x["ids"]
    mask = x["mask"].bool()
    # TRL scores only the real tokens on Triton devices ("compact"); elsewhere every position, masked after
    try:
        from trl.kernels.chunked_logprob import _use_triton

        compact = _use_triton(h.device)
    except ImportError:
        compact = h.device.type in ("cuda", "xpu")
    hh = h[mask] if compact else h.reshape(-1, h.shape[-1])
    tt = ids[mask] if compact else ids.reshape(-1)
    logp = ChunkedLogProbFunction.apply(hh, x["weight"], None, tt, temperature, trl_chunk_size(), None, 1.0, outputs)[0]
    if compact:
        return logp.new_zeros(mask.shape).masked_scatter(mask, logp)
    return logp.view(mask.shape).masked_fill(~mask, 0)


def _make_trl(mode, x, opts):
    trl_backward_context()
    t = opts.get("temperature", 1.0)
    if mode == "loss":
        return lambda: loss_from_logprobs(trl_logprobs(x, t, TRL_POLICY_OUTPUTS), x, opts)
    return lambda: trl_logprobs(x, t, TRL_REF_OUTPUTS)


def _trl_unavailable(device, mode):
    reason = _missing("trl") or _import_error("trl.kernels")
    if reason is None:
        from trl import kernels

        if not hasattr(kernels, "ChunkedLogProbFunction"):
            return "this trl has no trl.kernels.ChunkedLogProbFunction (TRL 1.16 has it)"
    return reason


REGISTRY: dict[str, Impl] = {}


def register(impl: Impl) -> Impl:
    REGISTRY[impl.name] = impl
    return impl


for _s in ("chunked", "fused", "auto"):
    register(
        Impl(
            f"ours-{_s}",
            ("loss", "logprobs"),
            f"grpo_kernels, strategy={_s!r} (gk.fused_linear_grpo_loss / gk.linear_logprobs)",
            _make_ours(_s),
            _ours_unavailable(_s),
            tags=("ours",),
        )
    )
register(
    Impl(
        "torch",
        ("loss", "logprobs"),
        "TRL's path: full logits, fp32 log_softmax+gather, loss in torch, autograd",
        _make_torch,
        materializes_logits=True,
        tags=("baseline",),
    )
)
register(
    Impl(
        "trl",
        ("loss", "logprobs"),
        "TRL 1.16's path: trl.kernels.ChunkedLogProbFunction on the real tokens (4096x32768 tiles, bf16 logits "
        "on GPU, recompute in backward), the loss in torch",
        _make_trl,
        _trl_unavailable,
        tags=("baseline",),
    )
)
register(
    Impl(
        "torch-compile",
        ("loss", "logprobs"),
        "the torch path under torch.compile (dynamic=False)",
        _make_torch_compile,
        _compile_unavailable,
        materializes_logits=True,
        tags=("slow-start",),
    )
)
register(
    Impl(
        "liger",
        ("loss", "logprobs"),
        "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss (logprobs: its chunk_forward)",
        _make_liger,
        _liger_unavailable,
    )
)
register(
    Impl(
        "liger-triton",
        ("loss", "logprobs"),
        "materialised logits + Liger's Triton triton_grpo_loss (logprobs: fused_selective_log_softmax)",
        _make_liger_triton,
        _liger_triton_unavailable,
        materializes_logits=True,
    )
)
register(
    Impl(
        "cce",
        ("loss", "logprobs"),
        "cut_cross_entropy.linear_cross_entropy(reduction='none') log-probs + the loss in torch",
        _make_cce,
        _cce_unavailable,
    )
)


CHUNK_ROWS_IMPL = re.compile(r"ours-chunked:(\d+)")


def get_impl(name: str) -> Impl:
    """A registered implementation, or `ours-chunked:ROWS` (the chunked strategy with chunk_size=ROWS, registered
    on first use): what a chunk-size sweep compares against `ours-auto`'s own sizing."""
    if name in REGISTRY:
        return REGISTRY[name]
    m = CHUNK_ROWS_IMPL.fullmatch(name)
    if m and int(m.group(1)) > 0:
        rows = int(m.group(1))
        return register(Impl(name, ("loss", "logprobs"), f"grpo_kernels, strategy='chunked', chunk_size={rows}",
                             _make_ours("chunked", rows), _ours_unavailable("chunked"), tags=("ours",)))
    raise ValueError(f"--impls: unknown implementation {name!r}; choose from all, default, {', '.join(REGISTRY)}, "
                     "or ours-chunked:ROWS (a fixed chunk size, ROWS > 0)")


def resolve_impls(spec: str, mode: str, device: torch.device) -> list[str]:
    """'all' -> every registered implementation; 'default' -> all but torch-compile on CPU (minutes of
    compiling on a small machine); else a comma-separated list of names."""
    names = [n for n, impl in REGISTRY.items() if mode in impl.modes]
    if spec == "all":
        return names
    if spec == "default":
        return [n for n in names if not (device.type == "cpu" and "slow-start" in REGISTRY[n].tags)]
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        get_impl(part)
        out.append(part)
    if not out:
        raise ValueError("--impls: empty list")
    return out


def extra_bytes_estimate(impl: Impl, case) -> int:
    """Rough memory an implementation needs beyond inputs and gradients, to skip shapes that cannot fit."""
    from .shapes import DTYPES

    s = DTYPES[case.dtype].itemsize
    nv = case.tokens * case.vocab
    if impl.materializes_logits:
        # logits in the input dtype + fp32 copy saved for backward + fp32 dlogits and a temporary (+ the
        # input-dtype cast of dlogits)
        return nv * (2 * s + 12) if case.mode == "loss" else nv * (s + 8)
    return 256 << 20


def expected_buffer_bytes(impl: Impl, case, device: torch.device) -> int | None:
    """The large buffer an implementation is known to allocate for `case`, printed beside its measured extra memory
    so that a measurement far under it stands out: the fp32 [N x V] logits of an implementation that materializes
    them; for our chunked strategy (and auto, which picks it on the CPU) the fp32 [chunk x V] buffer, plus the
    fp32 [V x H] dW accumulator when N rows take more than one chunk. Computed for all N rows (padding and
    zero-advantage rows that never reach a GEMM make the real buffer smaller). None where no single buffer is
    known."""
    from grpo_kernels import sizing

    from .shapes import DTYPES

    if impl.materializes_logits:
        return case.tokens * case.vocab * 4
    fixed = CHUNK_ROWS_IMPL.fullmatch(impl.name)
    if fixed or impl.name == "ours-chunked" or (impl.name == "ours-auto" and device.type == "cpu"):
        dtype = DTYPES[case.dtype]
        # rows as the API sizes them (the torch backend, the CPU's, budgets its epilogue's temporaries too)
        rows = min(int(fixed.group(1)), case.tokens) if fixed else sizing.default_chunk_size(
            case.tokens, case.vocab, case.hidden, dtype, device, torch_epilogue=device.type != "cuda")
        acc = sizing.accumulator_bytes(case.vocab, case.hidden, dtype, True) if rows < case.tokens else 0
        return rows * sizing.chunk_row_bytes(case.vocab, dtype, False) + acc
    return None
