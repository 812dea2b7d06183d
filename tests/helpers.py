"""Running the CLI in-process and reading what it printed."""

from __future__ import annotations

from convtricks.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
