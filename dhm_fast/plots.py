"""Training curves per head from a run's log records (docs/configuration.md, "curves.png"). Uses
matplotlib's object API: no global backend is switched.
"""

from __future__ import annotations

from matplotlib.figure import Figure


def draw_curves(records: list[dict], title: str = "") -> Figure | None:
    """Four panels over (fractional) epochs: train CE and val top-1 per head, pairwise KL, lr and alpha;
    None when there is no record yet."""
    steps = [r for r in records if r.get("kind") == "interval"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not steps and not epochs:
        return None
    x = [r["epoch_progress"] for r in steps]
    heads = list((epochs[-1]["val"] if epochs else steps[-1]["train"])["heads"])
    fig = Figure(figsize=(11, 7.5))
    ax_ce, ax_acc, ax_kl, ax_sched = fig.subplots(2, 2).flat

    reid = bool(epochs) and "mAP" in epochs[-1]["val"]["heads"]["main"]  # person re-ID: mAP and Rank-1
    metrics = (("mAP", "-"), ("rank1", "--")) if reid else (("top1", "-"),)
    for i, name in enumerate(heads):
        color = f"C{i}"  # one colour per head in every panel; re-ID's rank-1 dashed beside its mAP
        ax_ce.plot(x, [_get(r["train"]["heads"], name, "ce") for r in steps], color=color, label=name)
        for metric, style in metrics:
            ax_acc.plot([r["epoch"] + 1 for r in epochs], [r["val"]["heads"][name][metric] for r in epochs], style,
                        color=color, marker="o", label=f"{name} {metric}" if reid else name)
    ax_ce.set(title="train cross-entropy per head", xlabel="epoch")
    ax_acc.set(title=f"validation {'mAP and rank-1' if reid else 'top-1'} % per head (epoch ends)", xlabel="epoch")

    pairs = sorted({p for r in steps for p in r["train"].get("kl", {})})
    for pair in pairs:
        ax_kl.plot(x, [r["train"]["kl"].get(pair, float("nan")) for r in steps], label=pair)
    ax_kl.set(title="train KL(teacher -> student)", xlabel="epoch")
    if pairs:
        ax_kl.set_yscale("log")
    else:
        ax_kl.text(0.5, 0.5, "no mimicking terms", ha="center", va="center", transform=ax_kl.transAxes)

    ax_sched.plot(x, [r["lr"] for r in steps], color="tab:gray", label="lr")
    ax_sched.set(title="schedules", xlabel="epoch", ylabel="lr")
    ax_alpha = ax_sched.twinx()
    ax_alpha.plot(x, [r["alpha"] for r in steps], color="tab:red", label="alpha")
    ax_alpha.set_ylabel("alpha")
    top = max([r["alpha"] for r in steps] + [1e-12])
    ax_alpha.set_ylim(0, top * 1.05)
    for ax in (ax_sched, ax_alpha):
        ax.ticklabel_format(axis="y", useOffset=False)  # no "1e-9 + 9.99e-1" offset labels

    for ax in (ax_ce, ax_acc, ax_kl):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    ax_sched.legend(loc="upper left", fontsize=8)
    ax_alpha.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _get(heads: dict, name: str, key: str) -> float:
    value = heads.get(name, {}).get(key)
    return float("nan") if value is None else value
