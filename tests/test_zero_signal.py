"""A micro-batch without learning signal (beta 0, every advantage 0) skips the backbone's forward and backward but
leaves the same gradients (zeros), parameters, clip metrics and data-parallel all-reduce as the full forward +
backward; its entropy is not measured."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

import test_distributed as td
import test_trainer as tt
from grpo import distributed, rollout, update
from grpo.model import load_model


@pytest.fixture(autouse=True)
def _one_thread():  # thousands of tiny ops: intra-op threads only add spin-waits on a busy 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(tok, advantages, lengths=(4, 2, 6, 3)):
    g = torch.Generator().manual_seed(3)
    comps = [[int(x) for x in torch.randint(10, 90, (n,), generator=g)] for n in lengths]
    n = len(lengths)
    p_ids, p_mask = rollout.pad([[20, 21, 22]] * 2 + [[30, 31]] * (n - 2), tok.pad_token_id, "left")
    c_ids, c_mask = rollout.pad(comps, tok.pad_token_id, "right")
    return rollout.Rollout(rows=[{}] * n, prompts=[""] * n, completions=[""] * n, completion_id_lists=comps,
                           prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_mask=c_mask,
                           is_truncated=torch.zeros(n, dtype=torch.bool), advantages=torch.tensor(advantages),
                           num_items_in_batch=30.0)


def _run(model, args, batch, skip, forwards=None):
    """(loss, metric sums, gradients, number of backward gradient accumulations) of one micro_step; the backbone's
    forward calls are appended to `forwards`."""
    model.zero_grad(set_to_none=True)
    calls = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: calls.append(1)) for p in model.parameters()]
    seen = forwards if forwards is not None else []
    hooks.append(model.get_decoder().register_forward_hook(lambda *a: seen.append(1)))
    try:
        loss, sums = update.micro_step(model, update.make_loss_fn(args), batch, args, 1, skip_zero_signal=skip)
    finally:
        for h in hooks:
            h.remove()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return loss, sums, grads, len(calls)


def _entropy_reference(model, batch, temperature):
    """Masked mean entropy of the completion tokens' distributions, float64, from full logits."""
    with torch.no_grad():
        hidden = update.completion_hidden(model, batch).double()
    logits = hidden @ model.get_output_embeddings().weight.detach().double().T / temperature
    logp = torch.log_softmax(logits, -1)
    ent = -(logp.exp() * logp).sum(-1)
    mask = batch.completion_mask.double()
    return float((ent * mask).sum() / mask.sum())


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "sapo"])
def test_zero_signal_micro_batch_skips_backward_same_gradients_and_metrics(tmp_path, loss_type):
    model, tok = load_model("tiny")
    model.train()
    args = tt.make_config(tmp_path, loss_type=loss_type, per_device_train_batch_size=4, num_generations=2,
                          temperature=0.9)
    batch = _batch(tok, [0.0, 0.0, 0.0, 0.0])
    assert not update.has_signal(batch, args)

    forwards_s, forwards_f = [], []
    loss_s, sums_s, grads_s, backward_s = _run(model, args, batch, skip=True, forwards=forwards_s)
    loss_f, sums_f, grads_f, backward_f = _run(model, args, batch, skip=False, forwards=forwards_f)
    assert backward_s == 0 and backward_f > 0  # the skipped path ran no backward
    assert forwards_s == [] and forwards_f  # and no forward
    assert loss_s == 0.0 and loss_f == 0.0
    for gs, gf in zip(grads_s, grads_f):  # the full backward of a zero loss gives exact zeros; so does the skip
        assert gs is not None and gf is not None
        assert torch.equal(gs, gf) and not gs.any()
    assert sums_s["zero_signal_ratio"] == (1.0, 1.0) and sums_f["zero_signal_ratio"] == (0.0, 1.0)
    assert set(sums_s) == set(sums_f)  # same metric names: ranks reduce them together
    for name in sums_f:
        if name not in ("zero_signal_ratio", "entropy"):
            assert sums_s[name] == pytest.approx(sums_f[name], rel=1e-6, abs=1e-9), name
    assert sums_s["entropy"] == (0.0, 0.0)  # not measured: it counts no tokens in the step's mean
    tokens = float(batch.completion_mask.sum())
    entropy = sums_f["entropy"][0] / sums_f["entropy"][1]
    assert sums_f["entropy"][1] == tokens and entropy > 0.1
    assert entropy == pytest.approx(_entropy_reference(model, batch, 0.9), rel=1e-4)


def test_signal_is_not_skipped(tmp_path):
    model, tok = load_model("tiny")
    args = tt.make_config(tmp_path, per_device_train_batch_size=4, num_generations=2)
    one_live = _batch(tok, [0.0, 0.0, 0.7, -0.7])
    assert update.has_signal(one_live, args)
    loss, sums, grads, backward = _run(model, args, one_live, skip=True)
    assert backward > 0 and sums["zero_signal_ratio"] == (0.0, 1.0) and any(g.any() for g in grads)
    # KL: beta != 0 gives a gradient even when every advantage is 0
    kl_args = tt.make_config(tmp_path, per_device_train_batch_size=4, num_generations=2, beta=0.1)
    zero = _batch(tok, [0.0] * 4)
    zero.ref_logps = update.per_token_logps(model, zero, kl_args) + 0.05 * torch.randn(4, zero.completion_ids.shape[1])
    assert update.has_signal(zero, kl_args)
    _, sums, grads, backward = _run(model, kl_args, zero, skip=True)
    assert backward > 0 and "kl" in sums and any(g.any() for g in grads)
    # an advantage on a row without tokens carries no signal
    empty_live = _batch(tok, [0.0, 0.0, 0.0, 0.5])
    empty_live.completion_mask[3] = 0
    assert not update.has_signal(empty_live, args)


def _const_first_prompt_reward(prompts, completions, const, **kwargs):
    """Rows with const=True score 0.5 for every completion (a zero-signal group); others: the completion's length
    in characters (the deterministic sampler varies it within a group)."""
    texts = [c[-1]["content"] for c in completions]
    return [0.5 if k else len(t) / 20 for t, k in zip(texts, const)]


def _rows(period):
    """Prompts in order (shuffle is off): `period` zero-signal prompts, then `period` live ones, and so on."""
    return [{"prompt": [{"role": "user", "content": f"Write a {i}"}], "const": (i // period) % 2 == 0}
            for i in range(16)]


def _trainer(out, period=1, **overrides):
    args = tt.make_config(out, shuffle_dataset=False, **overrides)
    from grpo.trainer import GRPOTrainer

    trainer = GRPOTrainer("tiny", _const_first_prompt_reward, args=args, train_dataset=_rows(period))
    trainer.generate_fn = tt.fake_generate
    return trainer


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("gas", [1, 2])
def test_training_with_skipped_micro_batches_equals_training_without(tmp_path, monkeypatch, gas):
    """Generation batches alternate between all zero-signal prompts and all live ones (micro-batches mix the
    groups of a generation batch, as TRL shuffles them): every odd step skips all its backwards."""
    common = dict(num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=gas,
                  steps_per_generation=gas, max_steps=8 // gas, learning_rate=1e-2, weight_decay=0.1, period=gas)
    results, original = [], update.micro_step
    for skip in (True, False):
        monkeypatch.setattr(update, "micro_step", functools.partial(original, skip_zero_signal=skip))
        trainer = _trainer(tmp_path / str(skip), **common)
        before = _params(trainer.model)
        history = trainer.train()
        monkeypatch.undo()
        results.append((before, _params(trainer.model), history))
    (b_s, p_s, h_s), (b_f, p_f, h_f) = results
    for a, b in zip(p_s, p_f):
        assert torch.equal(a, b)  # bit-identical: the skip changes no number
    assert any(not torch.equal(a, b) for a, b in zip(b_s, p_s))  # and training did move the parameters
    train_s = [r for r in h_s if "loss" in r]
    train_f = [r for r in h_f if "loss" in r]
    for rs, rf in zip(train_s, train_f):
        assert set(rs) == set(rf)
        for key in set(rs) - {"zero_signal_ratio", "step_time", "tokens_per_second"} - {k for k in rs if "time" in k}:
            if key == "entropy" and rs["zero_signal_ratio"] == 1.0:  # a step that skipped every micro-batch
                assert rs[key] is None and rf[key] > 0.1
                continue
            assert rs[key] == pytest.approx(rf[key], rel=1e-6, abs=1e-9), key
    expected = [1.0, 0.0] * (4 // gas)
    assert [r["zero_signal_ratio"] for r in train_s] == expected
    assert [r["grad_norm"] == 0.0 for r in train_s] == [x == 1.0 for x in expected]
    assert all(r["zero_signal_ratio"] == 0.0 for r in train_f)


def test_zero_signal_step_leaves_parameters_unchanged(tmp_path):
    """Only zero-signal groups in the first step: AdamW's first step on zero gradients moves nothing."""
    trainer = _trainer(tmp_path, num_generations=4, per_device_train_batch_size=4, max_steps=1)
    before = _params(trainer.model)
    (row,) = [r for r in trainer.train() if "loss" in r]
    for a, b in zip(before, _params(trainer.model)):
        assert torch.equal(a, b)
    assert row["loss"] == 0.0 and row["grad_norm"] == 0.0 and row["zero_signal_ratio"] == 1.0
    assert row["entropy"] is None and row["reward_std"] == 0.0  # no forward ran: no entropy to log


def _skip_worker(rank, world, port, out_dir, overrides):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = _trainer(out_dir, **overrides)
    try:
        trainer.train()
        if rank == 0:
            torch.save(_params(trainer.model), f"{out_dir}/params.pt")
        distributed.destroy(trainer.dist, wait=True)  # a normal end; the finally's destroy is then a no-op
    finally:
        distributed.destroy(trainer.dist)


@pytest.mark.slow
@pytest.mark.parametrize("gas", [1, 2])
def test_data_parallel_rank_with_zero_signal_still_all_reduces(tmp_path, gas):
    """Rank 0 holds the zero-signal group and skips every micro-batch, rank 1 the live one: the all-reduce still
    pairs up and the step equals one process on the same global batch."""
    import torch.multiprocessing as mp

    common = dict(num_generations=4, max_steps=1, learning_rate=1e-2, adam_epsilon=1e-3,
                  gradient_accumulation_steps=gas, steps_per_generation=gas)
    single = _trainer(tmp_path / "single", per_device_train_batch_size=8 // gas, **common)
    single.train()
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_skip_worker, args=(2, td._free_port(), str(out), dict(common, per_device_train_batch_size=4 // gas)),
             nprocs=2, join=True)
    got = torch.load(out / "params.pt")
    for a, b in zip(got, _params(single.model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    (row,) = [json.loads(line) for line in open(out / "metrics.jsonl")]
    # rank 0's micro-batches all skipped (at least half of all); a live group's micro-batch may hold only
    # completions whose advantage is 0 and skip too
    assert row["zero_signal_ratio"] >= 0.5 and row["grad_norm"] > 0
