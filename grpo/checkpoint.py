"""Stage 6: checkpoints that a kill can never leave half-written, and exact resumption.

`<output_dir>/checkpoint-<step>/` holds
    model (save_pretrained, safetensors) + tokenizer      loadable by `grpo eval --model` and transformers
      (with LoRA: adapter_model.safetensors + adapter_config.json only; `grpo eval` loads base + adapter)
    optimizer.pt, scheduler.pt                            optimizer / LR-scheduler state (tensors and numbers)
    rng_state.safetensors                                 python, numpy, torch (and CUDA) RNG states of every rank
    rollout_buffer.safetensors                            only when a generation batch is still being consumed
    trainer_state.json                                    step, epoch, sampler position, metrics history, config
It is first written to a hidden temporary folder inside output_dir and then `os.replace`d into place, so a
checkpoint folder either is complete or does not exist; `trainer_state.json` is written last inside it.

Resuming runs no code from the checkpoint (checkpoint_io.py says how). A damaged file, a full disk or a refused
file is a one-line `CheckpointError` that names the checkpoint, the file, the cause and the newest complete
earlier checkpoint to resume from. Before a save, free space is checked against the last checkpoint's size; when
it is short, checkpoints that `save_total_limit` would delete after the save are deleted first (oldest first,
never the newest complete one).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .permissions import honour_umask
from . import checkpoint_io
from .checkpoint_io import first_line
from .errors import CheckpointError

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_CKPT_RE = re.compile(rf"^{PREFIX}(\d+)$")


# ----------------------------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (those with a trainer_state.json), oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """"latest" → the newest checkpoint in output_dir; otherwise a checkpoint folder path."""
    if str(spec) == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint='latest' but {output_dir} holds no complete checkpoint")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a grpo checkpoint (no {STATE_FILE})")
    return path


def prune(output_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns what was deleted."""
    if keep is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - keep)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def remove_leftovers(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders of saves that a kill interrupted (call only while holding the run lock: a
    running save owns its own temporary folder)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    doomed = [p for p in root.iterdir() if p.is_dir() and p.name.startswith((f".tmp-{PREFIX}", f".trash-{PREFIX}"))]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------------------------------------------
# Integrity: which file of a checkpoint is damaged, and which earlier checkpoint is whole
# ----------------------------------------------------------------------------------------------------------------
def problem(folder: str | os.PathLike) -> tuple[str, str] | None:
    """(file, what is wrong) for the first missing, truncated or corrupt file of a checkpoint; None when every
    file is whole. Reads headers and archive directories only, not the tensors."""
    folder = Path(folder)
    state = folder / STATE_FILE
    if not state.is_file():
        return STATE_FILE, "is missing"
    found = checkpoint_io.json_problem(state, ("step",))
    if found:
        return STATE_FILE, found
    sharded = (folder / DCP_DIR).is_dir()
    checks: list[tuple[str, object]] = []  # (file, checker)
    from . import lora

    index = folder / "model.safetensors.index.json"
    if (folder / lora.ADAPTER_WEIGHTS).is_file():
        checks.append((lora.ADAPTER_WEIGHTS, checkpoint_io.safetensors_problem))
    elif index.is_file():
        found = checkpoint_io.json_problem(index, ("weight_map",))
        if found:
            return index.name, found
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        checks += [(name, checkpoint_io.safetensors_problem) for name in shards]
    elif (folder / "model.safetensors").is_file() or not sharded:
        checks.append(("model.safetensors", checkpoint_io.safetensors_problem))
    if sharded:
        checks.append((f"{DCP_DIR}/.metadata", None))
    else:
        checks.append(("optimizer.pt", checkpoint_io.zip_problem))
    checks.append(("scheduler.pt", checkpoint_io.zip_problem))
    if (folder / checkpoint_io.LEGACY_RNG_FILE).is_file() and not (folder / checkpoint_io.RNG_FILE).is_file():
        checks.append((checkpoint_io.LEGACY_RNG_FILE, checkpoint_io.zip_problem))
    else:
        checks.append((checkpoint_io.RNG_FILE, checkpoint_io.safetensors_problem))
    if (folder / checkpoint_io.BUFFER_FILE).is_file():
        checks.append((checkpoint_io.BUFFER_FILE, checkpoint_io.safetensors_problem))
    elif (folder / checkpoint_io.LEGACY_BUFFER_FILE).is_file():
        checks.append((checkpoint_io.LEGACY_BUFFER_FILE, checkpoint_io.zip_problem))
    for name, check in checks:
        path = folder / name
        if not path.is_file():
            return name, "is missing"
        found = check(path) if check is not None else None
        if found:
            return name, found
    return None


def newest_complete(output_dir: str | os.PathLike, before: Path | None = None) -> Path | None:
    """The newest checkpoint in output_dir whose files are all whole (older than `before` when given)."""
    found = list_checkpoints(output_dir)
    if before is not None:
        m = _CKPT_RE.match(Path(before).name)
        found = [p for p in found if p.name != Path(before).name
                 and (m is None or int(_CKPT_RE.match(p.name).group(1)) < int(m.group(1)))]
    for p in reversed(found):
        if problem(p) is None:
            return p
    return None


def resume_hint(output_dir: str | os.PathLike, before: Path | None = None) -> str:
    """Where to resume from instead: '<checkpoint> is complete: --resume_from_checkpoint <path>'."""
    good = newest_complete(output_dir, before)
    if good is None:
        return f"no earlier complete checkpoint in {output_dir}"
    return f"{good.name} is complete: --resume_from_checkpoint {Path(output_dir) / good.name}"


def _damaged(folder: Path, name: str, cause: str) -> CheckpointError:
    return CheckpointError(f"{folder.name}/{name} {cause}; {resume_hint(folder.parent, folder)}")


def check(folder: str | os.PathLike) -> None:
    """Raise a one-line CheckpointError when a file of the checkpoint is missing, truncated or corrupt."""
    found = problem(folder)
    if found:
        raise _damaged(Path(folder), *found)


@contextlib.contextmanager
def _reading(folder: Path, name: str):
    """Any failure while loading `name` becomes a one-line CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise _damaged(folder, name, checkpoint_io.describe_load_error(e)) from e


# ----------------------------------------------------------------------------------------------------------------
# Disk space
# ----------------------------------------------------------------------------------------------------------------
def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def make_room(output_dir: str | os.PathLike, step: int, save_total_limit: int | None) -> None:
    """Before writing checkpoint-<step>: free space must be at least the last checkpoint's size. When it is not,
    delete (oldest first) the checkpoints that save_total_limit would prune after this save anyway, never the
    newest complete one; if that is not enough, raise a "disk full" CheckpointError before writing anything."""
    root = Path(output_dir)
    found = list_checkpoints(root)
    if not found:
        return
    need, free = folder_bytes(found[-1]), shutil.disk_usage(root).free
    if free >= need:
        return
    keep = newest_complete(root)
    if save_total_limit is not None:
        for p in found[: max(0, len(found) - (save_total_limit - 1))]:
            if p == keep:
                continue
            shutil.rmtree(p, ignore_errors=True)
            free = shutil.disk_usage(root).free
            if free >= need:
                return
    pruned = " after pruning under save_total_limit" if save_total_limit is not None else ""
    raise CheckpointError(
        f"disk full: saving {PREFIX}{step} needs about {_mib(need)} (the size of {found[-1].name}) but {root} has "
        f"{_mib(free)} free{pruned}; free some space or lower save_total_limit; {resume_hint(root)}")


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain, or torch's zip writer's report of a short write ("unexpected pos")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "unexpected pos" in str(error) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def _writing(root: Path, step: int, name: str):
    """Any failure while writing file `name` of checkpoint-<step> becomes a one-line CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        what = f"{PREFIX}{step}/{name}"
        if _is_disk_full(e):
            cause = f"disk full while writing {what} ({_mib(shutil.disk_usage(root).free)} free in {root})"
        else:
            cause = f"writing {what} failed ({first_line(e)})"
        raise CheckpointError(f"saving {PREFIX}{step} failed: {cause}; nothing of it was kept; "
                              f"{resume_hint(root)}") from e


# ----------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------
def _write_run_state(tmp: Path, tokenizer, scheduler, trainer_state: dict, rng_states: list[dict],
                     rollout_buffer: list | None, writing) -> None:
    """The files every checkpoint holds beside its weights and optimizer state."""
    if tokenizer is not None:
        with writing("tokenizer"):
            tokenizer.save_pretrained(tmp)
    with writing("scheduler.pt"):
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    with writing(checkpoint_io.RNG_FILE):
        checkpoint_io.save_rng_states(tmp / checkpoint_io.RNG_FILE, rng_states)
    if rollout_buffer is not None:
        with writing(checkpoint_io.BUFFER_FILE):
            checkpoint_io.save_rollout_buffer(tmp / checkpoint_io.BUFFER_FILE, rollout_buffer)
    with writing(STATE_FILE), open(tmp / STATE_FILE, "w") as f:
        json.dump(trainer_state, f, indent=1)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temporary folder to its final name; the same step saved again (e.g. after a resume)
    swaps the old one out first, so a complete checkpoint exists at every moment."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".trash-{final.name}-", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save(output_dir, step: int, model, tokenizer, optimizer, scheduler, trainer_state: dict,
         rng_states: list[dict], rollout_buffer: list | None = None, save_total_limit: int | None = None) -> Path:
    """Write checkpoint-<step> atomically (call on the main rank only) and prune old ones."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    make_room(root, step, save_total_limit)
    final = root / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step}-", dir=root))
    writing = lambda name: _writing(root, step, name)  # noqa: E731
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of the training log
    try:
        from . import lora

        if lora.is_peft(model):
            with writing(lora.ADAPTER_WEIGHTS):
                lora.save_adapter(model, tmp)  # the adapter only, not the base weights
        else:
            with writing("model.safetensors"):
                model.save_pretrained(tmp, safe_serialization=True)
        with writing("optimizer.pt"):
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        _write_run_state(tmp, tokenizer, scheduler, trainer_state, rng_states, rollout_buffer, writing)
        honour_umask(tmp)  # mkdtemp made it 0700 and safetensors its weights 0600
        with writing("(renaming it into place)"):
            _publish(tmp, final)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    prune(root, save_total_limit)
    return final


def load_model_weights(model, folder: str | os.PathLike) -> None:
    """Load a save_pretrained folder's weights into an existing model (keys tied to a loaded one may be absent)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} holds no safetensors weights")
    state = {}
    for name in files:
        state.update(load_file(str(folder / name), device="cpu"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied parameter (e.g. lm_head.weight = embed_tokens.weight) is saved once; it is loaded through its twin.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ids = {id(params[k]) for k in state if k in params}
    truly_missing = [k for k in missing if k not in params or id(params[k]) not in loaded_ids]
    if truly_missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {truly_missing}, "
                           f"unexpected {list(unexpected)}")


def load(folder, model, optimizer, scheduler, rank: int) -> tuple[dict, dict | None, list | None]:
    """Restore model/optimizer/scheduler in place; returns (trainer_state, this rank's RNG state, rollout buffer).
    Every file is checked first, so a damaged checkpoint is refused before anything is loaded from it."""
    folder = Path(folder)
    check(folder)
    with _reading(folder, STATE_FILE):
        state = json.loads((folder / STATE_FILE).read_text())
    from . import lora

    # check() has read the weight files' headers: an error from here on is a checkpoint that does not fit this
    # model or optimizer (its own clear message), not a damaged file.
    if lora.is_peft(model):
        lora.load_adapter_weights(model, folder)
    else:
        load_model_weights(model, folder)
    device = next(model.parameters()).device
    with _reading(folder, "optimizer.pt"):
        optimizer_state = checkpoint_io.load_weights_only(folder / "optimizer.pt", map_location=device)
    optimizer.load_state_dict(optimizer_state)
    rngs, buffers = _load_run_state(folder, scheduler)
    rng = rngs[rank] if rank < len(rngs) else None
    buffer = buffers[rank] if buffers is not None and rank < len(buffers) else None
    return state, rng, buffer


def _load_run_state(folder: Path, scheduler) -> tuple[list[dict], list | None]:
    """scheduler.pt into the scheduler; every rank's RNG states and rollout buffers (None when not saved)."""
    with _reading(folder, "scheduler.pt"):
        scheduler_state = checkpoint_io.load_weights_only(folder / "scheduler.pt")
    scheduler.load_state_dict(scheduler_state)
    legacy = not (folder / checkpoint_io.RNG_FILE).is_file()
    with _reading(folder, checkpoint_io.LEGACY_RNG_FILE if legacy else checkpoint_io.RNG_FILE):
        rngs = checkpoint_io.load_rng_states(folder)
    legacy = not (folder / checkpoint_io.BUFFER_FILE).is_file()
    with _reading(folder, checkpoint_io.LEGACY_BUFFER_FILE if legacy else checkpoint_io.BUFFER_FILE):
        buffers = checkpoint_io.load_rollout_buffers(folder)
    return rngs, buffers


# ----------------------------------------------------------------------------------------------------------------
# FSDP2: sharded checkpoints with torch.distributed.checkpoint (every rank calls these)
# ----------------------------------------------------------------------------------------------------------------
DCP_DIR = "dcp"  # model + optimizer shards and DCP's metadata (global shapes, so a load may reshard)


def _dcp_options(model, loading: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from . import lora

    # LoRA: the frozen base weights come from the base model at load; only the adapters are checkpointed (so
    # loading is non-strict about the frozen keys, and load_sharded checks the trainable ones itself).
    peft = lora.is_peft(model)
    return StateDictOptions(ignore_frozen_params=peft, strict=not (peft and loading))


def save_sharded(output_dir, step: int, model, tokenizer, optimizer, scheduler, trainer_state: dict,
                 rng_states: list[dict], rollout_buffer: list | None, save_total_limit: int | None, info,
                 full_weights: bool) -> Path:
    """checkpoint-<step> of a sharded (FSDP2) model: `dcp/` holds every rank's shards of the model and optimizer;
    the main rank adds the adapter (LoRA) or, when `full_weights`, gathered `save_pretrained` weights, plus the
    files `save` writes. Written into a temporary folder (on a file system all ranks share) and renamed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    from . import distributed, lora

    root = Path(output_dir)
    tmp, refused = None, None
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        try:
            make_room(root, step, save_total_limit)
            tmp = tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step}-", dir=root)
        except CheckpointError as e:
            refused = str(e)
    tmp, refused = distributed.all_gather_object((tmp, refused), info)[0]
    if refused:  # every rank stops, rather than waiting in dcp.save for the main rank
        raise CheckpointError(refused)
    tmp = Path(tmp)
    writing = lambda name: _writing(root, step, name)  # noqa: E731
    final = root / f"{PREFIX}{step}"
    ok = False
    try:
        options = _dcp_options(model)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        with writing(DCP_DIR):
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / DCP_DIR))
        is_peft = lora.is_peft(model)
        full = None
        if is_peft or full_weights:  # a collective: every rank takes part, the main rank receives the tensors
            full = get_model_state_dict(model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=is_peft))
        if info.is_main:
            with writing(lora.ADAPTER_WEIGHTS if is_peft else "model.safetensors"):
                if is_peft:
                    lora.save_adapter(model, tmp, state_dict=full)
                elif full_weights:
                    model.save_pretrained(tmp, state_dict=full, safe_serialization=True)
                else:
                    model.config.save_pretrained(tmp)  # what the model is; its weights are in dcp/
            _write_run_state(tmp, tokenizer, scheduler, trainer_state, rng_states, rollout_buffer, writing)
            honour_umask(tmp)  # every rank's shards are in place: dcp.save returned on all ranks
            with writing("(renaming it into place)"):
                _publish(tmp, final)
            prune(root, save_total_limit)
        ok = True
    finally:
        if info.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if ok:
            distributed.barrier(info)
    return final


def load_sharded(folder, model, optimizer, scheduler, info) -> tuple[dict, dict | None, list | None]:
    """Restore a save_sharded checkpoint into the sharded model and optimizer, at this run's world size (DCP
    reshards). Returns (trainer_state, this rank's RNG state or None, this rank's rollout buffer or None); RNG
    state and buffer are per rank, so they come back only when the world size is the one that saved them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(folder)
    if not (folder / DCP_DIR).is_dir():
        raise FileNotFoundError(f"{folder} has no {DCP_DIR}/ folder: it was not written with fsdp='full_shard'")
    check(folder)
    with _reading(folder, STATE_FILE):
        state = json.loads((folder / STATE_FILE).read_text())
    same_world = state["world_size"] == info.world_size
    has_buffer = (folder / checkpoint_io.BUFFER_FILE).is_file() or (folder / checkpoint_io.LEGACY_BUFFER_FILE).is_file()
    if not same_world and has_buffer:
        raise ValueError(
            f"{folder} holds a half-consumed generation batch split over {state['world_size']} processes; it can "
            f"only be resumed with {state['world_size']} (this run has {info.world_size}). Resume at another world "
            "size from a checkpoint taken at a generation-batch boundary (save_steps a multiple of "
            "steps_per_generation * num_iterations / gradient_accumulation_steps)."
        )
    options = _dcp_options(model)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    target = {"model": model_state, "optimizer": optim_state}
    with _reading(folder, f"{DCP_DIR}/.metadata"):
        checkpoint_io.check_dcp_metadata(folder / DCP_DIR / ".metadata")  # DCP itself unpickles it unrestricted
    with _reading(folder, DCP_DIR):
        dcp.load(target, checkpoint_id=str(folder / DCP_DIR))
    result = set_state_dict(model, optimizer, model_state_dict=target["model"],
                            optim_state_dict=target["optimizer"], options=_dcp_options(model, loading=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in getattr(result, "missing_keys", []) if k in trainable]
    if missing or getattr(result, "unexpected_keys", []):
        raise RuntimeError(f"{folder} does not match the model: missing {missing}, "
                           f"unexpected {list(result.unexpected_keys)}")
    rngs, buffers = _load_run_state(folder, scheduler)
    rng, buffer = None, None
    if same_world:
        rng = rngs[info.rank]
        buffer = buffers[info.rank] if buffers is not None else None
    return state, rng, buffer


def load_sharded_weights(model, folder) -> None:
    """Load the model part of a sharded checkpoint into an ordinary (unsharded) model in one process."""
    import torch.distributed.checkpoint as dcp

    import warnings

    folder = Path(folder)
    target = {"model": dict(model.state_dict())}
    with _reading(folder, f"{DCP_DIR}/.metadata"):
        checkpoint_io.check_dcp_metadata(folder / DCP_DIR / ".metadata")  # DCP itself unpickles it unrestricted
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, checkpoint_id=str(Path(folder) / DCP_DIR), no_dist=True)
    model.load_state_dict(target["model"])
