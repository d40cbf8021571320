"""The policy's weights as vLLM loads them: (checkpoint name, full tensor) pairs, produced one at a time.

- Plain model: `named_parameters()` (a tied weight once, as vLLM expects), names as in a `save_pretrained` folder.
- LoRA (peft): each adapted layer's weight is pushed merged, W + B·A·scaling, computed on the fly; the model is
  never merged in place (merge/unmerge in fp32 would drift the frozen base weights a little every step). The
  adapter tensors themselves are not pushed: vLLM serves the merged model.
- FSDP2: a sharded parameter (DTensor) is gathered (`full_tensor()`, a collective: every rank walks the same
  parameters in the same order), pushed, and freed before the next one, so at most one full parameter (plus
  vLLM's per-layer staging) is resident at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    """{checkpoint name of the adapted weight: its peft LoRA layer} for the active adapter."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            out[_checkpoint_name(name) + ".weight"] = module
    return out


def _lora_delta(module) -> torch.Tensor:
    """Σ over active adapters of B·A·scaling, in the layout of the base weight."""
    delta = None
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        if hasattr(a, "full_tensor") or hasattr(b, "full_tensor"):  # sharded: gather the two small factors
            d = (_full(b) @ _full(a)) * module.scaling[adapter]
            if getattr(module, "fan_in_fan_out", False):
                d = d.T
        else:
            d = module.get_delta_weight(adapter).detach()
        delta = d if delta is None else delta + d
    return delta


def _checkpoint_name(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name.removeprefix("base_model.model.").replace(".base_layer", "").replace("modules_to_save.default.", "")


def tied_head_name(model) -> str | None:
    """Checkpoint name of the LM head's weight when it is the input embedding's (tied), else None."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return None
    return next(_checkpoint_name(n) + ".weight" for n, m in model.named_modules() if m is head)


def named_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) for every weight vLLM holds, one at a time (see the module docstring).

    A tied LM head is pushed a second time under its own name: the engine is built untied (vllm_engine.py),
    because vLLM 0.32's in-place reload skips a tied head and keeps the copy that its CPU build repacked from the
    first weights."""
    from . import lora

    adapted = _lora_layers(model) if lora.is_peft(model) else {}
    head = tied_head_name(model)
    embed = model.get_input_embeddings().weight if head else None
    for name, param in model.named_parameters():
        if adapted and (".lora_" in name or "original_module" in name):
            continue
        ckpt = _checkpoint_name(name)
        value = _full(param)
        if ckpt in adapted:
            value = value + _lora_delta(adapted[ckpt]).to(value.dtype)
        yield ckpt, value
        if param is embed:
            yield head, value
