"""Running the CLI in-process and reading what it printed."""

from __future__ import annotations

import json

from convtricks.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def interrupt_after_first_epoch(monkeypatch):
    """Make every run stop with Ctrl-C once its first epoch is saved; returns the real `fit`."""
    from convtricks.train import run as run_module

    real_fit = run_module.fit

    def fit_interrupted_after_first_epoch(*fit_args, **kwargs):
        def stop(state):
            if state.epoch == 1:
                raise KeyboardInterrupt
        return real_fit(*fit_args, **kwargs, on_epoch=stop)

    monkeypatch.setattr(run_module, "fit", fit_interrupted_after_first_epoch)
    return real_fit


def history_without_timing(run_dir):
    """A run's history.json rows without the columns that vary from run to run (timings)."""
    rows = json.loads((run_dir / "history.json").read_text())
    return [{k: v for k, v in row.items() if k not in ("seconds", "train_images_per_s")} for row in rows]
