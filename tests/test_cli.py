"""`grpo train` / `grpo eval` argument handling (no training except one tiny run for `grpo eval`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from grpo import cli
from grpo.config import PRESETS


def test_flags_are_parsed_by_field_type():
    config, run = cli.build_run([
        "--learning_rate", "3e-4", "--bf16", "--max_grad_norm", "none", "--reward_weights", "1,0.5",
        "--report_to=tensorboard", "--num_generations", "4", "--mask_truncated_completions", "false",
        "--reward_funcs", "gsm8k,format", "--model", "tiny", "--max-steps", "3",
    ])
    assert config.learning_rate == 3e-4 and isinstance(config.learning_rate, float)
    assert config.bf16 is True
    assert config.max_grad_norm is None
    assert config.reward_weights == [1.0, 0.5]
    assert config.report_to == "tensorboard"
    assert config.num_generations == 4 and config.mask_truncated_completions is False
    assert config.max_steps == 3  # dashes are accepted for underscores
    assert run["reward_funcs"] == ["gsm8k", "format"] and run["model"] == "tiny"


def test_precedence_preset_then_yaml_then_flags(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: smoke\nlearning_rate: 0.002\nmax_steps: 5\ndataset: toy\nreward_funcs: [toy]\n"
                   "reward_weights: null\n")
    config, run = cli.build_run([str(cfg), "--max_steps", "7"])
    assert run["preset"] == "smoke"
    assert config.max_completion_length == PRESETS["smoke"]["max_completion_length"]  # from the preset
    assert config.learning_rate == 0.002  # from the YAML
    assert config.max_steps == 7  # the flag wins
    assert run["dataset"] == "toy" and run["reward_funcs"] == ["toy"]


def test_default_run_is_the_default_preset():
    config, run = cli.build_run([])
    assert run["preset"] == "default"
    for key, value in PRESETS["default"].items():
        assert getattr(config, key) == value, key


@pytest.mark.parametrize("argv, message", [
    (["--learnig_rate", "1"], "did you mean --learning_rate"),
    (["--num_generation", "4"], "did you mean --num_generations"),
    (["--preset", "smok"], "did you mean 'smoke'"),
    (["--num_generations", "many"], "num_generations"),
    (["a.yaml", "b.yaml"], "at most one"),
])
def test_bad_arguments_name_the_problem(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.build_run(argv)


def test_unknown_yaml_key_is_refused(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lerning_rate: 1.0\n")
    with pytest.raises(SystemExit, match="learning_rate"):
        cli.build_run([str(cfg)])


def test_invalid_combination_is_reported():
    with pytest.raises(SystemExit, match="invalid configuration"):
        cli.build_run(["--num_generations", "3", "--per_device_train_batch_size", "8"])


def test_commands_and_help(capsys):
    assert cli.main([]) == 0
    assert "grpo train" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="did you mean 'train'"):
        cli.main(["trian"])


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "grpo", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "grpo eval" in out.stdout


def test_eval_command_on_a_checkpoint(tmp_path, capsys):
    torch.set_num_threads(1)
    cli.main(["train", "--preset", "smoke", "--model", "tiny", "--dataset", "toy", "--reward_funcs", "toy",
              "--reward_weights", "none", "--max_steps", "1", "--no_eval", "--output_dir", str(tmp_path)])
    assert not (tmp_path / "eval_results.json").read_text().count("accuracy")  # --no_eval: nothing evaluated
    capsys.readouterr()
    metrics = cli.main(["eval", "--model", str(tmp_path / "checkpoint-1"), "--dataset", "toy", "--reward_funcs",
                        "toy", "--eval_max_samples", "5"])
    assert metrics == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval/num_samples"] == 5 and 0.0 <= printed["eval/accuracy"] <= 1.0
    assert "eval/rewards/letter_a_reward/mean" in printed
