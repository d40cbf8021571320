"""LoRA (peft): only the adapters train, the base model (adapters off) is the KL reference, the LM head is frozen
and may not carry an adapter, checkpoints hold the adapter only and resume exactly, `grpo eval` and the merged
export load it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import test_trainer as tt
from grpo import cli, lora, rollout, update
from grpo.model import load_model
from grpo.model_config import ModelConfig, get_peft_config
from grpo.trainer import GRPOTrainer

peft = pytest.importorskip("peft")


def lora_config(**kw):
    base = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    base.update(kw)
    return peft.LoraConfig(**base)


def make_lora_trainer(path, fake=True, peft_config=None, **overrides):
    args = tt.make_config(path, **overrides)
    trainer = GRPOTrainer("tiny", tt.letter_a_reward, args=args, train_dataset=tt.toy_rows(),
                          peft_config=peft_config or lora_config())
    if fake:
        trainer.generate_fn = tt.fake_generate
    return trainer


def _randomize_lora_b(model, seed=0):
    """peft starts B at zero (policy == base); a random B makes the adapter matter in the tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _batch(tok, seed=1):
    g = torch.Generator().manual_seed(seed)
    comps = [[int(x) for x in torch.randint(10, 90, (n,), generator=g)] for n in (4, 2, 6, 3, 5)]
    prompts = [[20, 21, 22], [20, 21, 22], [30, 31, 32, 33, 34], [40, 41], [30, 31, 32, 33, 34]]
    p_ids, p_mask = rollout.pad(prompts, tok.pad_token_id, "left")
    c_ids, c_mask = rollout.pad(comps, tok.pad_token_id, "right")
    return rollout.Rollout(rows=[{}] * 5, prompts=[""] * 5, completions=[""] * 5, completion_id_lists=comps,
                           prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_mask=c_mask,
                           is_truncated=torch.zeros(5, dtype=torch.bool),
                           advantages=torch.tensor([1.0, -0.5, 0.25, -0.75, 0.6]), num_items_in_batch=20.0)


def test_only_adapters_train_and_the_base_is_the_reference(tmp_path):
    trainer = make_lora_trainer(tmp_path, beta=0.1, max_steps=2, learning_rate=5e-3)
    assert trainer.ref_model is None  # no second copy of the model
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    head = trainer.model.get_output_embeddings()
    assert not head.weight.requires_grad and not any("lm_head" in n for n in trainable)

    seen = []
    original = update.micro_step

    def spy(model, loss_fn, mb, args, world_size):
        seen.append((copy.deepcopy(mb), {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}))
        return original(model, loss_fn, mb, args, world_size)

    update.micro_step = spy
    try:
        history = trainer.train()
    finally:
        update.micro_step = original
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0 at the start: policy == base
    assert history[1]["kl"] > 0.0

    base, _ = load_model("tiny")  # the same seeded base weights
    base_params = dict(base.named_parameters())
    for name, p in trainer.model.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(p.detach(), base_params[key].detach(), rtol=0, atol=0, msg=name)
    assert any(float(p.detach().abs().max()) > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)

    # The reference log-probs of step 2 are the base model's, although the adapter has moved by then.
    mb, _ = seen[1]
    expect = update.per_token_logps(base, mb, trainer.args)
    torch.testing.assert_close(mb.ref_logps, expect, rtol=1e-5, atol=1e-5)
    moved = update.per_token_logps(trainer.model, mb, trainer.args)
    assert float((moved - expect).abs().max()) > 1e-4


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_adapter_gradients_match_float64_full_logits(tmp_path, loss_type):
    """micro_step's LoRA gradients (fused loss, frozen head) equal float64 autograd through full logits."""
    import grpo_kernels.reference as ref

    model, tok = load_model("tiny")
    model = lora.apply(model, lora_config())
    _randomize_lora_b(model)
    batch = _batch(tok)
    args = tt.make_config(tmp_path, loss_type=loss_type, beta=0.05, per_device_train_batch_size=5,
                          num_generations=5, temperature=0.8)
    with lora.adapters_disabled(model):
        batch.ref_logps = update.per_token_logps(model, batch, args)
    update.micro_step(model, update.make_loss_fn(args), batch, args, 1)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert model.get_output_embeddings().weight.grad is None  # frozen head: no dW

    m64 = copy.deepcopy(model).double()
    m64.zero_grad()
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    hidden = m64.get_decoder()(input_ids=ids, attention_mask=mask,
                               position_ids=(mask.cumsum(1) - 1).clamp(min=0)).last_hidden_state
    p, c = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    num_items = batch.num_items_in_batch if loss_type == "dapo" else None
    loss, _ = ref.reference_fused_linear_grpo_loss(
        hidden[:, p - 1 : p - 1 + c], m64.get_output_embeddings().weight, batch.completion_ids,
        batch.completion_mask, batch.advantages.double(), ref_per_token_logps=batch.ref_logps.double(),
        num_items_in_batch=num_items, loss_type=loss_type, beta=0.05, temperature=0.8,
        use_bias_correction_kl=args.use_bias_correction_kl)
    loss.backward()
    assert len(got) == 4 * 7  # A and B of q, k, v, o, gate, up, down in 2 layers
    for name, p in m64.named_parameters():
        if p.requires_grad:
            g, r = got[name].double(), p.grad
            assert float(r.norm()) > 0, name
            assert float((g - r).norm() / r.norm()) < 1e-4, name


@pytest.mark.parametrize("where", [dict(target_modules=["q_proj", "lm_head"]), dict(modules_to_save=["lm_head"]),
                                   dict(target_modules=r".*(q_proj|lm_head)")])
def test_a_lora_on_the_lm_head_is_refused(tmp_path, where):
    with pytest.raises(ValueError, match="LM head"):
        make_lora_trainer(tmp_path, peft_config=lora_config(**where))


def test_peft_config_type_is_checked(tmp_path):
    with pytest.raises(TypeError, match="peft_config must be a peft.LoraConfig"):
        make_lora_trainer(tmp_path, peft_config={"r": 4})


def test_checkpoint_holds_the_adapter_and_resumes_exactly(tmp_path):
    cfg = dict(max_steps=3, save_steps=1, learning_rate=5e-3, beta=0.05)
    full = make_lora_trainer(tmp_path / "full", fake=False, **cfg)
    full.train()
    expected = {r["step"]: r for r in tt.read_rows(tmp_path / "full" / "metrics.jsonl") if "loss" in r}

    ckpt = tmp_path / "full" / "checkpoint-1"
    assert (ckpt / lora.ADAPTER_WEIGHTS).is_file() and (ckpt / lora.ADAPTER_CONFIG).is_file()
    assert not (ckpt / "model.safetensors").exists()  # no base weights
    assert json.loads((ckpt / lora.ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "tiny"

    # Resume from checkpoint-1 in a copy of the run: steps 2 and 3 repeat exactly.
    import shutil

    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for step in (2, 3):
        shutil.rmtree(tmp_path / "resumed" / f"checkpoint-{step}")
    resumed = make_lora_trainer(tmp_path / "resumed", fake=False, **cfg)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-1"))
    got = {r["step"]: r for r in tt.read_rows(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r}
    for step in (2, 3):
        for key in ("loss", "reward", "grad_norm", "kl", "entropy"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-7), (step, key)
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)

    # grpo eval / load_model: base + adapter; the merged export is a plain transformers folder.
    final = tmp_path / "full" / "checkpoint-3"
    loaded, _ = load_model(str(final))
    assert lora.is_peft(loaded)
    ids = torch.tensor([[20, 21, 22, 23, 24]])
    full.model.eval()
    with torch.no_grad():
        want = full.model(input_ids=ids).logits
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    with lora.adapters_disabled(full.model), torch.no_grad():
        assert float((full.model(input_ids=ids).logits - want).abs().max()) > 1e-4  # the adapter matters
    from grpo.cli import export_merged

    out = export_merged(final, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_resume_of_a_full_checkpoint_into_a_lora_run_is_refused(tmp_path):
    tt.make_trainer(tmp_path, max_steps=1, save_steps=1).train()
    with pytest.raises(FileNotFoundError, match="not a LoRA checkpoint"):
        make_lora_trainer(tmp_path, max_steps=2, save_steps=1).train(resume_from_checkpoint="latest")


def test_model_config_uses_trl_names_and_builds_a_lora_config():
    from grpo import cli

    _, run = cli.build_run(["--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.1",
                            "--lora_target_modules", "all-linear"])
    cfg = get_peft_config(run["model_config"])
    assert isinstance(cfg, peft.LoraConfig)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == (8, 16, 0.1, "all-linear")
    cfg = get_peft_config(ModelConfig(use_peft=True, lora_target_modules="q_proj,v_proj"))
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert get_peft_config(ModelConfig()) is None
    with pytest.raises(ValueError, match="lora_r"):
        ModelConfig(lora_r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        ModelConfig(lora_dropout=1.5)
    with pytest.raises(SystemExit, match="lora_r"):
        cli.build_run(["--lora_r", "eight"])


def test_cli_trains_lora_and_evaluates_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    cli.main(["train", "--preset", "smoke", "--output_dir", str(out), "--model", "tiny", "--dataset", "toy",
              "--reward_funcs", "toy", "--reward_weights", "none", "--max_steps", "1", "--save_steps", "1",
              "--no_eval", "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
              "--lora_target_modules", "all-linear"])
    ckpt = out / "checkpoint-1"
    assert (ckpt / lora.ADAPTER_WEIGHTS).is_file() and not (ckpt / "model.safetensors").exists()
    metrics = cli.cmd_eval(["--model", str(ckpt), "--dataset", "toy", "--reward_funcs", "toy",
                                       "--eval_max_samples", "3", "--max_completion_length", "4"])
    assert metrics["eval/num_samples"] == 3
    merged = tmp_path / "merged"
    cli.main(["export", "--model", str(ckpt), "--output_dir", str(merged)])
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
