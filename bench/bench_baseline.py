"""Speed of the lecture's baseline on this machine, printed as one table.

    python bench/bench_baseline.py [--data data/cats_and_dogs_small] [--repeats 5] [--epoch] [--peer]

Rows: JPEG decode, cached load, batch pipeline from the cache, training step (forward +
backward + RMSprop step) at batch 20 and 32 for each numeric setting (fp32 NCHW,
channels_last, bf16 autocast, torch.compile), evaluation, and with --epoch a real 2-epoch
`convtricks train baseline` (seconds per epoch of 2,000 + 1,000 images, peak RSS).
--peer also runs the lecture's Keras code (../shared/peers/keras_seed.py, in .peer-venv)
for 2 epochs and reports its images/s beside ours. Every number is a median of repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from convtricks.data.dataset import load_image_set
from convtricks.data.decode import decode_many, read_bytes
from convtricks.data.folders import index_directory
from convtricks.models.small_cnn import SmallCNN
from convtricks.train.batches import epoch_batches
from convtricks.train.fit import Batcher

REPO = Path(__file__).resolve().parents[1]


def median_rate(images_per_call: int, call, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return images_per_call / statistics.median(times)


def train_step_rate(batch_size: int, channels_last: bool, bf16: bool, compile_model: bool, repeats: int) -> float:
    torch.manual_seed(0)
    model = SmallCNN()
    inputs = torch.rand(batch_size, 3, 150, 150)
    targets = torch.randint(0, 2, (batch_size, 1)).float()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compile_model else model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = forward(inputs)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return median_rate(batch_size, step, repeats, warmup=3)


def eval_rate(repeats: int) -> float:
    model = SmallCNN().eval().to(memory_format=torch.channels_last)
    inputs = torch.rand(100, 3, 150, 150).contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.no_grad():
            model(inputs)

    return median_rate(100, forward, repeats)


def real_epochs(data: Path, runs: Path) -> dict:
    command = [sys.executable, "-m", "convtricks", "train", "baseline", "--data", str(data), "--runs", str(runs),
               "--epochs", "2"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    (run_dir,) = runs.iterdir()
    history = json.loads((run_dir / "history.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"epoch_seconds": history[-1]["seconds"], "train_images_per_s": history[-1]["train_images_per_s"],
            "peak_rss_mb": metrics["peak_rss_mb"]}


def keras_peer(data: Path) -> dict | None:
    python = REPO / ".peer-venv" / "bin" / "python"
    script = REPO.parent / "shared" / "peers" / "keras_seed.py"
    if not python.exists() or not script.exists():
        return None
    result = subprocess.run([str(python), str(script), "--recipe", "baseline", "--epochs", "2", "--data", str(data)],
                            capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {"epochs": lines[:-1], "summary": lines[-1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=REPO / "data" / "cats_and_dogs_small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epoch", action="store_true", help="also time 2 real epochs through the CLI")
    parser.add_argument("--peer", action="store_true", help="also run the Keras peer (needs .peer-venv)")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows: list[tuple[str, str, str]] = []

    train_dir = args.data / "train"
    paths = index_directory(train_dir).paths
    blobs = read_bytes(paths)
    rows.append(("decode JPEG -> uint8 150x150 (2 threads)",
                 f"{median_rate(len(blobs), lambda: decode_many(blobs, (150, 150)), max(1, args.repeats // 2), 0):.0f}", "img/s"))
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["CONVTRICKS_CACHE"] = scratch
        load_image_set(train_dir, (150, 150))  # fills the cache
        rows.append(("load from the content cache (read + hash + load)",
                     f"{median_rate(len(paths), lambda: load_image_set(train_dir, (150, 150)), args.repeats, 1):.0f}", "img/s"))
        images = load_image_set(train_dir, (150, 150)).images
    to_input = Batcher(1 / 255, torch.device("cpu"), True)

    def pipeline_epoch():
        for indices in epoch_batches(len(images), 20, 100, seed=0, epoch=0):
            to_input(images[indices])

    rows.append(("batch pipeline from cache (index, rescale, channels_last)",
                 f"{median_rate(2000, pipeline_epoch, args.repeats, 1):.0f}", "img/s"))

    settings = [("fp32 NCHW", False, False, False), ("fp32 channels_last (default)", True, False, False),
                ("bf16 autocast, channels_last", True, True, False), ("torch.compile, channels_last", True, False, True)]
    for batch_size in (20, 32):
        for label, channels_last, bf16, compiled in settings:
            repeats = max(3, args.repeats // (4 if bf16 else 1))
            rate = train_step_rate(batch_size, channels_last, bf16, compiled, repeats)
            rows.append((f"train step, batch {batch_size}, {label}", f"{rate:.1f}", "img/s"))
    rows.append(("evaluation (forward only, batch 100, channels_last)", f"{eval_rate(args.repeats):.0f}", "img/s"))

    if args.epoch:
        with tempfile.TemporaryDirectory() as runs:
            epoch = real_epochs(args.data, Path(runs))
        rows.append(("epoch of the lecture split (2,000 train + 1,000 val), 2nd epoch", f"{epoch['epoch_seconds']:.1f}", "s"))
        rows.append(("  training images/s in that epoch", f"{epoch['train_images_per_s']:.1f}", "img/s"))
        rows.append(("  peak RSS of the run", f"{epoch['peak_rss_mb']:.0f}", "MB"))
    if args.peer:
        peer = keras_peer(args.data)
        if peer is None:
            rows.append(("Keras peer", "not installed", "(see ../shared/peers/keras_seed.py)"))
        else:
            summary = peer["summary"]
            ours = epoch["train_images_per_s"] if args.epoch else None
            rows.append(("Keras peer: training images/s (median, epochs 2+)",
                         f"{summary['median_train_img_per_s_ep2on']:.1f}", "img/s"))
            rows.append(("Keras peer: seconds per epoch (median, epochs 2+)", f"{summary['median_epoch_s_ep2on']:.1f}", "s"))
            rows.append(("Keras peer: peak RSS", f"{summary['peak_rss_mb']:.0f}", "MB"))
            if ours:
                rows.append(("  ratio, ours / Keras, training images/s",
                             f"{ours / summary['median_train_img_per_s_ep2on']:.2f}", "x"))

    print(f"convtricks baseline speed - {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, median of {args.repeats}")
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'measure':<{width}}{'value':>12}  unit")
    for name, value, unit in rows:
        print(f"{name:<{width}}{value:>12}  {unit}")


if __name__ == "__main__":
    main()
