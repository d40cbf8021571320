"""The memory model: formulas checked by hand on a toy shape, and the table in docs/scaling.md is the one the code
prints."""

import pathlib

import pytest

from grpo import memory_model as mm

TOY = mm.Arch("toy", hidden=2, layers=1, intermediate=4, vocab=10, kv_dim=2, tied=False)


def test_parameter_counts_by_hand():
    # q, o: 2*2*2 = 8; k, v: 2*2*2 = 8; gate, up, down: 3*2*4 = 24 -> 40 per layer; embed + head: 2*10*2 = 40
    assert (TOY.layer_params, TOY.root_params, TOY.params) == (40, 40, 80)
    assert mm.QWEN25[3].params == pytest.approx(7.62e9, rel=0.01)  # Qwen2.5-7B's published size


def test_single_gpu_bytes_by_hand():
    # 18 B * 80 params = 1440; activations per token 1*4*2 + 20*2 + 8*4 = 80; loss: fp32 logits 1 token * 10 * 4 B
    # = 40, fp32 dW accumulator 4*10*2 = 80; generation: 12 B * 80 + KV 1*2*2*2 = 8
    got = mm.peak_bytes(TOY, "single", 1, tokens=1, loss_tokens=1)
    assert got == {"update": 1440 + 80 + 40 + 80, "generation": 960 + 8}


def test_the_loss_chunk_counts_fp32_logits_up_to_the_cap():
    # LoRA on one GPU: no dW accumulator, so the loss term is the chunk alone. Two tokens more add 2 * 10 * 4 B.
    one, three = (mm.peak_bytes(TOY, "lora", 1, tokens=1, loss_tokens=n)["update"] for n in (1, 3))
    assert three - one == 2 * 10 * 4
    # Far past the cap the chunk stops growing: 2.5 GiB, whatever the token count.
    big, bigger = (mm.peak_bytes(TOY, "lora", 1, tokens=1, loss_tokens=n)["update"] for n in (10**9, 2 * 10**9))
    assert bigger == big and big - one == pytest.approx(2.5 * 2**30 - 10 * 4)


def test_fsdp_shards_states_but_gathers_for_generation():
    a = mm.QWEN25[3]
    one, eight = mm.peak_bytes(a, "single", 1), mm.peak_bytes(a, "fsdp", 8)
    assert eight["update"] < one["update"] / 4
    assert eight["generation"] > 2 * a.params  # the whole bf16 model is resident while sampling
    vp = mm.peak_bytes(a, "fsdp", 8, vocab_parallel=True)
    assert vp["update"] < eight["update"] and vp["generation"] == eight["generation"]
    with pytest.raises(ValueError, match="mode"):
        mm.peak_bytes(a, "zero3", 8)


def test_docs_table_is_the_computed_one():
    docs = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text()
    assert mm.table() in docs
