"""Built-in reward functions with TRL's signature: ``fn(prompts, completions, **columns) -> list[float | None]``.

- ``gsm8k_reward``: 1.0 when the completion's final number equals the gold number after ``####`` in ``answer``.
- ``math_reward``:  1.0 when the completion's last ``\\boxed{}`` is equivalent to the gold answer (the last boxed
  expression of ``solution``, or ``answer``); checked by ``math_verify`` when it is installed, else by a
  normaliser plus a sympy check.
- ``format_reward``: 1.0 when the completion ends with a line ``#### <number>`` (the format our data asks for);
  ``make_format_reward`` builds tag- or regex-based variants.
- ``equation_reward``: 1.0 when the completion writes the gold answer's equation on the gold numbers ("38 - 19 =
  X") and answers X: partial credit for the right operation on the right numbers, whatever the result.

``None`` means "cannot be scored" (the gold answer does not parse): the trainer leaves such completions out of the
group statistics rather than treating them as wrong. Completions may be plain strings or TRL chat lists
(``[{"role": "assistant", "content": ...}]``; the last assistant message counts).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable, Sequence

# --------------------------------------------------------------------------------------------------------------
# Completion text


def completion_text(completion) -> str:
    """The text of one completion: a string, a message dict, or a list of messages (last assistant message)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        assistant = [m for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        last = assistant[-1] if assistant else completion[-1]
        return completion_text(last)
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal content blocks: [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def _column(values, n: int, name: str, fn: str) -> list:
    if values is None:
        raise ValueError(f"{fn} needs a {name!r} column in the dataset (one gold answer per completion)")
    if isinstance(values, (str, int, float)):
        values = [values] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{fn}: {len(values)} values in column {name!r} for {n} completions; they must match")
    return values


# --------------------------------------------------------------------------------------------------------------
# Numbers (GSM8K)

# An optionally signed number with optional $, thousands commas, decimals, or a simple fraction a/b.
_NUMBER = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\$?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})")
_HASH_RE = re.compile(r"####\s*([^\n]*)")


def parse_number(text) -> Fraction | None:
    """Parse a GSM8K-style number: '1,234', '$18', '-7', '3.50', '3/4', '42.', '50%', '12.00' → exact Fraction."""
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, (int, float)):
        return Fraction(str(text)) if text == text and abs(text) != float("inf") else None
    s = str(text).strip()
    s = re.sub(r"\\(?:text|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "").replace("\\!", "")
    s = s.replace(" ", "").replace("\u2212", "-").rstrip(".")
    if re.fullmatch(r"[+-]?(\d{1,3}(,\d{3})+)(\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:/(\d+(?:\.\d+)?))?", s)
    if not m:
        m2 = re.fullmatch(r"([+-]?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", s)
        if not m2:
            return None
        num, den = Fraction(m2.group(2)), Fraction(m2.group(3))
        return None if den == 0 else (-1 if m2.group(1) == "-" else 1) * num / den
    value = Fraction(m.group(1))
    if m.group(2) is not None:
        den = Fraction(m.group(2))
        if den == 0:
            return None
        value /= den
    return value


def _last_number(text: str) -> Fraction | None:
    for match in reversed(_NUMBER_RE.findall(text)):
        value = parse_number(match)
        if value is not None:
            return value
    return None


def extract_gsm8k_gold(answer) -> Fraction | None:
    """The gold number of a GSM8K ``answer`` (text after the last ``####``), or a bare number."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return parse_number(answer)
    if not isinstance(answer, str):
        return None
    if "####" in answer:
        return parse_number(answer.rsplit("####", 1)[1].strip().split("\n")[0])
    return parse_number(answer)


def extract_gsm8k_prediction(text: str) -> Fraction | None:
    """The completion's answer: its last ``#### N``, else its last ``\\boxed{}``, else its last number."""
    for tail in reversed(_HASH_RE.findall(text)):
        value = parse_number(tail)
        if value is None:
            value = _first_number(tail)
        if value is not None:
            return value
    boxed = last_boxed(text)
    if boxed is not None:
        value = parse_number(boxed)
        if value is None:
            value = _last_number(boxed)
        if value is not None:
            return value
    return _last_number(text)


def _first_number(text: str) -> Fraction | None:
    for match in _NUMBER_RE.findall(text):
        value = parse_number(match)
        if value is not None:
            return value
    return None


def gsm8k_reward(prompts, completions, answer=None, **kwargs) -> list[float | None]:
    """1.0 if the completion's final number equals the gold number, 0.0 if not, None if the gold does not parse."""
    golds = _column(answer, len(completions), "answer", "gsm8k_reward")
    rewards: list[float | None] = []
    for completion, gold_text in zip(completions, golds):
        gold = extract_gsm8k_gold(gold_text)
        if gold is None:
            rewards.append(None)
            continue
        pred = extract_gsm8k_prediction(completion_text(completion))
        rewards.append(1.0 if pred is not None and pred == gold else 0.0)
    return rewards


# A worked equation "A op B = C" in a gold answer (the bundled arithmetic problems write "We subtract: 38 - 19 = 19.").
_GOLD_EQUATION_RE = re.compile(r"(\d+)\s*([-+*/])\s*(\d+)\s*=")


def equation_reward(prompts, completions, answer=None, **kwargs) -> list[float | None]:
    """1.0 when the completion writes the gold answer's first equation on the gold numbers with some result
    ("38 - 19 = X"; either order for + and *) and its final answer is that X, right or wrong; 0.0 if not; None if
    the gold has no equation. Partial credit for choosing the right operation on the right numbers: on subtraction
    problems it is the only signal a model that always adds gets, since its samples almost never end on the right
    difference. Requiring the final answer to be the equation's own result keeps it from being earned by writing
    many equations."""
    golds = _column(answer, len(completions), "answer", "equation_reward")
    rewards: list[float | None] = []
    for completion, gold in zip(completions, golds):
        m = _GOLD_EQUATION_RE.search(gold) if isinstance(gold, str) else None
        if m is None:
            rewards.append(None)
            continue
        a, op, b = m.groups()
        orders = [(a, b), (b, a)] if op in "+*" and a != b else [(a, b)]
        text = completion_text(completion)
        final = extract_gsm8k_prediction(text)
        results = [parse_number(r) for x, y in orders
                   for r in re.findall(rf"(?<![\d.]){x}\s*{re.escape(op)}\s*{y}\s*=\s*({_NUMBER})", text)]
        rewards.append(1.0 if final is not None and final in results else 0.0)
    return rewards


# --------------------------------------------------------------------------------------------------------------
# Boxed answers (MATH)

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def find_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces matched; ``\\boxed 5`` too)."""
    out = []
    for m in _BOXED_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            inner = _braced(text, i)
            if inner is not None:
                out.append(inner)
        else:  # "\boxed 5": up to the next space or dollar sign
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                out.append(token.group(0))
    return out


def _braced(text: str, i: int) -> str | None:
    """The contents of the group opening at text[i] == '{', or None when it never closes."""
    depth = 0
    for j in range(i, len(text)):  # \{ and \} are literal braces (set notation), not groups
        c = text[j]
        if c == "{" and (j == 0 or text[j - 1] != "\\"):
            depth += 1
        elif c == "}" and (j == 0 or text[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def last_boxed(text: str) -> str | None:
    found = find_boxed(text)
    return found[-1] if found else None


def extract_math_gold(solution=None, answer=None) -> str | None:
    if isinstance(solution, str):
        boxed = last_boxed(solution)
        if boxed is not None and boxed.strip():
            return boxed
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    if isinstance(answer, str) and answer.strip():
        boxed = last_boxed(answer)
        if boxed is not None:
            return boxed if boxed.strip() else None
        if "####" in answer:
            return answer.rsplit("####", 1)[1].strip() or None
        return answer.strip()
    return None


def math_reward(prompts, completions, solution=None, answer=None, **kwargs) -> list[float | None]:
    """1.0 if the completion's last boxed answer is equivalent to the gold one, 0.0 if not, None if no gold."""
    if solution is None and answer is None:
        raise ValueError("math_reward needs a 'solution' or an 'answer' column in the dataset")
    n = len(completions)
    sols = _column(solution, n, "solution", "math_reward") if solution is not None else [None] * n
    answers = _column(answer, n, "answer", "math_reward") if answer is not None else [None] * n
    rewards: list[float | None] = []
    for completion, sol, ans in zip(completions, sols, answers):
        gold = extract_math_gold(sol, ans)
        if gold is None:
            rewards.append(None)
            continue
        pred = last_boxed(completion_text(completion))
        rewards.append(1.0 if pred is not None and math_equal(pred, gold) else 0.0)
    return rewards


# --------------------------------------------------------------------------------------------------------------
# Math equivalence

_MAX_EXPR_CHARS = 300  # longer expressions are compared as strings only: sympy on them can take unbounded time


def math_equal(pred: str, gold: str) -> bool:
    """Whether two LaTeX answers denote the same value (math_verify when installed, else our checker)."""
    verdict = _math_verify_equal(pred, gold)
    if verdict is not None:
        return verdict
    return latex_equal(pred, gold)


_MATH_VERIFY = None


def _math_verify_equal(pred: str, gold: str) -> bool | None:
    """math_verify's verdict with its signal-based timeouts switched off (thread safety), or None to fall back."""
    global _MATH_VERIFY
    if _MATH_VERIFY is None:
        try:
            import math_verify

            _MATH_VERIFY = math_verify
        except ImportError:
            _MATH_VERIFY = False
    if _MATH_VERIFY is False:
        return None
    try:
        g = _MATH_VERIFY.parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
        p = _MATH_VERIFY.parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
        if not g or not p:
            return None
        return bool(_MATH_VERIFY.verify(g, p, timeout_seconds=None))
    except Exception:  # an old math_verify without the timeout switches, or a parser failure: use our checker
        return None


def latex_equal(pred: str, gold: str) -> bool:
    a, b = normalize_latex(pred), normalize_latex(gold)
    if a == b:
        return True
    if not a or not b:
        return False
    if a.lower() == b.lower() and re.fullmatch(r"[A-Za-z ]+", a):
        return True
    ta, tb = _split_tuple(a), _split_tuple(b)
    if ta is not None or tb is not None:
        if ta is None or tb is None or ta[0] != tb[0] or len(ta[1]) != len(tb[1]):
            return False
        if ta[0] == "":  # a bare list "2, -3": the order of the solutions does not matter
            remaining = list(tb[1])
            for x in ta[1]:
                hit = next((k for k, y in enumerate(remaining) if _scalar_equal(x, y)), None)
                if hit is None:
                    return False
                remaining.pop(hit)
            return True
        return all(_scalar_equal(x, y) for x, y in zip(ta[1], tb[1]))
    return _scalar_equal(a, b)


def _scalar_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    na, nb = parse_number(a), parse_number(b)
    if na is not None and nb is not None:
        return na == nb
    return _sympy_equal(a, b)


def normalize_latex(s: str) -> str:
    """Canonical string form of an answer: drop display wrappers, spacing, units, degrees, percent, dollars."""
    s = str(s).strip()
    s = s.replace("\n", " ").replace("\u2212", "-")
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])", "", s)
    s = re.sub(r"\\(?:displaystyle|textstyle)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[!,;: ]|~", "", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\circ", "").replace("°", "")
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    # \text{...}: the whole answer ("\text{Monday}") or a unit after a value ("5 \text{ cm}")
    whole = re.fullmatch(r"\\(?:text|textbf|mathrm|mbox|textit)\{([^{}]*)\}", s.strip())
    if whole:
        s = whole.group(1)
    else:
        s = re.sub(r"\\(?:text|mbox)\{[^{}]*\}", "", s)
        s = re.sub(r"\\(?:mathrm|textbf|textit)\{([^{}]*)\}", r"\1", s)
    s = s.replace(" ", "")
    # "x=5" -> "5" (a short left-hand side naming the unknown)
    m = re.fullmatch(r"[A-Za-z](?:_\{?\w+\}?)?=(.+)", s)
    if m and "=" not in m.group(1):
        s = m.group(1)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = s.rstrip(".")
    m = re.fullmatch(r"\(([A-Za-z])\)", s)  # multiple choice "(B)" -> "B"
    if m:
        s = m.group(1)
    if re.fullmatch(r"-?\d+\.\d*", s):
        s = s.rstrip("0").rstrip(".") or "0"
    return s


_BRACKETS = {"(": ")", "[": "]", "\\{": "\\}"}


def _split_tuple(s: str) -> tuple[str, list[str]] | None:
    """('(' + ']', items) for an interval/tuple, ('', items) for a bare comma list, else None."""
    opener = next((o for o in ("\\{", "(", "[") if s.startswith(o)), None)
    body, kind = s, ""
    if opener is not None:
        closer = next((c for c in ("\\}", ")", "]") if s.endswith(c)), None)
        if closer is None:
            return None
        inner = s[len(opener) : len(s) - len(closer)]
        if _depth_ok(inner):
            body, kind = inner, opener + closer
    items, depth, start = [], 0, 0
    for i, c in enumerate(body):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(body[start:i])
            start = i + 1
    items.append(body[start:])
    if len(items) < 2:
        return None
    return kind, [normalize_latex(x) for x in items]


def _depth_ok(s: str) -> bool:
    depth = 0
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        if depth < 0:
            return False
    return depth == 0


# LaTeX commands we translate; anything else makes the sympy path give up (never a false "equal").
_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "ln",
          "log", "exp"}
_ALLOWED_NAMES = _FUNCS | {"sqrt", "pi", "oo", "E", "I", "root"}


def latex_to_python(s: str) -> str | None:
    """A small LaTeX → sympy-syntax translation, or None when the text has something we do not understand."""
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            m = re.match(r"\\([A-Za-z]+)", s[i:])
            if not m:
                return None
            cmd = m.group(1)
            i += len(m.group(0))
            if cmd == "frac":
                num, i = _group(s, i)
                den, i = _group(s, i)
                if num is None or den is None:
                    return None
                pn, pd = latex_to_python(num), latex_to_python(den)
                if pn is None or pd is None:
                    return None
                out.append(f"(({pn})/({pd}))")
            elif cmd == "sqrt":
                index = None
                if i < len(s) and s[i] == "[":
                    j = s.find("]", i)
                    index = latex_to_python(s[i + 1 : j]) if j > 0 else None
                    if index is None:
                        return None
                    i = j + 1
                arg, i = _group(s, i)
                parg = latex_to_python(arg) if arg is not None else None
                if parg is None:
                    return None
                out.append(f"sqrt({parg})" if index is None else f"(({parg})**(1/({index})))")
            elif cmd in ("cdot", "times"):
                out.append("*")
            elif cmd == "div":
                out.append("/")
            elif cmd == "pi":
                out.append(" pi ")
            elif cmd == "infty":
                out.append(" oo ")
            elif cmd in _FUNCS:
                out.append(f" {cmd}")
            else:
                return None
            continue
        if c in "{}":
            out.append("(" if c == "{" else ")")
        elif c == "^":
            out.append("**")
        elif c.isalpha():  # letters are one-letter variables: "xy" is x*y (never a Python name)
            out.append(f" {c} ")
        elif c.isdigit() or c in "+-*/().":
            out.append(c)
        elif c.isspace():
            out.append(" ")
        else:
            return None
        i += 1
    return "".join(out)


def _group(s: str, i: int) -> tuple[str | None, int]:
    """The argument at s[i]: a {group} or a single character."""
    if i >= len(s):
        return None, i
    if s[i] == "{":
        inner = _braced(s, i)
        return (None, i) if inner is None else (inner, i + len(inner) + 2)
    return s[i], i + 1


def _sympy_parse(s: str):
    if len(s) > _MAX_EXPR_CHARS:
        return None
    code = latex_to_python(s)
    if code is None or not code.strip():
        return None
    for name in re.findall(r"[A-Za-z_]\w*", code):
        if name not in _ALLOWED_NAMES and not re.fullmatch(r"[A-Za-z]", name):
            return None
    if re.search(r"\d{16,}", code):  # integers this long make exact arithmetic slow; no answer needs them
        return None
    try:
        import sympy
        from sympy.parsing.sympy_parser import (
            convert_xor,
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )

        transforms = standard_transformations + (implicit_multiplication_application, convert_xor)
        expr = parse_expr(code, transformations=transforms, evaluate=False,
                          local_dict={"ln": sympy.log, "E": sympy.E, "I": sympy.I})
    except Exception:
        return None
    # Refuse 9^9^9 or 2^100000 before anything evaluates them. Innermost powers first, so that every exponent we
    # evaluate has only small powers inside it.
    for node in sympy.postorder_traversal(expr):
        if isinstance(node, sympy.Pow) and not node.exp.free_symbols:
            try:
                if abs(complex(node.exp.evalf(15))) > 1000:
                    return None
            except (TypeError, ValueError):
                return None
    return expr


def _sympy_equal(a: str, b: str) -> bool:
    ea, eb = _sympy_parse(a), _sympy_parse(b)
    if ea is None or eb is None:
        return False
    try:
        import random

        symbols = sorted(ea.free_symbols | eb.free_symbols, key=str)
        if len(symbols) > 4:
            return False
        rng = random.Random(0)
        trials = 1 if not symbols else 5
        for _ in range(trials):
            subs = {x: rng.uniform(0.5, 2.5) for x in symbols}
            va = complex(ea.evalf(30, subs=subs))
            vb = complex(eb.evalf(30, subs=subs))
            if not (_finite(va) and _finite(vb)):
                return False
            if abs(va - vb) > 1e-6 * max(1.0, abs(vb)):
                return False
        return True
    except Exception:
        return False


def _finite(z: complex) -> bool:
    return z == z and abs(z) != float("inf")


# --------------------------------------------------------------------------------------------------------------
# Format rewards

_FINAL_LINE_RE = re.compile(r"^\s*####\s*(.+?)\s*$")


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion's last non-empty line is ``#### <number>``, else 0.0."""
    rewards = []
    for completion in completions:
        lines = [line for line in completion_text(completion).splitlines() if line.strip()]
        m = _FINAL_LINE_RE.match(lines[-1]) if lines else None
        rewards.append(1.0 if m and parse_number(m.group(1)) is not None else 0.0)
    return rewards


def make_format_reward(
    pattern: str | None = None,
    tags: Sequence[str] | None = None,
    name: str | None = None,
) -> Callable[..., list[float]]:
    """A format reward: 1.0 when the completion matches ``pattern`` (``re.fullmatch``, DOTALL) or, with ``tags``
    (pairs: open, close, open, close ...; default think/answer), is exactly those tagged sections in order, each
    tag used once, with only whitespace between them."""
    if pattern is not None and tags is not None:
        raise ValueError("make_format_reward takes a pattern or tags, not both")
    if pattern is None:
        tags = tuple(tags) if tags is not None else ("<think>", "</think>", "<answer>", "</answer>")
        if not tags or len(tags) % 2 or not all(isinstance(t, str) and t for t in tags):
            raise ValueError(f"tags must be non-empty strings in open/close pairs, got {tags!r}")
        body = r"\s*".join(re.escape(o) + r".*?" + re.escape(c) for o, c in zip(tags[::2], tags[1::2]))
        regex = re.compile(rf"\s*{body}\s*", re.DOTALL)
        default_name = "tags_format_reward"
    else:
        try:
            regex = re.compile(pattern, re.DOTALL)
        except re.error as e:
            raise ValueError(f"make_format_reward: invalid regular expression {pattern!r}: {e}") from None
        default_name = "regex_format_reward"

    def reward(prompts=None, completions=(), **kwargs) -> list[float]:
        out = []
        for completion in completions:
            text = completion_text(completion)
            ok = regex.fullmatch(text) is not None
            if ok and tags is not None:
                ok = all(text.count(t) == 1 for t in tags)
            out.append(1.0 if ok else 0.0)
        return out

    reward.__name__ = reward.__qualname__ = name or default_name
    return reward


REWARD_FUNCS = {"gsm8k": gsm8k_reward, "math": math_reward, "format": format_reward, "equation": equation_reward}
