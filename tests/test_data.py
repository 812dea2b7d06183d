"""Decoding any image mode to RGB once, the content-keyed cache, and the Kaggle flat layout."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from convtricks.data import dataset as dataset_module
from convtricks.data.dataset import load_image_set
from convtricks.data.decode import decode_image
from convtricks.data.folders import index_directory
from convtricks.train.batches import epoch_batches


def encoded(mode: str, fmt: str) -> bytes:
    image = Image.new("RGB", (40, 30), (200, 30, 60)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"),
                                      ("RGB", "BMP"), ("LA", "PNG")])
def test_every_mode_decodes_to_rgb_at_target_size(mode, fmt):
    array = decode_image(encoded(mode, fmt), (24, 32))
    assert array.shape == (3, 24, 32) and array.dtype == np.uint8
    if mode in ("RGBA", "P", "RGB"):
        assert abs(int(array[0].mean()) - 200) < 10 and abs(int(array[1].mean()) - 30) < 10


def test_second_load_decodes_nothing(tiny_split, monkeypatch):
    first = load_image_set(tiny_split / "train", (32, 32))
    monkeypatch.setattr(dataset_module, "decode_many", lambda *a, **k: pytest.fail("decoded again"))
    second = load_image_set(tiny_split / "train", (32, 32))
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.images.dtype == torch.uint8 and first.images.shape == (24, 3, 32, 32)


def test_a_different_size_is_a_different_cache_entry(tiny_split):
    small = load_image_set(tiny_split / "train", (32, 32))
    large = load_image_set(tiny_split / "train", (40, 40))
    assert small.cache_key != large.cache_key and large.images.shape[-1] == 40


def test_kaggle_flat_folder_is_indexed_with_plural_classes(kaggle_flat, tmp_path):
    for name in ("cat.2.jpg", "cat.10.jpg", "dog.1.jpg"):
        (tmp_path / name).write_bytes((kaggle_flat / name).read_bytes())
    index = index_directory(tmp_path)
    assert index.classes == ["cats", "dogs"] and index.layout == "flat"
    assert [p.name for p in index.paths] == ["cat.2.jpg", "cat.10.jpg", "dog.1.jpg"]
    assert index.labels == [0, 0, 1]


def test_batches_follow_from_seed_and_epoch_and_cover_each_pass():
    epoch0 = epoch_batches(10, 5, 2, seed=3, epoch=0)
    assert sorted(torch.cat(epoch0).tolist()) == list(range(10))
    assert [b.tolist() for b in epoch0] == [b.tolist() for b in epoch_batches(10, 5, 2, seed=3, epoch=0)]
    # 3 steps of 4 from 10 images: epochs straddle passes and still never repeat within a pass.
    stream = torch.cat([torch.cat(epoch_batches(10, 4, 3, seed=0, epoch=e)) for e in range(5)])
    for start in range(0, 60, 10):
        assert sorted(stream[start:start + 10].tolist()) == list(range(10))
