"""A single data file without --eval_dataset: a fixed, seeded slice is held out of training and evaluated; the
training rows are never called held-out."""

from __future__ import annotations

import json

import torch

from grpo import cli
from grpo.config import GRPOConfig


def _rows(n):
    return [{"prompt": f"Write the letter a, please ({i})."} for i in range(n)]


def test_a_single_file_has_no_held_out_split_but_bundled_data_and_split_files_do(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("{}\n")
    splits = tmp_path / "s.json"
    splits.write_text(json.dumps({"train": [{"prompt": "a"}], "test": [{"prompt": "b"}]}))
    plain = tmp_path / "p.json"
    plain.write_text(json.dumps([{"prompt": "a"}]))
    assert not cli.holds_split(str(jsonl), "test") and not cli.holds_split(str(plain), "test")
    assert cli.holds_split(str(splits), "test") and cli.holds_split("arithmetic", "test")
    assert cli.holds_split(str(tmp_path), "test")  # a folder: its test file, or "no held-out split" later


def test_hold_out_is_seeded_disjoint_and_sized():
    rows = _rows(200)
    config = GRPOConfig(eval_max_samples=16, seed=3)
    train, held, line = cli.hold_out(rows, "d.jsonl", config)
    assert len(held) == 16 and len(train) == 184
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    assert cli.hold_out(rows, "d.jsonl", config)[1] == held  # the same slice every time for a seed
    assert cli.hold_out(rows, "d.jsonl", GRPOConfig(eval_max_samples=16, seed=4))[1] != held
    assert line == ("[grpo] d.jsonl has no held-out split: holding out 16 of its 200 rows (seed 3) for evaluation "
                    "and training on the other 184 (--eval_dataset to choose them)")
    assert len(cli.hold_out(rows[:50], "d.jsonl", config)[1]) == 5  # at most a tenth of the rows


def test_too_few_rows_skip_evaluation_with_a_notice():
    train, held, line = cli.hold_out(_rows(9), "d.jsonl", GRPOConfig())
    assert held is None and len(train) == 9
    assert line.startswith("[grpo] d.jsonl has 9 rows and no held-out split: skipping evaluation")


def test_train_on_a_file_evaluates_only_rows_it_does_not_train_on(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _rows(40)))
    torch.set_num_threads(1)
    results = cli.cmd_train(["--preset", "smoke", "--dataset", str(data), "--max_steps", "1", "--num_threads", "1",
                             "--output_dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "holding out 4 of its 40 rows (seed 42) for evaluation and training on the other 36" in out
    assert results["before"]["eval/num_samples"] == 4.0 and results["after"]["eval/num_samples"] == 4.0
