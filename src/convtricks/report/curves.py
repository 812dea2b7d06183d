"""The lecture's two plots: accuracy and loss against epochs, training and validation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from convtricks.atomic import atomic_path  # noqa: E402


def measured(history: list[dict], key: str, xs: list | None = None) -> tuple[list, list]:
    """(x, value) of the rows that carry `key`: with `validation_freq` above 1 most epochs have no
    validation numbers, and a line through only the validated ones reads better than gaps."""
    xs = [row["epoch"] for row in history] if xs is None else xs
    pairs = [(x, row[key]) for x, row in zip(xs, history) if isinstance(row.get(key), (int, float))]
    return [x for x, _ in pairs], [value for _, value in pairs]


def plot_history(history: list[dict], out: Path, title: str = "") -> Path:
    epochs = [row["epoch"] for row in history]
    figure, (acc_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for axes, metric, label in ((acc_axes, "acc", "accuracy"), (loss_axes, "loss", "loss")):
        if any(metric in row for row in history):
            axes.plot(*measured(history, metric), "o", markersize=3, label=f"Training {label}")
        if any(f"val_{metric}" in row for row in history):
            axes.plot(*measured(history, f"val_{metric}"), "-", label=f"Validation {label}")
        axes.set_xlabel("epoch")
        axes.set_title(f"Training and validation {label}")
        axes.grid(alpha=0.3)
        axes.legend()
    # Stage boundaries (freeze, then fine-tune) as dotted lines: the lecture's "recompile".
    stages = [row.get("stage") for row in history]
    for index in range(1, len(stages)):
        if stages[index] != stages[index - 1]:
            for axes in (acc_axes, loss_axes):
                axes.axvline(epochs[index] - 0.5, linestyle=":", color="grey")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(Path(out)) as temp:
        figure.savefig(temp, format="png", dpi=100)
    plt.close(figure)
    return Path(out)
