"""Mixup, CutMix and progressive resizing: the blends, the blended loss, the size schedule, and a
real run that uses them (deterministic, resumable, bad values refused)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from convtricks.train import run as run_module
from convtricks.data.augment import augment_batch, resize_batch
from convtricks.train.mixing import mix_batch, mixed_loss, progressive_size
from convtricks.train.tasks import BinaryTask
from tests.helpers import history_without_timing as _history, interrupt_after_first_epoch, run_cli


def images(n=6, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_nothing_is_mixed_when_both_alphas_are_zero():
    batch = images()
    mixed = mix_batch(batch, 0.0, 0.0, np.random.default_rng(0))
    assert mixed.share == 1.0 and torch.equal(mixed.inputs, batch)


def test_mixup_blends_each_image_with_its_partner_by_the_share():
    batch = images()
    mixed = mix_batch(batch, 0.4, 0.0, np.random.default_rng(3))
    assert 0.0 < mixed.share < 1.0
    assert sorted(mixed.partner.tolist()) == list(range(6))  # a permutation of the batch
    expected = batch * mixed.share + batch[mixed.partner] * (1 - mixed.share)
    assert torch.allclose(mixed.inputs, expected)
    again = mix_batch(batch, 0.4, 0.0, np.random.default_rng(3))
    assert torch.equal(again.inputs, mixed.inputs) and again.share == mixed.share


def test_cutmix_pastes_one_box_and_its_share_is_the_untouched_area():
    batch = images(size=32)
    for seed in range(20):
        mixed = mix_batch(batch, 0.0, 1.0, np.random.default_rng(seed))
        changed = (mixed.inputs != batch).any(dim=1)  # (n, h, w): pixels taken from the partner
        own = mixed.partner == torch.arange(6)
        pasted = changed[~own].float().mean(dim=(1, 2))
        # Each image differs from its partner almost everywhere, so the changed area is the box.
        assert torch.allclose(pasted, torch.full_like(pasted, 1 - mixed.share), atol=0.02)
        rows, cols = changed.any(dim=(0, 2)), changed.any(dim=(0, 1))
        if rows.any():  # one rectangle: its rows and columns are contiguous
            assert rows.nonzero().flatten().diff().eq(1).all() and cols.nonzero().flatten().diff().eq(1).all()


def test_mixed_loss_is_the_share_weighted_loss_of_both_labels():
    task = BinaryTask()
    logits = torch.tensor([[2.0], [-1.0], [0.5], [0.0]])
    targets = torch.tensor([1, 0, 0, 1])
    mixed = mix_batch(images(4), 0.3, 0.0, np.random.default_rng(1))
    expected = mixed.share * task.loss(logits, targets) + (1 - mixed.share) * task.loss(logits, targets[mixed.partner])
    assert torch.allclose(mixed_loss(task.loss, logits, targets, mixed), expected)
    unmixed = mix_batch(images(4), 0.0, 0.0, np.random.default_rng(1))
    assert torch.equal(mixed_loss(task.loss, logits, targets, unmixed), task.loss(logits, targets))


def test_progressive_size_grows_from_start_to_full_by_the_fraction():
    sizes = [progressive_size([96, 96], 64, 0.75, epoch, 120)[0] for epoch in range(120)]
    assert sizes[0] == 64 and sizes[-1] == 96
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))  # never shrinks
    assert all(size % 8 == 0 for size in sizes)
    # Full size by three quarters of the stage (sizes round to the nearest step, so a little before).
    assert 75 <= sizes.index(96) <= 90 and sizes[60] == 88
    assert progressive_size([96, 96], 0, 0.75, 0, 120) == [96, 96]  # off
    assert progressive_size([64, 64], 64, 0.75, 0, 120) == [64, 64]  # already that small
    assert progressive_size([96, 128], 64, 0.5, 0, 10) == [64, 88]  # the shorter side starts at 64


def test_resize_batch_keeps_channels_last_and_leaves_full_size_alone():
    batch = images(2, 32).contiguous(memory_format=torch.channels_last)
    small = resize_batch(batch, [16, 16])
    assert small.shape == (2, 3, 16, 16) and small.is_contiguous(memory_format=torch.channels_last)
    assert resize_batch(batch, [32, 32]) is batch


FAST = ["--target_size", "64", "--batch_size", "8", "--val_batch_size", "16", "--steps_per_epoch", "2",
        "--depth", "8", "--widths", "[8, 16, 16, 32]", "--ema", "0", "--tta", "false"]
MIXING = ["--mixup", "0.2", "--cutmix", "1.0", "--progressive_start", "32", "--progressive_until", "0.5"]


def test_a_mixing_progressive_run_is_deterministic_and_resumes_to_the_same_history(capsys, tiny_split, tmp_path,
                                                                                   monkeypatch):
    args = ["train", "scratch-best", "--data", tiny_split, "--epochs", "3", *FAST, *MIXING]
    code, out, _ = run_cli(capsys, *args, "--runs", tmp_path / "whole")
    assert code == 0, out
    (whole,) = (tmp_path / "whole").iterdir()
    history = _history(whole)
    assert [row.get("train_size") for row in history] == [32, None, None]  # grown to 64 by half the stage

    code, out, _ = run_cli(capsys, *args, "--runs", tmp_path / "plain", "--mixup", "0", "--cutmix", "0")
    (plain,) = (tmp_path / "plain").iterdir()
    assert [row["loss"] for row in _history(plain)] != [row["loss"] for row in history]  # mixing changed training

    real_fit = interrupt_after_first_epoch(monkeypatch)
    code, out, _ = run_cli(capsys, *args, "--runs", tmp_path / "cut")
    assert code == 130
    (cut,) = (tmp_path / "cut").iterdir()
    monkeypatch.setattr(run_module, "fit", real_fit)
    code, out, _ = run_cli(capsys, "train", "--resume", cut)
    assert code == 0, out
    assert _history(cut) == history
    assert (cut / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


@pytest.mark.parametrize("option, value, words", [
    ("--mixup", "-0.5", "mixup must be a non-negative number"),
    ("--cutmix", "lots", "cutmix must be a non-negative number"),
    ("--progressive_start", "8", "progressive_start must be 0 (off) or a size of at least 16"),
    ("--progressive_until", "1.5", "progressive_until must be a fraction"),
])
def test_bad_mixing_values_are_one_sentence(capsys, tiny_split, tmp_path, option, value, words):
    code, _, err = run_cli(capsys, "train", "scratch-best", "--data", tiny_split, "--runs", tmp_path, option, value)
    assert code != 0 and words in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # no run folder for a refused recipe


def test_training_images_decoded_larger_are_warped_into_the_target_size_then_grown_to_it(
        capsys, tiny_split, tmp_path, monkeypatch):
    from convtricks.train import fit as fit_module

    warped, resized = [], []

    def recording_augment(inputs, config, generator, size=None):
        out = augment_batch(inputs, config, generator, size=size)
        warped.append((tuple(inputs.shape[-2:]), tuple(out.shape[-2:])))
        return out

    def recording_resize(inputs, size):
        out = resize_batch(inputs, size)
        resized.append((tuple(inputs.shape[-2:]), tuple(out.shape[-2:])))
        return out

    monkeypatch.setattr(fit_module, "augment_batch", recording_augment)
    monkeypatch.setattr(fit_module, "resize_batch", recording_resize)
    args = ["train", "scratch-best", "--data", tiny_split, "--epochs", "2", *FAST, "--mixup", "0", "--progressive_start", "32"]
    code, out, _ = run_cli(capsys, *args, "--runs", tmp_path / "large", "--train_decode_size", "96")
    assert code == 0, out
    # Stored at 96 px and augmented straight into the 64 px target; the first epoch then
    # trains smaller (progressive resizing), the last at the target.
    assert set(warped) == {((96, 96), (64, 64))}
    assert {stored for stored, _ in resized} == {(64, 64)} and resized[0][1] < (64, 64) and resized[-1][1] == (64, 64)
    warped.clear()
    code, out, _ = run_cli(capsys, *args, "--runs", tmp_path / "plain")
    assert code == 0, out
    assert set(warped) == {((64, 64), (64, 64))}
    (large,), (plain,) = (tmp_path / "large").iterdir(), (tmp_path / "plain").iterdir()
    assert [row["loss"] for row in _history(large)] != [row["loss"] for row in _history(plain)]
    metrics = json.loads((large / "metrics.json").read_text())
    assert 0 <= metrics["val_acc"] <= 1


@pytest.mark.parametrize("value, words", [
    ("32", "train_decode_size must be [height, width] no smaller than target_size"),
    ("big", "train_decode_size must be"),
])
def test_bad_train_decode_size_is_one_sentence(capsys, tiny_split, tmp_path, value, words):
    code, _, err = run_cli(capsys, "train", "scratch-best", "--data", tiny_split, "--runs", tmp_path, *FAST,
                           "--train_decode_size", value)
    assert code != 0 and words in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_progressive_resizing_is_refused_for_the_small_cnn(capsys, tiny_split, tmp_path):
    code, _, err = run_cli(capsys, "train", "baseline", "--data", tiny_split, "--runs", tmp_path,
                           "--progressive_start", "64")
    assert code != 0 and "small-cnn's dense layer fixes its input size" in err


def _load_time_to_accuracy():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "time_to_accuracy.py"
    spec = importlib.util.spec_from_file_location("time_to_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_time_to_accuracy_reads_runs_and_times_each_target(capsys, tmp_path):
    bench = _load_time_to_accuracy()
    for name, accuracies in (("slow", [0.6, 0.8, 0.85]), ("fast", [0.82, 0.86, 0.91])):
        run = tmp_path / name / f"scratch-best-{name}"  # one level below the folder given, as `--runs` makes
        run.mkdir(parents=True)
        rows = [{"epoch": i + 1, "seconds": 60.0, "val_acc": acc} for i, acc in enumerate(accuracies)]
        (run / "history.json").write_text(json.dumps(rows))
        (run / "metrics.json").write_text(json.dumps({"test_acc": accuracies[-1] - 0.01}))
    code = bench.main([f"slow={tmp_path / 'slow'}", f"fast={tmp_path / 'fast'}", "--targets", "0.844,0.9",
                       "--out", str(tmp_path / "time.png")])
    out = capsys.readouterr().out
    assert code == 0
    assert "| slow | 3 | 3.0 min | never | 85.0% | 84.0% | 3.0 min |" in out
    assert "| fast | 3 | 2.0 min | 3.0 min | 91.0% | 90.0% | 3.0 min |" in out
    assert (tmp_path / "time.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="holds no history.json"):
        bench.main([f"none={tmp_path}"])
