"""Command line: `grpo train` and `grpo eval` (also `python -m grpo ...`).

    grpo train                                   the default run (SmolLM2-135M-Instruct, arithmetic problems)
    grpo train --preset smoke --output_dir DIR   a tiny model on a toy task, seconds on a CPU
    grpo train run.yaml --learning_rate 2e-5 --reward_funcs gsm8k,format
    grpo train --resume_from_checkpoint latest --output_dir runs/default
    grpo eval --model runs/default/checkpoint-16 [--dataset arithmetic] [--eval_max_samples 48]
    grpo train --use_peft --lora_r 16 --lora_alpha 32 --lora_target_modules all-linear     LoRA (TRL's names)
    grpo export --model runs/x/checkpoint-16 --output_dir merged/   merge a LoRA checkpoint into plain weights

`grpo train --help` (or -h) lists every flag with its type, default and meaning: each GRPOConfig field, plus the
run options (--model, --dataset, --eval_dataset, --reward_funcs, --instruction, --preset,
--resume_from_checkpoint, --no_eval, --config). `grpo eval` takes the same flags; its --model defaults to the
preset's model. Precedence: preset < YAML file (first argument or --config) < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import os
import re
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from .config import PRESET_RUNS, PRESETS, GRPOConfig
from .logger import format_seconds
from .model_config import ModelConfig

USAGE = __doc__


# ----------------------------------------------------------------------------------------------------------------
# A toy task whose reward a tiny random model can raise within a few steps (smoke runs and tests).
# ----------------------------------------------------------------------------------------------------------------
def toy_rows(n: int = 64) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Write the letter a as often as you can ({i})."}]}
            for i in range(n)]


def letter_a_reward(completions, **kwargs) -> list[float]:
    """Fraction of the completion's characters that are 'a'."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(sum(ch == "a" for ch in text) / max(1, len(text)))
    return out


CLI_DATASETS = {"toy": toy_rows}
CLI_REWARDS = {"toy": letter_a_reward}


# ----------------------------------------------------------------------------------------------------------------
# Parsing: transformers' HfArgumentParser over the dataclasses below (TRL's CLI is built the same way)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RunOptions:
    """What a run trains on (everything that is not a GRPOConfig field)."""

    _argument_group_name = "run options"

    model: str | None = field(default=None, metadata={
        "help": "model name or path: smollm2-135m-instruct, tiny, a local folder or checkpoint, a cached Hub id"})
    dataset: str | None = field(default=None, metadata={
        "help": "training prompts: arithmetic[:N], a .jsonl/.json/.csv/.parquet file or folder, a cached Hub name"})
    eval_dataset: str | None = field(default=None, metadata={
        "help": "held-out problems; None = the test split of --dataset"})
    reward_funcs: list[str] | None = field(default=None, metadata={
        "help": "reward functions, comma-separated: gsm8k, format, math, toy, or a reward-model path"})
    instruction: str | None = field(default=None, metadata={"help": "text appended to each question"})
    preset: str = field(default="default", metadata={"help": "starting values: " + " | ".join(PRESETS)})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "continue from a checkpoint folder, or 'latest' in --output_dir"})
    no_eval: bool = field(default=False, metadata={"help": "skip the held-out evaluation before and after training"})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads; None = the cores not busy with other processes (see the start-up line)"})
    config: str | None = field(default=None, metadata={
        "help": "YAML file of flag values (also accepted as the first positional argument)"})


# One dataclass per group of flags; adding one (e.g. a LoRA ModelConfig) is one entry here.
ARG_DATACLASSES = (GRPOConfig, RunOptions, ModelConfig)

_DESCRIPTIONS = {
    "train": "GRPO-train a causal LM. Without arguments: the default run (SmolLM2-135M-Instruct on arithmetic "
             "word problems).",
    "eval": "Held-out accuracy of a model or checkpoint (a checkpoint's generation settings are reused).",
}
_EPILOG = ("Defaults shown are the preset's (--preset). Precedence: preset < YAML file < flags. Values: 'none' = "
           "None, true/false, comma-separated lists, JSON for dicts; a bare boolean flag means true.")


def _type_name(annotation) -> str:
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return " | ".join("None" if k is type(None) else getattr(k, "__name__", str(k)).replace("typing.", "")
                      if typing.get_origin(k) is None else str(k) for k in kinds)


def coerce(annotation, text: str):
    """One command-line string as a value of ``annotation`` (X | None, bool, int, float, str, list[X], dict)."""
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    low = text.strip().lower()
    if low in ("none", "null") and type(None) in kinds:
        return None
    for kind in kinds:
        origin = typing.get_origin(kind) or kind
        if origin is bool and low in ("true", "1", "yes", "false", "0", "no"):
            return low in ("true", "1", "yes")
        if origin in (int, float):
            try:
                return origin(text)
            except ValueError:
                continue
        if origin in (list, dict) and text.strip()[:1] in ("[", "{"):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON: {e}") from None
    for kind in kinds:
        if typing.get_origin(kind) is list and ("," in text or str not in kinds):  # a comma list of the items
            (item,) = typing.get_args(kind) or (str,)
            try:
                return [item(x.strip()) for x in text.split(",") if x.strip()]
            except ValueError:
                pass
    if str in kinds:
        return text
    raise argparse.ArgumentTypeError(f"cannot read {text!r} as {_type_name(annotation)}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """One line per flag in --help: the underscore spelling only (the dashed alias works but is not listed)."""

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return f"{action.option_strings[0]} {self._metavar_formatter(action, action.dest)(1)[0]}"


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser with one flag per dataclass field whose values may also be None, comma lists or JSON
    (HfArgumentParser alone refuses `--max_grad_norm none`, `--reward_weights 1,0` and dict fields), errors that
    name the flag and suggest the closest one, and no prefix matching (`--learn` is an error, not learning_rate)."""

    def __init__(self, command: str, dataclass_types=ARG_DATACLASSES):
        super().__init__(dataclass_types, prog=f"grpo {command}",
                         usage=f"grpo {command} [CONFIG.yaml] [--flag value ...]", description=_DESCRIPTIONS.get(command), epilog=_EPILOG, allow_abbrev=False,
                         formatter_class=_HelpFormatter)
        self.command = command
        self.add_argument("config", nargs="?", default=argparse.SUPPRESS, metavar="CONFIG.yaml",
                          help="YAML file of flag values (the same as --config)")

    def _add_dataclass_arguments(self, dtype):
        group = self.add_argument_group(getattr(dtype, "_argument_group_name", dtype.__name__))
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if not f.init:
                continue
            annotation = hints[f.name]
            kinds = set(typing.get_args(annotation)) or {annotation}
            parse = functools.partial(coerce, annotation)
            parse.__name__ = _type_name(annotation)  # argparse names it in "invalid <type> value"
            default = f.default if f.default is not dataclasses.MISSING else None
            options = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            extra = {"nargs": "?", "const": True} if bool in kinds else {}
            group.add_argument(*options, dest=f.name, type=parse, default=default, metavar=_type_name(annotation),
                               help=f.metadata.get("help", " "), **extra)

    def error(self, message: str):
        unknown = re.search(r"unrecognized arguments: (.*)", message)
        if unknown:
            message = self._unknown(unknown.group(1).split())
        raise SystemExit(f"{self.prog}: {message}\n(`{self.prog} --help` lists every flag)")

    def _unknown(self, leftovers: list[str]) -> str:
        flags = [t for t in leftovers if t.startswith("-")]
        if not flags:
            return f"expected at most one CONFIG.yaml, got extra arguments {leftovers}"
        name = flags[0].lstrip("-").partition("=")[0].replace("-", "_")
        return f"unknown flag {flags[0].partition('=')[0]}{_closest(name, self.dests())}"

    def dests(self) -> list[str]:
        return [a.dest for a in self._actions if a.option_strings and a.dest != "help"]

    def given(self, argv: list[str]) -> set[str]:
        """Destinations of the flags that argv sets explicitly."""
        out = set()
        for tok in argv:
            action = self._option_string_actions.get(tok.partition("=")[0])
            if action is not None:
                out.add(action.dest)
        return out


def _closest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean --{close[0]}?)" if close else ""


def _load_yaml(path: str, known: list[str]) -> dict:
    """A YAML mapping of flag values, as TRL's `--config` (an `env:` mapping sets environment variables)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"grpo: config file {path} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"grpo: {path} must hold a mapping of flag names to values, got {type(data).__name__}")
    env = data.pop("env", None) or {}
    if not isinstance(env, dict):
        raise SystemExit(f"grpo: 'env' in {path} must be a mapping of environment variables")
    for key in data:
        if key not in known or key == "config":
            raise SystemExit(f"grpo: unknown key {key!r} in {path}{_closest(str(key), known)}")
    os.environ.update({str(k): str(v) for k, v in env.items()})
    return data


def parse_args(argv: list[str], command: str = "train", extra_defaults: dict | None = None,
               dataclass_types=ARG_DATACLASSES) -> tuple:
    """One instance per dataclass_types entry, from preset < extra_defaults < YAML < flags."""
    parser = ArgumentParser(command, dataclass_types)
    asks_help = any(a in ("-h", "--help") for a in argv)
    # Pass 1 finds the preset and the YAML file, which set the defaults of pass 2 (and of --help).
    first, leftovers = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    if leftovers:  # before reading a file: `--lerning_rate 1` must not take "1" for the CONFIG.yaml
        parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
    from_yaml = _load_yaml(first.config, parser.dests()) if first.config else {}
    preset = first.preset if "preset" in parser.given(argv) else from_yaml.get("preset", "default")
    if preset not in PRESETS:
        close = difflib.get_close_matches(str(preset), PRESETS, n=1)
        raise SystemExit(f"grpo: unknown preset {preset!r}; valid: {sorted(PRESETS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    parser.set_defaults(**PRESETS[preset], **PRESET_RUNS.get(preset, {}))
    parser.set_defaults(**{**(extra_defaults or {}), **from_yaml, "preset": preset})
    if asks_help:
        parser.print_help()
        raise SystemExit(0)
    try:
        *instances, leftovers = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True,
                                                                   look_for_args_file=False)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"grpo: invalid configuration: {e}") from None
    if leftovers:
        parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
    return tuple(instances)


def build_run(argv: list[str], command: str = "train", extra_defaults: dict | None = None) -> tuple[GRPOConfig, dict]:
    """(GRPOConfig, run options as a dict with the LoRA ModelConfig under "model_config") from preset < YAML <
    flags."""
    config, run_options, model_config = parse_args(argv, command, extra_defaults)
    return config, {**dataclasses.asdict(run_options), "model_config": model_config}


# ----------------------------------------------------------------------------------------------------------------
# Data and rewards for a run
# ----------------------------------------------------------------------------------------------------------------
def load_rows(spec: str, split: str, config: GRPOConfig, instruction: str | None = None) -> list[dict]:
    from . import data

    if spec in CLI_DATASETS:
        return CLI_DATASETS[spec](64 if split == "train" else 16)
    rows = data.load_dataset(spec, split)
    if "prompt" not in rows[0] or config.system_prompt:
        rows = data.to_prompt_rows(rows, system_prompt=config.system_prompt, conversational=True,
                                   instruction=instruction)
    return rows


def eval_rows_for(run: dict, config: GRPOConfig) -> list[dict] | None:
    spec = run.get("eval_dataset") or run.get("dataset")
    if not spec:
        return None
    try:
        return load_rows(spec, "test", config, run.get("instruction"))
    except (FileNotFoundError, ValueError) as e:
        if run.get("eval_dataset"):
            raise
        print(f"[grpo] no held-out split for {spec!r} ({e}); skipping evaluation", flush=True)
        return None


def reward_funcs_for(run: dict) -> list:
    names = run.get("reward_funcs") or ["gsm8k", "format"]
    return [CLI_REWARDS.get(n, n) if isinstance(n, str) else n for n in names]


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------
def cmd_train(argv: list[str]) -> dict:
    from . import run_lock

    start = time.perf_counter()
    config, run = build_run(argv)
    # One run per output_dir, checked before anything is loaded (see grpo/run_lock.py).
    with run_lock.holding(config.output_dir, bool(run.get("resume_from_checkpoint")), config.overwrite_output_dir):
        return _train(config, run, start)


def _train(config: GRPOConfig, run: dict, start: float) -> dict:
    from .trainer import GRPOTrainer

    threads = set_num_threads(run.get("num_threads"))
    train_rows = load_rows(run.get("dataset") or "arithmetic", "train", config, run.get("instruction"))
    eval_rows = None if run["no_eval"] else eval_rows_for(run, config)
    from .model_config import get_peft_config

    trainer = GRPOTrainer(run.get("model") or "smollm2-135m-instruct", reward_funcs_for(run), args=config,
                          train_dataset=train_rows, eval_dataset=eval_rows,
                          peft_config=get_peft_config(run["model_config"]))
    main = trainer.dist.is_main
    if main:
        print(f"[grpo] preset={run['preset']} model={run.get('model')} dataset={run.get('dataset')} "
              f"rewards={trainer.reward_names} steps={trainer.max_steps} output_dir={config.output_dir} "
              f"(setup {time.perf_counter() - start:.1f}s)\n[grpo] {threads}", flush=True)

    # A resumed run keeps what the earlier sessions measured: the "before" evaluation and their wall time.
    results_file = Path(config.output_dir) / "eval_results.json"
    earlier = {}
    if run.get("resume_from_checkpoint") and results_file.is_file():
        earlier = json.loads(results_file.read_text())
    results = {k: earlier[k] for k in ("before",) if k in earlier}
    if eval_rows and not run.get("resume_from_checkpoint"):
        results["before"] = trainer.evaluate()
        if main:
            print(f"[grpo] before training: {_eval_line(results['before'])}", flush=True)
    trainer.train(resume_from_checkpoint=run.get("resume_from_checkpoint"))
    if eval_rows and not trainer.stopped_by_signal:  # stopped early: the resumed run evaluates at its end
        if trainer.last_eval is not None and trainer.last_eval[0] == trainer.step:  # eval_steps just did it
            results["after"] = trainer.last_eval[1]  # and printed it
        elif "after" in earlier and earlier.get("steps") == trainer.step:  # a finished run, resumed: no new step
            results["after"] = earlier["after"]
            if main:
                print(f"[grpo] after training (step {trainer.step}, from {results_file}): "
                      f"{_eval_line(results['after'])}", flush=True)
        else:
            results["after"] = trainer.evaluate()
            if main:
                print(f"[grpo] after training:  {_eval_line(results['after'])}", flush=True)
        trainer.plot_reward_curve()  # now with the final accuracy
    session = time.perf_counter() - start
    results["steps"] = trainer.step
    results["wall_seconds"] = earlier.get("wall_seconds", 0.0) + session  # all sessions of this run
    if main:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1))
        print(f"[grpo] done in {format_seconds(session)}; metrics in {config.output_dir}/metrics.jsonl, "
              f"curve in {config.output_dir}/reward_curve.png, results in {results_file}", flush=True)
    from . import distributed

    distributed.destroy(trainer.dist)
    return results


def set_num_threads(requested: int | None = None) -> str:
    """Pick torch's CPU thread count and say why (printed at start).

    torch starts one intra-op thread per core it may use. On a machine where other processes keep cores busy, its
    threads wait for each other at every parallel region (measured on the 2-core machine at load average 9: a
    512x512 fp32 matmul took 4x longer with 2 threads than with 1). Default: the cores this process may use, minus
    the 1-minute load average from other processes (at least 1), split over the processes of a torchrun node.
    OMP_NUM_THREADS, when set, or --num_threads wins."""
    import torch

    if requested:
        torch.set_num_threads(requested)
        return f"torch threads: {torch.get_num_threads()} (--num_threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    n = max(1, min(torch.get_num_threads(), round(cores - load) // per_node))
    torch.set_num_threads(n)
    return (f"torch threads: {n} ({cores} cores available, 1-minute load average {load:.1f}"
            + (f", {per_node} processes on this node" if per_node > 1 else "") + "; --num_threads N to override)")


def cmd_eval(argv: list[str]) -> dict:
    from . import distributed, model as model_lib, scoring
    from .evaluate import evaluate

    config, run = build_run(argv, "eval")
    state_file = Path(str(run["model"])) / "trainer_state.json"
    if state_file.is_file():  # a checkpoint: its generation settings, under the YAML file and the flags
        base = json.loads(state_file.read_text())["config"]
        keep = {k: base[k] for k in ("max_completion_length", "max_prompt_length", "system_prompt", "reward_weights",
                                     "eval_temperature", "eval_max_samples") if k in base}
        config, run = build_run(argv, "eval", extra_defaults=keep)
    rows = eval_rows_for({**run, "eval_dataset": run.get("eval_dataset") or run.get("dataset") or "arithmetic"},
                         config)
    info = distributed.init_distributed()
    threads = set_num_threads(run.get("num_threads"))
    if info.is_main:  # stdout carries only the JSON result
        print(f"[grpo] {threads}", file=sys.stderr, flush=True)
    model, tokenizer = model_lib.load_model(str(run["model"]), attn_implementation=config.attn_implementation)
    model.to(info.device)
    funcs = scoring.resolve_reward_funcs(reward_funcs_for(run), device=info.device)
    if config.reward_weights is not None and len(config.reward_weights) != len(funcs):
        config = config.replace(reward_weights=None)
    metrics = evaluate(model, tokenizer, rows, funcs, config.reward_weights, config, info,
                       batch_size=max(config.generation_batch_size, 16))
    if info.is_main:
        print(json.dumps(metrics, indent=1))
    distributed.destroy(info)
    return metrics


def cmd_export(argv: list[str]) -> str:
    """Merge a LoRA checkpoint's adapter into its base model and save a plain save_pretrained folder."""
    from . import lora

    parser = argparse.ArgumentParser(prog="grpo export", description=cmd_export.__doc__)
    parser.add_argument("--model", required=True, help="a LoRA checkpoint folder (adapter + trainer state)")
    parser.add_argument("--output_dir", required=True, help="where the merged model is saved")
    args = parser.parse_args(argv)
    out = lora.export_merged(args.model, args.output_dir)
    print(f"[grpo] merged adapter of {args.model} into {out}", flush=True)
    return str(out)


def _eval_line(m: dict) -> str:
    rewards = " ".join(f"{k.split('/')[-2]}={v:.3f}" for k, v in m.items() if k.startswith("eval/rewards/"))
    return (f"accuracy={m['eval/accuracy']:.3f} on {int(m['eval/num_samples'])} held-out problems "
            f"(mean rewards: {rewards}; mean length {m['eval/completions/mean_length']:.1f} tokens)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    from .errors import UserError

    try:
        if command == "train":
            cmd_train(rest)
        elif command == "eval":
            cmd_eval(rest)
        elif command == "export":
            cmd_export(rest)
        else:
            close = difflib.get_close_matches(command, ["train", "eval", "export"], n=1)
            raise SystemExit(f"grpo: unknown command {command!r}; use 'train', 'eval' or 'export'"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
    except UserError as e:  # one line, no traceback (exit status 1): a checkpoint, the output dir, the rewards
        raise SystemExit("grpo: " + " ".join(str(e).splitlines())) from None
    except KeyboardInterrupt as e:  # a second SIGINT during training (see grpo/signals.py), or one outside it
        print(f"grpo: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
