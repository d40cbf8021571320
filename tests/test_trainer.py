"""The GRPO loop on a tiny random Llama (CPU): end-to-end runs, stage semantics, and the math the loop owns
(completion alignment, gradient-accumulation normalizers). Kernel numerics are tested in the kernel test files."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter

import pytest
import torch
from transformers import TrainerCallback

from grpo import checkpoint, cli, rollout, update
from grpo.config import GRPOConfig
from grpo.model import build_tiny_tokenizer, load_model
from grpo.trainer import GRPOTrainer

TRAIN_KEYS = {
    "step", "reward", "reward_std", "frac_reward_zero_std", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
    "clip_ratio/region_mean", "completions/mean_length", "completions/min_length", "completions/max_length",
    "completions/clipped_ratio", "loss", "grad_norm", "learning_rate", "num_tokens", "step_time", "time/generation",
    "time/scoring", "time/update", "tokens_per_second",
}


# ------------------------------------------------------------------------------------------------------------------
# Helpers shared with test_checkpoint.py and test_distributed.py (imported as a module there).
# ------------------------------------------------------------------------------------------------------------------
def toy_rows(n=16):
    return [{"prompt": [{"role": "user", "content": f"Write a {i}"}], "target": "a"} for i in range(n)]


def letter_a_reward(completions, target, **kwargs):
    texts = [c[-1]["content"] for c in completions]
    return [sum(ch == t for ch in text) / max(1, len(text)) for text, t in zip(texts, target)]


def fake_generate(model, tokenizer, prompt_ids, max_new_tokens, eos_ids, sampling, batch_size=None):
    """A deterministic sampler: the k-th copy of a prompt in the call gets a completion seeded by (prompt, k).

    Independent of the torch RNG and of how a batch is split, so runs that see the same groups see the same data."""
    specials = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in specials]
    seen, out = Counter(), []
    for ids in prompt_ids:
        key = tuple(ids)
        g = random.Random(hash((key, seen[key])))
        seen[key] += 1
        if g.random() < 0.7:  # terminated: EOS somewhere within the budget
            n = g.randint(1, max_new_tokens)
            out.append([g.choice(vocab) for _ in range(n - 1)] + [eos_ids[0]])
        else:  # truncated: the whole budget, no EOS
            out.append([g.choice(vocab) for _ in range(max_new_tokens)])
    return out


def make_config(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, max_completion_length=6,
                max_prompt_length=32, learning_rate=1e-3, max_steps=2, save_steps=100, lr_scheduler_type="constant",
                disable_progress_bar=True, seed=7, logging_steps=1)
    base.update(overrides)
    return GRPOConfig(**base)


def make_trainer(tmp_path, fake=True, rows=None, **overrides):
    args = make_config(tmp_path, **overrides)
    trainer = GRPOTrainer("tiny", letter_a_reward, args=args, train_dataset=rows or toy_rows())
    if fake:
        trainer.generate_fn = fake_generate
    return trainer


def read_rows(path):
    return [json.loads(line) for line in open(path)]


# ------------------------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------------------------
def test_cli_smoke_run_writes_metrics_checkpoints_and_curve(tmp_path):
    out = tmp_path / "smoke"
    cli.main(["train", "--preset", "smoke", "--output_dir", str(out), "--model", "tiny", "--dataset", "toy",
              "--reward_funcs", "toy", "--reward_weights", "none", "--max_steps", "2", "--save_steps", "1",
              "--eval_max_samples", "4", "--log_completions", "true", "--num_completions_to_print", "0"])
    rows = [r for r in read_rows(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        missing = (TRAIN_KEYS | {"rewards/letter_a_reward/mean", "rewards/letter_a_reward/std"}) - set(r)
        assert not missing, missing
        assert r["num_tokens"] > 0 and r["completions/max_length"] <= 8
    assert rows[1]["num_tokens"] > rows[0]["num_tokens"]  # cumulative
    for step in (1, 2):
        ckpt = out / f"checkpoint-{step}"
        for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "scheduler.pt",
                     "rng_state.safetensors", "trainer_state.json"):
            assert (ckpt / name).is_file(), f"{ckpt}/{name}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["step"] == step and state["config"]["max_steps"] == 2
    assert (out / "reward_curve.png").stat().st_size > 1000
    completions = read_rows(out / "completions.jsonl")
    assert {"step", "prompt", "completion", "rewards", "advantage"} <= set(completions[0])
    assert len(completions) == 2 * 8
    results = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= results["after"]["eval/accuracy"] <= 1.0


def test_reward_rises_on_toy_task(tmp_path):
    """Real sampling from the tiny model; reward = fraction of 'a' characters. Fixed seed, so deterministic."""
    trainer = make_trainer(tmp_path, fake=False, num_generations=8, per_device_train_batch_size=32,
                           max_completion_length=8, learning_rate=3e-3, max_steps=24, loss_type="dapo")
    history = trainer.train()
    rewards = [r["reward"] for r in history if "reward" in r]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.15, rewards


def test_kl_and_old_logps_paths(tmp_path):
    # num_iterations=2 with gas=1: the second pass sees a policy that moved, so old log-probs are needed.
    trainer = make_trainer(tmp_path, beta=0.1, num_iterations=2, max_steps=2, learning_rate=5e-3, epsilon=0.01)
    seen = {}
    original = update.micro_step

    def spy(model, loss_fn, mb, args, world_size):
        seen.setdefault("old", mb.old_logps is not None)
        seen.setdefault("ref", mb.ref_logps is not None)
        return original(model, loss_fn, mb, args, world_size)

    update.micro_step, saved = spy, update.micro_step
    try:
        history = trainer.train()
    finally:
        update.micro_step = saved
    assert seen == {"old": True, "ref": True}
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert all("kl" in r for r in history)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert history[1]["kl"] > 0.0
    assert history[1]["clip_ratio/region_mean"] > 0.0  # second pass over the same batch: ratios moved past 1±0.01


class EventRecorder(TrainerCallback):
    """A transformers TrainerCallback that also records grpo's phase events."""

    def __init__(self):
        self.events = []

    def _add(self, name, state, logs=None):
        self.events.append((name, state.global_step, logs is not None and "loss" in logs))

    def on_train_begin(self, args, state, control, **kwargs):
        self._add("on_train_begin", state)

    def on_train_end(self, args, state, control, **kwargs):
        self._add("on_train_end", state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._add("on_step_begin", state)

    def on_step_end(self, args, state, control, **kwargs):
        self._add("on_step_end", state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._add("on_log", state, logs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._add("on_evaluate", state)

    def on_save(self, args, state, control, **kwargs):
        self._add("on_save", state)

    def on_phase_begin(self, args, state, control, phase, **kwargs):
        self.events.append(("begin", phase))

    def on_phase_end(self, args, state, control, phase, **kwargs):
        self.events.append(("end", phase))


def test_callbacks_see_the_phases_in_order(tmp_path):
    # num_iterations=2, beta>0: step 1 generates, scores and computes old/ref log-probs; step 2 reuses that batch.
    recorder = EventRecorder()
    args = make_config(tmp_path, beta=0.1, num_iterations=2, max_steps=2)
    trainer = GRPOTrainer("tiny", letter_a_reward, args=args, train_dataset=toy_rows(), callbacks=[recorder])
    trainer.generate_fn = fake_generate
    trainer.train()
    phases = [("begin", "generation"), ("end", "generation"), ("begin", "scoring"), ("end", "scoring"),
              ("begin", "logprobs"), ("end", "logprobs"), ("begin", "update"), ("end", "update")]
    assert recorder.events == [
        ("on_train_begin", 0, False),
        ("on_step_begin", 0, False), *phases, ("on_step_end", 1, False), ("on_log", 1, True),
        ("on_step_begin", 1, False), ("begin", "update"), ("end", "update"), ("on_step_end", 2, False),
        ("on_log", 2, True), ("on_save", 2, False),
        ("on_train_end", 2, False),
    ]


class StopAt(TrainerCallback):
    """Asks the trainer to stop in `event` once global_step reaches `step`, by setting the flag or by returning a
    new TrainerControl (transformers honours both)."""

    def __init__(self, event, step, returns=False):
        self.event, self.step, self.returns, self.seen = event, step, returns, []

    def _maybe_stop(self, event, state, control):
        self.seen.append((event, state.global_step))
        if event == self.event and state.global_step >= self.step:
            if self.returns:  # a new object, which the loop must then read instead of its own
                return dataclasses.replace(control, should_training_stop=True)
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        return self._maybe_stop("on_step_end", state, control)

    def on_log(self, args, state, control, **kwargs):
        return self._maybe_stop("on_log", state, control)

    def on_evaluate(self, args, state, control, **kwargs):
        return self._maybe_stop("on_evaluate", state, control)

    def on_save(self, args, state, control, **kwargs):
        self.seen.append(("on_save", state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        self.seen.append(("on_train_end", state.global_step))


@pytest.mark.parametrize("event,returns", [("on_step_end", False), ("on_log", False), ("on_evaluate", False),
                                           ("on_step_end", True)])
def test_should_training_stop_ends_the_run_after_the_step_with_a_checkpoint(tmp_path, capsys, event, returns):
    stopper = StopAt(event, 2, returns)
    args = make_config(tmp_path, max_steps=4, save_steps=100, eval_strategy="steps", eval_steps=1,
                       eval_max_samples=2)
    trainer = GRPOTrainer("tiny", letter_a_reward, args=args, train_dataset=toy_rows(), eval_dataset=toy_rows(4),
                          callbacks=[stopper])
    trainer.generate_fn = fake_generate
    history = trainer.train()
    assert trainer.step == 2 and trainer.stopped_by_signal is None
    assert [r["step"] for r in history if "loss" in r] == [1, 2]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    assert stopper.seen[-2:] == [("on_save", 2), ("on_train_end", 2)]
    assert "a callback set should_training_stop: stopped after step 2/4" in capsys.readouterr().out


class Steer(TrainerCallback):
    """At step 1: save and evaluate although the config does not ask to, and do not log."""

    def __init__(self):
        self.saves, self.evals = [], []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            control.should_save = control.should_evaluate = True
            control.should_log = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evals.append((state.global_step, "eval/accuracy" in metrics))

    def on_save(self, args, state, control, **kwargs):
        self.saves.append(state.global_step)


def test_should_save_evaluate_and_log_steer_the_step(tmp_path):
    steer = Steer()
    args = make_config(tmp_path, max_steps=2, save_steps=100, logging_steps=1, eval_max_samples=2)
    trainer = GRPOTrainer("tiny", letter_a_reward, args=args, train_dataset=toy_rows(), eval_dataset=toy_rows(4),
                          callbacks=[steer])
    trainer.generate_fn = fake_generate
    trainer.train()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert steer.saves == [1, 2] and steer.evals == [(1, True)]
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [2]  # step 1's metrics go into step 2's row
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [1]


def test_a_callback_returning_something_else_is_named(tmp_path):
    class Returns(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            return True

    args = make_config(tmp_path)
    trainer = GRPOTrainer("tiny", letter_a_reward, args=args, train_dataset=toy_rows(), callbacks=[Returns()])
    with pytest.raises(TypeError, match="Returns.on_train_begin returned a bool"):
        trainer.train()


def test_callbacks_must_be_a_list_of_instances(tmp_path):
    args = make_config(tmp_path)
    with pytest.raises(TypeError, match="callbacks\\[0\\] is the class EventRecorder"):
        GRPOTrainer("tiny", letter_a_reward, args=args, train_dataset=toy_rows(), callbacks=[EventRecorder])
    with pytest.raises(TypeError, match="defines none of"):
        GRPOTrainer("tiny", letter_a_reward, args=args, train_dataset=toy_rows(), callbacks=[object()])
    with pytest.raises(TypeError, match="callbacks must be a list"):
        GRPOTrainer("tiny", letter_a_reward, args=args, train_dataset=toy_rows(), callbacks=EventRecorder())


def test_no_old_logps_when_batch_is_used_within_one_step(tmp_path):
    trainer = make_trainer(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1)
    trainer.train()
    assert all(mb.old_logps is None and mb.ref_logps is None for mb in trainer.buffer)


def test_high_entropy_mask_keeps_the_top_quantile_of_completion_tokens():
    """TRL's rule: keep completion tokens whose entropy is at least the (1 - q) quantile (linear interpolation) of
    the completion tokens' entropies; padding is never kept. (Parity with TRL itself: tests/test_trl_parity.py.)"""
    g = torch.Generator().manual_seed(0)
    entropy = torch.rand(3, 7, generator=g) * 5
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    entropy[mask == 0] = 99.0  # padding with a huge entropy must still be dropped
    values = sorted(entropy[mask.bool()].tolist())  # 14 tokens
    for q in (0.2, 0.5, 1.0):
        pos = (1 - q) * (len(values) - 1)
        lo = int(pos)
        threshold = values[lo] + (values[min(lo + 1, len(values) - 1)] - values[lo]) * (pos - lo)
        keep = update.high_entropy_mask(entropy, mask, q)
        expected = [[bool(m) and e >= threshold for e, m in zip(er, mr)] for er, mr in zip(entropy.tolist(),
                                                                                            mask.tolist())]
        assert keep.tolist() == expected, q
        assert int(keep.sum()) == len(values) - lo - (1 if pos > lo else 0)
    assert not update.high_entropy_mask(entropy, torch.zeros_like(mask), 0.5).any()


def test_top_entropy_quantile_trains(tmp_path):
    trainer = make_trainer(tmp_path, top_entropy_quantile=0.2, max_steps=1, beta=0.04)
    row = trainer.train()[-1]
    assert all(torch.isfinite(torch.tensor([row["loss"], row["grad_norm"], row["kl"]])))


def test_reward_weights_must_match_functions(tmp_path):
    with pytest.raises(ValueError, match="reward_weights"):
        make_trainer(tmp_path, reward_weights=[1.0, 0.5])


def test_evaluate_reports_accuracy_per_reward(tmp_path):
    args = make_config(tmp_path, eval_max_samples=5)
    trainer = GRPOTrainer("tiny", [letter_a_reward, letter_a_reward], args=args, train_dataset=toy_rows(),
                          eval_dataset=toy_rows(9))
    trainer.generate_fn = fake_generate
    metrics = trainer.evaluate()
    assert metrics["eval/num_samples"] == 5
    assert {"eval/accuracy", "eval/reward", "eval/rewards/letter_a_reward/mean",
            "eval/rewards/letter_a_reward_2/mean"} <= set(metrics)
    assert metrics["eval/reward"] == pytest.approx(2 * metrics["eval/rewards/letter_a_reward/mean"], rel=1e-5)


def test_eval_steps_logs_eval_rows(tmp_path):
    args = make_config(tmp_path, eval_strategy="steps", eval_steps=1, eval_max_samples=3)
    trainer = GRPOTrainer("tiny", letter_a_reward, args=args, train_dataset=toy_rows(), eval_dataset=toy_rows(4))
    trainer.generate_fn = fake_generate
    trainer.train()
    evals = [r for r in read_rows(tmp_path / "metrics.jsonl") if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [1, 2]


# ------------------------------------------------------------------------------------------------------------------
# Stage semantics
# ------------------------------------------------------------------------------------------------------------------
def test_prompt_sampler_follows_repeat_sampler_order():
    s = rollout.PromptSampler(num_rows=10, prompts_per_batch=3, num_generations=2, seed=5)
    assert s.batches_per_epoch == 3
    epoch = [s.next_batch() for _ in range(3)]
    for batch in epoch:  # groups of num_generations identical indices, back to back
        assert len(batch) == 6 and all(batch[i] == batch[i + 1] for i in range(0, 6, 2))
    firsts = [i for b in epoch for i in b[::2]]
    assert len(set(firsts)) == 9  # no prompt twice in an epoch; the incomplete tail (1 prompt) is dropped
    state = s.state_dict()
    nxt = s.next_batch()
    assert s.epoch == 1 and sorted(set(nxt)) != sorted(set(epoch[0]))  # a fresh permutation next epoch
    t = rollout.PromptSampler(num_rows=10, prompts_per_batch=3, num_generations=2, seed=5)
    t.load_state_dict(state)
    assert t.next_batch() == nxt
    unshuffled = rollout.PromptSampler(10, 3, 2, seed=5, shuffle=False)
    assert unshuffled.next_batch() == [0, 0, 1, 1, 2, 2]
    assert rollout.rank_slice(list(range(8)), 1, 2) == [4, 5, 6, 7]


def test_rollout_masks_and_truncation(tmp_path):
    model, tok = load_model("tiny")
    eos = tok.eos_token_id
    completions = [[20, 21, eos, 22], [20, 21, 22, 23], [eos]]  # EOS then junk | truncated | immediate EOS

    def scripted(model, tokenizer, prompt_ids, max_new, eos_ids, sampling, batch_size=None):
        return [c[: c.index(eos) + 1] if eos in c else c for c in completions]  # what hf_generate returns

    rows = [{"prompt": "ab"}, {"prompt": [{"role": "user", "content": "xyz"}]}, {"prompt": "q"}]
    for masked in (False, True):
        args = make_config(tmp_path, max_completion_length=4, mask_truncated_completions=masked)
        b = rollout.generate_rollout(model, tok, rows, args, scripted)
        assert b.is_truncated.tolist() == [False, True, False]
        expect = [[1, 1, 1, 0], [0 if masked else 1] * 4, [1, 0, 0, 0]]
        assert b.completion_mask.tolist() == expect
        assert b.completion_ids[0, :3].tolist() == [20, 21, eos] and b.completion_ids[0, 3] == tok.pad_token_id
        assert b.prompt_mask[0].tolist()[-2:] == [1, 1] and b.prompt_mask[0, 0] == 0  # left padded
        assert b.completions[1] == [{"role": "assistant", "content": tok.decode([20, 21, 22, 23])}]
    # The chat template with the generation prompt is what the model sees for conversational prompts.
    ids = rollout.tokenize_prompts(tok, [rows[1]["prompt"]])[0]
    assert tok.decode(ids) == "<|user|>xyz\n<|assistant|>"
    assert len(rollout.tokenize_prompts(tok, ["x" * 50], max_prompt_length=7)[0]) == 7


def test_hf_generate_cuts_after_first_eos_and_respects_budget():
    model, tok = load_model("tiny")
    model.eval()
    torch.manual_seed(0)
    prompts = rollout.tokenize_prompts(tok, ["hello", "a much longer prompt here"])
    outs = rollout.hf_generate(model, tok, prompts, 12, [tok.eos_token_id], rollout.sampling_kwargs(
        make_config("/tmp/unused", temperature=1.5)))
    for c in outs:
        assert 1 <= len(c) <= 12
        assert tok.eos_token_id not in c[:-1]


@pytest.mark.parametrize("sampling", [{"do_sample": False}, {"do_sample": True, "temperature": 0.9, "top_k": 0}])
def test_hf_generate_prefills_each_distinct_prompt_once(monkeypatch, sampling):
    """Repeated prompts are prefilled once and their KV cache is copied to their rows: the same tokens as plain
    generate() on every row, greedy and sampled from the same seed; a batch of distinct prompts does not share."""
    from transformers import GenerationConfig, LogitsProcessorList

    from grpo import shared_prompts
    from grpo.sampler import split_sampling

    model, tok = load_model("tiny")
    model.eval()
    prefills = []
    real = shared_prompts.shared_prefill
    monkeypatch.setattr(shared_prompts, "shared_prefill",
                        lambda *a: prefills.append(len(torch.unique(a[1], dim=0))) or real(*a))
    prompts = [[5, 6, 7, 8, 9], [11, 12], [3, 4, 5, 6, 7, 8, 9, 10]]
    rows = [p for p in prompts for _ in range(3)] + [[1, 2, 3]]  # groups of 3 and a lone prompt
    eos = rollout.eos_token_ids(model, tok)
    torch.manual_seed(1)
    got = rollout.hf_generate(model, tok, rows, 12, eos, sampling)
    ids, mask = rollout.pad(rows, tok.pad_token_id, "left")
    options, processors = split_sampling(sampling)  # the same sampler as hf_generate's
    config = GenerationConfig(max_new_tokens=12, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                              use_cache=True, disable_compile=True, **options)
    torch.manual_seed(1)
    plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                           logits_processor=LogitsProcessorList(processors))[:, ids.shape[1]:].tolist()
    assert prefills == [4]  # one prefill of the 4 distinct prompts
    assert [p[: len(g)] for g, p in zip(got, plain)] == got
    rollout.hf_generate(model, tok, prompts, 4, eos, sampling)
    assert prefills == [4, 3]  # distinct prompts: shared_prefill finds nothing to share (and returns None)
    assert real(model.get_decoder(), *rollout.pad(prompts, tok.pad_token_id, "left")) is None


def test_completion_logps_match_full_logits():
    """Hidden state p predicts token p+1: the completion log-probs equal log_softmax of the model's own logits."""
    model, tok = load_model("tiny")
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompts = [[int(x) for x in torch.randint(10, 90, (n,), generator=g)] for n in (3, 7, 5)]
    prompts.append(prompts[1])  # a repeated prompt takes the shared-prefix path
    comps = [[int(x) for x in torch.randint(10, 90, (n,), generator=g)] for n in (4, 2, 6, 5)]
    p_ids, p_mask = rollout.pad(prompts, tok.pad_token_id, "left")
    c_ids, c_mask = rollout.pad(comps, tok.pad_token_id, "right")
    batch = rollout.Rollout(rows=[{}] * 4, prompts=[""] * 4, completions=[""] * 4, completion_id_lists=comps,
                            prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_mask=c_mask,
                            is_truncated=torch.zeros(4, dtype=torch.bool))
    args = make_config("/tmp/unused", temperature=0.7, per_device_train_batch_size=4)
    got = update.per_token_logps(model, batch, args)
    for i, (p, c) in enumerate(zip(prompts, comps)):  # each sequence alone, unpadded, full logits in float64
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0].double() / 0.7
        ref = torch.log_softmax(logits[len(p) - 1 : len(p) + len(c) - 1], -1).gather(1, torch.tensor(c)[:, None])[:, 0]
        torch.testing.assert_close(got[i, : len(c)].double(), ref, rtol=1e-4, atol=1e-4)


def test_shared_prompt_forward_equals_full_forward():
    """Repeated prompts run once and their KV cache is expanded (the fast path): same hidden states and
    gradients as running every row's prompt + completion (the path taken under gradient checkpointing)."""
    model, tok = load_model("tiny")
    model.train()
    g = torch.Generator().manual_seed(3)
    prompts = [[int(x) for x in torch.randint(10, 90, (n,), generator=g)] for n in (5, 9, 3)]
    rows = [prompts[i] for i in torch.randperm(12, generator=g).remainder(3).tolist()]  # repeated, shuffled
    lengths = torch.randint(1, 7, (12,), generator=g)
    comps = [[int(x) for x in torch.randint(10, 90, (n,), generator=g)] for n in lengths]
    p_ids, p_mask = rollout.pad(rows, tok.pad_token_id, "left")
    c_ids, c_mask = rollout.pad(comps, tok.pad_token_id, "right")
    batch = rollout.Rollout(rows=[{}] * 12, prompts=[""] * 12, completions=[""] * 12, completion_id_lists=comps,
                            prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_mask=c_mask,
                            is_truncated=torch.zeros(12, dtype=torch.bool))
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        hidden = update.completion_hidden(model, batch)
        (hidden * c_mask[..., None]).pow(3).sum().backward()
        results.append((hidden.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        model.zero_grad()
    (h_fast, g_fast), (h_full, g_full) = results
    torch.testing.assert_close(h_fast, h_full, rtol=1e-5, atol=1e-5)
    assert len(g_fast) == len(g_full)
    for a, b in zip(g_fast, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * b.abs().max().item())


def test_micro_step_normalizers_follow_trl(tmp_path):
    """dapo: the loss of a micro-batch is sum(token losses) / (N_global * gas / (W * spg)); grpo: mean / gas."""
    import grpo_kernels.reference as ref

    model, tok = load_model("tiny")
    g = torch.Generator().manual_seed(1)
    comps = [[int(x) for x in torch.randint(10, 90, (n,), generator=g)] for n in (4, 2, 6, 3)]
    p_ids, p_mask = rollout.pad([[20, 21, 22]] * 4, tok.pad_token_id, "left")
    c_ids, c_mask = rollout.pad(comps, tok.pad_token_id, "right")
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    batch = rollout.Rollout(rows=[{}] * 4, prompts=[""] * 4, completions=[""] * 4, completion_id_lists=comps,
                            prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_mask=c_mask,
                            is_truncated=torch.zeros(4, dtype=torch.bool), advantages=adv, num_items_in_batch=40.0)
    for loss_type, gas, spg, world in (("dapo", 2, 4, 1), ("dapo", 1, 2, 2), ("grpo", 4, 4, 1), ("bnpo", 2, 2, 1)):
        args = make_config(tmp_path, loss_type=loss_type, gradient_accumulation_steps=gas,
                           per_device_train_batch_size=4, steps_per_generation=spg, num_generations=2)
        loss, _ = update.micro_step(model, update.make_loss_fn(args), batch, args, world)
        model.zero_grad()
        with torch.no_grad():
            hidden = update.completion_hidden(model, batch).double()
        weight = model.get_output_embeddings().weight.detach().double()
        if loss_type == "dapo":
            expect, _ = ref.reference_fused_linear_grpo_loss(hidden, weight, c_ids, c_mask, adv.double(),
                                                             num_items_in_batch=40.0 * gas / (world * spg),
                                                             loss_type="dapo")
        else:
            expect, _ = ref.reference_fused_linear_grpo_loss(hidden, weight, c_ids, c_mask, adv.double(),
                                                             loss_type=loss_type)
            expect = expect / gas
        assert loss == pytest.approx(float(expect), rel=1e-4, abs=1e-7), (loss_type, gas, spg, world)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, loss_type):
    """The same generation batch as 2 accumulated micro-batches or 1 batch gives the same update (TRL's
    normalizers are chosen for this; bnpo is the one loss type where they differ)."""
    params = []
    for pdb, gas in ((8, 1), (4, 2)):
        trainer = make_trainer(tmp_path / f"{pdb}", per_device_train_batch_size=pdb, gradient_accumulation_steps=gas,
                               max_steps=1, loss_type=loss_type, learning_rate=1e-2,
                               adam_epsilon=1e-3)  # update ~ g for small g: compares gradients, not signs
        trainer.train()
        params.append(torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    trainer = make_trainer(tmp_path, bf16=True, max_steps=1)
    history = trainer.train()
    assert next(trainer.model.parameters()).dtype == torch.float32  # fp32 master weights
    assert history[0]["grad_norm"] > 0


def test_tiny_tokenizer_round_trips():
    tok = build_tiny_tokenizer()
    text = "Q: 12 + 7?\n#### 19"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|user|>hi\n<|assistant|>"


def test_report_to_tensorboard(tmp_path):
    import importlib.util

    trainer = make_trainer(tmp_path, max_steps=1, report_to="tensorboard")
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.warns(UserWarning, match="tensorboard is not installed"):
            trainer.train()
    else:
        trainer.train()
        assert any((tmp_path / "runs").iterdir())
    assert (tmp_path / "metrics.jsonl").is_file()  # metrics.jsonl is written either way


def test_model_names_resolve_locally(tmp_path):
    from grpo.model import resolve_model_dir

    assert resolve_model_dir("tiny") is None and resolve_model_dir("tiny-random") is None
    with pytest.raises(FileNotFoundError, match="hub downloads are not used"):
        resolve_model_dir(str(tmp_path / "nowhere"))
    model, tok = load_model("tiny", model_init_kwargs={"torch_dtype": "bfloat16"})
    assert next(model.parameters()).dtype == torch.bfloat16 and tok.padding_side == "left"
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_model("tiny", model_init_kwargs={"dtype": "float77"})
