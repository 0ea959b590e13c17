"""The trainer's SGD: fused, and equal to torch's reference SGD even when branches join late."""

import torch

from dhm_fast.config import TrainConfig
from dhm_fast.optim import build_optimizer


def test_fused_sgd_matches_reference_sgd_with_late_joining_parameters():
    torch.manual_seed(0)
    trunk, branch = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    ours_model = torch.nn.ModuleList([trunk, branch])
    ref_model = torch.nn.ModuleList([torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)])
    ref_model.load_state_dict(ours_model.state_dict())
    cfg = TrainConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ours = build_optimizer(ours_model, cfg, torch.device("cpu"))
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
    assert ours.defaults["fused"]
