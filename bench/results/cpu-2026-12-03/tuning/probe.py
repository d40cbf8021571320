from pathlib import Path
import sys, json, torch, re
from grpo import model as M, rollout, cli
from grpo.config import GRPOConfig
from grpo.rewards import gsm8k_reward
torch.set_num_threads(2); torch.manual_seed(0)
cfg = GRPOConfig.from_preset("default")
model, tok = M.load_model(sys.argv[1]); model.eval()
variants = json.load(open(sys.argv[2]))
temps = [float(t) for t in sys.argv[3].split(",")]
for system, instr in variants:
    cfg.system_prompt = system
    rows = cli.load_rows(str(Path(__file__).with_name("tune.jsonl")), "train", cfg, instr)
    sub = [r for r in rows if "subtract" in r["answer"]][:8]
    add = [r for r in rows if "add" in r["answer"]][:4]
    for T in temps:
        for name, rs in (("sub", sub), ("add", add)):
            pids = rollout.tokenize_prompts(tok, [r["prompt"] for r in rs for _ in range(8)], 256)
            out = rollout.hf_generate(model, tok, pids, 40, rollout.eos_token_ids(model, tok), rollout.sampling_kwargs(cfg, temperature=T), batch_size=64)
            comps = tok.batch_decode(out, skip_special_tokens=True)
            r = gsm8k_reward(None, completions=comps, answer=[x["answer"] for x in rs for _ in range(8)])
            minus = sum((" - " in c) for c in comps) / len(comps)
            groups = [sum(r[i*8:(i+1)*8]) for i in range(len(rs))]
            print(f"T={T} {name} acc={sum(r)/len(r):.3f} minus={minus:.2f} groups={groups} sys={str(system)[:20]!r} instr={str(instr)[:30]!r}", flush=True)
    print("  e.g.", repr(comps[0][:150]))
