"""Numeric precision per device, and every shipped recipe runs end to end on tiny data."""

from __future__ import annotations

import json

import pytest
import torch

from convtricks.train.fit import autocast_for
from tests.helpers import run_cli


def test_auto_precision_is_bf16_autocast_where_the_device_has_bf16_units(monkeypatch):
    from convtricks.train import fit

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not fit.has_bf16_units(torch.device("cpu"))
    with autocast_for(torch.device("cpu"), "auto"):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert fit.has_bf16_units(torch.device("cpu"))
    with autocast_for(torch.device("cpu"), "auto"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_for(torch.device("cpu"), "fp32"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    assert fit.has_bf16_units(torch.device("cuda")) and not fit.has_bf16_units(torch.device("mps"))
    with autocast_for(torch.device("cpu"), "bf16"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else _nothing():
        on_gpu = autocast_for(torch.device("cuda"), "auto")
    assert isinstance(on_gpu, torch.autocast) and on_gpu.device == "cuda" and on_gpu.fast_dtype == torch.bfloat16
    assert not isinstance(autocast_for(torch.device("cuda"), "fp32"), torch.autocast)


def test_auto_precision_is_resolved_per_model(monkeypatch):
    from convtricks.train import fit

    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    depthwise = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.Conv2d(6, 6, 3, groups=6))
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(fit, "has_bf16_units", lambda device: True)
    assert fit.resolve_precision("auto", cpu, plain) == "bf16"
    assert fit.resolve_precision("auto", cpu, depthwise) == "fp32"  # measured slower in bf16 on a CPU
    assert fit.resolve_precision("auto", gpu, depthwise) == "bf16"
    assert fit.resolve_precision("fp32", cpu, plain) == "fp32" and fit.resolve_precision("bf16", cpu, depthwise) == "bf16"
    monkeypatch.setattr(fit, "has_bf16_units", lambda device: device.type == "cuda")
    assert fit.resolve_precision("auto", cpu, plain) == "fp32"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_unknown_precision_is_one_sentence(capsys, tiny_split, tmp_path):
    code, _, err = run_cli(capsys, "train", "baseline", "--data", tiny_split, "--runs", tmp_path, "--precision", "fp16")
    assert code == 2 and "precision must be auto, fp32 or bf16" in err
    assert not list(tmp_path.iterdir())


# Each shipped recipe, shrunk to seconds: the keys it sets must all be accepted and work together.
SHRINK = {
    "baseline": [], "dropout-aug": [], "scratch-best": [],
}


@pytest.mark.parametrize("recipe", sorted(SHRINK))
def test_from_scratch_recipes_run_end_to_end(capsys, tiny_split, tmp_path, recipe, one_thread):
    code, out, err = run_cli(capsys, "train", recipe, "--data", tiny_split, "--runs", tmp_path, "--epochs", "1",
                             "--steps_per_epoch", "2", "--target_size", "[48,48]", *SHRINK[recipe])
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["recipe"] == recipe and 0.0 <= metrics["test_acc"] <= 1.0



def test_a_mapping_on_the_command_line_overrides_the_loss_weights():
    from convtricks.config import apply_overrides, read_recipe

    config = apply_overrides(read_recipe("multitask"), [("multitask.weights", "{age: 1, gender: 1, race: 1}"),
                                                        ("tasks", "age,race")])
    assert config["multitask"]["weights"] == {"age": 1, "gender": 1, "race": 1}
    assert config["multitask"]["tasks"] == ["age", "race"]
