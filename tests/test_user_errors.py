"""Careless commands end in one line naming the flag or file, a non-zero exit and no traceback, before any model
loads; `--debug` brings the traceback back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grpo import cli, errors
from grpo import model as model_lib

SMOKE = ["--preset", "smoke", "--num_threads", "1"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a model starts loading: these checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the user error was reported")

    monkeypatch.setattr(model_lib, "load_model", refuse)


def _one_line_exit(argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    message = e.value.code
    assert isinstance(message, str) and message.startswith("grpo: ")  # printed to stderr, exit status 1
    assert "\n" not in message and "Traceback" not in message
    return message


def test_missing_dataset_file(tmp_path, no_model_load):
    missing = tmp_path / "problems.jsonl"
    message = _one_line_exit(["train", *SMOKE, "--dataset", str(missing), "--output_dir", str(tmp_path / "o")])
    assert message.startswith(f"grpo: --dataset {missing}: no such file or folder")


def test_row_without_a_prompt_names_the_row(tmp_path, no_model_load):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [{"prompt": "2+2?"}, {"prompt": "3+3?"}, {"text": "4+4?"}]))
    message = _one_line_exit(["train", *SMOKE, "--dataset", str(data), "--output_dir", str(tmp_path / "o")])
    assert f"--dataset {data}" in message and "row 3 has no 'prompt' column" in message and "'text'" in message


def test_rows_of_an_unknown_format(tmp_path, no_model_load):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "2+2?"}) + "\n")
    message = _one_line_exit(["train", *SMOKE, "--dataset", str(data), "--output_dir", str(tmp_path / "o")])
    assert "cannot tell the dataset's format from its columns ['text']" in message


def test_malformed_yaml_names_file_line_and_column(tmp_path, no_model_load):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: smoke\nlearning_rate: 1e-5\nreward_funcs: [toy\nmax_steps: 2\n")
    message = _one_line_exit(["train", str(cfg)])
    assert message.startswith(f"grpo: {cfg}, line 4, column ") and "not valid YAML" in message


def test_unwritable_output_dir_is_refused_at_start(tmp_path, no_model_load):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = _one_line_exit(["train", *SMOKE, "--output_dir", str(blocker / "run")])
    assert f"--output_dir {blocker / 'run'}: cannot write there" in message


def test_resume_latest_without_a_checkpoint(tmp_path, no_model_load):
    message = _one_line_exit(["train", *SMOKE, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    assert "--resume_from_checkpoint latest" in message and "holds no complete checkpoint" in message


def test_eval_of_a_missing_model(tmp_path, no_model_load):
    message = _one_line_exit(["eval", "--model", str(tmp_path / "runs" / "checkpoint-16")])
    assert "--model: model" in message and "does not exist" in message


def test_unknown_reward_function(tmp_path, no_model_load):
    message = _one_line_exit(["train", *SMOKE, "--reward_funcs", "gsm8", "--output_dir", str(tmp_path)])
    assert "--reward_funcs: unknown reward function 'gsm8' (did you mean 'gsm8k'?)" in message


def test_a_reward_function_that_raises_is_named(tmp_path, monkeypatch):
    def broken_reward(completions, **kwargs):
        return [float(kwargs["answer"][0])] * len(completions)  # the toy rows have no answer column

    monkeypatch.setitem(cli.CLI_REWARDS, "broken", broken_reward)
    argv = ["train", *SMOKE, "--reward_funcs", "broken", "--max_steps", "1", "--no_eval", "--output_dir",
            str(tmp_path)]
    message = _one_line_exit(argv)
    assert "reward function 'broken_reward' raised KeyError: 'answer'" in message
    assert message.endswith("(--debug shows the traceback)")
    with pytest.raises(errors.RewardFunctionError) as e:  # --debug: the exception itself, with its cause
        cli.main(argv + ["--debug"])
    assert isinstance(e.value.__cause__, KeyError)


def test_bugs_keep_their_traceback(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "check_run", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["train", *SMOKE, "--output_dir", str(tmp_path)])


def test_the_shell_sees_one_line_on_stderr_and_status_1(tmp_path):
    missing = tmp_path / "problems.jsonl"
    out = subprocess.run([sys.executable, "-m", "grpo", "train", *SMOKE, "--dataset", str(missing), "--output_dir",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"grpo: --dataset {missing}: no such file or folder (give a .jsonl, .json, "
                                       ".csv or .parquet file, a folder of them, or 'arithmetic')"]
    assert out.stdout == ""
