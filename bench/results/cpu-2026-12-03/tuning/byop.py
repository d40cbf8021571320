from pathlib import Path
import sys, torch, re
from grpo import model as M, rollout, cli
from grpo.config import GRPOConfig, PRESET_RUNS
from grpo.rewards import gsm8k_reward, equation_reward
torch.set_num_threads(2)
cfg = GRPOConfig.from_preset("default")
rows = cli.load_rows(str(Path(__file__).with_name("tune.jsonl")), "train", cfg, PRESET_RUNS["default"]["instruction"])
model, tok = M.load_model(sys.argv[1]); model.eval()
pids = rollout.tokenize_prompts(tok, [r["prompt"] for r in rows], 256)
out = rollout.hf_generate(model, tok, pids, 40, rollout.eos_token_ids(model, tok), rollout.sampling_kwargs(cfg, temperature=0.0), batch_size=96)
comps = tok.batch_decode(out, skip_special_tokens=True)
ans = [x["answer"] for x in rows]
r = gsm8k_reward(None, completions=comps, answer=ans); e = equation_reward(None, completions=comps, answer=ans)
for op in ("add", "subtract"):
    idx = [i for i, a in enumerate(ans) if op in a]
    print(op, len(idx), "right", sum(r[i] for i in idx), "equation", sum(e[i] for i in idx), "has-minus", sum(" - " in comps[i] for i in idx))
print("acc", sum(r) / len(r), "clipped", sum(len(o) >= 40 for o in out))
for c, a, s in list(zip(comps, ans, r))[:int(sys.argv[2]) if len(sys.argv) > 2 else 0]:
    print(s, a.split(":")[1].split("=")[0].strip(), "->", repr(c))
