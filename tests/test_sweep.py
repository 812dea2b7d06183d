"""`convtricks sweep`: a recipe and its variants trained side by side, then compared."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from convtricks.experiments.sweep import plan_variants, write_sweep_report
from convtricks.report.sweep import time_to
from convtricks.train import run as run_module
from tests.helpers import run_cli

# A deep CNN small enough that a sweep of three variants trains in seconds.
TINY_RECIPE = {
    "recipe": "tiny-sweep",
    "model": {"name": "deep-cnn", "depth": 8, "widths": [4, 8, 8, 8], "batchnorm": True},
    "data": {"target_size": [32, 32], "batch_size": 8, "val_batch_size": 12},
    "train": {"epochs": 5, "steps_per_epoch": 1, "optimizer": "adam", "lr": 1.0e-3, "grad_norms": True,
              "threads": 1},  # tiny convs: a second thread only spin-waits
    "variants": {
        "no-batchnorm": {"model.batchnorm": False},
        "skip": {"model.residual": True, "train.lr": 3.0e-3},
    },
    "sweep_targets": [0.5, 0.99],
}
# Given on the command line: applies to every variant, the reference too.
SHORT = ["--epochs", "2"]
VARIANTS = ("reference", "no-batchnorm", "skip")


def write_recipe(folder, recipe) -> str:
    path = folder / f"{recipe['recipe']}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


class TrainingSpy:
    """Wraps train_run to record which run folders trained, and how."""

    def __init__(self, monkeypatch, forbid: bool = False):
        self.calls: list[tuple[str, bool]] = []
        real = run_module.train_run

        def spy(run_dir, resume=False):
            self.calls.append((run_dir.name, resume))
            if forbid:
                raise AssertionError(f"{run_dir} should not have trained")
            return real(run_dir, resume=resume)

        monkeypatch.setattr(run_module, "train_run", spy)


@pytest.fixture(scope="module")
def sweep(tiny_split, tmp_path_factory, one_thread):
    """A sweep run in two calls: two variants first (--only), then the rest."""
    root = tmp_path_factory.mktemp("sweep")
    recipe = write_recipe(root, TINY_RECIPE)
    out = root / "out"
    patch = pytest.MonkeyPatch()
    spy = TrainingSpy(patch)
    try:
        code_first = _cli(recipe, "--data", tiny_split, "--out", out, "--only", "reference,no-batchnorm", *SHORT)
        first_report = (out / "comparison.md").read_text()
        code_second = _cli(recipe, "--data", tiny_split, "--out", out, *SHORT)
    finally:
        patch.undo()
    return {"recipe": recipe, "out": out, "data": tiny_split, "codes": (code_first, code_second),
            "first_report": first_report, "calls": spy.calls}


def _cli(*argv) -> int:
    from convtricks.cli import main

    return main(["sweep", *[str(a) for a in argv]])


def _csv_rows(out):
    return list(csv.DictReader((out / "comparison.csv").open()))


def test_sweep_writes_a_run_folder_per_variant_and_the_comparison(sweep):
    out = sweep["out"]
    assert sweep["codes"] == (0, 0)
    for name in VARIANTS:
        for file in ("config.yaml", "history.json", "metrics.json", "model.safetensors", "checkpoint.pt", "log.txt"):
            assert (out / name / file).is_file(), f"{name}/{file}"
    for file in ("sweep.json", "comparison.md", "comparison.csv", "loss.png", "val_acc.png", "grad_norms.png"):
        assert (out / file).is_file(), file
    assert (out / "grad_norms.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(VARIANTS)  # no staging left behind

    info = json.loads((out / "sweep.json").read_text())
    assert info["recipe"] == "tiny-sweep" and info["targets"] == [0.5, 0.99]
    assert [(v["name"], v["run"]) for v in info["variants"]] == [(n, n) for n in VARIANTS]
    assert info["variants"][1]["changes"] == {"model.batchnorm": False}
    assert info["overrides"] == [["epochs", "2"]]
    # The second call trained only what the first left out.
    assert sweep["calls"] == [("reference", False), ("no-batchnorm", False), ("skip", False)]
    assert "Not trained yet: skip." in sweep["first_report"]


def test_each_variant_trained_its_own_config(sweep):
    configs = {name: yaml.safe_load((sweep["out"] / name / "config.yaml").read_text()) for name in VARIANTS}
    assert configs["reference"]["model"]["batchnorm"] is True and configs["reference"]["model"].get("residual") is None
    assert configs["no-batchnorm"]["model"]["batchnorm"] is False
    assert configs["skip"]["model"]["residual"] is True and configs["skip"]["model"]["batchnorm"] is True
    assert configs["skip"]["train"]["lr"] == pytest.approx(3e-3)
    assert configs["reference"]["train"]["lr"] == pytest.approx(1e-3)
    for name, config in configs.items():
        assert config["train"]["epochs"] == 2, name  # the command line's override reached every variant
        assert config["variants"] == {}, name  # each run is a plain run of one configuration
        history = json.loads((sweep["out"] / name / "history.json").read_text())
        assert len(history) == 2 and "grad_first_conv" in history[0]
    weights = {name: (sweep["out"] / name / "model.safetensors").read_bytes() for name in VARIANTS}
    assert len(set(weights.values())) == 3


def test_comparison_table_has_a_row_per_variant(sweep):
    from convtricks.models.registry import create_model

    rows = {row["variant"]: row for row in _csv_rows(sweep["out"])}
    assert list(rows) == list(VARIANTS)
    reference_test_acc = json.loads((sweep["out"] / "reference" / "metrics.json").read_text())["test_acc"]
    for name, row in rows.items():
        history = json.loads((sweep["out"] / name / "history.json").read_text())
        metrics = json.loads((sweep["out"] / name / "metrics.json").read_text())
        assert int(row["epochs"]) == 2
        assert float(row["val_acc"]) == pytest.approx(history[-1]["val_acc"])
        assert float(row["best_val_acc"]) == pytest.approx(max(r["val_acc"] for r in history))
        assert float(row["test_acc"]) == pytest.approx(metrics["test_acc"])
        assert float(row["train_seconds"]) == pytest.approx(sum(r["seconds"] for r in history), abs=0.01)
        assert row["delta_basis"] == "test_acc"
        assert float(row["delta_acc"]) == pytest.approx(metrics["test_acc"] - reference_test_acc, abs=1e-6)
    assert rows["no-batchnorm"]["changes"] == "model.batchnorm=false"
    assert rows["reference"]["changes"] == "" and float(rows["reference"]["delta_seconds"]) == 0
    plain = create_model("deep-cnn", depth=8, widths=[4, 8, 8, 8], batchnorm=False, input_size=[32, 32])
    assert int(rows["no-batchnorm"]["parameters"]) == sum(p.numel() for p in plain.parameters())
    assert rows["reference"]["parameters"] != rows["no-batchnorm"]["parameters"]
    assert "seconds_to_0.5" in rows["reference"] and "seconds_to_0.99" in rows["reference"]
    markdown = (sweep["out"] / "comparison.md").read_text()
    assert "| no-batchnorm | model.batchnorm=false |" in markdown
    assert "time to 99% val" in markdown and "![Gradient norms per layer](grad_norms.png)" in markdown


def test_a_variant_run_is_an_ordinary_run(capsys, sweep):
    code, out, _ = run_cli(capsys, "evaluate", sweep["out"] / "skip", "--json")
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1])["images"] == 12


def test_rerunning_keeps_finished_variants(capsys, sweep, monkeypatch):
    out = sweep["out"]
    before = {name: (out / name / "history.json").stat().st_mtime_ns for name in VARIANTS}
    spy = TrainingSpy(monkeypatch, forbid=True)
    code, printed, err = run_cli(capsys, "sweep", sweep["recipe"], "--data", sweep["data"], "--out", out, *SHORT)
    assert code == 0, err
    assert spy.calls == []
    assert printed.count("finished earlier, kept") == 3
    assert {name: (out / name / "history.json").stat().st_mtime_ns for name in VARIANTS} == before


def test_an_interrupted_variant_resumes_from_its_checkpoint(capsys, sweep, monkeypatch, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sweep["out"], out)
    (out / "skip" / "metrics.json").unlink()  # as if stopped after its last checkpoint
    spy = TrainingSpy(monkeypatch)
    code, printed, err = run_cli(capsys, "sweep", sweep["recipe"], "--data", sweep["data"], "--out", out, *SHORT)
    assert code == 0, err
    assert spy.calls == [("skip", True)]
    assert (out / "skip" / "metrics.json").is_file()
    assert json.loads((out / "skip" / "history.json").read_text()) == \
        json.loads((sweep["out"] / "skip" / "history.json").read_text())


def test_an_interrupted_sweep_says_how_to_continue(capsys, tiny_split, tmp_path, monkeypatch):
    def interrupted(run_dir, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "train_run", interrupted)
    out = tmp_path / "out"
    code, printed, _ = run_cli(capsys, "sweep", write_recipe(tmp_path, TINY_RECIPE), "--data", tiny_split,
                               "--out", out, *SHORT)
    assert code == 130 and "continues the sweep" in printed and str(out) in printed
    assert (out / "sweep.json").is_file() and (out / "reference" / "config.yaml").is_file()


def test_changed_settings_on_a_finished_variant_are_refused(capsys, sweep, monkeypatch):
    spy = TrainingSpy(monkeypatch, forbid=True)
    code, _, err = run_cli(capsys, "sweep", sweep["recipe"], "--data", sweep["data"], "--out", sweep["out"],
                           "--epochs", "3")
    assert code == 2 and "other settings" in err and spy.calls == []


def test_report_only_redraws_without_training(capsys, sweep, monkeypatch, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sweep["out"], out)
    for file in ("comparison.md", "comparison.csv", "loss.png", "val_acc.png", "grad_norms.png"):
        (out / file).unlink()
    spy = TrainingSpy(monkeypatch, forbid=True)
    code, _, err = run_cli(capsys, "sweep", sweep["recipe"], "--out", out, "--report-only")
    assert code == 0, err
    for file in ("comparison.md", "comparison.csv", "loss.png", "val_acc.png", "grad_norms.png"):
        assert (out / file).is_file(), file
    assert (out / "comparison.csv").read_text() == (sweep["out"] / "comparison.csv").read_text()
    assert spy.calls == []
    code, _, err = run_cli(capsys, "sweep", sweep["recipe"], "--out", out, "--report-only", "--epochs", "3")
    assert code == 2 and "--report-only" in err


@pytest.mark.parametrize("changes, said", [
    ({"train.epoch": 3}, "epoch"),  # a typo in a checked section
    ({"model.batchnorms": True}, "batchnorms"),  # a model option only the model's own code knows
    ({"augment.rotation": 40}, "rotation"),  # an augmentation option
    ({"bogus.key": 1}, "bogus"),  # no such section
])
def test_a_bad_variant_fails_before_anything_trains(capsys, tiny_split, tmp_path, monkeypatch, changes, said):
    recipe = {**TINY_RECIPE, "variants": {"fine": {"model.batchnorm": False}, "typo": changes}}
    spy = TrainingSpy(monkeypatch, forbid=True)
    code, _, err = run_cli(capsys, "sweep", write_recipe(tmp_path, recipe), "--data", tiny_split,
                           "--out", tmp_path / "out", *SHORT)
    assert code == 2 and spy.calls == []
    message = err.strip()
    assert message.startswith("error: In variant 'typo':") and said in message
    assert len(message.splitlines()) == 1 and message.endswith(".")
    assert not (tmp_path / "out").exists()


def test_bad_names_and_missing_variants_are_user_errors(capsys, tmp_path):
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "variants": {"a/b": {"model.batchnorm": False}}})
    code, _, err = run_cli(capsys, "sweep", recipe, "--out", tmp_path / "out")
    assert code == 2 and "'a/b'" in err
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "variants": {}})
    code, _, err = run_cli(capsys, "sweep", recipe, "--out", tmp_path / "out")
    assert code == 2 and "no variants" in err
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    code, _, err = run_cli(capsys, "sweep", recipe, "--out", tmp_path / "out", "--only", "skip,nope")
    assert code == 2 and "nope" in err
    code, _, err = run_cli(capsys, "sweep", recipe, "--out", tmp_path / "elsewhere", "--report-only")
    assert code == 2 and "not a sweep folder" in err


def test_yaml_values_keep_their_types():
    recipe = {**TINY_RECIPE, "variants": {"v": {"model.batchnorm": False, "train.lr": 0.5, "model.dropout": 0.25,
                                                "train.schedule": "cosine", "train.trainable": ["stage4.*"]}}}
    reference, variant = plan_variants(recipe)
    assert variant.config["model"]["batchnorm"] is False  # not 0
    assert variant.config["train"]["lr"] == 0.5 and variant.config["model"]["dropout"] == 0.25
    assert variant.config["train"]["schedule"] == "cosine" and variant.config["train"]["trainable"] == ["stage4.*"]
    assert reference.config["model"]["batchnorm"] is True and reference.config["train"]["schedule"] == "constant"


def test_show_recipe_lists_variants_and_train_ignores_them(capsys, tiny_split, tmp_path):
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    code, out, _ = run_cli(capsys, "show-recipe", recipe)
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["variants"]["skip"] == {"model.residual": True, "train.lr": 3.0e-3}
    assert shown["sweep_targets"] == [0.5, 0.99]
    code, _, err = run_cli(capsys, "train", recipe, "--data", tiny_split, "--runs", tmp_path / "runs",
                           "--epochs", "1", "--steps_per_epoch", "1")
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["batchnorm"] is True
    code, _, err = run_cli(capsys, "show-recipe", write_recipe(tmp_path, {**TINY_RECIPE, "sweep_targets": [84.4]}))
    assert code == 2 and "sweep_targets" in err


# ---------------------------------------------------------------------------------------------
# The report on histories written by hand.


def _row(epoch, seconds, val_acc, loss, **extra):
    return {"epoch": epoch, "stage": "train", "lr": 1e-3, "loss": loss, "acc": val_acc, "val_loss": loss,
            "val_acc": val_acc, "seconds": seconds, "train_images_per_s": 100.0, **extra}


def test_time_to_counts_seconds_up_to_the_first_epoch_that_reaches_the_target():
    history = [_row(1, 10.0, 0.50, 0.7), _row(2, 12.5, 0.85, 0.5), _row(3, 11.0, 0.80, 0.4), _row(4, 9.0, 0.92, 0.3)]
    assert time_to(history, 0.844) == pytest.approx(22.5)
    assert time_to(history, 0.85) == pytest.approx(22.5)  # reaching it exactly counts
    assert time_to(history, 0.90) == pytest.approx(42.5)  # the dip at epoch 3 does not reset the clock
    assert time_to(history, 0.95) is None
    assert time_to([], 0.5) is None


def _hand_written_sweep(folder, grad_norms: bool):
    fast = [_row(1, 10.0, 0.50, 0.7), _row(2, 12.5, 0.85, 0.5), _row(3, 11.0, 0.91, 0.4)]
    slow = [_row(1, 20.0, 0.55, 0.69), _row(2, 20.0, 0.60, 0.68), _row(3, 20.0, 0.70, 0.6)]
    if grad_norms:
        for index, row in enumerate(slow):
            row.update(grad_first_conv=1e-4 * (index + 1), grad_middle_conv=1e-2, grad_last_conv=0.0)
    folder.mkdir()
    info = {"format": 1, "recipe": "by-hand", "data_dir": "", "overrides": [], "targets": [0.844, 0.9],
            "variants": [{"name": "reference", "changes": {}, "run": "reference"},
                         {"name": "slow", "changes": {"model.batchnorm": False}, "run": "slow"},
                         {"name": "never-ran", "changes": {"train.lr": 0.1}, "run": "never-ran"}]}
    (folder / "sweep.json").write_text(json.dumps(info))
    for name, history, test_acc in (("reference", fast, 0.9), ("slow", slow, 0.65)):
        (folder / name).mkdir()
        (folder / name / "history.json").write_text(json.dumps(history))
        (folder / name / "metrics.json").write_text(json.dumps({"test_acc": test_acc, "params": 1000}))
    return folder


def test_report_on_hand_written_histories(tmp_path):
    folder = _hand_written_sweep(tmp_path / "plain", grad_norms=False)
    write_sweep_report(folder)
    assert not (folder / "grad_norms.png").exists()
    rows = {row["variant"]: row for row in _csv_rows(folder)}
    assert list(rows) == ["reference", "slow"]
    assert float(rows["reference"]["seconds_to_0.844"]) == pytest.approx(22.5)
    assert float(rows["reference"]["seconds_to_0.9"]) == pytest.approx(33.5)
    assert rows["slow"]["seconds_to_0.844"] == "" and rows["slow"]["seconds_to_0.9"] == ""
    assert float(rows["slow"]["delta_acc"]) == pytest.approx(-0.25)
    assert float(rows["slow"]["delta_seconds"]) == pytest.approx(60 - 33.5)
    assert float(rows["slow"]["median_epoch_seconds"]) == pytest.approx(20.0)
    assert float(rows["reference"]["median_epoch_seconds"]) == pytest.approx(11.0)
    markdown = (folder / "comparison.md").read_text()
    slow_line = next(line for line in markdown.splitlines() if line.startswith("| slow |"))
    assert slow_line.count("not reached") == 2 and "-25.0 pp" in slow_line
    assert "Not trained yet: never-ran." in markdown and "grad_norms.png" not in markdown

    folder = _hand_written_sweep(tmp_path / "grads", grad_norms=True)
    write_sweep_report(folder)
    assert (folder / "grad_norms.png").read_bytes()[:4] == b"\x89PNG"
    assert "![Gradient norms per layer](grad_norms.png)" in (folder / "comparison.md").read_text()
