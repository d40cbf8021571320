from pathlib import Path
import sys, torch
from grpo import model as M, rollout, cli, scoring
from grpo.config import GRPOConfig
torch.set_num_threads(2)
cfg = GRPOConfig.from_preset("default")
instr = sys.argv[3] if len(sys.argv) > 3 else 'Give the final answer on its own line in the form "#### <number>".'
rows = cli.load_rows(str(Path(__file__).with_name("tune.jsonl")), "train", cfg, instr)[: int(sys.argv[2])]
model, tok = M.load_model(sys.argv[1]); model.eval()
pids = rollout.tokenize_prompts(tok, [r["prompt"] for r in rows], 256)
print("prompt len", len(pids[0]), repr(tok.decode(pids[0])))
out = rollout.hf_generate(model, tok, pids, 60, rollout.eos_token_ids(model, tok), rollout.sampling_kwargs(cfg, temperature=0.0), batch_size=64)
comps = tok.batch_decode(out, skip_special_tokens=True)
from grpo.rewards import gsm8k_reward
r = gsm8k_reward(None, completions=comps, answer=[x["answer"] for x in rows])
print("acc", sum(r)/len(r), "mean len", sum(map(len,out))/len(out))
for c, x, s in list(zip(comps, rows, r)): print(s, repr(x["question"][-60:]), "->", repr(c))
