"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the trainer: `GRPOConfig(fsdp="full_shard")` under torchrun.

Layout. Every decoder layer is its own FSDP unit; the root unit is `FSDPPolicy`, a thin module around the policy
that owns what is left (embeddings, final norm, LM head). Each rank holds 1/W of every parameter, gradient and
AdamW moment (DTensors sharded on dim 0).

Why a wrapper root: FSDP2 unshards a unit's parameters in that unit's forward and reduce-scatters its gradients
in the backward of what that forward returned. The trainer does not call the policy's own forward (it runs the
backbone to hidden states and hands the LM-head weight to the fused loss), so every stage runs as
`run_in_root(root, fn, ...)`, i.e. `fn(policy, ...)` inside the root's forward, and the update's loss is what that
forward returns. Inside it the LM head is the gathered [V, H] weight: the fused loss sees one ordinary tensor.

Why the LM head is gathered and not vocab-parallel (numbers for Qwen2.5-7B: V = 152064, H = 3584, 7.6 B
parameters; W = 8 ranks; a micro-batch of N = 8 × 256 = 2048 completion tokens per rank):
- gathered (this module): the head lives in the root unit, gathered once per micro-batch (V·H·2 B = 1.09 GB in
  bf16) and its gradient reduce-scattered once (V·H·4 B = 2.18 GB in fp32): 6·V·H bytes = 3.3 GB per rank.
- vocab-parallel: the head stays sharded, but the loss needs every rank to hold the same tokens, so the hidden
  states are all-gathered (W·N·H·2 B = 0.12 GB) and dH reduce-scattered back (W·N·H·4 B = 0.23 GB), plus O(W·N)
  floats for the log-sum-exp: 6·W·N·H bytes = 0.35 GB.
Vocab-parallel moves less whenever W·N < V (here 16384 < 152064, about 9× less), but the whole model's FSDP
traffic per micro-batch is about 8·P bytes = 61 GB (gathers in forward and backward, fp32 reduce-scatter), so
the head's 3.3 GB is about 5% of it: gathering costs little, needs no second loss path, and does not depend on
the vocab-parallel loss (`process_group=`), which is being built separately. Switching the update to it is the
next step once it lands.

Generation unshards every layer once for the whole rollout (reshard_after_forward is switched off for it):
the full model is resident during generation (2 or 4 bytes/parameter on top of the shards) and each layer is
all-gathered once per rollout instead of once per generated token.

Mixed precision on CUDA with bf16: parameters are gathered in bf16 for compute, gradients reduced in fp32, the
sharded master weights and AdamW moments stay fp32. On the CPU (gloo) everything is fp32.
"""

from __future__ import annotations

import torch


class FSDPPolicy(torch.nn.Module):
    """The root FSDP unit: `root(fn)` runs `fn(policy)` with the root's parameters gathered (see `run_in_root`)."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, fn):
        return fn(self.policy)


def run_in_root(root, fn, *args, **kwargs):
    """fn(policy, *args, **kwargs) inside the root's forward. The arguments travel in a closure, not as forward
    inputs: FSDP2's mixed-precision input cast walks forward inputs, rebuilds every dataclass in them with
    dataclasses.replace (which re-runs GRPOConfig's checks) and casts their float tensors (advantages, old
    log-probs) to bf16."""
    return root(lambda policy: fn(policy, *args, **kwargs))


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one (transformers lists their classes in `_no_split_modules`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"fsdp='full_shard' needs the model's decoder layers: {type(base).__name__} lists no "
                         "_no_split_modules")
    return layers


def shard(model, info, bf16: bool) -> FSDPPolicy:
    """fully_shard every decoder layer, then the root; returns the root (the policy stays reachable as .policy)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise ValueError("fsdp='full_shard' needs a process group: launch with torchrun (WORLD_SIZE > 1)")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs = {"mesh": mesh}
    if info.device.type == "cuda" and bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    root = FSDPPolicy(model)
    # The root's parameters (embeddings, LM head) are used again right after its forward (the loss's backward):
    # keep them gathered until then instead of gathering twice.
    fully_shard(root, reshard_after_forward=False, **kwargs)
    return root


def fsdp_modules(root) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def run_generation(root, fn, *args, **kwargs):
    """run_in_root(root, fn, ...) with every layer gathered once for the whole rollout (not once per decoded token),
    and everything sharded again afterwards.

    The layers are gathered inside the root's forward (after FSDP's lazy init), up front and on every rank in the
    same order: ranks then decode for different numbers of steps (or not at all, e.g. an empty evaluation share)
    without any collective left to wait for."""
    layers = [m for m in fsdp_modules(root) if m is not root]

    def gathered(policy, *a, **k):
        for m in layers:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            return fn(policy, *a, **k)
        finally:
            for m in layers:
                m.set_reshard_after_forward(True, recurse=False)
                m.reshard()

    try:
        return run_in_root(root, gathered, *args, **kwargs)
    finally:
        root.reshard()  # the root keeps its parameters gathered after a forward (see shard); free them now


def full_value(t) -> torch.Tensor:
    """A plain tensor from a DTensor (e.g. clip_grad_norm_'s total norm over sharded gradients)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
