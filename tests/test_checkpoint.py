"""Checkpoints: exact resumption, atomic writes, pruning, tied weights."""

from __future__ import annotations

import json
import os

import pytest
import torch

import test_trainer as tt
from grpo import checkpoint
from grpo.model import load_model

COMPARED = ("loss", "reward", "grad_norm", "entropy", "reward_std", "completions/mean_length", "num_tokens")


class Killed(Exception):
    pass


def _kill_after_step(trainer, step):
    """Make the run die right after optimizer step `step` is logged (and checkpointed, if it is a save step)."""
    original = trainer.save_checkpoint

    def save_then_maybe_die(**kwargs):
        original(**kwargs)
        if trainer.step == step:
            raise Killed

    trainer.save_checkpoint = save_then_maybe_die


def _train_rows(path):
    return {r["step"]: r for r in tt.read_rows(path / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize(
    "overrides, kill_at",
    [
        # one generation batch per step; killed right after the checkpoint of step 2
        (dict(save_steps=2), 2),
        # a generation batch spans two steps (steps_per_generation=2): the checkpoint of step 1 must carry the
        # half-consumed batch (rollout_buffer.pt) for step 2 to see the same micro-batch
        (dict(save_steps=1, per_device_train_batch_size=4, steps_per_generation=2), 1),
    ],
)
def test_resume_continues_exactly(tmp_path, overrides, kill_at):
    """Real sampling (the torch RNG drives it): the resumed run's metrics equal the uninterrupted run's."""
    cfg = dict(max_steps=4, learning_rate=5e-3, **overrides)
    full = tt.make_trainer(tmp_path / "full", fake=False, **cfg)
    full.train()
    expected = _train_rows(tmp_path / "full")

    killed = tt.make_trainer(tmp_path / "resumed", fake=False, **cfg)
    _kill_after_step(killed, kill_at)
    with pytest.raises(Killed):
        killed.train()
    assert checkpoint.list_checkpoints(tmp_path / "resumed")[-1].name == f"checkpoint-{kill_at}"

    resumed = tt.make_trainer(tmp_path / "resumed", fake=False, **cfg)
    resumed.train(resume_from_checkpoint="latest")
    got = _train_rows(tmp_path / "resumed")
    assert sorted(got) == [1, 2, 3, 4]  # no duplicated or missing rows in metrics.jsonl
    for step in range(kill_at + 1, 5):
        for key in (k for k in COMPARED if k in expected[step]):  # reward etc. only on steps that generate
            if expected[step][key] is None:  # e.g. the entropy of a step whose micro-batches all had no signal
                assert got[step][key] is None, (step, key)
                continue
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-7), (step, key)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_resume_rewrites_rows_logged_after_the_checkpoint(tmp_path):
    trainer = tt.make_trainer(tmp_path, max_steps=4, save_steps=2)
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    # Pretend the run had been killed after logging step 4 but before checkpoint-4 existed.
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-4")
    resumed = tt.make_trainer(tmp_path, max_steps=4, save_steps=2)
    resumed.train(resume_from_checkpoint=str(ckpt))
    steps = [r["step"] for r in tt.read_rows(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_partial_folders_are_never_taken_for_checkpoints(tmp_path):
    trainer = tt.make_trainer(tmp_path, max_steps=2, save_steps=1)
    trainer.train()
    (tmp_path / ".tmp-checkpoint-9-abc").mkdir()  # what a kill during a save leaves behind
    (tmp_path / "checkpoint-7").mkdir()  # a folder without trainer_state.json is not a checkpoint
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert checkpoint.resolve_checkpoint("latest", tmp_path).name == "checkpoint-2"
    with pytest.raises(FileNotFoundError):
        checkpoint.resolve_checkpoint(tmp_path / "checkpoint-7", tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.resolve_checkpoint("latest", tmp_path / "empty")


def test_save_total_limit_prunes_the_oldest(tmp_path):
    trainer = tt.make_trainer(tmp_path, max_steps=4, save_steps=1, save_total_limit=2)
    trainer.train()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and len([r for r in state["log_history"] if "loss" in r]) == 4


def test_saving_the_same_step_again_replaces_it(tmp_path):
    from safetensors.torch import load_file

    trainer = tt.make_trainer(tmp_path, max_steps=1, save_steps=1)
    trainer.train()
    with torch.no_grad():
        trainer.model.model.norm.weight.fill_(0.625)  # a value training never produces
    trainer.save_checkpoint()
    saved = load_file(str(tmp_path / "checkpoint-1" / "model.safetensors"))["model.norm.weight"]
    assert torch.all(saved == 0.625)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_tied_weights_round_trip(tmp_path):
    model, tok = load_model("tiny")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    other, _ = load_model("tiny", seed=3)
    other.config.tie_word_embeddings = True
    other.lm_head.weight = other.model.embed_tokens.weight
    checkpoint.load_model_weights(other, tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    assert other.lm_head.weight is other.model.embed_tokens.weight


def test_resume_refuses_another_world_size(tmp_path):
    trainer = tt.make_trainer(tmp_path, max_steps=1, save_steps=1)
    trainer.train()
    state_file = tmp_path / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["world_size"] = 2
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="same number of processes"):
        tt.make_trainer(tmp_path, max_steps=2, save_steps=1).train(resume_from_checkpoint="latest")
