"""A run folder from start to finish: data, model, task, fit, final numbers, curves.

runs/<recipe>-<time>/ holds config.yaml (enough to rerun), history.csv/json, curves.png,
model.safetensors, best.safetensors, checkpoint.pt, metrics.json and log.txt.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import yaml

from convtricks import config as recipes
from convtricks.atomic import write_text
from convtricks.data.dataset import load_image_set
from convtricks.errors import UserError
from convtricks.models.registry import create_model
from convtricks.train import distributed
from convtricks.train.checkpoint import load_checkpoint, load_weights
from convtricks.train.features import predict_through_cache
from convtricks.train.fit import (Batcher, TrainingState, autocast_for, check_finetune_order, fit, measure,
                                  predict_logits, resolve_precision)
from convtricks.train.freezing import set_train_mode
from convtricks.train.tasks import BinaryTask, CategoricalTask

log = logging.getLogger("convtricks")


@dataclass
class LabelledTensors:
    images: torch.Tensor
    targets: torch.Tensor
    key: str  # content key, for feature caches


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but no CUDA GPU is available; use --device cpu.")
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    # Processes started together on one machine (torchrun) share its cores.
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // distributed.local_world()))


def new_run_dir(runs_dir: Path, recipe_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(runs_dir) / f"{recipe_name}-{stamp}"
    suffix = 1
    while run_dir.exists():  # never reuse (and so never overwrite) an earlier run's folder
        suffix += 1
        run_dir = Path(runs_dir) / f"{recipe_name}-{stamp}-{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir


def task_for(config: dict, classes: list[str]):
    mode = config["data"]["class_mode"]
    smoothing = config["train"]["label_smoothing"]
    if mode == "binary":
        if len(classes) != 2:
            raise UserError(f"class_mode binary needs exactly two classes, found {len(classes)} "
                            f"({', '.join(classes)}); use --class_mode categorical.")
        return BinaryTask(smoothing), 1
    if mode == "categorical":
        return CategoricalTask(smoothing), len(classes)
    raise UserError(f"class_mode must be binary or categorical, got {mode}.")


def build_model(config: dict, num_outputs: int) -> torch.nn.Module:
    options = dict(config["model"])
    name = options.pop("name")
    options.setdefault("input_size", list(config["data"]["target_size"]))
    options.setdefault("num_outputs", num_outputs)
    return create_model(name, **options)


def load_split(data_dir: Path, split: str, config: dict, classes: list[str] | None = None,
               required: bool = True, size: list[int] | None = None):
    folder = Path(data_dir) / split
    if not folder.exists():
        if required:
            raise UserError(f"{folder} does not exist; `convtricks prepare --out {data_dir}` builds the "
                            "train/validation/test folders.")
        return None
    image_set = load_image_set(folder, size or config["data"]["target_size"], use_cache=config["data"]["cache"])
    if classes is not None and image_set.classes != classes:
        raise UserError(f"{folder} has classes {image_set.classes}, but the model was trained on {classes}.")
    return image_set


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start(config: dict, data_dir: Path, runs_dir: Path) -> Path:
    """Create a run folder with its resolved recipe; `train_run` then trains it."""
    config = dict(config)
    config["data"] = {**config["data"], "dir": str(Path(data_dir).resolve())}
    run_dir = new_run_dir(runs_dir, config["recipe"])
    write_text(run_dir / "config.yaml", recipes.dump(config))
    return run_dir


def read_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise UserError(f"{run_dir} is not a run folder (it has no config.yaml).")
    loaded = yaml.safe_load(path.read_text())
    data_dir = loaded.get("data", {}).pop("dir", None)
    config = recipes.resolve(loaded)
    config["data"]["dir"] = data_dir
    return config


def ready_to_fit(run_dir: Path, config: dict, model: torch.nn.Module, resume: bool):
    """What every runner does before `fit`: memory format, stages, the checkpoint to continue from
    (or the check that the first stage may train what it unfreezes), and the augmentation."""
    if config["train"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # `auto` precision becomes bf16 or fp32 for this model on this device; the run's config.yaml
    # keeps `auto`, so a resume on other hardware decides again.
    device = next(model.parameters()).device
    config["train"]["precision"] = resolve_precision(config["train"]["precision"], device, model)
    stages = recipes.stage_plan(config)
    for stage in stages:
        stage["precision"] = resolve_precision(stage["precision"], device, model)
    state = TrainingState()
    if resume:
        saved = distributed.from_main(lambda: load_checkpoint(run_dir / "checkpoint.pt"))  # DDP: read once, sent to all
        model.load_state_dict(saved["model"])
        state = TrainingState(epoch=saved["epoch"], history=saved["history"], best=saved["best"],
                              optimizer=saved["optimizer"], stage=saved["stage"], ema=saved.get("ema"))
        log.info("Resuming %s after epoch %d.", run_dir.name, state.epoch)
    else:
        check_finetune_order(model, stages)
    augment_config = None
    if config["augment"]:
        from convtricks.data.augment import AugmentConfig

        augment_config = AugmentConfig.from_dict(config["augment"])
    return model, stages, state, augment_config


def train_run(run_dir: Path, resume: bool = False) -> dict:
    """Train (or continue) the run in `run_dir`; returns its metrics."""
    run_dir = Path(run_dir)
    config = distributed.from_main(lambda: read_config(run_dir))  # DDP: only the main process reads the folder
    distributed.check_batch_size(config["data"]["batch_size"])
    train_cfg = config["train"]
    set_threads(train_cfg["threads"])
    device = pick_device(train_cfg["device"])
    data_dir = Path(config["data"]["dir"])
    loading = time.perf_counter()
    train_images = load_split(data_dir, "train", config, size=config["data"]["train_decode_size"])
    val_images = load_split(data_dir, "validation", config, train_images.classes)
    log.info("Found %d training images and %d validation images in %d classes (%s); decoded in %.1f s.",
             len(train_images), len(val_images), len(train_images.classes), ", ".join(train_images.classes),
             time.perf_counter() - loading)
    task, num_outputs = task_for(config, train_images.classes)
    if distributed.is_main():
        write_text(run_dir / "classes.json", json.dumps(train_images.classes))

    torch.manual_seed(train_cfg["seed"])  # the initial weights follow from the seed
    model = build_model(config, num_outputs).to(device)
    model, stages, state, augment_config = ready_to_fit(run_dir, config, model, resume)

    settings = {
        "device": device, "seed": train_cfg["seed"], "rescale": config["data"]["rescale"],
        "channels_last": train_cfg["channels_last"], "batch_size": config["data"]["batch_size"],
        "val_batch_size": config["data"]["val_batch_size"], "validation_steps": train_cfg["validation_steps"],
        "cache": config["data"]["cache"], "target_size": config["data"]["target_size"],
    }
    train_set = LabelledTensors(train_images.images, train_images.labels, train_images.cache_key)
    if config["data"]["subset"]:
        # Trick 4, bagging: this ensemble member trains on its own sample of the training images.
        from convtricks.train.ensemble import training_subset

        settings["train_subset"] = training_subset(train_set.targets, config["data"]["subset"])
    val_set = LabelledTensors(val_images.images, val_images.labels, val_images.cache_key)
    started = time.perf_counter()
    state = fit(model, task, train_set, val_set, stages, settings, run_dir, state, augment_config)
    train_seconds = time.perf_counter() - started
    if not distributed.is_main():
        return {}  # DDP: the main process judges the result and writes it
    load_weights(run_dir / "model.safetensors", model)  # judge exactly what was saved (EMA, if on)

    metrics = final_metrics(config, model, task, state, data_dir, train_images.classes, settings)
    metrics.update({
        "train_seconds_this_session": round(train_seconds, 1),
        "mean_epoch_seconds": round(sum(r["seconds"] for r in state.history) / max(1, len(state.history)), 2),
        "train_images_per_s": _median([r["train_images_per_s"] for r in state.history]),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, {device}",
    })
    write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    from convtricks.report.curves import plot_history

    plot_history(state.history, run_dir / "curves.png", title=config["recipe"])
    return metrics


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else None


def predictions(model, image_set, to_input, batch_size: int, config: dict) -> torch.Tensor:
    """Logits for an ImageSet; a model with a conv base reuses its cached output on these images."""
    train = config["train"]
    with autocast_for(to_input.device, train["precision"]):
        logits = predict_through_cache(model, image_set.images, to_input, batch_size, image_set.cache_key,
                                       tta=train["tta"], use_cache=config["data"]["cache"])
    if logits is None:
        logits = predict_logits(model, image_set.images, to_input, batch_size, train["precision"], to_input.device,
                                tta=train["tta"])
    return logits


def final_metrics(config, model, task, state, data_dir, classes, settings) -> dict:
    """Last epoch's numbers, plus the test split's (images the model never saw) when present."""
    last = state.history[-1] if state.history else {}
    metrics = {"recipe": config["recipe"], "classes": classes, "epochs": state.epoch}
    metrics.update({key: last[key] for key in last if key not in ("epoch", "stage", "lr", "seconds")})
    metrics["best_val"] = state.best
    test_images = load_split(data_dir, "test", config, classes, required=False)
    if test_images is not None:
        set_train_mode(model, False)
        to_input = Batcher(settings["rescale"], settings["device"], settings["channels_last"])
        logits = predictions(model, test_images, to_input, settings["val_batch_size"], config)
        for name, value in measure(task, logits, test_images.labels).items():
            metrics[f"test_{name}"] = value
        metrics["test_images"] = len(test_images)
        log.info("Test (%d images never seen in training): %s.", len(test_images),
                 ", ".join(f"{k[5:]} {metrics[k]:.4f}" for k in metrics if k.startswith("test_") and k != "test_images"))
    return metrics
