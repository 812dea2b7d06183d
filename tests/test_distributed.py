"""Data-parallel training (torchrun, DDP on gloo): two processes sharing each global batch must
train the weights one process trains on the whole batch, and only process 0 may write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convtricks.train import distributed
from convtricks.train import run as run_module
from tests.helpers import interrupt_after_first_epoch, run_cli

# No augmentation and no dropout in `baseline`; fp32 and one thread keep the arithmetic comparable.
TINY = ["--target_size", "64", "--batch_size", "8", "--val_batch_size", "16", "--steps_per_epoch", "2",
        "--epochs", "2", "--threads", "1", "--precision", "fp32"]
TOLERANCE = 1e-4

# Loaded into every process torchrun starts (via PYTHONPATH): in any process but rank 0, record
# each file opened for writing, created, renamed or removed under the watched folder.
WATCH_WRITES = '''
import os, sys
if os.environ.get("RANK", "0") != "0" and "WATCHED_DIR" in os.environ:
    watched = os.path.realpath(os.environ["WATCHED_DIR"])
    report = os.environ["WRITES_REPORT"] + "." + os.environ["RANK"]
    with open(report, "w") as handle:
        handle.write("watching\\n")
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    busy = []

    def _inside(path):
        try:
            real = os.path.realpath(os.fsdecode(path))
            return real == watched or real.startswith(watched + os.sep)
        except (TypeError, ValueError):
            return False  # a file descriptor, not a path

    def _hook(event, args):
        if busy:
            return
        if event == "open":
            path, mode, flags = args
            wrote = (mode is not None and any(c in str(mode) for c in "wax+")) or bool((flags or 0) & writing)
            paths = [path] if wrote else []
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        hits = [os.fsdecode(p) for p in paths if _inside(p)]
        if hits:
            busy.append(1)
            with open(report, "a") as handle:
                handle.write(f"{event} {hits}\\n")
            busy.pop()

    sys.addaudithook(_hook)
'''


def torchrun(workdir: Path, *argv, processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m convtricks ...` in `workdir`, with the watch on."""
    hooks = workdir.parent / f"{workdir.name}-hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(WATCH_WRITES)
    env = dict(os.environ, OMP_NUM_THREADS="1", WATCHED_DIR=str(workdir), WRITES_REPORT=str(hooks / "writes"),
               PYTHONPATH=os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "convtricks", *[str(a) for a in argv]]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(1, processes):
        report = (hooks / f"writes.{rank}").read_text().splitlines()
        assert report[0] == "watching"  # the watch ran in that process
        assert report[1:] == [], f"rank {rank} wrote into the run's folders: {report[1:]}"
    return result


def _history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text())


def _assert_same_training(ours: Path, reference: Path) -> None:
    mine, theirs = load_file(str(ours / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert mine.keys() == theirs.keys()
    assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) < TOLERANCE
    for row, expected in zip(_history(ours), _history(reference), strict=True):
        for key in ("loss", "acc", "val_loss", "val_acc"):
            assert row[key] == pytest.approx(expected[key], abs=TOLERANCE), (row["epoch"], key)


@pytest.fixture(scope="module")
def single_process_run(tiny_split, tmp_path_factory):
    """The reference: one process, the whole global batch of 8 at every step."""
    from convtricks.cli import main

    runs = tmp_path_factory.mktemp("single")
    assert main(["train", "baseline", "--data", str(tiny_split), "--runs", str(runs), *TINY]) == 0
    (run_dir,) = runs.iterdir()
    return run_dir


def test_two_processes_train_what_one_process_trains(single_process_run, tiny_split, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = torchrun(workdir, "train", "baseline", "--data", tiny_split, "--runs", "runs", *TINY)

    (run_dir,) = (workdir / "runs").iterdir()  # one run folder, made by process 0
    assert sorted(p.name for p in workdir.iterdir()) == ["runs"]
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in single_process_run.iterdir())
    _assert_same_training(run_dir, single_process_run)

    # The tolerance means something: two steps of RMSprop move the weights much further than it.
    torch.manual_seed(0)
    initial = run_module.build_model(run_module.read_config(run_dir), num_outputs=1).state_dict()
    trained = load_file(str(run_dir / "model.safetensors"))
    assert max((trained[k] - initial[k]).abs().max().item() for k in trained) > 10 * TOLERANCE

    # One voice: each epoch line printed once, and logged once.
    assert result.stdout.count("Epoch 2/2") == 1
    assert (run_dir / "log.txt").read_text().count("Epoch 2/2") == 1


def test_resume_under_torchrun_continues_a_run(single_process_run, tiny_split, tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    workdir.mkdir()
    interrupt_after_first_epoch(monkeypatch)
    from convtricks.cli import main

    assert main(["train", "baseline", "--data", str(tiny_split), "--runs", str(workdir / "runs"), *TINY]) == 130
    monkeypatch.undo()
    (cut,) = (workdir / "runs").iterdir()
    assert len(_history(cut)) == 1

    result = torchrun(workdir, "train", "--resume", cut)
    assert "Resuming" in result.stdout and result.stdout.count("Epoch 2/2") == 1
    assert [p.name for p in (workdir / "runs").iterdir()] == [cut.name]
    _assert_same_training(cut, single_process_run)


def test_a_batch_that_cannot_be_shared_evenly_is_refused(capsys, tiny_split, tmp_path, monkeypatch):
    # What torchrun --nproc_per_node 2 tells each process; the check comes before any joins the group.
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}.items():
        monkeypatch.setenv(name, value)
    code, out, err = run_cli(capsys, "train", "baseline", "--data", tiny_split, "--runs", tmp_path / "runs",
                             "--batch_size", "5", "--epochs", "1")
    assert code == 2
    assert err.strip() == "error: batch_size 5 cannot be split evenly over 2 processes; use a multiple of 2."
    assert not distributed.active() and not (tmp_path / "runs").exists()


def test_a_plain_run_has_no_process_group():
    model = torch.nn.Linear(2, 1)
    batch = torch.arange(8)
    assert distributed.world() == 1 and distributed.is_main() and not distributed.active()
    assert distributed.trained(model) is model
    assert torch.equal(distributed.shard(batch), batch) and distributed.share(5) == slice(0, 5)
    assert distributed.total({"loss": 2.0}, 4) == ({"loss": 2.0}, 4)
    assert distributed.rank_seed(123) == 123  # a single process keeps its seeds
