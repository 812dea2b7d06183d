"""The spine end to end on real images: summary, train, resume, evaluate, predict."""

from __future__ import annotations

import csv
import json

import pytest

from convtricks.train import run as run_module
from tests.helpers import history_without_timing as _history, interrupt_after_first_epoch, run_cli

FAST = ["--target_size", "64", "--batch_size", "8", "--val_batch_size", "16", "--steps_per_epoch", "2"]


def test_summary_matches_the_lecture(capsys):
    code, out, _ = run_cli(capsys, "summary", "small-cnn")
    assert code == 0
    for count in ("896", "18,496", "73,856", "147,584", "3,211,776", "513"):
        assert count in out
    assert "(None, 32, 148, 148)" in out and "(None, 6272)" in out
    assert "Total params: 3,453,121" in out
    assert "Trainable params: 3,453,121" in out and "Non-trainable params: 0" in out


def test_one_epoch_of_the_baseline_writes_the_run_folder(capsys, tiny_split, tmp_path):
    code, out, _ = run_cli(capsys, "train", "baseline", "--data", tiny_split, "--runs", tmp_path / "runs",
                           "--epochs", "1", "--steps_per_epoch", "3", "--val_batch_size", "12")
    assert code == 0, out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("baseline-")
    for name in ("config.yaml", "history.csv", "history.json", "curves.png", "model.safetensors",
                 "best.safetensors", "checkpoint.pt", "metrics.json", "log.txt"):
        assert (run_dir / name).is_file(), name
    assert "Epoch 1/1" in out and "val_acc:" in out
    history = json.loads((run_dir / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1]
    assert {"loss", "acc", "val_loss", "val_acc"} <= set(history[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_images"] == 12 and 0 <= metrics["test_acc"] <= 1
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "Epoch 1/1" in (run_dir / "log.txt").read_text()


def test_same_seed_same_history(capsys, tiny_split, tmp_path):
    for name in ("a", "b"):
        code, out, _ = run_cli(capsys, "train", "baseline", "--data", tiny_split, "--runs", tmp_path / name,
                               "--epochs", "2", *FAST)
        assert code == 0, out
    (first,), (second,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    assert _history(first) == _history(second)
    code, out, _ = run_cli(capsys, "train", "baseline", "--data", tiny_split, "--runs", tmp_path / "c",
                           "--epochs", "2", "--seed", "1", *FAST)
    (third,) = (tmp_path / "c").iterdir()
    assert _history(third) != _history(first)


def test_interrupted_run_resumes_to_the_same_history(capsys, tiny_split, tmp_path, monkeypatch):
    args = ["train", "dropout-aug", "--data", tiny_split, "--epochs", "3", *FAST]
    code, out, _ = run_cli(capsys, *args, "--runs", tmp_path / "whole")
    assert code == 0, out

    real_fit = interrupt_after_first_epoch(monkeypatch)
    code, out, _ = run_cli(capsys, *args, "--runs", tmp_path / "cut")
    assert code == 130
    (cut,) = (tmp_path / "cut").iterdir()
    assert f"convtricks train --resume {cut}" in out
    assert len(_history(cut)) == 1

    monkeypatch.setattr(run_module, "fit", real_fit)
    code, out, _ = run_cli(capsys, "train", "--resume", cut)
    assert code == 0, out
    assert "Resuming" in out
    (whole,) = (tmp_path / "whole").iterdir()
    assert _history(cut) == _history(whole)
    assert (cut / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def trained_run(tiny_split, tmp_path_factory):
    from convtricks.config import apply_overrides, read_recipe
    from convtricks.train.run import start, train_run

    config = apply_overrides(read_recipe("baseline"), [("epochs", "1"), ("target_size", "64"), ("steps_per_epoch", "2")])
    run_dir = start(config, tiny_split, tmp_path_factory.mktemp("runs"))
    train_run(run_dir)
    return run_dir


def test_evaluate_prints_accuracy_and_confusion(capsys, trained_run, tiny_split):
    code, out, _ = run_cli(capsys, "evaluate", trained_run, "--data", tiny_split / "test", "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["images"] == 12 and result["classes"] == ["cats", "dogs"]
    assert sum(map(sum, result["confusion"])) == 12
    assert sum(row[i] for i, row in enumerate(result["confusion"])) == round(result["acc"] * 12)
    assert "true \\ predicted" in out


def test_evaluate_accepts_a_kaggle_flat_folder(capsys, trained_run, tmp_path, kaggle_flat):
    import shutil

    for name in ("cat.1600.jpg", "cat.1601.jpg", "dog.1600.jpg"):
        shutil.copyfile(kaggle_flat / name, tmp_path / name)
    code, out, _ = run_cli(capsys, "evaluate", trained_run, "--data", tmp_path, "--json")
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1])["images"] == 3


def test_predict_prints_labels_and_writes_kaggle_csv(capsys, trained_run, shared_data, tmp_path):
    import shutil

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for n in (1, 2, 10):
        shutil.copyfile(shared_data / "dogs-vs-cats" / "test1" / f"{n}.jpg", folder / f"{n}.jpg")
    code, out, _ = run_cli(capsys, "predict", trained_run, folder, "--csv", tmp_path / "submission.csv")
    assert code == 0
    lines = [line.split("\t") for line in out.splitlines() if "\t" in line]
    assert len(lines) == 3 and all(label in ("cats", "dogs") for _, label, _ in lines)
    rows = list(csv.reader((tmp_path / "submission.csv").open()))
    assert rows[0] == ["id", "label"] and [r[0] for r in rows[1:]] == ["1", "2", "10"]
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows[1:])
    code, out, _ = run_cli(capsys, "predict", trained_run, folder / "2.jpg")
    assert code == 0 and "2.jpg" in out


def test_fine_tuning_a_random_top_straight_away_is_refused(capsys, tiny_split, tmp_path):
    code, out, err = run_cli(capsys, "train", "pretrain", "--data", tiny_split, "--runs", tmp_path,
                             "--trainable", "*", "--target_size", "64")
    assert code == 2 and "destroy the pretrained features" in err
    assert list(tmp_path.iterdir()) == [] or all(not (p / "checkpoint.pt").exists() for p in tmp_path.iterdir())


def test_frozen_base_trains_the_top_on_cached_features(capsys, tiny_split, tmp_path):
    args = ["train", "pretrain-finetune", "--data", tiny_split, "--target_size", "64", "--steps_per_epoch", "2",
            "--epochs", "1", "--val_batch_size", "12"]
    code, out, err = run_cli(capsys, *args, "--runs", tmp_path / "a")
    assert code == 0, err
    assert "ran them once (24 + 12 images" in out  # stage 1: the whole base
    assert "each also mirrored" in out  # stage 2: the frozen prefix, with mirrors
    # The cached path must give the history the full forward pass gives.
    code, out, err = run_cli(capsys, *args, "--feature_cache", "false", "--runs", tmp_path / "b")
    assert code == 0 and "ran them once" not in out
    (a,), (b,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    first = json.loads((a / "history.json").read_text())
    second = json.loads((b / "history.json").read_text())
    assert first[0]["val_acc"] == second[0]["val_acc"]
    assert abs(first[0]["loss"] - second[0]["loss"]) < 1e-4


def test_ema_weights_are_what_the_run_saves_and_tta_evaluates(capsys, tiny_split, tmp_path):
    import torch
    from safetensors.torch import load_file

    code, out, err = run_cli(capsys, "train", "baseline", "--data", tiny_split, "--runs", tmp_path, "--epochs", "2",
                             "--ema", "0.5", *FAST)
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    saved = load_file(str(run_dir / "model.safetensors"))
    raw = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert not torch.equal(saved["dense1.weight"], raw["dense1.weight"])  # the average, not the last step
    code, plain, _ = run_cli(capsys, "evaluate", run_dir, "--json")
    code_tta, mirrored, _ = run_cli(capsys, "evaluate", run_dir, "--json", "--tta")
    assert code == code_tta == 0
    loss = json.loads(plain.strip().splitlines()[-1])["loss"]
    assert json.loads(mirrored.strip().splitlines()[-1])["loss"] != loss
