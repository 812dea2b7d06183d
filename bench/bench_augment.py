"""Throughput of batched augmentation against a per-image torchvision pipeline.

The lecture's Keras recipe (rotation 40, shifts 0.2, shear 0.2, zoom 0.2, horizontal flip)
at 150x150. `augment_batch` resamples a whole float batch with one grid_sample; the
reference applies torchvision.transforms.v2 RandomAffine + RandomHorizontalFlip image by
image on uint8 tensors, as a per-sample Dataset transform would. Pixel values do not change
the cost of either, so the images are synthetic.

    python bench/bench_augment.py [--threads 2] [--repeats 7] [--images 256]

Prints one table: images per second (median over repeats) and the ratio to torchvision
with bilinear interpolation (as ours) on one thread, its fastest per-image setting.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.transforms import InterpolationMode, v2

from convtricks.data.augment import AugmentConfig, augment_batch

SIZE = 150
KERAS_RECIPE = AugmentConfig(rotation_range=40, width_shift_range=0.2, height_shift_range=0.2,
                             shear_range=0.2, zoom_range=0.2, horizontal_flip=True)


def torchvision_pipeline(interpolation: InterpolationMode) -> v2.Compose:
    # shear_range 0.2 is Keras 2's shear angle in degrees; zoom 0.2 -> scale (0.8, 1.2).
    return v2.Compose([
        v2.RandomAffine(degrees=40, translate=(0.2, 0.2), shear=0.2, scale=(0.8, 1.2),
                        interpolation=interpolation),
        v2.RandomHorizontalFlip(),
    ])


def ours(batch_size: int, images: int, channels_last: bool):
    batches = [torch.rand(batch_size, 3, SIZE, SIZE) for _ in range(max(1, images // batch_size))]
    if channels_last:
        batches = [batch.contiguous(memory_format=torch.channels_last) for batch in batches]
    generator = torch.Generator().manual_seed(0)

    def run() -> int:
        for batch in batches:
            augment_batch(batch, KERAS_RECIPE, generator)
        return sum(len(batch) for batch in batches)

    return run


def per_image(images: int, interpolation: InterpolationMode):
    pictures = [torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8) for _ in range(images)]
    transform = torchvision_pipeline(interpolation)

    def run() -> int:
        for picture in pictures:
            transform(picture)
        return len(pictures)

    return run


def images_per_second(run, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    run()  # warm-up: allocator, kernels, lazy imports
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=256, help="images per repeat")
    args = parser.parse_args()

    # Per-image work is too small to share among threads (two threads mostly wait on each
    # other), so torchvision runs on one, as in a DataLoader worker; its rates also settle on
    # fewer images, which keeps the whole run near a minute.
    few = max(8, args.images // 4)
    reference = "torchvision v2 per image, bilinear, 1 thread"
    cases = [
        (f"ours, batch 32, {args.threads} threads", args.threads, ours(32, args.images, channels_last=False)),
        (f"ours, batch 64, {args.threads} threads", args.threads, ours(64, args.images, channels_last=False)),
        (f"ours, batch 32, channels_last, {args.threads} threads", args.threads,
         ours(32, args.images, channels_last=True)),
        ("ours, batch 32, 1 thread", 1, ours(32, args.images, channels_last=False)),
        (reference, 1, per_image(few, InterpolationMode.BILINEAR)),
        ("torchvision v2 per image, nearest (its default), 1 thread", 1, per_image(few, InterpolationMode.NEAREST)),
    ]
    rates = {name: images_per_second(run, threads, args.repeats) for name, threads, run in cases}

    print(f"Keras recipe augmentation at {SIZE}x{SIZE}: images/s, median of {args.repeats} repeats; "
          f"ratio to '{reference}'")
    width = max(len(name) for name in rates)
    print(f"| {'pipeline':<{width}} | {'img/s':>8} | {'ratio':>6} |")
    print(f"|{'-' * (width + 2)}|{'-' * 10}|{'-' * 8}|")
    for name, rate in rates.items():
        print(f"| {name:<{width}} | {rate:>8,.0f} | {rate / rates[reference]:>5.1f}x |")


if __name__ == "__main__":
    main()
