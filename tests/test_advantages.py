import math
import statistics

import pytest
import torch

from grpo.advantages import compute_advantages, nanstd

NAN = float("nan")


def _close(t, expected, tol=1e-6):
    assert t.shape == (len(expected),)
    assert torch.allclose(t.double(), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=0), (t, expected)


def test_group_scaling_by_hand():
    # group 1: [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3); group 2: [2, 4, 6, 8]: mean 5, std sqrt(20/3)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0])
    adv, m = compute_advantages(r, 4, "group")
    s1, s2 = math.sqrt(1 / 3), math.sqrt(20 / 3)
    _close(adv, [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4),
                 -3 / (s2 + 1e-4), -1 / (s2 + 1e-4), 1 / (s2 + 1e-4), 3 / (s2 + 1e-4)], tol=1e-5)
    assert m["reward"] == pytest.approx(2.75)
    assert m["reward_std"] == pytest.approx(statistics.stdev(r.tolist()), rel=1e-6)  # TRL 1.16: batch std
    assert m["frac_reward_zero_std"] == 0.0


def test_batch_scaling_centres_on_group_mean():
    r = torch.tensor([1.0, 3.0, 10.0, 14.0])
    adv, _ = compute_advantages(r, 2, "batch")
    sb = statistics.stdev([1.0, 3.0, 10.0, 14.0])
    _close(adv, [-1 / (sb + 1e-4), 1 / (sb + 1e-4), -2 / (sb + 1e-4), 2 / (sb + 1e-4)], tol=1e-6)


def test_none_scaling_is_centred_only():
    adv, _ = compute_advantages(torch.tensor([1.0, 3.0, 10.0, 14.0]), 2, "none")
    _close(adv, [-1.0, 1.0, -2.0, 2.0])


def test_zero_std_groups_get_zero_advantage_and_are_counted():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    for scale in ("group", "batch", "none"):
        adv, m = compute_advantages(r, 3, scale)
        assert torch.equal(adv[:6], torch.zeros(6))
        assert (adv[6:] != 0).all()
        assert m["frac_reward_zero_std"] == pytest.approx(2 / 3)


def test_nan_rewards_excluded_and_zeroed():
    # group [1, NaN, 0, 2]: scorable [1, 0, 2] -> mean 1, std 1
    r = torch.tensor([1.0, NAN, 0.0, 2.0])
    adv, m = compute_advantages(r, 4, "group")
    _close(adv, [0.0, 0.0, -1 / (1 + 1e-4), 1 / (1 + 1e-4)])
    assert not torch.isnan(adv).any()
    assert m["reward"] == pytest.approx(1.0) and m["reward_std"] == pytest.approx(1.0)


def test_group_with_one_or_no_scorable_reward():
    r = torch.tensor([NAN, NAN, 5.0, NAN, 1.0, 2.0])
    for scale in ("group", "batch", "none"):
        adv, m = compute_advantages(r, 2, scale)
        assert not torch.isnan(adv).any()
        assert adv[:4].abs().sum() == 0  # nothing to compare against -> no signal
    assert m["frac_reward_zero_std"] == 0.0  # undefined std is not "zero std"


def test_all_nan_batch_metrics():
    adv, m = compute_advantages(torch.full((4,), NAN), 2, "group")
    assert torch.equal(adv, torch.zeros(4))
    assert math.isnan(m["reward"])


def test_matches_float64_reference_on_random_rewards():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(40, generator=g)
    r[[3, 17, 18]] = NAN
    for scale in ("group", "batch", "none"):
        adv, _ = compute_advantages(r, 5, scale)
        ref = []
        rows = r.double().view(-1, 5).tolist()
        scored_all = [x for row in rows for x in row if not math.isnan(x)]
        batch_std = statistics.stdev(scored_all)
        for row in rows:
            s = [x for x in row if not math.isnan(x)]
            mean, std = statistics.fmean(s), statistics.stdev(s)
            denom = {"group": std + 1e-4, "batch": batch_std + 1e-4, "none": 1.0}[scale]
            ref += [0.0 if math.isnan(x) else (x - mean) / denom for x in row]
        _close(adv, ref, tol=1e-5)


def test_nanstd_is_unbiased():
    x = torch.tensor([[1.0, 2.0, 4.0], [NAN, 3.0, 5.0]])
    assert torch.allclose(nanstd(x, dim=1), torch.tensor([torch.tensor([1.0, 2.0, 4.0]).std(), math.sqrt(2)]))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"7 rewards.*num_generations=2"):
        compute_advantages(torch.ones(7), 2, "group")
    with pytest.raises(ValueError, match="scale_rewards"):
        compute_advantages(torch.ones(4), 2, "std")
    with pytest.raises(ValueError, match="1-D"):
        compute_advantages(torch.ones(2, 2), 2, "group")
