"""Use a finished run: load its model, evaluate it on labelled images, predict new ones."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from convtricks.atomic import write_text
from convtricks.data.dataset import load_image_set
from convtricks.data.decode import decode_image
from convtricks.errors import UserError
from convtricks.train.checkpoint import load_weights
from convtricks.train.fit import Batcher, measure, predict_logits, resolve_precision
from convtricks.train.run import build_model, pick_device, predictions, read_config, set_threads, task_for


@dataclass
class LoadedRun:
    config: dict
    model: torch.nn.Module
    task: object
    classes: list[str]
    batcher: Batcher
    device: torch.device


def load_run(run_dir: Path, weights: str = "final", tta: bool | None = None) -> LoadedRun:
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if tta is not None:
        config["train"]["tta"] = tta  # test-time augmentation can be asked for after training
    classes_file = run_dir / "classes.json"
    if not classes_file.exists():
        raise UserError(f"{run_dir} has not finished its first epoch yet (no classes.json); nothing to load.")
    classes = json.loads(classes_file.read_text())
    set_threads(config["train"]["threads"])
    # Where a run was trained does not bind where it predicts: a GPU-trained run works on a laptop.
    device = pick_device("auto")
    task, num_outputs = task_for(config, classes)
    if "pretrained" in config["model"]:
        # The run's own weights replace the pretrained ones: do not ask for the original file.
        config["model"] = {**config["model"], "pretrained": "none"}
    model = build_model(config, num_outputs)
    file = {"final": "model.safetensors", "best": "best.safetensors"}.get(weights)
    if file is None:
        raise UserError(f"--weights must be final or best, got {weights}.")
    if not (run_dir / file).exists() and weights == "final" and (run_dir / "checkpoint.pt").exists():
        raise UserError(f"{run_dir} did not finish; resume it with `convtricks train --resume {run_dir}` "
                        "or use --weights best.")
    load_weights(run_dir / file, model)
    model.to(device).eval()
    config["train"]["precision"] = resolve_precision(config["train"]["precision"], device, model)
    batcher = Batcher(config["data"]["rescale"], device, config["train"]["channels_last"])
    return LoadedRun(config, model, task, classes, batcher, device)


def _logits(run: LoadedRun, images: torch.Tensor) -> torch.Tensor:
    return predict_logits(run.model, images, run.batcher, run.config["data"]["val_batch_size"],
                          run.config["train"]["precision"], run.device, tta=run.config["train"]["tta"])


def _set_logits(run: LoadedRun, image_set) -> torch.Tensor:
    return predictions(run.model, image_set, run.batcher, run.config["data"]["val_batch_size"], run.config)


def evaluate(run: LoadedRun, data_dir: Path) -> dict:
    """Loss, accuracy and confusion matrix (rows: true class, columns: predicted)."""
    data_dir = Path(data_dir)
    image_set = load_image_set(data_dir, run.config["data"]["target_size"], use_cache=run.config["data"]["cache"])
    if image_set.classes != run.classes:
        raise UserError(f"{data_dir} has classes {image_set.classes}, but the model was trained on {run.classes}.")
    logits = _set_logits(run, image_set)
    metrics = measure(run.task, logits, image_set.labels)
    probabilities = run.task.probabilities(logits)
    predicted = (probabilities > 0.5).long() if probabilities.dim() == 1 else probabilities.argmax(1)
    size = len(run.classes)
    confusion = torch.zeros(size, size, dtype=torch.long)
    for truth, guess in zip(image_set.labels.tolist(), predicted.tolist()):
        confusion[truth, guess] += 1
    return {"images": len(image_set), **metrics, "confusion": confusion.tolist(), "classes": run.classes}


def confusion_text(result: dict) -> str:
    classes = result["classes"]
    width = max(len(c) for c in classes + ["true \\ predicted"]) + 2
    lines = ["true \\ predicted".ljust(width) + "".join(c.rjust(width) for c in classes)]
    for name, row in zip(classes, result["confusion"]):
        lines.append(name.ljust(width) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def predict(run: LoadedRun, target: Path) -> list[dict]:
    """One row per image: file, predicted label, probability of that label, and per-class scores."""
    target = Path(target)
    size = run.config["data"]["target_size"]
    if target.is_file():
        try:
            images = torch.from_numpy(decode_image(target.read_bytes(), tuple(size))).unsqueeze(0)
        except Exception:
            raise UserError(f"{target} is not a readable image.") from None
        paths = [target]
    elif target.is_dir():
        image_set = load_image_set(target, size, use_cache=run.config["data"]["cache"], require_labels=False)
        paths = image_set.paths
    else:
        raise UserError(f"{target} does not exist.")
    logits = _set_logits(run, image_set) if target.is_dir() else _logits(run, images)
    probabilities = run.task.probabilities(logits)
    rows = []
    for path, p in zip(paths, probabilities):
        if p.dim() == 0:  # binary: p is the probability of the second class
            scores = [1 - float(p), float(p)]
        else:
            scores = [float(v) for v in p]
        best = max(range(len(scores)), key=scores.__getitem__)
        rows.append({"file": str(path), "label": run.classes[best], "probability": scores[best], "scores": scores})
    return rows


def write_kaggle_csv(rows: list[dict], out: Path) -> None:
    """Kaggle's submission format: id,label with label = probability of the second class (dog)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label"])
    def sort_key(row):
        stem = Path(row["file"]).stem
        return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)
    for row in sorted(rows, key=sort_key):
        writer.writerow([Path(row["file"]).stem, f"{row['scores'][-1]:.6f}"])
    write_text(Path(out), buffer.getvalue())
