"""Decoded-image cache on disk, keyed by the files' content and the target size.

A second run over the same images decodes nothing: it hashes the bytes (cheap) and loads
one safetensors file. Renamed or copied files still hit; edited files miss.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from convtricks.atomic import atomic_path
from convtricks.data.decode import DECODER_VERSION


def cache_dir() -> Path:
    if "CONVTRICKS_CACHE" in os.environ:
        return Path(os.environ["CONVTRICKS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convtricks"


def content_key(blobs: list[bytes], *parts) -> str:
    digest = hashlib.sha256(repr((DECODER_VERSION, parts)).encode())
    for blob in blobs:
        digest.update(hashlib.sha256(blob).digest())
    return digest.hexdigest()[:32]


def load(kind: str, key: str) -> dict[str, torch.Tensor] | None:
    path = cache_dir() / kind / f"{key}.safetensors"
    if not path.exists():
        return None
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError):
        return None  # a damaged cache entry is rebuilt, never fatal


def save(kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
    target = cache_dir() / kind / f"{key}.safetensors"
    try:
        with atomic_path(target) as temp:
            save_file({name: t.contiguous() for name, t in tensors.items()}, str(temp))
    except OSError:
        pass  # a read-only or full cache directory only costs speed
