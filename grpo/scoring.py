"""Running reward functions over a batch of completions, with TRL's interface.

Every reward function is called as
``fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_extra=..., log_metric=..., **columns)``
(every dataset column except prompt/completion/completion_ids, one value per completion), exactly what TRL 1.16's
``GRPOTrainer._calculate_rewards`` passes. It returns one reward per completion; ``None`` means "cannot score
this one". Synchronous functions run in order; coroutine functions run concurrently with ``asyncio.gather``.
A reward model (a sequence-classification ``PreTrainedModel``) scores ``prompt + completion`` by ``logits[:, 0]``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import difflib
import functools
import inspect
import math
import os
from typing import Any, Callable, Sequence

import torch

from . import distributed
from .advantages import compute_advantages
from .data import is_conversational
from .errors import RewardFunctionError, UnscorableRewardsError
from .rewards import REWARD_FUNCS
from .rollout import rank_slice, truncation_warning

_NOT_COLUMNS = ("prompt", "completion", "completion_ids")  # TRL passes these separately, never as columns
_MAX_REWARD = float(torch.finfo(torch.float32).max)  # rewards are held in float32: larger ones would become inf


# --------------------------------------------------------------------------------------------------------------
# Reward models


class RewardModelFunction:
    """A sequence-classification model used as a reward function: reward = logits[:, 0] of prompt + completion."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: str | torch.device | None = None,
                 batch_size: int = 64):
        if tokenizer is None:
            raise ValueError(f"reward model {_model_name(model)!r} needs a tokenizer (reward_processing_classes)")
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        if tokenizer.pad_token is None:  # a batch needs padding; the model finds the last real token by pad id
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.__name__ = _model_name(model)

    def texts(self, prompts: Sequence, completions: Sequence) -> list[str]:
        out = []
        for prompt, completion in zip(prompts, completions):
            if is_conversational(prompt):
                messages = list(prompt) + (
                    list(completion) if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
                )
                if getattr(self.tokenizer, "chat_template", None):
                    out.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
                else:
                    out.append("\n".join(f"{m['role']}: {m['content']}" for m in messages))
            else:
                out.append(str(prompt) + str(completion))
        return out

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        texts = self.texts(prompts, completions)
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                   padding_side="right", add_special_tokens=False)
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                scores.extend(self.model(**batch).logits[:, 0].float().tolist())
        return scores


def _model_name(model) -> str:
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return os.path.basename(path.rstrip("/")) or type(model).__name__


# --------------------------------------------------------------------------------------------------------------
# Normalising the reward_funcs argument


def resolve_reward_funcs(reward_funcs, reward_processing_classes=None, device="cpu") -> list[Callable]:
    """Turn ``reward_funcs`` (a callable, a registered name, a model path/id, a PreTrainedModel, or a list of
    those) into a list of callables. ``reward_processing_classes``: tokenizers for the reward models, one or a
    list aligned with ``reward_funcs`` (None entries = load the model's own)."""
    if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
        raise ValueError(f"no reward functions given: pass a callable or one of {sorted(REWARD_FUNCS)}")
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if reward_processing_classes is None or not isinstance(reward_processing_classes, (list, tuple)):
        tokenizers = [reward_processing_classes] * len(funcs)
    else:
        tokenizers = list(reward_processing_classes)
        if len(tokenizers) != len(funcs):
            raise ValueError(
                f"{len(tokenizers)} reward_processing_classes for {len(funcs)} reward functions: pass one per reward "
                "function (None for plain functions)"
            )
    return [_resolve_one(f, tok, device) for f, tok in zip(funcs, tokenizers)]


def _resolve_one(func, tokenizer, device) -> Callable:
    if isinstance(func, str):
        if func in REWARD_FUNCS:
            return REWARD_FUNCS[func]
        return _load_reward_model(func, tokenizer, device)
    if isinstance(func, torch.nn.Module):
        if tokenizer is None:
            tokenizer = _load_tokenizer(getattr(func.config, "_name_or_path", ""), func)
        return RewardModelFunction(func, tokenizer, device)
    if callable(func):
        return func
    raise TypeError(
        f"a reward function must be a callable, a registered name ({', '.join(sorted(REWARD_FUNCS))}), a model "
        f"path or a PreTrainedModel; got {type(func).__name__}"
    )


def _load_reward_model(name: str, tokenizer, device) -> RewardModelFunction:
    if not os.path.exists(name) and "/" not in name:  # a typo of a built-in name: do not go to the hub for it
        close = difflib.get_close_matches(name, REWARD_FUNCS, n=1, cutoff=0.6)
        if close:
            raise ValueError(
                f"unknown reward function {name!r}: did you mean {close[0]!r}? Registered names: "
                f"{', '.join(sorted(REWARD_FUNCS))}"
            )
    if name.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(name)):
        raise ValueError(
            f"reward function {name!r} is neither a registered name ({', '.join(sorted(REWARD_FUNCS))}) nor an "
            "existing model directory"
        )
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(os.path.expanduser(name), num_labels=1)
    except Exception as e:
        raise ValueError(
            f"reward function {name!r} is neither a registered name ({', '.join(sorted(REWARD_FUNCS))}) nor a "
            f"loadable sequence-classification model ({type(e).__name__}: {e})"
        ) from e
    return RewardModelFunction(model, tokenizer or _load_tokenizer(name, model), device)


def _load_tokenizer(name: str, model):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise ValueError(
            f"could not load a tokenizer for reward model {_model_name(model)!r} from {name!r}: pass it in "
            f"reward_processing_classes ({type(e).__name__}: {e})"
        ) from e


def reward_func_name(fn) -> str:
    """The name used in metrics (``rewards/<name>/mean``): a function's __name__, a model's basename."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if isinstance(fn, torch.nn.Module):
        return _model_name(fn)
    return getattr(fn, "__name__", None) or type(fn).__name__


def reward_func_names(funcs: Sequence) -> list[str]:
    """reward_func_name of each, made unique with a suffix (two metrics must not share a name)."""
    names, seen = [], {}
    for f in funcs:
        name = reward_func_name(f)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names


# --------------------------------------------------------------------------------------------------------------
# Scoring


def _noop(*args, **kwargs):
    return None


def score_completions(
    reward_funcs: Sequence[Callable],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: dict[str, list],
    reward_weights: Sequence[float] | None = None,
    *,
    trainer_state: Any = None,
    log_extra: Callable | None = None,
    log_metric: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [N, F] (fp32, NaN where a function returned None) and the weighted total [N] (NaN-aware sum as
    TRL: NaN only where every function returned None). ``completions`` may be plain texts: for chat prompts they
    are passed to the functions as ``[{"role": "assistant", "content": text}]``, as TRL does."""
    funcs = list(reward_funcs)
    n = len(prompts)
    if not funcs:
        raise ValueError("score_completions needs at least one reward function")
    for what, seq in (("completions", completions), ("completion_ids", completion_ids)):
        if len(seq) != n:
            raise ValueError(f"{len(seq)} {what} for {n} prompts: there must be one per completion")
    columns = dict(columns or {})
    for key, values in columns.items():
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"column {key!r} has {got} values for {n} completions: repeat each prompt's value per "
                             "completion")
    weights = torch.tensor([1.0] * len(funcs) if reward_weights is None else list(reward_weights),
                           dtype=torch.float32)
    if weights.numel() != len(funcs):
        raise ValueError(
            f"{weights.numel()} reward_weights for {len(funcs)} reward functions "
            f"({', '.join(reward_func_names(funcs))}): give one weight per function"
        )

    if n and is_conversational(prompts[0]):
        completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]
    kwargs = {k: list(v) for k, v in columns.items() if k not in _NOT_COLUMNS}
    kwargs.update(trainer_state=trainer_state, log_extra=log_extra or _noop, log_metric=log_metric or _noop)
    call = dict(prompts=list(prompts), completions=list(completions), completion_ids=list(completion_ids), **kwargs)

    names = reward_func_names(funcs)
    out = torch.full((n, len(funcs)), float("nan"), dtype=torch.float32)
    pending = []  # (column, name, awaitable): started together after the synchronous ones, as TRL
    try:
        for j, (fn, name) in enumerate(zip(funcs, names)):
            try:
                result = fn(**call)
            except Exception as e:
                raise RewardFunctionError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
            if inspect.isawaitable(result):
                pending.append((j, name, result))
            else:
                out[:, j] = _check_rewards(result, n, name)
    except BaseException:
        for _, _, aw in pending:  # never started: close them so Python does not warn "never awaited"
            if hasattr(aw, "close"):
                aw.close()
        raise

    if pending:
        results = _run_concurrently([aw for _, _, aw in pending])
        for (j, name, _), result in zip(pending, results):
            if isinstance(result, BaseException):
                raise RewardFunctionError(f"reward function {name!r} raised {type(result).__name__}: {result}") from result
            out[:, j] = _check_rewards(result, n, name)

    total64 = (out.double() * weights.double().unsqueeze(0)).nansum(dim=1)
    total = total64.float()
    overflow = torch.isinf(total).nonzero()
    if len(overflow):
        i = int(overflow[0])
        raise ValueError(f"the weighted sum of the rewards of completion {i} is {float(total64[i]):.3g}, beyond "
                         f"float32's range: scale the reward functions or reward_weights down")
    total[torch.isnan(out).all(dim=1)] = float("nan")
    return out, total


def _check_rewards(result, n: int, name: str) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        result = result.detach().cpu().reshape(-1).tolist()
    elif hasattr(result, "tolist") and not isinstance(result, (list, tuple)):  # numpy arrays
        result = result.tolist()
    if not isinstance(result, (list, tuple)):
        raise ValueError(f"reward function {name!r} returned {type(result).__name__}; it must return a list of "
                         f"{n} rewards (float or None)")
    if len(result) != n:
        raise ValueError(f"reward function {name!r} returned {len(result)} rewards for {n} completions; it must "
                         "return exactly one reward per completion")
    values = []
    for i, r in enumerate(result):
        if r is None:
            values.append(float("nan"))
            continue
        if isinstance(r, torch.Tensor) and r.numel() == 1:
            r = r.item()
        elif hasattr(r, "item") and not isinstance(r, (str, bytes)):  # numpy scalars
            r = r.item()
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise ValueError(f"reward function {name!r} returned {r!r} at index {i}; rewards must be numbers or None")
        if not math.isfinite(r) or abs(r) > _MAX_REWARD:
            beyond = f" (beyond float32's range, {_MAX_REWARD:.3g})" if math.isfinite(r) else ""
            raise ValueError(f"reward function {name!r} returned {r} at index {i}{beyond}; rewards must be finite "
                             "numbers (None marks a completion that cannot be scored)")
        values.append(float(r))
    return torch.tensor(values, dtype=torch.float32)


class UnscorableWatch:
    """Counts consecutive generation batches in which no completion could be scored (every reward function
    returned None for every completion): such a batch has no learning signal (reward null, loss 0). Each one is
    reported; `max_steps` of them in a row (None = never) stop training with an UnscorableRewardsError."""

    def __init__(self, max_steps: int | None):
        self.max_steps, self.in_a_row = max_steps, 0

    def update(self, total: torch.Tensor, step: int) -> str | None:
        """`total`: the whole generation batch's rewards (NaN = not scorable). A warning line, or None."""
        if total.numel() == 0 or not bool(torch.isnan(total).all()):
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        if self.max_steps is not None and self.in_a_row >= self.max_steps:
            raise UnscorableRewardsError(
                f"no completion could be scored in {self.in_a_row} consecutive steps (every reward function returned "
                f"None for all of them, up to step {step}): training has no learning signal. Check the reward "
                "functions and the dataset columns they read (max_unscorable_steps sets this limit)")
        limit = f"; training stops after {self.max_steps} in a row" if self.max_steps is not None else ""
        return (f"[grpo] warning: step {step}: none of the {total.numel()} completions could be scored (every reward "
                f"function returned None): no learning signal from this batch ({self.in_a_row} in a row{limit})")


def _run_concurrently(awaitables: list) -> list:
    """Await all of them concurrently; exceptions are returned, not raised, so each can be named."""

    async def gather():
        return await asyncio.gather(*awaitables, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    # Called from inside a running event loop (a notebook): run ours on another thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, gather()).result()


def reward_metrics(rewards_per_func: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """TRL's per-function metrics: ``rewards/<name>/mean`` and ``rewards/<name>/std`` over scorable values."""
    from .advantages import nanstd

    metrics = {}
    for j, name in enumerate(names):
        col = rewards_per_func[:, j].float()
        scored = col[~torch.isnan(col)]
        metrics[f"rewards/{name}/mean"] = scored.mean().item() if scored.numel() else float("nan")
        metrics[f"rewards/{name}/std"] = nanstd(col).item()
    return metrics


def score_rollout(batch, reward_funcs: list, reward_names: list[str], args, info, trainer_state, unscorable,
                  logger, say_prompts_cut: bool) -> tuple[int, bool]:
    """Rewards → advantages of one generation batch (global group statistics, as TRL gathers them) and its rollout
    metrics. Sets batch.advantages (this rank's slice) and batch.num_items_in_batch; writes the metrics to `logger`.
    Returns (prompt + completion tokens of the batch on all ranks, whether the prompts-cut warning was written now:
    it is written at most once per run, when say_prompts_cut)."""
    device = info.device
    step = trainer_state.global_step + 1  # the step this batch trains
    columns = {k: [r[k] for r in batch.rows] for k in batch.rows[0] if k != "prompt"}
    per_func, total = score_completions(reward_funcs, batch.prompts, batch.completions, batch.completion_id_lists,
                                        columns, args.reward_weights, trainer_state=trainer_state)
    per_func_all = distributed.all_gather_tensor(per_func.to(device), info).cpu()
    total_all = distributed.all_gather_tensor(total.to(device), info).cpu()
    warning = unscorable.update(total_all, step)  # raises after max_unscorable_steps in a row
    if warning:
        logger.write(warning)
    advantages, reward_stats = compute_advantages(total_all, args.num_generations, args.scale_rewards)
    batch.advantages = rank_slice(advantages, info.rank, info.world_size).to(device)

    lengths = torch.tensor([len(c) for c in batch.completion_id_lists], dtype=torch.float64, device=device)
    lengths_all = distributed.all_gather_tensor(lengths, info)
    truncated_all = distributed.all_gather_tensor(batch.is_truncated.to(torch.float64), info)
    counts = torch.tensor([float(batch.completion_mask.sum()), float(batch.prompt_mask.sum())],
                          dtype=torch.float64, device=device)
    counts = distributed.all_reduce_sum(counts, info)
    batch.num_items_in_batch = float(counts[0])
    tokens = int(counts[1] + lengths_all.sum())

    logger.add_many({**reward_stats, **reward_metrics(per_func_all, reward_names)})
    logger.add_many({
        "completions/mean_length": lengths_all.mean().item(),
        "completions/min_length": lengths_all.min().item(),
        "completions/max_length": lengths_all.max().item(),
        "completions/clipped_ratio": truncated_all.mean().item(),
    })
    said_cut = False
    if batch.is_prompt_truncated is not None:  # prompts cut to max_prompt_length: counted, and said once
        cut_all = distributed.all_gather_tensor(batch.is_prompt_truncated.to(torch.float64), info)
        logger.add("prompts/truncated_fraction", cut_all.mean().item())
        if cut_all.any() and say_prompts_cut:
            said_cut = True
            logger.write(truncation_warning(step, cut_all, args.max_prompt_length))
    if args.log_completions:
        everything = distributed.all_gather_object((batch.prompts, batch.completions), info)
        prompts = [p for g in everything for p in g[0]]
        completions = [c for g in everything for c in g[1]]
        rewards = {n: per_func_all[:, j].tolist() for j, n in enumerate(reward_names)}
        logger.add_completions(step, prompts, completions, rewards, advantages.tolist())
    return tokens, said_cut
