"""Guards found in review: no gradient work under torch.no_grad, reference-model inputs checked up front."""

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import chunk_driver, loss_totals, strategies


def _inputs(B=3, T=5, H=16, V=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    return h, W, ids, torch.ones(B, T), torch.randn(B, generator=g)


@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_no_grad_forward_does_no_gradient_work(strategy, monkeypatch):
    calls = []
    real = loss_totals.loss_parts

    def spy(ops, logp, terms, opts, need_grad):
        calls.append(need_grad)
        return real(ops, logp, terms, opts, need_grad)

    for module in (chunk_driver, strategies):  # the chunked and the fused strategy's callers
        monkeypatch.setattr(module, "loss_parts", spy)
    monkeypatch.setattr(chunk_driver.Grads, "add", lambda *a, **k: calls.append(True))
    h, W, ids, mask, adv = _inputs()
    with torch.no_grad():
        loss, _ = gk.fused_linear_grpo_loss(h, W, ids, mask, adv, strategy=strategy, backend="torch", chunk_size=4)
    assert calls and not any(calls), "gradients were computed under torch.no_grad"
    with_grad, _ = gk.fused_linear_grpo_loss(h, W, ids, mask, adv, strategy=strategy, backend="torch")
    assert torch.allclose(loss, with_grad.detach())


def test_reference_weight_vocab_and_device_checked():
    h, W, ids, mask, adv = _inputs()
    with pytest.raises(ValueError, match="ref_weight has vocab size 5"):
        gk.fused_linear_grpo_loss(h, W, ids, mask, adv, beta=0.1, ref_input=h.detach(),
                                  ref_weight=torch.randn(5, W.shape[1]))


def test_interpreter_flag_parsed_like_triton(monkeypatch):
    from grpo_kernels.backends import interpreter_enabled
    for value, expected in [("1", True), ("true", True), ("ON", True), ("yes", True), ("0", False), ("", False)]:
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert interpreter_enabled() is expected


@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_repeated_backward_with_retain_graph_accumulates(strategy):
    # Gradients made in the forward must not be handed to autograd by reference: accumulation into .grad
    # would then modify them and a retained graph would give wrong (or refused) second backwards.
    h, W, ids, mask, adv = _inputs()
    loss, _ = gk.fused_linear_grpo_loss(h, W, ids, mask, adv, strategy=strategy, backend="torch")
    loss.backward(retain_graph=True)
    g_h, g_w = h.grad.clone(), W.grad.clone()
    loss.backward(retain_graph=True)
    (2 * loss).backward()
    assert torch.allclose(h.grad, 4 * g_h, rtol=1e-5, atol=1e-7)
    assert torch.allclose(W.grad, 4 * g_w, rtol=1e-5, atol=1e-7)
