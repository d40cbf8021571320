"""Misuse raises ValueError/TypeError whose message names the offending argument (and lists valid values)."""

import re

import pytest
import torch

import grpo_kernels as gk
import oracle

B, T, H, V = 3, 5, 24, 37


def _p(**kw):
    return oracle.make_problem(B=B, T=T, H=H, V=V, seed=0, ref="given", vllm=True, bias=True, **kw)


def _call(mutate=None, **opts):
    p = _p()
    if mutate:
        mutate(p)
    opts.setdefault("backend", "torch")
    return gk.fused_linear_grpo_loss(**p, **opts)


def _set(key, value):
    def f(p):
        p[key] = value(p) if callable(value) else value
    return f


def _ids_at(value, masked=False):
    def f(p):
        m = p["attention_mask"]
        pos = (m == 0).nonzero()[0] if masked else (m != 0).nonzero()[0]
        p["selected_token_ids"] = p["selected_token_ids"].clone()
        p["selected_token_ids"][pos[0], pos[1]] = value
    return f


SHAPE_CASES = [
    ("attention_mask", _set("attention_mask", lambda p: torch.ones(B, T + 1))),
    ("attention_mask", _set("attention_mask", lambda p: torch.ones(B * T))),
    ("advantages", _set("advantages", lambda p: torch.randn(B + 1))),
    ("advantages", _set("advantages", lambda p: torch.randn(B, T + 1))),
    ("old_per_token_logps", _set("old_per_token_logps", lambda p: torch.randn(B, T - 1))),
    ("ref_per_token_logps", _set("ref_per_token_logps", lambda p: torch.randn(B + 1, T))),
    ("vllm_is_ratio", _set("vllm_is_ratio", lambda p: torch.rand(B, T + 1))),
    ("hidden", _set("hidden", lambda p: torch.randn(B, T + 1, H))),
    ("hidden", _set("hidden", lambda p: torch.randn(B * T + 1, H))),
    ("hidden", _set("hidden", lambda p: torch.randn(B * T * H))),
    ("bias", _set("bias", lambda p: torch.randn(V + 1))),
    ("selected_token_ids", _set("selected_token_ids", lambda p: p["selected_token_ids"].reshape(-1))),
    ("weight", _set("weight", lambda p: torch.randn(V * H))),
]


@pytest.mark.parametrize("name,mutate", SHAPE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SHAPE_CASES)])
def test_shape_mismatch_names_the_argument(name, mutate):
    with pytest.raises(ValueError, match=name):
        _call(mutate)


def test_hidden_size_mismatch_names_both():
    with pytest.raises(ValueError) as e:
        _call(_set("hidden", lambda p: torch.randn(B, T, H + 1)))
    assert "hidden" in str(e.value) and "weight" in str(e.value)


def test_ref_model_shapes():
    p = oracle.make_problem(B=B, T=T, H=H, V=V, seed=0, ref="model")
    with pytest.raises(ValueError, match="ref_input"):
        gk.fused_linear_grpo_loss(**dict(p, ref_input=torch.randn(B, T + 1, H)), beta=0.1, backend="torch")
    with pytest.raises(ValueError, match="ref_input|ref_weight"):
        gk.fused_linear_grpo_loss(**dict(p, ref_weight=torch.randn(V, H + 2)), beta=0.1, backend="torch")
    with pytest.raises(ValueError, match="ref_bias"):
        gk.fused_linear_grpo_loss(**dict(p, ref_bias=torch.randn(V + 2)), beta=0.1, backend="torch")


@pytest.mark.parametrize("which", ["hidden", "weight", "bias"])
def test_dtype_mismatch(which):
    with pytest.raises((ValueError, TypeError)) as e:
        _call(_set(which, lambda p: p[which].to(torch.bfloat16)))
    assert which in str(e.value) or ("hidden" in str(e.value) and "weight" in str(e.value))


@pytest.mark.parametrize("value", [V, V + 100, -1])
def test_target_ids_out_of_range(value):
    with pytest.raises(ValueError, match="selected_token_ids") as e:
        _call(_ids_at(value))
    assert str(V) in str(e.value)  # says what the valid range is


def test_target_ids_out_of_range_in_linear_logprobs():
    h, W = torch.randn(4, H), torch.randn(V, H)
    with pytest.raises(ValueError, match="targets"):
        gk.linear_logprobs(h, W, torch.tensor([0, 1, V, 2]), backend="torch")
    with pytest.raises(ValueError, match="targets"):
        gk.linear_logprobs(h, W, torch.tensor([0, -3, 1, 2]), backend="torch")


def test_validate_false_skips_the_id_check():
    """validate=False drops the range check (and its device sync): an out-of-range id then reaches torch's own
    indexing on the torch backend, which raises its RuntimeError, not our ValueError naming the argument."""
    with pytest.raises(RuntimeError, match="out of bounds") as e:
        _call(_ids_at(V + 3), validate=False)
    assert not isinstance(e.value, ValueError) and "selected_token_ids" not in str(e.value)
    # and with valid ids, validate=False changes nothing
    l1, _ = _call(validate=False)
    l2, _ = _call()
    assert torch.equal(l1, l2)


def test_ids_under_the_mask_are_not_checked():
    """Padding positions may hold any id (e.g. -100): they carry no loss, so they are neither checked nor used."""
    l_ok, _ = _call()
    for bad in (-100, V + 7):
        loss, _ = _call(_ids_at(bad, masked=True), compute_entropy=True)
        assert torch.equal(loss, l_ok)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_ids(dtype):
    with pytest.raises(TypeError, match="selected_token_ids"):
        _call(_set("selected_token_ids", lambda p: p["selected_token_ids"].to(dtype)))


@pytest.mark.parametrize("key", ["hidden", "weight", "selected_token_ids", "attention_mask", "advantages"])
def test_non_tensor_inputs(key):
    with pytest.raises(TypeError, match=key):
        _call(_set(key, lambda p: p[key].tolist()))


# ----------------------------------------------------------------------------------------------------- options
def test_unknown_loss_type_lists_valid_ones():
    with pytest.raises(ValueError, match="loss_type") as e:
        _call(loss_type="ppo")
    assert all(lt in str(e.value) for lt in oracle.LOSS_TYPES)


def test_unknown_importance_sampling_level_lists_valid_ones():
    with pytest.raises(ValueError, match="importance_sampling_level") as e:
        _call(importance_sampling_level="sentence")
    assert "token" in str(e.value) and "sequence" in str(e.value)


def test_dr_grpo_needs_max_completion_length():
    with pytest.raises(ValueError, match="max_completion_length"):
        _call(loss_type="dr_grpo")


@pytest.mark.parametrize("value", [0, -1, True, "8"])
def test_bad_max_completion_length(value):
    with pytest.raises((ValueError, TypeError), match="max_completion_length"):
        _call(loss_type="dr_grpo", max_completion_length=value)


@pytest.mark.parametrize("key", ["temperature", "sapo_temperature_pos", "sapo_temperature_neg", "delta"])
@pytest.mark.parametrize("value", [0.0, -0.5])
def test_non_positive_temperatures_and_delta(key, value):
    with pytest.raises(ValueError, match=key):
        _call(**{key: value})


@pytest.mark.parametrize("key", ["temperature", "beta", "epsilon_low", "epsilon_high"])
def test_non_finite_options(key):
    with pytest.raises((ValueError, TypeError), match=key):
        _call(**{key: float("nan")})


@pytest.mark.parametrize("lt", oracle.TOKEN_ONLY_TYPES)
def test_sequence_level_rejected_for_token_only_losses(lt):
    with pytest.raises(ValueError, match="importance_sampling_level") as e:
        _call(loss_type=lt, importance_sampling_level="sequence")
    assert lt in str(e.value)


def test_unknown_option_keyword_is_type_error():
    with pytest.raises(TypeError, match="epsilon_hgih"):
        _call(epsilon_hgih=0.3)
    with pytest.raises(TypeError, match="bogus"):
        gk.grpo_loss(torch.randn(B, T), torch.ones(B, T), torch.randn(B), bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        gk.FusedLinearGRPOLoss(bogus=1)


@pytest.mark.parametrize("key,value", [("backend", "cuda"), ("backend", "Torch"), ("strategy", "tiled"),
                                       ("strategy", None)])
def test_bad_backend_or_strategy(key, value):
    with pytest.raises(ValueError, match=key) as e:
        _call(**{key: value})
    valid = ("torch", "triton") if key == "backend" else ("chunked", "fused")
    assert all(v in str(e.value) for v in valid)


@pytest.mark.parametrize("value", [0, -4, 2.5])
def test_bad_chunk_size(value):
    with pytest.raises((ValueError, TypeError), match="chunk_size"):
        _call(chunk_size=value)


def test_bad_num_items_in_batch():
    with pytest.raises(TypeError, match="num_items_in_batch"):
        _call(_set("num_items_in_batch", "12"))
    with pytest.raises(ValueError, match="num_items_in_batch"):
        _call(_set("num_items_in_batch", torch.tensor([3.0, 4.0])))


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="loss_type"):
        gk.FusedLinearGRPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="max_completion_length"):
        gk.FusedLinearGRPOLoss(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="sapo_temperature_neg"):
        gk.FusedLinearGRPOLoss(sapo_temperature_neg=0.0)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        gk.FusedLinearGRPOLoss(loss_type="vespo", importance_sampling_level="sequence")


def test_grpo_loss_input_checks():
    lp, m, a = torch.randn(B, T), torch.ones(B, T), torch.randn(B)
    with pytest.raises(ValueError, match="per_token_logps"):
        gk.grpo_loss(lp.reshape(-1), m.reshape(-1), a)
    with pytest.raises(ValueError, match="attention_mask"):
        gk.grpo_loss(lp, torch.ones(B, T + 1), a)
    with pytest.raises(ValueError, match="advantages"):
        gk.grpo_loss(lp, m, torch.randn(B + 2))
    with pytest.raises(ValueError, match="old_per_token_logps"):
        gk.grpo_loss(lp, m, a, old_per_token_logps=torch.randn(B, T + 1))
    with pytest.raises(ValueError, match="vllm_is_ratio"):
        gk.grpo_loss(lp, m, a, vllm_is_ratio=torch.rand(B + 1, T))
    with pytest.raises(TypeError, match="per_token_logps"):
        gk.grpo_loss(lp.long(), m, a)
    with pytest.raises(ValueError, match="loss_type"):
        gk.grpo_loss(lp, m, a, loss_type="nope")


def test_linear_logprobs_input_checks():
    h, W = torch.randn(4, H), torch.randn(V, H)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="hidden"):
        gk.linear_logprobs(torch.randn(4, H + 1), W, y)
    with pytest.raises(ValueError, match="hidden"):
        gk.linear_logprobs(torch.randn(5, H), W, y)
    with pytest.raises(ValueError, match="bias"):
        gk.linear_logprobs(h, W, y, bias=torch.randn(V - 1))
    with pytest.raises(ValueError, match="temperature"):
        gk.linear_logprobs(h, W, y, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        gk.linear_logprobs(h, W, y, backend="nope")
    with pytest.raises((ValueError, TypeError), match="hidden|weight"):
        gk.linear_logprobs(h.double(), W, y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_triton_on_cpu_without_interpreter(monkeypatch):
    """On CPU tensors, backend='triton' needs the interpreter; without it the error says so (checked before any
    kernel runs, so flipping the variable here is safe)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=re.compile("triton", re.I)) as e:
        _call(backend="triton")
    assert "TRITON_INTERPRET" in str(e.value) or "CUDA" in str(e.value)
