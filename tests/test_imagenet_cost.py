"""The budget table of benchmarks.cost: epoch-by-epoch FLOPs at each epoch's side, scaled by the published
8-GPU ResNet-50 rate, and ffcv-imagenet's published figures shown only beside the comparable rows."""

from __future__ import annotations

import pytest

from benchmarks import cost
from dhm_fast.config import recipe_names


def fake_step_flops(arch: str, method: str, side: int) -> float:
    """A stand-in for the FLOP counter: proportional to the pixels, 3x for ResNet-152, 2x with branches."""
    return side * side * (3.0 if arch == "resnet152" else 1.0) * (2.0 if method == "dhm" else 1.0)


def budgets(arch: str) -> list[str]:
    names = [n for n in recipe_names() if n.startswith(f"imagenet-{arch}-budget")]
    return sorted(names, key=lambda n: int(n.split("budget")[1]))


def test_budget_rows_sum_each_epoch_at_its_own_side():
    rows = cost.budget_table(step_flops=fake_step_flops)
    assert [r["recipe"] for r in rows[::2]] == ["imagenet-resnet50", *budgets("resnet50"), "imagenet-resnet152",
                                               *budgets("resnet152")]
    by = {(r["recipe"], r["method"]): r for r in rows}
    rate = 16_621 * 3600  # the published 8 x A100 80GB AMP ResNet-50 images per hour
    # ResNet-50 budget16: 12 epochs at 160 px (epochs 0-11), one at 176 -> rounded to 192, three at 192.
    _, sides = cost.epoch_sides("imagenet-resnet50-budget16")
    assert sides == [160] * 12 + [192] * 4
    pixels = sum(s * s for s in sides) / 224**2
    r50 = by[("imagenet-resnet50-budget16", "baseline")]
    assert r50["wall_hours"] == pytest.approx(pixels * 1_281_167 / rate)
    assert r50["gpu_hours"] == pytest.approx(8 * r50["wall_hours"])
    assert by[("imagenet-resnet50-budget16", "dhm")]["wall_hours"] == pytest.approx(2 * r50["wall_hours"])
    assert by[("imagenet-resnet152", "dhm")]["wall_hours"] == pytest.approx(6 * 90 * 1_281_167 / rate)
    assert r50["train_sides"] == [160, 192] and r50["test_side"] == 224
    # ffcv's published result sits only beside the ResNet-50 baseline of the same epochs.
    assert r50["ffcv_published"] == {"top1": 73.8, "minutes": 14.9}
    assert [k for k, r in by.items() if r["ffcv_published"]] == [(n, "baseline") for n in budgets("resnet50")]


def test_the_budget_table_says_what_is_estimated_and_what_is_published(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cost, "_imagenet_step_flops", fake_step_flops)
    out = tmp_path / "budget.json"
    assert cost.main(["--budget-table", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("FLOP-BASED ESTIMATES, not measurements") and "unmeasured" in text
    assert "73.8% top-1 in 14.9 min" in text and "ffcv-imagenet README" in text
    assert out.is_file()
