"""LoRA through peft: wrap the policy, use the base model (adapters off) as the KL reference, save and load
adapters, merge them for export.

Why the LM head may not carry a LoRA: the fused loss reads `get_output_embeddings().weight` and multiplies by it
inside the kernel; an adapter on the head (W + B A) or a trainable copy of it (modules_to_save) would be silently
ignored. The head stays frozen, so the kernels skip its dW GEMM (a third of the loss's FLOPs).
"""

from __future__ import annotations

import json
from pathlib import Path


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("peft_config needs peft: pip install 'grpo-kernels[peft]'") from e
    return peft


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _head_name(model) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def apply(model, peft_config, base_name_or_path: str | None = None, seed: int = 0):
    """The policy with LoRA adapters injected (peft.get_peft_model); only the adapters require grad.

    The adapters' random init (A) is drawn from `seed` so that every rank of a data-parallel run starts from the
    same adapter (the base weights already agree) and a run is reproducible whatever ran before it."""
    peft = _peft()
    if not isinstance(peft_config, peft.LoraConfig):
        raise TypeError(f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}")
    if is_peft(model):
        raise ValueError("model already carries peft adapters; pass the base model and peft_config, not both")
    head = _head_name(model)
    short = head.rsplit(".", 1)[-1] if head else None
    for what, names in (("target_modules", peft_config.target_modules),
                        ("modules_to_save", peft_config.modules_to_save)):
        listed = [names] if isinstance(names, str) else list(names or [])
        if head is not None and any(n in (head, short) for n in listed):
            raise ValueError(
                f"peft_config.{what} includes the LM head {head!r}: the fused GRPO loss reads the head's weight "
                "directly and would ignore an adapter or a trained copy of it. Leave the head out ('all-linear' "
                "already does)."
            )
    import torch

    device = getattr(model, "device", torch.device("cpu"))
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        wrapped = peft.get_peft_model(model, peft_config)
    if base_name_or_path:  # peft takes the model's own (often empty) name_or_path; `grpo eval` needs the real one
        wrapped.peft_config[wrapped.active_adapter].base_model_name_or_path = str(base_name_or_path)
    # A regex target or an architecture default might still reach the head: check what peft actually built.
    new_head = wrapped.get_output_embeddings()
    if isinstance(new_head, peft.tuners.lora.LoraLayer) or type(new_head).__name__ == "ModulesToSaveWrapper":
        wrapped.unload()  # give the caller's model back without the adapters peft injected in place
        raise ValueError(f"peft_config adapted the LM head ({type(new_head).__name__}); the fused GRPO loss does not "
                         "support a LoRA on the LM head — leave it out of target_modules")
    return wrapped


def adapters_disabled(model):
    """The base policy (the KL reference) for the duration of the block: no second copy of the weights."""
    if not is_peft(model):
        raise TypeError(f"adapters_disabled needs a peft model, got {type(model).__name__}")
    return model.disable_adapter()


def save_adapter(model, folder, state_dict: dict | None = None) -> None:
    """adapter_model.safetensors + adapter_config.json (the base weights are not written). `state_dict`: the
    model's (gathered) state when its own parameters are sharded."""
    # save_embedding_layers=False: we never resize the vocabulary, and "auto" would look the base model up on the hub.
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False, state_dict=state_dict)


def load_adapter_weights(model, folder) -> None:
    """Load a saved adapter into the peft model in place (exact resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {ADAPTER_WEIGHTS}: not a LoRA checkpoint")
    result = set_peft_model_state_dict(model, load_file(str(path), device="cpu"))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise RuntimeError(f"adapter in {folder} does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")


def is_adapter_dir(folder) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def base_model_of(folder) -> str:
    """The base model recorded in an adapter folder's adapter_config.json."""
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder}/{ADAPTER_CONFIG} records no base_model_name_or_path: cannot load the base "
                         "model for this adapter")
    return base


def load_with_adapter(folder, base_loader, trainable: bool = False):
    """(peft model, base tokenizer) for an adapter folder; base_loader(name) -> (model, tokenizer)."""
    peft = _peft()
    base, tokenizer = base_loader(base_model_of(folder))
    return peft.PeftModel.from_pretrained(base, str(folder), is_trainable=trainable), tokenizer

