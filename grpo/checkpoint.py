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
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng_state.pt")
        if rollout_buffer is not None:
            torch.save(rollout_buffer, tmp / "rollout_buffer.pt")
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(trainer_state, f, indent=1)
        if final.exists():  # the same step saved again (e.g. after a resume): swap the old one out first
            trash = Path(tempfile.mkdtemp(prefix=f".trash-{PREFIX}{step}-", dir=root))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
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
