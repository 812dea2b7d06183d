"""`convtricks reproduce`: the lecture's experiments one after another, resumable, then one report.

The sequence is the lecture's: the small CNN (baseline), dropout + augmentation, a pretrained
base under a new top, then fine-tuned, an ensemble (bagging), multi-task heads on faces, the
tricks for better optimization (a sweep) and the best from-scratch recipe. Each stage writes
ordinary run folders under the reproduce folder:

    runs/reproduce[-quick]/
      reproduce.json     the plan, the settings, stage -> folder map, time per stage, machine
      baseline/baseline-<time>/         a run folder like any other
      ensemble/pretrain-ensemble-data/  an ensemble folder
      optimization/sweep/               a sweep folder (comparison.md, figures)
      data/              quick runs only: the smaller split and face set (links, not copies)
      REPORT.md, report.html, log.txt

Running the same command again continues: a stage whose folder has its final numbers is kept,
one with a checkpoint resumes, the others start. `--quick` swaps the recipes' schedules for
short ones (QUICK below) so the whole sequence runs in minutes on a 2-core CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from convtricks.atomic import write_text
from convtricks.errors import UserError

log = logging.getLogger("convtricks")

STATE_FILE = "reproduce.json"


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # train (class folders) | ensemble | multitask (faces) | sweep
    recipe: str
    what: str  # one line for the log and the report


STAGES = (
    Stage("baseline", "train", "baseline", "the small CNN trained from scratch: it overfits"),
    Stage("dropout-aug", "train", "dropout-aug", "tricks 1-2: dropout before the big dense layer, augmented images"),
    Stage("pretrain", "train", "pretrain", "trick 3, step 4: a frozen pretrained base under a new top"),
    Stage("pretrain-finetune", "train", "pretrain-finetune",
          "trick 3, step 5: the top first, then the base's last blocks at a lower rate"),
    Stage("ensemble", "ensemble", "pretrain",
          "trick 4: pretrain runs on bootstrap samples of the training images (bagging), voting"),
    Stage("multitask", "multitask", "multitask", "trick 5: one shared base, age, gender and race heads on faces"),
    Stage("optimization", "sweep", "optimization",
          "batch norm, skip connections, auxiliary heads: a plain deep net against each and all"),
    Stage("scratch-best", "train", "scratch-best", "the best recipe trained from scratch"),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
BY_NAME = {stage.name: stage for stage in STAGES}

# Per-stage keys that are options of the stage's command, not recipe keys.
STAGE_OPTIONS = {"ensemble": ("members", "parallel"), "sweep": ("only",)}

# Settings are data: per stage, recipe overrides written as on the command line (`--epochs 3`),
# plus the few stage options above. `split_per_class` (train, validation, test images per class)
# and `faces` shrink the data: None keeps it whole.
FULL = {
    "split_per_class": None,
    "faces": None,
    "stages": {"ensemble": {"members": 5}},
}

# Measured on a 2-core CPU: the small CNN trains ~30 img/s at 150 px (about 5x that at 64 px),
# Lite0's forward runs ~24 img/s at 224 px and ~4x that at 128 px; frozen layers run once per
# image (cached), so the pretrained stages cost about one pass over their images. Smaller
# images, a smaller split, fewer faces and a few steps per epoch keep the whole sequence
# within 10 minutes.
QUICK = {
    "split_per_class": [200, 100, 100],
    "faces": 1000,
    "stages": {
        # At RMSprop 1e-4 the small CNN stays at chance for its first ~200 steps; 400 show it learning.
        "baseline": {"target_size": 64, "epochs": 8, "steps_per_epoch": 50},
        "dropout-aug": {"target_size": 64, "epochs": 8, "steps_per_epoch": 50},
        "pretrain": {"target_size": 128, "epochs": 5},
        "pretrain-finetune": {"target_size": 128, "epochs": 2, "steps_per_epoch": 10},
        "ensemble": {"members": 3, "target_size": 128, "epochs": 5},
        "multitask": {"target_size": 128, "epochs": 2, "steps_per_epoch": 10},
        "optimization": {"target_size": 64, "epochs": 2, "steps_per_epoch": 10},
        # 30 steps: the recipe's weight average (decay 0.998) would still be mostly the initial weights.
        # Half the quick size, as the recipe starts at half its own: the images still grow.
        "scratch-best": {"target_size": 64, "progressive_start": 32, "epochs": 3, "steps_per_epoch": 10,
                         "ema": 0.9},
    },
}


def default_out(quick: bool) -> Path:
    return Path("runs") / ("reproduce-quick" if quick else "reproduce")


def parse_only(text: str | None) -> list[str] | None:
    """`baseline,pretrain` -> the stages in the lecture's order; unknown names are one error."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in BY_NAME]
    if unknown or not names:
        raise UserError(f"Unknown stage(s) {', '.join(unknown) or '(none given)'} in --only; "
                        f"the stages are {', '.join(STAGE_NAMES)}.")
    return [name for name in STAGE_NAMES if name in names]


# ---------------------------------------------------------------------------------------------
# Data: the lecture split (prepared when absent), the face folder, and the smaller quick sets.


def default_faces() -> Path | None:
    """UTKFace beside the Kaggle images: `../shared/data/utkface`, as `prepare` finds its source."""
    from convtricks.data.prepare import default_source

    source = default_source()  # .../data/dogs-vs-cats/train
    if source is not None and (source.parent.parent / "utkface").is_dir():
        return source.parent.parent / "utkface"
    return None


def ensure_lecture_split(data_dir: Path) -> Path:
    """The split folder, built first from the default source (as `convtricks prepare`) when absent."""
    from convtricks.data.prepare import default_source, prepare_split

    data_dir = Path(data_dir)
    if (data_dir / "train").is_dir() and (data_dir / "validation").is_dir():
        return data_dir
    if data_dir.exists() and any(data_dir.iterdir()):
        raise UserError(f"{data_dir} is not a split folder (it has no train/ and validation/ folders).")
    source = default_source()
    if source is None:
        raise UserError(f"{data_dir} does not exist and the default data (../shared/data/dogs-vs-cats/train) is "
                        f"absent; build the split with `convtricks prepare --source DIR --out {data_dir}`.")
    log.info("Preparing the lecture's split in %s from %s.", data_dir, source)
    prepare_split(source, data_dir, log=log.info)
    return data_dir


def _place(source: Path, destination: Path) -> None:
    # A hard link costs no space; where links are not allowed (another file system, files of
    # another owner), a copy.
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def _build_once(target: Path, description: dict, fill) -> Path:
    """Build a derived data folder in a hidden sibling and rename it into place, so an
    interrupted build is never taken for a finished one; a finished one is reused."""
    marker = target / "SOURCE.json"
    if marker.is_file() and json.loads(marker.read_text()) == description:
        return target
    if target.exists():
        shutil.rmtree(target)  # ours (inside the reproduce folder), built for other settings
    partial = target.with_name(f".{target.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    fill(partial)
    write_text(partial / "SOURCE.json", json.dumps(description, indent=1))
    partial.rename(target)
    return target


def smaller_split(split_dir: Path, target: Path, per_class: list[int]) -> Path:
    """The first images of each class of each split (in natural order), linked into `target`."""
    from convtricks.data.folders import index_directory

    counts = dict(zip(("train", "validation", "test"), per_class))

    def fill(folder: Path) -> None:
        for split, count in counts.items():
            if not (split_dir / split).is_dir():
                continue
            index = index_directory(split_dir / split)
            taken: dict[int, int] = {}
            for path, label in zip(index.paths, index.labels):
                if taken.get(label, 0) >= count:
                    continue
                taken[label] = taken.get(label, 0) + 1
                class_dir = folder / split / index.classes[label]
                class_dir.mkdir(parents=True, exist_ok=True)
                _place(path, class_dir / path.name)

    description = {"from": str(Path(split_dir).resolve()), "per_class": counts}
    return _build_once(target, description, fill)


def fewer_faces(faces_dir: Path, target: Path, count: int) -> Path:
    """`count` faces spread evenly over the sorted names (so every age and race appears), linked."""
    from convtricks.data.utkface import index_faces

    def fill(folder: Path) -> None:
        paths = index_faces(faces_dir).paths
        step = max(1, len(paths) // count)
        for path in paths[::step][:count]:
            _place(path, folder / path.name)

    return _build_once(target, {"from": str(Path(faces_dir).resolve()), "faces": count}, fill)


# ---------------------------------------------------------------------------------------------
# The record: reproduce.json.


def machine() -> dict:
    """What the report says this ran on."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "memory_gib": memory,
            "torch": torch.__version__, "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (ensemble workers): it grows far less
    than wall time when other jobs share the cores."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def read_state(out: Path) -> dict:
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise UserError(f"{out} is not a reproduce folder (it has no {STATE_FILE}); run `convtricks reproduce` first.")
    try:
        state = json.loads(path.read_text())
        if not isinstance(state.get("stages"), dict):
            raise ValueError
    except ValueError:
        raise UserError(f"{path} is damaged; remove the folder or pick another --out.") from None
    return state


def save_state(out: Path, state: dict) -> None:
    write_text(Path(out) / STATE_FILE, json.dumps(state, indent=1))


def _plain(value):
    return json.loads(json.dumps(value))  # what the settings look like once read back from the file


def _open_state(out: Path, mode: str, settings: dict, data_dir: Path, faces_dir: Path | None) -> dict:
    """A new record, or the folder's own when it was started with the same settings."""
    wanted = {"mode": mode, "settings": _plain(settings), "data": str(Path(data_dir).resolve()),
              "faces": str(Path(faces_dir).resolve()) if faces_dir else None}
    if (Path(out) / STATE_FILE).is_file():
        state = read_state(out)
        differing = [key for key in wanted if state.get(key) != wanted[key]]
        if differing:
            raise UserError(f"{out} holds a reproduce run with other {', '.join(differing)}; run the command it was "
                            "started with to continue it, or pick another --out.")
        return state
    if Path(out).exists() and any(Path(out).iterdir()):
        raise UserError(f"{out} exists and is not a reproduce folder; pick another --out.")
    return {"format": 1, **wanted, "stages": {}, "invocations": []}


# ---------------------------------------------------------------------------------------------
# Stages.


def _overrides(values: dict) -> list[tuple[str, str]]:
    return [(key, value if isinstance(value, str) else json.dumps(value)) for key, value in values.items()]


def recipe_overrides(stage: Stage, stage_settings: dict) -> list[tuple[str, str]]:
    """The stage's recipe overrides as `--key value` pairs (stage options such as `members` left out)."""
    options = STAGE_OPTIONS.get(stage.kind, ())
    return _overrides({k: v for k, v in stage_settings.items() if k not in options})


def recipe_for(stage: Stage, stage_settings: dict) -> dict:
    """The stage's recipe, resolved, with its overrides applied."""
    from convtricks import config as recipes

    return recipes.apply_overrides(recipes.read_recipe(stage.recipe), recipe_overrides(stage, stage_settings))


def command_line(stage: Stage, stage_settings: dict, data: Path) -> str:
    """The command that runs this stage alone, for the report."""
    options = STAGE_OPTIONS.get(stage.kind, ())
    keys = " ".join(f"--{k} {v if isinstance(v, str) else json.dumps(v)}" for k, v in stage_settings.items()
                    if k not in options)
    if stage.kind == "ensemble":
        members = stage_settings.get("members", 5)
        head = f"convtricks ensemble {stage.recipe} --vary data --members {members}"
    elif stage.kind == "sweep":
        only = stage_settings.get("only")
        head = f"convtricks sweep {stage.recipe}" + (f" --only {','.join(only)}" if only else "")
    else:
        head = f"convtricks train {stage.recipe}"
    return " ".join(part for part in (head, f"--data {data}", keys) if part)


def stage_done(stage: Stage, folder: Path | None) -> bool:
    if folder is None:
        return False
    if stage.kind == "sweep":
        return (folder / "comparison.md").is_file()
    return (folder / "metrics.json").is_file()


def _train_stage(stage: Stage, config: dict, data_dir: Path, stage_dir: Path, record: dict, out: Path,
                 state: dict) -> None:
    """A run folder: started once (and recorded), then trained or resumed from its checkpoint."""
    from convtricks.logs import log_to_file
    from convtricks.train import run as run_module

    run_dir = out / record["folder"] if record.get("folder") else None
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        run_dir = run_module.start(config, data_dir, stage_dir)
        record["folder"] = str(run_dir.relative_to(out))
        save_state(out, state)
    resume = (run_dir / "checkpoint.pt").is_file()
    if stage.kind == "multitask":
        from convtricks.train import multitask

        trainer = multitask.train_multitask_run
    else:
        trainer = run_module.train_run
    handler = log_to_file(run_dir / "log.txt")
    try:
        log.info("Run folder: %s%s", run_dir, " (resuming)" if resume else "")
        trainer(run_dir, resume=resume)
    finally:
        log.removeHandler(handler)
        handler.close()


def _ensemble_stage(stage: Stage, config: dict, data_dir: Path, stage_dir: Path, record: dict, out: Path,
                    state: dict, stage_settings: dict) -> None:
    from convtricks.train import ensemble

    folder = stage_dir / f"{stage.recipe}-ensemble-data"
    record["folder"] = str(folder.relative_to(out))
    save_state(out, state)
    code = ensemble.run_ensemble(config, data_dir, stage_dir, vary="data",
                                 members=int(stage_settings.get("members", 5)),
                                 parallel=int(stage_settings["parallel"]) if stage_settings.get("parallel") else None,
                                 out=folder)
    if code == 130:
        raise KeyboardInterrupt


def _sweep_stage(stage: Stage, data_dir: Path, stage_dir: Path, record: dict, out: Path, state: dict,
                 stage_settings: dict) -> None:
    """The sweep's own folder; run_sweep keeps finished variants and resumes the others."""
    from convtricks import config as recipes
    from convtricks.experiments.sweep import run_sweep

    folder = stage_dir / "sweep"
    record["folder"] = str(folder.relative_to(out))
    save_state(out, state)
    run_sweep(recipes.read_recipe(stage.recipe), data_dir, folder, only=stage_settings.get("only"),
              overrides=recipe_overrides(stage, stage_settings))


def _run_stage(stage: Stage, stage_settings: dict, data_dir: Path, out: Path, state: dict) -> None:
    record = state["stages"].setdefault(stage.name, {})
    record.update({"kind": stage.kind, "recipe": stage.recipe, "what": stage.what,
                   "command": command_line(stage, stage_settings, data_dir),
                   "settings": _plain(stage_settings)})
    stage_dir = out / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    try:
        if stage.kind in ("train", "multitask"):
            _train_stage(stage, recipe_for(stage, stage_settings), data_dir, stage_dir, record, out, state)
        elif stage.kind == "ensemble":
            _ensemble_stage(stage, recipe_for(stage, stage_settings), data_dir, stage_dir, record, out, state,
                            stage_settings)
        else:
            _sweep_stage(stage, data_dir, stage_dir, record, out, state, stage_settings)
    finally:
        # Time on this machine adds up over invocations: an interrupted stage keeps what it spent.
        record["seconds"] = round(record.get("seconds", 0.0) + time.perf_counter() - started, 1)
        record["cpu_seconds"] = round(record.get("cpu_seconds", 0.0) + cpu_seconds() - cpu_started, 1)
        save_state(out, state)
    record["finished"] = datetime.now().isoformat(timespec="seconds")
    save_state(out, state)


# ---------------------------------------------------------------------------------------------
# The command.


def reproduce(out: Path | None = None, data_dir: Path | None = None, faces_dir: Path | None = None,
              quick: bool = False, only: list[str] | None = None, settings: dict | None = None) -> dict:
    """Run the stages not yet finished (all, or `only` these) into `out`, then write the report.

    `settings` replaces QUICK / FULL (same shape); tests pass tiny ones. Returns reproduce.json's
    content. A KeyboardInterrupt propagates after the state is saved: run again to continue.
    """
    from convtricks.cli import DEFAULT_DATA
    from convtricks.logs import log_to_file
    from convtricks.report.reproduce_report import build_report

    mode = "quick" if quick else "full"
    settings = copy.deepcopy(settings if settings is not None else (QUICK if quick else FULL))
    out = Path(out) if out is not None else default_out(quick)
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA
    faces_dir = Path(faces_dir) if faces_dir is not None else default_faces()
    wanted = [BY_NAME[name] for name in (only or STAGE_NAMES)]

    state = _open_state(out, mode, settings, data_dir, faces_dir)
    out.mkdir(parents=True, exist_ok=True)
    invocation = {"started": datetime.now().isoformat(timespec="seconds"), "stages": [],
               "load_average_at_start": _load_average(), "machine": machine()}
    state["plan"] = [s.name for s in wanted]
    state["invocations"].append(invocation)
    save_state(out, state)
    handler = log_to_file(out / "log.txt")
    began, cpu_began = time.perf_counter(), cpu_seconds()
    try:
        log.info("Reproducing the lecture (%s%s) in %s: %s.", mode, ", shortened schedules" if quick else "", out,
                 ", ".join(state["plan"]))
        pending = [s for s in wanted
                   if not stage_done(s, out / state["stages"][s.name]["folder"]
                                     if state["stages"].get(s.name, {}).get("folder") else None)]
        for stage in wanted:
            if stage not in pending:
                log.info("Stage %s already finished (%s); kept as it is.", stage.name,
                         state["stages"][stage.name]["folder"])
        invocation["stages"] = [stage.name for stage in pending]
        split, faces = _data_for(pending, settings, data_dir, faces_dir, out, state)
        for number, stage in enumerate(pending, 1):
            log.info("=== Stage %d/%d: %s (%s).", number, len(pending), stage.name, stage.what)
            source = faces if stage.kind == "multitask" else split
            _run_stage(stage, settings["stages"].get(stage.name, {}), source, out, state)
    finally:
        invocation["seconds"] = round(time.perf_counter() - began, 1)
        invocation["cpu_seconds"] = round(cpu_seconds() - cpu_began, 1)
        invocation["load_average_at_end"] = _load_average()
        save_state(out, state)
        log.removeHandler(handler)
        handler.close()
    report, html = build_report(out)
    log.info("Report: %s and %s (%s in total).", report, html, _duration(invocation["seconds"]))
    return state


def _data_for(pending: list[Stage], settings: dict, data_dir: Path, faces_dir: Path | None, out: Path,
              state: dict) -> tuple[Path | None, Path | None]:
    """The class folders and the faces the pending stages read (built or shrunk as needed)."""
    started = time.perf_counter()
    split = faces = None
    if any(stage.kind != "multitask" for stage in pending):
        split = ensure_lecture_split(data_dir)
        if settings.get("split_per_class"):
            split = smaller_split(split, out / "data" / "split", settings["split_per_class"])
    if any(stage.kind == "multitask" for stage in pending):
        faces = faces_dir
        if faces is None:
            raise UserError("The multitask stage needs UTKFace faces: pass --faces DIR (the default, "
                            "../shared/data/utkface, is absent).")
        if settings.get("faces"):
            faces = fewer_faces(faces, out / "data" / "faces", int(settings["faces"]))
    state["data_seconds"] = round(state.get("data_seconds", 0.0) + time.perf_counter() - started, 1)
    state["data_used"] = {**state.get("data_used", {}), **({"split": str(split)} if split else {}),
                          **({"faces": str(faces)} if faces else {})}
    save_state(out, state)
    return split, faces


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def add_parser(commands, default_data: Path) -> None:
    """`convtricks reproduce` on the CLI's subparsers."""
    p = commands.add_parser("reproduce", help="the lecture's whole sequence of experiments, resumable, "
                            "ending in REPORT.md and report.html")
    p.add_argument("--data", help=f"the lecture split (default {default_data}; prepared from the default source "
                   "when absent)")
    p.add_argument("--faces", help="UTKFace folder for the multitask stage (default ../shared/data/utkface)")
    p.add_argument("--out", help="the reproduce folder (default runs/reproduce, or runs/reproduce-quick); "
                   "running again continues it")
    p.add_argument("--quick", action="store_true", help="shortened schedules on smaller images and sets: "
                   "minutes instead of hours, accuracies not the lecture's comparison")
    p.add_argument("--only", help=f"comma-separated stages to run, of: {', '.join(STAGE_NAMES)}")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from an existing folder")
    p.set_defaults(handler=command)


def command(args, extra) -> int:
    from convtricks.report.reproduce_report import build_report

    out = Path(args.out) if args.out else default_out(args.quick)
    only = parse_only(args.only)
    if args.report_only:
        report, html = build_report(out)
        log.info("Report: %s and %s.", report, html)
        return 0
    try:
        reproduce(out, Path(args.data) if args.data else None, Path(args.faces) if args.faces else None,
                  quick=args.quick, only=only)
    except KeyboardInterrupt:
        log.info("Interrupted. Finished stages and epochs are saved; run the same command again to continue.")
        return 130
    return 0
