"""The trainer's GPU memory, written down: bytes per parameter and per token for one GPU, DDP, FSDP2 and LoRA.

`python -m grpo.memory_model` prints the table in docs/scaling.md ("Memory model"). These are estimates from the
formulas below (what each mode keeps resident, in this trainer), not measurements; the largest tensors are exact,
activations are an approximation (see ACT_* below).

Per GPU, W GPUs, P parameters, a model with L layers of p_layer parameters, hidden H, MLP width I, vocab V,
N tokens per micro-batch:
- full fine-tuning keeps fp32 weights, fp32 gradients and two fp32 AdamW moments: 16 B/parameter, plus the bf16
  copies autocast makes of the weights for the backward (2 B/parameter) -> 18 B/parameter on one GPU or DDP.
- FSDP2 shards the 16 B/parameter over W; the gathered bf16 layer(s) in flight and their fp32 gradients add
  about 12 B per parameter of one layer; the root unit (embeddings + LM head) is gathered for the whole update:
  2 B bf16 + 4 B fp32 gradient per root parameter. Generation gathers the whole model in bf16: 2 B/parameter.
- LoRA: the frozen base in bf16 (model_init_kwargs={"dtype": "bfloat16"}) 2 B/parameter, the adapters 16 B per
  adapter parameter; the reference policy is the same weights with adapters off; the LM head is frozen (no dW).
- The fused loss holds one chunk of fp32 logits, 4 B per logit (at most 2.5 GiB, grpo_kernels' default) and,
  when the head trains, an fp32 dW accumulator of V*H*4 bytes; with the vocab-parallel loss the head's rows (its
  gathered copy, gradient and accumulator) are split over the W ranks.
- activations per token (bf16, SDPA/flash attention, gradient checkpointing on): the L layer inputs (fp32
  residual stream, 4H bytes each) plus one layer recomputed in full (about 20H + 8I bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GPU_BYTES = 80 * GB  # H100 80 GB
USABLE = 0.95  # CUDA context, allocator fragmentation
LOSS_CHUNK_CAP = 2.5 * 2**30  # grpo_kernels.strategies.default_chunk_size's budget on CUDA


@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    kv_dim: int  # num_key_value_heads * head_dim
    tied: bool

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_dim
        return 2 * h * h + 2 * h * kv + 3 * h * self.intermediate  # q, o; k, v; gate, up, down

    @property
    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    @property
    def lora_params(self) -> int:  # r = 16 on every linear layer but the head ("all-linear")
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)
        return 16 * self.layers * per_layer

    def act_bytes_per_token(self) -> float:
        return self.layers * 4 * self.hidden + (20 * self.hidden + 8 * self.intermediate)

    def kv_bytes_per_token(self) -> float:
        return self.layers * 2 * self.kv_dim * 2  # bf16 keys and values


# Qwen2.5 (vocab 151936/152064): a family with one shape from 0.5B to 72B.
QWEN25 = [
    Arch("Qwen2.5-0.5B", 896, 24, 4864, 151936, 128, True),
    Arch("Qwen2.5-1.5B", 1536, 28, 8960, 151936, 256, True),
    Arch("Qwen2.5-3B", 2048, 36, 11008, 151936, 256, True),
    Arch("Qwen2.5-7B", 3584, 28, 18944, 152064, 512, False),
    Arch("Qwen2.5-14B", 5120, 48, 13824, 152064, 1024, False),
    Arch("Qwen2.5-32B", 5120, 64, 27648, 152064, 1024, False),
    Arch("Qwen2.5-72B", 8192, 80, 29568, 152064, 1024, False),
]

# The seed's config: num_generations 8, max_completion_length 256; per_device_train_batch_size 8 (one group per
# micro-batch) and prompts of at most 256 tokens -> N = 8 * 512 tokens per micro-batch and per rollout, of which
# the 8 * 256 completion positions go through the LM head and the loss.
SEED_TOKENS = 8 * (256 + 256)
SEED_COMPLETION_TOKENS = 8 * 256


def _loss_workspace(a: Arch, tokens: int, head_trains: bool, shards: int) -> float:
    v = a.vocab / shards
    return min(LOSS_CHUNK_CAP, tokens * v * 4) + (4 * v * a.hidden if head_trains else 0)  # fp32 logits: 4 B each


def peak_bytes(a: Arch, mode: str, gpus: int, vocab_parallel: bool = False, tokens: int = SEED_TOKENS,
               loss_tokens: int = SEED_COMPLETION_TOKENS) -> dict:
    """{'update': bytes, 'generation': bytes} per GPU; mode in ('single', 'ddp', 'fsdp', 'lora', 'lora+fsdp')."""
    p, w = a.params, gpus
    acts = tokens * a.act_bytes_per_token()
    kv = tokens * a.kv_bytes_per_token()
    head = a.vocab * a.hidden
    vp = w if vocab_parallel else 1  # the head's rows split over the ranks
    if mode in ("single", "ddp"):  # DDP keeps a full replica per GPU (+ a 32 MiB reduction bucket)
        update = 18 * p + acts + _loss_workspace(a, loss_tokens, True, 1)
        generation = 12 * p + kv  # fp32 weights + AdamW moments (gradients are freed after each step)
    elif mode == "fsdp":
        root = 6 * (a.root_params - head) + 6 * head / vp
        update = 16 * p / w + 12 * a.layer_params + root + acts + _loss_workspace(a, loss_tokens, True, vp)
        generation = 12 * p / w + 2 * p + kv  # every layer gathered in bf16 for the rollout
    elif mode in ("lora", "lora+fsdp"):
        base = 2 * p / (w if mode == "lora+fsdp" else 1)
        gathered = 0 if mode == "lora" else 2 * (a.root_params - head) + 2 * head / vp + 4 * a.layer_params
        update = base + gathered + 16 * a.lora_params + acts + _loss_workspace(a, loss_tokens, False, vp)
        generation = (2 * p if mode == "lora+fsdp" else base) + 12 * a.lora_params + kv
    else:
        raise ValueError(f"mode must be single, ddp, fsdp, lora or lora+fsdp, got {mode!r}")
    return {"update": update, "generation": generation}


def largest_fitting(mode: str, gpus: int, vocab_parallel: bool = False, family=QWEN25) -> str:
    fits = [a.name for a in family
            if max(peak_bytes(a, mode, gpus, vocab_parallel).values()) <= USABLE * GPU_BYTES]
    return fits[-1] if fits else "none"


def table() -> str:
    rows = ["| mode | state per parameter | 1 H100 | 8 H100 | 8 H100, vocab-parallel loss |", "|---|---|---|---|---|"]
    per_param = {"single": "18 B", "ddp": "18 B per GPU", "fsdp": "16/W B (+2 B gathered for generation)",
                 "lora": "2 B base + 16 B per adapter param", "lora+fsdp": "2/W B base (+2 B gathered for generation)"}
    for mode in ("single", "ddp", "fsdp", "lora", "lora+fsdp"):
        one = largest_fitting(mode, 1) if mode in ("single", "lora") else "—"
        rows.append(f"| {mode} | {per_param[mode]} | {one} | "
                    f"{largest_fitting(mode, 8) if mode != 'single' and mode != 'lora' else '—'} | "
                    f"{largest_fitting(mode, 8, True) if 'fsdp' in mode else '—'} |")
    return "\n".join(rows)


def detail(a: Arch) -> str:
    lines = [f"{a.name}: {a.params / 1e9:.2f} B parameters, activations {a.act_bytes_per_token() / 1e6:.2f} MB/token, "
             f"KV cache {a.kv_bytes_per_token() / 1e3:.0f} kB/token, LoRA r=16 all-linear {a.lora_params / 1e6:.0f} M"]
    for mode, w in (("single", 1), ("fsdp", 8), ("lora", 1), ("lora+fsdp", 8)):
        for vp in ((False, True) if "fsdp" in mode else (False,)):
            b = peak_bytes(a, mode, w, vp)
            lines.append(f"  {mode:9s} W={w}{' vocab-parallel' if vp else '':15s} update {b['update'] / GB:6.1f} GB"
                         f"  generation {b['generation'] / GB:6.1f} GB")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
    for arch in QWEN25:
        print(detail(arch))
