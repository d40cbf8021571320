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
from .errors import RewardFunctionError, UserError
from .logger import format_seconds
from .model_config import ModelConfig
from .rewards import REWARD_FUNCS
from .threads import set_num_threads

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
        "help": f"reward functions, comma-separated: {', '.join([*REWARD_FUNCS, *CLI_REWARDS])}, "
                "or a reward-model path"})
    instruction: str | None = field(default=None, metadata={"help": "text appended to each question"})
    preset: str = field(default="default", metadata={"help": "starting values: " + " | ".join(PRESETS)})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "continue from a checkpoint folder, or 'latest' in --output_dir"})
    no_eval: bool = field(default=False, metadata={"help": "skip the held-out evaluation before and after training"})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads; None = the cores not busy with other processes (see the start-up line)"})
    config: str | None = field(default=None, metadata={
        "help": "YAML file of flag values (also accepted as the first positional argument)"})
    debug: bool = field(default=False, metadata={
        "help": "show the Python traceback of a user error (a missing file, a bad flag) instead of one line"})


# One dataclass per group of flags; adding one (e.g. a LoRA ModelConfig) is one entry here.
ARG_DATACLASSES = (GRPOConfig, RunOptions, ModelConfig)

# The flags `grpo eval` reads (model, data, rewards, sampling, evaluation size, threads); the others, the
# optimizer's included, are not flags of eval. A YAML file may still hold them (one file serves train and eval).
EVAL_FLAGS = frozenset({
    "model", "dataset", "eval_dataset", "reward_funcs", "reward_weights", "instruction", "system_prompt", "preset",
    "config", "num_threads", "debug", "eval_max_samples", "eval_temperature", "max_prompt_length",
    "max_completion_length", "top_p", "top_k", "min_p", "repetition_penalty",
    "generation_batch_size", "attn_implementation", "seed",
})

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
        self.command = command  # read by _add_dataclass_arguments, which the base __init__ calls
        super().__init__(dataclass_types, prog=f"grpo {command}",
                         usage=f"grpo {command} [CONFIG.yaml] [--flag value ...]", description=_DESCRIPTIONS.get(command), epilog=_EPILOG, allow_abbrev=False,
                         formatter_class=_HelpFormatter)
        self.add_argument("config", nargs="?", default=argparse.SUPPRESS, metavar="CONFIG.yaml",
                          help="YAML file of flag values (the same as --config)")

    def _add_dataclass_arguments(self, dtype):
        group = self.add_argument_group(getattr(dtype, "_argument_group_name", dtype.__name__))
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if not f.init:
                continue
            if self.command == "eval" and f.name not in EVAL_FLAGS:  # not a flag: its preset / YAML value stays
                factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
                self.set_defaults(**{f.name: factory() if factory else
                                     (f.default if f.default is not dataclasses.MISSING else None)})
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
        raise SystemExit(f"{self.prog}: {message}; `{self.prog} --help` lists every flag")

    def _unknown(self, leftovers: list[str]) -> str:
        flags = [t for t in leftovers if t.startswith("-")]
        if not flags:
            return f"expected at most one CONFIG.yaml, got extra arguments {leftovers}"
        name = flags[0].lstrip("-").partition("=")[0].replace("-", "_")
        training_flags = GRPOConfig.field_names() + [f.name for f in dataclasses.fields(RunOptions)]
        if self.command == "eval" and name in training_flags:
            return f"{flags[0].partition('=')[0]} is a training flag; grpo eval does not use it"
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
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SystemExit(f"grpo: {where}: not valid YAML: {problem}") from None
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
    yaml_keys = parser.dests() if command != "eval" else ArgumentParser("train", dataclass_types).dests()
    from_yaml = _load_yaml(first.config, yaml_keys) if first.config else {}
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
def load_rows(spec: str, split: str, config: GRPOConfig, instruction: str | None = None,
              flag: str = "--dataset") -> list[dict]:
    """Prompt rows of `spec`; a mistake in the data (a missing file, a row without a prompt) is a UserError that
    names `flag`."""
    from . import data

    if spec in CLI_DATASETS:
        return CLI_DATASETS[spec](64 if split == "train" else 16)
    try:
        rows = data.load_dataset(spec, split)
        if "prompt" not in rows[0] or config.system_prompt:
            rows = data.to_prompt_rows(rows, system_prompt=config.system_prompt, conversational=True,
                                       instruction=instruction)
        missing = next((i for i, row in enumerate(rows) if "prompt" not in row), None)
        if missing is not None:
            raise ValueError(f"row {missing + 1} has no 'prompt' column (its columns: {sorted(rows[missing])}); "
                             "give every row a prompt, or question + answer columns")
    except (FileNotFoundError, ValueError) as e:  # the data module's messages say what is wrong, and where
        if isinstance(e, FileNotFoundError) and not os.path.exists(os.path.expanduser(spec)):
            raise UserError(f"{flag} {spec}: no such file or folder (give a .jsonl, .json, .csv or .parquet file, "
                            "a folder of them, or 'arithmetic')") from e
        raise UserError(f"{flag} {spec}: {e}") from e
    return rows


def holds_split(spec: str, split: str) -> bool:
    """Whether `spec` has its own `split` (the bundled problems, a folder with such files, a JSON dict of splits,
    a Hub dataset); a single .jsonl/.csv/.parquet file or JSON list is one set of rows and has none."""
    path = Path(spec).expanduser()
    if not path.is_file():
        return True
    if path.suffix.lower() != ".json":
        return False
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and isinstance(content.get(split), list)


def eval_rows_for(run: dict, config: GRPOConfig) -> list[dict] | None:
    spec = run.get("eval_dataset") or run.get("dataset")
    if not spec:
        return None
    if run.get("eval_dataset"):
        return load_rows(spec, "test", config, run.get("instruction"), flag="--eval_dataset")
    try:
        return load_rows(spec, "test", config, run.get("instruction"))
    except UserError as e:
        print(f"[grpo] no held-out split for {spec!r} ({e}); skipping evaluation", flush=True)
        return None


EVAL_HOLDOUT_FRACTION = 0.1  # of a single data file's rows, at most eval_max_samples (48 without it)


def hold_out(train_rows: list[dict], spec: str, config: GRPOConfig) -> tuple[list[dict], list[dict] | None, str]:
    """A single data file without --eval_dataset: a fixed seeded slice of its rows becomes the held-out set and
    leaves training (never evaluate on training rows). Returns (train rows, held-out rows or None, the line to
    print)."""
    from . import data

    k = min(config.eval_max_samples or 48, int(len(train_rows) * EVAL_HOLDOUT_FRACTION))
    if k < 1:
        return train_rows, None, (f"[grpo] {spec} has {len(train_rows)} rows and no held-out split: skipping "
                                  "evaluation (pass --eval_dataset, or give it 10 rows or more)")
    train, held = data.split_train_eval(train_rows, k, seed=config.seed)
    return train, held, (f"[grpo] {spec} has no held-out split: holding out {k} of its {len(train_rows)} rows "
                         f"(seed {config.seed}) for evaluation and training on the other {len(train)} "
                         "(--eval_dataset to choose them)")


def check_output_dir(path: str) -> None:
    """Refuse an output folder that cannot be created or written, before anything slow starts."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"--output_dir {path}: cannot write there ({e.strerror or e}); choose a folder you can "
                        "write to") from e


def check_run(run: dict, config: GRPOConfig, command: str = "train") -> None:
    """The cheap checks of a run's flags, before any model loads: the model exists, the reward names are known,
    the output folder is writable, a checkpoint to resume exists."""
    from . import checkpoint, model as model_lib, scoring

    model = run.get("model") or model_lib.SMOLLM2
    try:
        model_lib.model_kind(str(model))
    except FileNotFoundError as e:
        raise UserError(f"--model: {e}") from e
    for name in run.get("reward_funcs") or []:
        if isinstance(name, str) and name not in CLI_REWARDS and name not in scoring.REWARD_FUNCS \
                and "/" not in name and not os.path.exists(os.path.expanduser(name)):
            known = sorted({*CLI_REWARDS, *scoring.REWARD_FUNCS})
            raise UserError(f"--reward_funcs: unknown reward function {name!r}{_closest_value(name, known)}; "
                            f"known: {', '.join(known)}, or a reward-model folder")
    if command != "train":
        return
    check_output_dir(config.output_dir)
    spec = run.get("resume_from_checkpoint")
    if spec:
        try:
            checkpoint.resolve_checkpoint(spec, config.output_dir)
        except FileNotFoundError as e:
            hint = ("start without --resume_from_checkpoint, or pass the --output_dir of the run to continue"
                    if str(spec) == "latest" else "pass a checkpoint-N folder, or 'latest'")
            raise UserError(f"--resume_from_checkpoint {spec}: {e}; {hint}") from e


def _closest_value(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
    check_run(run, config)
    # One run per output_dir, checked before anything is loaded (see grpo/run_lock.py).
    with run_lock.holding(config.output_dir, bool(run.get("resume_from_checkpoint")), config.overwrite_output_dir):
        return _train(config, run, start)


def _train(config: GRPOConfig, run: dict, start: float) -> dict:
    from .trainer import GRPOTrainer

    threads = set_num_threads(run.get("num_threads"))
    dataset = run.get("dataset") or "arithmetic"
    train_rows = load_rows(dataset, "train", config, run.get("instruction"))
    if run["no_eval"]:
        eval_rows = None
    elif not run.get("eval_dataset") and not holds_split(dataset, "test"):
        train_rows, eval_rows, notice = hold_out(train_rows, dataset, config)
        print(notice, flush=True)
    else:
        eval_rows = eval_rows_for(run, config)
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

    distributed.destroy(trainer.dist, wait=True)
    return results


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
    check_run(run, config, "eval")
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
    distributed.destroy(info, wait=True)
    return metrics


def export_merged(checkpoint_dir, output_dir) -> Path:
    """Merge a LoRA checkpoint's adapter into its base weights and save a plain `save_pretrained` folder. It lives
    here, not in grpo.lora, because it loads the model: grpo.model imports grpo.lora, so the reverse would be a cycle."""
    from .lora import ADAPTER_CONFIG, is_adapter_dir
    from .model import load_model
    from .permissions import honour_umask

    if not is_adapter_dir(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir} holds no {ADAPTER_CONFIG}: nothing to merge")
    model, tokenizer = load_model(str(checkpoint_dir))
    merged = model.merge_and_unload()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for weights in out.glob("*.safetensors"):  # safetensors writes 0600; the rest of `out` may not be ours
        honour_umask(weights)
    return out


def cmd_export(argv: list[str]) -> str:
    """Merge a LoRA checkpoint's adapter into its base model and save a plain save_pretrained folder."""
    parser = argparse.ArgumentParser(prog="grpo export", description=cmd_export.__doc__)
    parser.add_argument("--model", required=True, help="a LoRA checkpoint folder (adapter + trainer state)")
    parser.add_argument("--output_dir", required=True, help="where the merged model is saved")
    args = parser.parse_args(argv)
    out = export_merged(args.model, args.output_dir)
    print(f"[grpo] merged adapter of {args.model} into {out}", flush=True)
    return str(out)


def _eval_line(m: dict) -> str:
    rewards = " ".join(f"{k.split('/')[-2]}={v:.3f}" for k, v in m.items() if k.startswith("eval/rewards/"))
    return (f"accuracy={m['eval/accuracy']:.3f} on {int(m['eval/num_samples'])} held-out problems "
            f"(mean rewards: {rewards}; mean length {m['eval/completions/mean_length']:.1f} tokens)")


def main(argv: list[str] | None = None) -> int:
    """Run a command. A UserError (a missing file, a bad flag) prints one line and exits with status 1; other
    exceptions are bugs and keep their traceback. `--debug` shows the traceback of a UserError too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    try:
        return _run_command(argv)
    except UserError as e:
        if _debug_asked(argv):
            raise
        why = " (--debug shows the traceback)" if isinstance(e, RewardFunctionError) else ""  # the user's code
        raise SystemExit("grpo: " + " ".join(str(e).splitlines()) + why) from None


def _debug_asked(argv: list[str]) -> bool:
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        if name != "--debug":
            continue
        if eq:
            return value.lower() in ("true", "1", "yes")
        following = argv[i + 1] if i + 1 < len(argv) else ""
        return following.lower() not in ("false", "0", "no")
    return False


def _run_command(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
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
    except KeyboardInterrupt as e:  # a second SIGINT during training (see grpo/signals.py), or one outside it
        print(f"grpo: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
