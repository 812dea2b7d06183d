"""`convtricks reproduce`: stages into run folders, the stage -> folder map, resuming and skipping,
and the report (the lecture's figures beside ours, self-contained HTML)."""

from __future__ import annotations

import json
import re

import pytest

from convtricks.errors import UserError
from convtricks.experiments import reproduce as reproducing
from tests.helpers import interrupt_after_first_epoch, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"target_size": 48, "epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "val_batch_size": 12, "threads": 1}
# Same shape as reproduce.QUICK: a smaller split (per class) and fewer faces are built from the given data.
TINY = {
    "split_per_class": [8, 4, 4],
    "faces": 40,
    "stages": {
        "baseline": {**FAST, "epochs": 2},
        "ensemble": {"members": 2, "parallel": 1, **FAST},
        "multitask": FAST,
    },
}
STAGES = ["baseline", "ensemble", "multitask"]


@pytest.fixture(scope="module")
def faces(shared_data):
    return shared_data / "utkface"


@pytest.fixture(scope="module")
def reproduced(tiny_split, faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "quick"
    reproducing.reproduce(out, tiny_split, faces, quick=True, only=STAGES, settings=TINY)
    return out


def _state(out):
    return json.loads((out / "reproduce.json").read_text())


def _metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def test_each_stage_is_a_run_folder_mapped_in_reproduce_json(reproduced):
    state = _state(reproduced)
    assert state["mode"] == "quick" and state["plan"] == STAGES
    assert set(state["stages"]) == set(STAGES)
    for name in STAGES:
        record = state["stages"][name]
        folder = reproduced / record["folder"]
        assert record["folder"].startswith(f"{name}/") and (folder / "metrics.json").is_file(), name
        assert record["seconds"] > 0
    assert (reproduced / state["stages"]["ensemble"]["folder"] / "ensemble.json").is_file()
    multitask = _metrics(reproduced / state["stages"]["multitask"]["folder"])
    assert {"test_age_mae", "test_gender_acc", "test_race_acc"} <= set(multitask)
    # The quick data: the first 8 / 4 / 4 images of each class, and 40 faces, linked into the folder.
    split = reproduced / "data" / "split"
    assert [len(list((split / s / "cats").iterdir())) for s in ("train", "validation", "test")] == [8, 4, 4]
    assert sorted(p.name for p in (split / "train" / "dogs").iterdir())[:2] == ["dog.0.jpg", "dog.1.jpg"]
    assert len(list((reproduced / "data" / "faces").glob("*.jpg"))) == 40
    assert _metrics(reproduced / state["stages"]["baseline"]["folder"])["test_images"] == 8


def _row(report: str, start: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {start}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_puts_the_lectures_figures_beside_ours(reproduced):
    state = _state(reproduced)
    report = (reproduced / "REPORT.md").read_text()
    assert "Quick run" in "\n".join(report.splitlines()[:3]) and "not** the lecture's comparison" in report
    baseline = _metrics(reproduced / state["stages"]["baseline"]["folder"])
    row = _row(report, "small CNN")
    assert row[1:4] == ["99.0%", "72.4%", "—"]
    assert row[6:9] == [f"{100 * baseline[k]:.1f}%" for k in ("acc", "val_acc", "test_acc")]
    assert _row(report, "VGG16 pretrained, fine-tune")[1:4] == ["99.95%", "97.5%", "96.8%"]
    assert "not run" in _row(report, "+ dropout")  # a stage --only left out keeps its lecture row

    ensemble = _metrics(reproduced / state["stages"]["ensemble"]["folder"])["test"]
    assert _row(report, "soft vote")[3] == f"{100 * ensemble['soft']['acc']:.1f}%"
    assert _row(report, "hard vote")[3] == f"{100 * ensemble['hard']['acc']:.1f}%"
    assert len([line for line in report.splitlines() if re.match(r"\| \d-bootstrap", line)]) == 2

    multitask = _metrics(reproduced / state["stages"]["multitask"]["folder"])
    assert _row(report, "age")[4] == f"{multitask['test_age_mae']:.2f}"
    assert _row(report, "gender")[4] == f"{100 * multitask['test_gender_acc']:.1f}%"
    assert "Total time on this machine" in report and "CPU:" in report
    # Figures are linked from the run folders, relative to the report.
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (reproduced / link).is_file(), link


def test_report_html_is_self_contained(reproduced):
    page = (reproduced / "report.html").read_text()
    report = (reproduced / "REPORT.md").read_text()
    assert page.count("data:image/png;base64,") == report.count("![") >= 4
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    assert "72.4%" in page and "<table>" in page


def test_a_rerun_skips_finished_stages(reproduced, tiny_split, faces, monkeypatch):
    from convtricks.train import ensemble, multitask
    from convtricks.train import run as run_module

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    for module, name in ((run_module, "train_run"), (run_module, "start"), (multitask, "train_multitask_run"),
                         (ensemble, "run_ensemble")):
        monkeypatch.setattr(module, name, must_not_train)
    before = _state(reproduced)
    reproducing.reproduce(reproduced, tiny_split, faces, quick=True, only=STAGES, settings=TINY)
    after = _state(reproduced)
    assert len(after["invocations"]) == len(before["invocations"]) + 1 and after["invocations"][-1]["stages"] == []
    assert {n: r["folder"] for n, r in after["stages"].items()} == {n: r["folder"] for n, r in before["stages"].items()}


def test_other_settings_in_the_same_folder_are_refused(reproduced, tiny_split, faces):
    with pytest.raises(UserError, match="other settings"):
        reproducing.reproduce(reproduced, tiny_split, faces, quick=True, only=["baseline"],
                              settings={**TINY, "split_per_class": [6, 3, 3]})


def test_report_only_rebuilds_the_report(reproduced, capsys):
    (reproduced / "REPORT.md").unlink()
    (reproduced / "report.html").unlink()
    code, out, err = run_cli(capsys, "reproduce", "--report-only", "--out", reproduced)
    assert code == 0, err
    assert "72.4%" in (reproduced / "REPORT.md").read_text()
    assert "data:image/png;base64," in (reproduced / "report.html").read_text()


def test_report_only_on_a_folder_without_a_reproduce_run_is_one_sentence(capsys, tmp_path):
    code, out, err = run_cli(capsys, "reproduce", "--report-only", "--out", tmp_path)
    assert code == 2 and "is not a reproduce folder" in err and len(err.strip().splitlines()) == 1


def test_an_unknown_stage_in_only_is_one_sentence_naming_the_stages(capsys, tmp_path):
    code, out, err = run_cli(capsys, "reproduce", "--only", "baseline,finetune", "--out", tmp_path / "r")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "finetune" in err and all(name in err for name in reproducing.STAGE_NAMES)
    assert not (tmp_path / "r").exists()


def test_only_follows_the_lectures_order():
    assert reproducing.parse_only("ensemble, baseline") == ["baseline", "ensemble"]
    with pytest.raises(UserError):
        reproducing.parse_only(" , ")


def test_an_interrupted_stage_resumes_from_its_checkpoint(tiny_split, tmp_path, monkeypatch):
    from convtricks.train import run as run_module

    settings = {"split_per_class": None, "faces": None, "stages": {"baseline": {**FAST, "epochs": 2}}}
    real_fit = interrupt_after_first_epoch(monkeypatch)
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        reproducing.reproduce(out, tiny_split, quick=True, only=["baseline"], settings=settings)
    record = _state(out)["stages"]["baseline"]
    run_dir = out / record["folder"]
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "metrics.json").exists()
    first_seconds = record["seconds"]

    monkeypatch.setattr(run_module, "fit", real_fit)
    reproducing.reproduce(out, tiny_split, quick=True, only=["baseline"], settings=settings)
    record = _state(out)["stages"]["baseline"]
    assert out / record["folder"] == run_dir  # the same run folder, continued
    assert [row["epoch"] for row in json.loads((run_dir / "history.json").read_text())] == [1, 2]
    assert "Resuming" in (run_dir / "log.txt").read_text()
    assert record["seconds"] > first_seconds  # time on this machine adds up over invocations


SWEEP_RECIPE = """
recipe: optimization-check
model: {name: deep-cnn, depth: 8, widths: [8, 16, 32]}
train: {grad_norms: true, optimizer: adam, lr: 1.0e-3}
variants:
  batchnorm: {model.batchnorm: true}
  all: {model.batchnorm: true, model.residual: true, model.aux_heads: true}
"""


def test_the_optimization_stage_is_a_sweep_compared_in_the_report(tiny_split, tmp_path, monkeypatch):
    recipe = tmp_path / "optimization.yaml"
    recipe.write_text(SWEEP_RECIPE)
    monkeypatch.setitem(reproducing.BY_NAME, "optimization",
                        reproducing.Stage("optimization", "sweep", str(recipe), "a sweep of a deep net"))
    settings = {"split_per_class": None, "faces": None,
                "stages": {"optimization": {**FAST, "only": ["reference", "all"]}}}
    out = tmp_path / "r"
    reproducing.reproduce(out, tiny_split, quick=True, only=["optimization"], settings=settings)
    sweep = out / _state(out)["stages"]["optimization"]["folder"]
    assert (sweep / "comparison.md").is_file() and not (sweep / "batchnorm").exists()
    report = (out / "REPORT.md").read_text()
    assert _row(report, "reference")[1] == "—" and _row(report, "all")[1].startswith("model.batchnorm=true")
    assert "--only reference,all" in report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == report.count("![") >= 2  # loss, val_acc (and grad norms)
