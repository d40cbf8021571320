"""Command line: `grpo train` and `grpo eval` (also `python -m grpo ...`).

    grpo train                                   the default run (SmolLM2-135M-Instruct, arithmetic problems)
    grpo train --preset smoke --output_dir DIR   a tiny model on a toy task, seconds on a CPU
    grpo train run.yaml --learning_rate 2e-5 --reward_funcs gsm8k,format
    grpo train --resume_from_checkpoint latest --output_dir runs/default
    grpo eval --model runs/default/checkpoint-16 [--dataset arithmetic] [--eval_max_samples 48]
    grpo train --use_peft --lora_r 16 --lora_alpha 32 --lora_target_modules all-linear     LoRA (TRL's names)
    grpo export --model runs/x/checkpoint-16 --output_dir merged/   merge a LoRA checkpoint into plain weights

Any GRPOConfig field is a flag (`--name value` or `--name=value`, a bare `--flag` means true), parsed by the
field's type ("none" → None, "true"/"false", comma lists, JSON). Run-level flags: --model, --dataset,
--eval_dataset, --reward_funcs, --instruction (text after each question), --preset, --resume_from_checkpoint,
--no_eval. Precedence: preset < YAML < flags.
"""

from __future__ import annotations

import difflib
import json
import sys
import time
from pathlib import Path

from .config import PRESET_RUNS, PRESETS, GRPOConfig
from .model_config import ModelConfig

RUN_KEYS = ("model", "dataset", "eval_dataset", "reward_funcs", "preset", "resume_from_checkpoint", "instruction")
BOOL_RUN_KEYS = ("no_eval",)
MODEL_KEYS = tuple(ModelConfig.field_names())  # LoRA flags, TRL's ModelConfig names
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
# Parsing
# ----------------------------------------------------------------------------------------------------------------
def _closest(name: str) -> str:
    known = GRPOConfig.field_names() + list(RUN_KEYS) + list(BOOL_RUN_KEYS) + list(MODEL_KEYS)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean --{close[0]}?)" if close else ""


def parse_flags(argv: list[str]) -> tuple[list[str], dict[str, str | bool]]:
    """Split argv into positionals and {flag: raw string} ({flag: True} for a bare flag)."""
    positionals, flags, i = [], {}, 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            key, eq, value = tok[2:].partition("=")
            key = key.replace("-", "_")
            if not key:
                raise SystemExit(f"grpo: empty flag {tok!r}")
            if (key not in GRPOConfig.field_names() and key not in RUN_KEYS and key not in BOOL_RUN_KEYS
                    and key not in MODEL_KEYS):
                raise SystemExit(f"grpo: unknown flag --{key}{_closest(key)}")
            if not eq:
                if i + 1 < len(argv) and not argv[i + 1].startswith("--") and key not in BOOL_RUN_KEYS:
                    value, i = argv[i + 1], i + 1
                else:
                    value = True
            flags[key] = value
        else:
            positionals.append(tok)
        i += 1
    return positionals, flags


def _load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"grpo: config file {path} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"grpo: {path} must hold a mapping of GRPOConfig fields, got {type(data).__name__}")
    for key in data:
        if (key not in GRPOConfig.field_names() and key not in RUN_KEYS and key not in BOOL_RUN_KEYS
                and key not in MODEL_KEYS):
            raise SystemExit(f"grpo: unknown key {key!r} in {path}{_closest(str(key))}")
    return data


def build_run(argv: list[str]) -> tuple[GRPOConfig, dict]:
    """(GRPOConfig, run options) from preset < YAML < flags."""
    positionals, flags = parse_flags(argv)
    if len(positionals) > 1:
        raise SystemExit(f"grpo: expected at most one CONFIG.yaml, got {positionals}")
    from_yaml = _load_yaml(positionals[0]) if positionals else {}
    preset = flags.get("preset") or from_yaml.get("preset") or "default"
    if preset not in PRESETS:
        close = difflib.get_close_matches(str(preset), PRESETS, n=1)
        raise SystemExit(f"grpo: unknown preset {preset!r}; valid: {sorted(PRESETS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    fields = dict(PRESETS[preset])
    run = {"no_eval": False, **PRESET_RUNS.get(preset, {}), "preset": preset}
    model_flags = {}
    for source in (from_yaml, flags):
        for key, value in source.items():
            if key in MODEL_KEYS:
                model_flags[key] = value
            elif key in RUN_KEYS or key in BOOL_RUN_KEYS:
                run[key] = value
            else:
                try:
                    fields[key] = GRPOConfig.coerce_value(key, value) if isinstance(value, str) else value
                except (TypeError, ValueError) as e:
                    raise SystemExit(f"grpo: --{key}: {e}") from None
    if isinstance(run.get("no_eval"), str):
        run["no_eval"] = run["no_eval"].lower() in ("1", "true", "yes")
    if isinstance(run.get("reward_funcs"), str):
        run["reward_funcs"] = [x.strip() for x in run["reward_funcs"].split(",") if x.strip()]
    try:
        config = GRPOConfig.from_dict(fields)
        run["model_config"] = ModelConfig.from_flags(model_flags)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"grpo: invalid configuration: {e}") from None
    return config, run


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
    from .trainer import GRPOTrainer

    start = time.perf_counter()
    config, run = build_run(argv)
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
              f"(setup {time.perf_counter() - start:.1f}s)", flush=True)

    results = {}
    if eval_rows and not run.get("resume_from_checkpoint"):
        results["before"] = trainer.evaluate()
        if main:
            print(f"[grpo] before training: {_eval_line(results['before'])}", flush=True)
    trainer.train(resume_from_checkpoint=run.get("resume_from_checkpoint"))
    if eval_rows:  # eval_steps may have just evaluated the final model
        done = trainer.last_eval is not None and trainer.last_eval[0] == trainer.step
        results["after"] = trainer.last_eval[1] if done else trainer.evaluate()
        trainer.plot_reward_curve()  # now with the final accuracy
        if main:
            print(f"[grpo] after training:  {_eval_line(results['after'])}", flush=True)
    results["wall_seconds"] = time.perf_counter() - start
    if main:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.output_dir) / "eval_results.json").write_text(json.dumps(results, indent=1))
        print(f"[grpo] done in {results['wall_seconds']:.0f}s; metrics in {config.output_dir}/metrics.jsonl, "
              f"curve in {config.output_dir}/reward_curve.png", flush=True)
    from . import distributed

    distributed.destroy(trainer.dist)
    return results


def cmd_eval(argv: list[str]) -> dict:
    from . import distributed, model as model_lib, scoring
    from .evaluate import evaluate

    _, flags = parse_flags(argv)
    if not flags.get("model"):
        raise SystemExit("grpo eval: --model PATH_OR_CHECKPOINT is required")
    state_file = Path(str(flags["model"])) / "trainer_state.json"
    base = json.loads(state_file.read_text())["config"] if state_file.is_file() else {}
    config, run = build_run(argv)
    if base:  # a checkpoint: its generation settings, unless flags override them
        given = {k for k in flags if k in GRPOConfig.field_names()}
        keep = {k: base[k] for k in ("max_completion_length", "max_prompt_length", "system_prompt", "reward_weights",
                                     "eval_temperature", "eval_max_samples") if k in base and k not in given}
        config = config.replace(**keep)
    rows = eval_rows_for({**run, "eval_dataset": run.get("eval_dataset") or run.get("dataset") or "arithmetic"},
                         config)
    info = distributed.init_distributed()
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

    _, flags = parse_flags(argv)
    if not flags.get("model") or not flags.get("output_dir"):
        raise SystemExit("grpo export: --model LORA_CHECKPOINT and --output_dir DIR are required")
    out = lora.export_merged(str(flags["model"]), str(flags["output_dir"]))
    print(f"[grpo] merged adapter of {flags['model']} into {out}", flush=True)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
