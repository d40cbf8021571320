"""The Python API: the same run as `grpo train --preset smoke`, but with your own reward function.

    python examples/python_api.py            # a tiny random model on a toy task, ~1 minute on a laptop CPU
"""

from grpo import GRPOConfig, GRPOTrainer


def reward_letter_a(completions, **kwargs):
    """TRL's reward signature: one float (or None) per completion; dataset columns arrive as keywords."""
    texts = [c[-1]["content"] for c in completions]  # conversational prompts -> assistant messages
    return [t.count("a") / max(1, len(t)) for t in texts]


rows = [{"prompt": [{"role": "user", "content": f"Write the letter a as often as you can ({i})."}]} for i in range(64)]

args = GRPOConfig(
    output_dir="runs/python-api",
    num_generations=8,  # completions per prompt (the group)
    per_device_train_batch_size=32,  # completions per micro-batch: 4 prompts x 8
    max_completion_length=8,
    learning_rate=3e-3,
    max_steps=20,
    lr_scheduler_type="constant",
)
trainer = GRPOTrainer(model="tiny", reward_funcs=reward_letter_a, args=args, train_dataset=rows)
history = trainer.train()  # metrics.jsonl, checkpoints and reward_curve.png land in runs/python-api
print("reward at the first / last step:", history[0]["reward"], history[-1]["reward"])
