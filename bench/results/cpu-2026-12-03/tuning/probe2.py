from pathlib import Path
import sys, json, torch, re
from grpo import model as M, rollout, cli
from grpo.config import GRPOConfig
from grpo.rewards import gsm8k_reward
torch.set_num_threads(2); torch.manual_seed(0)
cfg = GRPOConfig.from_preset("default")
from grpo.config import PRESET_RUNS
model, tok = M.load_model(sys.argv[1]); model.eval()
rows = cli.load_rows(str(Path(__file__).with_name("tune.jsonl")), "train", cfg, PRESET_RUNS["default"]["instruction"])
sub = [r for r in rows if "subtract" in r["answer"]][:12]
T = float(sys.argv[2]) if len(sys.argv) > 2 else 0.7
pids = rollout.tokenize_prompts(tok, [r["prompt"] for r in sub for _ in range(8)], 256)
out = rollout.hf_generate(model, tok, pids, 40, rollout.eos_token_ids(model, tok), rollout.sampling_kwargs(cfg, temperature=T), batch_size=96)
comps = tok.batch_decode(out, skip_special_tokens=True)
golds = [x["answer"] for x in sub for _ in range(8)]
r = gsm8k_reward(None, completions=comps, answer=golds)
eq = []
for c, g in zip(comps, golds):
    a, b = re.search(r"(\d+) - (\d+)", g).groups()
    eq.append(bool(re.search(rf"\b{a}\s*-\s*{b}\b", c)))
print(f"T={T} acc={sum(r)/len(r):.3f} eq={sum(eq)/len(eq):.3f} groups_eq={[sum(eq[i*8:(i+1)*8]) for i in range(len(sub))]}")
for c, e, rr in list(zip(comps, eq, r))[:24]:
    print(int(e), rr, repr(c[:120]))
