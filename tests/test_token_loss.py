"""The token-level loss-from-log-probs kernel against `loss_math.token_loss_and_grad` (fp32, same inputs) and
float64 oracles. Without CUDA it runs under TRITON_INTERPRET=1 on CPU tensors."""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from grpo_kernels.kernels.token_loss import token_loss_grad  # noqa: E402
from grpo_kernels.loss_math import TokenTerms, _gamma_weights, token_loss_and_grad  # noqa: E402
from grpo_kernels.options import CLIPPED_LOSS_TYPES, LOSS_TYPES, LossOptions  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 1e-5
METRICS = ("kl_sum", "clip_low", "clip_high", "clip_region")


def make_terms(M, seed, old=True, ref=True, rho=True, vespo=False, dtype=torch.float32):
    """Realistic random chunk: logp ~ -2 +- 1, old = logp + 0.3 N(0,1) (ratios cross the clip bounds), fractional
    masks, per-sequence advantages with some sequences at exactly 0 plus a few zero tokens."""
    g = torch.Generator().manual_seed(seed)
    S = max(1, min(7, M))
    seq = torch.sort(torch.randint(0, S, (M,), generator=g)).values
    logp = (-2.0 + torch.randn(M, generator=g)).clamp(max=-1e-3)
    mask = torch.where(torch.rand(M, generator=g) < 0.3, 1.0, 0.25 + 0.75 * torch.rand(M, generator=g))
    seq_adv = torch.randn(S, generator=g)
    seq_adv[torch.rand(S, generator=g) < 0.25] = 0.0
    adv = seq_adv[seq].clone()
    adv[torch.rand(M, generator=g) < 0.05] = 0.0
    weight = mask * (0.5 + torch.rand(M, generator=g)) / M
    seq_len = torch.zeros(S).index_add_(0, seq, mask).clamp(min=1.0)
    old_t = logp + 0.3 * torch.randn(M, generator=g)
    ref_t = logp + 0.2 * torch.randn(M, generator=g)
    rho_t = 0.5 + torch.rand(M, generator=g)
    vespo_log_rho = None
    if vespo and rho:
        vespo_log_rho = torch.zeros(S).index_add_(0, seq, rho_t.log().clamp(math.log(1e-8), 20.0))
    to = lambda x: None if x is None else x.to(DEVICE, dtype)  # noqa: E731
    terms = TokenTerms(weight=to(weight), mask=to(mask), adv=to(adv), old=to(old_t) if old else None,
                       ref=to(ref_t) if ref else None, rho=to(rho_t) if rho else None, seq=seq.to(DEVICE),
                       num_seqs=S, seq_len=to(seq_len), vespo_log_rho=to(vespo_log_rho))
    return to(logp), terms


def as64(logp, terms):
    cast = lambda x: None if x is None else x.double()  # noqa: E731
    fields = {k: cast(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in vars(terms).items()}
    return logp.double(), TokenTerms(**fields)


def assert_near(out, ref, name, rtol=RTOL, atol=1e-6):
    assert out is not None, f"{name} missing"
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    diff = (out - ref).norm().item()
    bound = rtol * ref.norm().item() + atol
    assert diff <= bound, f"{name}: |out - ref| = {diff:.3e} > {bound:.3e}"


def assert_parts(got, want, rtol=RTOL, need_grad=True):
    assert_near(got.loss, want.loss, "loss", rtol)
    for k in METRICS:
        assert_near(getattr(got, k), getattr(want, k), k, rtol)
    if need_grad:
        assert got.grad.dtype == torch.float32
        assert_near(got.grad, want.grad, "grad", rtol, atol=1e-7)
    else:
        assert got.grad is None


KL_CONFIGS = [dict(beta=0.0), dict(beta=0.04), dict(beta=0.04, use_bias_correction_kl=True)]
CASES = [(lt, old, kl, rho, delta)
         for lt in LOSS_TYPES for old in (True, False) for kl in range(3) for rho in (True, False)
         for delta in ((None, 1.4) if lt in CLIPPED_LOSS_TYPES else (None,))]


def opts_for(lt, kl, delta, **extra):
    kw = dict(loss_type=lt, max_completion_length=64, epsilon_low=0.2, epsilon_high=0.28, delta=delta)
    return LossOptions(**{**kw, **KL_CONFIGS[kl], **extra})


@pytest.mark.parametrize("lt,old,kl,rho,delta", CASES)
def test_matches_loss_math(lt, old, kl, rho, delta):
    opts = opts_for(lt, kl, delta)
    logp, terms = make_terms(37, seed=len(lt) * 100 + kl * 10 + 2 * old + rho, old=old, rho=rho,
                             vespo=lt == "vespo")
    got = token_loss_grad(logp, terms, opts)
    assert_parts(got, token_loss_and_grad(logp, terms, opts))
    # and the float64 spec, looser (fp32 rounding of the inputs' math)
    want64 = token_loss_and_grad(*as64(logp, terms), opts)
    assert_parts(got, want64, rtol=1e-4)


@pytest.mark.parametrize("M", [1, 2000])
@pytest.mark.parametrize("lt", LOSS_TYPES)
def test_sizes(lt, M):
    opts = opts_for(lt, 2, 1.4 if lt in CLIPPED_LOSS_TYPES else None)
    logp, terms = make_terms(M, seed=M + len(lt), vespo=lt == "vespo")
    assert_parts(token_loss_grad(logp, terms, opts), token_loss_and_grad(logp, terms, opts))


@pytest.mark.parametrize("lt", ["dapo", "sapo", "vespo"])
def test_no_grad(lt):
    opts = opts_for(lt, 1, None)
    logp, terms = make_terms(53, seed=3, vespo=lt == "vespo")
    got = token_loss_grad(logp, terms, opts, need_grad=False)
    assert_parts(got, token_loss_and_grad(logp, terms, opts, need_grad=False), need_grad=False)


def test_clip_metrics_are_exercised():
    """The random inputs really cross both clip bounds (else the metric checks above prove little)."""
    opts = opts_for("grpo", 0, None)
    logp, terms = make_terms(2000, seed=11, rho=False)
    got = token_loss_grad(logp, terms, opts)
    assert got.clip_low.item() > 1 and got.clip_high.item() > 1
    torch.testing.assert_close(got.clip_region, got.clip_low + got.clip_high)  # disjoint: A < 0 vs A > 0
    assert (got.grad == 0).any() and (got.grad != 0).any()  # clipped tokens and zero advantages have no gradient


def trl_clipped_grad(logp, terms, opts):
    """TRL's clipped loss by float64 autograd: the tie and interval conventions are torch's own."""
    lp = logp.detach().double().requires_grad_()
    old = lp.detach() if terms.old is None else terms.old.double()
    r = torch.exp(lp - old)
    r1 = r if opts.delta is None else torch.clamp(r, max=opts.delta)
    r2 = torch.clamp(r, 1 - opts.epsilon_low, 1 + opts.epsilon_high)
    adv = terms.adv.double()
    loss = (terms.weight.double() * -torch.min(r1 * adv, r2 * adv)).sum()
    loss.backward()
    return loss.detach(), lp.grad


@pytest.mark.parametrize("eps,delta", [(0.2, None), (0.0, None), (0.2, 1.0), (0.2, 0.9), (0.0, 1.0)])
def test_ties_at_ratio_one(eps, delta):
    """old None: r == 1 exactly, so min() ties (half the gradient to each side) and r sits on clamp/delta bounds
    (closed intervals pass the gradient)."""
    opts = LossOptions(loss_type="dapo", epsilon_low=eps, epsilon_high=eps, delta=delta)
    logp, terms = make_terms(41, seed=5, old=False, ref=False, rho=False)
    got = token_loss_grad(logp, terms, opts)
    loss, grad = trl_clipped_grad(logp, terms, opts)
    assert_near(got.loss, loss, "loss")
    assert_near(got.grad, grad, "grad", atol=1e-8)
    assert_parts(got, token_loss_and_grad(logp, terms, opts))
    if eps == 0.0 and delta is None:
        # a kernel with an open clamp interval would give half this gradient: the check can tell
        with pytest.raises(AssertionError):
            assert_near(got.grad, 0.5 * grad, "grad", atol=1e-8)


@pytest.mark.parametrize("delta", [0.7, 1.1])
def test_delta_inside_clip_range(delta):
    """delta below 1 - eps_low or 1 + eps_high: the clip flags follow the capped ratio, as in loss_math."""
    opts = opts_for("bnpo", 1, delta)
    logp, terms = make_terms(301, seed=13)
    assert_parts(token_loss_grad(logp, terms, opts), token_loss_and_grad(logp, terms, opts))


def test_cispo_cap_tie():
    """cispo with r == epsilon_high exactly (old None, cap 1): not counted as clipped (strict >)."""
    opts = LossOptions(loss_type="cispo", epsilon_high=1.0, beta=0.04)
    logp, terms = make_terms(37, seed=17, old=False)
    got = token_loss_grad(logp, terms, opts)
    assert got.clip_high.item() == 0.0
    assert_parts(got, token_loss_and_grad(logp, terms, opts))


def test_can_fail():
    """The comparison catches a wrong hyper-parameter (here epsilon_low)."""
    logp, terms = make_terms(2000, seed=7)
    got = token_loss_grad(logp, terms, opts_for("dapo", 1, None))
    with pytest.raises(AssertionError):
        assert_parts(got, token_loss_and_grad(logp, terms, opts_for("dapo", 1, None, epsilon_low=0.25)))


def test_vespo_phi_is_used():
    opts = opts_for("vespo", 0, None)
    logp, terms = make_terms(37, seed=9, vespo=True)
    phi = _gamma_weights(logp - terms.old, terms.adv, terms.mask, terms, opts)
    base = token_loss_grad(logp, terms, opts)
    assert_parts(token_loss_grad(logp, terms, opts, phi=phi), base)
    doubled = token_loss_grad(logp, terms, opts, phi=2 * phi)
    assert_near(doubled.loss, 2 * base.loss, "loss")
    assert_near(doubled.grad, 2 * base.grad, "grad", atol=1e-8)


@pytest.mark.parametrize("need_grad", [True, False])
def test_empty_chunk(need_grad):
    logp, terms = make_terms(0, seed=0)
    got = token_loss_grad(logp, terms, opts_for("dapo", 1, None), need_grad=need_grad)
    for k in ("loss",) + METRICS:
        assert getattr(got, k).shape == () and getattr(got, k).item() == 0.0
    assert (got.grad.shape == (0,)) if need_grad else got.grad is None


def test_argument_errors():
    logp, terms = make_terms(9, seed=1)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        token_loss_grad(logp, terms, LossOptions(importance_sampling_level="sequence"))
    with pytest.raises(ValueError, match="phi"):
        token_loss_grad(logp, terms, LossOptions(loss_type="dapo"), phi=torch.ones_like(logp))
    with pytest.raises(ValueError, match="logp"):
        token_loss_grad(logp.double(), terms, LossOptions())
    with pytest.raises(ValueError, match="terms.adv"):
        token_loss_grad(logp, TokenTerms(**{**vars(terms), "adv": terms.adv[:-1]}), LossOptions())
    with pytest.raises(TypeError, match="opts"):
        token_loss_grad(logp, terms, {"loss_type": "dapo"})
