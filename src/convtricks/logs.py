"""Where messages go: plain lines on stdout, warnings on stderr, and a copy in the run's log.txt."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER = logging.getLogger("convtricks")


class _Plain(logging.Formatter):
    def format(self, record):
        message = record.getMessage()
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


def setup_console() -> None:
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    for handler in list(LOGGER.handlers):
        if getattr(handler, "_convtricks_console", False):
            LOGGER.removeHandler(handler)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(_Plain())
        handler._convtricks_console = True
        LOGGER.addHandler(handler)


def log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_Plain())
    LOGGER.addHandler(handler)
    return handler
