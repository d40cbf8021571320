"""Faults and hostile files: checkpoints that would run code, damaged checkpoints, a full disk, two runs in one
output directory, stop signals, and rewards that would silently stop learning."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple

import numpy as np
import pytest
import torch

import test_trainer as tt
from grpo import checkpoint, checkpoint_io, cli, data, run_lock, scoring
from grpo.errors import CheckpointError, RunLockedError, UnscorableRewardsError


# ------------------------------------------------------------------------------------------------------------------
# A finished two-step run with checkpoint-1 and checkpoint-2, copied by each test that damages it.
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    tt.make_trainer(out, max_steps=2, save_steps=1).train()
    return out


@pytest.fixture
def run_dir(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def _resume(out, **overrides):
    cfg = dict(max_steps=3, save_steps=1, **overrides)
    return tt.make_trainer(out, **cfg).train(resume_from_checkpoint="latest")


def _one_line(error) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


class Payload:
    """A pickle that creates `marker` when unpickled: what a tampered checkpoint file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


# ------------------------------------------------------------------------------------------------------------------
# 1. Resuming never unpickles arbitrary objects
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rng_state.pt", "optimizer.pt", "scheduler.pt", "rollout_buffer.pt"])
def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(run_dir, tmp_path, name):
    marker = tmp_path / "payload-ran"
    folder = run_dir / "checkpoint-2"
    if name == "rng_state.pt":  # an older checkpoint's format, where the RNG states were a pickle
        (folder / checkpoint_io.RNG_FILE).unlink()
        torch.save([{"python": Payload(marker)}], folder / name)
    elif name == "rollout_buffer.pt":
        torch.save([[{"prompts": Payload(marker)}]], folder / name)
    else:
        state = torch.load(folder / name, weights_only=True)
        state["hostile"] = Payload(marker)
        torch.save(state, folder / name)
    with pytest.raises(CheckpointError) as e:
        _resume(run_dir)
    message = _one_line(e.value)
    assert message.startswith(f"checkpoint-2/{name} holds pickled Python objects outside the allow-list")
    assert not marker.exists(), "the pickle payload ran"


class ShellPayload:
    def __reduce__(self):
        return os.system, ("true",)  # harmless if it ever ran; the point is the name in the message


def test_the_refused_global_is_named(tmp_path):
    torch.save({"state": ShellPayload()}, tmp_path / "optimizer.pt")
    with pytest.raises(Exception) as e:
        checkpoint_io.load_weights_only(tmp_path / "optimizer.pt")
    assert checkpoint_io.describe_load_error(e.value).startswith(
        f"holds pickled Python objects outside the allow-list ({os.system.__module__}.system)")


def test_dcp_metadata_is_replayed_with_an_allow_list(tmp_path):
    """FSDP checkpoints: torch.distributed.checkpoint unpickles dcp/.metadata without restriction, so it is checked
    first. A real metadata file passes; a hostile one is refused without running."""
    import pickle

    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(3, 5)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    checkpoint_io.check_dcp_metadata(tmp_path / "dcp" / ".metadata")
    marker = tmp_path / "payload-ran"
    (tmp_path / "bad").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(pickle.UnpicklingError, match="refused global pathlib"):
        checkpoint_io.check_dcp_metadata(tmp_path / "bad")
    assert not marker.exists()


def test_rng_states_round_trip_through_safetensors_and_the_legacy_pickle(tmp_path):
    import random

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.standard_normal()  # a cached Gaussian in both generators
    states = [checkpoint.rng_state(), {**checkpoint.rng_state(), "torch": torch.manual_seed(9).get_state()}]
    checkpoint_io.save_rng_states(tmp_path / checkpoint_io.RNG_FILE, states)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(states, legacy / checkpoint_io.LEGACY_RNG_FILE)  # how checkpoints were written before
    for got in (checkpoint_io.load_rng_states(tmp_path), checkpoint_io.load_rng_states(legacy)):
        for want, have in zip(states, got):
            assert have["python"] == want["python"]
            assert have["numpy"][0] == want["numpy"][0] and have["numpy"][2:] == want["numpy"][2:]
            np.testing.assert_array_equal(have["numpy"][1], want["numpy"][1])
            assert have["numpy"][1].dtype == np.uint32
            assert torch.equal(have["torch"], want["torch"])
    checkpoint.set_rng_state(checkpoint_io.load_rng_states(tmp_path)[0])
    draws = (random.random(), np.random.random(), torch.rand(1).item())
    checkpoint.set_rng_state(states[0])
    assert draws == (random.random(), np.random.random(), torch.rand(1).item())


def test_rollout_buffer_round_trips_through_safetensors_and_the_legacy_pickle(tmp_path):
    g = torch.Generator().manual_seed(0)
    micro = {
        "rows": [{"prompt": [{"role": "user", "content": "hi"}], "target": "a", "n": 3}],
        "prompts": [[{"role": "user", "content": "hi"}]], "completions": ["ab"], "completion_id_lists": [[4, 5]],
        "prompt_ids": torch.randint(0, 50, (1, 3), generator=g), "is_truncated": torch.tensor([True]),
        "advantages": torch.randn(1, generator=g), "old_logps": torch.randn(1, 2, generator=g).bfloat16(),
        "ref_logps": None, "num_items_in_batch": 7.0, "extra": {},
    }
    buffers = [[micro, {**micro, "num_items_in_batch": 9.0}], [micro]]
    checkpoint_io.save_rollout_buffer(tmp_path / checkpoint_io.BUFFER_FILE, buffers)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(buffers, legacy / checkpoint_io.LEGACY_BUFFER_FILE)
    for got in (checkpoint_io.load_rollout_buffers(tmp_path), checkpoint_io.load_rollout_buffers(legacy)):
        assert [len(r) for r in got] == [2, 1] and got[0][1]["num_items_in_batch"] == 9.0
        for key, want in micro.items():
            have = got[0][0][key]
            if isinstance(want, torch.Tensor):
                assert have.dtype == want.dtype and torch.equal(have, want), key
            else:
                assert have == want, key
    assert checkpoint_io.load_rollout_buffers(tmp_path / "legacy" / "none") is None


def test_a_checkpoint_in_the_older_pickle_format_still_resumes(run_dir, tmp_path):
    """checkpoint-2 rewritten as before this change (rng_state.pt) resumes like the new format."""
    new = tmp_path / "new"
    shutil.copytree(run_dir, new)
    folder = run_dir / "checkpoint-2"
    torch.save(checkpoint_io.load_rng_states(folder), folder / checkpoint_io.LEGACY_RNG_FILE)
    (folder / checkpoint_io.RNG_FILE).unlink()
    old_rows, new_rows = _resume(run_dir), _resume(new)
    assert [r["loss"] for r in old_rows if "loss" in r] == [r["loss"] for r in new_rows if "loss" in r]


# ------------------------------------------------------------------------------------------------------------------
# 4. Damaged checkpoints and a full disk: one line naming the checkpoint, the file, the cause and what to resume
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json", "scheduler.pt",
                                  checkpoint_io.RNG_FILE])
def test_a_truncated_file_names_the_file_and_the_intact_earlier_checkpoint(run_dir, name):
    path = run_dir / "checkpoint-2" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        _resume(run_dir)
    message = _one_line(e.value)
    assert message.startswith(f"checkpoint-2/{name} is truncated or corrupt"), message
    assert message.endswith(f"checkpoint-1 is complete: --resume_from_checkpoint {run_dir / 'checkpoint-1'}")
    resumed = tt.make_trainer(run_dir, max_steps=3, save_steps=1)
    resumed.train(resume_from_checkpoint=str(run_dir / "checkpoint-1"))
    assert resumed.step == 3


def test_a_missing_file_is_named_too(run_dir):
    (run_dir / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"^checkpoint-2/optimizer.pt is missing; checkpoint-1 is complete"):
        _resume(run_dir)


def test_with_no_intact_checkpoint_the_message_says_so(run_dir):
    for step in (1, 2):
        (run_dir / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"PK")
    with pytest.raises(CheckpointError, match=r"no earlier complete checkpoint in"):
        _resume(run_dir)


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 900672 vs 900560"),  # torch's zip writer
])
def test_disk_full_during_a_save_is_reported_as_such(tmp_path, monkeypatch, failure):
    trainer = tt.make_trainer(tmp_path, max_steps=2, save_steps=1)
    real_save = torch.save

    def save(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt") and ".tmp-checkpoint-2-" in str(path):
            raise failure
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError) as e:
        trainer.train()
    message = _one_line(e.value)
    assert "disk full while writing checkpoint-2/optimizer.pt" in message, message
    assert message.endswith(f"checkpoint-1 is complete: --resume_from_checkpoint {tmp_path / 'checkpoint-1'}")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder, no lock file


def test_another_failing_save_names_the_file_and_cleans_up(tmp_path, monkeypatch):
    trainer = tt.make_trainer(tmp_path, max_steps=1, save_steps=1)
    real_save = torch.save

    def save(obj, path, *a, **k):
        if str(path).endswith("scheduler.pt"):
            raise OSError(errno.EACCES, "Permission denied")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError, match=r"writing checkpoint-1/scheduler.pt failed \(.*Permission denied"):
        trainer.train()
    assert not (tmp_path / "checkpoint-1").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


Usage = namedtuple("Usage", "total used free")


def _small_disk(monkeypatch, root, capacity):
    """shutil.disk_usage of a disk of `capacity` bytes holding only the checkpoints under `root`."""
    def disk_usage(path):
        used = sum(checkpoint.folder_bytes(p) for p in root.glob("checkpoint-*"))
        return Usage(capacity, used, max(0, capacity - used))

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_short_space_prunes_the_oldest_checkpoint_before_saving(tmp_path, monkeypatch):
    """A disk with room for 2.5 checkpoints, save_total_limit=2: checkpoint-1 must go before checkpoint-3 is
    written (the old order, save then prune, needs room for 3)."""
    trainer = tt.make_trainer(tmp_path, max_steps=3, save_steps=1, save_total_limit=2)
    size = {}
    real_save = torch.save

    def save(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt") and ".tmp-checkpoint-3-" in str(path) and \
                (tmp_path / "checkpoint-1").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    original = trainer.save_checkpoint

    def save_checkpoint(**kwargs):
        if trainer.step == 3:
            size["one"] = checkpoint.folder_bytes(tmp_path / "checkpoint-2")
            _small_disk(monkeypatch, tmp_path, int(2.5 * size["one"]))
        original(**kwargs)

    trainer.save_checkpoint = save_checkpoint
    monkeypatch.setattr(torch, "save", save)
    trainer.train()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]


@pytest.mark.parametrize("limit", [1, None])
def test_short_space_never_deletes_the_last_complete_checkpoint(tmp_path, monkeypatch, limit):
    trainer = tt.make_trainer(tmp_path, max_steps=2, save_steps=1, save_total_limit=limit)
    original = trainer.save_checkpoint

    def save_checkpoint(**kwargs):
        if trainer.step == 2:  # room for half a checkpoint beside checkpoint-1
            _small_disk(monkeypatch, tmp_path, int(1.5 * checkpoint.folder_bytes(tmp_path / "checkpoint-1")))
        original(**kwargs)

    trainer.save_checkpoint = save_checkpoint
    with pytest.raises(CheckpointError) as e:
        trainer.train()
    message = _one_line(e.value)
    assert message.startswith("disk full: saving checkpoint-2 needs about"), message
    assert message.endswith(f"checkpoint-1 is complete: --resume_from_checkpoint {tmp_path / 'checkpoint-1'}")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert checkpoint.problem(tmp_path / "checkpoint-1") is None


# ------------------------------------------------------------------------------------------------------------------
# 3. One run per output directory
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def other_run_holding(tmp_path):
    """Another process holding the run lock of tmp_path/"busy" (what a running `grpo train` does)."""
    out = tmp_path / "busy"
    code = ("import sys, time; from grpo import run_lock; run_lock.acquire(sys.argv[1]); print('locked', flush=True); "
            "time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    yield out, holder.pid
    holder.kill()
    holder.wait()


def test_a_second_run_into_a_locked_output_dir_stops_naming_the_holder(other_run_holding):
    out, pid = other_run_holding
    trainer = tt.make_trainer(out, max_steps=1)
    with pytest.raises(RunLockedError, match=rf"in use by another grpo run \(PID {pid} on "):
        trainer.train()
    assert not (out / "metrics.jsonl").exists() and trainer.step == 0


@pytest.mark.slow
def test_the_cli_stops_at_once_with_one_line(other_run_holding):
    out, pid = other_run_holding
    done = subprocess.run([sys.executable, "-m", "grpo", "train", "--preset", "smoke", "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"PID {pid} on " in lines[0], done.stderr
    assert "[grpo] preset=" not in done.stdout  # nothing was loaded


def test_the_lock_is_released_and_removed_after_a_run(tmp_path):
    tt.make_trainer(tmp_path, max_steps=1, save_steps=1).train()
    assert not (tmp_path / run_lock.LOCK_NAME).exists()
    run_lock.acquire(tmp_path)  # free again
    run_lock.acquire(tmp_path)  # and re-entrant within a process
    run_lock.release(tmp_path)
    assert (tmp_path / run_lock.LOCK_NAME).exists()
    run_lock.release(tmp_path)
    assert not (tmp_path / run_lock.LOCK_NAME).exists()


def test_a_file_system_without_locks_runs_with_a_warning(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run_lock.acquire(tmp_path)
    assert "does not support file locks (No locks available)" in capsys.readouterr().err
    run_lock.release(tmp_path)
    assert not (tmp_path / run_lock.LOCK_NAME).exists()


def test_a_fresh_run_refuses_a_dir_with_checkpoints_unless_told(run_dir):
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(RunLockedError, match=r"already holds checkpoints of an earlier run \(checkpoint-1 to "
                                             r"checkpoint-2\): continue it with --resume_from_checkpoint latest"):
        tt.make_trainer(run_dir, max_steps=1, save_steps=5).train()
    assert (run_dir / "metrics.jsonl").read_text() == before  # untouched
    tt.make_trainer(run_dir, max_steps=1, save_steps=5, overwrite_output_dir=True).train()
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["checkpoint-1"]
    assert json.loads((run_dir / "checkpoint-1" / "trainer_state.json").read_text())["max_steps"] == 1


def test_leftovers_of_interrupted_saves_are_removed_at_start(run_dir):
    (run_dir / ".tmp-checkpoint-3-abc").mkdir()
    (run_dir / ".tmp-checkpoint-3-abc" / "optimizer.pt").write_bytes(b"half")
    (run_dir / ".trash-checkpoint-2-xyz").mkdir()
    _resume(run_dir)
    assert not [p for p in os.listdir(run_dir) if p.startswith(".")]


# ------------------------------------------------------------------------------------------------------------------
# 2. Stop signals
# ------------------------------------------------------------------------------------------------------------------
def _signalling_reward(signals_at: dict):
    """letter_a_reward that sends this process the given signals on its n-th call (n = the step it scores). The
    pause after each lets Python run the handler before the next signal (two pending ones would merge)."""
    calls = []

    def letter_a_reward(completions, target, **kwargs):
        calls.append(1)
        for sig in signals_at.get(len(calls), ()):
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
        return tt.letter_a_reward(completions, target)

    return letter_a_reward


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_saves_and_returns(tmp_path, sig):
    before = signal.getsignal(sig)
    trainer = tt.make_trainer(tmp_path, max_steps=6, save_steps=100, save_total_limit=1)
    trainer.reward_funcs = [_signalling_reward({3: [sig]})]
    history = trainer.train()
    assert trainer.step == 3 and trainer.stopped_by_signal == sig.name
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-3"]
    assert signal.getsignal(sig) is before  # handlers restored


def test_a_signal_during_the_last_step_is_reported_too(tmp_path):
    """The run ends anyway; `grpo train` must still learn that it was asked to stop (it skips its evaluation)."""
    trainer = tt.make_trainer(tmp_path, max_steps=2, save_steps=100)
    trainer.reward_funcs = [_signalling_reward({2: [signal.SIGTERM]})]
    trainer.train()
    assert trainer.step == 2 and trainer.stopped_by_signal == "SIGTERM"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-2"]


def test_the_stop_checkpoint_honours_save_total_limit(tmp_path):
    trainer = tt.make_trainer(tmp_path, max_steps=6, save_steps=2, save_total_limit=2)
    trainer.reward_funcs = [_signalling_reward({5: [signal.SIGTERM]})]
    trainer.train()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]


def test_a_second_sigint_aborts_at_once(tmp_path):
    trainer = tt.make_trainer(tmp_path, max_steps=6, save_steps=100)
    trainer.reward_funcs = [_signalling_reward({2: [signal.SIGINT, signal.SIGINT]})]
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        trainer.train()
    assert trainer.step == 1 and checkpoint.list_checkpoints(tmp_path) == []
    assert not (tmp_path / run_lock.LOCK_NAME).exists()


def test_the_cli_exits_130_on_an_abort_and_one_line_on_a_user_error(monkeypatch, capsys):
    def abort(argv):
        raise KeyboardInterrupt("second SIGINT (after SIGINT): stopped at once, without a checkpoint")

    monkeypatch.setattr(cli, "cmd_train", abort)
    with pytest.raises(SystemExit) as e:
        cli.main(["train"])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().startswith("grpo: interrupted: second SIGINT")

    def refuse(argv):
        raise CheckpointError("checkpoint-2/optimizer.pt is missing; no earlier complete checkpoint in x")

    monkeypatch.setattr(cli, "cmd_train", refuse)
    with pytest.raises(SystemExit) as e:  # Python prints the message to stderr and exits with status 1
        cli.main(["train"])
    assert e.value.code == "grpo: checkpoint-2/optimizer.pt is missing; no earlier complete checkpoint in x"


def _cli_train(out, *extra):
    return [sys.executable, "-m", "grpo", "train", "--preset", "smoke", "--no_eval", "--num_threads", "1",
            "--max_steps", "30", "--output_dir", str(out), *extra]


def _train_rows(out):
    return {r["step"]: r for r in tt.read_rows(out / "metrics.jsonl") if "loss" in r}


@pytest.mark.slow
def test_sigterm_to_a_cli_run_saves_exits_0_and_the_resumed_run_matches(tmp_path):
    """A real SIGTERM to `grpo train --preset smoke` (real sampling): exit 0 after a checkpoint and one line;
    resumed, the run's metrics equal those of an uninterrupted run."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = subprocess.run(_cli_train(tmp_path / "full"), capture_output=True, text=True, timeout=600, env=env)
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "stopped"
    proc = subprocess.Popen(_cli_train(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[step 2/30]"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=600)
    lines = "".join(seen) + rest
    assert proc.returncode == 0, lines[-2000:]
    stops = [line for line in lines.splitlines() if "SIGTERM: stopped after step" in line]
    assert len(stops) == 1, lines[-2000:]
    step = int(stops[0].split("stopped after step ")[1].split("/")[0])
    assert 2 <= step < 30 and [p.name for p in checkpoint.list_checkpoints(out)] == [f"checkpoint-{step}"]

    resumed = subprocess.run(_cli_train(out, "--resume_from_checkpoint", "latest"), capture_output=True, text=True,
                             timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = _train_rows(tmp_path / "full"), _train_rows(out)
    assert sorted(got) == sorted(want) == list(range(1, 31))
    for s in range(1, 31):
        for key in ("loss", "reward", "grad_norm", "entropy", "num_tokens"):
            if want[s][key] is None:  # a step whose micro-batches all skipped logs no entropy
                assert got[s][key] is None, (s, key)
            else:
                assert got[s][key] == pytest.approx(want[s][key], rel=1e-6, abs=1e-7), (s, key)


def _signal_rank1_reward(completions, target, **kwargs):
    """Rank 1 alone sends itself SIGUSR1 while scoring step 2."""
    _signal_rank1_reward.calls = getattr(_signal_rank1_reward, "calls", 0) + 1
    if os.environ.get("RANK") == "1" and _signal_rank1_reward.calls == 2:
        os.kill(os.getpid(), signal.SIGUSR1)
    return tt.letter_a_reward(completions, target)


class _OneRankSteers:
    """Rank 0 alone asks for a checkpoint after step 1; rank 1 alone asks to stop after step 2."""

    def on_step_end(self, args, state, control, **kwargs):
        rank = int(os.environ["RANK"])
        if rank == 0 and state.global_step == 1:
            control.should_save = True
        if rank == 1 and state.global_step == 2:
            control.should_training_stop = True


def _stop_worker(rank, world, port, out_dir, by="signal"):
    from grpo import distributed
    from grpo.trainer import GRPOTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    args = tt.make_config(out_dir, max_steps=5, save_steps=100, num_generations=4, per_device_train_batch_size=4)
    trainer = GRPOTrainer("tiny", tt.letter_a_reward, args=args, train_dataset=tt.toy_rows(),
                          callbacks=[_OneRankSteers()] if by == "callback" else None)
    trainer.generate_fn = tt.fake_generate
    if by == "signal":
        trainer.reward_funcs = [_signal_rank1_reward]
    try:
        trainer.train()
        with open(f"{out_dir}/stopped-{rank}.json", "w") as f:
            json.dump({"step": trainer.step, "by": trainer.stopped_by_signal}, f)
        distributed.destroy(trainer.dist, wait=True)  # a normal end; the finally's destroy is then a no-op
    finally:
        distributed.destroy(trainer.dist)


def _two_ranks_stop(out_dir, by: str) -> list[dict]:
    """Runs _stop_worker on two gloo ranks; each rank's step and stop reason when train() returned."""
    import test_distributed
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_stop_worker, args=(2, test_distributed._free_port(), str(out_dir), by), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 600
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks did not finish: they disagreed about saving or stopping")
    return [json.loads((out_dir / f"stopped-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    got = _two_ranks_stop(tmp_path, "signal")
    assert got == [{"step": 2, "by": "a stop signal on another rank"}, {"step": 2, "by": "SIGUSR1"}]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert len(checkpoint_io.load_rng_states(tmp_path / "checkpoint-2")) == 2


@pytest.mark.slow
def test_a_callbacks_save_or_stop_on_one_rank_applies_on_every_rank(tmp_path):
    """Saving and stopping are collectives: a flag one rank's callback sets must not leave the other rank behind."""
    got = _two_ranks_stop(tmp_path, "callback")
    assert got == [{"step": 2, "by": None}, {"step": 2, "by": None}]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert len(checkpoint_io.load_rng_states(tmp_path / "checkpoint-1")) == 2


# ------------------------------------------------------------------------------------------------------------------
# 5. Rewards that would silently stop learning
# ------------------------------------------------------------------------------------------------------------------
PROMPTS = ["p0", "p1", "p2", "p3"]
IDS = [[1], [2], [3], [4]]


@pytest.mark.parametrize("bad, message", [
    (float("nan"), r"'bad' returned nan at index 2; rewards must be finite"),
    (1e39, r"'bad' returned 1e\+39 at index 2 \(beyond float32's range"),
    (-float("inf"), r"'bad' returned -inf at index 2"),
])
def test_non_finite_rewards_name_the_function(bad, message):
    def bad_reward(prompts, **kw):
        return [1.0, None, bad, 0.0]

    bad_reward.__name__ = "bad"
    with pytest.raises(ValueError, match=message):
        scoring.score_completions([bad_reward], PROMPTS, ["a"] * 4, IDS, {}, None)


def test_a_weighted_sum_that_overflows_is_refused():
    def big(prompts, **kw):
        return [3e38, 0.0, 0.0, 1.0]

    with pytest.raises(ValueError, match=r"weighted sum of the rewards of completion 0 is 6e\+38"):
        scoring.score_completions([big, big], PROMPTS, ["a"] * 4, IDS, {}, None)


def test_huge_finite_rewards_still_give_advantages():
    """Rewards near float32's limit: the group std must not overflow to inf (advantages all 0, no signal)."""
    from grpo.advantages import compute_advantages

    adv, _ = compute_advantages(torch.tensor([3e38, -3e38, 0.0, 1e38]), 4, "group")
    x = np.array([3e38, -3e38, 0.0, 1e38])
    want = (x - x.mean()) / (x.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(adv.numpy(), want, rtol=1e-6)


def test_unscorable_batches_warn_each_step_then_stop():
    watch = scoring.UnscorableWatch(3)
    none = torch.full((8,), float("nan"))
    some = torch.tensor([float("nan")] * 7 + [1.0])
    assert "step 1: none of the 8 completions could be scored" in watch.update(none, 1)
    assert "(2 in a row; training stops after 3 in a row)" in watch.update(none, 2)
    assert watch.update(some, 3) is None  # one scorable completion resets the count
    watch.update(none, 4), watch.update(none, 5)
    with pytest.raises(UnscorableRewardsError, match="no completion could be scored in 3 consecutive steps"):
        watch.update(none, 6)
    assert scoring.UnscorableWatch(None).update(none, 1).endswith("(1 in a row)")


def test_a_run_whose_rewards_are_all_none_stops_with_a_clear_error(tmp_path, capsys):
    trainer = tt.make_trainer(tmp_path, max_steps=6, max_unscorable_steps=2)

    def never(completions, **kwargs):
        return [None] * len(completions)

    trainer.reward_funcs = [never]
    with pytest.raises(UnscorableRewardsError, match="no completion could be scored in 2 consecutive steps"):
        trainer.train()
    assert trainer.step == 1
    warnings = [line for line in capsys.readouterr().out.splitlines() if "could be scored" in line]
    assert len(warnings) == 1 and "step 1:" in warnings[0]


def test_truncated_prompts_are_counted_and_warned_about_once(tmp_path, capsys):
    from grpo.model import build_tiny_tokenizer

    rows = [{"prompt": [{"role": "user", "content": ("a " * (40 if i % 4 == 0 else 1)) + str(i)}], "target": "a"}
            for i in range(16)]
    tok = build_tiny_tokenizer()
    texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    limit = 32
    trainer = tt.make_trainer(tmp_path, rows=rows, max_steps=3, max_prompt_length=limit, shuffle_dataset=False)
    history = trainer.train()
    # Without shuffling, step s scores rows 2(s-1) and 2(s-1)+1, each repeated 4 times.
    for row in (r for r in history if "loss" in r):
        picked = [2 * (row["step"] - 1), 2 * (row["step"] - 1) + 1]
        assert row["prompts/truncated_fraction"] == sum(lengths[i] > limit for i in picked) / 2
    assert any(r["prompts/truncated_fraction"] > 0 for r in history if "loss" in r)
    said = [line for line in capsys.readouterr().out.splitlines() if "max_prompt_length=32" in line]
    assert len(said) == 1 and "lose their beginning" in said[0]


def test_empty_prompts_are_refused_at_load_with_the_row_number(tmp_path):
    for empty in ("", "   ", [], [{"role": "user", "content": ""}], None):
        rows = tt.toy_rows()
        rows[3] = {"prompt": empty, "target": "a"}
        with pytest.raises(ValueError, match=r"train_dataset row 4 \(counting from 1\) has an empty prompt"):
            tt.make_trainer(tmp_path, rows=rows)
    with pytest.raises(ValueError, match="row 2: empty prompt"):
        data.to_prompt_rows([{"prompt": "fine"}, {"prompt": " "}], conversational=False)
