from fractions import Fraction

import pytest

from grpo import rewards as R
from grpo.rewards import (
    REWARD_FUNCS,
    completion_text,
    equation_reward,
    extract_gsm8k_gold,
    extract_gsm8k_prediction,
    find_boxed,
    format_reward,
    gsm8k_reward,
    latex_equal,
    make_format_reward,
    math_reward,
    normalize_latex,
    parse_number,
)

GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def chat(text):
    return [{"role": "assistant", "content": text}]


# --- numbers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, value",
    [
        ("72", Fraction(72)), ("1,234", Fraction(1234)), ("$1,200.00", Fraction(1200)), ("-7", Fraction(-7)),
        ("3.50", Fraction(7, 2)), ("42.", Fraction(42)), ("3/4", Fraction(3, 4)), ("50%", Fraction(50)),
        (" 18 ", Fraction(18)), ("\\$5", Fraction(5)), ("\\frac{1}{2}", Fraction(1, 2)), (".5", Fraction(1, 2)),
        ("1 000", Fraction(1000)), ("12.0", Fraction(12)), (7, Fraction(7)), (2.5, Fraction(5, 2)),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["five", "", "1/0", "x+1", "1,23", None, True, "(1, 2)"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


def test_gsm8k_gold():
    assert extract_gsm8k_gold(GSM8K_ANSWER) == 72
    assert extract_gsm8k_gold("so she has $1,080 left.\n#### 1,080") == 1080
    assert extract_gsm8k_gold("#### -3.5") == Fraction(-7, 2)
    assert extract_gsm8k_gold("18") == 18 and extract_gsm8k_gold(18) == 18
    assert extract_gsm8k_gold("#### eighteen") is None
    assert extract_gsm8k_gold("no answer here") is None
    assert extract_gsm8k_gold(None) is None


@pytest.mark.parametrize(
    "completion, value",
    [
        ("She sold 48/2 = 24 in May, so 48 + 24 = 72.\n#### 72", 72),
        ("#### 70\nWait, I made a mistake.\n#### 72", 72),  # the last #### wins
        ("The total is $1,234.56.", Fraction(123456, 100)),
        # a boxed answer beats the last number
        ("So the answer is \\boxed{3/4}. That is 0.75 of the cake, 12 slices.", Fraction(3, 4)),
        ("Temperature drops to -5 degrees.", -5),
        ("#### $18.00", 18),
        ("#### 42 apples", 42),
        ("Step 1: 10 - 3 = 7\nStep 2: 7 * 2 = 14", 14),
        ("no digits at all", None),
    ],
)
def test_gsm8k_prediction(completion, value):
    assert extract_gsm8k_prediction(completion) == value


def test_gsm8k_reward_mixed_batch():
    completions = [
        "48/2 = 24 clips in May. 48 + 24 = 72.\n#### 72",  # right
        "#### 72.0",  # right, trailing .0
        chat("She sold 24 then 48, total \\boxed{72}"),  # chat format, boxed
        "#### 71",  # wrong
        "I think the answer is 1,080",  # right, comma
        "I don't know",  # no number -> wrong
        "#### 0.75",  # fraction gold 3/4
        "#### 5",  # gold unparsable -> None
    ]
    golds = [GSM8K_ANSWER] * 4 + ["#### 1,080", "#### 12", "#### 3/4", "#### n/a"]
    assert gsm8k_reward(None, completions, answer=golds) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, None]


def test_gsm8k_reward_needs_answer_column():
    with pytest.raises(ValueError, match="'answer' column"):
        gsm8k_reward(None, ["#### 1"])
    with pytest.raises(ValueError, match="2 values in column 'answer' for 1 completions"):
        gsm8k_reward(None, ["#### 1"], answer=["#### 1", "#### 2"])


# --- boxed ---------------------------------------------------------------------------------------------------

def test_find_boxed_nested_and_fbox():
    text = (
        "First \\boxed{\\frac{1}{2}}, then $\\boxed{\\left\\{ 1, 2 \\right\\}}$, also \\fbox{3} "
        "and \\boxed{\\sqrt{\\frac{a^{2}}{b_{1}}}} and \\boxed 5$ and \\boxed{unclosed"
    )
    assert find_boxed(text) == [
        "\\frac{1}{2}", "\\left\\{ 1, 2 \\right\\}", "3", "\\sqrt{\\frac{a^{2}}{b_{1}}}", "5",
    ]
    assert find_boxed("\\boxedtext{1}") == []  # a different command
    assert R.last_boxed("none here") is None


# --- math equivalence ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "pred, gold",
    [
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{3}{4}", "\\frac34"),
        ("\\tfrac{3}{4}", "0.75"),
        ("\\left( 2, 3 \\right)", "(2,3)"),
        ("x = 5", "5"),
        ("5\\text{ cm}", "5"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("50\\%", "50"),
        ("\\$18.00", "18"),
        ("\\sqrt{8}", "2\\sqrt{2}"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
        ("-2, 3", "3, -2"),  # all solutions, any order
        ("\\text{Monday}", "Monday"),
        ("(B)", "B"),
        ("\\pi/2", "\\frac{\\pi}{2}"),
        ("x^2+2x+1", "(x+1)^2"),
        ("2x+3", "3+2x"),
        ("1,000", "1000"),
        ("\\infty", "\\infty"),
        ("\\sqrt[3]{27}", "3"),
        ("2^{10}", "1024"),
        ("\\frac{2}{4}", "\\frac{1}{2}"),
        ("10\\!000", "10000"),
        ("\\displaystyle\\frac{5}{6}", "\\frac{5}{6}"),
        ("\\$\\, 32", "32"),
        ("3\\sqrt{2}", "\\sqrt{18}"),
        ("\\frac{\\pi}{3}", "\\dfrac{\\pi}{3}"),
        ("2xy", "2yx"),
        ("x(y+1)", "xy+x"),
        ("\\frac{x^{2}-1}{x-1}", "x+1"),
    ],
)
def test_latex_equal(pred, gold):
    assert latex_equal(pred, gold)
    assert latex_equal(gold, pred)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("\\frac{1}{3}", "0.333"),
        ("[1, 2)", "[1, 2]"),
        ("(2, 3)", "(3, 2)"),  # ordered pair
        ("x^2+1", "(x+1)^2"),
        ("5", "6"),
        ("\\sqrt{2}", "1.41421"),
        ("9^{9^{9}}", "1"),  # refused, never evaluated
        ("10^{10^{10^{10}}}", "1"),
        ("", "5"),
        ("2, 3", "2"),
        ("\\text{Tuesday}", "Monday"),
        ("\\unknowncmd{1}", "1"),
        ("xy", "x+y"),
        ("open(1)", "1"),  # letters are variables, never Python names
    ],
)
def test_latex_not_equal(pred, gold):
    assert not latex_equal(pred, gold)


def test_normalize_latex():
    assert normalize_latex("$\\left( 1,2 \\right)$") == "(1,2)"
    assert normalize_latex("\\dfrac12") == "\\frac{1}{2}"
    assert normalize_latex("12.50") == "12.5"
    assert normalize_latex("5.") == "5"


def test_math_reward_gold_from_solution_or_answer():
    solution = (
        "We have $\\frac{a}{b} = \\frac{1}{2}$, so the sum is $\\boxed{\\frac{\\sqrt{3}}{2}}$. "
        "Hence the answer."
    )
    completions = [
        "Using the identity, we get \\boxed{\\dfrac{\\sqrt3}{2}}",
        chat("Thus $\\boxed{\\frac{1}{2}}$"),
        "No boxed answer: \\frac{\\sqrt{3}}{2}",
        "\\boxed{1} then corrected \\boxed{\\frac{\\sqrt{3}}{2}}",  # the last one counts
    ]
    assert math_reward(None, completions, solution=[solution] * 4) == [1.0, 0.0, 0.0, 1.0]
    # gold from the answer column when there is no solution
    assert math_reward(None, ["\\boxed{(1, 2)}", "\\boxed{(2, 1)}"], answer=["\\left(1,2\\right)"] * 2) == [1.0, 0.0]
    # unparsable gold -> None
    assert math_reward(None, ["\\boxed{3}", "\\boxed{3}"], solution=["no box here", "\\boxed{}"]) == [None, None]
    with pytest.raises(ValueError, match="'solution' or an 'answer'"):
        math_reward(None, ["\\boxed{3}"])


def test_math_reward_uses_math_verify_when_available(monkeypatch):
    calls = []

    class FakeMathVerify:
        @staticmethod
        def parse(text, parsing_timeout="unset"):
            calls.append(parsing_timeout)
            return [text]

        @staticmethod
        def verify(gold, pred, timeout_seconds="unset"):
            calls.append(timeout_seconds)
            return True

    monkeypatch.setattr(R, "_MATH_VERIFY", FakeMathVerify)
    assert math_reward(None, ["\\boxed{7}"], answer=["8"]) == [1.0]
    assert calls == [None, None, None]  # signal-based timeouts switched off


# --- equation ------------------------------------------------------------------------------------------------

def test_equation_reward_credits_the_gold_equation_when_the_answer_is_its_result():
    sub = "We subtract: 38 - 19 = 19.\n#### 19"
    completions = [
        "So 38 - 19 = 20.",  # the right equation with a wrong result still earns it
        "38-19=18, so 18 pencils are left",
        chat("She needs 38 - 19 = 19 more.\n#### 19"),
        "38 - 19 = 20, and then 38 - 19 = 30 more",  # the final answer is one of its equations' results
        "38 - 19 = $1,200.5 in all\n#### 1200.5",
        "38 - 19 = 20 + 5 = 25",  # the final answer is not the equation's result
        "38 - 19 = 19 pencils. 19 + 19 = 38",  # ... nor here
        "19 - 38 = -19",  # operands swapped: not commutative
        "38 + 19 = 57",  # the wrong operation
        "138 - 19 = 119",  # other numbers that contain the gold ones
        "38 - 190 = -152",
        "38 - 19",  # no result
        "#### 19",  # the right answer without the equation
    ]
    assert equation_reward(None, completions, answer=[sub] * len(completions)) == [1] * 5 + [0] * 8


def test_equation_reward_either_order_for_commutative_operations_and_none_without_a_gold_equation():
    add = "We add: 38 + 19 = 57.\n#### 57"
    assert equation_reward(None, ["19 + 38 = 57", "38 +19= 50", "57"], answer=[add] * 3) == [1.0, 1.0, 0.0]
    assert equation_reward(None, ["6 * 7 = 42", "7*6=41", "6 + 7 = 13"], answer=["6 * 7 = 42\n#### 42"] * 3) == [1, 1, 0]
    assert equation_reward(None, ["72", "1 + 1 = 2"], answer=["#### 72", None]) == [None, None]


# --- format --------------------------------------------------------------------------------------------------

def test_format_reward():
    completions = [
        "48 + 24 = 72\n#### 72",
        "48 + 24 = 72\n#### 72\n\n",  # trailing blank lines are fine
        chat("#### -3.5"),
        "#### 72 clips",  # not a bare number
        "#### 72\nand then more text",  # not the last line
        "The answer is 72",
        "",
        "work #### 72",  # not on its own line
    ]
    assert format_reward(None, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_tag_format_reward():
    f = make_format_reward()
    assert f.__name__ == "tags_format_reward"
    completions = [
        "<think>\n48/2 = 24\n</think>\n<answer>72</answer>",
        "  <think>x</think><answer>72</answer>\n",
        "<think>a</think><think>b</think><answer>72</answer>",  # repeated tag
        "<answer>72</answer><think>x</think>",  # wrong order
        "Sure! <think>x</think><answer>72</answer>",  # text before
        chat("<think>x</think> <answer>72</answer>"),
    ]
    assert f(None, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    g = make_format_reward(tags=("<reasoning>", "</reasoning>"), name="reasoning_format")
    assert g.__name__ == "reasoning_format"
    assert g(completions=["<reasoning>ok</reasoning>", "<reasoning>ok"]) == [1.0, 0.0]


def test_regex_format_reward_and_errors():
    f = make_format_reward(pattern=r".*\nAnswer: \d+")
    assert f(None, ["work\nAnswer: 12", "Answer: 12", "work\nAnswer: twelve"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="not both"):
        make_format_reward(pattern="x", tags=("<a>", "</a>"))
    with pytest.raises(ValueError, match="pairs"):
        make_format_reward(tags=("<a>",))
    with pytest.raises(ValueError, match="invalid regular expression"):
        make_format_reward(pattern="(")


def test_completion_text_forms():
    assert completion_text("plain") == "plain"
    assert completion_text(chat("hi")) == "hi"
    conversation = [{"role": "assistant", "content": "first"}, {"role": "tool", "content": "42"},
                    {"role": "assistant", "content": "final"}]
    assert completion_text(conversation) == "final"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                             {"type": "text", "text": "b"}]}]) == "ab"
    with pytest.raises(TypeError):
        completion_text(42)


def test_registry():
    assert REWARD_FUNCS == {"gsm8k": gsm8k_reward, "math": math_reward, "format": format_reward,
                            "equation": equation_reward}
