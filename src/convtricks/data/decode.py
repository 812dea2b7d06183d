"""Decode image files once into a uint8 (N,3,H,W) tensor; skip the unreadable ones."""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger("convtricks")

# Bump when decoding changes, so on-disk caches made by older code are not reused.
DECODER_VERSION = 1


def decode_image(data: bytes, target_size: tuple[int, int]) -> np.ndarray:
    """Bytes of any PIL-readable image (grey, CMYK, RGBA, palette, PNG...) -> uint8 (3,H,W) RGB."""
    height, width = target_size
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (width, height))  # JPEG: let the decoder downscale by 2/4/8 first
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def _try_decode(data: bytes, target_size):
    try:
        return decode_image(data, target_size)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None


def decode_many(blobs: list[bytes], target_size: tuple[int, int], threads: int = 2):
    """Decode in a thread pool (PIL releases the GIL while decoding).

    Returns (uint8 tensor of the good images, indices of the bad ones).
    """
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        decoded = list(pool.map(lambda blob: _try_decode(blob, target_size), blobs))
    bad = [i for i, array in enumerate(decoded) if array is None]
    good = [array for array in decoded if array is not None]
    height, width = target_size
    if not good:
        return torch.empty((0, 3, height, width), dtype=torch.uint8), bad
    return torch.from_numpy(np.stack(good)), bad


def read_bytes(paths: list[Path]) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]
