"""GRPOConfig: every knob of a GRPO run, with TRL 1.16's names and defaults.

A plain dataclass (no transformers.TrainingArguments): the fields a lean trainer actually reads, validated once at
construction so that a bad combination fails before a model is loaded, with a message that names the numbers and
says how to fix them.

Derived fields follow TRL's ``GRPOConfig.__post_init__``: ``epsilon_high`` defaults to ``epsilon``; the generation
batch is ``per_device_train_batch_size × world_size × steps_per_generation`` completions, i.e.
``generation_batch_size / num_generations`` prompts per rollout.

Defaults are TRL 1.16's (``trl.GRPOConfig``) for every field both have, except these (``DIFFERS_FROM_TRL``; a test
compares every shared field with TRL's and fails on a difference not listed here):

- ``output_dir``: ``"runs/grpo"`` (TRL: None → ``"trainer_output"``); runs live together under ``runs/``.
- ``max_completion_length``: 256, the seed's value (TRL: 512). Also dr_grpo's normalizer, so dr_grpo's loss
  scale differs from TRL's unless it is set equal.
- ``num_train_epochs``: 1 (TRL: 3); runs are usually bounded by ``max_steps`` anyway.
- ``logging_steps``: 1 (TRL: 10); short runs, and a row per step costs nothing.
- ``gradient_checkpointing``: False (TRL: True); the models a lean trainer runs fit without it, and it would turn
  off the shared-prompt KV cache of ``update.completion_hidden``. Same math either way.
- ``bf16``: None = auto, True only on a CUDA device with bf16 (TRL: None resolves to True, which refuses to run on
  a CPU without ``use_cpu``).

Fields TRL 1.16 does not have (``OURS_ONLY``): ``max_prompt_length`` (512, the seed's value: longer prompts are
left-truncated; TRL 1.16 never truncates prompts, ``None`` does the same here), ``system_prompt``,
``attn_implementation`` (TRL: inside ``model_init_kwargs``), ``warmup_ratio`` (transformers 5 folded it into
``warmup_steps``), ``eval_max_samples``, ``eval_temperature``, ``disable_progress_bar`` (transformers:
``disable_tqdm``), ``kernel_backend``, ``kernel_strategy``, ``kernel_chunk_size``, ``overwrite_output_dir``
(transformers' name, dropped from its TrainingArguments in version 5), ``max_unscorable_steps``.

Behaviour that differs from TRL 1.16 with equal settings (docs/trainer.md, "Defaults and TRL 1.16"): position ids
count from the first real token of a left-padded row, as ``generate`` does (TRL passes none when it scores
completions: the same for RoPE models, different for absolute position embeddings); a completion is truncated
when it does not end in an EOS token (TRL also counts a trailing pad token as a terminator when pad ≠ EOS).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

# The loss's choices are defined once, by the loss (options.py is torch-free, so `grpo --help` stays so).
from grpo_kernels.options import BACKENDS as KERNEL_BACKENDS
from grpo_kernels.options import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES
from grpo_kernels.options import STRATEGIES as KERNEL_STRATEGIES
from grpo_kernels.options import TOKEN_LEVEL_ONLY as _TOKEN_ONLY_LOSSES

from .value_checks import check_choice as _check_choice
from .value_checks import check_int as _check_int
from .value_checks import check_number as _check_number

SCALE_REWARDS = ("group", "batch", "none")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
EVAL_STRATEGIES = ("no", "steps")
REPORT_TO = ("none", "tensorboard")

# Defaults that differ from TRL 1.16's trl.GRPOConfig, and fields it does not have (see the module docstring).
DIFFERS_FROM_TRL = {
    "output_dir": "runs live together under runs/",
    "max_completion_length": "256, the seed's value (TRL: 512); also dr_grpo's normalizer",
    "num_train_epochs": "1 (TRL: 3); runs are usually bounded by max_steps",
    "logging_steps": "1 (TRL: 10); a row per step costs nothing",
    "gradient_checkpointing": "False (TRL: True); it would also turn off the shared-prompt KV cache",
    "bf16": "auto: True only on a CUDA device with bf16 (TRL: True, which refuses a CPU without use_cpu)",
}
OURS_ONLY = ("max_prompt_length", "system_prompt", "attn_implementation", "warmup_ratio", "eval_max_samples",
             "eval_temperature", "disable_progress_bar", "kernel_backend", "kernel_strategy", "kernel_chunk_size",
             "overwrite_output_dir", "max_unscorable_steps")

# Fields derived in __post_init__: to_dict() writes what the user gave, so that from_dict(to_dict()) rebuilds the
# same config (possibly under another WORLD_SIZE) instead of tripping over "both set".
_DERIVED = ("epsilon_high", "generation_batch_size", "steps_per_generation", "bf16", "eval_steps")


@dataclass
class GRPOConfig:
    # --- output -------------------------------------------------------------------------------------------------
    output_dir: str = field(
        default="runs/grpo",
        metadata={"help": "where metrics.jsonl, reward_curve.png, eval_results.json and checkpoints go"},
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": (
        "start a fresh run in an output_dir that holds an earlier run's checkpoints, deleting them (without it, "
        "such a run is refused: resume it with --resume_from_checkpoint)")})

    # --- model and reference model --------------------------------------------------------------------------------
    beta: float = field(default=0.0, metadata={"help": "KL coefficient; 0 = no reference model is loaded"})
    model_init_kwargs: dict | None = field(
        default=None, metadata={"help": 'passed to from_pretrained; JSON on the command line, e.g. {"dtype": "bfloat16"}'})
    disable_dropout: bool = field(default=False, metadata={"help": "set every dropout probability to 0"})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "e.g. 'sdpa', 'eager'; None = transformers' choice"})

    # --- data ---------------------------------------------------------------------------------------------------
    num_generations: int = field(default=8, metadata={"help": "completions sampled per prompt (the group size G)"})
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "prompts longer than this are left-truncated; None = no limit"})
    max_completion_length: int | None = field(default=256, metadata={"help": "most tokens generated per completion"})
    shuffle_dataset: bool = field(default=True, metadata={"help": "shuffle the prompts each epoch"})
    system_prompt: str | None = field(
        default=None, metadata={"help": "system message put before each conversational prompt"})

    # --- generation ---------------------------------------------------------------------------------------------
    temperature: float = field(
        default=1.0,
        metadata={"help": "sampling temperature for training completions (also divides the logits in the loss)"},
    )
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling; 1.0 = off"})
    top_k: int = field(
        default=0, metadata={"help": "keep the k most likely tokens when sampling; 0 = off (TRL's default)"})
    min_p: float | None = field(default=None, metadata={"help": "min-p sampling; None = off"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "generation repetition penalty; 1.0 = off"})
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "completions per rollout (all ranks); derived when None"})
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "optimizer micro-steps per rollout; derived when None"})

    # --- loss ---------------------------------------------------------------------------------------------------
    epsilon: float = field(default=0.2, metadata={"help": "lower clipping bound of the importance ratio (1 - epsilon)"})
    epsilon_high: float | None = field(
        default=None,
        metadata={"help": "upper clipping bound (1 + epsilon_high); None = epsilon (DAPO recommends 0.28)"},
    )
    delta: float | None = field(
        default=None,
        metadata={"help": "two-sided clipping bound (INTELLECT-2); should exceed 1 + epsilon_high; None = off"},
    )
    loss_type: str = field(
        default="dapo", metadata={"help": "grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo"})
    importance_sampling_level: str = field(default="token", metadata={"help": "token | sequence (GSPO)"})
    num_iterations: int = field(default=1, metadata={"help": "optimisation passes over each rollout (mu)"})
    scale_rewards: str = field(
        default="group", metadata={"help": "divide advantages by the reward std of: group | batch | none"})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "one weight per reward function, comma-separated; None = all 1"})
    max_unscorable_steps: int | None = field(default=10, metadata={"help": (
        "stop with an error after this many steps in a row in which no completion could be scored (every reward "
        "function returned None); each such step is warned about; None = never stop")})
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "exclude completions that hit max_completion_length from the loss"})
    top_entropy_quantile: float = field(
        default=1.0, metadata={"help": (
            "< 1: only this fraction of completion tokens, the highest-entropy ones, carries policy gradient "
            "(costs one forward-only pass over the LM head)")})
    entropy_coef: float = field(default=0.0, metadata={"help": (
        "Entropy bonus (TRL's static control): the loss subtracts entropy_coef x the mean entropy of the completion "
        "tokens that carry policy gradient. 0 disables it; needs a differentiable entropy from grpo_kernels.")})
    use_bias_correction_kl: bool = field(
        default=True, metadata={"help": "multiply the KL term by the importance ratio (TRL 1.16's default)"})

    # --- optimisation -------------------------------------------------------------------------------------------
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate"})
    lr_scheduler_type: str = field(
        default="linear", metadata={"help": "linear | cosine | constant | constant_with_warmup"})
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "fraction of the steps spent warming up the learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norm scales)"})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "clip the gradient norm to this; None or 0 = no clipping"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "completions (not prompts) per micro-batch and process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; > 0 overrides num_train_epochs"})
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "passes over the training prompts when max_steps is -1"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in the backward pass to save memory"})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 autocast; None = auto: on for a CUDA device with bf16 support"})
    seed: int = field(default=42, metadata={"help": "random seed (sampling, shuffling)"})
    fsdp: str | None = field(default=None, metadata={"help": (
        "transformers' name: 'full_shard' = FSDP2 (fully_shard on each decoder layer and the root) under torchrun; "
        "None or '' = off")})

    # --- logging, saving, evaluation ----------------------------------------------------------------------------
    logging_steps: int = field(default=1, metadata={"help": "log metrics every this many steps"})
    save_steps: int = field(default=500, metadata={"help": "write a checkpoint every this many steps (and at the end)"})
    save_total_limit: int | None = field(
        default=None, metadata={"help": "keep at most this many checkpoints; None = all"})
    eval_strategy: str = field(default="no", metadata={"help": "no | steps (evaluate every eval_steps)"})
    eval_steps: int | None = field(
        default=None,
        metadata={"help": "evaluate every this many steps; None = logging_steps when eval_strategy=steps"},
    )
    eval_max_samples: int | None = field(
        default=None, metadata={"help": "evaluate on at most this many held-out problems; None = all"})
    eval_temperature: float = field(default=0.0, metadata={"help": "sampling temperature for evaluation; 0 = greedy"})
    log_completions: bool = field(
        default=False, metadata={"help": "write completions.jsonl and print some completions"})
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "completions printed per logged step when log_completions; None = all"})
    report_to: str | list[str] = field(
        default="none", metadata={"help": "none | tensorboard (or a comma-separated list)"})
    disable_progress_bar: bool = field(
        default=False, metadata={"help": "no progress bar; one text line per step instead"})

    # --- vLLM generation (TRL 1.16's names and defaults; grpo/vllm_config.py validates, docs/vllm.md) -----------
    use_vllm: bool = field(default=False, metadata={"help": "sample completions with vLLM instead of HF generate"})
    vllm_mode: str = field(default="colocate", metadata={"help": "colocate (an engine in each process) | server"})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "colocate: share of GPU memory vLLM may take, in (0, 1]"})
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "vLLM context length; None = max_prompt_length + max_completion_length"})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "colocate: ranks sharing one engine"})
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "release vLLM's weights and KV cache between rollouts (GPU)"})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "vllm | transformers: vLLM's model code"})
    vllm_server_base_url: str | None = field(
        default=None, metadata={"help": "server mode: base URL; overrides host and port"})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "server mode: host"})
    vllm_server_port: int = field(default=8000, metadata={"help": "server mode: port"})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "server mode: seconds to wait for it"})
    vllm_importance_sampling_correction: bool = field(
        default=True, metadata={"help": "weight the loss by pi_trainer / pi_vLLM of the sampled tokens"})
    vllm_importance_sampling_mode: str = field(
        default="sequence_mask", metadata={"help": "token_truncate | token_mask | sequence_truncate | sequence_mask"})
    vllm_importance_sampling_clip_min: float | None = field(
        default=None, metadata={"help": "lower bound of the ratio (truncate: clamp; mask: zero below); None = none"})
    vllm_importance_sampling_clip_max: float | None = field(
        default=3.0, metadata={"help": "upper bound of the ratio (truncate: clamp; mask: zero above); None = none"})

    # --- grpo_kernels -------------------------------------------------------------------------------------------
    kernel_backend: str = field(default="auto", metadata={"help": "auto | torch | triton"})
    kernel_strategy: str = field(default="auto", metadata={"help": "auto | chunked | fused"})
    kernel_chunk_size: int | None = field(
        default=None, metadata={"help": "tokens per chunk of the chunked strategy; None = automatic"})

    # ----------------------------------------------------------------------------------------------------------
    def __post_init__(self):
        # What the user gave for derived fields, before we fill them in (see to_dict).
        self._given = {name: getattr(self, name) for name in _DERIVED}
        self._normalise()
        self._derive_batches()
        self._validate()

    @property
    def world_size(self) -> int:
        """Number of processes, read from the WORLD_SIZE environment variable that torchrun sets (default 1)."""
        return _world_size()

    # --- normalisation ------------------------------------------------------------------------------------------
    def _normalise(self):
        if isinstance(self.scale_rewards, str) and self.scale_rewards.lower() in ("true", "false"):
            self.scale_rewards = self.scale_rewards.lower() == "true"
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if isinstance(self.model_init_kwargs, str):  # TRL accepts a JSON string (CLI)
            try:
                self.model_init_kwargs = json.loads(self.model_init_kwargs)
            except json.JSONDecodeError as e:
                raise ValueError(f"model_init_kwargs={self.model_init_kwargs!r} is not valid JSON: {e}") from None
        if self.reward_weights is not None:
            try:
                self.reward_weights = [float(w) for w in self.reward_weights]
            except (TypeError, ValueError):
                raise ValueError(
                    f"reward_weights must be a list of numbers (one per reward function), got {self.reward_weights!r}"
                ) from None
        if self.bf16 is None:
            self.bf16 = _cuda_bf16_available()
        if self.eval_strategy == "steps" and self.eval_steps is None:
            self.eval_steps = self.logging_steps

    def _derive_batches(self):
        _check_int("per_device_train_batch_size", self.per_device_train_batch_size, 1)
        _check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int):
            raise ValueError(f"num_generations must be an integer >= 2, got {self.num_generations!r}")
        per_step = self.per_device_train_batch_size * self.world_size
        gbs, spg = self.generation_batch_size, self.steps_per_generation
        if gbs is not None and spg is not None and gbs == per_step * spg:
            spg = None  # a consistent pair, as dataclasses.replace passes the filled-in values back: keep it
        if gbs is not None and spg is not None:
            raise ValueError(
                f"generation_batch_size={gbs} and steps_per_generation={spg} are both set and disagree: each one "
                "determines the other (generation_batch_size = per_device_train_batch_size × world_size × "
                f"steps_per_generation = {per_step} × {spg} = {per_step * spg}): set only one of them."
            )
        if gbs is None and spg is None:
            spg = self.gradient_accumulation_steps
        if spg is not None:
            _check_int("steps_per_generation", spg, 1)
            gbs = per_step * spg
        else:
            _check_int("generation_batch_size", gbs, 1)
            if gbs % per_step != 0:
                lo, hi = max(per_step, gbs // per_step * per_step), (gbs // per_step + 1) * per_step
                raise ValueError(
                    f"generation_batch_size={gbs} must be divisible by per_device_train_batch_size × world_size = "
                    f"{self.per_device_train_batch_size} × {self.world_size} = {per_step}, since each optimizer "
                    f"micro-step consumes {per_step} completions: use generation_batch_size={lo} or {hi}, or set "
                    "steps_per_generation instead."
                )
            spg = gbs // per_step
        self.generation_batch_size, self.steps_per_generation = gbs, spg

        if self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}, but GRPO needs at least 2 completions per prompt: the "
                "advantage is the reward minus its group's mean, divided by the group's standard deviation, which is "
                "undefined for a group of one. Set num_generations=2 or more (8 is TRL's default)."
            )
        if gbs % self.num_generations != 0:
            ok = sorted(d for d in range(2, gbs + 1) if gbs % d == 0)
            if self._given["generation_batch_size"] is not None:
                what = f"generation_batch_size={gbs}"
            else:
                what = (
                    "the generation batch (per_device_train_batch_size × world_size × steps_per_generation = "
                    f"{self.per_device_train_batch_size} × {self.world_size} × {spg} = {gbs})"
                )
            raise ValueError(
                f"{what} must be divisible by num_generations={self.num_generations}, so that every prompt's group "
                f"of completions lands in the same rollout: use num_generations in {{{','.join(map(str, ok))}}} or "
                f"set per_device_train_batch_size, steps_per_generation or generation_batch_size so that the "
                f"generation batch is a multiple of {self.num_generations} (e.g. per_device_train_batch_size="
                f"{_next_multiple(self.per_device_train_batch_size, self.num_generations)})."
            )

    # --- validation ---------------------------------------------------------------------------------------------
    def _validate(self):
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        _check_choice("eval_strategy", self.eval_strategy, EVAL_STRATEGIES)
        _check_choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        _check_choice("kernel_strategy", self.kernel_strategy, KERNEL_STRATEGIES)
        reports = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        if not isinstance(reports, (list, tuple)):
            raise ValueError(f"report_to must be 'none', 'tensorboard' or a list of them, got {self.report_to!r}")
        for r in reports:
            _check_choice("report_to", r, REPORT_TO)

        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        _check_number("beta", self.beta, lo=0.0, hint="beta is the KL coefficient; use 0.0 to disable the KL term")
        _check_number("temperature", self.temperature, lo=0.0, lo_open=True,
                      hint="for greedy decoding use eval_temperature=0.0; training samples need temperature > 0")
        _check_number("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True, hint="use top_p=1.0 to disable it")
        _check_int("top_k", self.top_k, 0, hint="use top_k=0 to disable it")
        if self.min_p is not None:
            _check_number("min_p", self.min_p, lo=0.0, hi=1.0, hint="use min_p=None to disable it")
        _check_number("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True,
                      hint="use repetition_penalty=1.0 to disable it")
        if self.max_prompt_length is not None:
            _check_int("max_prompt_length", self.max_prompt_length, 1, hint="use None for no limit")
        if self.max_completion_length is not None:
            _check_int("max_completion_length", self.max_completion_length, 1)

        _check_number("epsilon", self.epsilon, lo=0.0)
        _check_number("epsilon_high", self.epsilon_high, lo=0.0, hint="None means epsilon_high = epsilon")
        if self.delta is not None:
            _check_number("delta", self.delta, lo=0.0, lo_open=True,
                          hint=f"use delta=None to disable it, or a value above 1 + epsilon_high = "
                               f"{1 + self.epsilon_high:g}")
            if self.delta <= 1 + self.epsilon_high:
                warnings.warn(
                    f"delta={self.delta} is not above 1 + epsilon_high = {1 + self.epsilon_high:g}: the two-sided "
                    "clip will cut ratios that the ordinary clip would keep (INTELLECT-2 recommends delta > 1 + ε).",
                    stacklevel=3,
                )
        _check_int("num_iterations", self.num_iterations, 1)
        _check_number("top_entropy_quantile", self.top_entropy_quantile, lo=0.0, hi=1.0, lo_open=True,
                      hint="1.0 keeps every token; 0.2 keeps the 20% highest-entropy tokens")
        if isinstance(self.entropy_coef, bool) or not isinstance(self.entropy_coef, (int, float)) or not (
            abs(self.entropy_coef) < float("inf")
        ):
            raise ValueError(f"entropy_coef must be a finite number (0.0 disables the entropy bonus), got "
                             f"{self.entropy_coef!r}")
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError(
                "loss_type='dr_grpo' normalises the loss by the constant max_completion_length, but it is None: set "
                "max_completion_length (e.g. 256) or choose another loss_type."
            )
        if self.importance_sampling_level == "sequence" and self.loss_type in _TOKEN_ONLY_LOSSES:
            raise ValueError(
                f"loss_type={self.loss_type!r} is defined with token-level importance ratios "
                f"({'vespo builds its own sequence weights' if self.loss_type == 'vespo' else 'per-token weights'}), "
                "but importance_sampling_level='sequence': set importance_sampling_level='token', or use "
                "loss_type='grpo' for GSPO-style sequence-level training."
            )
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            warnings.warn(
                "loss_type='luspo' is meant for importance_sampling_level='sequence' (the LUSPO paper's setup).",
                stacklevel=3,
            )

        _check_number("learning_rate", self.learning_rate, lo=0.0)
        _check_number("warmup_ratio", self.warmup_ratio, lo=0.0, hi=1.0)
        _check_number("weight_decay", self.weight_decay, lo=0.0)
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, lo=0.0, hint="use None or 0 to disable clipping")
        _check_number("adam_beta1", self.adam_beta1, lo=0.0, hi=1.0, hi_open=True)
        _check_number("adam_beta2", self.adam_beta2, lo=0.0, hi=1.0, hi_open=True)
        _check_number("adam_epsilon", self.adam_epsilon, lo=0.0)
        if not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool) or (
            self.max_steps != -1 and self.max_steps < 1
        ):
            raise ValueError(
                f"max_steps must be a positive integer, or -1 to train for num_train_epochs; got {self.max_steps!r}"
            )
        _check_number("num_train_epochs", self.num_train_epochs, lo=0.0, lo_open=True)
        if not isinstance(self.bf16, bool):
            raise ValueError(f"bf16 must be True, False or None (auto), got {self.bf16!r}")
        _check_int("seed", self.seed, 0)
        _check_fsdp(self.fsdp)
        from .vllm_config import validate_vllm_fields

        validate_vllm_fields(self)

        _check_int("logging_steps", self.logging_steps, 1)
        if self.max_unscorable_steps is not None:
            _check_int("max_unscorable_steps", self.max_unscorable_steps, 1, hint="use None to never stop")
        if not isinstance(self.overwrite_output_dir, bool):
            raise ValueError(f"overwrite_output_dir must be True or False, got {self.overwrite_output_dir!r}")
        _check_int("save_steps", self.save_steps, 1)
        if self.save_total_limit is not None:
            _check_int("save_total_limit", self.save_total_limit, 1, hint="use None to keep every checkpoint")
        if self.eval_steps is not None:
            _check_int("eval_steps", self.eval_steps, 1)
        if self.eval_max_samples is not None:
            _check_int("eval_max_samples", self.eval_max_samples, 1, hint="use None to evaluate on every sample")
        _check_number("eval_temperature", self.eval_temperature, lo=0.0, hint="0.0 means greedy decoding")
        if self.num_completions_to_print is not None:
            _check_int("num_completions_to_print", self.num_completions_to_print, 0)
        if self.kernel_chunk_size is not None:
            _check_int("kernel_chunk_size", self.kernel_chunk_size, 1, hint="use None for the automatic size")
        if self.model_init_kwargs is not None and not isinstance(self.model_init_kwargs, dict):
            raise ValueError(f"model_init_kwargs must be a dict or None, got {type(self.model_init_kwargs).__name__}")

    # --- (de)serialisation --------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GRPOConfig:
        if not isinstance(d, dict):
            raise TypeError(f"GRPOConfig.from_dict expects a dict, got {type(d).__name__}")
        _check_keys(d)
        return cls(**d)

    def to_dict(self, resolved: bool = False) -> dict[str, Any]:
        """JSON-able dict of the fields. By default derived fields hold what was given (None when derived), so that
        ``from_dict(to_dict())`` rebuilds this config; ``resolved=True`` gives the values in use (for logs)."""
        out = {}
        for name in self.field_names():
            value = self._given[name] if (name in _DERIVED and not resolved) else getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        # default=str: a torch.dtype in model_init_kwargs becomes "torch.bfloat16" rather than crashing the logger
        return json.loads(json.dumps(out, default=str))

    def replace(self, **changes) -> GRPOConfig:
        """A copy with ``changes`` applied and re-derived (``dataclasses.replace`` would pass the derived
        generation_batch_size and steps_per_generation together and be refused)."""
        d = self.to_dict()
        _check_keys(changes)
        d.update(changes)
        return type(self).from_dict(d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GRPOConfig:
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}.{hint}")
        _check_keys(overrides)
        return cls.from_dict({**PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------------------------
# Presets. The loop helper (trainer owner) may tune the NUMBERS inside PRESETS; names, keys and meaning stay here.
# "default": the real run — SmolLM2-135M-Instruct on the bundled arithmetic word problems, on a 2-core CPU.
# "smoke":   a tiny randomly initialised model for a few steps; finishes in seconds.
# PRESET_RUNS holds the non-config parts of each preset (model, dataset, reward functions) for the CLI; the
# number of reward_funcs must equal len(reward_weights) when the preset sets reward_weights.
PRESETS: dict[str, dict] = {
    "default": {
        "output_dir": "runs/default",
        "num_generations": 8,
        "per_device_train_batch_size": 32,
        "max_completion_length": 40,
        "max_prompt_length": 256,
        "learning_rate": 2e-5,
        "beta": 0.0,
        "loss_type": "dapo",
        "max_steps": 16,
        "temperature": 0.7,
        "logging_steps": 1,
        "save_steps": 16,
        "save_total_limit": 1,  # a checkpoint is 1.6 GB (model + AdamW moments): keep only the newest
        "lr_scheduler_type": "constant",
        "reward_weights": [1.0, 0.0],
        "eval_max_samples": 48,
    },
    "smoke": {
        "output_dir": "runs/smoke",
        "num_generations": 4,
        "per_device_train_batch_size": 8,
        "max_completion_length": 8,
        "max_prompt_length": 64,
        "learning_rate": 5e-3,
        "beta": 0.0,
        "loss_type": "dapo",
        "max_steps": 30,
        "temperature": 1.0,
        "logging_steps": 1,
        "save_steps": 30,
        "lr_scheduler_type": "constant",
        "eval_max_samples": 4,
        "disable_progress_bar": True,
    },
}

PRESET_RUNS: dict[str, dict] = {
    # The default run asks for the "#### N" line without "step by step": the 135M model then answers within ~40
    # tokens, so most completions can be scored on a CPU budget. The format reward is logged but weighted 0: at
    # 0.2 the model learned to print a bare "#### N" and held-out accuracy fell.
    "default": {"model": "smollm2-135m-instruct", "dataset": "arithmetic", "reward_funcs": ["gsm8k", "format"],
                "instruction": 'Give the final answer on its own line in the form "#### <number>".'},
    # A toy task a tiny random model can learn in a few steps: reward = fraction of the letter 'a'.
    "smoke": {"model": "tiny", "dataset": "toy", "reward_funcs": ["toy"]},
}


# --------------------------------------------------------------------------------------------------------------
def _check_fsdp(value) -> None:
    """transformers' spelling: a space-separated option string. Only full sharding (FSDP2) is implemented."""
    if value is None or value == "" or value is False:
        return
    if not isinstance(value, str):
        raise ValueError(f"fsdp must be a string ('full_shard' or ''), got {value!r}")
    options = set(value.split())
    if "full_shard" not in options:
        raise ValueError(f"fsdp={value!r}: only 'full_shard' is supported (FSDP2 over all ranks); '' turns it off")
    other = options - {"full_shard", "auto_wrap"}  # auto_wrap is what we do anyway: one unit per decoder layer
    if other:
        raise NotImplementedError(f"fsdp={value!r}: {', '.join(sorted(other))} not implemented (shard_grad_op, "
                                  "hybrid_shard and offload are absent); use fsdp='full_shard'")


def _world_size() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None
    if n < 1:
        raise ValueError(f"environment variable WORLD_SIZE={n} must be >= 1")
    return n


def _cuda_bf16_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _next_multiple(x: int, k: int) -> int:
    return max(k, -(-x // k) * k)


def _check_keys(d: dict):
    names = GRPOConfig.field_names()
    unknown = [k for k in d if k not in names]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.5)
            parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"unknown GRPOConfig field{'s' if len(unknown) > 1 else ''}: {', '.join(parts)}. "
            "GRPOConfig.field_names() lists the valid ones."
        )

