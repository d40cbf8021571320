"""Step-for-step parity with TRL 1.16's GRPOTrainer (trl==1.16.0, from the `test` extra; skipped without TRL).

Both trainers run on the same tiny random Llama (built here, no hub), two prompts of different lengths (so left
padding matters) and eight fixed completions (some ending in EOS, some cut at max_completion_length); only
sampling is replaced, on both sides. Each side keeps its own defaults for every loss setting; the settings pinned
equal are bookkeeping (batch shape, steps, logging, output) plus TRL's bf16 (its default, True, refuses to run on
a CPU) and max_completion_length (TRL 512 vs ours 256: the completions here are 6 tokens and dr_grpo divides by
it). We compare, step by step: the logged loss, grad_norm and metrics, every parameter's gradient (after clipping,
as the optimizer sees it) and the weights after AdamW.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch

from grpo import update
from grpo.config import DIFFERS_FROM_TRL, OURS_ONLY, GRPOConfig
from grpo.model import build_tiny_model, build_tiny_tokenizer
from grpo.trainer import GRPOTrainer

trl = pytest.importorskip("trl", reason="TRL parity needs trl==1.16.0: pip install -e '.[test]'")

PROMPTS = ["Write a short poem about the sea, please.", "Hi"]
MCL = 6  # max_completion_length on both sides
NUM_GENERATIONS = 4
TIMING_KEYS = ("step_time", "tokens_per_second", "train_runtime", "epoch")
PER_MICRO_BATCH_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
GRAD_TOL = 1e-5  # relative, per parameter tensor (measured: ≤ 6e-7)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not trl.__version__.startswith("1.16."):  # installed but another version: the baseline moved, not absent
        pytest.fail(f"tests/test_trl_parity.py needs trl==1.16.* (pip install -e '.[test]'), found {trl.__version__}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add spin-wait overhead on a shared 2-core machine
    tok = build_tiny_tokenizer()
    policy = build_tiny_model(tok, seed=0)
    ref = copy.deepcopy(policy)  # a reference that differs from the policy, so the KL term is not zero
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ref_dir = tmp_path_factory.mktemp("ref")
    ref.save_pretrained(ref_dir)
    tok.save_pretrained(ref_dir)

    eos = tok.eos_token_id
    vocab = [i for i in range(len(tok)) if i not in set(tok.all_special_ids)]
    g = torch.Generator().manual_seed(3)

    def completion(n, ends_in_eos):
        ids = [vocab[int(i)] for i in torch.randint(len(vocab), (n,), generator=g)]
        return ids[:-1] + [eos] if ends_in_eos else ids

    lengths = [[(MCL, False), (3, True), (MCL, True), (MCL, False)], [(2, True), (MCL, False), (5, True), (1, True)]]
    table = {tuple(tok(p)["input_ids"]): [completion(n, e) for n, e in spec] for p, spec in zip(PROMPTS, lengths)}
    assert len({len(k) for k in table}) == 2  # different prompt lengths: left padding matters
    yield dict(tok=tok, policy=policy, ref=ref, ref_dir=str(ref_dir), table=table, tmp=tmp_path_factory)
    torch.set_num_threads(threads)


def completions_for(table, prompt_ids):
    """The k-th occurrence of a prompt in a call gets that prompt's k-th completion (independent of order)."""
    seen, out = {}, []
    for ids in prompt_ids:
        key = tuple(ids)
        k = seen.get(key, 0)
        seen[key] = k + 1
        out.append(list(table[key][k % NUM_GENERATIONS]))
    return out


def reward(completions, completion_ids, **kwargs):
    return [float((sum(c) * 7) % 13) / 13 for c in completion_ids]


def shared_settings(overrides):
    base = dict(per_device_train_batch_size=8, num_generations=NUM_GENERATIONS, max_completion_length=MCL,
                max_steps=1, logging_steps=1)
    base.update(overrides)
    return base


def run_trl(setup, **overrides):
    from transformers import TrainerCallback

    class GrabGradients(TrainerCallback):
        def __init__(self):
            self.grads = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    import datasets

    model = copy.deepcopy(setup["policy"])
    model.config._name_or_path = setup["ref_dir"]  # TRL loads its reference model from the policy's path
    args = trl.GRPOConfig(output_dir=str(setup["tmp"].mktemp("trl")), use_cpu=True, bf16=False, report_to="none",
                          save_strategy="no", disable_tqdm=True, **shared_settings(overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=build_tiny_tokenizer(),
                                  train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]))
        table = setup["table"]
        trainer._generate_single_turn = lambda prompt_ids, *a, **k: (completions_for(table, prompt_ids), None)
        grab = GrabGradients()
        trainer.add_callback(grab)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return logs, grab.grads, {n: after[n] - before[n] for n in before}


def run_ours(setup, **overrides):
    model = copy.deepcopy(setup["policy"])
    args = GRPOConfig(output_dir=str(setup["tmp"].mktemp("ours")), disable_progress_bar=True, save_steps=1000,
                      **shared_settings(overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model, reward, args=args, processing_class=build_tiny_tokenizer(),
                              train_dataset=[{"prompt": p} for p in PROMPTS])
        table = setup["table"]
        trainer.generate_fn = lambda model, tok, prompt_ids, *a, **k: completions_for(table, prompt_ids)
        if trainer.ref_model is not None:
            trainer.ref_model = copy.deepcopy(setup["ref"]).eval().requires_grad_(False)
        grads, step = [], trainer.optimizer.step

        def step_and_record(*a, **k):
            grads.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})
            return step(*a, **k)

        trainer.optimizer.step = step_and_record
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        logs = trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return logs, grads, {n: after[n] - before[n] for n in before}


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a - b).norm() / max(b.norm().item(), 1e-30)).item()


def assert_same_run(ours, theirs, metric_tol=2e-5, weight_tol=1e-2, skip=()):
    (o_logs, o_grads, o_delta), (t_logs, t_grads, t_delta) = ours, theirs
    assert len(o_logs) == len(t_logs) == len(o_grads) == len(t_grads) >= 1
    for step, (o, t) in enumerate(zip(o_logs, t_logs), start=1):
        shared = [k for k in t if k in o and k not in TIMING_KEYS + skip and isinstance(t[k], (int, float))]
        assert {"loss", "grad_norm"} <= set(shared) and (step > 1 or "reward" in shared)
        assert all(k in o for k in ("entropy", *skip) if k in t), f"step {step}: a metric TRL logs is missing"
        for k in shared:
            tol = metric_tol * max(1.0, abs(t[k]))
            assert math.isfinite(o[k]) and abs(o[k] - t[k]) <= tol, f"step {step} {k}: ours {o[k]!r}, TRL {t[k]!r}"
        for k in ("kl", "clip_ratio/region_mean", "cispo_clip_ratio", "policy_loss", "entropy_coef"):
            assert (k in o) == (k in t), f"step {step}: metric {k} logged by only one side"
    for step, (og, tg) in enumerate(zip(o_grads, t_grads), start=1):
        assert og.keys() == tg.keys()
        worst = max((rel(og[n], tg[n]), n) for n in og)
        assert worst[0] <= GRAD_TOL, f"step {step}: gradient of {worst[1]} differs by {worst[0]:.2e} (relative)"
    # AdamW's first steps move each weight by about lr·g/(|g| + eps): entries with |g| near eps amplify the
    # gradients' last digits, so the weights get a looser bound (a wrong lr, schedule or decay is off by O(1)).
    worst = max((rel(o_delta[n], t_delta[n]), n) for n in o_delta)
    assert worst[0] <= weight_tol, f"weight change of {worst[1]} differs by {worst[0]:.2e} (relative)"


# ------------------------------------------------------------------------------------------------------------------
def test_every_shared_default_is_trls_or_listed():
    if trl is None:
        pytest.fail("needs trl==1.16.0 (pip install trl==1.16.0)")
    theirs = {f.name: f for f in dataclasses.fields(trl.GRPOConfig)}
    ours = GRPOConfig()
    unlisted = []
    for f in dataclasses.fields(GRPOConfig):
        if f.name not in theirs:
            assert f.name in OURS_ONLY, f"{f.name} is not a trl.GRPOConfig field: add it to OURS_ONLY with a reason"
            continue
        assert f.name not in OURS_ONLY, f"{f.name} is a trl.GRPOConfig field but listed in OURS_ONLY"
        t = theirs[f.name]
        default = t.default_factory() if t.default is dataclasses.MISSING else t.default
        if f.name == "bf16":
            default = True  # TRL's __post_init__: None -> not fp16 -> True
        mine = ours._given[f.name] if f.name in ("epsilon_high", "generation_batch_size", "steps_per_generation",
                                                  "eval_steps") else getattr(ours, f.name)
        if f.name == "bf16":
            mine = GRPOConfig.__dataclass_fields__["bf16"].default  # None = auto
        same = mine == default  # 1.0 == 1 as well: a float field whose TRL default is written as an int
        if not same and f.name not in DIFFERS_FROM_TRL:
            unlisted.append(f"{f.name}: ours {mine!r}, TRL {default!r}")
        if same and f.name in DIFFERS_FROM_TRL:
            unlisted.append(f"{f.name} is listed in DIFFERS_FROM_TRL but equals TRL's default {default!r}")
    assert not unlisted, "defaults that differ from TRL 1.16 without being documented: " + "; ".join(unlisted)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_one_step_matches_trl_at_each_sides_defaults(setup, loss_type, beta):
    ours = run_ours(setup, loss_type=loss_type, beta=beta)
    theirs = run_trl(setup, loss_type=loss_type, beta=beta)
    assert_same_run(ours, theirs)
    if beta:
        assert ours[0][0]["kl"] > 1e-4  # the reference really differs from the policy


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_accumulation_and_reused_rollouts_match_trl(setup, loss_type):
    # Two micro-batches per optimizer step (each loss scaled for accumulation) and each rollout used for two
    # optimizer steps (old log-probs from before the first one; a large lr so the second step's ratios move), with
    # weight decay (neither side decays norm weights).
    # adam_epsilon is pinned (both sides) at 1e-3: AdamW's first update lr·g/(|g| + eps) turns the last digits of
    # gradient entries with |g| near eps into weight differences, and with the default 1e-8 the second step's
    # grad_norm then differs by ~2e-4 (relative) for that reason alone.
    settings = dict(loss_type=loss_type, beta=0.04, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    num_iterations=2, max_steps=2, learning_rate=0.05, adam_epsilon=1e-3,
                    weight_decay=0.1)
    ours, theirs = run_ours(setup, **settings), run_trl(setup, **settings)
    # Per-token metrics are logged as the mean over micro-batches of each micro-batch's masked mean (both sides),
    # so they depend on how the generation batch was shuffled into micro-batches, which each side does with its
    # own RNG stream. The loss, the gradients and the rollout metrics do not.
    assert_same_run(ours, theirs, skip=PER_MICRO_BATCH_METRICS)
    clip = [row["clip_ratio/region_mean"] for row in ours[0]]
    assert clip[0] == 0.0 and clip[1] > 0.0  # the second pass really runs off-policy (ratios clipped)


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "token"), ("grpo", "sequence"),
                                              ("vespo", "token")])
def test_top_entropy_quantile_matches_trl(setup, loss_type, level):
    settings = dict(loss_type=loss_type, beta=0.04, top_entropy_quantile=0.5, importance_sampling_level=level)
    ours, theirs = run_ours(setup, **settings), run_trl(setup, **settings)
    assert_same_run(ours, theirs)
    full = run_ours(setup, loss_type=loss_type, beta=0.04, importance_sampling_level=level)
    assert rel(ours[1][0]["lm_head.weight"], full[1][0]["lm_head.weight"]) > 1e-2  # the mask does something


def plain_linear_logprobs(hidden, weight, targets, bias=None, temperature=1.0, return_entropy=False, **kwargs):
    """Full-logits log-probs and a differentiable entropy in plain torch (a stand-in for the kernels' entropy)."""
    logits = hidden.float() @ weight.float().T + (0.0 if bias is None else bias.float())
    logp_all = (logits / temperature).log_softmax(-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return (logp, -(logp_all.exp() * logp_all).sum(-1)) if return_entropy else logp


@pytest.mark.parametrize("entropy_source", ["grpo_kernels", "plain torch"])
def test_entropy_bonus_matches_trl(setup, monkeypatch, entropy_source):
    """entropy_coef (TRL's static control) with the top-entropy mask: TRL's loss, gradients and metrics.

    "grpo_kernels" uses gk.linear_logprobs' entropy as shipped (differentiable); "plain torch" swaps in a
    full-logits entropy to check the trainer's side of the bonus on its own."""
    import grpo_kernels as gk

    # One micro-batch per step: the quantile threshold and the bonus' mean are per micro-batch (TRL's too), so
    # with accumulation they depend on how each side shuffles the batch into micro-batches.
    settings = dict(loss_type="grpo", beta=0.04, top_entropy_quantile=0.5, entropy_coef=0.05)
    if entropy_source == "plain torch":
        monkeypatch.setattr(gk, "linear_logprobs", plain_linear_logprobs)
    ours, theirs = run_ours(setup, **settings), run_trl(setup, **settings)
    assert_same_run(ours, theirs)
    row = ours[0][0]
    assert row["entropy_coef"] == 0.05 and abs(row["loss"] - row["policy_loss"]) > 1e-3  # the bonus counts


# ------------------------------------------------------------------------------------------------------------------
# Deliberate differences from TRL 1.16
# ------------------------------------------------------------------------------------------------------------------
def test_position_ids_follow_generate_with_absolute_position_embeddings(tmp_path):
    """On a GPT-2-style model (learned absolute positions), the trainer's log-probs equal the sampler's; TRL's way
    of scoring (no position_ids: positions counted from the start of the left-padded row) does not on padded rows.
    For RoPE models both ways give the same numbers (the parity tests above run a Llama)."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    from grpo import rollout

    tok = build_tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
        with torch.no_grad():
            model.transformer.wpe.weight.normal_(0.0, 0.5)  # positions that matter, as in a trained model
    sampled = {}

    def generate(model, tokenizer, prompt_ids, max_new_tokens, eos_ids, sampling, batch_size=None):
        ids, mask = rollout.pad(prompt_ids, tokenizer.pad_token_id, "left")
        gen = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids, output_logits=True,
                               return_dict_in_generate=True)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        completions = out.sequences[:, ids.shape[1]:]
        logp = torch.stack(out.logits, 1).float().log_softmax(-1)
        sampled["logp"] = logp.gather(-1, completions.unsqueeze(-1)).squeeze(-1)
        return completions.tolist()

    args = GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=4,
                      max_completion_length=5)
    rows = [{"prompt": p} for p in ("A much longer prompt, so the other row is padded.", "Hi") for _ in range(2)]
    batch = rollout.generate_rollout(model, tok, rows, args, generate)
    assert bool(batch.completion_mask.all()) and not bool(batch.prompt_mask.all())  # left padding in play
    ours = update.per_token_logps(model, batch, args)  # shared-prompt KV-cache path (prompts repeat)
    assert (ours - sampled["logp"]).abs().max() < 1e-5

    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    with torch.no_grad():  # TRL 1.16's scoring: no position_ids
        logits = model(input_ids=ids, attention_mask=mask).logits[:, batch.prompt_ids.shape[1] - 1 : -1].float()
    trl_way = logits.log_softmax(-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    gap = (trl_way - sampled["logp"]).abs().amax(1)
    assert gap[:2].max() < 1e-5 and gap[2:].min() > 1e-2  # unpadded rows agree, padded rows do not


def test_a_trailing_pad_token_is_not_a_terminator(tmp_path):
    """Completions end at the first EOS; one that uses the whole budget is truncated even when its last sampled
    token is the pad token (pad ≠ EOS here). TRL 1.16 counts such a completion as terminated; generate() does not
    stop at the pad token, so the budget cut it."""
    from grpo import rollout

    tok = build_tiny_tokenizer()
    assert tok.pad_token_id != tok.eos_token_id
    model = build_tiny_model(tok)
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    lists = [[a, b, tok.pad_token_id], [a, tok.eos_token_id], [a, tok.pad_token_id, b], [a, b, a]]
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4,
                      max_completion_length=3, mask_truncated_completions=True)
    batch = rollout.generate_rollout(model, tok, [{"prompt": "x"}] * 4, args, lambda *a, **k: [list(c) for c in lists])
    assert batch.is_truncated.tolist() == [True, False, True, True]
    assert batch.completion_mask.sum(1).tolist() == [0, 2, 0, 0]
