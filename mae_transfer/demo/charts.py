"""The demo's charts: MAE vs random per metric (mean and min-max over seeds), and the k-NN
accuracy of the encoder over pretraining epochs."""

from __future__ import annotations

from typing import Dict, List, Sequence

from .stats import Spread

COLOURS = {"mae": "#d95f02", "random": "#7570b3"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comparison(rows: Sequence[tuple], path: str, title: str = "") -> str:
    """Bars of the mean with min-max whiskers, MAE beside random, one group per metric.

    Args:
        rows: (stage, metric label, {"mae": Spread, "random": Spread}, verdict) tuples, as
            :func:`mae_transfer.demo.stats.table_rows` makes them.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(rows) + 1.5), 3.8), dpi=120)
    width = 0.38
    for i, (init, colour) in enumerate(COLOURS.items()):
        spreads: List[Spread] = [r[2][init] for r in rows]
        xs = [k + (i - 0.5) * width for k in range(len(rows))]
        means = [s.mean for s in spreads]
        errs = [[s.mean - s.low for s in spreads], [s.high - s.mean for s in spreads]]
        n = max((s.n for s in spreads), default=0)
        label = f"{init} init ({n} seeds)"
        ax.bar(xs, means, width, color=colour, label=label, yerr=errs, capsize=4)
        for x, s in zip(xs, spreads):
            ax.text(x, s.high, f"{s.mean:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{stage}\n{label}" for stage, label, _, _ in rows], fontsize=8)
    ax.set_ylabel("score (bars: mean, whiskers: min-max over seeds)", fontsize=8)
    ax.set_title(title or "MAE-initialised vs randomly initialised", fontsize=10)
    # beside the axes: inside, it covered bars and their labels whatever the corner
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_knn_curve(records: Sequence[Dict], path: str, random: Dict[str, Spread] = None) -> str:
    """k-NN top-1 against epochs trained (a record's zero-based ``epoch`` + 1; -1 = the start).

    ``random``: optional {"knn_k20_top1": Spread, ...} of randomly initialised encoders, drawn
    as a band for reference.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    epochs = [r["epoch"] + 1 for r in records]
    for key, style in (("knn_k20_top1", "-o"), ("knn_k200_top1", "--s")):
        k = key.split("_")[1]
        (line,) = ax.plot(epochs, [r[key] for r in records], style, ms=4, label=f"MAE, {k}")
        if random and key in random:  # the random encoders' range, in the curve's colour
            s = random[key]
            ax.axhspan(s.low, s.high, alpha=0.1, color=line.get_color())
            ax.axhline(s.mean, ls=":", lw=1, color=line.get_color())
            ax.plot([], [], color=line.get_color(), alpha=0.3, lw=6,
                    label=f"random init, {k}: min-max (dotted: mean)")  # fmt: skip
    ax.set_xlabel("pretraining epochs")
    ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs
    ax.set_ylabel("k-NN top-1 on object crops (%)")
    ax.set_title("What the encoder learned: weighted k-NN over pretraining", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
