import csv
import json
import re

import pytest

from grpo.data import (
    DEFAULT_REWARDS,
    GSM8K_INSTRUCTION,
    detect_format,
    load_dataset,
    make_arithmetic_problems,
    split_train_eval,
    to_prompt_rows,
)
from grpo.rewards import REWARD_FUNCS, format_reward, gsm8k_reward

ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in all?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"},
    {"question": "Weng earns $12 an hour. Yesterday she did 50 minutes of babysitting. How much did she earn?",
     "answer": "12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10"},
]


def _operands(row):
    a, op, b = re.search(r"(\d+) ([+-]) (\d+) =", row["answer"]).groups()
    return op, int(a), int(b)


def test_arithmetic_problems_are_gsm8k_shaped_and_correct():
    rows = make_arithmetic_problems(200, seed=1)
    assert len(rows) == 200 and detect_format(rows) == "gsm8k"
    for row in rows:
        op, a, b = _operands(row)
        assert 10 <= a <= 99 and 10 <= b <= 99
        gold = a + b if op == "+" else a - b
        assert gold >= 1 and row["answer"].endswith(f"\n#### {gold}")
        assert str(a) in row["question"] and str(b) in row["question"]
    assert len({_operands(r) for r in rows}) == 200  # no repeated problem
    # the gold answers score 1.0 with the built-in rewards
    answers = [r["answer"] for r in rows]
    assert gsm8k_reward(None, answers, answer=answers) == [1.0] * 200
    assert format_reward(None, answers) == [1.0] * 200


def test_arithmetic_wording_varies():
    rows = make_arithmetic_problems(100, seed=0)
    openings = {r["question"].split()[0] for r in rows}
    assert len(openings) >= 8
    assert {_operands(r)[0] for r in rows} == {"+", "-"}


def test_arithmetic_seeded_and_held_out_disjoint():
    assert make_arithmetic_problems(50, seed=3) == make_arithmetic_problems(50, seed=3)
    assert make_arithmetic_problems(50, seed=3) != make_arithmetic_problems(50, seed=4)
    train = {_operands(r) for seed in range(3) for r in make_arithmetic_problems(2000, seed=seed)}
    test = {_operands(r) for seed in range(3) for r in make_arithmetic_problems(500, seed=seed, split="test")}
    assert train and test and not (train & test)
    with pytest.raises(ValueError, match="distinct problems; asked for n=100000"):
        make_arithmetic_problems(100000, seed=0)
    with pytest.raises(ValueError, match="split='dev'"):
        make_arithmetic_problems(5, seed=0, split="dev")


def test_load_arithmetic_spec():
    assert len(load_dataset("arithmetic")) == 2000
    test = load_dataset("arithmetic", split="test")
    assert len(test) == 200
    assert len(load_dataset("arithmetic:16")) == 16
    assert not ({_operands(r) for r in test} & {_operands(r) for r in load_dataset("arithmetic")})
    with pytest.raises(ValueError, match="arithmetic:N"):
        load_dataset("arithmetic:many")


def test_load_local_files(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert load_dataset(str(jsonl)) == ROWS

    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    assert load_dataset(str(tmp_path / "list.json")) == ROWS
    (tmp_path / "splits.json").write_text(json.dumps({"train": ROWS, "test": ROWS[:1]}))
    assert load_dataset(str(tmp_path / "splits.json"), split="test") == ROWS[:1]
    columnar = {"question": [r["question"] for r in ROWS], "answer": [r["answer"] for r in ROWS]}
    (tmp_path / "cols.json").write_text(json.dumps(columnar))
    assert load_dataset(str(tmp_path / "cols.json")) == ROWS

    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer"])
        w.writeheader()
        w.writerows(ROWS)
    assert load_dataset(str(tmp_path / "d.csv")) == ROWS


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_dataset(str(bad))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_dataset(str(tmp_path / "empty.jsonl"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_dataset(str(tmp_path / "x.txt"))


def test_load_directory_with_splits_and_shards(tmp_path):
    d = tmp_path / "gsm8k"
    (d / "main").mkdir(parents=True)
    (d / "main" / "train-00000-of-00002.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (d / "main" / "train-00001-of-00002.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    (d / "main" / "validation.json").write_text(json.dumps(ROWS[:1]))
    assert load_dataset(str(d)) == ROWS  # shards in order
    assert load_dataset(str(d), split="test") == ROWS[:1]  # "validation" serves as the held-out split
    with pytest.raises(FileNotFoundError, match=r"no 'other' split.*train-00000-of-00002.jsonl"):
        load_dataset(str(d), split="other")


def test_parquet_or_clear_error(tmp_path):
    path = tmp_path / "d.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            load_dataset(str(path))
        return
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_dataset(str(path)) == ROWS


def test_hub_name_without_datasets_explains_what_to_do():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"pip install datasets.*local file.*'arithmetic'"):
            load_dataset("openai/gsm8k:main")
    else:
        with pytest.raises(ValueError, match="local cache"):
            load_dataset("no-such-org/no-such-dataset-xyz")


def test_detect_format():
    assert detect_format(ROWS) == "gsm8k"
    assert detect_format([{"problem": "Find x.", "solution": "x = \\boxed{2}"}]) == "math"
    assert detect_format([{"problem": "Find x.", "answer": "2"}]) == "math"
    assert detect_format([{"prompt": "hi", "answer": "2"}]) == "prompt"
    with pytest.raises(ValueError, match=r"\['input', 'output'\].*'question' \+ 'answer'"):
        detect_format([{"input": "a", "output": "b"}])
    assert DEFAULT_REWARDS["gsm8k"] == ["gsm8k", "format"] and set(DEFAULT_REWARDS["math"]) <= set(REWARD_FUNCS)


def test_to_prompt_rows_conversational():
    out = to_prompt_rows(ROWS, system_prompt="You are a careful tutor.")
    assert out[0]["answer"] == ROWS[0]["answer"] and out[0]["question"] == ROWS[0]["question"]  # columns kept
    system, user = out[0]["prompt"]
    assert system == {"role": "system", "content": "You are a careful tutor."}
    assert user["role"] == "user" and user["content"].startswith(ROWS[0]["question"])
    assert user["content"].endswith(GSM8K_INSTRUCTION) and "#### <number>" in GSM8K_INSTRUCTION
    assert "prompt" not in ROWS[0]  # inputs untouched
    no_system = to_prompt_rows(ROWS)
    assert [m["role"] for m in no_system[0]["prompt"]] == ["user"]


def test_to_prompt_rows_plain_and_custom_instruction():
    out = to_prompt_rows(ROWS, conversational=False, instruction="Answer with a number.")
    assert out[1]["prompt"] == ROWS[1]["question"] + "\n\nAnswer with a number."
    assert to_prompt_rows(ROWS, conversational=False, instruction="")[0]["prompt"] == ROWS[0]["question"]
    math_rows = [{"problem": "Compute $1+1$.", "solution": "$\\boxed{2}$", "level": "Level 1"}]
    m = to_prompt_rows(math_rows, conversational=False)[0]
    assert "\\boxed{}" in m["prompt"] and m["solution"] == "$\\boxed{2}$" and m["level"] == "Level 1"


def test_to_prompt_rows_existing_prompts():
    chat = [{"role": "user", "content": "2+2?"}]
    out = to_prompt_rows([{"prompt": chat, "answer": "4"}], system_prompt="Be brief.")
    assert out[0]["prompt"] == [{"role": "system", "content": "Be brief."}] + chat
    out = to_prompt_rows([{"prompt": "2+2?", "answer": "4"}])
    assert out[0]["prompt"] == [{"role": "user", "content": "2+2?"}]
    with pytest.raises(ValueError, match="conversational=False"):
        to_prompt_rows([{"prompt": chat}], conversational=False)


def test_split_train_eval():
    rows = list(range(20))
    train, held = split_train_eval(rows, 5, seed=0)
    assert len(held) == 5 and len(train) == 15 and sorted(train + held) == rows
    assert train == sorted(train) and held == sorted(held)  # original order kept
    assert split_train_eval(rows, 5, seed=0) == (train, held)
    assert split_train_eval(rows, 5, seed=1)[1] != held
    assert len(split_train_eval(rows, 0.25, seed=0)[1]) == 5
    with pytest.raises(ValueError, match="leaves no training rows out of 20"):
        split_train_eval(rows, 20, seed=0)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        split_train_eval(rows, 1.5, seed=0)


def test_one_conversational_rule_for_generation_and_scoring():
    """The prompt that gets the chat template (rollout) is the prompt whose completions are scored as chat messages
    (scoring): a message without "content" after the first, or a tuple of messages, once split the two rules."""
    from grpo import rollout, scoring

    chat = {"role": "user", "content": "2+3?"}
    prompts = {  # prompt: conversational under TRL's rule (a list whose first item is a dict with a "role")
        "text": ("2+3?", False),
        "empty list": ([], False),
        "chat": ([chat], True),
        "tool turn without content": ([chat, {"role": "assistant", "tool_calls": []}], True),
        "tuple of messages": ((chat,), False),
    }
    for name, (prompt, want) in prompts.items():
        assert rollout.is_conversational(prompt) is want, name
        assert scoring.is_conversational(prompt) is want, name
