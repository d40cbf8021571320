"""Greedy accuracy of the untrained model on the 96-problem tuning slice (train split) under several prompt formats,
by operation. Usage: python probe_formats.py [MODEL] [THREADS] [FORMATS]"""
import json, re, sys, time, torch
from pathlib import Path
from grpo import model as M, rollout
from grpo.config import GRPOConfig
from grpo.rewards import gsm8k_reward
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
cfg = GRPOConfig.from_preset("default")
model, tok = M.load_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"); model.eval()
rows = [json.loads(l) for l in open(Path(__file__).resolve().parent.parent / "cpu-2026-12-03" / "tuning" / "tune.jsonl")]
INSTR = 'Give the final answer on its own line in the form "#### <number>".'
SHOTS = [
    ("Tom had 47 apples and got 38 more. How many apples does Tom have now?",
     "47 + 38 = 40 + 30 + 7 + 8 = 70 + 15 = 85\n#### 85"),
    ("A jar held 62 cards. Ann removed 27 of them. How many cards were left in the jar?",
     "62 - 27 = 62 - 20 - 7 = 42 - 7 = 35\n#### 35"),
]
def fmt_base(q): return [{"role": "user", "content": f"{q}\n\n{INSTR}"}]
def fmt_shots(q):
    m = []
    for sq, sa in SHOTS:
        m += [{"role": "user", "content": f"{sq}\n\n{INSTR}"}, {"role": "assistant", "content": sa}]
    return m + [{"role": "user", "content": f"{q}\n\n{INSTR}"}]
SHOTS2 = [(q, a.split("=")[0].strip() + " = " + a.split("\n")[-1][5:] + "\n" + a.split("\n")[-1]) for q, a in SHOTS]
def fmt_shots_plain(q):
    m = []
    for sq, sa in SHOTS2:
        m += [{"role": "user", "content": f"{sq}\n\n{INSTR}"}, {"role": "assistant", "content": sa}]
    return m + [{"role": "user", "content": f"{q}\n\n{INSTR}"}]
FMTS = {"base": fmt_base, "shots-decomp": fmt_shots, "shots-plain": fmt_shots_plain}
which = sys.argv[3].split(",") if len(sys.argv) > 3 else list(FMTS)
for name in which:
    f = FMTS[name]
    texts = [f(r["question"]) for r in rows]
    t = time.time()
    pids = rollout.tokenize_prompts(tok, texts, 512)
    out = rollout.hf_generate(model, tok, pids, 48, rollout.eos_token_ids(model, tok), {"do_sample": False}, batch_size=96)
    comps = tok.batch_decode(out, skip_special_tokens=True)
    r = gsm8k_reward(None, completions=comps, answer=[x["answer"] for x in rows])
    sub = ["subtract" in x["answer"] or " - " in x["answer"] for x in rows]
    a = sum(v for v, s in zip(r, sub) if not s); n_a = sum(1 for s in sub if not s)
    b = sum(v for v, s in zip(r, sub) if s); n_b = sum(sub)
    print(f"{name}: acc {sum(r)/len(r):.3f}  add {a:.0f}/{n_a}  sub {b:.0f}/{n_b}  prompt tokens {len(pids[0])}  {time.time()-t:.0f}s", flush=True)
    for c in comps[:6]: print("   ", repr(c[:150]))
