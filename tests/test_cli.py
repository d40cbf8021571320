"""`grpo train` / `grpo eval` argument handling (no training except one tiny run for `grpo eval`)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from grpo import cli
from grpo.config import GRPOConfig


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
    assert config.max_completion_length == 8  # from the smoke preset (GRPOConfig alone has 256)
    assert config.learning_rate == 0.002  # from the YAML
    assert config.max_steps == 7  # the flag wins
    assert run["dataset"] == "toy" and run["reward_funcs"] == ["toy"]


def test_default_run_is_the_default_preset():
    """The settings docs/trainer.md gives for the default run: 16 steps of 4 prompts x 8 completions, 40-token
    completions, temperature 0.7, lr 2e-5, dapo, beta 0, on SmolLM2-135M-Instruct and the arithmetic problems."""
    config, run = cli.build_run([])
    assert run["preset"] == "default"
    assert (config.max_steps, config.generation_batch_size, config.num_generations) == (16, 32, 8)
    assert (config.max_completion_length, config.temperature, config.learning_rate) == (40, 0.7, 2e-5)
    assert (config.loss_type, config.beta) == ("dapo", 0.0)
    assert (run["model"], run["dataset"]) == ("smollm2-135m-instruct", "arithmetic")


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


def test_help_and_the_config_do_not_import_torch():
    """`grpo train --help` answers without loading torch, although GRPOConfig takes its loss choices from
    grpo_kernels; the kernel package loads torch only when a torch-backed name is first used."""
    code = (
        "import sys, contextlib, io\n"
        "from grpo import cli\n"
        "from grpo.config import LOSS_TYPES\n"
        "with contextlib.redirect_stdout(io.StringIO()) as help_text:\n"
        "    try:\n"
        "        cli.main(['train', '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert '--loss_type' in help_text.getvalue(), help_text.getvalue()[-300:]\n"
        "import grpo_kernels\n"
        "from grpo_kernels import LOSS_TYPES as KERNEL_LOSS_TYPES\n"
        "print('torch after help:', 'torch' in sys.modules)\n"
        "print('one tuple:', KERNEL_LOSS_TYPES is LOSS_TYPES)\n"
        "grpo_kernels.fused_linear_grpo_loss\n"
        "print('torch after a kernel name:', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["torch after help: False", "one tuple: True",
                                       "torch after a kernel name: True"]


def test_eval_command_on_a_checkpoint(tmp_path, capsys):
    torch.set_num_threads(1)
    cli.main(["train", "--preset", "smoke", "--model", "tiny", "--dataset", "toy", "--reward_funcs", "toy",
              "--reward_weights", "none", "--max_steps", "1", "--no_eval", "--output_dir", str(tmp_path)])
    assert not (tmp_path / "eval_results.json").read_text().count("accuracy")  # --no_eval: nothing evaluated
    capsys.readouterr()
    cli.main(["eval", "--model", str(tmp_path / "checkpoint-1"), "--dataset", "toy", "--reward_funcs", "toy",
              "--eval_max_samples", "5"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval/num_samples"] == 5 and 0.0 <= printed["eval/accuracy"] <= 1.0
    assert "eval/rewards/letter_a_reward/mean" in printed


# ----------------------------------------------------------------------------------------------------------------
# --help, YAML, run options (HfArgumentParser)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_field_with_type_default_and_help(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", flag])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    for name in GRPOConfig.field_names() + [f.name for f in dataclasses.fields(cli.RunOptions)]:
        assert f"--{name} " in text, name
    assert "--learning_rate float AdamW learning rate (default: 2e-05)" in text  # the default preset's value
    assert "--max_grad_norm float | None clip the gradient norm" in text
    assert "--reward_funcs list[str] | None" in text


def test_eval_help_lists_only_the_flags_eval_uses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    listed = {name for name in GRPOConfig.field_names() + [f.name for f in dataclasses.fields(cli.RunOptions)]
              if f"--{name} " in text}
    assert listed == cli.EVAL_FLAGS
    assert "--eval_max_samples int | None" in text and "--learning_rate" not in text and "--lora_r" not in text
    with pytest.raises(SystemExit, match="--learning_rate is a training flag; grpo eval does not use it"):
        cli.main(["eval", "--learning_rate", "1e-5"])


def test_eval_keeps_preset_and_yaml_values_of_fields_it_has_no_flag_for(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 3.0e-5\neval_max_samples: 7\n")  # one file for train and eval
    config, run = cli.build_run([str(cfg)], "eval")
    assert config.learning_rate == 3e-5 and config.eval_max_samples == 7
    assert config.max_completion_length == 40  # the default preset's, as docs/trainer.md gives it (GRPOConfig alone has 256)


def test_help_shows_the_chosen_presets_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "smoke", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max_steps int optimizer steps; > 0 overrides num_train_epochs (default: 30)" in text  # not -1
    assert "--model str | None" in text
    assert "(default: tiny)" in text


def test_every_field_has_help_text():
    for f in dataclasses.fields(GRPOConfig) + dataclasses.fields(cli.RunOptions):
        assert f.metadata.get("help", "").strip(), f.name


def test_yaml_as_in_trl_with_config_flag_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("GRPO_TEST_VAR", raising=False)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: smoke\nlearning_rate: 1e-5\nmax_grad_norm: none\nenv:\n  GRPO_TEST_VAR: 7\n")
    config, run = cli.build_run(["--config", str(cfg), "--seed", "3"])
    assert run["preset"] == "smoke" and run["config"] == str(cfg)
    assert config.learning_rate == 1e-5 and isinstance(config.learning_rate, float)  # YAML reads 1e-5 as a string
    assert config.max_grad_norm is None and config.seed == 3
    import os

    assert os.environ["GRPO_TEST_VAR"] == "7"


def test_values_none_json_and_bare_booleans():
    config, run = cli.build_run(["--model_init_kwargs", '{"dtype": "float32"}', "--max_prompt_length", "none",
                                 "--no_eval", "--shuffle_dataset=false", "--report_to", "tensorboard,none",
                                 "--num_threads", "1"])
    assert config.model_init_kwargs == {"dtype": "float32"} and config.max_prompt_length is None
    assert run["no_eval"] is True and config.shuffle_dataset is False and run["num_threads"] == 1
    assert config.report_to == ["tensorboard", "none"]


@pytest.mark.parametrize("argv, message", [
    (["--learn", "1"], r"unknown flag --learn \(did you mean --learning_rate\?\)"),  # no prefix matching
    (["--lerning_rate", "1"], "did you mean --learning_rate"),  # the "1" is not taken for a CONFIG.yaml
    (["--bf16", "maybe"], "--bf16: cannot read 'maybe' as bool | None"),
    (["--model_init_kwargs", "{oops"], "not valid JSON"),
    (["--preset", "smoke", "--max_steps", "0"], "invalid configuration: max_steps"),
])
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.build_run(argv)


def test_lora_flags_use_trl_model_config_names():
    from grpo.model_config import ModelConfig

    config, run = cli.build_run(["--use_peft", "--lora_r", "8", "--lora_target_modules", "q_proj,v_proj",
                                 "--seed", "5"])
    assert run["model_config"] == ModelConfig(use_peft=True, lora_r=8, lora_target_modules=["q_proj", "v_proj"])
    assert config.seed == 5
    _, run = cli.build_run(["--lora_target_modules", "all-linear"])
    assert run["model_config"].lora_target_modules == ["all-linear"] and not run["model_config"].use_peft


def test_help_lists_lora_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--use_peft" in out and "--lora_r" in out and "LoRA rank" in out and "--fsdp" in out


def test_resuming_a_finished_run_keeps_its_results(tmp_path, capsys):
    torch.set_num_threads(1)
    common = ["--preset", "smoke", "--max_steps", "1", "--eval_max_samples", "2", "--output_dir", str(tmp_path)]
    first = cli.cmd_train(common)
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    again = cli.cmd_train(common + ["--resume_from_checkpoint", "latest"])
    kept = json.loads((tmp_path / "eval_results.json").read_text())
    assert kept["before"] == saved["before"] == first["before"]
    assert kept["after"] == saved["after"] and kept["steps"] == saved["steps"] == 1
    assert kept["wall_seconds"] > saved["wall_seconds"]  # both sessions
    assert again["before"] == first["before"]
    out = capsys.readouterr().out
    assert out.count("after training") == 2 and "torch threads:" in out
