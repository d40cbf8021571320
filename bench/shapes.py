"""Benchmark presets, the cases a sweep expands to, and the random inputs each case is run on.

Every implementation of a case gets bit-identical inputs: they are drawn from a seeded generator on the
benchmark device, so separate worker processes rebuild the same tensors.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch

# (hidden size, vocab size) of the LM head.
PRESETS: dict[str, tuple[int, int]] = {
    "qwen2.5-0.5b": (896, 151936),
    "qwen2.5-1.5b": (1536, 151936),
    "qwen2.5-7b": (3584, 152064),
    "llama3-8b": (4096, 128256),
    "gemma2-2b": (2304, 256000),
    # CPU-sized: V/H = 32 like llama3-8b; at 4096 tokens full fp32 logits are 128 MiB, so the memory
    # difference between materialising and streaming the logits is plain on a 2-core machine.
    "quick": (256, 8192),
    # for the suite's own unit test only
    "tiny": (48, 640),
}

QUICK = {"preset": ["quick"], "tokens": [1024, 2048, 4096], "seq_len": 256, "dtype": ["fp32"]}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

MODES = ("loss", "logprobs")

# TRL builds completion_mask with `.int()`.
MASK_DTYPE = torch.int32

# Logit scale of the random inputs: hidden ~ N(0, 1), weight ~ N(0, (LOGIT_STD^2)/H), so logits ~ N(0, LOGIT_STD^2).
LOGIT_STD = 2.0
# old/ref log-probs = the policy's own log-probs plus N(0, DRIFT^2): ratios near 1, a few percent clipped.
DRIFT = 0.1


def parse_tokens(text: str) -> list[int]:
    """'1k,4096,16K' -> [1024, 4096, 16384]."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        try:
            value = int(float(part[:-1] if mult > 1 else part) * mult)
        except ValueError:
            raise ValueError(f"--tokens: cannot parse {part!r} (use e.g. 1024,4k,16384)") from None
        if value <= 0:
            raise ValueError(f"--tokens: {part!r} must be positive")
        out.append(value)
    if not out:
        raise ValueError("--tokens: empty list")
    return out


def parse_floats(text: str, name: str, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    vals = []
    for part in str(text).split(","):
        if part.strip():
            try:
                v = float(part)
            except ValueError:
                raise ValueError(f"{name}: cannot parse {part!r}") from None
            if not lo <= v < hi:
                raise ValueError(f"{name}: {v} must be in [{lo}, {hi})")
            vals.append(v)
    if not vals:
        raise ValueError(f"{name}: empty list")
    return vals


def parse_dtypes(text: str) -> list[str]:
    out = [d.strip() for d in str(text).split(",") if d.strip()]
    for d in out:
        if d not in DTYPES:
            raise ValueError(f"--dtype: unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    if not out:
        raise ValueError("--dtype: empty list")
    return out


def resolve_preset(name: str) -> tuple[int, int]:
    if name in PRESETS:
        return PRESETS[name]
    # 'H=512,V=32000' or '512x32000' for ad-hoc shapes
    try:
        h, v = name.lower().replace("h=", "").replace("v=", "").replace(",", "x").split("x")
        return int(h), int(v)
    except ValueError:
        raise ValueError(
            f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)} or give HxV like 512x32000"
        ) from None


@dataclass(frozen=True)
class Case:
    """One benchmarked problem: N = batch * seq_len tokens through an (V x H) LM head."""

    mode: str
    preset: str
    hidden: int
    vocab: int
    tokens: int
    seq_len: int
    dtype: str
    pad_frac: float = 0.0
    zero_adv_frac: float = 0.0

    @property
    def batch(self) -> int:
        return self.tokens // self.seq_len

    @property
    def flops(self) -> float:
        """Dense matmul FLOPs: forward 2NHV; forward+backward (logits, dH, dW) 6NHV."""
        return (6.0 if self.mode == "loss" else 2.0) * self.tokens * self.hidden * self.vocab

    @property
    def key(self) -> str:
        return (
            f"{self.mode}/{self.preset}/N={self.tokens}/T={self.seq_len}/{self.dtype}"
            f"/pad={self.pad_frac:g}/zadv={self.zero_adv_frac:g}"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(batch=self.batch, flops=self.flops, key=self.key)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def make_cases(
    mode: str,
    presets: list[str],
    tokens: list[int],
    seq_len: int,
    dtypes: list[str],
    pad_fracs: list[float],
    zero_adv_fracs: list[float],
) -> list[Case]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if seq_len <= 0:
        raise ValueError(f"--seq-len must be positive, got {seq_len}")
    cases = []
    for preset, dtype, n, pad, zadv in itertools.product(presets, dtypes, sorted(tokens), pad_fracs, zero_adv_fracs):
        h, v = resolve_preset(preset)
        t = min(seq_len, n)
        # whole sequences only: round the token count down to a multiple of the sequence length
        n_eff = (n // t) * t
        cases.append(Case(mode, preset, h, v, n_eff, t, dtype, pad, zadv))
    return cases


def input_bytes(case: Case) -> int:
    """Bytes of the inputs every implementation shares (hidden, weight, ids, mask, advantages, old/ref logps)."""
    s = DTYPES[case.dtype].itemsize
    n = case.tokens
    return n * case.hidden * s + case.vocab * case.hidden * s + n * (8 + 4 + 4 + 4) + case.batch * 4


def grad_bytes(case: Case) -> int:
    """The gradients any loss implementation must return: dH and dW in the input dtype."""
    if case.mode != "loss":
        return 0
    s = DTYPES[case.dtype].itemsize
    return (case.tokens + case.vocab) * case.hidden * s


def _gen(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@torch.no_grad()
def policy_logprobs(hidden2d: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 log-probs of `ids`, computed in row chunks so building the inputs never holds full logits."""
    n = hidden2d.shape[0]
    budget = (1 << 30) if hidden2d.is_cuda else (64 << 20)  # fp32 logits held at a time
    rows = max(1, min(n, budget // (4 * weight.shape[0])))
    out = torch.empty(n, dtype=torch.float32, device=hidden2d.device)
    for s in range(0, n, rows):
        z = (hidden2d[s : s + rows] @ weight.T).float() / temperature
        out[s : s + rows] = z.gather(1, ids[s : s + rows, None]).squeeze(1) - torch.logsumexp(z, dim=1)
    return out


def make_inputs(
    case: Case,
    device: torch.device | str,
    seed: int = 0,
    beta: float = 0.0,
    temperature: float = 1.0,
    requires_grad: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Random inputs for `case` (never zeros): hidden (B,T,H), weight (V,H), ids/mask/old[/ref] (B,T), advantages (B,).

    Padding: each sequence ends in a run of padding whose length is drawn so the batch's padding fraction is
    about `pad_frac` (every sequence keeps at least one real token). Zero advantage: round(zero_adv_frac * B)
    randomly chosen sequences get A = 0 exactly, the others A ~ N(0, 1).
    """
    device = torch.device(device)
    dtype = DTYPES[case.dtype]
    b, t, h, v = case.batch, case.seq_len, case.hidden, case.vocab
    g = _gen(device, seed)
    if requires_grad is None:
        requires_grad = case.mode == "loss"
    hidden = torch.randn(b, t, h, generator=g, device=device, dtype=torch.float32).to(dtype)
    weight = (torch.randn(v, h, generator=g, device=device, dtype=torch.float32) * (LOGIT_STD / math.sqrt(h))).to(dtype)
    ids = torch.randint(0, v, (b, t), generator=g, device=device, dtype=torch.int64)

    pad = (torch.rand(b, generator=g, device=device) * 2.0 * case.pad_frac * t).round().long().clamp(0, t - 1)
    pos = torch.arange(t, device=device)
    mask = (pos[None, :] < (t - pad)[:, None]).to(MASK_DTYPE)

    adv = torch.randn(b, generator=g, device=device, dtype=torch.float32)
    adv = torch.where(adv == 0, torch.full_like(adv, 0.5), adv)
    n_zero = int(round(case.zero_adv_frac * b))
    if n_zero:
        adv[torch.randperm(b, generator=g, device=device)[:n_zero]] = 0.0

    logp = policy_logprobs(hidden.view(b * t, h), weight, ids.view(-1), temperature).view(b, t)
    old = logp + DRIFT * torch.randn(b, t, generator=g, device=device)
    inputs = {"hidden": hidden, "weight": weight, "ids": ids, "mask": mask, "advantages": adv, "old": old}
    if beta != 0.0:
        inputs["ref"] = logp + DRIFT * torch.randn(b, t, generator=g, device=device)
    if requires_grad:
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
    return inputs


def realized_sparsity(inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    mask = inputs["mask"]
    return {
        "pad_frac": float(1.0 - mask.float().mean()),
        "zero_adv_frac": float((inputs["advantages"] == 0).float().mean()),
    }
