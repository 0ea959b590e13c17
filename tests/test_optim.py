"""The trainer's SGD: fused or foreach kernels, each equal to torch's reference SGD even when branches
join late, with the same parameter groups and hyperparameters."""

import pytest
import torch

from dhm_fast.config import TrainConfig
from dhm_fast.optim import OPTIMIZER_IMPLS, build_optimizer


@pytest.mark.parametrize("impl", OPTIMIZER_IMPLS)
def test_sgd_matches_reference_sgd_with_late_joining_parameters(impl):
    torch.manual_seed(0)
    trunk, branch = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    ours_model = torch.nn.ModuleList([trunk, branch])
    ref_model = torch.nn.ModuleList([torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)])
    ref_model.load_state_dict(ours_model.state_dict())
    cfg = TrainConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ours = build_optimizer(ours_model, cfg, torch.device("cpu"), impl=impl)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
                          foreach=False)
    x = torch.randn(8, 6, dtype=torch.float32)
    for step in range(6):
        use_branch = step >= 2 and step != 4  # skipped at first, then joins, then skipped once more
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad(set_to_none=True)
            loss = model[0](x).square().mean()
            if use_branch:
                loss = loss + model[1](x).sin().mean()
            loss.backward()
            opt.step()
    for a, b in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours.defaults[impl]


def test_implementations_share_groups_and_hyperparameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    cfg = TrainConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4, decay_norm_bias=False)
    fused, foreach = (build_optimizer(model, cfg, torch.device("cpu"), impl=i) for i in ("fused", "foreach"))
    assert fused.defaults["fused"] and foreach.defaults["foreach"] and not foreach.defaults["fused"]
    assert [g["weight_decay"] for g in fused.param_groups] == [1e-4, 0.0]  # 1-d tensors exempt
    for a, b in zip(fused.param_groups, foreach.param_groups, strict=True):
        for key in ("lr", "momentum", "dampening", "weight_decay", "nesterov"):
            assert a[key] == b[key], key
        assert a["params"] == b["params"]


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="unknown SGD implementation"):
        build_optimizer(torch.nn.Linear(2, 2), TrainConfig(), torch.device("cpu"), impl="adam")
