"""The multi-task report's table, read from finished `convtricks train multitask*` run folders.

    python bench/multitask_table.py "multi-task, learned weights=runs/mt-a" "age only=runs/age" ...

Each argument is LABEL=RUN_FOLDER (a folder holding metrics.json, or one level above it). The
table has one row per run with the test-split figures the run measured itself: age MAE, gender
and race accuracy for the heads it trained, its loss weighting, parameters and training time.
When the runs include single-task ones for all three heads, a last row sums them: what three
separate models cost against the one shared base.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def metrics_of(folder: Path) -> dict:
    candidates = [folder / "metrics.json", *sorted(folder.glob("*/metrics.json"))]
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    raise SystemExit(f"error: {folder} holds no metrics.json; is it a finished multitask run?")


def weighting_text(metrics: dict) -> str:
    weights = metrics.get("loss_weights", {})
    shown = ", ".join(f"{task} {weight:.3g}" for task, weight in weights.items())
    return f"{metrics.get('weighting', 'fixed')} ({shown})"


def cell(metrics: dict, key: str, percent: bool) -> str:
    value = metrics.get(key)
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.2f}"


def row(label: str, metrics: dict) -> list[str]:
    return [label, ", ".join(metrics["tasks"]), weighting_text(metrics),
            cell(metrics, "test_age_mae", False), cell(metrics, "test_gender_acc", True),
            cell(metrics, "test_race_acc", True), f"{metrics['params']:,}",
            f"{metrics['train_seconds_total']:.0f}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_FOLDER")
    args = parser.parse_args(argv)
    header = ["run", "heads", "loss weights (final)", "age MAE (years)", "gender", "race", "parameters",
              "training s"]
    rows, singles = [], {}
    for item in args.runs:
        label, sep, folder = item.rpartition("=")  # a label may hold "=" (λ=500)
        if not sep:
            raise SystemExit(f"error: {item!r} is not LABEL=RUN_FOLDER.")
        metrics = metrics_of(Path(folder))
        rows.append(row(label, metrics))
        if len(metrics["tasks"]) == 1:
            singles[metrics["tasks"][0]] = metrics
    if set(singles) == {"age", "gender", "race"}:
        total = {key: sum(m[key] for m in singles.values()) for key in ("params", "train_seconds_total")}
        rows.append(["three single-task models", "age, gender, race", "-",
                     cell(singles["age"], "test_age_mae", False), cell(singles["gender"], "test_gender_acc", True),
                     cell(singles["race"], "test_race_acc", True), f"{total['params']:,}",
                     f"{total['train_seconds_total']:.0f}"])
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
