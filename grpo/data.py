"""Datasets as plain lists of dicts: loading, the bundled arithmetic problems, and prompt formatting.

Rows keep every column: the trainer passes them to the reward functions as keywords (``answer`` for GSM8K-style
data, ``solution`` for MATH-style data), and adds a ``prompt`` column, a chat message list (conversational) or a
plain string.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from typing import Any

GSM8K_INSTRUCTION = (
    'Solve the problem step by step, then give the final answer on its own line in the form "#### <number>".'
)
MATH_INSTRUCTION = "Solve the problem step by step, then put the final answer in \\boxed{}."
DEFAULT_REWARDS = {"gsm8k": ["gsm8k", "format"], "math": ["math"]}  # reward names (grpo.rewards) per format

_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
_SPLIT_ALIASES = {
    "train": ("train",),
    "test": ("test", "validation", "valid", "val", "eval", "dev"),
    "validation": ("validation", "valid", "val", "dev", "eval", "test"),
}
_ARITHMETIC_SIZES = {"train": 2000, "test": 200}


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_dataset(spec: str, split: str = "train") -> list[dict]:
    """Rows of a dataset given by ``spec``:

    - ``"arithmetic"`` or ``"arithmetic:N"``: the bundled generator (N problems; 2000 train / 200 test by default),
    - a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file (``split`` picks a key of a JSON dict of splits),
    - a directory holding ``<split>.<ext>`` files (or ``<split>-00000-of-00001.parquet`` shards),
    - a Hugging Face dataset name (``"openai/gsm8k:main"`` = name:config) already in the local ``datasets`` cache.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}")
    name, _, arg = spec.partition(":")
    if name == "arithmetic" and not os.path.exists(spec):
        held_out = split != "train"
        if split not in _SPLIT_ALIASES:
            raise ValueError(f"split={split!r}: the arithmetic problems have splits 'train' and 'test'")
        try:
            n = int(arg) if arg else _ARITHMETIC_SIZES["test" if held_out else "train"]
        except ValueError:
            raise ValueError(f"dataset spec {spec!r}: write 'arithmetic' or 'arithmetic:N' with N an integer") from None
        return make_arithmetic_problems(n, seed=0, split="test" if held_out else "train")
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return _check_rows(_read_dir(path, split), spec)
    if os.path.isfile(path):
        return _check_rows(_read_file(path, split), spec)
    if path.lower().endswith(_EXTENSIONS) or path.startswith((".", "/", "~")) or os.sep + os.sep in path:
        raise FileNotFoundError(f"dataset file {spec!r} does not exist")
    return _check_rows(_load_hf(spec, split), spec)


def _check_rows(rows, spec) -> list[dict]:  # row numbers in messages count from 1, as a file's lines
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"dataset {spec!r} is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"dataset {spec!r}: row {i + 1} is a {type(row).__name__}, expected an object (dict)")
    return rows


def _read_file(path: str, split: str | None = None) -> list[dict]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
        return rows
    if ext == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            if split in data and isinstance(data[split], list):
                data = data[split]
            elif "data" in data and isinstance(data["data"], list):
                data = data["data"]
            elif data and all(isinstance(v, list) for v in data.values()):  # columnar: {"question": [...], ...}
                lengths = {len(v) for v in data.values()}
                if len(lengths) != 1:
                    raise ValueError(f"{path}: columns have different lengths {sorted(lengths)}")
                keys = list(data)
                data = [dict(zip(keys, values)) for values in zip(*data.values())]
            else:
                raise ValueError(f"{path}: expected a list of rows, {{split: rows}} or columns; keys: {list(data)}")
        return data
    if ext == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return [dict(row) for row in csv.DictReader(f)]
    if ext == ".parquet":
        return _read_parquet(path)
    raise ValueError(f"{path}: unsupported file type {ext!r}; use one of {', '.join(_EXTENSIONS)}")


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except ImportError:
        pass
    try:
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow (pip install pyarrow), or convert it to .jsonl first"
        ) from None


def _read_dir(path: str, split: str) -> list[dict]:
    files = []
    for root, _dirs, names in os.walk(path):
        if root[len(path) :].count(os.sep) > 2:
            continue
        files += [os.path.join(root, n) for n in names if n.lower().endswith(_EXTENSIONS)]
    for alias in _SPLIT_ALIASES.get(split, (split,)):
        hits = sorted(f for f in files if _split_of(os.path.basename(f)) == alias)
        if hits:
            rows = []
            for f in hits:  # shards, in name order
                rows += _read_file(f, alias)
            return rows
    shown = ", ".join(sorted(os.path.relpath(f, path) for f in files)[:10]) or "no data files"
    raise FileNotFoundError(
        f"no {split!r} split in directory {path} (found: {shown}); name the files {split}.jsonl / {split}.json / "
        f"{split}.csv / {split}.parquet, or pass the file itself"
    )


def _split_of(filename: str) -> str:
    stem = filename.rsplit(".", 1)[0].lower()
    for sep in ("-", "_", "."):  # "train-00000-of-00002", "test_v2"
        stem = stem.split(sep)[0]
    return stem


def _load_hf(spec: str, split: str) -> list[dict]:
    name, _, config = spec.partition(":")
    hint = (
        f"download the data elsewhere and pass a local file or a directory with {split}.jsonl, or use "
        "'arithmetic' for the bundled problems"
    )
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach for the network: this may run offline
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{spec!r} is not a local file or directory, and loading it as a Hugging Face dataset needs the "
            f"`datasets` package (pip install datasets) with the data already in its cache; or {hint}"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:
        raise ValueError(
            f"could not load Hugging Face dataset {name!r} (config {config or None!r}, split {split!r}) from the "
            f"local cache ({type(e).__name__}: {e}). Cache it on a machine with network access "
            f"(datasets.load_dataset({name!r}, {config or None!r})), or {hint}"
        ) from e
    return [dict(row) for row in ds]


# --------------------------------------------------------------------------------------------------------------
# Bundled arithmetic word problems

_NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hana", "Ivan", "Jade", "Kofi", "Lena",
          "Mateo", "Nora", "Omar", "Priya", "Quinn", "Ravi", "Sofia", "Tom")
_OBJECTS = ("apples", "marbles", "stickers", "pencils", "books", "coins", "cookies", "shells", "stamps", "cards",
            "oranges", "balloons", "crayons", "buttons")
_ADD = (
    "{name} has {a} {obj}. {name} gets {b} more {obj}. How many {obj} does {name} have now?",
    "There are {a} {obj} in a box. {name} puts {b} more {obj} into the box. How many {obj} are in the box now?",
    "{name} collected {a} {obj} on Monday and {b} {obj} on Tuesday. How many {obj} did {name} collect in all?",
    "A shop sold {a} {obj} in the morning and {b} {obj} in the afternoon. How many {obj} did it sell that day?",
    "{name} had {a} {obj} and then found {b} more. How many {obj} does {name} have altogether?",
)
_SUB = (
    "{name} has {a} {obj}. {name} gives {b} {obj} to a friend. How many {obj} does {name} have left?",
    "There were {a} {obj} on a shelf. {name} took {b} of them. How many {obj} are still on the shelf?",
    "{name} needs {a} {obj} for a project and already has {b}. How many more {obj} does {name} need?",
    "A jar held {a} {obj}. After {name} removed {b} of them, how many {obj} were left in the jar?",
    "{name} had {a} {obj} and lost {b} of them. How many {obj} does {name} have now?",
)
_HELD_OUT_EVERY = 8  # one operand pair in 8 belongs to the test split


def _is_held_out(op: str, a: int, b: int) -> bool:
    digest = hashlib.sha256(f"{op}:{a}:{b}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % _HELD_OUT_EVERY == 0


def _arithmetic_pool(held_out: bool) -> list[tuple[str, int, int]]:
    pool = [("+", a, b) for a in range(10, 100) for b in range(10, 100)]
    pool += [("-", a, b) for a in range(11, 100) for b in range(10, a)]
    return [p for p in pool if _is_held_out(*p) == held_out]


def make_arithmetic_problems(n: int, seed: int, split: str = "train") -> list[dict]:
    """``n`` distinct two-digit addition/subtraction word problems in GSM8K form ({"question", "answer"} with
    ``#### <result>``). The test split's operand pairs never occur in the train split (disjoint by a hash of the
    operation and operands), whatever the seeds."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: use 'train' or 'test'")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    pool = _arithmetic_pool(held_out=split == "test")
    if n > len(pool):
        raise ValueError(f"the {split} split has {len(pool)} distinct problems; asked for n={n}")
    rng = random.Random(f"arithmetic:{split}:{seed}")
    rows = []
    for op, a, b in rng.sample(pool, n):
        name, obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
        template = rng.choice(_ADD if op == "+" else _SUB)
        c = a + b if op == "+" else a - b
        verb = "add" if op == "+" else "subtract"
        rows.append({
            "question": template.format(name=name, obj=obj, a=a, b=b),
            "answer": f"We {verb}: {a} {op} {b} = {c}.\n#### {c}",
        })
    return rows


# --------------------------------------------------------------------------------------------------------------
# Formatting


def check_prompts(rows: list[dict], what: str = "dataset") -> None:
    """Refuse empty prompts, naming the row: an empty prompt would train on a completion of a pad token."""
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        if isinstance(prompt, (list, tuple)):
            empty = not any(isinstance(m, dict) and str(m.get("content") or "").strip() for m in prompt)
        else:
            empty = prompt is None or not str(prompt).strip()
        if empty:
            raise ValueError(f"{what} row {i + 1} (counting from 1) has an empty prompt {prompt!r}: every row needs "
                             "a non-empty prompt; remove or fix that row")


def detect_format(rows: list[dict]) -> str:
    """'prompt' (a ready prompt column), 'gsm8k' (question + answer) or 'math' (problem + solution/answer)."""
    if not rows or not isinstance(rows[0], dict):
        raise ValueError("detect_format needs a non-empty list of rows (dicts)")
    keys = set(rows[0])
    if "prompt" in keys:
        return "prompt"
    if "problem" in keys and ({"solution", "answer"} & keys):
        return "math"
    if "question" in keys and "answer" in keys:
        return "gsm8k"
    if "question" in keys and "solution" in keys:
        return "math"
    raise ValueError(
        f"cannot tell the dataset's format from its columns {sorted(keys)}: expected 'prompt', 'question' + "
        "'answer' (GSM8K style) or 'problem' + 'solution' (MATH style); rename the columns"
    )


def is_conversational(prompt: Any) -> bool:
    """A chat prompt: a list of {"role", "content"} messages (TRL's convention: the first item is a dict with a
    "role"). The one rule for the whole trainer: what gets the chat template also gets chat-shaped completions."""
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def to_prompt_rows(
    rows: list[dict],
    system_prompt: str | None = None,
    conversational: bool = True,
    instruction: str | None = None,
) -> list[dict]:
    """Copies of ``rows`` with a ``prompt`` column: ``[{"role": "system"...}, {"role": "user", ...}]`` when
    conversational, else a plain string. ``instruction`` (default: per format; "" for none) follows the question.
    The other columns stay for the reward functions."""
    fmt = detect_format(rows)
    if instruction is None:
        instruction = {"gsm8k": GSM8K_INSTRUCTION, "math": MATH_INSTRUCTION}.get(fmt, "")
    out = []
    for i, row in enumerate(rows):
        if fmt == "prompt":
            prompt = row["prompt"]
            if isinstance(prompt, list):
                if not conversational:
                    raise ValueError(
                        f"row {i + 1}: the prompt is a chat message list, but conversational=False; use "
                        "conversational=True (the chat template renders it) or give plain-string prompts"
                    )
                messages = list(prompt)
                if system_prompt and not (messages and messages[0].get("role") == "system"):
                    messages.insert(0, {"role": "system", "content": system_prompt})
                out.append({**row, "prompt": messages})
                continue
            text = str(prompt)
            if not text.strip():
                raise ValueError(f"row {i + 1}: empty prompt {prompt!r}; every row needs a non-empty prompt")
        else:
            text = row.get("question") if fmt == "gsm8k" else row.get("problem", row.get("question"))
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"row {i + 1}: empty or missing question text ({sorted(row)})")
        content = f"{text.strip()}\n\n{instruction}" if instruction else text
        if conversational:
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            messages.append({"role": "user", "content": content})
            out.append({**row, "prompt": messages})
        else:
            out.append({**row, "prompt": f"{system_prompt}\n\n{content}" if system_prompt else content})
    return out


def split_train_eval(rows: list, eval_size: int | float, seed: int) -> tuple[list, list]:
    """A seeded random split: ``eval_size`` rows (an int, or a fraction in (0, 1)) for evaluation, the rest for
    training; both keep the original order."""
    n = len(rows)
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float)):
        raise ValueError(f"eval_size must be an int or a fraction in (0, 1), got {eval_size!r}")
    if isinstance(eval_size, float):
        if not 0.0 < eval_size < 1.0:
            raise ValueError(f"eval_size={eval_size} as a fraction must be in (0, 1)")
        k = max(1, round(n * eval_size))
    else:
        k = eval_size
    if k < 0 or k >= n:
        raise ValueError(f"eval_size={eval_size} leaves no training rows out of {n}: use 0 <= eval_size < {n}")
    chosen = set(random.Random(seed).sample(range(n), k))
    train = [r for i, r in enumerate(rows) if i not in chosen]
    held = [r for i, r in enumerate(rows) if i in chosen]
    return train, held

