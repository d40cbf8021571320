"""Checkpoints and outputs follow the umask (0644 files, 0755 folders under umask 022), as save_pretrained does."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from grpo import cli
from grpo.permissions import current_umask, honour_umask


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)

    before = os.umask(0o022)
    yield set_mask
    os.umask(before)


def _modes(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.stat(p).st_mode)
    return out


def test_current_umask_reads_without_changing(umask):
    umask(0o027)
    assert current_umask() == 0o027 and current_umask() == 0o027


def test_honour_umask_opens_private_files_and_folders(tmp_path, umask):
    umask(0o027)
    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "d" / "w.safetensors").write_bytes(b"x")
    os.chmod(tmp_path / "d" / "w.safetensors", 0o600)
    (tmp_path / "d" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "d" / "run.sh", 0o700)
    honour_umask(tmp_path / "d")
    assert _modes(tmp_path) == {"d": 0o750, "d/w.safetensors": 0o640, "d/run.sh": 0o750}


def test_checkpoint_and_outputs_are_readable_by_others_under_umask_022(tmp_path, umask):
    umask(0o022)
    torch.set_num_threads(1)
    cli.cmd_train(["--preset", "smoke", "--max_steps", "1", "--save_steps", "1", "--no_eval",
                   "--output_dir", str(tmp_path / "run")])
    modes = _modes(tmp_path / "run")
    assert "checkpoint-1" in modes and "checkpoint-1/model.safetensors" in modes
    wrong = {p: oct(m) for p, m in modes.items()
             if m != (0o755 if os.path.isdir(tmp_path / "run" / p) else 0o644)}
    assert wrong == {}
