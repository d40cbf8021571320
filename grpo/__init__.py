"""grpo: a lean GRPO trainer (TRL-compatible names) on top of the grpo_kernels fused loss.

    from grpo import GRPOConfig, GRPOTrainer, gsm8k_reward
    trainer = GRPOTrainer(model="smollm2-135m-instruct", reward_funcs=gsm8k_reward,
                          args=GRPOConfig(output_dir="runs/x"), train_dataset=rows)
    trainer.train()

Names are resolved lazily so that `import grpo.model` (or the CLI's --help) does not import the whole stack.
"""

__all__ = ["GRPOConfig", "GRPOTrainer", "gsm8k_reward", "math_reward", "format_reward", "REWARD_FUNCS", "load_model"]

_WHERE = {
    "GRPOConfig": "grpo.config",
    "GRPOTrainer": "grpo.trainer",
    "gsm8k_reward": "grpo.rewards",
    "math_reward": "grpo.rewards",
    "format_reward": "grpo.rewards",
    "REWARD_FUNCS": "grpo.rewards",
    "load_model": "grpo.model",
}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'grpo' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
