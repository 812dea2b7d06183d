"""A sweep compared: one table row per variant (markdown and CSV) and the curves overlaid.

Pure functions of the variants' histories and metrics; experiments/sweep.py reads the run
folders and writes the files.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from convtricks.atomic import atomic_path  # noqa: E402
from convtricks.report.curves import measured  # noqa: E402

GRAD_LAYERS = ("first_conv", "middle_conv", "last_conv")  # the columns grad_norms logs, input to output


@dataclass
class VariantResult:
    name: str
    changes: dict  # the variant's overrides; {} for the reference
    history: list[dict]
    metrics: dict | None  # None until the run has finished
    parameters: int | None = None


# ---------------------------------------------------------------------------------------------
# Numbers.


def cumulative_seconds(history: list[dict]) -> list[float]:
    total, out = 0.0, []
    for row in history:
        total += float(row.get("seconds") or 0.0)
        out.append(total)
    return out


def time_to(history: list[dict], target: float) -> float | None:
    """Training seconds until the end of the first epoch whose val_acc reaches `target`; None if none does."""
    for row, elapsed in zip(history, cumulative_seconds(history)):
        value = row.get("val_acc")
        if isinstance(value, (int, float)) and value >= target:
            return elapsed
    return None


def short_changes(changes: dict) -> str:
    """{"model.batchnorm": False, "augment.zoom_range": 0} -> "model.batchnorm=false, augment.zoom_range=0"."""
    return ", ".join(f"{key}={_plain(value)}" for key, value in changes.items())


def _plain(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) + "}"
    return str(value)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def accuracy_basis(results: list[VariantResult]) -> str:
    """Compare on test accuracy when every finished variant has one, else on validation accuracy."""
    finished = [r for r in results if r.metrics is not None]
    if finished and all(_number(r.metrics.get("test_acc")) is not None for r in finished):
        return "test_acc"
    return "val_acc"


def target_column(target: float) -> str:
    return f"seconds_to_{target:g}"


def comparison_rows(results: list[VariantResult], targets: list[float], reference: str = "reference") -> list[dict]:
    """One dict per variant, with the columns of comparison.csv (None where there is no number).

    The Δ columns compare with the variant named `reference`; without it they stay empty."""
    basis = accuracy_basis(results)
    rows = []
    for result in results:
        history, metrics = result.history, result.metrics or {}
        last = history[-1] if history else {}
        seconds = [float(r["seconds"]) for r in history if _number(r.get("seconds")) is not None]
        val_accs = [r["val_acc"] for r in history if _number(r.get("val_acc")) is not None]
        row = {
            "variant": result.name,
            "finished": result.metrics is not None,
            "changes": short_changes(result.changes),
            "parameters": result.parameters,
            "epochs": len(history),
            "train_acc": _number(last.get("acc")),
            "val_acc": _number(last.get("val_acc")),
            "best_val_acc": max(val_accs) if val_accs else None,
            "test_acc": _number(metrics.get("test_acc")),
            "train_seconds": round(sum(seconds), 2) if seconds else None,
            "median_epoch_seconds": round(_median(seconds), 3) if seconds else None,
        }
        for target in targets:
            reached = time_to(history, target)
            row[target_column(target)] = None if reached is None else round(reached, 2)
        rows.append(row)
    baseline = next((row for row in rows if row["variant"] == reference), {})
    for row in rows:
        row["reference"] = row is baseline
        mine, theirs = row[basis], baseline.get(basis)
        row["delta_basis"] = basis
        row["delta_acc"] = None if mine is None or theirs is None else round(mine - theirs, 6)
        mine, theirs = row["train_seconds"], baseline.get("train_seconds")
        row["delta_seconds"] = None if mine is None or theirs is None else round(mine - theirs, 2)
        row["time_ratio"] = None if mine is None or not theirs else round(mine / theirs, 3)
    return rows


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


# ---------------------------------------------------------------------------------------------
# Tables.

CSV_COLUMNS = ("variant", "finished", "changes", "parameters", "epochs", "train_acc", "val_acc", "best_val_acc",
               "test_acc", "train_seconds", "median_epoch_seconds", "delta_basis", "delta_acc", "delta_seconds",
               "time_ratio")


def comparison_csv(rows: list[dict], targets: list[float]) -> str:
    columns = list(CSV_COLUMNS) + [target_column(t) for t in targets]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # Empty cells (not "None") where a number is missing: spreadsheets read them as blanks.
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
    return buffer.getvalue()


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _seconds(value, sign: bool = False) -> str:
    """12.3 s, or 14.2 min / 3.1 h for long runs (the lecture's recipes take hours on a CPU)."""
    if value is None:
        return "—"
    return next(f"{value / size:{'+' if sign else ''}.1f} {unit}"
                for limit, size, unit in ((600, 1, "s"), (36_000, 60, "min"), (math.inf, 3600, "h"))
                if abs(value) < limit)


def comparison_markdown(recipe: str, rows: list[dict], targets: list[float], *, data_dir: str = "",
                        overrides: list | None = None, missing: list[str] | None = None,
                        figures: list[tuple[str, str]] | None = None) -> str:
    basis = rows[0]["delta_basis"] if rows else "val_acc"
    basis_name = "test" if basis == "test_acc" else "val"
    header = ["variant", "changes", "parameters", "epochs", "train acc", "val acc", "best val acc", "test acc",
              "training time", "s / epoch (median)", f"Δ {basis_name} acc", "Δ time"]
    header += [f"time to {100 * t:g}% val" for t in targets]
    lines = [f"# Sweep of recipe '{recipe}'", ""]
    if data_dir:
        lines.append(f"Data: `{data_dir}`.")
    if overrides:
        lines.append("Every variant (the reference too) also had: "
                     + ", ".join(f"`--{key} {value}`" for key, value in overrides) + ".")
    lines += [
        "The reference is the recipe as written; each variant changes only the keys listed. "
        f"Δ columns compare with the reference ({basis_name} accuracy in percentage points; training "
        "time, with its ratio). Training time is the sum of the epochs' seconds, validation included; "
        "time to X% is that sum at the end of the first epoch whose validation accuracy reaches X%.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
    ]
    for row in rows:
        reference = row["reference"]
        delta_acc = "—" if reference or row["delta_acc"] is None else f"{100 * row['delta_acc']:+.1f} pp"
        if reference or row["delta_seconds"] is None:
            delta_time = "—"
        else:
            ratio = f" (×{row['time_ratio']:.2f})" if row["time_ratio"] is not None else ""
            delta_time = _seconds(row["delta_seconds"], sign=True) + ratio
        cells = [
            row["variant"] + ("" if row["finished"] else " (unfinished)"),
            row["changes"] or "—",
            "—" if row["parameters"] is None else f"{row['parameters']:,}",
            str(row["epochs"]),
            _percent(row["train_acc"]), _percent(row["val_acc"]), _percent(row["best_val_acc"]),
            _percent(row["test_acc"]),
            _seconds(row["train_seconds"]), _seconds(row["median_epoch_seconds"]),
            delta_acc, delta_time,
        ]
        for target in targets:
            reached = row[target_column(target)]
            cells.append("not reached" if reached is None else _seconds(reached))
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")  # a '|' in a value
    if missing:
        lines += ["", "Not trained yet: " + ", ".join(missing) + "."]
    for title, name in figures or []:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures.


def _save(figure, out: Path) -> Path:
    figure.tight_layout()
    with atomic_path(Path(out)) as temp:
        figure.savefig(temp, format="png", dpi=100)
    plt.close(figure)
    return Path(out)


def _values(history: list[dict], key: str) -> list[float]:
    # NaN where an epoch lacks the number: matplotlib leaves a gap instead of failing.
    return [v if (v := _number(row.get(key))) is not None else math.nan for row in history]


def plot_loss(results: list[VariantResult], out: Path, title: str = "") -> Path:
    """Training loss per epoch, every variant on one plot."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for result in results:
        epochs = [row.get("epoch", index + 1) for index, row in enumerate(result.history)]
        axes.plot(epochs, _values(result.history, "loss"), "-o", markersize=3, label=result.name)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("training loss")
    axes.set_title(f"Training loss{': ' + title if title else ''}")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, out)


def _time_unit(longest: float) -> tuple[str, float]:
    return ("minutes", 60.0) if longest > 600 else ("seconds", 1.0)


def plot_val_acc(results: list[VariantResult], targets: list[float], out: Path, title: str = "") -> Path:
    """Validation accuracy against cumulative training time (who gets there first), with the targets."""
    longest = max((cumulative_seconds(r.history)[-1] for r in results if r.history), default=0.0)
    unit, scale = _time_unit(longest)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for result in results:
        elapsed = [s / scale for s in cumulative_seconds(result.history)]
        axes.plot(*measured(result.history, "val_acc", elapsed), "-o", markersize=3, label=result.name)
    for target in targets:
        axes.axhline(target, linestyle="--", color="grey", linewidth=1)
        axes.annotate(f"{100 * target:g}%", (0, target), xycoords=("axes fraction", "data"),
                      xytext=(3, 2), textcoords="offset points", color="grey", fontsize=8)
    axes.set_xlim(left=0)
    axes.set_xlabel(f"training time ({unit}, validation included)")
    axes.set_ylabel("validation accuracy")
    axes.set_title(f"Validation accuracy against time{': ' + title if title else ''}")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, out)


def has_grad_norms(history: list[dict]) -> bool:
    return any(key.startswith("grad_") for row in history for key in row)


def plot_grad_norms(results: list[VariantResult], out: Path, title: str = "") -> Path | None:
    """One panel per variant that logged gradient norms: first / middle / last conv per epoch, log scale.

    A shared y-axis makes the comparison the point: a plain deep net's first conv sits decades
    below its last one (vanishing gradient); batch norm and skip connections close the gap.
    None (and no file) when no variant logged them.
    """
    logged = [r for r in results if has_grad_norms(r.history)]
    if not logged:
        return None
    columns = min(len(logged), 3)
    rows = math.ceil(len(logged) / columns)
    figure, axes_grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), sharey=True,
                                     squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axes, result in zip(axes_grid.flat, logged):
        epochs = [row.get("epoch", index + 1) for index, row in enumerate(result.history)]
        layers = [k[5:] for k in dict.fromkeys(key for row in result.history for key in row) if k.startswith("grad_")]
        layers.sort(key=lambda name: GRAD_LAYERS.index(name) if name in GRAD_LAYERS else len(GRAD_LAYERS))
        finite = False
        for index, layer in enumerate(layers):
            # A norm of 0 (no gradient reached the layer) has no place on a log axis: a gap.
            values = [v if v > 0 else math.nan for v in _values(result.history, f"grad_{layer}")]
            finite = finite or any(math.isfinite(v) for v in values)
            axes.plot(epochs, values, "-o", markersize=3, color=colors[index % len(colors)],
                      label=layer.replace("_", " "))
        if not finite:  # an empty panel would look like a drawing bug; say what happened
            axes.text(0.5, 0.5, "no finite gradient norms:\ntraining diverged", ha="center", va="center",
                      transform=axes.transAxes)
        axes.set_yscale("log")
        axes.set_title(result.name)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=8)
    for axes in axes_grid[:, 0]:
        axes.set_ylabel("weight-gradient L2 norm")
    for axes in list(axes_grid.flat)[len(logged):]:
        axes.set_visible(False)
    figure.suptitle(f"Per-layer gradient norms (mean over each epoch's steps){': ' + title if title else ''}")
    return _save(figure, out)
