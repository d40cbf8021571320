"""Files and folders the trainer writes get the permissions the user's umask asks for.

`tempfile.mkdtemp` makes 0700 folders and safetensors writes 0600 files, so checkpoints written into a temporary
folder and renamed into place came out private (`drwx------`, `-rw-------`): a teammate on a shared machine could
not read a trained model. Everything else (`open`, `torch.save`) already follows the umask (0644 / 0755 under
umask 022).
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask, without changing it where /proc tells (os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(root: str | os.PathLike) -> None:
    """chmod `root` and everything under it to 0777 (folders) / 0666 (files) less the umask, as a plain
    `mkdir` / `open` would have made them; executable bits already set on a file are kept."""
    mask = current_umask()
    root = Path(root)
    paths = [root] + sorted(root.rglob("*")) if root.is_dir() else [root]
    for p in paths:
        if p.is_symlink():
            continue
        if p.is_dir():
            p.chmod(0o777 & ~mask)
        else:
            base = 0o777 if p.stat().st_mode & 0o111 else 0o666
            p.chmod(base & ~mask)
