"""`validation_freq`: validate every n-th epoch of a stage and always its last (time for epochs)."""

import json

import pytest

from convtricks.report.curves import measured
from convtricks.train.fit import validates
from tests.helpers import run_cli

FAST = ["--target_size", "64", "--batch_size", "8", "--val_batch_size", "16", "--steps_per_epoch", "2",
        "--depth", "8", "--widths", "[8, 16, 16, 32]", "--ema", "0", "--tta", "false"]


@pytest.mark.parametrize("freq, epochs, expected", [
    (1, 3, [True, True, True]),
    (2, 5, [False, True, False, True, True]),  # the last epoch is validated even off the beat
    (4, 2, [False, True]),
])
def test_validates_every_nth_epoch_and_the_last(freq, epochs, expected):
    stage = {"validation_freq": freq, "epochs": epochs}
    assert [validates(epoch, stage) for epoch in range(epochs)] == expected


def test_a_run_validating_every_second_epoch_reports_the_last(capsys, tiny_split, tmp_path):
    code, out, _ = run_cli(capsys, "train", "scratch-best", "--data", tiny_split, "--runs", tmp_path, "--epochs", "3",
                           "--validation_freq", "2", *FAST)
    assert code == 0, out
    (run,) = tmp_path.iterdir()
    history = json.loads((run / "history.json").read_text())
    assert ["val_acc" in row for row in history] == [False, True, True]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val_acc"] == history[-1]["val_acc"] and "test_acc" in metrics
    assert (run / "best.safetensors").exists() and (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert measured(history, "val_acc") == ([2, 3], [history[1]["val_acc"], history[2]["val_acc"]])


@pytest.mark.parametrize("value", ["0", "1.5", "often"])
def test_bad_validation_freq_is_one_sentence(capsys, tiny_split, tmp_path, value):
    code, _, err = run_cli(capsys, "train", "scratch-best", "--data", tiny_split, "--runs", tmp_path,
                           "--validation_freq", value)
    assert code != 0 and "validation_freq must be a positive whole number" in err and "Traceback" not in err
