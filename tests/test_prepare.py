"""`prepare`: the lecture's split from Kaggle's folder, its zip, or class folders."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

import convtricks
from convtricks.data import prepare
from convtricks.data.prepare import default_source, prepare_split
from convtricks.errors import UserError

TINY = (3, 2, 2)  # per class: train, validation, test


def quiet(_message: str) -> None:
    pass


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def names(out: Path) -> dict[str, dict[str, list[str]]]:
    """split -> class folder -> file names, sorted as the lecture numbers them."""
    return {
        split.name: {
            folder.name: sorted((f.name for f in folder.iterdir()), key=prepare._natural_key)
            for folder in sorted(split.iterdir())
        }
        for split in sorted(out.iterdir())
        if split.is_dir()
    }


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under root with its hash, inode and modification time: any rewrite shows."""
    return {
        path.relative_to(root).as_posix(): (sha256(path), path.stat().st_ino, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def manifest_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def kaggle_names(animal: str, numbers) -> list[str]:
    return [f"{animal}.{n}.jpg" for n in numbers]


EXPECTED_TINY = {
    "train": {"cats": kaggle_names("cat", range(0, 3)), "dogs": kaggle_names("dog", range(0, 3))},
    "validation": {"cats": kaggle_names("cat", range(3, 5)), "dogs": kaggle_names("dog", range(3, 5))},
    "test": {"cats": kaggle_names("cat", range(5, 7)), "dogs": kaggle_names("dog", range(5, 7))},
}


@pytest.fixture
def small_flat(tmp_path, kaggle_flat) -> Path:
    """Kaggle's flat layout with 8 real images per class, on the same file system as tmp_path."""
    source = tmp_path / "kaggle"
    source.mkdir()
    for animal in ("cat", "dog"):
        for n in range(8):
            shutil.copyfile(kaggle_flat / f"{animal}.{n}.jpg", source / f"{animal}.{n}.jpg")
    return source


def write_zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # unix, so the mode bits in external_attr count
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def kaggle_members(source: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}{f.name}": f.read_bytes() for f in sorted(source.iterdir())}


# ------------------------------------------------------------------------------ layouts


def test_flat_folder_is_cut_by_kaggle_numbers(kaggle_flat, tmp_path):
    out = tmp_path / "split"
    summary = prepare_split(kaggle_flat, out, counts=TINY, log=quiet)

    # Numbers order the cut (cat.10 does not come before cat.2): N 0-2 / 3-4 / 5-6.
    assert names(out) == EXPECTED_TINY
    assert summary.changed and summary.layout == "flat" and summary.total == 14
    assert summary.counts == {
        "train": {"cats": 3, "dogs": 3},
        "validation": {"cats": 2, "dogs": 2},
        "test": {"cats": 2, "dogs": 2},
    }


def test_manifest_lists_each_file_with_the_sha256_of_its_bytes(kaggle_flat, tmp_path):
    out = tmp_path / "split"
    prepare_split(kaggle_flat, out, counts=TINY, log=quiet)

    rows = manifest_rows(out)
    assert list(rows[0]) == ["file", "class", "split", "sha256"]
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.csv"}
    assert {row["file"] for row in rows} == on_disk and len(rows) == 14
    for row in rows:
        split, folder, name = row["file"].split("/")
        assert (row["split"], row["class"]) == (split, folder)
        assert row["sha256"] == sha256(out / row["file"]) == sha256(kaggle_flat / name)


@pytest.mark.parametrize("prefix", ["train/", ""], ids=["under-train", "at-root"])
def test_kaggle_zip_gives_the_same_split_as_the_folder(small_flat, tmp_path, prefix):
    members = kaggle_members(small_flat, prefix)
    # What macOS and people leave in archives; none of it is an image of a class.
    members |= {"__MACOSX/train/._cat.0.jpg": b"junk", f"{prefix}.DS_Store": b"junk", f"{prefix}notes.txt": b"hi"}
    archive = write_zip(tmp_path / "train.zip", members)

    from_zip = prepare_split(archive, tmp_path / "from_zip", counts=TINY, log=quiet)
    prepare_split(small_flat, tmp_path / "from_folder", counts=TINY, log=quiet)

    assert names(tmp_path / "from_zip") == EXPECTED_TINY  # only the needed 14 of 16 members
    assert manifest_rows(tmp_path / "from_zip") == manifest_rows(tmp_path / "from_folder")
    assert from_zip.layout == "flat" and from_zip.copied == 14 and from_zip.linked == 0


def class_folder_source(root: Path, kaggle_flat: Path) -> Path:
    """birds/ and fish/ holding real images named img1..img12 (so sorting must be by number)."""
    for folder, animal in (("birds", "cat"), ("fish", "dog")):
        (root / folder).mkdir(parents=True)
        for n in range(1, 13):
            shutil.copyfile(kaggle_flat / f"{animal}.{n}.jpg", root / folder / f"img{n}.jpg")
    (root / ".thumbnails").mkdir()
    shutil.copyfile(kaggle_flat / "cat.0.jpg", root / ".thumbnails" / "img1.jpg")
    return root


def test_class_folders_keep_their_names_and_cut_the_sorted_list(kaggle_flat, tmp_path):
    source = class_folder_source(tmp_path / "photos", kaggle_flat)
    summary = prepare_split(source, tmp_path / "split", counts=TINY, log=quiet)

    cut = {"train": ["img1.jpg", "img2.jpg", "img3.jpg"], "validation": ["img4.jpg", "img5.jpg"],
           "test": ["img6.jpg", "img7.jpg"]}
    assert names(tmp_path / "split") == {split: {"birds": files, "fish": files} for split, files in cut.items()}
    assert summary.layout == "class-folders"
    row = next(r for r in manifest_rows(tmp_path / "split") if r["file"] == "train/fish/img2.jpg")
    assert row["sha256"] == sha256(kaggle_flat / "dog.2.jpg")


def test_zip_of_class_folders(kaggle_flat, tmp_path):
    source = class_folder_source(tmp_path / "photos", kaggle_flat)
    members = {f"photos/{p.relative_to(source).as_posix()}": p.read_bytes() for p in source.rglob("*.jpg")}
    archive = write_zip(tmp_path / "photos.zip", members)

    summary = prepare_split(archive, tmp_path / "split", counts=TINY, log=quiet)

    assert summary.layout == "class-folders"
    assert summary.counts["train"] == {"birds": 3, "fish": 3}
    assert names(tmp_path / "split")["test"]["birds"] == ["img6.jpg", "img7.jpg"]


# ------------------------------------------------------------------- source untouched


def test_source_is_hard_linked_on_the_same_file_system_and_never_changed(small_flat, tmp_path):
    before = snapshot(small_flat)
    summary = prepare_split(small_flat, tmp_path / "split", counts=TINY, log=quiet)

    assert summary.linked == 14 and summary.copied == 0
    linked = tmp_path / "split" / "train" / "cats" / "cat.0.jpg"
    assert linked.stat().st_ino == (small_flat / "cat.0.jpg").stat().st_ino
    assert snapshot(small_flat) == before


def test_copies_when_links_are_refused(small_flat, tmp_path, monkeypatch):
    def no_links(*_args, **_kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(prepare.os, "link", no_links)
    before = snapshot(small_flat)
    summary = prepare_split(small_flat, tmp_path / "split", counts=TINY, log=quiet)

    assert summary.copied == 14 and summary.linked == 0
    copy = tmp_path / "split" / "validation" / "dogs" / "dog.4.jpg"
    assert copy.stat().st_ino != (small_flat / "dog.4.jpg").stat().st_ino
    assert copy.read_bytes() == (small_flat / "dog.4.jpg").read_bytes()
    assert snapshot(small_flat) == before


def test_output_inside_the_source_is_refused(small_flat):
    before = snapshot(small_flat)
    with pytest.raises(UserError, match="inside the source"):
        prepare_split(small_flat, small_flat / "split", counts=TINY, log=quiet)
    assert snapshot(small_flat) == before and not (small_flat / "split").exists()


# ------------------------------------------------------------- reruns and replacement


def test_same_request_again_changes_nothing_and_says_so(small_flat, tmp_path):
    out = tmp_path / "split"
    prepare_split(small_flat, out, counts=TINY, log=quiet)
    before = snapshot(out)
    said = []

    summary = prepare_split(small_flat, out, counts=TINY, log=said.append)

    assert not summary.changed and summary.total == 14
    assert "nothing changed" in said[-1]
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kaggle", "split"]


def test_different_split_is_refused_without_force_and_replaced_with_it(small_flat, tmp_path):
    out = tmp_path / "split"
    prepare_split(small_flat, out, counts=TINY, log=quiet)
    before = snapshot(out)

    with pytest.raises(UserError, match="different split.*--force"):
        prepare_split(small_flat, out, counts=(4, 2, 2), log=quiet)
    assert snapshot(out) == before

    summary = prepare_split(small_flat, out, counts=(4, 2, 2), force=True, log=quiet)
    assert summary.changed
    assert names(out)["train"]["cats"] == kaggle_names("cat", range(4))
    assert names(out)["test"]["dogs"] == kaggle_names("dog", range(6, 8))
    assert len(manifest_rows(out)) == 16
    # The old split and the staging folder are gone; nothing else was left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kaggle", "split"]


def test_a_crash_while_rebuilding_keeps_the_old_split_whole(small_flat, tmp_path, monkeypatch):
    out = tmp_path / "split"
    prepare_split(small_flat, out, counts=TINY, log=quiet)
    before = snapshot(out)

    def crash(*_args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare, "_write_manifest", crash)  # the last step before the swap
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_split(small_flat, out, counts=TINY, seed=1, force=True, log=quiet)

    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kaggle", "split"]


def test_a_failed_swap_puts_the_old_split_back(small_flat, tmp_path, monkeypatch):
    out = tmp_path / "split"
    prepare_split(small_flat, out, counts=TINY, log=quiet)
    before = snapshot(out)
    rename = os.rename

    def refuse_to_move_the_new_split_in(source, target):
        if ".partial-" in str(source):
            raise OSError(5, "Input/output error")
        rename(source, target)

    monkeypatch.setattr(prepare.os, "rename", refuse_to_move_the_new_split_in)
    with pytest.raises(OSError):
        prepare_split(small_flat, out, counts=TINY, seed=1, force=True, log=quiet)

    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kaggle", "split"]


def test_a_crash_on_the_first_build_leaves_no_half_split(small_flat, tmp_path, monkeypatch):
    def crash(*_args):
        raise RuntimeError("killed")

    monkeypatch.setattr(prepare, "_write_manifest", crash)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_split(small_flat, tmp_path / "split", counts=TINY, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kaggle"]


def test_a_damaged_split_is_not_taken_for_the_requested_one(small_flat, tmp_path):
    out = tmp_path / "split"
    prepare_split(small_flat, out, counts=TINY, log=quiet)
    (out / "test" / "dogs" / "dog.6.jpg").unlink()

    with pytest.raises(UserError, match="test/dogs/dog.6.jpg is missing"):
        prepare_split(small_flat, out, counts=TINY, log=quiet)

    assert prepare_split(small_flat, out, counts=TINY, force=True, log=quiet).changed
    assert names(out) == EXPECTED_TINY


def test_existing_folders_without_a_manifest(small_flat, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_split(small_flat, empty, counts=TINY, log=quiet).changed

    by_hand = tmp_path / "by_hand"
    (by_hand / "train" / "cats").mkdir(parents=True)
    with pytest.raises(UserError, match="no manifest.csv"):
        prepare_split(small_flat, by_hand, counts=TINY, log=quiet)
    assert prepare_split(small_flat, by_hand, counts=TINY, force=True, log=quiet).changed

    # --force replaces splits, never a folder of other things.
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="thesis.tex"):
        prepare_split(small_flat, home, counts=TINY, force=True, log=quiet)
    assert (home / "thesis.tex").read_text() == "years of work"


# ----------------------------------------------------------------------- seeded picks


def test_seeded_selection_is_reproducible_and_depends_on_the_seed(kaggle_flat, tmp_path):
    def picked(seed, name):
        prepare_split(kaggle_flat, tmp_path / name, counts=TINY, seed=seed, log=quiet)
        return manifest_rows(tmp_path / name)

    first, again, other = picked(7, "a"), picked(7, "b"), picked(8, "c")

    assert first == again
    assert {r["file"] for r in first} != {r["file"] for r in other}
    assert names(tmp_path / "a") != EXPECTED_TINY  # not the N ranges
    assert len({r["file"] for r in first}) == 14  # no image in two splits


# --------------------------------------------------------------------------- zip safety


UNSAFE = {
    "parent": "../evil.jpg",
    "deep-parent": "train/../../evil.jpg",
    "absolute": "/abs.jpg",
    "drive": "C:/evil.jpg",
    "backslash": "..\\evil.jpg",
}


@pytest.mark.parametrize("member", list(UNSAFE.values()) + ["symlink"], ids=list(UNSAFE) + ["symlink"])
def test_unsafe_zip_members_reject_the_whole_archive(small_flat, tmp_path, member):
    members = kaggle_members(small_flat, "train/")
    if member == "symlink":
        member = "train/cat.100.jpg"
        archive = write_zip(tmp_path / "train.zip", members, symlinks={member: "/etc/passwd"})
    else:
        archive = write_zip(tmp_path / "train.zip", members | {member: b"payload"})
    before = snapshot(tmp_path)

    with pytest.raises(UserError, match="unsafe member") as refusal:
        prepare_split(archive, tmp_path / "work" / "split", counts=TINY, log=quiet)

    assert repr(member) in str(refusal.value)
    # Nothing written: not the split, not its parent, not where the member points.
    assert snapshot(tmp_path) == before and not (tmp_path / "work").exists()


def test_zip_bomb_guard_stops_before_unpacking(small_flat, tmp_path):
    archive = write_zip(tmp_path / "train.zip", kaggle_members(small_flat, "train/"))
    with pytest.raises(UserError, match="over the .* limit"):
        prepare_split(archive, tmp_path / "split", counts=TINY, max_unpacked_bytes=10_000, log=quiet)
    assert not (tmp_path / "split").exists()


def test_outer_kaggle_zip_points_to_the_inner_one(small_flat, tmp_path):
    inner = write_zip(tmp_path / "train.zip", kaggle_members(small_flat, "train/"))
    kaggle_download = {"train.zip": inner.read_bytes(), "sampleSubmission.csv": b"id,label\n"}
    outer = write_zip(tmp_path / "dogs-vs-cats.zip", kaggle_download)
    with pytest.raises(UserError, match="train.zip"):
        prepare_split(outer, tmp_path / "split", counts=TINY, log=quiet)


# ---------------------------------------------------------------------- user mistakes


def test_not_enough_images_says_how_many_were_found_and_needed(kaggle_flat, tmp_path):
    with pytest.raises(UserError, match=r"cats has 5000, dogs has 5000, but each class needs 5001") as error:
        prepare_split(kaggle_flat, tmp_path / "split", counts=(3000, 1500, 501), log=quiet)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "split").exists()


def test_missing_source(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare_split(tmp_path / "nowhere", tmp_path / "split", log=quiet)
    assert not (tmp_path / "split").exists()


def write_images(folder: Path, names_: list[str], image: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names_:
        shutil.copyfile(image, folder / name)
    return folder


@pytest.mark.parametrize(
    "layout, message",
    [
        ("empty", "No images"),
        ("unlabeled", "carry no class"),
        ("one-class", "one class only"),
        ("not-a-zip", "neither a folder nor a zip"),
        ("scattered", "different parents"),
    ],
)
def test_unusable_sources_are_explained(kaggle_flat, tmp_path, layout, message):
    image = kaggle_flat / "cat.0.jpg"
    source = tmp_path / "source"
    if layout == "empty":
        source.mkdir()
    elif layout == "unlabeled":  # Kaggle's test1 folder: 1.jpg, 2.jpg, ...
        write_images(source, [f"{n}.jpg" for n in range(1, 9)], image)
    elif layout == "one-class":
        write_images(source, [f"cat.{n}.jpg" for n in range(8)], image)
    elif layout == "not-a-zip":
        source = tmp_path / "train.zip"
        source.write_bytes(b"not really a zip")
    elif layout == "scattered":  # a split, not a source: train/cats and test/cats
        source = write_zip(tmp_path / "split.zip", {"train/cats/a.jpg": b"x", "test/cats/b.jpg": b"y"})
    with pytest.raises(UserError, match=message):
        prepare_split(source, tmp_path / "split", counts=TINY, log=quiet)
    assert not (tmp_path / "split").exists()


@pytest.mark.parametrize("counts", [(3, 2), (-1, 2, 2), (0, 0, 0), ("3", 2, 2), (2.5, 2, 2)])
def test_bad_counts(small_flat, tmp_path, counts):
    with pytest.raises(UserError, match="three whole numbers"):
        prepare_split(small_flat, tmp_path / "split", counts=counts, log=quiet)


def test_a_zero_count_leaves_that_split_out(small_flat, tmp_path):
    summary = prepare_split(small_flat, tmp_path / "split", counts=(3, 0, 2), log=quiet)
    assert sorted(summary.counts) == ["test", "train"]
    assert names(tmp_path / "split")["test"]["cats"] == kaggle_names("cat", range(3, 5))


# ------------------------------------------------------------------------ default source


def test_default_source_prefers_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVTRICKS_DATA_SOURCE", str(tmp_path / "typo"))
    assert default_source() == tmp_path / "typo"  # reported later as missing, not replaced


def test_default_source_looks_beside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("CONVTRICKS_DATA_SOURCE", raising=False)
    kaggle = tmp_path / "shared" / "data" / "dogs-vs-cats" / "train"
    kaggle.mkdir(parents=True)
    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")
    assert default_source() == kaggle


def test_default_source_falls_back_to_beside_this_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("CONVTRICKS_DATA_SOURCE", raising=False)
    monkeypatch.chdir(tmp_path)
    checkout = Path(convtricks.__file__).resolve().parents[2]
    beside = checkout.parent / "shared" / "data" / "dogs-vs-cats" / "train"
    assert default_source() == (beside if beside.is_dir() else None)
