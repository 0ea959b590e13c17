"""Re-ID networks: logits in training, BatchNorm embeddings in evaluation, torchvision trunk names, frozen trunk."""

import pytest
import torch
import torchvision

from dhm_fast.config import TrainConfig
from dhm_fast.init_weights import load_init_weights
from dhm_fast.models import create_model
from dhm_fast.optim import OPTIMIZER_IMPLS, build_optimizer

EMBEDDING = {"reid_resnet50": (2048, 4096, 2048), "reid_mobilenetv2": (1280, 2560, 1280)}


NEW_LAYERS = ("head.", "aux1.", "aux2.")


@pytest.fixture(scope="module")
def mobilenet():
    return create_model("reid_mobilenetv2", 5, method="dhm")


@pytest.fixture(scope="module")
def resnet50():
    return create_model("reid_resnet50", 7, method="dsl")


def test_heads_give_logits_in_training_and_embeddings_in_evaluation(mobilenet):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 32)
    mobilenet.train()
    assert [t.shape for t in mobilenet(x)] == [(3, 5)] * 3
    mobilenet.eval()
    with torch.no_grad():
        embeddings = mobilenet(x, all_heads=True)
        assert [e.shape[1] for e in embeddings] == list(EMBEDDING["reid_mobilenetv2"])
        torch.testing.assert_close(mobilenet(x), embeddings[0])  # eval mode: the main embedding alone
        # the embedding is the classifier's input: pooled trunk features through the head's BatchNorm
        pooled = mobilenet.forward_trunk(x)[2].mean((2, 3))
        torch.testing.assert_close(embeddings[0], mobilenet.head.bn(pooled))


def test_resnet50_heads_and_torchvision_trunk_names(resnet50):
    resnet50.eval()
    with torch.no_grad():
        embeddings = resnet50(torch.randn(2, 3, 64, 32), all_heads=True)
    assert [e.shape[1] for e in embeddings] == list(EMBEDDING["reid_resnet50"])
    reference = torchvision.models.resnet50().state_dict()
    trunk = {k: v.shape for k, v in resnet50.state_dict().items() if not k.startswith(NEW_LAYERS)}
    assert trunk == {k: v.shape for k, v in reference.items() if not k.startswith("fc.")}


@pytest.mark.parametrize(("arch", "stock", "classifier"), [("reid_resnet50", torchvision.models.resnet50, "fc."),
                                                           ("reid_mobilenetv2", torchvision.models.mobilenet_v2,
                                                            "classifier.")])
def test_init_weights_fill_the_trunk_exactly_and_leave_the_new_layers(arch, stock, classifier, request, tmp_path):
    model = request.getfixturevalue("resnet50" if arch == "reid_resnet50" else "mobilenet")
    state = stock().state_dict()  # torchvision's ImageNet file has these names and shapes
    torch.save(state, tmp_path / "imagenet.pth")
    report = load_init_weights(model, tmp_path / "imagenet.pth")
    own = model.state_dict()
    assert sorted(report.loaded) == sorted(k for k in state if not k.startswith(classifier))
    assert sorted(report.unused) == sorted(k for k in state if k.startswith(classifier))  # 1000 ImageNet classes
    assert sorted(report.missing) == sorted(k for k in own if k.startswith(NEW_LAYERS)  # new on purpose
                                            and not k.endswith("num_batches_tracked"))
    assert all(torch.equal(own[k], state[k]) for k in report.loaded)


def test_mobilenet_trunk_names_are_torchvision(mobilenet):
    reference = torchvision.models.mobilenet_v2().state_dict()
    trunk = {k: v.shape for k, v in mobilenet.state_dict().items() if k.startswith("features.")}
    assert trunk == {k: v.shape for k, v in reference.items() if not k.startswith("classifier.")}


def test_a_frozen_trunk_keeps_weights_and_statistics_while_new_layers_learn():
    torch.manual_seed(0)
    model = create_model("reid_mobilenetv2", 4, method="dhm")
    optimizer = build_optimizer(model, TrainConfig(optimizer="amsgrad", lr=1e-2, weight_decay=5e-4),
                                torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.freeze_trunk(True)
    model.train()
    assert not model.features.training and model.head.training and model.aux1.training
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss = sum(torch.nn.functional.cross_entropy(z, torch.arange(4)) for z in model(torch.randn(4, 3, 64, 32)))
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(("head.", "aux1.", "aux2.")) for k in changed)
    assert {"head.classifier.weight", "aux1.fc.classifier.weight", "aux2.stage16.0.conv.0.0.weight"} <= changed
    model.freeze_trunk(False)  # the trunk joins the optimizer late, with its own fresh AMSGrad state
    assert model.features.training and all(p.requires_grad for p in model.parameters())
    optimizer.zero_grad(set_to_none=True)
    model(torch.randn(4, 3, 64, 32))[0].logsumexp(1).mean().backward()
    optimizer.step()
    assert not torch.equal(model.state_dict()["features.0.0.weight"], before["features.0.0.weight"])


@pytest.mark.parametrize("impl", OPTIMIZER_IMPLS)
def test_amsgrad_matches_torch_reference_with_late_joining_parameters(impl):
    torch.manual_seed(0)
    ours_model = torch.nn.ModuleList([torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)])
    ref_model = torch.nn.ModuleList([torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)])
    ref_model.load_state_dict(ours_model.state_dict())
    cfg = TrainConfig(optimizer="amsgrad", lr=3e-2, weight_decay=5e-4)
    ours = build_optimizer(ours_model, cfg, torch.device("cpu"), impl=impl)
    ref = torch.optim.Adam(ref_model.parameters(), lr=3e-2, weight_decay=5e-4, amsgrad=True, foreach=False)
    x = torch.randn(8, 6)
    for step in range(6):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad(set_to_none=True)
            loss = model[0](x).square().mean()
            if step >= 2:  # the second layer joins late, as a trunk does after its frozen warm-up
                loss = loss + model[1](x).sin().mean()
            loss.backward()
            opt.step()
    for a, b in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert isinstance(ours, torch.optim.Adam) and ours.defaults["amsgrad"] and ours.defaults[impl]
