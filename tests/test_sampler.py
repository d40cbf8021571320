"""The inverse-CDF sampler draws from softmax(scores / T), never draws a zero-probability token, and hf_generate's
first sampled token follows the model's own distribution."""

import pytest
import torch

from grpo import rollout
from grpo.model import load_model
from grpo.sampler import InverseCDFSampler, split_sampling


def _draw(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    out = InverseCDFSampler(temperature)(None, scores)
    assert ((out == 0) | (out == float("-inf"))).all() and (out == 0).sum(-1).eq(1).all()  # one-hot scores
    return out.argmax(-1)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_frequencies_match_the_tempered_softmax(temperature):
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.5, -1.0, float("-inf"), 1.0, 0.0, -3.0])
    n = 40_000
    tokens = _draw(logits.expand(n, -1).clone(), temperature)
    freq = torch.bincount(tokens, minlength=logits.numel()).double() / n
    p = torch.softmax(logits.double() / temperature, 0)
    tol = 5 * (p * (1 - p) / n).sqrt() + 1e-12  # five standard errors per entry
    assert (freq - p).abs().le(tol).all(), (freq, p)
    assert freq[3] == 0


def test_zero_probability_entries_are_never_drawn_at_the_ends_of_the_unit_interval(monkeypatch):
    """u = 0 must not pick a leading zero-probability token; u just under 1 must not run past the last one."""
    logits = torch.tensor([[float("-inf"), float("-inf"), 0.0, 1.0, float("-inf")]] * 2)
    for u in (0.0, 1.0 - 2 ** -24):
        monkeypatch.setattr(torch, "rand", lambda *shape, u=u, **kw: torch.full(shape, u, **kw))
        token = _draw(logits, 1.0)
        assert token.tolist() == ([2, 2] if u == 0.0 else [3, 3])


def test_half_precision_scores_and_a_bad_temperature():
    torch.manual_seed(0)
    scores = torch.tensor([[0.0, 30.0, 0.0]], dtype=torch.float16)
    assert _draw(scores, 1.0).tolist() == [1]
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="temperature"):
            InverseCDFSampler(bad)


def test_split_sampling_takes_plain_temperature_sampling_only():
    plain = {"do_sample": True, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.1}
    options, processors = split_sampling(plain)
    assert options == {"do_sample": False, "repetition_penalty": 1.1}
    assert len(processors) == 1 and processors[0].temperature == 0.7
    for kept in ({"do_sample": False}, {**plain, "top_p": 0.9}, {**plain, "top_k": 50}, {**plain, "min_p": 0.1}):
        assert split_sampling(kept) == (kept, [])


def test_hf_generate_first_token_follows_the_model_distribution():
    """Many copies of one prompt, one new token each: the token frequencies match softmax(logits / T) of the model's
    next-token logits (checked on the tokens the model finds likely, five standard errors each)."""
    model, tok = load_model("tiny")
    model.eval()
    temperature, n = 1.3, 1500
    prompt = rollout.tokenize_prompts(tok, ["hello there"])[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    p = torch.softmax(logits / temperature, 0)
    torch.manual_seed(0)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    out = rollout.hf_generate(model, tok, [prompt] * n, 1, rollout.eos_token_ids(model, tok), sampling)
    freq = torch.bincount(torch.tensor([c[0] for c in out]), minlength=p.numel()).double() / n
    top = p.topk(5).indices
    assert (freq[top] - p[top]).abs().le(5 * (p[top] * (1 - p[top]) / n).sqrt()).all(), (freq[top], p[top])
    assert (freq - p).abs().sum() < 0.5  # total variation: the rest of the vocabulary is not far off either
