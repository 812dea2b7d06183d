"""Sweeps: a recipe and its named variants, trained one after another and compared.

Ablations ("what does this ingredient add, what does it cost") and the lecture's optimization
experiment (plain deep net vs + batch norm vs + skip connections vs + auxiliary heads) are
both the same recipe with a few keys changed. A recipe lists them:

    variants:
      no-batchnorm: {model.batchnorm: false}
      flip-only: {augment.rotation_range: 0, augment.zoom_range: 0}
    sweep_targets: [0.844, 0.90]   # validation accuracies to time

and `convtricks sweep RECIPE` fills one folder:

    runs/<recipe>-sweep/
      sweep.json         recipe, data folder, overrides given to all, each variant and its run folder
      reference/         the recipe itself: an ordinary run folder (evaluate / predict accept it)
      no-batchnorm/      ...
      comparison.md/csv  one row per variant, differences against the reference
      loss.png  val_acc.png  grad_norms.png (when the runs logged gradient norms)

Running the command again continues: finished variants are kept, interrupted ones resume from
their checkpoints. Command-line overrides (`--epochs 2`) apply to every variant, after the
variant's own keys.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from convtricks import config as recipes
from convtricks.atomic import write_text
from convtricks.errors import UserError

log = logging.getLogger("convtricks")

SWEEP_FILE = "sweep.json"
REFERENCE = "reference"
# Variant names become folder names: keep them to what every file system takes.
_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Variant:
    name: str  # also its run folder's name
    changes: dict  # the keys it changes, as the recipe wrote them; {} for the reference
    config: dict  # the fully resolved recipe its run trains


# ---------------------------------------------------------------------------------------------
# Planning: every variant resolved and checked before anything trains.


def plan_variants(recipe: dict, overrides: list[tuple[str, str]] = ()) -> list[Variant]:
    """The reference and each variant of `recipe`, resolved; a bad key fails here, naming the variant."""
    overrides = list(overrides)
    declared = recipes.resolve(recipe)["variants"]
    if not declared:
        raise UserError(f"Recipe '{recipe.get('recipe', 'custom')}' has no variants to sweep; add a mapping "
                        "like `variants: {no-batchnorm: {model.batchnorm: false}}`.")
    planned = [Variant(REFERENCE, {}, _checked(recipe, {}, overrides, "the reference (the recipe itself)"))]
    for name, changes in declared.items():
        if not isinstance(name, str) or not _VARIANT_NAME.fullmatch(name) or name == REFERENCE:
            raise UserError(f"Variant name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder), "
                            f"and not '{REFERENCE}'.")
        changes = changes or {}
        if not isinstance(changes, dict) or not all(isinstance(key, str) for key in changes):
            raise UserError(f"Variant '{name}' must map recipe keys to values, like {{model.batchnorm: false}}.")
        planned.append(Variant(name, dict(changes), _checked(recipe, changes, overrides, f"variant '{name}'")))
    return planned


def _checked(recipe: dict, changes: dict, overrides: list, what: str) -> dict:
    try:
        config = recipes.apply_overrides(recipe, list(changes.items()))
        config = recipes.apply_overrides(config, overrides)
        config["variants"] = {}  # each run trains one configuration; the sweep lives in sweep.json
        check_buildable(config)
    except UserError as error:
        raise UserError(f"In {what}: {error}") from None
    return config


def _build(config: dict, num_outputs: int):
    """The recipe's model, as its run will build it (pretrained weights and all)."""
    # Not on the meta device: its first use costs seconds of imports, more than building these models.
    if config["data"]["kind"] == "utkface":
        from convtricks.train.multitask import build_multitask_model

        return build_multitask_model(config, pretrained=False)
    from convtricks.train.run import build_model

    return build_model(config, num_outputs)


def check_buildable(config: dict) -> None:
    """Model options and augmentation keys are checked by their own code only when a run builds
    them; build them now, so a typo in the last variant fails before the first one trains."""
    if config["augment"]:
        from convtricks.data.augment import AugmentConfig

        AugmentConfig.from_dict(config["augment"])
    _build(config, 1 if config["data"]["class_mode"] == "binary" else 2)


def _chosen(planned: list[Variant], only: list[str] | None) -> list[Variant]:
    if only is None:
        return planned
    names = [variant.name for variant in planned]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise UserError(f"Unknown variant(s) {', '.join(unknown)} in --only; this recipe has {', '.join(names)}.")
    return [variant for variant in planned if variant.name in only]


# ---------------------------------------------------------------------------------------------
# The sweep folder.


def read_sweep(out_dir: Path) -> dict:
    path = Path(out_dir) / SWEEP_FILE
    if not path.is_file():
        raise UserError(f"{out_dir} is not a sweep folder (it has no {SWEEP_FILE}); "
                        "run `convtricks sweep RECIPE` first.")
    try:
        info = json.loads(path.read_text())
        if not all(isinstance(v["name"], str) and isinstance(v["run"], str) for v in info["variants"]):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is damaged; it must list the variants and their run folders.") from None
    return info


def _sweep_info(planned: list[Variant], data_dir: Path, overrides: list) -> dict:
    reference = planned[0].config
    return {
        "format": 1,
        "recipe": reference["recipe"],
        "data_dir": str(Path(data_dir).resolve()),
        "overrides": [[key, value] for key, value in overrides],  # given to every variant
        "targets": reference["sweep_targets"],
        "variants": [{"name": v.name, "changes": v.changes, "run": v.name} for v in planned],
    }


def variant_status(run_dir: Path) -> str:
    """finished (metrics written), interrupted (has a checkpoint) or new (nothing trained)."""
    if (run_dir / "metrics.json").is_file():
        return "finished"
    return "interrupted" if (run_dir / "checkpoint.pt").is_file() else "new"


def _as_stored(config: dict, data_dir: Path) -> dict:
    """The config as `read_config` gives it back from a run folder, for comparison."""
    config = yaml.safe_load(recipes.dump(config))
    config = recipes.resolve(config)
    config["data"]["dir"] = str(Path(data_dir).resolve())
    return config


def _check_run_folder(variant: Variant, run_dir: Path, data_dir: Path) -> str:
    """The variant's status, after making sure a folder already there is this variant's run."""
    from convtricks.train.run import read_config

    if not run_dir.exists():
        return "new"
    if not run_dir.is_dir() or (any(run_dir.iterdir()) and not (run_dir / "config.yaml").is_file()):
        raise UserError(f"{run_dir} is in the way of variant '{variant.name}' and is not its run folder; "
                        "move it or pick another --out.")
    status = variant_status(run_dir)
    if status != "new" and read_config(run_dir) != _as_stored(variant.config, data_dir):
        # Continuing would mix settings (or data) in one comparison.
        raise UserError(f"{run_dir} was trained with other settings or data than variant '{variant.name}' "
                        "now has; delete that folder to train it again, or pick another --out.")
    return status


def _start_in(run_dir: Path, config: dict, data_dir: Path) -> None:
    """`run.start`'s folder (resolved recipe, data folder), but named after the variant."""
    from convtricks.train.run import start

    staging = run_dir.parent / ".starting"
    started = start(config, data_dir, staging)
    if run_dir.exists():  # a folder where nothing trained yet (a start cut short): take its place
        (started / "config.yaml").replace(run_dir / "config.yaml")
        started.rmdir()
    else:
        started.rename(run_dir)
    shutil.rmtree(staging, ignore_errors=True)


def _trainer_for(config: dict):
    if config["data"]["kind"] == "utkface":  # several heads: their own runner, the same loop
        from convtricks.train.multitask import train_multitask_run

        return train_multitask_run
    from convtricks.train.run import train_run

    return train_run


def run_sweep(recipe: dict, data_dir: Path, out_dir: Path, only: list[str] | None = None,
              overrides: list[tuple[str, str]] = ()) -> Path:
    """Train the reference and each variant (or those in `only`) into out_dir/<variant>/, one after
    another, then write the comparison; returns comparison.md. Finished variants are kept and
    interrupted ones resumed, so calling it again continues the sweep."""
    from convtricks.logs import log_to_file

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    overrides = list(overrides)
    planned = plan_variants(recipe, overrides)
    chosen = _chosen(planned, only)
    name = planned[0].config["recipe"]
    if (out_dir / SWEEP_FILE).is_file() and read_sweep(out_dir).get("recipe") != name:
        raise UserError(f"{out_dir} holds a sweep of recipe '{read_sweep(out_dir).get('recipe')}'; "
                        "pick another --out.")
    statuses = {v.name: _check_run_folder(v, out_dir / v.name, data_dir) for v in chosen}
    if any(status != "finished" for status in statuses.values()) and not data_dir.is_dir():
        raise UserError(f"Data folder {data_dir} does not exist; build it with `convtricks prepare --out {data_dir}`.")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / SWEEP_FILE, json.dumps(_sweep_info(planned, data_dir, overrides), indent=1))

    log.info("Sweep of recipe '%s': %s, into %s.", name, ", ".join(v.name for v in chosen), out_dir)
    for index, variant in enumerate(chosen, start=1):
        run_dir = out_dir / variant.name
        what = _describe(variant)
        status = statuses[variant.name]
        if status == "finished":
            log.info("[%d/%d] %s (%s): finished earlier, kept.", index, len(chosen), variant.name, what)
            continue
        if status == "new":
            _start_in(run_dir, variant.config, data_dir)
        handler = log_to_file(run_dir / "log.txt")
        try:
            log.info("[%d/%d] %s (%s): %s %s.", index, len(chosen), variant.name, what,
                     "resuming" if status == "interrupted" else "training into", run_dir)
            _trainer_for(variant.config)(run_dir, resume=status == "interrupted")
        finally:
            log.removeHandler(handler)
            handler.close()
    return write_sweep_report(out_dir)


def _describe(variant: Variant) -> str:
    from convtricks.report.sweep import short_changes

    return short_changes(variant.changes) if variant.changes else "the recipe as written"


# ---------------------------------------------------------------------------------------------
# The comparison.


def parameter_count(run_dir: Path, metrics: dict | None) -> int | None:
    """Total parameters of the run's model (metrics.json's, or counted on a fresh build)."""
    from convtricks.train.run import read_config, task_for

    if metrics and isinstance(metrics.get("params"), int):
        return metrics["params"]
    try:
        config = read_config(run_dir)
        classes = json.loads((run_dir / "classes.json").read_text()) if (run_dir / "classes.json").is_file() else None
        outputs = task_for(config, classes)[1] if classes else 1
        return sum(p.numel() for p in _build(config, outputs).parameters())
    except Exception:  # a count is a nicety: the table says "—" rather than the report failing
        return None


def write_sweep_report(out_dir: Path) -> Path:
    """comparison.md / comparison.csv and the figures, from the run folders as they are now."""
    from convtricks.report import sweep as report
    from convtricks.train.history import read_history

    out_dir = Path(out_dir)
    info = read_sweep(out_dir)
    targets = [float(t) for t in info.get("targets") or []]
    results, missing = [], []
    for entry in info["variants"]:
        run_dir = out_dir / entry["run"]
        history = read_history(run_dir)
        if not history:
            missing.append(entry["name"])
            continue
        metrics_path = run_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        results.append(report.VariantResult(entry["name"], entry.get("changes") or {}, history, metrics,
                                            parameter_count(run_dir, metrics)))
    if not results:
        raise UserError(f"No variant in {out_dir} has finished an epoch yet; there is nothing to compare.")

    title = info.get("recipe", "")
    figures = [("Training loss", report.plot_loss(results, out_dir / "loss.png", title).name),
               ("Validation accuracy against training time",
                report.plot_val_acc(results, targets, out_dir / "val_acc.png", title).name)]
    grads = report.plot_grad_norms(results, out_dir / "grad_norms.png", title)
    if grads is not None:
        figures.append(("Gradient norms per layer", grads.name))
    else:
        (out_dir / "grad_norms.png").unlink(missing_ok=True)  # never leave an earlier report's figure

    rows = report.comparison_rows(results, targets, reference=REFERENCE)
    write_text(out_dir / "comparison.csv", report.comparison_csv(rows, targets))
    markdown = report.comparison_markdown(title, rows, targets, data_dir=info.get("data_dir", ""),
                                          overrides=info.get("overrides"), missing=missing, figures=figures)
    write_text(out_dir / "comparison.md", markdown)
    log.info("Comparison of %d variant(s) written to %s.", len(results), out_dir / "comparison.md")
    return out_dir / "comparison.md"


# ---------------------------------------------------------------------------------------------
# The command: `convtricks sweep RECIPE [--data DIR] [--out DIR] [--only a,b] [--report-only] [--key value ...]`.


def add_sweep_command(commands) -> None:
    """Register `sweep` on the CLI's subparsers."""
    # allow_abbrev off: a recipe override must never be taken for an abbreviation of a flag.
    p = commands.add_parser("sweep", allow_abbrev=False,
                            help="train a recipe and its variants side by side, then compare them; "
                                 "recipe keys follow as --key value and apply to every variant")
    p.add_argument("recipe")
    p.add_argument("--data", help="split folder with train/ and validation/ (default data/cats_and_dogs_small)")
    p.add_argument("--out", help="the sweep folder (default runs/<recipe>-sweep); if it exists, continue it")
    p.add_argument("--only", help=f"comma-separated variants to train ('{REFERENCE}' is the recipe itself)")
    p.add_argument("--report-only", action="store_true", help="only redraw the comparison from the run folders")
    p.set_defaults(handler=sweep_command)


def sweep_command(args, extra: list[str]) -> int:
    from convtricks.cli import DEFAULT_DATA, _overrides

    overrides = _overrides(extra)
    recipe = recipes.read_recipe(args.recipe)
    name = recipe.get("recipe") or Path(args.recipe).stem
    out_dir = Path(args.out) if args.out else Path("runs") / f"{name}-sweep"
    if args.report_only:
        if overrides or args.only or args.data:
            raise UserError("--report-only redraws the comparison from the runs as they are; give no --data, "
                            "--only or recipe keys.")
        write_sweep_report(out_dir)
        return 0
    only = [part.strip() for part in args.only.split(",") if part.strip()] if args.only is not None else None
    if only is not None and not only:
        raise UserError("--only is empty; give variant names like reference,no-batchnorm.")
    try:
        run_sweep(recipe, Path(args.data) if args.data else DEFAULT_DATA, out_dir, only=only, overrides=overrides)
    except KeyboardInterrupt:
        log.info("Interrupted. Finished variants are kept and the last finished epoch is saved; "
                 "the same command (with --out %s) continues the sweep.", out_dir)
        return 130
    return 0
