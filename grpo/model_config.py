"""ModelConfig: the LoRA options under TRL's `ModelConfig` names (`--use_peft --lora_r ...`).

Only the fields this trainer reads; `get_peft_config` turns them into a `peft.LoraConfig` (peft is an optional
extra: `pip install grpo-kernels[peft]`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of the full model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to adapt (comma list), or 'all-linear' for every linear layer but the LM "
                          "head; None = peft's default for the architecture."},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved beside the adapter (not the LM head)."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilized LoRA: scale by alpha / sqrt(r)."})

    def __post_init__(self):
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = _split(self.lora_target_modules)
        if isinstance(self.lora_modules_to_save, str):
            self.lora_modules_to_save = _split(self.lora_modules_to_save)
        for name in ("use_peft", "use_rslora"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ValueError(f"lora_r must be a positive integer, got {self.lora_r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")


def _split(text: str) -> list[str] | None:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or parts == ["none"]:
        return None
    return parts


def get_peft_config(model_args: ModelConfig):
    """A `peft.LoraConfig` for causal-LM adapters, or None when use_peft is off (TRL's function of that name)."""
    if not model_args.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError("use_peft needs peft: pip install 'grpo-kernels[peft]'") from e
    targets = model_args.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft's spelling: every linear layer except the output head
    return LoraConfig(
        task_type="CAUSAL_LM", r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout, target_modules=targets,
        modules_to_save=model_args.lora_modules_to_save, use_rslora=model_args.use_rslora, bias="none",
    )
