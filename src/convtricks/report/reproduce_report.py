"""The report of a reproduce folder: REPORT.md and a self-contained report.html.

Everything is read from the folder (reproduce.json and the stages' own files), so the report can
be rebuilt at any time. The document is built once as a list of blocks (headings, paragraphs,
tables, figures) and written twice: Markdown that links the run folders' figures, and HTML with
every figure embedded as a data URI (no file, style or script fetched from anywhere).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import re
from pathlib import Path

import yaml

from convtricks.atomic import write_text
from convtricks.errors import UserError

# The lecture's "Summary of the results", beside the stage that reproduces each row.
LECTURE_ROWS = {
    "baseline": ("small CNN (3.5M params)", "99.0%", "72.4%", "—"),
    "dropout-aug": ("+ dropout + augmentation", "84.9%", "84.4%", "—"),
    "pretrain": ("VGG16 pretrained, train new top", "98.9%", "95.1%", "—"),
    "pretrain-finetune": ("VGG16 pretrained, fine-tune top conv block", "99.95%", "97.5%", "96.8%"),
}
NOT_IN_LECTURE = ("—", "—", "—")
STAGE_TITLES = {
    "baseline": "Baseline: the small CNN",
    "dropout-aug": "Tricks 1-2: dropout and data augmentation",
    "pretrain": "Trick 3, step 4: pretrained base, new top",
    "pretrain-finetune": "Trick 3, step 5: fine-tuning the top blocks",
    "ensemble": "Trick 4: ensemble (bagging)",
    "multitask": "Trick 5: multi-task learning on faces",
    "optimization": "Tricks for better optimization: batch norm, skip connections, auxiliary heads",
    "scratch-best": "The best recipe from scratch",
}


# ---------------------------------------------------------------------------------------------
# Reading the folder.


def _json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _percent(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _number(value, fmt: str = "{:.4f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def _model_text(config: dict) -> str:
    model = config.get("model", {}).get("name", "?")
    size = config.get("data", {}).get("target_size")
    return f"{model} at {size[0]}×{size[1]}" if isinstance(size, list) and len(size) == 2 else model


def _ensemble_members(folder: Path) -> list[dict]:
    """Each member's name, folder and metrics (None until finished)."""
    info = _json(folder / "ensemble.json") or {}
    members = []
    for member in info.get("members", []):
        member_dir = folder / member.get("dir", "")
        members.append({"name": member.get("name", "?"), "dir": member_dir,
                        "metrics": _json(member_dir / "metrics.json")})
    return members


def _sweep_rows(folder: Path) -> list[dict]:
    try:
        with open(folder / "comparison.csv", newline="") as file:
            return list(csv.DictReader(file))
    except OSError:
        return []


def _float(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Numbers for the summary table: (ours train, val, test, notes) per stage.


def _summary_numbers(name: str, kind: str, folder: Path | None) -> tuple[str, str, str, str, str]:
    """(our model, train acc, val acc, test acc, notes) for one stage's row."""
    if folder is None or not folder.exists():
        return ("not run", "—", "—", "—", "")
    if kind == "ensemble":
        metrics = _json(folder / "metrics.json")
        members = _ensemble_members(folder)
        finished = [m["metrics"] for m in members if m["metrics"]]
        model = f"{len(members)} × " + (_model_text(_config(members[0]["dir"])) if members else "?")
        if metrics is None:
            return (model, "—", "—", "—", "unfinished")
        mean = lambda key: sum(m[key] for m in finished) / len(finished) if finished and all(  # noqa: E731
            isinstance(m.get(key), (int, float)) for m in finished) else None
        test = metrics.get("test") or {}
        notes = (f"train/val: members' mean; test: soft vote (hard vote {_percent(test.get('hard', {}).get('acc'))}, "
                 f"members {_percent(test.get('members_mean_acc'))} mean)") if test else "no test split"
        return (model, _percent(mean("acc")), _percent(mean("val_acc")),
                _percent(test.get("soft", {}).get("acc")), notes)
    if kind == "sweep":
        rows = [row for row in _sweep_rows(folder) if row.get("finished", "").lower() == "true"]
        if not rows:
            return ("deep-cnn variants", "—", "—", "—", "unfinished" if folder.exists() else "")
        basis = "test_acc" if all(_float(row.get("test_acc")) is not None for row in rows) else "val_acc"
        best = max(rows, key=lambda row: _float(row.get(basis)) or 0.0)
        return (f"{len(rows)} variants", _percent(_float(best.get("train_acc"))), _percent(_float(best.get("val_acc"))),
                _percent(_float(best.get("test_acc"))), f"best variant by {basis.replace('_', ' ')}: {best['variant']}")
    metrics = _json(folder / "metrics.json")
    model = _model_text(_config(folder))
    if metrics is None:
        return (model, "—", "—", "—", "unfinished")
    if kind == "multitask":
        notes = (f"faces, test: age MAE {_number(metrics.get('test_age_mae'), '{:.1f}')} years, gender "
                 f"{_percent(metrics.get('test_gender_acc'))}, race {_percent(metrics.get('test_race_acc'))}")
        return (model, "—", "—", "—", notes)
    notes = "test-time mirrors" if _config(folder).get("train", {}).get("tta") else ""
    return (model, _percent(metrics.get("acc")), _percent(metrics.get("val_acc")), _percent(metrics.get("test_acc")),
            notes)


# ---------------------------------------------------------------------------------------------
# The document as blocks.


class Document:
    """Blocks: ("h1"|"h2"|"h3"|"p"|"pre", text), ("table", header, rows), ("image", path, caption)."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str):
        self.blocks.append((f"h{level}", text))

    def paragraph(self, text: str):
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]):
        self.blocks.append(("ul", items))

    def code(self, text: str):
        self.blocks.append(("pre", text))

    def table(self, header: list[str], rows: list[list[str]]):
        self.blocks.append(("table", header, rows))

    def image(self, path: Path, caption: str):
        if Path(path).is_file():
            self.blocks.append(("image", Path(path), caption))


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(document: Document, base: Path) -> str:
    lines: list[str] = []
    for block in document.blocks:
        kind = block[0]
        if kind.startswith("h"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "pre":
            lines += ["```", block[1], "```", ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "image":
            relative = Path(os.path.relpath(block[1], base)).as_posix()
            lines += [f"![{block[2]}]({relative})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _inline_html(text: str) -> str:
    """Escaped text with the two Markdown marks the report uses: `code` and **bold**."""
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
code, pre { background: #f6f6f6; font-size: 0.92em; }
pre { padding: 0.6em; overflow-x: auto; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.6em 1em; }
"""


def to_html(document: Document, title: str) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>"]
    for block in document.blocks:
        kind = block[0]
        if kind.startswith("h"):
            parts.append(f"<{kind}>{_inline_html(block[1])}</{kind}>")
        elif kind == "p":
            note = ' class="note"' if block[1].startswith("**Quick run") else ""
            parts.append(f"<p{note}>{_inline_html(block[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "pre":
            parts.append(f"<pre>{html.escape(block[1])}</pre>")
        elif kind == "table":
            header, rows = block[1], block[2]
            parts.append("<table><thead><tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in header)
                         + "</tr></thead><tbody>")
            parts += ["<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</tbody></table>")
        elif kind == "image":
            data = base64.b64encode(block[1].read_bytes()).decode("ascii")
            caption = html.escape(block[2])
            parts.append(f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{caption}</figcaption></figure>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Sections.


def _machine_lines(state: dict) -> list[str]:
    invocations = state.get("invocations") or [{}]
    machine = invocations[-1].get("machine") or {}
    lines = [
        f"CPU: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
        + (f", {machine['memory_gib']} GiB memory" if machine.get("memory_gib") else ""),
        f"GPU: {machine['gpu']}" if machine.get("gpu") else "GPU: none (CPU only)",
        f"torch {machine.get('torch', '?')}, Python {machine.get('python', '?')}, {machine.get('system', '?')}",
    ]
    for number, invocation in enumerate(invocations, 1):
        load = invocation.get("load_average_at_start")
        end = invocation.get("load_average_at_end")
        ran = ", ".join(invocation.get("stages", []))
        what = f"ran {ran}" if ran else "found every stage finished"
        lines.append(f"Invocation {number}: started {invocation.get('started', '?')}, {what} in "
                     f"{duration(invocation.get('seconds'))} ({duration(invocation.get('cpu_seconds'))} of CPU time)"
                     + (f"; load average (1/5/15 min) {load} at start, {end} at end" if load else ""))
    return lines


def _stage_folder(out: Path, record: dict | None) -> Path | None:
    if not record or not record.get("folder"):
        return None
    return out / record["folder"]


def _summary_table(document: Document, out: Path, state: dict, order: list[str]) -> None:
    header = ["configuration (lecture)", "lecture train", "lecture val", "lecture test",
              "stage (ours)", "our model", "train acc", "val acc", "test acc", "time here", "notes"]
    rows = []
    for name in order:
        record = state["stages"].get(name)
        kind = (record or {}).get("kind", "train")
        lecture = LECTURE_ROWS.get(name)
        configuration = lecture[0] if lecture else "—"
        lecture_numbers = lecture[1:] if lecture else NOT_IN_LECTURE
        model, train, val, test, notes = _summary_numbers(name, kind, _stage_folder(out, record))
        rows.append([configuration, *lecture_numbers, f"`{name}`", model, train, val, test,
                     duration((record or {}).get("seconds")), notes])
    document.table(header, rows)


def _train_section(document: Document, folder: Path, record: dict) -> None:
    metrics = _json(folder / "metrics.json")
    if metrics is None:
        document.paragraph("Unfinished: run the same command again to continue it from its last epoch.")
    else:
        document.bullets([
            f"Epochs: {metrics.get('epochs', '—')}; last epoch: training acc {_percent(metrics.get('acc'))} "
            f"(loss {_number(metrics.get('loss'))}), validation acc {_percent(metrics.get('val_acc'))} "
            f"(loss {_number(metrics.get('val_loss'))}); best validation {_percent(metrics.get('best_val'))}.",
            f"Test: acc {_percent(metrics.get('test_acc'))} on {metrics.get('test_images', '—')} images no model saw."
            if "test_acc" in metrics else "No test split.",
            f"Training speed: {_number(metrics.get('train_images_per_s'), '{:.1f}')} images/s, "
            f"{_number(metrics.get('mean_epoch_seconds'), '{:.1f}')} s per epoch (validation included); "
            f"peak memory {_number(metrics.get('peak_rss_mb'), '{:,.0f}')} MB.",
        ])
    document.image(folder / "curves.png", f"{record.get('recipe', '')}: accuracy and loss against epochs")


def _ensemble_section(document: Document, folder: Path) -> None:
    metrics = _json(folder / "metrics.json")
    members = _ensemble_members(folder)
    test = (metrics or {}).get("test")
    by_name = {m["name"]: m for m in (test or {}).get("members", [])}
    rows = []
    for member in members:
        own = member["metrics"] or {}
        voted = by_name.get(member["name"], {})
        rows.append([member["name"], _percent(own.get("acc")), _percent(own.get("val_acc")),
                     _percent(voted.get("acc", own.get("test_acc"))), _number(voted.get("loss", own.get("test_loss")))])
    if test:
        rows.append(["members' mean ± std", "", "", f"{_percent(test.get('members_mean_acc'))} ± "
                     f"{_percent(test.get('members_std_acc'))}", ""])
        rows.append(["soft vote (mean probability)", "", "", _percent(test["soft"]["acc"]),
                     _number(test["soft"].get("loss"))])
        rows.append(["hard vote (majority)", "", "", _percent(test["hard"]["acc"]), ""])
    document.table(["member", "train acc", "val acc", "test acc", "test loss"], rows)
    if test:
        boot = test.get("bootstrap", {})
        document.paragraph(
            f"{test.get('images', '—')} test images. Two members disagree on {_percent(test.get('disagreement'))} of "
            f"them on average. Standard deviation of accuracy over {boot.get('resamples', '—')} bootstrap "
            f"resamples of the test images: members {_number(boot.get('members_mean_std_acc'))} (mean), soft vote "
            f"{_number(boot.get('soft_std_acc'))}, hard vote {_number(boot.get('hard_std_acc'))}.")
    elif metrics is None:
        document.paragraph("Unfinished: run the same command again; finished members are kept.")
    for member in members:
        document.image(member["dir"] / "curves.png", f"member {member['name']}: accuracy and loss against epochs")


def _multitask_section(document: Document, folder: Path) -> None:
    metrics = _json(folder / "metrics.json")
    if metrics is None:
        document.paragraph("Unfinished: run the same command again to continue it from its last epoch.")
    else:
        rows = []
        for task, key, label, fmt in (("age", "age_mae", "mean absolute error (years)", "{:.2f}"),
                                      ("gender", "gender_acc", "accuracy", None),
                                      ("race", "race_acc", "accuracy (5 classes)", None)):
            if task not in metrics.get("tasks", []):
                continue
            show = (lambda v: _number(v, fmt)) if fmt else _percent
            weight = _number(metrics.get("loss_weights", {}).get(task), "{:.4g}")
            rows.append([task, label, show(metrics.get(key)), show(metrics.get(f"val_{key}")),
                         show(metrics.get(f"test_{key}")), weight])
        document.table(["task", "metric", "train", "validation", "test", "loss weight"], rows)
        per_race = metrics.get("test_race_acc_per_class")
        if per_race:
            document.paragraph("Test race accuracy per class: " + ", ".join(
                f"{race} {_percent(acc)}" for race, acc in per_race.items()) + ".")
        document.paragraph(f"{metrics.get('test_images', '—')} test faces; {metrics.get('epochs', '—')} epochs; "
                           f"{_number(metrics.get('params'), '{:,}')} parameters; weighting "
                           f"{metrics.get('weighting', '—')}.")
    document.image(folder / "curves.png", "multitask: losses, accuracies and age MAE against epochs")


def _markdown_blocks(document: Document, text: str, folder: Path) -> None:
    """The subset of Markdown a sweep's comparison.md uses: headings, tables, figures, paragraphs."""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].rstrip()
        if line.startswith("|"):
            table = []
            while index < len(lines) and lines[index].startswith("|"):
                table.append([cell.strip() for cell in re.split(r"(?<!\\)\|", lines[index].strip())[1:-1]])
                index += 1
            body = [row for row in table[1:] if not all(re.fullmatch(r":?-+:?", cell) for cell in row)]
            document.table(table[0], body)
            continue
        image = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line)
        if image:
            document.image(folder / image.group(2), image.group(1))
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            if level > 1:  # the file's own title is the section's heading here
                document.heading(3, line.lstrip("#").strip())
        elif line:
            document.paragraph(line)
        index += 1


def _sweep_section(document: Document, folder: Path) -> None:
    comparison = folder / "comparison.md"
    if not comparison.is_file():
        document.paragraph("Unfinished: run the same command again to continue it.")
        return
    _markdown_blocks(document, comparison.read_text(), folder)


def _stage_section(document: Document, out: Path, name: str, record: dict | None) -> None:
    document.heading(2, STAGE_TITLES.get(name, name))
    folder = _stage_folder(out, record)
    if record is None or folder is None or not folder.exists():
        document.paragraph("Not run in this folder (`--only` left it out, or it has not started yet).")
        return
    what = record.get("what", "")
    document.paragraph(f"{what[:1].upper() + what[1:]}. Folder: `{record['folder']}`; time on this machine: "
                       f"{duration(record.get('seconds'))} ({duration(record.get('cpu_seconds'))} of CPU time). "
                       "The same stage alone:")
    document.code(record.get("command", ""))
    kind = record.get("kind")
    if kind == "ensemble":
        _ensemble_section(document, folder)
    elif kind == "multitask":
        _multitask_section(document, folder)
    elif kind == "sweep":
        _sweep_section(document, folder)
    else:
        _train_section(document, folder, record)


def build_document(out: Path, state: dict) -> Document:
    from convtricks.experiments.reproduce import STAGE_NAMES

    document = Document()
    quick = state.get("mode") == "quick"
    document.heading(1, "The tricks you must know, reproduced" + (" (quick run)" if quick else ""))
    if quick:
        per_class = state.get("settings", {}).get("split_per_class")
        faces = state.get("settings", {}).get("faces")
        shrunk = []
        if per_class:
            shrunk.append(f"{per_class[0]} / {per_class[1]} / {per_class[2]} train / validation / test images "
                          "per class")
        if faces:
            shrunk.append(f"{faces} faces")
        document.paragraph(
            "**Quick run with shortened schedules**: smaller images, few epochs and steps"
            + (f", {' and '.join(shrunk)}" if shrunk else "")
            + ". It shows every stage running end to end; its accuracies are **not** the lecture's comparison. "
              "The full run is `convtricks reproduce` (hours on a CPU).")
    else:
        document.paragraph("Full run: the recipes as shipped, on the lecture's split "
                           "(2,000 training, 1,000 validation, 1,000 test images by default).")
    faces = f"; faces: `{state['faces']}`" if state.get("faces") else ""
    document.paragraph(f"Data: `{state.get('data', '?')}`{faces}. Our pretrained base is EfficientNet-Lite0 "
                       "(ImageNet weights); the lecture's is VGG16.")

    document.heading(2, "Machine")
    document.bullets(_machine_lines(state))

    document.heading(2, "Summary of the results")
    _summary_table(document, out, state, list(STAGE_NAMES))
    stage_seconds = sum(r.get("seconds", 0.0) for r in state.get("stages", {}).values())
    total = sum(s.get("seconds", 0.0) for s in state.get("invocations", []))
    cpu = sum(s.get("cpu_seconds", 0.0) for s in state.get("invocations", []))
    document.paragraph(
        f"**Total time on this machine: {duration(total)}** over {len(state.get('invocations', []))} invocation(s): "
        f"stages {duration(stage_seconds)}, data preparation {duration(state.get('data_seconds', 0.0))}, "
        f"the rest loading and reporting; {duration(cpu)} of CPU time (all cores together: it grows far less "
        "than wall time when other jobs share the machine; see the load averages above). Train and validation "
        "accuracy are the last epoch's (training accuracy measured on augmented batches, as Keras reports it); "
        "test accuracy is on images no model saw.")
    if quick:
        rows = [[f"`{name}`", ", ".join(f"{k} {v}" for k, v in record.get("settings", {}).items()) or "as shipped"]
                for name, record in state.get("stages", {}).items()]
        if rows:
            document.heading(3, "Quick settings")
            document.table(["stage", "overrides of the recipe"], rows)

    for name in STAGE_NAMES:
        _stage_section(document, out, name, state.get("stages", {}).get(name))
    return document


def build_report(out: Path) -> tuple[Path, Path]:
    """Write REPORT.md and report.html in the reproduce folder `out`; returns their paths."""
    from convtricks.experiments.reproduce import read_state

    out = Path(out)
    if not out.is_dir():
        raise UserError(f"Reproduce folder {out} does not exist.")
    state = read_state(out)
    document = build_document(out, state)
    title = "The tricks you must know, reproduced"
    write_text(out / "REPORT.md", to_markdown(document, out))
    write_text(out / "report.html", to_html(document, title))
    return out / "REPORT.md", out / "report.html"
