"""Recipes: the lecture's experiments as small YAML files, with defaults, overrides and checks.

A recipe has five sections. `model` and `augment` are passed on to the model factory and the
augmentation config, which validate their own keys; `data` and `train` are checked here, so a
typo (`--epoch 5`) is one clear error instead of a silently ignored key. `stages` is a list of
partial `train` sections run one after another (the lecture's freeze, then fine-tune).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import yaml

from convtricks.errors import UserError

DEFAULTS: dict = {
    "recipe": "custom",
    "description": "",
    "model": {"name": "small-cnn"},
    "data": {
        "target_size": [150, 150],
        # Training images decoded larger (null: at target_size) keep detail through the
        # augmentation's resampling; each batch is then downscaled, antialiased, as the
        # validation and test images were decoded (train/run.py).
        "train_decode_size": None,
        "rescale": 1 / 255,
        "batch_size": 20,
        "val_batch_size": 100,
        "class_mode": "binary",
        "cache": True,
        "kind": "folders",  # folders (class folders / Kaggle flat) | utkface (labels in file names)
        "split": [0.7, 0.15, 0.15],  # utkface: train/validation/test fractions, by file-name hash
        "subset": None,  # trick 4, bagging: {kind: bootstrap|disjoint, member, members, seed} (train/ensemble.py)
    },
    "augment": {},
    "train": {
        "epochs": 30,
        "steps_per_epoch": None,  # None: one pass over the training images
        "validation_steps": None,  # None: the whole validation set
        "validation_freq": 1,  # validate every n-th epoch (and always a stage's last)
        "optimizer": "rmsprop",
        "lr": 1e-4,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "schedule": "constant",  # constant | cosine | onecycle
        "label_smoothing": 0.0,
        "trainable": ["*"],
        "augment": True,  # a stage may switch the recipe's augmentation off
        "seed": 0,
        "precision": "auto",  # auto (bf16 autocast where the device has bf16 units, else fp32) | fp32 | bf16
        "channels_last": True,
        "compile": False,
        "threads": None,  # None: one per core
        "device": "auto",  # auto | cpu | cuda
        "grad_norms": False,
        "feature_cache": True,  # frozen base, no augmentation: train the top on cached features
        "bn_eval": False,  # keep every BatchNorm on its running statistics (fine-tuning on small data)
        "force_finetune": False,  # allow unfreezing a pretrained base under a random top
        "ema": 0.0,  # decay of an exponential moving average of the weights; 0 = off
        "tta": False,  # evaluate on the image and its horizontal mirror, averaged
        "mixup": 0.0,  # alpha of mixup's Beta(alpha, alpha) blend share; 0 = off (train/mixing.py)
        "cutmix": 0.0,  # alpha of CutMix's patch share; 0 = off; with mixup too, each batch picks one
        "progressive_start": 0,  # pixels (shorter side) of the first epoch's images; 0 = off
        "progressive_until": 0.75,  # fraction of the stage after which images are full size
    },
    "stages": [],
    # Trick 5: which heads to train and how their losses combine (Loss1 + λ·Loss2 + γ·Loss3).
    "multitask": {
        "tasks": ["age", "gender", "race"],
        "weights": {"age": 1.0, "gender": 1.0, "race": 1.0},
        "weighting": "fixed",  # fixed | uncertainty (learned, Kendall et al. 2018)
    },
    # `convtricks sweep` only (`train` ignores them): named variants of this recipe, each a few
    # keys changed ({name: {dotted.key: value}}), and validation accuracies to time the race to.
    "variants": {},
    "sweep_targets": [],
}

STAGE_KEYS = set(DEFAULTS["train"]) | {"name"}
SECTIONS = ("data", "train", "multitask")


def recipe_names() -> list[str]:
    folder = resources.files("convtricks") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict:
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise UserError(f"Recipe {origin} is not valid YAML ({str(error).splitlines()[0]}).") from None
    if not isinstance(loaded, dict):
        raise UserError(f"Recipe {origin} must be a mapping of sections (model, data, train...).")
    return loaded


def read_recipe(name_or_path: str) -> dict:
    """A shipped recipe by name (`baseline`) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"Recipe file {path} does not exist.")
        return _read_yaml(path.read_text(), str(path))
    shipped = resources.files("convtricks") / "recipes" / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise UserError(f"Unknown recipe '{name_or_path}'; shipped recipes: {', '.join(recipe_names())}.")
    return _read_yaml(shipped.read_text(), name_or_path)


def _merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in ("model", "augment"):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve(recipe: dict) -> dict:
    """Defaults + recipe, then validated: the fully resolved recipe a run writes to config.yaml."""
    unknown = set(recipe) - set(DEFAULTS)
    if unknown:
        raise UserError(f"Unknown recipe section(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}.")
    for section in SECTIONS:
        given = recipe.get(section) or {}
        if not isinstance(given, dict):
            raise UserError(f"Recipe section '{section}' must be a mapping.")
        bad = set(given) - set(DEFAULTS[section])
        if bad:
            raise UserError(f"Unknown key(s) {', '.join(sorted(bad))} in '{section}'; known: {', '.join(DEFAULTS[section])}.")
    config = _merge(DEFAULTS, recipe)
    if not isinstance(config["model"], dict) or "name" not in config["model"]:
        raise UserError("Recipe section 'model' must give at least a model name.")
    for index, stage in enumerate(config["stages"] or []):
        if not isinstance(stage, dict):
            raise UserError(f"Stage {index + 1} must be a mapping of train keys.")
        bad = set(stage) - STAGE_KEYS
        if bad:
            raise UserError(f"Unknown key(s) {', '.join(sorted(bad))} in stage {index + 1}; stages take train keys.")
    _check_values(config)
    _check_sweep_keys(config)
    return config


def _check_sweep_keys(config: dict) -> None:
    config["variants"] = config["variants"] or {}
    config["sweep_targets"] = config["sweep_targets"] or []
    if not isinstance(config["variants"], dict):
        raise UserError("Recipe key 'variants' must map variant names to {key: value} overrides.")
    targets = config["sweep_targets"]
    if not (isinstance(targets, list) and all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                              and 0 < t <= 1 for t in targets)):
        raise UserError(f"sweep_targets must be a list of accuracies between 0 and 1, got {targets}.")


def _check_values(config: dict) -> None:
    data, train = config["data"], config["train"]
    size = data["target_size"]
    if isinstance(size, int):
        data["target_size"] = size = [size, size]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v >= 16 for v in size)):
        raise UserError(f"target_size must be [height, width] of at least 16 pixels, got {size}.")
    decode = data["train_decode_size"]
    if isinstance(decode, int) and not isinstance(decode, bool):
        data["train_decode_size"] = decode = [decode, decode]
    if decode is not None and not (isinstance(decode, list) and len(decode) == 2
                                   and all(isinstance(v, int) and not isinstance(v, bool) for v in decode)
                                   and decode[0] >= size[0] and decode[1] >= size[1]):
        raise UserError(f"train_decode_size must be [height, width] no smaller than target_size {size}, "
                        f"or null; got {decode}.")
    if decode is not None and data["kind"] != "folders":
        raise UserError("train_decode_size works with class folders (data.kind: folders); the face tasks decode "
                        "every image at target_size.")
    for key in ("batch_size", "val_batch_size"):
        if not (isinstance(data[key], int) and data[key] >= 1):
            raise UserError(f"{key} must be a positive integer, got {data[key]}.")
    stages = config["stages"] or [{}]
    for stage in stages:
        merged = {**train, **stage}
        if not (isinstance(merged["epochs"], int) and merged["epochs"] >= 0):
            raise UserError(f"epochs must be a non-negative integer, got {merged['epochs']}.")
        if not (isinstance(merged["lr"], (int, float)) and merged["lr"] > 0):
            raise UserError(f"lr must be a positive number, got {merged['lr']}.")
        steps = merged["steps_per_epoch"]
        if steps is not None and not (isinstance(steps, int) and steps >= 1):
            raise UserError(f"steps_per_epoch must be a positive integer or null, got {steps}.")
        if merged["precision"] not in ("auto", "fp32", "bf16"):
            raise UserError(f"precision must be auto, fp32 or bf16, got {merged['precision']}.")
        if merged["optimizer"] not in ("rmsprop", "adam", "adamw", "sgd", "nesterov"):
            raise UserError(f"optimizer must be one of rmsprop, adam, adamw, sgd, nesterov; got {merged['optimizer']}.")
        if merged["schedule"] not in ("constant", "cosine", "onecycle"):
            raise UserError(f"schedule must be constant, cosine or onecycle, got {merged['schedule']}.")
        for key in ("mixup", "cutmix"):
            if not (isinstance(merged[key], (int, float)) and not isinstance(merged[key], bool) and merged[key] >= 0):
                raise UserError(f"{key} must be a non-negative number (the Beta distribution's alpha; 0 is off), "
                                f"got {merged[key]}.")
        freq = merged["validation_freq"]
        if not (isinstance(freq, int) and not isinstance(freq, bool) and freq >= 1):
            raise UserError(f"validation_freq must be a positive whole number of epochs, got {freq}.")
        start, until = merged["progressive_start"], merged["progressive_until"]
        if not (isinstance(start, int) and not isinstance(start, bool) and (start == 0 or start >= 16)):
            raise UserError(f"progressive_start must be 0 (off) or a size of at least 16 pixels, got {start}.")
        if not (isinstance(until, (int, float)) and 0 < until <= 1):
            raise UserError(f"progressive_until must be a fraction of the stage in (0, 1], got {until}.")
        if start and config["model"].get("name") == "small-cnn":
            raise UserError("progressive_start needs a model that ends in global pooling (deep-cnn or a pretrained "
                            "base); small-cnn's dense layer fixes its input size.")


def parse_value(text: str):
    """Command-line text -> int, float, bool, null, list, mapping or string ('3e-4' is a float)."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if "," in text and not text.startswith(("[", "{")):
        return [parse_value(part.strip()) for part in text.split(",")]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _leaf_paths(config: dict) -> dict[str, list[tuple[str, str]]]:
    """Short name -> [(section, key)] for every overridable key."""
    paths: dict[str, list[tuple[str, str]]] = {}
    for section in ("data", "train", "model", "augment", "multitask"):
        for key in config.get(section) or {}:
            paths.setdefault(key, []).append((section, key))
    return paths


def apply_overrides(recipe: dict, overrides: list[tuple[str, str]], unknown_to: str | None = None) -> dict:
    """Apply `--key value` pairs: `--epochs 5`, `--train.lr 3e-4`, `--model.dropout 0.5`.

    A short key must name exactly one key of the resolved recipe; the model and augment
    sections also accept new keys when written with their section (`--augment.zoom_range 0.2`),
    and `unknown_to` names a section that takes any short key no other section has.
    """
    config = copy.deepcopy(recipe)
    resolved = resolve(recipe)
    known = _leaf_paths(resolved)
    for raw_key, raw_value in overrides:
        key = raw_key.replace("-", "_")
        # Recipe files (a sweep's variants) hand over values already typed by YAML.
        value = parse_value(raw_value) if isinstance(raw_value, str) else raw_value
        if "." in key:
            section, leaf = key.split(".", 1)
            if section not in ("data", "train", "model", "augment", "multitask"):
                raise UserError(f"Unknown recipe section '{section}' in --{raw_key}.")
        else:
            places = known.get(key, [])
            if not places and unknown_to:
                places = [(unknown_to, key)]  # e.g. a model option when summarising a bare model
            if not places:
                raise UserError(f"--{raw_key} is not a key of this recipe; see `convtricks show-recipe` for the keys.")
            if len(places) > 1:
                options = " or ".join(f"--{s}.{k}" for s, k in places)
                raise UserError(f"--{raw_key} is ambiguous; write {options}.")
            section, leaf = places[0]
        config.setdefault(section, {})
        if config[section] is None:
            config[section] = {}
        config[section][leaf] = value
        if section == "train":
            # A command-line value wins over the recipe's per-stage values too: every stage gets it.
            for stage in config.get("stages") or []:
                stage.pop(leaf, None)
    return resolve(config)


def stage_plan(config: dict) -> list[dict]:
    """Each stage as a full train section (train defaults + the stage's own keys)."""
    stages = config["stages"] or [{"name": "train"}]
    plan = []
    for index, stage in enumerate(stages):
        merged = {**config["train"], **stage}
        merged.setdefault("name", f"stage{index + 1}")
        if isinstance(merged["trainable"], str):
            merged["trainable"] = [merged["trainable"]]
        plan.append(merged)
    return plan


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
