"""Stage 7: held-out evaluation — one completion per problem (greedy when eval_temperature is 0), scored by the
reward functions. Returns `eval/rewards/<fn>/mean`, `eval/reward` (weighted total), `eval/accuracy` (fraction of
problems whose first reward function gave >= 1, e.g. the right final answer) and `eval/completions/mean_length`.
Each rank evaluates a contiguous share of the problems; the scores are gathered.
"""

from __future__ import annotations

import math

import torch

from . import distributed, rollout, scoring


def evaluate(model, tokenizer, rows: list[dict], reward_funcs, reward_weights, args, dist_info,
             batch_size: int = 64, generate_fn=rollout.hf_generate) -> dict[str, float]:
    if not rows:
        raise ValueError("evaluate() needs a non-empty eval_dataset")
    rows = rows[: args.eval_max_samples] if args.eval_max_samples else rows
    share = math.ceil(len(rows) / dist_info.world_size)
    local = rows[dist_info.rank * share : (dist_info.rank + 1) * share]

    was_training = model.training
    model.eval()
    prompts = [r["prompt"] for r in local]
    prompt_ids = rollout.tokenize_prompts(tokenizer, prompts, args.max_prompt_length)
    eos_ids = rollout.eos_token_ids(model, tokenizer)
    sampling = rollout.sampling_kwargs(args, temperature=args.eval_temperature)
    completion_ids = generate_fn(model, tokenizer, prompt_ids, args.max_completion_length or 256, eos_ids, sampling,
                                 batch_size=batch_size) if local else []
    model.train(was_training)
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True) if local else []

    names = scoring.reward_func_names(reward_funcs)
    if local:
        columns = {k: [r[k] for r in local] for k in local[0] if k != "prompt"}
        per_func, total = scoring.score_completions(reward_funcs, prompts, completions, completion_ids, columns,
                                                    reward_weights)
    else:
        per_func, total = torch.empty(0, len(names)), torch.empty(0)
    lengths = torch.tensor([float(len(c)) for c in completion_ids])

    gathered = distributed.all_gather_object((per_func, total, lengths), dist_info)
    per_func = torch.cat([g[0] for g in gathered])
    total = torch.cat([g[1] for g in gathered])
    lengths = torch.cat([g[2] for g in gathered])

    metrics = {f"eval/{k}": v for k, v in scoring.reward_metrics(per_func, names).items() if k.endswith("/mean")}
    scored = total[~torch.isnan(total)]
    metrics["eval/reward"] = scored.mean().item() if scored.numel() else float("nan")
    first = per_func[:, 0]
    metrics["eval/accuracy"] = (torch.nan_to_num(first, nan=0.0) >= 1.0).float().mean().item()
    metrics["eval/completions/mean_length"] = lengths.mean().item() if lengths.numel() else 0.0
    metrics["eval/num_samples"] = float(len(rows))
    return metrics
