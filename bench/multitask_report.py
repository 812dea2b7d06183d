"""Trick 5 measured: one multi-task network against three single-task ones, and three ways to
balance its losses (the lecture's λ = γ = 1, the recipe's λ and γ, learned uncertainty weights).

Every row trains the `multitask` recipe on UTKFace with the same base, stages, epochs and seed;
only the tasks or the loss weighting change. Numbers are on the test split (faces no run saw).

    python bench/multitask_report.py                      # the recipe's full budget
    python bench/multitask_report.py --target_size 128 --finetune_epochs 2 --finetune_steps 75 --threads 1
    python bench/multitask_report.py --rows multi,age     # a subset of the rows

Training time is the sum of the epochs' times. The frozen part of the base runs once and its
output is cached (content-keyed, on disk), then shared by every row; that one-off cost appears
in the first run's log.txt and in the whole report's time, not in the rows. Writes the table
to --out (Markdown, plus the rows' metrics as JSON beside it) and each run's folder under --runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from convtricks import config as recipes  # noqa: E402
from convtricks.logs import log_to_file, setup_console  # noqa: E402
from convtricks.train.multitask import train_multitask_run  # noqa: E402
from convtricks.train.run import start  # noqa: E402

log = logging.getLogger("convtricks")

# name -> (label, what changes in the recipe's multitask section)
ROWS = {
    "multi": ("multi-task, recipe's λ, γ", {}),
    "age": ("single-task: age", {"tasks": ["age"]}),
    "gender": ("single-task: gender", {"tasks": ["gender"]}),
    "race": ("single-task: race", {"tasks": ["race"]}),
    "equal": ("multi-task, λ = γ = 1", {"weights": {"age": 1.0, "gender": 1.0, "race": 1.0}}),
    "uncertainty": ("multi-task, learned (uncertainty)", {"weighting": "uncertainty"}),
}
AIMS = {"age_mae": 6.0, "gender_acc": 0.90, "race_acc": 0.82}


def budget_overrides(args) -> list[tuple[str, str]]:
    """The command line's budget, applied to both stages of the recipe."""
    overrides = [("seed", str(args.seed))]
    if args.target_size:
        overrides.append(("target_size", str(args.target_size)))
    if args.threads:
        overrides.append(("threads", str(args.threads)))
    if args.device:
        overrides.append(("device", args.device))
    return overrides


def with_stage_budget(config: dict, args) -> dict:
    stages = config["stages"]
    for stage in stages:
        if stage.get("name") == "top" and args.top_epochs is not None:
            stage["epochs"] = args.top_epochs
        if stage.get("name") == "finetune":
            if args.finetune_epochs is not None:
                stage["epochs"] = args.finetune_epochs
            if args.finetune_steps is not None:
                stage["steps_per_epoch"] = args.finetune_steps
    return recipes.resolve(config)


def run_row(name: str, args) -> dict:
    label, changes = ROWS[name]
    recipe = recipes.read_recipe(args.recipe)
    recipe["multitask"] = {**(recipe.get("multitask") or {}), **changes}
    config = recipes.apply_overrides(recipe, budget_overrides(args))
    config = with_stage_budget(config, args)
    config["recipe"] = f"{config['recipe']}-{name}"
    if name == "multi":
        weights = config["multitask"]["weights"]
        label = f"multi-task, λ = {weights['gender']:g}, γ = {weights['race']:g} (recipe)"
    run_dir = start(config, Path(args.data), Path(args.runs))
    handler = log_to_file(run_dir / "log.txt")
    try:
        log.info("== %s: %s", label, run_dir)
        metrics = train_multitask_run(run_dir)
    finally:
        log.removeHandler(handler)
        handler.close()
    return {"name": name, "label": label, "run": str(run_dir), **metrics}


def _cell(row: dict, key: str) -> str:
    value = row.get(f"test_{key}")
    if value is None:
        return "—"
    return f"{value:.2f}" if key == "age_mae" else f"{100 * value:.1f}%"


def table(rows: list[dict]) -> str:
    lines = ["| configuration | age MAE (years) | gender acc | race acc | params | training time (s) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {_cell(row, 'age_mae')} | {_cell(row, 'gender_acc')} | "
                     f"{_cell(row, 'race_acc')} | {row['params']:,} | {row['train_seconds_total']:.0f} |")
    singles = [row for row in rows if row["name"] in ("age", "gender", "race")]
    if len(singles) == 3:
        lines.append(f"| three single-task networks, together | | | | {sum(r['params'] for r in singles):,} | "
                     f"{sum(r['train_seconds_total'] for r in singles):.0f} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    by_name = {row["name"]: row for row in rows}
    multi = by_name.get("multi")
    if multi is None:
        return []
    notes = []
    for key, aim in AIMS.items():
        value = multi.get(f"test_{key}")
        met = value is not None and (value <= aim if key == "age_mae" else value >= aim)
        notes.append(f"- aim {key} {'<=' if key == 'age_mae' else '>='} {aim}: {'met' if met else 'not met'} "
                     f"({value if value is None else round(value, 4)})")
    for task, key in (("age", "age_mae"), ("gender", "gender_acc"), ("race", "race_acc")):
        single = by_name.get(task)
        if single and multi.get(f"test_{key}") is not None:
            better = multi[f"test_{key}"] <= single[f"test_{key}"] if key == "age_mae" \
                else multi[f"test_{key}"] >= single[f"test_{key}"]
            notes.append(f"- multi-task {key} vs single-task: {'no worse' if better else 'worse'} "
                         f"({multi[f'test_{key}']:.4f} vs {single[f'test_{key}']:.4f})")
    if multi.get("test_race_acc_per_class"):
        notes.append("- multi-task race accuracy per class: " + ", ".join(
            f"{race} {acc:.3f}" for race, acc in multi["test_race_acc_per_class"].items() if acc is not None))
    return notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "utkface"))
    parser.add_argument("--runs", default="runs/multitask-report")
    parser.add_argument("--recipe", default="multitask")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--target_size", type=int)
    parser.add_argument("--top_epochs", type=int)
    parser.add_argument("--finetune_epochs", type=int)
    parser.add_argument("--finetune_steps", type=int, help="steps per fine-tuning epoch (default: one pass)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/multitask-report/report.md")
    args = parser.parse_args(argv)
    setup_console()
    names = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; rows are {', '.join(ROWS)}")

    started = time.perf_counter()
    rows = [run_row(name, args) for name in names]
    budget = " ".join(f"--{k} {v}" for k, v in vars(args).items()
                      if v is not None and k in ("target_size", "top_epochs", "finetune_epochs",
                                                 "finetune_steps", "threads", "device", "seed"))
    report = "\n".join([
        f"# Multi-task vs single-task on UTKFace (recipe {args.recipe}; {budget or 'recipe budget'})", "",
        table(rows), "", *verdict(rows), "",
        f"Machine: {rows[0]['machine'] if rows else '?'}; whole report {time.perf_counter() - started:.0f} s "
        "(including data loading, feature extraction and test evaluation).", ""])
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
