"""Find labelled images on disk, like Keras' flow_from_directory.

Two layouts are understood:
- class folders: ROOT/<class>/<image>, classes = sorted folder names;
- Kaggle's flat folder: ROOT/cat.0.jpg, ROOT/dog.7.jpg; the class is the name before the
  first dot, pluralised (cat -> cats) so it matches the folders `prepare` writes.
A flat folder whose names carry no class (Kaggle's test set: 1.jpg, 2.jpg) is indexed as
unlabelled, which `predict` accepts and `train`/`evaluate` refuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from convtricks.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_KAGGLE_NAME = re.compile(r"^([A-Za-z]+)\.\d+$")


@dataclass
class ImageIndex:
    paths: list[Path]
    labels: list[int] | None  # None when the images carry no class
    classes: list[str]
    layout: str  # "folders", "flat" or "unlabelled"

    def __len__(self) -> int:
        return len(self.paths)


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _natural_key(path: Path):
    # cat.2.jpg before cat.10.jpg, as a person would sort them.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def index_directory(root: Path, *, require_labels: bool = True) -> ImageIndex:
    """Index `root` as class folders or a Kaggle flat folder; errors are one sentence."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"Data folder {root} does not exist.")
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a folder of images.")

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        return _index_class_folders(root, class_dirs)
    return _index_flat(root, require_labels)


def _index_class_folders(root: Path, class_dirs: list[Path]) -> ImageIndex:
    paths, labels = [], []
    empty = []
    for label, folder in enumerate(class_dirs):
        images = sorted((p for p in folder.iterdir() if is_image(p)), key=_natural_key)
        if not images:
            empty.append(folder.name)
        paths += images
        labels += [label] * len(images)
    if empty:
        raise UserError(f"Class folder(s) {', '.join(empty)} in {root} contain no images.")
    if len(class_dirs) < 2:
        raise UserError(f"{root} has a single class folder ({class_dirs[0].name}); a classifier needs at least two.")
    return ImageIndex(paths, labels, [d.name for d in class_dirs], "folders")


def _index_flat(root: Path, require_labels: bool) -> ImageIndex:
    images = sorted((p for p in root.iterdir() if is_image(p)), key=_natural_key)
    if not images:
        raise UserError(f"{root} contains no images (expected class folders or files like cat.0.jpg).")
    names = [_KAGGLE_NAME.match(p.stem) for p in images]
    if all(names):
        classes = sorted({m.group(1).lower() + "s" for m in names})
        if len(classes) < 2 and require_labels:
            raise UserError(f"{root} holds images of a single class ({classes[0]}); a classifier needs at least two.")
        labels = [classes.index(m.group(1).lower() + "s") for m in names]
        return ImageIndex(images, labels, classes, "flat")
    if require_labels:
        raise UserError(
            f"{root} holds images without classes: put them in one folder per class, "
            "or name them like cat.0.jpg / dog.0.jpg."
        )
    return ImageIndex(images, None, [], "unlabelled")
