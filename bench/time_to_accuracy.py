"""Time to accuracy of finished runs, side by side: a table and one figure.

    python bench/time_to_accuracy.py "fixed 96 px=runs/a" "growing 64-96 px=runs/b" --out time.png

Each argument is LABEL=RUN_FOLDER (a folder holding history.json, or one level above it). The
table gives, per run, the training time (validation included, as the run logged it) until
validation accuracy first reached each target, the best validation and the test accuracy the run
measured itself; the figure overlays validation accuracy against that time, with the targets.
Runs compared this way should come from the same machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from convtricks.report.curves import measured
from convtricks.report.sweep import VariantResult, cumulative_seconds, plot_val_acc, time_to


def run_folder(folder: Path) -> Path:
    for candidate in (folder, *sorted(folder.glob("*/"))):
        if (candidate / "history.json").is_file():
            return candidate
    raise SystemExit(f"error: {folder} holds no history.json; is it a run folder?")


def read_run(label: str, folder: Path) -> VariantResult:
    folder = run_folder(folder)
    history = json.loads((folder / "history.json").read_text())
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    return VariantResult(label, {}, history, metrics)


def minutes(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds / 60:.1f} min"


def table(results: list[VariantResult], targets: list[float]) -> str:
    head = ["run", "epochs", *(f"to {100 * t:g}% val" for t in targets), "best val", "test acc", "training time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in results:
        test = (result.metrics or {}).get("test_acc")
        cells = [result.name, str(len(result.history)),
                 *(minutes(time_to(result.history, target)) for target in targets),
                 f"{100 * max(measured(result.history, 'val_acc')[1]):.1f}%",
                 "-" if test is None else f"{100 * test:.1f}%",
                 minutes(cumulative_seconds(result.history)[-1])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_run(text: str) -> tuple[str, Path]:
    label, sep, folder = text.partition("=")
    if not sep or not label or not folder:
        raise argparse.ArgumentTypeError(f"expected LABEL=RUN_FOLDER, got {text!r}")
    return label, Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=parse_run, help="LABEL=RUN_FOLDER")
    parser.add_argument("--targets", default="0.844,0.9", help="validation accuracies to time (default 0.844,0.9)")
    parser.add_argument("--out", type=Path, help="the figure (PNG); none when left out")
    args = parser.parse_args(argv)
    try:
        targets = [float(part) for part in args.targets.split(",")]
    except ValueError:
        parser.error(f"--targets takes accuracies such as 0.844,0.9, got {args.targets!r}")
    results = [read_run(label, folder) for label, folder in args.runs]
    if not all(result.history for result in results):
        raise SystemExit("error: a run has no finished epoch yet.")
    print(table(results, targets))
    if args.out:
        print(f"Figure: {plot_val_acc(results, targets, args.out, title='time to accuracy')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
