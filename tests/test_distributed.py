"""Two CPU processes on gloo take the same optimizer step as one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import test_trainer as tt
from grpo import distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, overrides):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = tt.make_trainer(out_dir, **overrides)  # GRPOConfig reads WORLD_SIZE: built after it is set
    try:
        trainer.train()
        if rank == 0:
            torch.save({n: p.detach().clone() for n, p in trainer.model.named_parameters()}, f"{out_dir}/params.pt")
    finally:
        distributed.destroy(trainer.dist)


# per_device_train_batch_size below is per process: the global generation batch is 8 completions (2 groups of 4)
# in both runs, one group per rank, so the deterministic sampler gives both runs the same data.
@pytest.mark.slow
@pytest.mark.parametrize("loss_type, gas", [("dapo", 2), ("grpo", 1)])
def test_two_processes_take_the_same_step_as_one(tmp_path, loss_type, gas):
    common = dict(max_steps=1, loss_type=loss_type, learning_rate=1e-2, adam_epsilon=1e-3, save_steps=100,
                  gradient_accumulation_steps=gas, steps_per_generation=gas, num_generations=4)
    single = tt.make_trainer(tmp_path / "single", per_device_train_batch_size=8 // gas, **common)
    single_history = single.train()

    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out), dict(common, per_device_train_batch_size=4 // gas)),
             nprocs=2, join=True)
    got = torch.load(out / "params.pt")
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)

    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 1  # only rank 0 writes
    keys = ["reward", "reward_std", "loss", "grad_norm", "num_tokens", "completions/mean_length"]
    if gas == 1:  # per-micro-batch means (entropy) depend on how completions are grouped into micro-batches
        keys.append("entropy")
    for key in keys:
        assert rows[0][key] == pytest.approx(single_history[0][key], rel=1e-5, abs=1e-7), key
    assert os.path.isdir(out / "checkpoint-1") and not os.path.exists(out / "checkpoint-1" / "rng_state_1.pt")
    assert len(torch.load(out / "checkpoint-1" / "rng_state.pt", weights_only=False)) == 2  # every rank's RNG
