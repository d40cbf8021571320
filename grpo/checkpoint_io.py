"""The files of a checkpoint in formats that load without running code, and checks that name a damaged file.

A checkpoint may come from someone else, so resuming never unpickles arbitrary objects:
- RNG states and the half-consumed rollout buffer are safetensors files (tensors + a JSON header);
- optimizer.pt and scheduler.pt load with `torch.load(weights_only=True)` (tensors, numbers, strings, containers);
- checkpoints written before the safetensors formats keep rng_state.pt / rollout_buffer.pt: those load with
  `weights_only=True` and an allow-list of the three numpy names an RNG state needs;
- FSDP's dcp/.metadata is a pickle that torch.distributed.checkpoint reads with plain `pickle.load`: it is first
  replayed here with an unpickler that only knows DCP's metadata classes, and refused if it names anything else.
Anything else is refused with a one-line `CheckpointError` before any of it runs.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

RNG_FILE = "rng_state.safetensors"
BUFFER_FILE = "rollout_buffer.safetensors"
LEGACY_RNG_FILE = "rng_state.pt"
LEGACY_BUFFER_FILE = "rollout_buffer.pt"
_FORMAT = "grpo-1"


def first_line(error: BaseException | str) -> str:
    """An exception's message as one line without terminal colour codes (torch's errors span many lines)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    line = text.splitlines()[0].strip() if text else ""
    name = type(error).__name__ if isinstance(error, BaseException) else ""
    return f"{name}: {line}" if name and line else (line or name)


# ----------------------------------------------------------------------------------------------------------------
# RNG states: one safetensors file for every rank's python, numpy, torch and CUDA generators
# ----------------------------------------------------------------------------------------------------------------
def save_rng_states(path: Path, states: list[dict]) -> None:
    from safetensors.torch import save_file

    tensors, scalars = {}, []
    for r, s in enumerate(states):
        version, mt, gauss = s["python"]
        name, keys, pos, has_gauss, cached = s["numpy"]
        tensors[f"{r}.python"] = torch.tensor(mt, dtype=torch.int64)
        tensors[f"{r}.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        tensors[f"{r}.torch"] = s["torch"].contiguous()
        for i, c in enumerate(s.get("cuda", [])):
            tensors[f"{r}.cuda.{i}"] = c.cpu().contiguous()
        scalars.append({"python_version": version, "python_gauss": gauss, "numpy_name": name, "numpy_pos": pos,
                        "numpy_has_gauss": has_gauss, "numpy_gauss": cached, "cuda": len(s.get("cuda", []))})
    save_file(tensors, str(path), metadata={"format": _FORMAT, "ranks": json.dumps(scalars)})


def load_rng_states(folder: Path) -> list[dict]:
    """Every rank's RNG state, from rng_state.safetensors (or an older checkpoint's rng_state.pt)."""
    if not (folder / RNG_FILE).is_file() and (folder / LEGACY_RNG_FILE).is_file():
        return load_legacy(folder / LEGACY_RNG_FILE)
    tensors, meta = _read_safetensors(folder / RNG_FILE)
    states = []
    for r, s in enumerate(json.loads(meta["ranks"])):
        state = {
            "python": (s["python_version"], tuple(tensors[f"{r}.python"].tolist()), s["python_gauss"]),
            "numpy": (s["numpy_name"], tensors[f"{r}.numpy"].numpy().astype(np.uint32), s["numpy_pos"],
                      s["numpy_has_gauss"], s["numpy_gauss"]),
            "torch": tensors[f"{r}.torch"],
        }
        if s["cuda"]:
            state["cuda"] = [tensors[f"{r}.cuda.{i}"] for i in range(s["cuda"])]
        states.append(state)
    return states


# ----------------------------------------------------------------------------------------------------------------
# Rollout buffer: every rank's micro-batches (tensors in safetensors, the rest as JSON in its header)
# ----------------------------------------------------------------------------------------------------------------
def save_rollout_buffer(path: Path, buffers: list[list[dict]]) -> None:
    """buffers[rank][micro_batch] = Rollout.to_state(). Rows, prompts and completions go into JSON; a dataset value
    JSON cannot hold is written as its str() (they are only read by reward functions, before the buffer is made)."""
    from safetensors.torch import save_file

    tensors, plain = {}, []
    for r, micro_batches in enumerate(buffers):
        plain.append([])
        for i, state in enumerate(micro_batches):
            rest = {}
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{r}.{i}.{key}"] = value.detach().cpu().clone()  # safetensors refuses shared storage
                else:
                    rest[key] = value
            rest["_tensors"] = sorted(k for k, v in state.items() if isinstance(v, torch.Tensor))
            plain[-1].append(rest)
    save_file(tensors, str(path), metadata={"format": _FORMAT, "buffers": json.dumps(plain, default=str)})


def load_rollout_buffers(folder: Path) -> list[list[dict]] | None:
    """What save_rollout_buffer wrote (or an older checkpoint's rollout_buffer.pt); None when there is none."""
    if not (folder / BUFFER_FILE).is_file():
        return load_legacy(folder / LEGACY_BUFFER_FILE) if (folder / LEGACY_BUFFER_FILE).is_file() else None
    tensors, meta = _read_safetensors(folder / BUFFER_FILE)
    out = []
    for r, micro_batches in enumerate(json.loads(meta["buffers"])):
        out.append([])
        for i, rest in enumerate(micro_batches):
            names = rest.pop("_tensors")
            out[-1].append({**rest, **{k: tensors[f"{r}.{i}.{k}"] for k in names}})
    return out


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"not a grpo file (format {meta.get('format')!r}, expected {_FORMAT!r})")
        return {k: f.get_tensor(k) for k in f.keys()}, meta


# ----------------------------------------------------------------------------------------------------------------
# torch.load without code execution
# ----------------------------------------------------------------------------------------------------------------
# What an older checkpoint's rng_state.pt holds besides tensors and containers: numpy's MT19937 key array.
_NUMPY_RNG_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np.dtypes.Int64DType]
try:  # the reconstructor that pickles an ndarray moved from numpy.core to numpy._core in numpy 2
    _NUMPY_RNG_GLOBALS.append(np._core.multiarray._reconstruct)
except AttributeError:  # numpy < 2
    _NUMPY_RNG_GLOBALS.append(np.core.multiarray._reconstruct)


def load_weights_only(path: Path, map_location=None):
    """torch.load(weights_only=True): tensors, numbers, strings and containers only."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_legacy(path: Path):
    """An older checkpoint's rng_state.pt / rollout_buffer.pt: weights_only plus the numpy RNG allow-list."""
    with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
        return torch.load(path, weights_only=True)


def describe_load_error(error: BaseException) -> str:
    """Why a file did not load, in a few words: a refused pickle global, a truncated archive, or the raw cause."""
    text = str(error)
    refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL|refused global) (\S+)", text)
    if isinstance(error, pickle.UnpicklingError) or refused:
        what = f" ({refused.group(1)})" if refused else ""
        return (f"holds pickled Python objects outside the allow-list{what}; refused without running them "
                "(a checkpoint never needs them: it may have been tampered with)")
    if "central directory" in text or "zip archive" in text or "incomplete metadata" in text or \
            isinstance(error, (EOFError, json.JSONDecodeError)):
        return f"is truncated or corrupt ({first_line(error)})"
    return f"cannot be read ({first_line(error)})"


# ----------------------------------------------------------------------------------------------------------------
# Structure checks: a truncated file is found before anything is loaded from the checkpoint
# ----------------------------------------------------------------------------------------------------------------
def safetensors_problem(path: Path) -> str | None:
    """None when the header parses and the file is as long as the header says; else what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes, no safetensors header)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"is truncated ({size} bytes; its header alone needs {n + 8})"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"is corrupt (unreadable safetensors header: {first_line(e)})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"is truncated or corrupt ({size} bytes, its header describes {8 + n + end})"
    return None


def zip_problem(path: Path) -> str | None:
    """torch.save files are zip archives: a truncated one has lost its central directory (at the end)."""
    try:
        with zipfile.ZipFile(path) as z:
            if not z.namelist():
                return "is corrupt (an empty archive)"
    except (zipfile.BadZipFile, OSError) as e:
        return f"is truncated or corrupt ({first_line(e)})"
    return None


def json_problem(path: Path, required: tuple[str, ...] = ()) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"is truncated or corrupt ({first_line(e)})"
    missing = [k for k in required if not isinstance(data, dict) or k not in data]
    return f"is incomplete (no {', '.join(missing)})" if missing else None


def check_dcp_metadata(path: Path) -> None:
    """Replay DCP's pickled metadata with only its own classes known; raises pickle.UnpicklingError otherwise."""
    _DCPMetadataUnpickler(io.BytesIO(path.read_bytes())).load()


class _DCPMetadataUnpickler(pickle.Unpickler):
    # Every global a DCP .metadata file names (torch 2.13): DCP's own dataclasses and enums, dtypes and layouts,
    # and the path it was saved to. Constructing any of these runs no user code.
    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
            "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size", "strided", "sparse_coo"} | {n for n in dir(torch) if isinstance(getattr(torch, n, None),
                                                                                        torch.dtype)},
        "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module, name):
        if name not in self._ALLOWED.get(module, ()):
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)
