"""Bare two-digit arithmetic, untrained model: three worked examples then "a op b =", plain completion (no chat
template), greedy, 32 sums and 32 differences (a > b) from a seeded generator. Prints exact and within-10 counts.
Usage: python probe_bare_arithmetic.py [MODEL]"""
import random, re, sys
import torch
from grpo import model as M

torch.set_num_threads(2)
model, tok = M.load_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"); model.eval()
SHOTS = {"+": "23 + 45 = 68\n57 + 36 = 93\n18 + 74 = 92\n", "-": "68 - 23 = 45\n93 - 57 = 36\n92 - 18 = 74\n"}
rng = random.Random(0)
for op in ("+", "-"):
    exact = near = 0
    for _ in range(32):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and a < b:
            a, b = b, a
        gold = a + b if op == "+" else a - b
        ids = tok(SHOTS[op] + f"{a} {op} {b} =", return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        m = re.search(r"-?\d+", text)
        got = int(m.group()) if m else None
        exact += got == gold
        near += got is not None and abs(got - gold) <= 10
    print(f"{op}: exact {exact}/32, within 10 {near}/32", flush=True)
