"""Every mistake a user can make ends in one clear sentence and exit code 2, never a traceback."""

from __future__ import annotations

import pickle
import shutil

import pytest

from tests.helpers import run_cli


def assert_one_sentence_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def make_split(root, kaggle_flat, classes=("cat", "dog"), count=4):
    for split in ("train", "validation"):
        for animal in classes:
            folder = root / split / f"{animal}s"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                shutil.copyfile(kaggle_flat / f"{animal}.{n}.jpg", folder / f"{animal}.{n}.jpg")
    return root


FAST = ["--epochs", "1", "--target_size", "48", "--batch_size", "4", "--steps_per_epoch", "1"]


def test_missing_data_folder(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "baseline", "--data", tmp_path / "nowhere", "--runs", tmp_path / "runs")
    assert_one_sentence_error(code, out, err, "does not exist", "convtricks prepare")
    assert not (tmp_path / "runs").exists()


def test_single_class(capsys, tmp_path, kaggle_flat):
    data = make_split(tmp_path / "data", kaggle_flat, classes=("cat",))
    code, out, err = run_cli(capsys, "train", "baseline", "--data", data, "--runs", tmp_path / "runs", *FAST)
    assert_one_sentence_error(code, out, err, "single class")


def test_empty_class_folder(capsys, tmp_path, kaggle_flat):
    data = make_split(tmp_path / "data", kaggle_flat)
    (data / "train" / "horses").mkdir()
    code, out, err = run_cli(capsys, "train", "baseline", "--data", data, "--runs", tmp_path / "runs", *FAST)
    assert_one_sentence_error(code, out, err, "horses", "no images")


def test_corrupt_and_non_image_files_are_skipped_with_one_warning(capsys, tmp_path, kaggle_flat):
    data = make_split(tmp_path / "data", kaggle_flat)
    (data / "train" / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (data / "train" / "dogs" / "notes.png").write_text("hello")
    truncated = (kaggle_flat / "dog.5.jpg").read_bytes()[:300]
    (data / "train" / "dogs" / "truncated.jpg").write_bytes(truncated)
    code, out, err = run_cli(capsys, "train", "baseline", "--data", data, "--runs", tmp_path / "runs", *FAST)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "unreadable" in line]
    assert len(warnings) == 1
    assert "3 unreadable" in warnings[0] and "broken.jpg" in warnings[0] and "notes.png" in warnings[0]
    assert "Found 8 training images" in out


def test_unknown_recipe_and_unknown_key(capsys, tmp_path, kaggle_flat):
    data = make_split(tmp_path / "data", kaggle_flat)
    code, out, err = run_cli(capsys, "train", "no-such-recipe", "--data", data)
    assert_one_sentence_error(code, out, err, "Unknown recipe", "baseline")
    code, out, err = run_cli(capsys, "train", "baseline", "--data", data, "--epoch", "3")
    assert_one_sentence_error(code, out, err, "--epoch")
    code, out, err = run_cli(capsys, "train", "baseline", "--data", data, "--epochs", "-2")
    assert_one_sentence_error(code, out, err, "epochs")


def test_bad_recipe_file(capsys, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("train: {epochs: [1, 2\n")
    code, out, err = run_cli(capsys, "show-recipe", recipe)
    assert_one_sentence_error(code, out, err, "not valid YAML")
    recipe.write_text("train: {epohcs: 3}\n")
    code, out, err = run_cli(capsys, "show-recipe", recipe)
    assert_one_sentence_error(code, out, err, "epohcs")


def test_resume_and_evaluate_need_a_run_folder(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--resume", tmp_path)
    assert_one_sentence_error(code, out, err, "not a run folder")
    code, out, err = run_cli(capsys, "evaluate", tmp_path)
    assert_one_sentence_error(code, out, err, "not a run folder")


def test_checkpoints_are_never_unpickled(capsys, tmp_path, kaggle_flat):
    data = make_split(tmp_path / "data", kaggle_flat)
    code, out, err = run_cli(capsys, "train", "baseline", "--data", data, "--runs", tmp_path / "runs", *FAST)
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (run_dir / "checkpoint.pt").write_bytes(pickle.dumps({"epoch": Exploit()}))
    code, out, err = run_cli(capsys, "train", "--resume", run_dir)
    assert_one_sentence_error(code, out, err, "cannot be read safely")
    assert not marker.exists()
    assert (run_dir / "model.safetensors").exists()  # the earlier run's results are untouched


def test_predict_on_missing_or_broken_image(capsys, tmp_path, kaggle_flat):
    data = make_split(tmp_path / "data", kaggle_flat)
    code, out, err = run_cli(capsys, "train", "baseline", "--data", data, "--runs", tmp_path / "runs", *FAST)
    (run_dir,) = (tmp_path / "runs").iterdir()
    code, out, err = run_cli(capsys, "predict", run_dir, tmp_path / "missing.jpg")
    assert_one_sentence_error(code, out, err, "does not exist")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"junk")
    code, out, err = run_cli(capsys, "predict", run_dir, broken)
    assert_one_sentence_error(code, out, err, "not a readable image")


def test_prepare_missing_source(capsys, tmp_path):
    code, out, err = run_cli(capsys, "prepare", "--source", tmp_path / "nothing", "--out", tmp_path / "split")
    assert code == 2 and "Traceback" not in err and err.startswith("error: ")


@pytest.mark.parametrize("model", ["no-such-net"])
def test_unknown_model_in_summary(capsys, model):
    code, out, err = run_cli(capsys, "summary", model)
    assert_one_sentence_error(code, out, err, "Unknown model or recipe", "small-cnn")
