"""Stage 6: checkpoints that a kill can never leave half-written, and exact resumption.

`<output_dir>/checkpoint-<step>/` holds
    model (save_pretrained, safetensors) + tokenizer      loadable by `grpo eval --model` and transformers
      (with LoRA: adapter_model.safetensors + adapter_config.json only; `grpo eval` loads base + adapter)
    optimizer.pt, scheduler.pt                            optimizer / LR-scheduler state
    rng_state.pt                                          python, numpy, torch (and CUDA) RNG states of every rank
    rollout_buffer.pt                                     only when a generation batch is still being consumed
    trainer_state.json                                    step, epoch, sampler position, metrics history, config
It is first written to a hidden temporary folder inside output_dir and then `os.replace`d into place, so a
checkpoint folder either is complete or does not exist; `trainer_state.json` is written last inside it.
"""

from __future__ import annotations

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


# ----------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------
def _write_run_state(tmp: Path, tokenizer, scheduler, trainer_state: dict, rng_states: list[dict],
                     rollout_buffer: list | None) -> None:
    """The files every checkpoint holds beside its weights and optimizer state."""
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_states, tmp / "rng_state.pt")
    if rollout_buffer is not None:
        torch.save(rollout_buffer, tmp / "rollout_buffer.pt")
    with open(tmp / STATE_FILE, "w") as f:
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
    final = root / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step}-", dir=root))
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of the training log
    try:
        from . import lora

        if lora.is_peft(model):
            lora.save_adapter(model, tmp)  # the adapter only, not the base weights
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        _write_run_state(tmp, tokenizer, scheduler, trainer_state, rng_states, rollout_buffer)
        honour_umask(tmp)  # mkdtemp made it 0700 and safetensors its weights 0600
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
    """Restore model/optimizer/scheduler in place; returns (trainer_state, this rank's RNG state, rollout buffer)."""
    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    from . import lora

    if lora.is_peft(model):
        lora.load_adapter_weights(model, folder)
    else:
        load_model_weights(model, folder)
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=False))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    rngs = torch.load(folder / "rng_state.pt", weights_only=False)
    rng = rngs[rank] if rank < len(rngs) else None
    buffer = None
    if (folder / "rollout_buffer.pt").is_file():
        buffers = torch.load(folder / "rollout_buffer.pt", weights_only=False)
        buffer = buffers[rank] if rank < len(buffers) else None
    return state, rng, buffer


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
    tmp = None
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step}-", dir=root)
    tmp = Path(distributed.all_gather_object(tmp, info)[0])
    final = root / f"{PREFIX}{step}"
    ok = False
    try:
        options = _dcp_options(model)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / DCP_DIR))
        is_peft = lora.is_peft(model)
        full = None
        if is_peft or full_weights:  # a collective: every rank takes part, the main rank receives the tensors
            full = get_model_state_dict(model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=is_peft))
        if info.is_main:
            if is_peft:
                lora.save_adapter(model, tmp, state_dict=full)
            elif full_weights:
                model.save_pretrained(tmp, state_dict=full, safe_serialization=True)
            else:
                model.config.save_pretrained(tmp)  # what the model is; its weights are in dcp/
            _write_run_state(tmp, tokenizer, scheduler, trainer_state, rng_states, rollout_buffer)
            honour_umask(tmp)  # every rank's shards are in place: dcp.save returned on all ranks
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
    state = json.loads((folder / STATE_FILE).read_text())
    if not (folder / DCP_DIR).is_dir():
        raise FileNotFoundError(f"{folder} has no {DCP_DIR}/ folder: it was not written with fsdp='full_shard'")
    same_world = state["world_size"] == info.world_size
    if not same_world and (folder / "rollout_buffer.pt").is_file():
        raise ValueError(
            f"{folder} holds a half-consumed generation batch split over {state['world_size']} processes; it can "
            f"only be resumed with {state['world_size']} (this run has {info.world_size}). Resume at another world "
            "size from a checkpoint taken at a generation-batch boundary (save_steps a multiple of "
            "steps_per_generation * num_iterations / gradient_accumulation_steps)."
        )
    options = _dcp_options(model)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    target = {"model": model_state, "optimizer": optim_state}
    dcp.load(target, checkpoint_id=str(folder / DCP_DIR))
    result = set_state_dict(model, optimizer, model_state_dict=target["model"],
                            optim_state_dict=target["optimizer"], options=_dcp_options(model, loading=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in getattr(result, "missing_keys", []) if k in trainable]
    if missing or getattr(result, "unexpected_keys", []):
        raise RuntimeError(f"{folder} does not match the model: missing {missing}, "
                           f"unexpected {list(result.unexpected_keys)}")
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    rng, buffer = None, None
    if same_world:
        rng = torch.load(folder / "rng_state.pt", weights_only=False)[info.rank]
        if (folder / "rollout_buffer.pt").is_file():
            buffer = torch.load(folder / "rollout_buffer.pt", weights_only=False)[info.rank]
    return state, rng, buffer


def load_sharded_weights(model, folder) -> None:
    """Load the model part of a sharded checkpoint into an ordinary (unsharded) model in one process."""
    import torch.distributed.checkpoint as dcp

    import warnings

    target = {"model": dict(model.state_dict())}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, checkpoint_id=str(Path(folder) / DCP_DIR), no_dist=True)
    model.load_state_dict(target["model"])
