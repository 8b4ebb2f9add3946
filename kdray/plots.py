"""Learning curves of a run: the validation metric per epoch of every model it trained (the teachers, the distilled
student, the student alone), from the ``history`` each exported checkpoint keeps in its metrics. ``kdray run``
writes them to ``RUN/learning_curves.png`` and links them from ``report.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def learning_curves(models: Sequence[tuple[str, list[dict[str, Any]]]], metric: str, path: Path) -> Path:
    """Draws ``metric`` (a history key such as ``ndcg@10``) against the epoch, one line per ``(label, history)``,
    with each model's best epoch marked, and saves the figure as a PNG (matplotlib's Agg backend: no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, history in models:
        points = [(h["epoch"], h[metric]) for h in history if metric in h]
        if not points:
            continue
        epochs, values = zip(*points)
        (line,) = ax.plot(epochs, values, marker="o", markersize=3, linewidth=1.5, label=label)
        best = max(range(len(values)), key=values.__getitem__)
        ax.scatter([epochs[best]], [values[best]], s=70, facecolors="none", edgecolors=line.get_color(), zorder=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric.upper()}")
    ax.set_title("kdray run: learning curves (circles: the epoch each model was selected at)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
