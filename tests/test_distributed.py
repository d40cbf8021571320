"""Two CPU processes on gloo take the same optimizer step as one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import test_trainer as tt
from grpo import checkpoint_io, distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make(out_dir, use_lora, overrides):
    if use_lora:
        import test_lora

        # init_lora_weights=False: B starts random, so the policy differs from the reference from step 1 on
        return test_lora.make_lora_trainer(out_dir, peft_config=test_lora.lora_config(init_lora_weights=False),
                                           **overrides)
    return tt.make_trainer(out_dir, **overrides)


def _worker(rank, world, port, out_dir, overrides, use_lora=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = _make(out_dir, use_lora, overrides)  # GRPOConfig reads WORLD_SIZE: built after it is set
    try:
        trainer.train()
        if rank == 0:
            torch.save({n: p.detach().clone() for n, p in trainer.model.named_parameters()}, f"{out_dir}/params.pt")
        distributed.destroy(trainer.dist, wait=True)  # a normal end; the finally's destroy is then a no-op
    finally:
        distributed.destroy(trainer.dist)


# per_device_train_batch_size below is per process: the global generation batch is 8 completions (2 groups of 4)
# in both runs, one group per rank, so the deterministic sampler gives both runs the same data.
@pytest.mark.slow
@pytest.mark.parametrize("loss_type, gas, use_lora", [("dapo", 2, False), ("grpo", 1, False), ("grpo", 1, True)])
def test_two_processes_take_the_same_step_as_one(tmp_path, loss_type, gas, use_lora):
    common = dict(max_steps=1, loss_type=loss_type, learning_rate=1e-2, adam_epsilon=1e-3, save_steps=100,
                  gradient_accumulation_steps=gas, steps_per_generation=gas, num_generations=4)
    if use_lora:  # LoRA + data parallelism: adapter gradients averaged, the KL reference is the base model
        common.update(beta=0.05)
    single = _make(tmp_path / "single", use_lora, dict(common, per_device_train_batch_size=8 // gas))
    single_history = single.train()

    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out), dict(common, per_device_train_batch_size=4 // gas), use_lora),
             nprocs=2, join=True)
    got = torch.load(out / "params.pt")
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)

    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == common["max_steps"]  # only rank 0 writes
    keys = ["reward", "reward_std", "loss", "grad_norm", "num_tokens", "completions/mean_length"]
    if use_lora:
        keys.append("kl")
    for got_row, want_row in zip(rows, single_history):
        for key in keys:
            assert got_row[key] == pytest.approx(want_row[key], rel=1e-5, abs=1e-7), key
        # Per-micro-batch means (entropy) depend on how completions are grouped into micro-batches, and a
        # micro-batch without signal measures none: compare where both runs measured every micro-batch.
        if gas == 1 and got_row.get("zero_signal_ratio") == want_row.get("zero_signal_ratio") == 0.0:
            assert got_row["entropy"] == pytest.approx(want_row["entropy"], rel=1e-5, abs=1e-7)
    if use_lora:
        assert rows[0]["kl"] > 0
        return
    rngs = checkpoint_io.load_rng_states(out / "checkpoint-1")  # every rank's RNG, in one file
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # seeded seed + rank
