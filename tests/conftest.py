"""Shared fixtures: where the real data lives, and small real datasets built from it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Tests never read or fill the user's cache (~/.cache/convtricks)."""
    os.environ["CONVTRICKS_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: on a busy 2-core machine two intra-op threads spin-wait on
    each other and cost more than they gain; one thread keeps these checks fast anywhere."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_data_dir() -> Path:
    # CI and developers keep ../shared beside the checkout; an env var points elsewhere.
    return Path(os.environ.get("CONVTRICKS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    assert path.is_dir(), f"real data expected at {path} (../shared/data beside the checkout)"
    return path


@pytest.fixture(scope="session")
def kaggle_flat(shared_data) -> Path:
    """Kaggle's flat train folder (cat.N.jpg / dog.N.jpg), read in place, never written."""
    return shared_data / "dogs-vs-cats" / "train"


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory, kaggle_flat) -> Path:
    """A real lecture-style split, small: train 12 / validation 6 / test 6 images per class."""
    root = tmp_path_factory.mktemp("tiny_split")
    ranges = {"train": range(0, 12), "validation": range(1000, 1006), "test": range(1500, 1506)}
    for split, numbers in ranges.items():
        for animal in ("cat", "dog"):
            folder = root / split / f"{animal}s"
            folder.mkdir(parents=True)
            for n in numbers:
                shutil.copyfile(kaggle_flat / f"{animal}.{n}.jpg", folder / f"{animal}.{n}.jpg")
    return root
