"""Training curves per head as a PNG: the thing a person looks at instead of reading the log."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> None:
    """Four panels over epochs: train CE and val top-1 per head, pairwise KL, lr and alpha."""
    if not history:
        return
    epochs = [r["epoch"] + 1 for r in history]
    heads = list(history[-1]["val"]["heads"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax_ce, ax_acc, ax_kl, ax_sched = axes.flat

    for name in heads:
        ce = [r["train"]["heads"].get(name, {}).get("ce") for r in history]
        ax_ce.plot(epochs, _nan(ce), marker="o", label=name)
        acc = [r["val"]["heads"][name]["top1"] for r in history]
        ax_acc.plot(epochs, acc, marker="o", label=name)
    ax_ce.set(title="train cross-entropy per head", xlabel="epoch")
    ax_acc.set(title="validation top-1 % per head", xlabel="epoch")

    pairs = sorted({p for r in history for p in r["train"].get("kl", {})})
    for pair in pairs:
        ax_kl.plot(epochs, _nan([r["train"]["kl"].get(pair) for r in history]), marker=".", label=pair)
    ax_kl.set(title="train KL(teacher -> student)", xlabel="epoch")
    if pairs:
        ax_kl.set_yscale("log")
    else:
        ax_kl.text(0.5, 0.5, "no mimicking terms", ha="center", va="center", transform=ax_kl.transAxes)

    ax_sched.plot(epochs, [r["lr"] for r in history], marker="o", color="tab:gray", label="lr (end of epoch)")
    ax_sched.set(title="schedules", xlabel="epoch", ylabel="lr")
    alpha = ax_sched.twinx()
    alpha.plot(epochs, [r["alpha"] for r in history], marker="s", color="tab:red", label="alpha")
    alpha.set_ylabel("alpha")

    for ax in (ax_ce, ax_acc, ax_kl):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    ax_sched.legend(loc="upper left", fontsize=8)
    alpha.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _nan(values: list) -> list[float]:
    return [float("nan") if v is None else v for v in values]
