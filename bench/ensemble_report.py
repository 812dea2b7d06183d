"""Wall time of an ensemble's members trained in parallel worker processes against one after
another in one process using every core.

    python bench/ensemble_report.py [--data SPLIT] [--members 3] [--parallel N] [--epochs 1]
                                    [--steps 10] [--target-size 96] [--recipe baseline]

Without --data it builds a small lecture-style split (100/50/50 images per class) from the
Kaggle folder `convtricks prepare` finds by default, in a temporary folder. The decoded-image
cache is filled before timing, so both modes time training (plus each mode's own overheads:
worker start-up for the parallel one). Prints one table; the CPU may be shared with other
work, so the load average is printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from convtricks import config as recipes
from convtricks.data.dataset import load_image_set
from convtricks.train.ensemble import run_ensemble


def small_split(root: Path) -> Path:
    from convtricks.data.prepare import default_source, prepare_split

    source = default_source()
    if source is None:
        raise SystemExit("No Kaggle train folder found; pass --data with a prepared split.")
    out = root / "split"
    prepare_split(source, out, counts=(100, 50, 50), seed=None, force=False, log=lambda *_: None)
    return out


def timed_ensemble(config: dict, data: Path, out: Path, members: int, parallel: int) -> dict:
    started = time.perf_counter()
    code = run_ensemble(config, data, vary="seed", members=members, parallel=parallel, out=out)
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"ensemble with --parallel {parallel} stopped with exit code {code}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall": wall, "train_wall": metrics["train_wall_seconds"], "members": metrics["member_seconds"],
            "workers": metrics["workers"], "cores": metrics.get("cores_per_worker", [len(os.sched_getaffinity(0))])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a prepared split (train/validation/test)")
    parser.add_argument("--recipe", default="baseline")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="steps_per_epoch")
    parser.add_argument("--target-size", type=int, default=96)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        os.environ.setdefault("CONVTRICKS_CACHE", str(root / "cache"))
        data = Path(args.data) if args.data else small_split(root)
        overrides = [("epochs", str(args.epochs)), ("steps_per_epoch", str(args.steps)),
                     ("target_size", str(args.target_size))]
        config = recipes.apply_overrides(recipes.read_recipe(args.recipe), overrides)
        for split in ("train", "validation", "test"):  # decode once, outside the timings
            load_image_set(data / split, config["data"]["target_size"])

        sequential = timed_ensemble(config, data, root / "sequential", args.members, 1)
        parallel = timed_ensemble(config, data, root / "parallel", args.members, args.parallel)

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\n{args.members} members of '{args.recipe}' ({args.epochs} epoch x {args.steps} steps, "
          f"{args.target_size}px), {platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
          f"torch {torch.__version__}, load average {load}")
    print(f"{'mode':<24}{'workers':>8}{'cores each':>12}{'train wall s':>14}{'mean member s':>15}{'speed-up':>10}")
    for name, row in (("one after another", sequential), ("parallel workers", parallel)):
        mean_member = sum(row["members"].values()) / len(row["members"])
        speedup = sequential["train_wall"] / row["train_wall"]
        cores = "/".join(map(str, row["cores"]))
        print(f"{name:<24}{row['workers']:>8}{cores:>12}{row['train_wall']:>14.1f}{mean_member:>15.1f}{speedup:>9.2f}x")


if __name__ == "__main__":
    main()
