"""The Keras `history`: one row per epoch, kept as CSV and JSON in the run folder."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from convtricks.atomic import write_text


def write_history(run_dir: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(run_dir / "history.csv", buffer.getvalue())
    write_text(run_dir / "history.json", json.dumps(rows, indent=1))


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def keras_line(row: dict, epochs: int, metric_names=("acc",)) -> str:
    """`Epoch 3/30 - 14s - loss: 0.5123 - acc: 0.7450 - val_loss: 0.5531 - val_acc: 0.7210`."""
    parts = [f"Epoch {row['epoch']}/{epochs}", f"{row['seconds']:.0f}s", f"loss: {row['loss']:.4f}"]
    parts += [f"{name}: {row[name]:.4f}" for name in metric_names if name in row]
    if "val_loss" in row:
        parts.append(f"val_loss: {row['val_loss']:.4f}")
        parts += [f"val_{name}: {row['val_' + name]:.4f}" for name in metric_names if "val_" + name in row]
    return " - ".join(parts)
