"""TRL uses grpo_kernels: call `patch()` before building a TRL trainer, `unpatch()` to restore TRL.

    from grpo_kernels.integrations import trl as gkt
    gkt.patch()                    # then build trl.GRPOTrainer (or RLOO, SFT, DPO, KTO) as usual

What is replaced is found by what the installed TRL has, not by its version string:
- `_ChunkedLogProbFunction` with an `outputs` argument (TRL 1.15+): the fused LM head that GRPO, RLOO, SFT, DPO
  and KTO put on the model (`add_fused_lm_head`). Ours computes log-probs and entropy, both differentiable:
  GRPO's and RLOO's calls; SFT, DPO and KTO also ask for is_top1/mean_logits, so their policy calls stay on
  TRL's function (DPO's and KTO's reference-model calls are ours).
- `_ChunkedLogProbFunction` without it (TRL 1.14): the same, returning (log-probs, entropy); TRL 1.14's GRPO,
  DPO and KTO take that path only under `use_liger_kernel=True`, so liger-kernel must be installed.
- `FusedLinearGRPOLoss` in `trl.trainer.grpo_trainer` (TRL 1.13) or `LigerFusedLinearGRPOLoss` there (TRL
  0.17-1.12): the GRPO loss used with `use_liger_kernel=True` (`use_liger_loss=True` before 0.25). TRL and
  transformers refuse that flag unless liger-kernel is installed, so those versions need liger-kernel even
  though the loss that runs is ours.
Calls ours does not cover go to TRL's own function unchanged: final-logit softcapping, a logit scale <= 0,
the extra outputs (log_sum_sq_probs, mean_logits, is_top1), targets outside [0, V) (TRL defines their
log-prob as -logsumexp), an empty batch, DeepSpeed ZeRO-3 parameters (ours re-reads the weight in the
backward, after ZeRO-3 has re-partitioned it), and devices other than CPU and CUDA. The fused GRPO loss
(0.17-1.13) runs its chunked strategy under ZeRO-3 (every gradient made in the forward).
`call_counts()` says how many calls went each way.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math

import torch

import grpo_kernels as gk

from ._patching import Bindings

# Trainer modules that may hold their own binding of the replaced names (`from .utils import ...`).
_TRAINER_MODULES = ("grpo_trainer", "rloo_trainer", "sft_trainer", "dpo_trainer", "kto_trainer")
_ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

_bindings: Bindings | None = None
_originals: dict = {}  # our stand-in -> the TRL object it replaced
_counts = {"ours": 0, "trl": 0}


def call_counts() -> dict:
    """{'ours': calls computed by grpo_kernels, 'trl': calls handed back to TRL's own code} since the last reset."""
    return dict(_counts)


def reset_call_counts() -> None:
    _counts["ours"] = _counts["trl"] = 0


def is_patched() -> bool:
    return _bindings is not None


def _logprobs_or_none(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale,
                      want_entropy):
    """(log-probs, entropy or None) from grpo_kernels, or None when the call must go to TRL's own function."""
    if final_logit_softcapping is not None:
        return None
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale) \
            or logit_scale <= 0:
        return None
    if not all(isinstance(x, torch.Tensor) for x in (hidden, weight, targets)) or hidden.dim() != 2 \
            or hidden.shape[0] == 0 or hidden.device.type not in ("cpu", "cuda") or hasattr(weight, "ds_id"):
        return None
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return None
    if bool(((targets < 0) | (targets >= weight.shape[0])).any()):  # one sync; TRL never sends these today
        return None
    # logit_scale * (W h + b) / T == (W h + b) / (T / logit_scale): one softmax temperature.
    with torch.autocast(device, enabled=False):
        logp, entropy = gk.linear_logprobs(hidden.to(dtype), weight.to(dtype), targets,
                                           bias=None if bias is None else bias.to(dtype),
                                           temperature=float(temperature) / float(logit_scale),
                                           return_entropy=True, validate=False)
    return logp, (entropy if want_entropy else None)


class ChunkedLogProbFunction:
    """Stands in for TRL 1.15+'s `_ChunkedLogProbFunction`: same `apply` arguments and outputs
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), None for fields not in `outputs`."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=_ALL_OUTPUTS):
        outputs = tuple(outputs)
        if set(outputs) <= {"log_probs", "entropy"}:
            out = _logprobs_or_none(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale,
                                    "entropy" in outputs)
            if out is not None:
                _counts["ours"] += 1
                return out[0], out[1], None, None, None
        _counts["trl"] += 1
        return _originals[ChunkedLogProbFunction].apply(hidden, weight, bias, targets, temperature, chunk_size,
                                                        final_logit_softcapping, logit_scale, outputs)


class ChunkedLogProbFunctionV114:
    """Stands in for TRL 1.14's `_ChunkedLogProbFunction`: `apply(...)` with 8 arguments -> (logps, entropy)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0):
        out = _logprobs_or_none(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale,
                                True)
        if out is not None:
            _counts["ours"] += 1
            return out
        _counts["trl"] += 1
        return _originals[ChunkedLogProbFunctionV114].apply(hidden, weight, bias, targets, temperature, chunk_size,
                                                            final_logit_softcapping, logit_scale)


class LigerGRPOLoss(gk.FusedLinearGRPOLoss):
    """`gk.FusedLinearGRPOLoss` under the name TRL 0.17-1.13 construct (Liger's keywords and call). A keyword TRL
    leaves out gets what Liger gave those TRL versions: TRL 0.17-0.18 pass no loss_type, and the Liger of that
    time normalised by the batch's token count (bnpo)."""

    def __init__(self, beta: float = 0.04, loss_type: str = "bnpo", **kwargs):
        super().__init__(beta=beta, loss_type=loss_type, **kwargs)

    def forward(self, _input, lin_weight, *args, **kwargs):
        _counts["ours"] += 1
        if hasattr(lin_weight, "ds_id") and self.options.strategy != "chunked":
            # DeepSpeed ZeRO-3: TRL gathers the head for the forward only. The chunked strategy makes every
            # gradient in the forward and never reads the weight in the backward; the fused one would.
            self.options = self.options.replace(strategy="chunked")
        return super().forward(_input, lin_weight, *args, **kwargs)


def _chunked_variant(fn):
    if fn is None or not hasattr(fn, "apply") or not hasattr(fn, "forward"):
        return None
    return ChunkedLogProbFunction if "outputs" in inspect.signature(fn.forward).parameters \
        else ChunkedLogProbFunctionV114


def patch() -> list[str]:
    """Make the installed TRL use grpo_kernels; returns the 'module.name' bindings replaced. Idempotent.
    Raises RuntimeError when TRL has none of the hooks above (nothing is changed then)."""
    global _bindings
    if _bindings is not None:
        return _bindings.names()
    utils = importlib.import_module("trl.trainer.utils")
    trainers = {}
    for name in _TRAINER_MODULES:
        with contextlib.suppress(ImportError):  # a trainer whose optional dependencies are missing
            trainers[name] = importlib.import_module(f"trl.trainer.{name}")
    grpo = trainers.get("grpo_trainer")
    bindings = Bindings()
    done: list[str] = []
    for fn in {getattr(m, "_ChunkedLogProbFunction", None) for m in (utils, *trainers.values())}:
        ours = _chunked_variant(fn)
        if ours is not None:
            _originals[ours] = fn
            done += bindings.replace_everywhere("trl", fn, ours)
    if grpo is not None and "FusedLinearGRPOLoss" in vars(grpo):  # TRL 1.13: its copy of Liger's loss
        _originals[LigerGRPOLoss] = grpo.FusedLinearGRPOLoss
        done += bindings.replace_everywhere("trl", grpo.FusedLinearGRPOLoss, LigerGRPOLoss)
    elif grpo is not None and hasattr(getattr(grpo, "GRPOTrainer", None), "compute_liger_loss"):  # TRL 0.17-1.12
        original = vars(grpo).get("LigerFusedLinearGRPOLoss")  # bound only when liger-kernel is installed
        if original is not None:
            _originals[LigerGRPOLoss] = original
        bindings.replace(grpo, "LigerFusedLinearGRPOLoss", LigerGRPOLoss)
        done.append(f"{grpo.__name__}.LigerFusedLinearGRPOLoss")
    if not done:
        bindings.restore()
        raise RuntimeError("grpo_kernels.integrations.trl: the installed TRL has none of the hooks this adapter "
                           "knows (_ChunkedLogProbFunction, FusedLinearGRPOLoss, LigerFusedLinearGRPOLoss); "
                           "nothing was patched")
    _bindings = bindings
    return bindings.names()


def unpatch() -> None:
    """Restore TRL's own objects (also in TRL modules imported after patch()). No-op when not patched."""
    global _bindings
    if _bindings is None:
        return
    _bindings.restore("trl", {ours: orig for ours, orig in _originals.items() if orig is not None})
    _bindings = None


@contextlib.contextmanager
def patched():
    """`with patched(): ...` builds and runs TRL trainers on grpo_kernels, then restores TRL."""
    was = is_patched()
    patch()
    try:
        yield
    finally:
        if not was:
            unpatch()
