"""Experiment D05: a dense digit-match reward beside the accuracy reward (registered here, not in grpo.rewards).
Usage: python digit_reward_run.py WEIGHT -- <grpo train args>"""
import sys
from grpo import cli, scoring
from grpo.rewards import completion_text, extract_gsm8k_gold, extract_gsm8k_prediction


def digit_reward(prompts, completions, answer=None, **kwargs):
    """Fraction of the gold answer's digits the final number gets right, aligned from the ones digit
    (a wrong length counts against it): 57 for 47 -> 0.5, 147 for 137 -> 0.67, 57 for 19 -> 0."""
    out = []
    for c, a in zip(completions, answer):
        gold, pred = extract_gsm8k_gold(a), extract_gsm8k_prediction(completion_text(c))
        if gold is None:
            out.append(None)
            continue
        if pred is None or pred.denominator != 1 or pred < 0:
            out.append(0.0)
            continue
        g, p = str(gold.numerator), str(pred.numerator)
        same = sum(1 for i in range(1, min(len(g), len(p)) + 1) if g[-i] == p[-i])
        out.append(same / max(len(g), len(p)))
    return out


scoring.REWARD_FUNCS["digits"] = digit_reward
w = sys.argv[1]
args = sys.argv[sys.argv.index("--") + 1:]
sys.exit(cli.main(["train", "--reward_funcs", "gsm8k,format,digits", "--reward_weights", f"1,0,{w}", *args]))
