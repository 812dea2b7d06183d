"""bench/bench_speed.py on tiny inputs: every (model, setting) cell runs, the table prints, and the
verdict on the default follows the numbers. No timing is asserted."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from convtricks import config as recipes

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_speed.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

# Each model shrunk to a few pixels and two images, through the same recipe overrides a user has.
TINY = {
    "baseline": [("target_size", "48,48"), ("batch_size", 2), ("val_batch_size", 3)],
    "deep": [("target_size", "32,32"), ("batch_size", 2), ("val_batch_size", 3)],
    "lite0": [("target_size", "64,64"), ("batch_size", 2), ("val_batch_size", 3), ("pretrained", "none")],
}


@pytest.fixture(scope="module")
def tiny_loads():
    return bench.workloads(TINY, full_lite0=True)


@pytest.fixture(scope="module")
def tiny_cells(tiny_loads, one_thread):
    # The eager backend runs torch.compile's graph capture without paying for C++ code generation.
    return bench.measure_matrix(tiny_loads, repeats=1, warmup=0, compile_backend="eager")


def test_workloads_follow_the_recipes():
    loads = {w.key: w for w in bench.workloads(full_lite0=True)}
    assert set(loads) == {"baseline", "deep", "lite0", "lite0-full"}
    assert (loads["baseline"].size, loads["baseline"].batch_size) == ((150, 150), 20)
    assert loads["baseline"].stage["optimizer"] == "rmsprop"
    deep = loads["deep"].config["model"]
    assert (deep["depth"], deep["widths"], deep["batchnorm"], deep["residual"]) == (8, [24, 48, 96, 192], True, True)
    assert (loads["deep"].size, loads["deep"].batch_size, loads["deep"].stage["optimizer"]) == ((112, 112), 32, "adamw")
    # The fine-tune step: stage 2 of pretrain-finetune, its prefix cached; the whole-net row is not.
    finetune = recipes.stage_plan(recipes.apply_overrides(recipes.read_recipe("pretrain-finetune"), []))[-1]
    assert loads["lite0"].stage["trainable"] == finetune["trainable"]
    assert (loads["lite0"].size, loads["lite0"].batch_size) == ((224, 224), 32)
    assert loads["lite0"].cached_prefix and not loads["lite0-full"].cached_prefix


def test_lite0_step_trains_only_what_follows_the_frozen_prefix(one_thread):
    (lite0,) = [w for w in bench.workloads(TINY) if w.key == "lite0"]
    parts = bench.build_parts(lite0, channels_last=True)
    # The inputs are the prefix's feature maps, not images, and only trainable layers get gradients.
    assert parts.inputs.shape[0] == 2 and parts.inputs.shape[1] != 3
    before = {n: p.detach().clone() for n, p in parts.model.named_parameters()}
    bench._train_mode(parts)
    bench.train_step(parts, parts.forward, "fp32")()
    changed = {n for n, p in parts.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("top.", "base.blocks.5.", "base.blocks.6.", "base.conv_head", "base.bn2"))
                           for n in changed)


def test_every_model_and_setting_has_a_positive_rate(tiny_loads, tiny_cells):
    assert len(tiny_cells) == len(tiny_loads) * (len(bench.SETTINGS) + 1)
    for workload in tiny_loads:
        settings = (*bench.SETTINGS, bench.workload_default(workload))
        mine = {cell.setting: cell for cell in tiny_cells if cell.workload == workload.key}
        assert set(mine) == set(settings)
        for setting, cell in mine.items():
            assert cell.failed is None, cell.failed
            assert isinstance(cell.train_rate, float) and math.isfinite(cell.train_rate) and cell.train_rate > 0
            if setting.time_eval:
                assert isinstance(cell.eval_rate, float) and cell.eval_rate > 0
            else:
                assert cell.eval_rate is None
            assert (cell.compile_seconds is not None and cell.compile_seconds > 0) == setting.compile


def test_the_table_prints_every_row_and_a_verdict(tiny_loads, tiny_cells):
    default = bench.default_setting()
    table = bench.render(tiny_loads, tiny_cells, default, threads=1, repeats=1)
    lines = table.splitlines()
    assert "avx2" in lines[0] and "avx512_bf16" in lines[0] and torch.__version__ in lines[0]
    for workload in tiny_loads:
        start = lines.index(workload.title)
        rows = lines[start + 1:start + 6]
        for row, setting in zip(rows, (*bench.SETTINGS, bench.workload_default(workload))):
            assert row.strip().startswith(setting.label + "  ")
    assert "compile (first step)" in table
    closing = lines[-1]
    assert closing.startswith("Fastest training step per model")
    for workload in tiny_loads:
        assert f"{workload.key}: fastest " in closing


def test_a_compile_failure_fills_its_cell_instead_of_crashing(one_thread):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler here\nsecond line")

    (baseline,) = [w for w in bench.workloads(TINY) if w.key == "baseline"]
    compiled = bench.SETTINGS[3]
    (cell,) = bench.measure_matrix([baseline], repeats=1, warmup=0, settings=(compiled,),
                                   compile_backend=broken_backend)
    assert cell.train_rate is None and "no C++ compiler here" in cell.failed and "\n" not in cell.failed
    table = bench.render([baseline], [cell], bench.default_setting(), threads=1, repeats=1)
    assert "failed: " in table and "baseline: no setting ran" in table


def test_default_setting_is_read_from_the_config(monkeypatch):
    from convtricks.train import fit

    # On a CPU without bf16 units, "auto" precision means fp32: the fp32 channels_last computation.
    monkeypatch.setattr(fit, "has_bf16_units", lambda device: False)
    default = bench.default_setting()
    assert bench.same_numerics(default, bench.SETTINGS[1], torch.device("cpu"))
    # With them, "auto" is bf16 autocast.
    monkeypatch.setattr(fit, "has_bf16_units", lambda device: True)
    assert bench.same_numerics(bench.default_setting(), bench.SETTINGS[2], torch.device("cpu"))
    monkeypatch.setattr(fit, "has_bf16_units", lambda device: False)
    monkeypatch.setitem(recipes.DEFAULTS["train"], "precision", "bf16")
    assert bench.same_numerics(bench.default_setting(), bench.SETTINGS[2], torch.device("cpu"))
    monkeypatch.setitem(recipes.DEFAULTS["train"], "channels_last", False)
    monkeypatch.setitem(recipes.DEFAULTS["train"], "precision", "fp32")
    assert bench.same_numerics(bench.default_setting(), bench.SETTINGS[0], torch.device("cpu"))


def _cells(key: str, rates: dict[str, float], default_rate: float):
    cells = [bench.Cell(key, setting, train_rate=rates[setting.label]) for setting in bench.SETTINGS]
    return cells + [bench.Cell(key, bench.default_setting(), train_rate=default_rate)]


def test_the_verdict_names_the_fastest_setting_and_judges_the_default(monkeypatch):
    from convtricks.train import fit

    monkeypatch.setattr(fit, "has_bf16_units", lambda device: False)  # the default is fp32 channels_last
    (baseline,) = [w for w in bench.workloads() if w.key == "baseline"]
    labels = [s.label for s in bench.SETTINGS]
    default = bench.default_setting()

    cells = _cells("baseline", dict(zip(labels, (40.0, 60.0, 10.0, 55.0))), 59.0)
    (line,) = bench.fastest_lines([baseline], cells, default)
    assert "fastest fp32 channels_last (60.0 img/s)" in line and "matches" in line and "NOT" not in line

    cells = _cells("baseline", dict(zip(labels, (40.0, 60.0, 10.0, 80.0))), 60.0)
    (line,) = bench.fastest_lines([baseline], cells, default)
    assert "fastest torch.compile" in line and "25% slower: does NOT match" in line


def test_accuracy_runs_train_each_model_in_both_precisions(tiny_split, tmp_path, one_thread):
    overrides = {"baseline": [("target_size", "48,48"), ("batch_size", 4)],
                 "deep": [("target_size", "32,32"), ("batch_size", 4)]}
    runs = bench.accuracy_runs(tiny_split, tmp_path, epochs=1, steps_per_epoch=1, threads=1, overrides=overrides)
    assert [(r.workload, r.precision) for r in runs] == [("baseline", "fp32"), ("baseline", "bf16"),
                                                         ("deep", "fp32"), ("deep", "bf16")]
    for run in runs:
        assert 0.0 <= run.val_acc <= 1.0 and math.isfinite(run.val_loss) and run.val_loss > 0
    # Same seed, different arithmetic: each precision is a run of its own, written with its own config.
    configs = sorted(p.read_text() for p in tmp_path.glob("*/config.yaml"))
    assert len(configs) == 4 and sum("precision: bf16" in c for c in configs) == 2
    (baseline,) = [w for w in bench.workloads() if w.key == "baseline"]
    table = bench.render([baseline], [], bench.default_setting(), 1, 1, runs, "1 epoch x 1 step")
    assert table.count("val_acc ") == 4 and "accuracy effect of bf16: 1 epoch x 1 step" in table
    assert "Fastest" not in table  # no speed cells were measured, so no verdict on them


def test_the_default_row_resolves_auto_precision_for_each_model(monkeypatch):
    from convtricks.train import fit

    monkeypatch.setattr(fit, "has_bf16_units", lambda device: True)
    defaults = {w.key: bench.workload_default(w) for w in bench.workloads()}
    # Plain convolutions train in bf16 on such a CPU; EfficientNet's depthwise ones stay fp32.
    assert defaults["baseline"].precision == "bf16" and defaults["deep"].precision == "bf16"
    assert defaults["lite0"].precision == "fp32" and defaults["lite0"].label.startswith("default = fp32")
