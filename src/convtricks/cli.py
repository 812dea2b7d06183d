"""The `convtricks` command: parse, call one function, print."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from convtricks.errors import UserError
from convtricks.logs import LOGGER as log
from convtricks.logs import log_to_file, setup_console

DEFAULT_DATA = Path("data/cats_and_dogs_small")


def _overrides(extra: list[str]) -> list[tuple[str, str]]:
    """`--epochs 5 --lr=3e-4` -> [("epochs", "5"), ("lr", "3e-4")]."""
    pairs, index = [], 0
    while index < len(extra):
        token = extra[index]
        if not token.startswith("--") or len(token) < 3:
            raise UserError(f"Unexpected argument '{token}'; recipe keys are given as --key value.")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            index += 1
        elif index + 1 < len(extra) and not extra[index + 1].startswith("--"):
            key, value = token[2:], extra[index + 1]
            index += 2
        else:
            key, value = token[2:], "true"  # a bare flag: --horizontal_flip
            index += 1
        pairs.append((key, value))
    return pairs


def cmd_prepare(args, extra) -> int:
    from convtricks.data.prepare import default_source, prepare_split

    source = args.source or default_source()
    if source is None:
        raise UserError("No --source given and the default data (../shared/data/dogs-vs-cats/train) is absent; "
                        "pass --source with Kaggle's train folder or train.zip.")
    summary = prepare_split(Path(source), Path(args.out), counts=(args.train, args.validation, args.test),
                            seed=args.seed, force=args.force, log=log.info)
    log.info("Split ready in %s%s.", args.out, "" if summary.changed else " (already up to date, nothing changed)")
    return 0


def cmd_recipes(args, extra) -> int:
    from convtricks import config as recipes

    for name in recipes.recipe_names():
        description = " ".join(str(recipes.read_recipe(name).get("description", "")).split())
        log.info("%-20s %s", name, description)
    return 0


def _resolved_recipe(name: str, extra: list[str]) -> dict:
    from convtricks import config as recipes

    return recipes.apply_overrides(recipes.read_recipe(name), _overrides(extra))


def cmd_show_recipe(args, extra) -> int:
    from convtricks import config as recipes

    print(recipes.dump(_resolved_recipe(args.recipe, extra)), end="")
    return 0


def cmd_summary(args, extra) -> int:
    from convtricks import config as recipes
    from convtricks.models.registry import model_names
    from convtricks.report.summary import summary_text
    from convtricks.train.freezing import freeze_except
    from convtricks.train.run import build_model

    if args.model not in model_names() and args.model not in recipes.recipe_names() and not Path(args.model).exists():
        raise UserError(f"Unknown model or recipe '{args.model}'; models: {', '.join(model_names())}; "
                        f"recipes: {', '.join(recipes.recipe_names())}.")
    if args.model in model_names():
        config = recipes.apply_overrides({"model": {"name": args.model}}, _overrides(extra), unknown_to="model")
        if "input_size" in config["model"]:
            config["data"]["target_size"] = list(config["model"]["input_size"])
    else:
        config = _resolved_recipe(args.model, extra)
    model = build_model(config, num_outputs=1)
    stages = recipes.stage_plan(config)
    stage = stages[min(max(args.stage, 1), len(stages)) - 1]
    freeze_except(model, stage["trainable"])
    title = config["model"]["name"] + (f", stage '{stage['name']}'" if len(stages) > 1 else "")
    print(summary_text(model, config["data"]["target_size"], depth=args.depth, title=title))
    return 0


def _is_multitask(run_dir: Path) -> bool:
    from convtricks.train.run import read_config

    return read_config(run_dir)["data"]["kind"] == "utkface"


def _trainer_for(run_dir: Path):
    """Class-folder runs train with train_run; face runs (several heads) with their own runner."""
    from convtricks.train import distributed

    if distributed.from_main(lambda: _is_multitask(run_dir)):  # DDP: only the main process reads the folder
        from convtricks.train.multitask import train_multitask_run

        return train_multitask_run
    from convtricks.train.run import train_run

    return train_run


def cmd_train(args, extra) -> int:
    from convtricks import config as recipes
    from convtricks.train import distributed
    from convtricks.train.run import start

    if args.resume:
        if args.recipe or extra:
            raise UserError("--resume continues a run exactly as it was configured; give no recipe or overrides.")
        run_dir = Path(args.resume)
        if distributed.is_main() and not (run_dir / "config.yaml").exists():  # DDP: the folder is the main's
            raise UserError(f"{run_dir} is not a run folder (it has no config.yaml).")
    else:
        if not args.recipe:
            raise UserError(f"Name a recipe to train (one of: {', '.join(recipes.recipe_names())}) or --resume RUN.")
        config = _resolved_recipe(args.recipe, extra)
        data_dir = Path(args.data) if args.data else DEFAULT_DATA
        if not data_dir.is_dir():
            raise UserError(f"Data folder {data_dir} does not exist; build it with `convtricks prepare --out {data_dir}`.")
        distributed.check_batch_size(config["data"]["batch_size"])  # DDP: before any process waits on another
    with distributed.session():  # under torchrun: join the other processes (nothing otherwise)
        if not args.resume:  # DDP: only the main process creates the run folder; the others learn its path
            run_dir = distributed.from_main(lambda: start(config, data_dir, Path(args.runs)))
        return _train_in(run_dir, bool(args.resume))


def _train_in(run_dir: Path, resume: bool) -> int:
    from convtricks.train import distributed

    handler = log_to_file(run_dir / "log.txt") if distributed.is_main() else None
    try:
        log.info("Run folder: %s", run_dir)
        metrics = _trainer_for(run_dir)(run_dir, resume=resume)
    except KeyboardInterrupt:
        log.info("Interrupted. The last finished epoch is saved; continue with: convtricks train --resume %s", run_dir)
        return 130
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
    keys = ("loss", "acc", "val_loss", "val_acc", "test_loss", "test_acc")
    shown = {k: metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))}
    log.info("Done: %s. Run folder: %s", ", ".join(f"{k} {v:.4f}" for k, v in shown.items()), run_dir)
    return 0


def cmd_evaluate(args, extra) -> int:
    from convtricks.inference import confusion_text, evaluate, load_run
    from convtricks.train import ensemble

    if ensemble.is_ensemble(Path(args.run)):
        return ensemble.evaluate_command(Path(args.run), args.data, args.weights, args.json)
    if _is_multitask(Path(args.run)):
        from convtricks.train.multitask import evaluate_multitask, evaluation_text

        result = evaluate_multitask(Path(args.run), Path(args.data) if args.data else None, args.weights)
        log.info(evaluation_text(result))
        if args.json:
            print(json.dumps(result))
        return 0
    run = load_run(Path(args.run), args.weights, tta=args.tta)
    data_dir = Path(args.data) if args.data else Path(run.config["data"]["dir"]) / "test"
    if (data_dir / "test").is_dir() and (data_dir / "train").is_dir():
        data_dir = data_dir / "test"  # a whole split was given: judge on its test images
    result = evaluate(run, data_dir)
    log.info("%d images in %s: loss %.4f, acc %.4f", result["images"], data_dir, result["loss"], result["acc"])
    log.info(confusion_text(result))
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_predict(args, extra) -> int:
    from convtricks.inference import load_run, predict, write_kaggle_csv
    from convtricks.train import ensemble

    if ensemble.is_ensemble(Path(args.run)):
        return ensemble.predict_command(Path(args.run), args.target, args.weights, args.csv)
    if _is_multitask(Path(args.run)):
        from convtricks.train.multitask import face_line, predict_faces

        for row in predict_faces(Path(args.run), Path(args.target), args.weights):
            log.info(face_line(row))
        return 0
    run = load_run(Path(args.run), args.weights)
    rows = predict(run, Path(args.target))
    for row in rows:
        log.info("%s\t%s\t%.4f", row["file"], row["label"], row["probability"])
    if args.csv:
        write_kaggle_csv(rows, Path(args.csv))
        log.info("Wrote %d predictions to %s (id,label = probability of %s).", len(rows), args.csv, run.classes[-1])
    return 0


def cmd_ensemble(args, extra) -> int:
    from convtricks.train import ensemble

    if args.resume:
        if args.recipe or extra or args.vary:
            raise UserError("--resume continues an ensemble exactly as it was planned; give no recipe, --vary or overrides.")
        return ensemble.run_ensemble(resume=Path(args.resume), parallel=args.parallel)
    if not args.recipe or not args.vary:
        raise UserError("Name a recipe and --vary data|seed|model|optimizer (or --resume ENSEMBLE).")
    return ensemble.run_ensemble(
        _resolved_recipe(args.recipe, extra), Path(args.data) if args.data else DEFAULT_DATA, Path(args.runs),
        vary=args.vary, members=args.members, disjoint=args.disjoint, parallel=args.parallel,
        models=ensemble.parse_names(args.models) if args.models is not None else None,
        optimizers=ensemble.parse_optimizers(args.optimizers) if args.optimizers is not None else None,
        out=Path(args.out) if args.out else None)


def cmd_augment_preview(args, extra) -> int:
    import torch

    from convtricks.data.augment import AugmentConfig
    from convtricks.data.dataset import load_image_set
    from convtricks.data.decode import decode_image
    from convtricks.report.preview import render_preview

    config = _resolved_recipe(args.recipe, extra)
    size = tuple(config["data"]["target_size"])
    if args.image:
        path = Path(args.image)
        if not path.is_file():
            raise UserError(f"{path} does not exist.")
        try:
            image = torch.from_numpy(decode_image(path.read_bytes(), size))
        except Exception:
            raise UserError(f"{path} is not a readable image.") from None
    else:
        data_dir = Path(args.data) if args.data else DEFAULT_DATA / "train"
        image_set = load_image_set(data_dir, size, require_labels=False)
        image = image_set.images[0]
    augment = AugmentConfig.from_dict(config["augment"])
    out = render_preview(image.float() / 255, augment, args.n, Path(args.out), args.seed)
    log.info("Wrote %d augmented variants to %s.", args.n, out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convtricks", description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="build the lecture's train/validation/test split")
    p.add_argument("--source", help="Kaggle's flat train folder, its train.zip, or a folder of class folders")
    p.add_argument("--out", default=str(DEFAULT_DATA))
    p.add_argument("--train", type=int, default=1000, help="images per class")
    p.add_argument("--validation", type=int, default=500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--seed", type=int, default=None, help="pick images at random (seeded) instead of by number")
    p.add_argument("--force", action="store_true", help="replace a different split already in --out")
    p.set_defaults(handler=cmd_prepare)

    p = commands.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(handler=cmd_recipes)

    p = commands.add_parser("show-recipe", help="print a recipe fully resolved (with any --key value)")
    p.add_argument("recipe")
    p.set_defaults(handler=cmd_show_recipe)

    p = commands.add_parser("summary", help="Keras-style table of a model or a recipe's model")
    p.add_argument("model", help="a model name (small-cnn, vgg16...) or a recipe")
    p.add_argument("--stage", type=int, default=1, help="whose trainable layers to count (1-based)")
    p.add_argument("--depth", type=int, default=3, help="how deep into nested layers to list")
    p.set_defaults(handler=cmd_summary)

    p = commands.add_parser("train", help="train a recipe; any recipe key can follow as --key value")
    p.add_argument("recipe", nargs="?")
    p.add_argument("--data", help=f"split folder with train/ and validation/ (default {DEFAULT_DATA})")
    p.add_argument("--runs", default="runs", help="where run folders go")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its checkpoint")
    p.set_defaults(handler=cmd_train)

    # allow_abbrev off: recipe overrides such as --optimizer must not be taken for --optimizers.
    p = commands.add_parser("ensemble", allow_abbrev=False,
                            help="trick 4: train members that differ in one thing, then vote; recipe keys follow as --key value")
    p.add_argument("recipe", nargs="?")
    p.add_argument("--vary", choices=["data", "seed", "model", "optimizer"],
                   help="data: bagging (bootstrap samples); seed: initialization and batch order; model; optimizer")
    p.add_argument("--members", type=int, help="how many (default 3, or one per --models / --optimizers entry)")
    p.add_argument("--models", help="--vary model: comma-separated model names, e.g. small-cnn,deep-cnn")
    p.add_argument("--optimizers", help="--vary optimizer: name:lr pairs, e.g. rmsprop:1e-4,adamw:3e-4")
    p.add_argument("--disjoint", action="store_true", help="--vary data: disjoint parts instead of bootstrap samples")
    p.add_argument("--parallel", type=int, help="members trained at once, each on its share of the cores "
                   "(default: one per core on a CPU; 1 trains them one after another)")
    p.add_argument("--data", help=f"split folder with train/ and validation/ (default {DEFAULT_DATA})")
    p.add_argument("--runs", default="runs", help="where the ensemble folder goes")
    p.add_argument("--out", help="the ensemble folder; if it exists, continue it")
    p.add_argument("--resume", metavar="ENSEMBLE", help="continue an interrupted ensemble")
    p.set_defaults(handler=cmd_ensemble)

    p = commands.add_parser("evaluate", help="loss, accuracy and confusion matrix of a run on labelled images")
    p.add_argument("run")
    p.add_argument("--data", help="class folders or a Kaggle flat folder (default: the run's test split)")
    p.add_argument("--weights", default="final", choices=["final", "best"])
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average each image's prediction with its mirror's (default: as the run's recipe says)")
    p.set_defaults(handler=cmd_evaluate)

    p = commands.add_parser("predict", help="label and probability for an image or a folder of images")
    p.add_argument("run")
    p.add_argument("target")
    p.add_argument("--csv", help="write Kaggle's id,label submission file")
    p.add_argument("--weights", default="final", choices=["final", "best"])
    p.set_defaults(handler=cmd_predict)

    p = commands.add_parser("augment-preview", help="a grid of augmented variants of one image")
    p.add_argument("--data", help="folder to take the first image from")
    p.add_argument("--image")
    p.add_argument("--recipe", default="dropout-aug", help="whose augment section to use")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--out", default="augment-preview.png")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_augment_preview)

    from convtricks.experiments.sweep import add_sweep_command

    add_sweep_command(commands)

    from convtricks.experiments.reproduce import add_parser as add_reproduce_command

    add_reproduce_command(commands, DEFAULT_DATA)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_console()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    takes_overrides = args.command in ("train", "show-recipe", "summary", "augment-preview", "ensemble", "sweep")
    try:
        if extra and not takes_overrides:
            raise UserError(f"Unexpected argument(s): {' '.join(extra)}.")
        return args.handler(args, extra)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
