"""A folder of labelled images as tensors in memory: decode once, batch many times."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from convtricks.data import cache
from convtricks.data.decode import decode_many, read_bytes
from convtricks.data.folders import index_directory
from convtricks.errors import UserError

log = logging.getLogger("convtricks")


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N,3,H,W)
    labels: torch.Tensor | None  # int64 (N,), None when unlabelled
    classes: list[str]
    paths: list[Path]
    cache_key: str  # identifies the decoded content; feature caches build on it

    def __len__(self) -> int:
        return self.images.shape[0]


def _warn_skipped(paths: list[Path]) -> None:
    if paths:
        shown = ", ".join(p.name for p in paths[:10]) + (" ..." if len(paths) > 10 else "")
        log.warning("Skipped %d unreadable image file(s): %s", len(paths), shown)


def decode_with_cache(paths: list[Path], target_size, *, use_cache: bool = True, threads: int = 2):
    """uint8 (N,3,H,W) of the readable files, a mask of which were readable, and the content key.

    The files are hashed (cheap) and looked up in the cache; only a miss decodes. Unreadable
    files are named in one warning."""
    target_size = tuple(int(v) for v in target_size)
    blobs = read_bytes(paths)
    key = cache.content_key(blobs, target_size)
    cached = cache.load("images", key) if use_cache else None
    if cached is not None:
        images, kept = cached["images"], cached["kept"].bool()
    else:
        images, bad = decode_many(blobs, target_size, threads=threads)
        kept = torch.ones(len(blobs), dtype=torch.bool)
        kept[bad] = False
        if use_cache:
            cache.save("images", key, {"images": images, "kept": kept.to(torch.uint8)})
    _warn_skipped([p for p, ok in zip(paths, kept.tolist()) if not ok])
    return images, kept, key


def load_image_set(root: Path, target_size, *, use_cache: bool = True, require_labels: bool = True,
                   threads: int = 2) -> ImageSet:
    """Index `root`, decode every image to `target_size` (H, W) once, keep uint8 in memory."""
    index = index_directory(Path(root), require_labels=require_labels)
    images, kept, key = decode_with_cache(index.paths, target_size, use_cache=use_cache, threads=threads)
    if images.shape[0] == 0:
        raise UserError(f"No readable images in {root}.")
    paths = [p for p, ok in zip(index.paths, kept.tolist()) if ok]
    labels = None
    if index.labels is not None:
        labels = torch.tensor(index.labels, dtype=torch.int64)[kept]
        missing = [c for i, c in enumerate(index.classes) if not (labels == i).any()]
        if missing and require_labels:
            raise UserError(f"Class(es) {', '.join(missing)} in {root} have no readable images.")
    return ImageSet(images, labels, index.classes, paths, key)
