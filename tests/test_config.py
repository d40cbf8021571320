import dataclasses
import json

import pytest

from grpo.config import PRESET_RUNS, PRESETS, GRPOConfig


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_defaults_match_trl_names_and_values():
    # TRL 1.16's values except those listed in DIFFERS_FROM_TRL (max_completion_length, num_train_epochs,
    # logging_steps, output_dir); tests/test_trl_parity.py compares every shared field with trl.GRPOConfig itself.
    c = GRPOConfig()
    expected = dict(
        output_dir="runs/grpo", beta=0.0, num_generations=8, max_prompt_length=512, max_completion_length=256,
        temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, epsilon=0.2, delta=None,
        loss_type="dapo", importance_sampling_level="token", num_iterations=1, scale_rewards="group",
        reward_weights=None, mask_truncated_completions=False, top_entropy_quantile=1.0, entropy_coef=0.0,
        use_bias_correction_kl=True, learning_rate=1e-6, lr_scheduler_type="linear", warmup_ratio=0.0,
        weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=-1, num_train_epochs=1.0,
        seed=42, logging_steps=1, save_steps=500, eval_strategy="no", report_to="none", kernel_backend="auto",
        kernel_strategy="auto", kernel_chunk_size=None, eval_temperature=0.0,
    )
    for name, value in expected.items():
        assert getattr(c, name) == value, name
    # derived exactly as TRL: epsilon_high = epsilon, one micro-step per generation, 8 completions per rollout
    assert c.epsilon_high == 0.2
    assert c.steps_per_generation == 1 and c.generation_batch_size == 8
    assert c.bf16 is False  # auto on a CPU-only machine


def test_generation_batch_derivation(monkeypatch):
    c = GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=3, num_generations=4)
    assert (c.steps_per_generation, c.generation_batch_size) == (3, 12)
    c = GRPOConfig(per_device_train_batch_size=4, generation_batch_size=16, num_generations=4)
    assert c.steps_per_generation == 4
    c = GRPOConfig(per_device_train_batch_size=4, steps_per_generation=2, num_generations=2)
    assert c.generation_batch_size == 8
    monkeypatch.setenv("WORLD_SIZE", "2")
    c = GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=3, num_generations=8)
    assert c.world_size == 2 and c.generation_batch_size == 24
    c = GRPOConfig(per_device_train_batch_size=4, generation_batch_size=32, num_generations=8)
    assert c.steps_per_generation == 4


def test_num_generations_not_dividing_the_batch_names_numbers_and_fix():
    with pytest.raises(ValueError) as e:
        GRPOConfig(num_generations=3)
    msg = str(e.value)
    assert "8 × 1 × 1 = 8" in msg and "num_generations=3" in msg
    assert "{2,4,8}" in msg  # the valid choices
    assert "per_device_train_batch_size=9" in msg  # and a concrete fix


def test_given_generation_batch_size_not_divisible():
    with pytest.raises(ValueError, match=r"generation_batch_size=12 .*8 × 1 = 8.*generation_batch_size=8 or 16"):
        GRPOConfig(generation_batch_size=12)
    with pytest.raises(ValueError, match=r"generation_batch_size=18 must be divisible by num_generations=4"):
        GRPOConfig(per_device_train_batch_size=6, generation_batch_size=18, num_generations=4)


def test_num_generations_below_two():
    with pytest.raises(ValueError, match=r"num_generations=1.*at least 2.*num_generations=2"):
        GRPOConfig(num_generations=1, per_device_train_batch_size=4)


def test_both_generation_settings_rejected_unless_they_agree():
    with pytest.raises(ValueError, match=r"both set and disagree.*8 × 3 = 24\): set only one"):
        GRPOConfig(per_device_train_batch_size=8, generation_batch_size=16, steps_per_generation=3)
    # A consistent pair is what dataclasses.replace (and FSDP2's input cast, which calls it) passes back.
    c = GRPOConfig(per_device_train_batch_size=8, generation_batch_size=16, steps_per_generation=2)
    assert (c.generation_batch_size, c.steps_per_generation) == (16, 2)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(loss_type="drgrpo"), r"loss_type='drgrpo'.*'dr_grpo'.*Did you mean 'dr_grpo'"),
        (dict(importance_sampling_level="seq"), r"importance_sampling_level='seq'.*'token', 'sequence'"),
        (dict(scale_rewards="std"), r"scale_rewards='std'.*'group', 'batch', 'none'"),
        (dict(lr_scheduler_type="cosin"), r"lr_scheduler_type='cosin'.*Did you mean 'cosine'"),
        (dict(kernel_backend="cuda"), r"kernel_backend='cuda'.*'auto', 'torch', 'triton'"),
        (dict(report_to="wandb"), r"report_to='wandb'.*'none', 'tensorboard'"),
        (dict(temperature=0.0), r"temperature must be a number > 0, got 0.0.*eval_temperature"),
        (dict(learning_rate=-1e-5), r"learning_rate must be a number >= 0, got -1e-05"),
        (dict(epsilon=-0.1), r"epsilon must be a number >= 0"),
        (dict(delta=0.0), r"delta must be a number > 0.*delta=None.*1\.2"),
        (dict(top_entropy_quantile=0.0), r"top_entropy_quantile must be a number in \(0, 1\]"),
        (dict(top_entropy_quantile=1.5), r"top_entropy_quantile must be a number in \(0, 1\]"),
        (dict(loss_type="dr_grpo", max_completion_length=None), r"dr_grpo.*max_completion_length"),
        (dict(importance_sampling_level="sequence", loss_type="cispo"), r"cispo.*importance_sampling_level='token'"),
        (dict(importance_sampling_level="sequence", loss_type="sapo"), r"sapo"),
        (dict(importance_sampling_level="sequence", loss_type="vespo"), r"vespo"),
        (dict(max_steps=0), r"max_steps must be a positive integer, or -1"),
        (dict(per_device_train_batch_size=0), r"per_device_train_batch_size must be an integer >= 1, got 0"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(beta=-0.1), r"beta must be a number >= 0"),
        (dict(save_total_limit=0), r"save_total_limit must be an integer >= 1.*None"),
        (dict(eval_strategy="epoch"), r"eval_strategy='epoch'.*'no', 'steps'"),
    ],
)
def test_validation_messages(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        GRPOConfig(**kwargs)


def test_valid_combinations_accepted():
    GRPOConfig(importance_sampling_level="sequence", loss_type="grpo")
    GRPOConfig(loss_type="dr_grpo", max_completion_length=64)
    GRPOConfig(delta=1.5, epsilon_high=0.28)
    GRPOConfig(report_to=["tensorboard"])
    with pytest.warns(UserWarning, match="luspo"):
        GRPOConfig(loss_type="luspo")
    with pytest.warns(UserWarning, match="delta=1.1"):
        GRPOConfig(delta=1.1)  # accepted (TRL only needs > 0) but flagged: below 1 + epsilon_high


def test_scale_rewards_accepts_bools_like_trl():
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    assert GRPOConfig(scale_rewards="batch").scale_rewards == "batch"


def test_epsilon_high_explicit_and_eval_steps_default():
    assert GRPOConfig(epsilon=0.1, epsilon_high=0.28).epsilon_high == 0.28
    assert GRPOConfig(epsilon=0.1).epsilon_high == 0.1
    assert GRPOConfig(eval_strategy="steps", logging_steps=5).eval_steps == 5


def test_round_trip_through_json():
    c = GRPOConfig(generation_batch_size=32, per_device_train_batch_size=8, reward_weights=[1, 0.5],
                   model_init_kwargs={"dtype": "bfloat16"}, report_to=["tensorboard"])
    d = json.loads(json.dumps(c.to_dict()))
    assert d["generation_batch_size"] == 32 and d["steps_per_generation"] is None  # as given, not derived
    c2 = GRPOConfig.from_dict(d)
    assert c2 == c and c2.steps_per_generation == 4
    resolved = c.to_dict(resolved=True)
    assert resolved["steps_per_generation"] == 4 and resolved["epsilon_high"] == 0.2 and resolved["bf16"] is False
    assert c.reward_weights == [1.0, 0.5]


def test_replace_rederives():
    c = GRPOConfig(per_device_train_batch_size=8, generation_batch_size=32)
    c2 = c.replace(per_device_train_batch_size=16)
    assert c2.steps_per_generation == 2 and c2.generation_batch_size == 32
    with pytest.raises(ValueError, match="both set"):  # why replace() exists
        dataclasses.replace(c, per_device_train_batch_size=16)
    assert dataclasses.replace(c) == c  # an unchanged copy is accepted


def test_unknown_keys_are_named_with_suggestion():
    with pytest.raises(TypeError, match=r"'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        GRPOConfig.from_dict({"lerning_rate": 1e-5})
    with pytest.raises(TypeError, match=r"'num_generation' \(did you mean 'num_generations'\?\).*'zzz'"):
        GRPOConfig.from_dict({"num_generation": 4, "zzz": 1})
    with pytest.raises(TypeError, match="max_complete_length"):
        GRPOConfig.from_preset("smoke", max_complete_length=8)


def test_field_names():
    names = GRPOConfig.field_names()
    assert names[0] == "output_dir" and "num_generations" in names and "kernel_chunk_size" in names
    assert len(names) == len(set(names))


def test_presets_build_and_override():
    assert set(PRESETS) == {"default", "smoke"} and set(PRESET_RUNS) == set(PRESETS)
    for name in PRESETS:
        c = GRPOConfig.from_preset(name)
        if c.reward_weights is not None:
            assert len(c.reward_weights) == len(PRESET_RUNS[name]["reward_funcs"])
    d = GRPOConfig.from_preset("default")
    # The default run (docs/trainer.md): 4 prompts x 8 completions per step.
    assert (d.generation_batch_size, d.num_generations) == (32, 8)
    assert GRPOConfig.from_preset("default", max_steps=3).max_steps == 3
    with pytest.raises(ValueError, match=r"unknown preset 'smok'.*Did you mean 'smoke'"):
        GRPOConfig.from_preset("smok")


def test_flag_values_are_read_by_the_field_annotation():
    """`grpo train` reads each flag's string as its field's type ("none" for None, JSON for lists and dicts)."""
    from grpo import cli

    c, _ = cli.build_run(["--learning_rate", "3e-6", "--max_steps", "10", "--max_prompt_length", "none",
                          "--bf16", "true", "--gradient_checkpointing", "0", "--reward_weights", "1,0.2",
                          "--model_init_kwargs", '{"dtype": "bfloat16"}', "--loss_type", "grpo", "--max_grad_norm", "1"])
    assert c.learning_rate == 3e-6 and c.max_steps == 10 and c.max_prompt_length is None
    assert c.bf16 is True and c.gradient_checkpointing is False
    assert c.reward_weights == [1.0, 0.2] and cli.build_run(["--reward_weights", "[1, 2]"])[0].reward_weights == [1, 2]
    assert c.model_init_kwargs == {"dtype": "bfloat16"} and c.loss_type == "grpo"
    assert c.max_grad_norm == 1.0 and isinstance(c.max_grad_norm, float)
    with pytest.raises(SystemExit, match="--max_steps.*cannot read 'ten' as int"):
        cli.build_run(["--max_steps", "ten"])
    with pytest.raises(SystemExit, match="did you mean --max_steps"):
        cli.build_run(["--max_step", "1"])


def test_entropy_options_validated():
    assert GRPOConfig(top_entropy_quantile=0.5, loss_type="vespo").top_entropy_quantile == 0.5  # token_loss_mask
    with pytest.raises(ValueError, match="entropy_coef must be a finite number"):
        GRPOConfig(entropy_coef=float("nan"))
    assert GRPOConfig(top_entropy_quantile=0.2, entropy_coef=0.01).entropy_coef == 0.01


def test_documented_differences_are_in_the_docstring():
    import grpo.config as config

    for name in (*config.DIFFERS_FROM_TRL, *config.OURS_ONLY):
        assert f"``{name}``" in config.__doc__, name
        assert name in GRPOConfig.field_names(), name
