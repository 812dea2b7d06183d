"""UTKFace: face photos whose labels are in their file names, as tensors in memory.

A name reads AGE_GENDER_RACE_DATETIME.jpg.chip.jpg (age in years, gender 0 male / 1 female,
race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others). Names that do not parse are real-world
label noise: they are skipped with one warning that names them, never a crash.

There are no split folders: each file lands in train, validation or test by a hash of its
name, so the split is the same on every machine and in every run, does not depend on which
other files are present, and a file never moves between splits when the folder grows.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from convtricks.data.dataset import decode_with_cache
from convtricks.errors import UserError

log = logging.getLogger("convtricks")

GENDERS = ("male", "female")
RACES = ("White", "Black", "Asian", "Indian", "Others")
SPLITS = ("train", "validation", "test")
MAX_AGE = 120

_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_\d+\.jpg\.chip\.jpg$", re.IGNORECASE)


@dataclass(frozen=True)
class FaceLabels:
    age: int
    gender: int
    race: int


def parse_name(name: str) -> FaceLabels | None:
    """Labels from a UTKFace file name, or None when it lacks a field or a value is out of range."""
    match = _NAME.match(name)
    if not match:
        return None
    age, gender, race = (int(group) for group in match.groups())
    if not (0 <= age <= MAX_AGE and gender < len(GENDERS) and race < len(RACES)):
        return None
    return FaceLabels(age, gender, race)


def split_of(name: str, fractions) -> str:
    """train, validation or test for a file name: a hash of the name, read as a number in [0, 1)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    train, validation = fractions[0], fractions[1]
    if position < train:
        return "train"
    if position < train + validation:
        return "validation"
    return "test"


def check_fractions(fractions) -> tuple[float, float, float]:
    valid = (isinstance(fractions, (list, tuple)) and len(fractions) == 3
             and all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0 for f in fractions))
    if not valid or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
        raise UserError(f"data.split must be three fractions [train, validation, test] that add up to 1, "
                        f"with a non-empty train part; got {fractions}.")
    return tuple(float(f) for f in fractions)


@dataclass
class FaceIndex:
    paths: list[Path]
    labels: list[FaceLabels]
    skipped: list[str]  # names that do not parse


def index_faces(root: Path) -> FaceIndex:
    """Every parseable face file under `root` (flat), sorted by name; one warning for the rest."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Face folder {root} does not exist." if not root.exists() else
                        f"{root} is a file, not a folder of UTKFace images.")
    paths, labels, skipped = [], [], []
    for path in sorted(root.iterdir(), key=lambda p: p.name):
        if not path.is_file() or path.name.startswith(".") or not path.name.lower().endswith(".jpg"):
            continue
        parsed = parse_name(path.name)
        if parsed is None:
            skipped.append(path.name)
        else:
            paths.append(path)
            labels.append(parsed)
    if skipped:
        shown = ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        log.warning("Skipped %d face image(s) whose names do not read AGE_GENDER_RACE_DATETIME.jpg.chip.jpg: %s",
                    len(skipped), shown)
    if not paths:
        raise UserError(f"{root} holds no UTKFace images (names like 25_0_2_20170116174525125.jpg.chip.jpg).")
    return FaceIndex(paths, labels, skipped)


@dataclass
class FaceSet:
    images: torch.Tensor  # uint8 (N,3,H,W)
    targets: torch.Tensor  # float32 (N,3): age in years, gender, race
    paths: list[Path]
    key: str  # identifies the decoded content; feature caches build on it

    def __len__(self) -> int:
        return self.images.shape[0]


def targets_of(labels: list[FaceLabels]) -> torch.Tensor:
    return torch.tensor([[f.age, f.gender, f.race] for f in labels], dtype=torch.float32).view(-1, 3)


def decode_faces(paths: list[Path], labels: list[FaceLabels], target_size, *, use_cache: bool = True,
                 threads: int = 2) -> FaceSet:
    """Decode once to uint8 (N,3,H,W), through the content-keyed cache; unreadable files are skipped."""
    images, kept, key = decode_with_cache(paths, target_size, use_cache=use_cache, threads=threads)
    kept_list = kept.tolist()
    return FaceSet(images, targets_of([f for f, ok in zip(labels, kept_list) if ok]),
                   [p for p, ok in zip(paths, kept_list) if ok], key)


def load_faces(root: Path, target_size, fractions=(0.7, 0.15, 0.15), splits=SPLITS, *,
               use_cache: bool = True) -> dict[str, FaceSet]:
    """The requested splits of a UTKFace folder, each decoded to `target_size` (H, W)."""
    fractions = check_fractions(list(fractions))
    index = index_faces(root)
    chosen: dict[str, tuple[list, list]] = {split: ([], []) for split in splits}
    for path, labels in zip(index.paths, index.labels):
        split = split_of(path.name, fractions)
        if split in chosen:
            chosen[split][0].append(path)
            chosen[split][1].append(labels)
    sets = {}
    for split, (paths, labels) in chosen.items():
        if not paths and split != "test":
            raise UserError(f"The {split} split of {root} is empty; use more images or a larger fraction "
                            f"in data.split (now {list(fractions)}).")
        sets[split] = decode_faces(paths, labels, target_size, use_cache=use_cache)
    return sets
