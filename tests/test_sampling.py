"""Branch sampling: deterministic per (seed, step), honours its probabilities, skipped branches not run."""

import pytest
import torch

from dhm_fast.models import create_model
from dhm_fast.sampling import BranchSampler


def test_same_seed_and_step_give_the_same_draw():
    a = BranchSampler(3, 0.5, seed=7)
    b = BranchSampler(3, 0.5, seed=7)  # e.g. another process of the same run
    draws = [a.active(0, s) for s in range(200)]
    assert draws == [b.active(0, s) for s in range(200)]
    assert draws != [BranchSampler(3, 0.5, seed=8).active(0, s) for s in range(200)]
    assert all(d[0] for d in draws)  # the main head is always on


def test_draw_frequencies_follow_the_probabilities():
    s = BranchSampler(3, [0.8, 0.3], seed=1)
    draws = torch.tensor([s.active(0, k) for k in range(4000)], dtype=torch.float64)
    freq = draws.mean(0)
    assert freq[0] == 1.0
    assert abs(freq[1] - 0.8) < 0.03 and abs(freq[2] - 0.3) < 0.03


def test_per_epoch_draws_are_constant_within_an_epoch():
    s = BranchSampler(3, 0.5, per="epoch", seed=3)
    for epoch in range(10):
        assert len({s.active(epoch, step) for step in range(epoch * 50, epoch * 50 + 50)}) == 1
    assert len({s.active(e, 0) for e in range(20)}) > 1


def test_probability_one_keeps_every_branch():
    s = BranchSampler(3, 1.0, seed=0)
    assert all(s.active(0, k) == (True, True, True) for k in range(50))


@pytest.mark.parametrize("kwargs, msg", [({"branch_prob": 1.5}, "must lie in"), ({"per": "batch"}, "unknown"),
                                         ({"branch_prob": [0.5]}, "1 entries for 2 branches")])
def test_bad_settings_are_named(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        BranchSampler(3, **kwargs)


def test_a_skipped_branch_is_not_computed():
    model = create_model("resnet20", 10, method="dhm", in_channels=1).train()
    calls = []
    model.aux2.register_forward_hook(lambda *_: calls.append("aux2"))
    model.aux1.register_forward_hook(lambda *_: calls.append("aux1"))
    out = model(torch.randn(2, 1, 28, 28), active=(True, True, False))
    assert out[2] is None and out[1] is not None
    assert calls == ["aux1"]
