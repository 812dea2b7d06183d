"""`convtricks prepare`: build the lecture's train/validation/test split from raw images.

A source is one of
  - Kaggle's flat folder (`cat.0.jpg`, `dog.0.jpg`, ...): the class is the name's prefix
    before the first dot, and class `x` gets the folder `xs` (cat -> cats);
  - Kaggle's `train.zip` (the same names, under `train/` or at the archive's root);
  - a folder (or zip) with one sub-folder per class, whose names are kept as they are.

Per class, images are put in a stable order (numbers in names compare as numbers, so
`cat.2` < `cat.10`) and cut by counts: with the default (1000, 500, 500) on Kaggle's data
that is the lecture's N 0-999 train, 1000-1499 validation, 1500-1999 test. A seed swaps
the stable order for a seeded shuffle.

`DIR/manifest.csv` (file, class, split, sha256) describes the split. It makes a rerun with
the same request a no-op, and lets a different request be told apart from a repeat, so an
existing split is only replaced when asked (`force`). A new split is assembled in a hidden
folder beside DIR and renamed into place only once complete.
"""

from __future__ import annotations

import csv
import hashlib
import operator
import os
import random
import re
import secrets
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable

import convtricks
from convtricks.errors import UserError

SPLITS = ("train", "validation", "test")
DEFAULT_COUNTS = (1000, 500, 500)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
MANIFEST_NAME = "manifest.csv"
MANIFEST_FIELDS = ("file", "class", "split", "sha256")
# Kaggle's whole train.zip unpacks to about 0.6 GB; 20 GiB leaves room for any honest
# dataset while stopping an archive whose members inflate without bound.
DEFAULT_MAX_UNPACKED_BYTES = 20 * 2**30
SOURCE_ENV_VAR = "CONVTRICKS_DATA_SOURCE"
KAGGLE_TRAIN_IN_SHARED = Path("shared", "data", "dogs-vs-cats", "train")

_CHUNK = 1 << 20
# What reading a file or a zip member can raise when the bytes are not there or are corrupt.
_READ_ERRORS = (OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class PrepareSummary:
    """What `prepare_split` left in `out`."""

    out: Path
    layout: str  # "flat" (class in each file name) or "class-folders"
    counts: dict[str, dict[str, int]]  # split -> class folder -> images
    changed: bool  # False when `out` already held exactly this split
    linked: int = 0  # files hard-linked to the source (when changed)
    copied: int = 0  # files copied or unpacked (when changed)

    @property
    def total(self) -> int:
        return sum(n for per_class in self.counts.values() for n in per_class.values())


@dataclass(frozen=True)
class _Row:
    """One line of the manifest, plus where its bytes come from in the source."""

    file: str  # path inside the split, e.g. "train/cats/cat.0.jpg"
    label: str  # class folder, e.g. "cats"
    split: str
    sha256: str
    origin: str = field(compare=False)  # path inside the source

    def manifest_line(self) -> tuple[str, str, str, str]:
        return (self.file, self.label, self.split, self.sha256)


# ---------------------------------------------------------------------------- public API


def default_source() -> Path | None:
    """Where `prepare` reads from when no source is given, or None when nothing is found.

    The environment variable wins (even when its path is missing, so that a typo is
    reported rather than silently replaced); then `../shared/data/dogs-vs-cats/train`
    seen from the working directory, then the same beside this checkout.
    """
    configured = os.environ.get(SOURCE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    # The package sits at <checkout>/src/convtricks/__init__.py; shared/ lies beside <checkout>.
    beside_checkout = Path(convtricks.__file__).resolve().parents[3]
    for base in (Path.cwd().parent, beside_checkout):
        candidate = base / KAGGLE_TRAIN_IN_SHARED
        if candidate.is_dir():
            return candidate
    return None


def prepare_split(
    source: Path,
    out: Path,
    *,
    counts: Iterable[int] = DEFAULT_COUNTS,
    seed: int | None = None,
    force: bool = False,
    max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
    log: Callable[[str], object] = print,
) -> PrepareSummary:
    """Build `out/{train,validation,test}/<class>/` and `out/manifest.csv` from `source`.

    `counts` are images per class for train, validation and test. Without a seed each
    class is cut in its stable order (Kaggle's N ranges); with one, in a seeded shuffle.
    The source is never modified; files are hard-linked when possible, else copied.
    """
    counts = _checked_counts(counts)
    seed = _checked_seed(seed)
    source = Path(source).expanduser()
    out = Path(out).expanduser()
    _check_paths_apart(source, out)

    with _open_source(source, max_unpacked_bytes) as reader:
        layout, images = _find_classes(reader.image_paths(), source, reader.hint_when_empty())
        log(
            f"Source {source} ({_describe(layout, reader)}): "
            + ", ".join(f"{len(paths)} {label}" for label, paths in sorted(images.items()))
            + "."
        )
        chosen = _select(images, counts, seed, source)
        reader.check_size([origin for picks in chosen.values() for origin in picks])
        rows = _plan(reader, chosen)
        summary_counts = _count(rows)

        if _already_there(out, rows, force):
            log(f"{out} already holds this split ({len(rows)} files match {MANIFEST_NAME}); nothing changed.")
            return PrepareSummary(out, layout, summary_counts, changed=False)

        replacing = out.is_dir() and any(out.iterdir())
        linked, copied = _build(reader, rows, out)

    how = f"{linked} hard-linked, {copied} copied" if linked else f"{copied} copied"
    log(
        f"{'Replaced the split in' if replacing else 'Wrote'} {out}: "
        + "; ".join(
            f"{split} " + " + ".join(f"{n} {label}" for label, n in per_class.items())
            for split, per_class in summary_counts.items()
        )
        + f" ({how}); {MANIFEST_NAME} lists {len(rows)} files."
    )
    return PrepareSummary(out, layout, summary_counts, changed=True, linked=linked, copied=copied)


# --------------------------------------------------------------------------- validation


def _checked_counts(counts: Iterable[int]) -> tuple[int, int, int]:
    problem = UserError(
        f"Counts must be three whole numbers of images per class for train, validation "
        f"and test, at least one above zero (got {counts!r})."
    )
    try:
        values = tuple(operator.index(n) for n in counts)
    except TypeError:
        raise problem from None
    if len(values) != 3 or min(values) < 0 or sum(values) == 0:
        raise problem
    return values  # type: ignore[return-value]


def _checked_seed(seed: int | None) -> int | None:
    if seed is None:
        return None
    try:
        return operator.index(seed)
    except TypeError:
        raise UserError(f"The seed must be a whole number (got {seed!r}).") from None


def _check_paths_apart(source: Path, out: Path) -> None:
    if not source.exists():
        raise UserError(f"The source {source} does not exist; pass Kaggle's train folder or train.zip.")
    source_real, out_real = source.resolve(), out.resolve()
    # Writing inside the source would modify it; a forced rebuild of a folder holding
    # the source would delete it.
    if out_real == source_real or out_real.is_relative_to(source_real):
        raise UserError(f"The output folder {out} lies inside the source {source}; choose a folder outside it.")
    if source_real.is_relative_to(out_real):
        raise UserError(f"The source {source} lies inside the output folder {out}; choose another output folder.")


# ------------------------------------------------------------------------------ sources


def _is_junk(relative: str) -> bool:
    # macOS adds __MACOSX/ and ._name resource forks to zips, .DS_Store to folders.
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.split("/"))


def _is_image(relative: str) -> bool:
    return PurePosixPath(relative).suffix.lower() in IMAGE_SUFFIXES and not _is_junk(relative)


class _FolderReader:
    """Images of a folder, at its top level and one sub-folder down."""

    kind = "folder"

    def __init__(self, root: Path):
        self.root = root
        self.location = root

    def __enter__(self) -> _FolderReader:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def image_paths(self) -> list[str]:
        found = []
        try:
            with os.scandir(self.root) as top:
                for entry in top:
                    if entry.is_file() and _is_image(entry.name):
                        found.append(entry.name)
                    elif entry.is_dir() and not _is_junk(entry.name):
                        with os.scandir(entry.path) as inner:
                            found += [f"{entry.name}/{e.name}" for e in inner if e.is_file() and _is_image(e.name)]
        except OSError as error:
            raise UserError(f"Could not list the source folder {self.root}: {error.strerror or error}.") from None
        return found

    def hint_when_empty(self) -> str:
        return ""

    def check_size(self, origins: list[str]) -> None:
        pass  # files on disk cannot inflate

    def open(self, origin: str) -> BinaryIO:
        return open(self.root / origin, "rb")

    def place(self, origin: str, destination: Path) -> str | None:
        """Hard-link when the file system allows it (no bytes to copy), else copy.

        Returns the sha256 of the bytes copied, or None for a link (same bytes, same file).
        """
        try:
            os.link(self.root / origin, destination)
            return None
        except OSError:  # another file system, or links not allowed here
            return _copy_hashing(self.open(origin), destination)


class _ZipReader:
    """Members of a zip archive, checked for safety before anything is read."""

    kind = "zip"

    def __init__(self, path: Path, max_unpacked_bytes: int):
        self.path = path
        self.location = path
        self.max_unpacked_bytes = max_unpacked_bytes
        try:
            self.archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as error:
            raise UserError(f"Could not open the archive {path}: {error}.") from None
        try:
            self.members = self._checked_members()
        except BaseException:
            self.archive.close()
            raise

    def __enter__(self) -> _ZipReader:
        return self

    def __exit__(self, *exc) -> None:
        self.archive.close()

    def _checked_members(self) -> dict[str, zipfile.ZipInfo]:
        """Every member, by its '/'-separated name; refuse the archive if any could escape."""
        members: dict[str, zipfile.ZipInfo] = {}
        for info in self.archive.infolist():
            name = info.filename.replace("\\", "/")  # archives made on Windows may use either
            is_link = stat.S_ISLNK(info.external_attr >> 16)
            if is_link or _escapes(name):
                what = "a symbolic link" if is_link else "a path outside the output folder"
                raise UserError(
                    f"The archive {self.path} holds an unsafe member {info.filename!r} ({what}); "
                    "nothing was extracted from it."
                )
            if info.is_dir():
                continue
            if name in members:
                raise UserError(
                    f"The archive {self.path} holds the member {info.filename!r} twice; "
                    "nothing was extracted from it."
                )
            members[name] = info
        return members

    def image_paths(self) -> list[str]:
        return [name for name in self.members if _is_image(name)]

    def hint_when_empty(self) -> str:
        inner = [name for name in self.members if name.lower().endswith(".zip") and not _is_junk(name)]
        # Kaggle's competition download is a zip holding train.zip and test1.zip.
        return f" (it holds other archives such as {inner[0]}: pass that one instead)" if inner else ""

    def check_size(self, origins: list[str]) -> None:
        # Only the chosen members are ever inflated, and zipfile stops each one at its
        # declared size, so their declared sizes bound what this run unpacks.
        total = sum(self.members[origin].file_size for origin in origins)
        if total > self.max_unpacked_bytes:
            raise UserError(
                f"The chosen members of {self.path} would unpack to {total / 2**30:.1f} GiB, over the "
                f"{self.max_unpacked_bytes / 2**30:.1f} GiB limit; raise the limit if you trust this archive."
            )
        encrypted = [origin for origin in origins if self.members[origin].flag_bits & 0x1]
        if encrypted:
            raise UserError(
                f"The archive {self.path} holds encrypted members (e.g. {encrypted[0]!r}); unpack it yourself first."
            )

    def open(self, origin: str) -> BinaryIO:
        return self.archive.open(self.members[origin])

    def place(self, origin: str, destination: Path) -> str:
        return _copy_hashing(self.open(origin), destination)


def _escapes(name: str) -> bool:
    parts = name.split("/")
    return (
        name.startswith("/")
        or re.match(r"[A-Za-z]:", name) is not None  # a drive letter: C:/x or C:x
        or ".." in parts
        or "\0" in name
    )


def _open_source(source: Path, max_unpacked_bytes: int) -> _FolderReader | _ZipReader:
    if source.is_dir():
        return _FolderReader(source)
    if zipfile.is_zipfile(source):
        return _ZipReader(source, max_unpacked_bytes)
    raise UserError(f"The source {source} is neither a folder nor a zip archive.")


def _describe(layout: str, reader: _FolderReader | _ZipReader) -> str:
    where = "zip archive" if reader.kind == "zip" else "folder"
    return f"{where}, class in each file name" if layout == "flat" else f"{where}, one folder per class"


# ------------------------------------------------------------------------------ layout


def _label_in_name(file_name: str) -> str | None:
    """`cat.12.jpg` -> `cat`; None for names that carry no class, such as Kaggle's `12.jpg`."""
    stem = PurePosixPath(file_name).stem
    if "." not in stem:
        return None
    label = stem.split(".", 1)[0]
    return None if not label or label.isdigit() else label


def _parent(relative: str) -> str:
    return relative.rsplit("/", 1)[0] if "/" in relative else ""


def _find_classes(paths: list[str], source: Path, hint: str = "") -> tuple[str, dict[str, list[str]]]:
    """Tell the layout from the image paths; return it with class -> paths in the source.

    Flat: the shallowest images named `<class>.<rest>` all sit in one folder (Kaggle's
    folder, or `train/` inside its zip). Otherwise one folder per class: the images'
    folders must be siblings, and each folder's name is a class.
    """
    if not paths:
        raise UserError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {source}{hint}.")

    labeled = [p for p in paths if _label_in_name(PurePosixPath(p).name)]
    if labeled:
        depth = min(p.count("/") for p in labeled)
        shallow = [p for p in labeled if p.count("/") == depth]
        if len({_parent(p) for p in shallow}) == 1:
            return "flat", _group(shallow, lambda p: _label_in_name(PurePosixPath(p).name) + "s", source)

    nested = [p for p in paths if "/" in p]
    if not nested:
        raise UserError(
            f"The {len(paths)} images in {source} carry no class: expected names like cat.0.jpg "
            "or one sub-folder per class."
        )
    roots = sorted({_parent(_parent(p)) for p in nested})
    if len(roots) > 1:
        examples = ", ".join(repr(root + "/") for root in roots[:3])
        raise UserError(
            f"The images in {source} sit in folders under different parents ({examples}); "
            "expected one folder per class side by side, or Kaggle's flat names."
        )
    return "class-folders", _group(nested, lambda p: PurePosixPath(_parent(p)).name, source)


def _group(paths: list[str], label_of: Callable[[str], str], source: Path) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for path in paths:
        groups.setdefault(label_of(path), []).append(path)
    if len(groups) < 2:
        only = next(iter(groups))
        raise UserError(
            f"Found images of one class only ({only}) in {source}; a classifier needs at least two."
        )
    return groups


# --------------------------------------------------------------------------- selection


def _natural_key(path: str) -> tuple:
    # Digit runs compare as numbers, so cat.2.jpg < cat.10.jpg, and Kaggle's N ranges
    # come out of a plain sort.
    name = PurePosixPath(path).name
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def _class_rng(seed: int, label: str) -> random.Random:
    # One stream per class, derived from the seed and the class name, so a class's pick
    # does not depend on how many images the other classes have. Python's Random (an
    # instance, not the global one) keeps a seed's shuffle stable across releases, and
    # spares `prepare` the cost of importing torch.
    digest = hashlib.sha256(f"{seed}:{label}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _select(
    images: dict[str, list[str]], counts: tuple[int, int, int], seed: int | None, source: Path
) -> dict[tuple[str, str], list[str]]:
    """(split, class) -> paths in the source, in natural order within each cell."""
    needed = sum(counts)
    short = {label: len(paths) for label, paths in sorted(images.items()) if len(paths) < needed}
    if short:
        found = ", ".join(f"{label} has {n}" for label, n in short.items())
        raise UserError(
            f"Not enough images in {source}: {found}, but each class needs {needed} "
            f"({counts[0]} train + {counts[1]} validation + {counts[2]} test)."
        )
    chosen: dict[tuple[str, str], list[str]] = {}
    for label in sorted(images):
        ordered = sorted(images[label], key=_natural_key)
        if seed is not None:
            _class_rng(seed, label).shuffle(ordered)
        start = 0
        for split, count in zip(SPLITS, counts):
            if count:
                chosen[(split, label)] = sorted(ordered[start : start + count], key=_natural_key)
            start += count
    return chosen


def _plan(reader, chosen: dict[tuple[str, str], list[str]]) -> list[_Row]:
    """The manifest's rows, in split order, then class, then natural file order."""
    cells = sorted(chosen, key=lambda cell: (SPLITS.index(cell[0]), cell[1]))
    return [
        _Row(
            file=f"{split}/{label}/{PurePosixPath(origin).name}",
            label=label,
            split=split,
            sha256=_hash_origin(reader, origin),
            origin=origin,
        )
        for split, label in cells
        for origin in chosen[(split, label)]
    ]


def _count(rows: list[_Row]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        per_class = counts.setdefault(row.split, {})
        per_class[row.label] = per_class.get(row.label, 0) + 1
    return counts


# ------------------------------------------------------------------------------ hashing


def _hash_stream(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    with stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_origin(reader, origin: str) -> str:
    try:
        return _hash_stream(reader.open(origin))
    except _READ_ERRORS as error:
        raise UserError(f"Could not read {origin} from {reader.location}: {error}.") from None


def _copy_hashing(stream: BinaryIO, destination: Path) -> str:
    digest = hashlib.sha256()
    with stream, open(destination, "xb") as target:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            target.write(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- manifest


def _write_manifest(path: Path, rows: list[_Row]) -> None:
    with open(path, "x", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_FIELDS)
        writer.writerows(row.manifest_line() for row in rows)


def _read_manifest(path: Path) -> list[tuple[str, ...]] | None:
    """The manifest's lines, or None when it is not one this module wrote."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            lines = [tuple(line) for line in csv.reader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if not lines or lines[0] != MANIFEST_FIELDS or any(len(line) != len(MANIFEST_FIELDS) for line in lines):
        return None
    return lines[1:]


def _difference(existing: list[tuple[str, ...]] | None, wanted: list[tuple[str, ...]]) -> str:
    if existing is None:
        return f"its {MANIFEST_NAME} is unreadable"
    old, new = {line[0]: line for line in existing}, {line[0]: line for line in wanted}
    for file in sorted(set(old) | set(new)):
        if file not in new:
            return f"{file} would go"
        if file not in old:
            return f"{file} would come in"
        if old[file] != new[file]:
            return f"{file} differs"
    return "its lines are in another order"


def _damage(out: Path, lines: list[tuple[str, ...]]) -> str | None:
    """How the files in `out` stray from its manifest, or None when they match it."""
    expected = {file: sha for file, _, _, sha in lines}
    present = {
        path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file() or path.is_symlink()
    } - {MANIFEST_NAME}
    for file in sorted(present - set(expected)):
        return f"{file} is not in its {MANIFEST_NAME}"
    for file in sorted(set(expected) - present):
        return f"{file} is missing"
    for file, sha in expected.items():
        try:
            if _hash_stream(open(out / file, "rb")) != sha:
                return f"{file} was modified"
        except OSError:
            return f"{file} is unreadable"
    return None


def _already_there(out: Path, rows: list[_Row], force: bool) -> bool:
    """True when `out` holds exactly this split; raise when it holds something else, unless forced."""
    if not out.exists() and not out.is_symlink():
        return False
    if not out.is_dir():
        raise UserError(f"The output {out} exists and is not a folder; choose another output folder.")
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return False

    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        wanted = [row.manifest_line() for row in rows]
        existing = _read_manifest(manifest)
        if existing == wanted:
            damage = _damage(out, existing)
            if damage is None:
                return True
            reason = f"no longer matches its {MANIFEST_NAME} ({damage})"
        else:
            reason = f"holds a different split ({_difference(existing, wanted)})"
        if not force:
            raise UserError(f"{out} {reason}; rerun with --force to replace it.")
        return False

    if not force:
        raise UserError(
            f"{out} already holds files but no {MANIFEST_NAME}; choose a new or empty folder, "
            "or rerun with --force to replace it."
        )
    strangers = [name for name in entries if name not in SPLITS]
    if strangers:
        # --force replaces splits, not arbitrary folders someone pointed --out at by mistake.
        raise UserError(
            f"Refusing to replace {out}: it holds {strangers[0]!r}, which is not part of a split; "
            "choose another output folder."
        )
    return False


# ---------------------------------------------------------------------------- building


def _build(reader, rows: list[_Row], out: Path) -> tuple[int, int]:
    """Write the split into a hidden folder beside `out`, then swap it in; return (linked, copied)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    linked = copied = 0
    try:
        for row in rows:
            destination = staging / row.file
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                written = reader.place(row.origin, destination)
            except _READ_ERRORS as error:
                raise UserError(f"Could not write {row.file} from {row.origin}: {error}.") from None
            if written is None:
                linked += 1
            else:
                copied += 1
                if written != row.sha256:
                    raise UserError(f"{row.origin} changed while the split was being written; run prepare again.")
        _write_manifest(staging / MANIFEST_NAME, rows)
        _swap_in(staging, out)
    finally:
        # After a successful swap the staging folder is gone; otherwise drop the partial split.
        shutil.rmtree(staging, ignore_errors=True)
    return linked, copied


def _swap_in(staging: Path, out: Path) -> None:
    """Put the complete split at `out`; until then the old one stays whole (at most renamed)."""
    if not out.exists() and not out.is_symlink():
        os.rename(staging, out)
        return
    retired = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    os.rename(out, retired)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(retired, out)
        raise
    if retired.is_dir() and not retired.is_symlink():
        shutil.rmtree(retired, ignore_errors=True)
    else:
        retired.unlink()
