"""Trick 5 end to end: the multi-task loss, a run on UTKFace faces, and using the trained run.

The objective is the lecture's Loss1 + λ·Loss2 + γ·Loss3 with
    Loss1 = mean (age − predicted age)² in years²   (about 100–600: ages spread over 0–116)
    Loss2 = binary cross-entropy of the gender logit (about 0.1–0.7)
    Loss3 = cross-entropy of the five race logits     (about 0.3–1.6)
and weights {age: w, gender: λ, race: γ} from the recipe's `multitask` section. Unweighted, the
age term is hundreds of times the others and the shared base learns age alone; the epoch line
prints each loss's raw size so this is visible. `weighting: uncertainty` learns the weights
instead (Kendall et al. 2018): Σ L_i·exp(−s_i) + s_i, with s_i the model's `top.loss_log_vars`.

The training loop is the shared one (`fit`); this module only supplies the task, the data and
the final numbers. The monitored metric `score` (higher is better) is the mean over the trained
heads of gender accuracy, race accuracy and, for age, 1 − MAE / 25 years (25 years is about the
spread of UTKFace's ages, so a model that always guesses the mean age scores near 0 on it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from convtricks.atomic import write_text
from convtricks.data.decode import decode_image
from convtricks.data.utkface import GENDERS, RACES, decode_faces, index_faces, load_faces
from convtricks.errors import UserError
from convtricks.models.multitask import COLUMNS, check_tasks
from convtricks.models.registry import create_model
from convtricks.report.curves import measured
from convtricks.train import distributed
from convtricks.train.checkpoint import load_weights
from convtricks.train.fit import Batcher, fit, measure, predict_logits, resolve_precision
from convtricks.train.freezing import count_parameters, set_train_mode
from convtricks.train.run import LabelledTensors, peak_rss_mb, pick_device, read_config, ready_to_fit, set_threads

log = logging.getLogger("convtricks")

AGE_SCORE_YEARS = 25.0
SEEN_FACES = "seen_faces.txt"  # in a run folder: the training and validation faces' file names
AGE, GENDER, RACE = 0, 1, 2  # columns of the (N, 3) targets


class MultiTaskTask:
    """Age regression + gender (binary) + race (5 classes) from one (N, 7) output tensor."""

    monitor = "val_score"

    def __init__(self, tasks, weights: dict | None = None, weighting: str = "fixed",
                 log_vars: torch.Tensor | None = None):
        try:
            self.tasks = check_tasks(tasks)
        except ValueError as problem:
            raise UserError(f"multitask: {problem}.") from None
        weights = dict(weights or {})
        unknown = set(weights) - {"age", "gender", "race"}
        if unknown:
            raise UserError(f"multitask.weights has unknown task(s) {', '.join(sorted(unknown))}; "
                            "give weights for age, gender and race.")
        self.weights = {task: float(weights.get(task, 1.0)) for task in self.tasks}
        if any(not math.isfinite(w) or w < 0 for w in self.weights.values()):
            raise UserError(f"multitask.weights must be numbers >= 0, got {weights}.")
        if weighting not in ("fixed", "uncertainty"):
            raise UserError(f"multitask.weighting must be fixed or uncertainty, got {weighting!r}.")
        if weighting == "uncertainty" and (log_vars is None or log_vars.numel() != len(self.tasks)):
            raise UserError("multitask.weighting uncertainty needs a model built with weighting: uncertainty.")
        self.weighting = weighting
        self.log_vars = log_vars
        names = [f"{t}_loss" for t in self.tasks]
        names += [{"age": "age_mae", "gender": "gender_acc", "race": "race_acc"}[t] for t in self.tasks]
        self.metric_names = tuple(names) + ("score",)

    def head_losses(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> dict:
        """Each trained head's own loss, unweighted: age in years², gender BCE, race CE."""
        outputs, targets = outputs.float(), targets.float()
        losses = {}
        if "age" in self.tasks:
            losses["age"] = F.mse_loss(outputs[:, COLUMNS["age"]].view(-1), targets[:, AGE], reduction=reduction)
        if "gender" in self.tasks:
            losses["gender"] = F.binary_cross_entropy_with_logits(
                outputs[:, COLUMNS["gender"]].view(-1), targets[:, GENDER], reduction=reduction)
        if "race" in self.tasks:
            losses["race"] = F.cross_entropy(outputs[:, COLUMNS["race"]], targets[:, RACE].long(), reduction=reduction)
        return losses

    def combine(self, losses: dict) -> torch.Tensor:
        if self.weighting == "uncertainty":
            # Validation losses are computed where the logits were gathered (the CPU), training
            # losses on the model's device: the learned log-variances go to the losses.
            log_vars = self.log_vars.float().to(next(iter(losses.values())).device)
            return sum(losses[t] * torch.exp(-log_vars[i]) + log_vars[i] for i, t in enumerate(self.tasks))
        return sum(self.weights[t] * losses[t] for t in self.tasks)

    def loss(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        return self.combine(self.head_losses(outputs, targets))

    def batch_stats(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Sums over the batch (the loop divides by the count)."""
        logits, targets = logits.float(), targets.float()
        with torch.no_grad():
            losses = self.head_losses(logits, targets, reduction="none")
            # Per-image losses combine linearly (the learned s_i add once per image), so their
            # sum over the batch divided by the count is the batch's mean objective.
            stats = {"loss": float(self.combine(losses).sum())}
            scores = []
            for task, values in losses.items():
                stats[f"{task}_loss"] = float(values.sum())
            if "age" in self.tasks:
                errors = (logits[:, COLUMNS["age"]].view(-1) - targets[:, AGE]).abs()
                stats["age_mae"] = float(errors.sum())
                scores.append(1 - errors / AGE_SCORE_YEARS)
            if "gender" in self.tasks:
                correct = ((logits[:, COLUMNS["gender"]].view(-1) > 0).float() == targets[:, GENDER]).float()
                stats["gender_acc"] = float(correct.sum())
                scores.append(correct)
            if "race" in self.tasks:
                correct = (logits[:, COLUMNS["race"]].argmax(1) == targets[:, RACE].long()).float()
                stats["race_acc"] = float(correct.sum())
                scores.append(correct)
            stats["score"] = float(torch.stack(scores).mean(0).sum())
        return stats

    def loss_weights(self) -> dict[str, float]:
        """The weight each task's loss gets now (learned ones read from the model)."""
        if self.weighting == "uncertainty":
            return {t: float(torch.exp(-self.log_vars[i].detach())) for i, t in enumerate(self.tasks)}
        return dict(self.weights)


# ---------------------------------------------------------------------------------------------
# Building a run's model and task.


def build_multitask_model(config: dict, pretrained: bool = True) -> torch.nn.Module:
    """The recipe's model, with the tasks and weighting of its `multitask` section."""
    options = dict(config["model"])
    name = options.pop("name")
    options.setdefault("input_size", list(config["data"]["target_size"]))
    options["tasks"] = config["multitask"]["tasks"]
    options["weighting"] = config["multitask"]["weighting"]
    if not pretrained:
        options["pretrained"] = "none"  # the run's own weights replace them: no need to load ImageNet's
        options.pop("weights", None)
    return create_model(name, **options)


def task_for_model(config: dict, model: torch.nn.Module) -> MultiTaskTask:
    section = config["multitask"]
    top = getattr(model, "top", None)
    if top is None or not hasattr(model, "tasks"):
        raise UserError(f"Model '{config['model']['name']}' is not a multi-task model; use multitask-faces.")
    return MultiTaskTask(section["tasks"], section["weights"], section["weighting"],
                         getattr(top, "loss_log_vars", None))


def race_report(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Race accuracy per class and the confusion matrix (rows: true race, columns: predicted)."""
    truth = targets[:, RACE].long()
    guess = logits[:, COLUMNS["race"]].argmax(1)
    confusion = torch.zeros(len(RACES), len(RACES), dtype=torch.long)
    confusion.index_put_((truth, guess), torch.ones_like(truth), accumulate=True)
    per_class = {}
    for index, race in enumerate(RACES):
        total = int(confusion[index].sum())
        per_class[race] = round(int(confusion[index, index]) / total, 4) if total else None
    return {"race_acc_per_class": per_class, "race_confusion": confusion.tolist()}


def _check_data_kind(config: dict) -> None:
    if config["data"].get("kind") != "utkface":
        raise UserError(f"A multi-task run reads UTKFace faces: set data.kind to utkface "
                        f"(got {config['data'].get('kind')}).")


# ---------------------------------------------------------------------------------------------
# Training.


def train_multitask_run(run_dir: Path, resume: bool = False) -> dict:
    """Train (or continue) the multi-task run in `run_dir` on its UTKFace folder; returns its metrics."""
    run_dir = Path(run_dir)
    config = distributed.from_main(lambda: read_config(run_dir))  # DDP: only the main process reads the folder
    distributed.check_batch_size(config["data"]["batch_size"])
    _check_data_kind(config)
    train_cfg, data_cfg = config["train"], config["data"]
    set_threads(train_cfg["threads"])
    device = pick_device(train_cfg["device"])
    data_dir = Path(data_cfg["dir"])
    loading = time.perf_counter()
    faces = load_faces(data_dir, data_cfg["target_size"], data_cfg["split"], use_cache=data_cfg["cache"])
    train_faces, val_faces, test_faces = faces["train"], faces["validation"], faces["test"]
    log.info("Found %d training and %d validation faces (split %s by file-name hash); decoded in %.1f s.",
             len(train_faces), len(val_faces), data_cfg["split"], time.perf_counter() - loading)

    torch.manual_seed(train_cfg["seed"])  # the initial weights follow from the seed
    model = build_multitask_model(config).to(device)
    ages = train_faces.targets[:, AGE]
    model.top.set_age_scale(float(ages.mean()), float(ages.std()) if len(ages) > 1 else 1.0)
    model, stages, state, augment_config = ready_to_fit(run_dir, config, model, resume)
    task = task_for_model(config, model)
    log.info("Tasks %s, weighting %s, loss weights %s.", ", ".join(task.tasks), task.weighting,
             ", ".join(f"{t} {w:.4g}" for t, w in task.loss_weights().items()))
    settings = {
        "device": device, "seed": train_cfg["seed"], "rescale": data_cfg["rescale"],
        "channels_last": train_cfg["channels_last"], "batch_size": data_cfg["batch_size"],
        "val_batch_size": data_cfg["val_batch_size"], "validation_steps": train_cfg["validation_steps"],
        "cache": data_cfg["cache"],
    }
    train_set = LabelledTensors(train_faces.images, train_faces.targets, train_faces.key)
    val_set = LabelledTensors(val_faces.images, val_faces.targets, val_faces.key)
    started = time.perf_counter()
    state = fit(model, task, train_set, val_set, stages, settings, run_dir, state, augment_config)
    train_seconds = time.perf_counter() - started
    if not distributed.is_main():
        return {}  # DDP: the main process judges the result and writes it
    # The names of the faces this run learned from or was tuned on: `evaluate` leaves them out
    # of any other folder (the same faces copied elsewhere, or the run moved to another machine).
    seen = sorted(path.name for path in [*train_faces.paths, *val_faces.paths])
    write_text(run_dir / SEEN_FACES, "\n".join(seen) + "\n")
    load_weights(run_dir / "model.safetensors", model)  # judge exactly what was saved (EMA, if on)

    total, _, _ = count_parameters(model)
    last = state.history[-1] if state.history else {}
    metrics = {"recipe": config["recipe"], "tasks": task.tasks, "weighting": task.weighting,
               "loss_weights": task.loss_weights(), "epochs": state.epoch, "params": total}
    metrics.update({key: last[key] for key in last if key not in ("epoch", "stage", "lr", "seconds")})
    metrics["best_val"] = state.best
    if len(test_faces):
        metrics.update(_test_metrics(model, task, test_faces, config, device))
    metrics.update({
        "train_seconds_this_session": round(train_seconds, 1),
        "train_seconds_total": round(sum(r["seconds"] for r in state.history), 1),
        "mean_epoch_seconds": round(sum(r["seconds"] for r in state.history) / max(1, len(state.history)), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, {device}",
    })
    write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    plot_multitask_history(state.history, task.tasks, run_dir / "curves.png", title=config["recipe"])
    return metrics


def _outputs(model, images: torch.Tensor, config: dict, device: torch.device) -> torch.Tensor:
    set_train_mode(model, False)
    to_input = Batcher(config["data"]["rescale"], device, config["train"]["channels_last"])
    precision = resolve_precision(config["train"]["precision"], device, model)
    return predict_logits(model, images, to_input, config["data"]["val_batch_size"], precision,
                          device, tta=config["train"]["tta"])


def _test_metrics(model, task: MultiTaskTask, test, config: dict, device) -> dict:
    outputs = _outputs(model, test.images, config, device)
    metrics = {f"test_{name}": value for name, value in measure(task, outputs, test.targets).items()}
    metrics["test_images"] = len(test)
    if "race" in task.tasks:
        metrics.update({f"test_{k}": v for k, v in race_report(outputs, test.targets).items()})
    shown = [k for k in ("test_age_mae", "test_gender_acc", "test_race_acc") if k in metrics]
    log.info("Test (%d faces never seen in training): %s.", len(test),
             ", ".join(f"{k[5:]} {metrics[k]:.4f}" for k in shown))
    if "race" in task.tasks:
        log.info("Race accuracy per class: %s.", ", ".join(
            f"{race} {acc:.3f}" for race, acc in metrics["test_race_acc_per_class"].items() if acc is not None))
    return metrics


def plot_multitask_history(history: list[dict], tasks: list[str], out: Path, title: str = "") -> Path:
    """Loss, accuracies and age MAE against epochs, training (dots) and validation (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convtricks.atomic import atomic_path

    panels = [("loss", ["loss"])]
    accuracies = [f"{t}_acc" for t in ("gender", "race") if t in tasks]
    if accuracies:
        panels.append(("accuracy", accuracies))
    if "age" in tasks:
        panels.append(("age MAE (years)", ["age_mae"]))
    epochs = [row["epoch"] for row in history]
    figure, axes_list = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axes, (label, metrics) in zip(axes_list[0], panels):
        for metric in metrics:
            line = axes.plot(*measured(history, metric), "o", markersize=3, label=f"Training {metric}")[0]
            axes.plot(*measured(history, f"val_{metric}"), "-", color=line.get_color(),
                      label=f"Validation {metric}")
        axes.set_xlabel("epoch")
        axes.set_title(f"Training and validation {label}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        stages = [row.get("stage") for row in history]
        for index in range(1, len(stages)):
            if stages[index] != stages[index - 1]:
                axes.axvline(epochs[index] - 0.5, linestyle=":", color="grey")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(Path(out)) as temp:
        figure.savefig(temp, format="png", dpi=100)
    plt.close(figure)
    return Path(out)


# ---------------------------------------------------------------------------------------------
# Using a finished run: evaluate on labelled faces, predict new ones.


@dataclass
class LoadedMultitask:
    config: dict
    model: torch.nn.Module
    task: MultiTaskTask
    device: torch.device


def load_multitask_run(run_dir: Path, weights: str = "final") -> LoadedMultitask:
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    _check_data_kind(config)
    file = {"final": "model.safetensors", "best": "best.safetensors"}.get(weights)
    if file is None:
        raise UserError(f"--weights must be final or best, got {weights}.")
    if not (run_dir / file).exists():
        if (run_dir / "checkpoint.pt").exists():
            raise UserError(f"{run_dir} did not finish; resume it with `convtricks train --resume {run_dir}`"
                            + (" or use --weights best." if (run_dir / "best.safetensors").exists() else "."))
        raise UserError(f"{run_dir} has no trained weights yet ({file}).")
    set_threads(config["train"]["threads"])
    device = pick_device("auto")  # as for classifiers: a run trained on a GPU predicts on a CPU
    model = build_multitask_model(config, pretrained=False)
    load_weights(run_dir / file, model)  # brings the age scale and learned loss weights back too
    model.to(device).eval()
    return LoadedMultitask(config, model, task_for_model(config, model), device)


def evaluate_multitask(run_dir: Path, data_dir: Path | None = None, weights: str = "final") -> dict:
    """Age MAE, gender and race accuracy (per race too) on labelled faces.

    With no `data_dir`, or the run's own UTKFace folder, only its test split is used (faces the
    model never saw); any other folder of UTKFace-named faces is evaluated whole, less the faces
    the run trained or validated on (by file name, from the run's seen_faces.txt).
    """
    run = load_multitask_run(run_dir, weights)
    data_cfg = run.config["data"]
    own = Path(data_cfg["dir"]) if data_cfg.get("dir") else None
    folder = Path(data_dir) if data_dir is not None else own
    if folder is None:
        raise UserError("This run does not record its data folder; pass --data.")
    if own is not None and folder.resolve() == own.resolve():
        faces = load_faces(folder, data_cfg["target_size"], data_cfg["split"], splits=("test",),
                           use_cache=data_cfg["cache"])["test"]
        which, left_out = "test split", 0
        if not len(faces):
            raise UserError(f"The test split of {folder} is empty (data.split {data_cfg['split']}).")
    else:
        index = index_faces(folder)
        paths, labels, which, left_out = index.paths, index.labels, "all faces", 0
        seen_file = Path(run_dir) / SEEN_FACES
        if seen_file.exists():
            seen = set(seen_file.read_text().split())
            unseen = [i for i, path in enumerate(paths) if path.name not in seen]
            if not unseen:
                raise UserError(f"Every face in {folder} was used to train or validate this run; "
                                "nothing in it is new to the model.")
            if len(unseen) < len(paths):
                which, left_out = "faces new to the run", len(paths) - len(unseen)
                paths, labels = [paths[i] for i in unseen], [labels[i] for i in unseen]
        faces = decode_faces(paths, labels, data_cfg["target_size"], use_cache=data_cfg["cache"])
        if not len(faces):
            raise UserError(f"No readable faces in {folder}.")
    outputs = _outputs(run.model, faces.images, run.config, run.device)
    result = {"images": len(faces), "data": str(folder), "which": which, "tasks": run.task.tasks}
    if left_out:
        result["left_out"] = left_out
    result.update(measure(run.task, outputs, faces.targets))
    if "race" in run.task.tasks:
        result.update(race_report(outputs, faces.targets))
        result["races"] = list(RACES)
    return result


def evaluation_text(result: dict) -> str:
    """What `evaluate` prints: one line of numbers, then race accuracy per class and confusion."""
    parts = [f"{result['images']} faces ({result['which']} of {result['data']})", f"loss {result['loss']:.4f}"]
    if result.get("left_out"):
        parts[0] += f"; {result['left_out']} faces the run trained or validated on were left out"
    for key, fmt in (("age_mae", "age MAE {:.2f} years"), ("gender_acc", "gender acc {:.4f}"),
                     ("race_acc", "race acc {:.4f}")):
        if key in result:
            parts.append(fmt.format(result[key]))
    lines = [", ".join(parts)]
    if "race_confusion" in result:
        corner = "true \\ predicted"
        first, width = len(corner) + 2, max(len(r) for r in RACES) + 2
        lines.append(corner.ljust(first) + "".join(r.rjust(width) for r in RACES) + "accuracy".rjust(width + 2))
        for race, row in zip(RACES, result["race_confusion"]):
            accuracy = result["race_acc_per_class"][race]
            lines.append(race.ljust(first) + "".join(str(v).rjust(width) for v in row)
                         + ("-" if accuracy is None else f"{accuracy:.3f}").rjust(width + 2))
    return "\n".join(lines)


def predict_faces(run_dir: Path, target: Path, weights: str = "final") -> list[dict]:
    """One row per face image (a file, or every image in a folder): the trained heads' predictions.

    Rows hold `file`, and per trained task: `age` (years), `gender` with `gender_probability`,
    `race` with `race_probability` and `race_scores` (all five, in RACES order).
    """
    from convtricks.data.dataset import load_image_set

    run = load_multitask_run(run_dir, weights)
    target = Path(target)
    size = tuple(run.config["data"]["target_size"])
    if target.is_file():
        try:
            images = torch.from_numpy(decode_image(target.read_bytes(), size)).unsqueeze(0)
        except Exception:
            raise UserError(f"{target} is not a readable image.") from None
        paths = [target]
    elif target.is_dir():
        image_set = load_image_set(target, size, use_cache=run.config["data"]["cache"], require_labels=False)
        images, paths = image_set.images, image_set.paths
    else:
        raise UserError(f"{target} does not exist.")
    outputs = _outputs(run.model, images, run.config, run.device)
    rows = []
    for path, output in zip(paths, outputs):
        row: dict = {"file": str(path)}
        if "age" in run.task.tasks:
            row["age"] = round(float(output[COLUMNS["age"]].squeeze().clamp(min=0)), 1)
        if "gender" in run.task.tasks:
            female = float(torch.sigmoid(output[COLUMNS["gender"]].squeeze()))
            row["gender"] = GENDERS[int(female > 0.5)]
            row["gender_probability"] = round(max(female, 1 - female), 4)
        if "race" in run.task.tasks:
            scores = torch.softmax(output[COLUMNS["race"]], 0)
            best = int(scores.argmax())
            row["race"] = RACES[best]
            row["race_probability"] = round(float(scores[best]), 4)
            row["race_scores"] = [round(float(s), 4) for s in scores]
        rows.append(row)
    return rows


def face_line(row: dict) -> str:
    """`photo.jpg  age 34.2  female (0.97)  Asian (0.88)`: one predicted face, as `predict` prints it."""
    parts = [row["file"]]
    if "age" in row:
        parts.append(f"age {row['age']:.1f}")
    if "gender" in row:
        parts.append(f"{row['gender']} ({row['gender_probability']:.2f})")
    if "race" in row:
        parts.append(f"{row['race']} ({row['race_probability']:.2f})")
    return "\t".join(parts)
