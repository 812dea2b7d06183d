"""CPU speed matrix: which numeric setting trains each of three models fastest, printed as one table.

    python bench/bench_speed.py [--repeats 5] [--threads N] [--quick] [--accuracy [--data DIR]] [--accuracy-only] [--full-lite0]

Models, each as the project trains it:
- baseline: the lecture's small CNN, 150x150, batch 20, RMSprop 1e-4 (recipe `baseline`);
- deep BN/skip net: the from-scratch recipe `scratch-best` (deep-cnn with batch norm, depth 8,
  widths 24-48-96-192, 112x112, batch 32, AdamW) with its skip connections switched on;
- Lite0 fine-tune: stage 2 of `pretrain-finetune` at 224x224, batch 32. Its frozen prefix runs
  once per image in a real run (train/features.py), so the timed step is what that run does:
  forward/backward through the trainable blocks on the prefix's output. --full-lite0 adds the
  step through the whole network (what it would cost without the cache), for reference.

Settings: fp32 NCHW, fp32 channels_last, bf16 autocast (channels_last), torch.compile (fp32,
channels_last), and "default": what the training loop does with the default config on this
machine. Each cell is a training step's images/s (forward + backward + optimizer step), the
median of --repeats after warm-up; evaluation images/s (forward only) for fp32 channels_last and
bf16. torch.compile's first step (where it compiles) is timed on its own; a failure fills the
cell with "failed: <why>". --accuracy also trains the baseline and the deep net (each with all
of its recipe: augmentation, EMA, mirrored evaluation) for 2 short epochs on the lecture split
with precision fp32 and bf16, same seed, and prints validation accuracy and loss.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from convtricks import config as recipes
from convtricks.train.features import extract, frozen_trunk
from convtricks.train.fit import Batcher, autocast_for, resolve_precision
from convtricks.train.freezing import freeze_except, set_train_mode
from convtricks.train.optim import make_optimizer
from convtricks.train.run import build_model
from convtricks.train.tasks import BinaryTask

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts
from bench_baseline import median_rate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")

# The deep BN/skip net: the project's from-scratch recipe (deep-cnn with batch norm, depth 8,
# batch 32, AdamW) with its skip connections switched on, at 24-192 channels and 112x112 (what
# the README's matrix was measured at; the recipe itself now trains 32-256 channels at 128x128).
DEEP_RECIPE = "scratch-best"
DEEP_OVERRIDES = [("model.residual", "true"), ("model.widths", "[24, 48, 96, 192]"), ("target_size", "112")]


# ---------------------------------------------------------------------------------------------
# What is timed: settings and workloads.


@dataclass(frozen=True)
class Setting:
    label: str
    channels_last: bool
    precision: str  # as a recipe writes it: fp32 | bf16 | auto
    compile: bool
    time_eval: bool = False  # evaluation speed is compared for fp32 vs bf16 only


SETTINGS = (
    Setting("fp32 NCHW", channels_last=False, precision="fp32", compile=False),
    Setting("fp32 channels_last", channels_last=True, precision="fp32", compile=False, time_eval=True),
    Setting("bf16 autocast, channels_last", channels_last=True, precision="bf16", compile=False, time_eval=True),
    Setting("torch.compile fp32, channels_last", channels_last=True, precision="fp32", compile=True),
)


def default_setting(device: torch.device = torch.device("cpu"), model: torch.nn.Module | None = None) -> Setting:
    """What the training loop does with the default config on a CPU, read from the config itself
    so the row follows any change of default; with `model`, `auto` precision as resolved for it."""
    train = recipes.DEFAULTS["train"]
    precision = train["precision"] if model is None else resolve_precision(train["precision"], device, model)
    bf16 = isinstance(autocast_for(device, precision), torch.autocast)
    return Setting(f"default = {'bf16 autocast' if bf16 else 'fp32'}, {'channels_last' if train['channels_last'] else 'NCHW'}"
                   f"{', torch.compile' if train['compile'] else ', eager'}",
                   channels_last=bool(train["channels_last"]), precision=precision, compile=bool(train["compile"]))


def workload_default(workload) -> Setting:
    """The default setting as the training loop resolves it for this workload's model."""
    return default_setting(model=build_model(workload.config, num_outputs=1))


def same_numerics(a: Setting, b: Setting, device: torch.device) -> bool:
    """Whether two settings run the same computation (the default is one of the named settings)."""
    bf16 = [isinstance(autocast_for(device, s.precision), torch.autocast) for s in (a, b)]
    return a.channels_last == b.channels_last and a.compile == b.compile and bf16[0] == bf16[1]


@dataclass
class Workload:
    """One model as a recipe trains it; `cached_prefix` times the step on the frozen prefix's output."""

    key: str
    title: str
    config: dict  # resolved recipe
    stage: dict  # the stage whose step is timed (its trainable layers, optimizer, bn_eval)
    cached_prefix: bool = False

    @property
    def batch_size(self) -> int:
        return self.config["data"]["batch_size"]

    @property
    def eval_batch_size(self) -> int:
        return self.config["data"]["val_batch_size"]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.config["data"]["target_size"])


def _resolved(recipe: dict, overrides) -> dict:
    return recipes.apply_overrides(recipe, [(key, str(value)) for key, value in overrides])


def workloads(overrides: dict[str, list[tuple[str, object]]] | None = None, full_lite0: bool = False) -> list[Workload]:
    """The three models (and optionally the whole-network Lite0 step); `overrides[key]` are recipe
    overrides (`("target_size", "48,48")`) for one of them, which is how a test shrinks them."""
    overrides = overrides or {}
    baseline = _resolved(recipes.read_recipe("baseline"), overrides.get("baseline", []))
    deep = _resolved(recipes.read_recipe(DEEP_RECIPE), DEEP_OVERRIDES + list(overrides.get("deep", [])))
    lite0 = _resolved(recipes.read_recipe("pretrain-finetune"), overrides.get("lite0", []))
    finetune = recipes.stage_plan(lite0)[-1]
    size = lambda config: "x".join(str(side) for side in config["data"]["target_size"])  # noqa: E731
    found = [
        Workload("baseline", f"baseline small CNN ({size(baseline)}, batch {baseline['data']['batch_size']}, "
                 f"{baseline['train']['optimizer']})", baseline, recipes.stage_plan(baseline)[-1]),
        Workload("deep", f"deep BN/skip net ({DEEP_RECIPE} + residual, depth {deep['model']['depth']}, {size(deep)}, "
                 f"batch {deep['data']['batch_size']}, {deep['train']['optimizer']})", deep, recipes.stage_plan(deep)[-1]),
        Workload("lite0", f"Lite0 fine-tune step on the cached frozen prefix ({size(lite0)}, "
                 f"batch {lite0['data']['batch_size']}, {finetune['optimizer']})", lite0, finetune, cached_prefix=True),
    ]
    if full_lite0:
        found.append(Workload("lite0-full", f"REFERENCE: Lite0 fine-tune, whole network every step ({size(lite0)}, "
                              f"batch {lite0['data']['batch_size']}; real runs cache the prefix)", lite0, finetune))
    return found


@dataclass
class Parts:
    """Everything one timed step touches, built fresh per setting (no optimizer state carries over)."""

    model: torch.nn.Module
    forward: Callable  # the model, or the trainable rest of it
    inputs: torch.Tensor
    targets: torch.Tensor
    eval_inputs: torch.Tensor
    optimizer: torch.optim.Optimizer
    bn_eval: bool


def _random_images(count: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, *size), dtype=torch.uint8, generator=generator)


def build_parts(workload: Workload, channels_last: bool) -> Parts:
    config, stage = workload.config, workload.stage
    torch.manual_seed(config["train"]["seed"])
    model = build_model(config, num_outputs=1)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    freeze_except(model, stage["trainable"])
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], stage)
    generator = torch.Generator().manual_seed(0)
    to_input = Batcher(config["data"]["rescale"], torch.device("cpu"), channels_last)
    images = _random_images(workload.batch_size, workload.size, generator)
    eval_images = _random_images(workload.eval_batch_size, workload.size, generator)
    targets = torch.randint(0, 2, (workload.batch_size,), generator=generator)
    forward = model
    if workload.cached_prefix:
        trunk = frozen_trunk(model)
        if trunk is None:
            raise ValueError(f"{workload.key}: stage '{stage['name']}' freezes no prefix of the base")
        # As the loop does: the prefix's output for every image, then batches indexed out of it.
        train_features = extract(trunk, images, to_input, workload.eval_batch_size, "bench", False, use_cache=False)
        eval_features = extract(trunk, eval_images, to_input, workload.eval_batch_size, "bench", False, use_cache=False)
        positions = torch.arange(workload.batch_size)
        inputs, eval_inputs, forward = train_features[positions], eval_features, trunk.head
    else:
        inputs, eval_inputs = to_input(images), to_input(eval_images)
    return Parts(model, forward, inputs, targets, eval_inputs, optimizer, bool(stage["bn_eval"]))


# ---------------------------------------------------------------------------------------------
# Timing.


# median_rate comes from bench_baseline.py (imported at the top): one timing rule for every bench.


def _train_mode(parts: Parts) -> None:
    set_train_mode(parts.model, True)
    if parts.bn_eval:  # as the loop does for `bn_eval: true` (fine-tuning keeps pretrained statistics)
        for module in parts.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def train_step(parts: Parts, forward: Callable, precision: str, task=None) -> Callable[[], None]:
    """The loop's step: forward under the stage's autocast, loss, backward, optimizer step."""
    task = task or BinaryTask()
    device = torch.device("cpu")

    def step() -> None:
        with autocast_for(device, precision):
            outputs = forward(parts.inputs)
        loss = task.loss(outputs, parts.targets)
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parts.optimizer.step()

    return step


def eval_step(parts: Parts, precision: str) -> Callable[[], None]:
    device = torch.device("cpu")

    def forward() -> None:
        with torch.no_grad(), autocast_for(device, precision):
            parts.forward(parts.eval_inputs)

    return forward


class CompileTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float | None):
    """Raise CompileTimeout after `seconds` (main thread only; no limit where signals can't be used)."""
    usable = seconds and hasattr(signal, "setitimer") and _main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise CompileTimeout(f"compiling took over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def one_line(problem: BaseException) -> str:
    # torch.compile wraps the real error (BackendCompilerFailed, InductorError): name the root cause.
    root = problem
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = inner
    lines = [line.strip() for line in str(root).strip().splitlines() if line.strip()]
    text = f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
    if root is not problem:
        text += f" ({type(problem).__name__})"
    return text if len(text) <= 100 else text[:97] + "..."


@dataclass
class Cell:
    """One (model, setting) result: rates in images/s, or why there is none."""

    workload: str
    setting: Setting
    train_rate: float | None = None
    eval_rate: float | None = None
    compile_seconds: float | None = None
    failed: str | None = None


def measure_cell(workload: Workload, setting: Setting, repeats: int, warmup: int = 2,
                 compile_backend: str | Callable = "inductor", compile_timeout: float | None = None) -> Cell:
    cell = Cell(workload.key, setting)
    parts = build_parts(workload, setting.channels_last)
    _train_mode(parts)
    forward = parts.forward
    if setting.compile:
        try:
            forward = torch.compile(parts.forward, backend=compile_backend)
            step = train_step(parts, forward, setting.precision)
            # The first step compiles the forward and the backward graphs: timed on its own.
            started = time.perf_counter()
            with time_limit(compile_timeout):
                step()
            cell.compile_seconds = time.perf_counter() - started
        except Exception as problem:  # an unsupported op, no C++ compiler, a timeout: a cell, not a crash
            cell.failed = one_line(problem)
            torch._dynamo.reset()
            return cell
    cell.train_rate = median_rate(workload.batch_size, train_step(parts, forward, setting.precision), repeats, warmup)
    if setting.time_eval:
        set_train_mode(parts.model, False)
        cell.eval_rate = median_rate(workload.eval_batch_size, eval_step(parts, setting.precision), repeats, warmup)
    if setting.compile:
        torch._dynamo.reset()  # the next model starts from a clean compile cache
    return cell


def measure_matrix(loads: list[Workload], repeats: int, warmup: int = 2, settings: tuple[Setting, ...] | None = None,
                   compile_backend: str | Callable = "inductor", compile_timeout: float | None = None,
                   progress: Callable[[str], None] | None = None) -> list[Cell]:
    """Every workload under every setting (the named ones, then the default), in that order."""
    cells = []
    for workload in loads:
        for setting in settings or (*SETTINGS, workload_default(workload)):
            if progress:
                progress(f"{workload.key}: {setting.label}")
            cells.append(measure_cell(workload, setting, repeats, warmup, compile_backend, compile_timeout))
    return cells


# ---------------------------------------------------------------------------------------------
# bf16's effect on accuracy: short real runs through the project's own training code.


@dataclass
class AccuracyRun:
    workload: str
    precision: str
    val_acc: float
    val_loss: float
    seconds: float
    extra: dict = field(default_factory=dict)


def accuracy_runs(data_dir: Path, runs_dir: Path, epochs: int = 2, steps_per_epoch: int = 20, seed: int = 0,
                  threads: int | None = None, overrides: dict[str, list[tuple[str, object]]] | None = None,
                  precisions: tuple[str, ...] = ("fp32", "bf16")) -> list[AccuracyRun]:
    """Train the baseline and the deep net with each precision, same seed, and read back their
    final validation numbers (train/run.py: the same code `convtricks train` runs)."""
    from convtricks.train.run import start, train_run

    overrides = overrides or {}
    sources = {"baseline": (recipes.read_recipe("baseline"), []),
               "deep": (recipes.read_recipe(DEEP_RECIPE), DEEP_OVERRIDES)}
    results = []
    for key, (recipe, own) in sources.items():
        for precision in precisions:
            common = [("epochs", epochs), ("steps_per_epoch", steps_per_epoch), ("seed", seed),
                      ("precision", precision), ("threads", threads if threads else "null")]
            config = _resolved(recipe, own + common + list(overrides.get(key, [])))
            run_dir = start(config, data_dir, runs_dir)
            started = time.perf_counter()
            metrics = train_run(run_dir)
            results.append(AccuracyRun(key, precision, float(metrics["val_acc"]), float(metrics["val_loss"]),
                                       time.perf_counter() - started,
                                       {k: metrics[k] for k in ("test_acc", "test_loss") if k in metrics}))
    return results


# ---------------------------------------------------------------------------------------------
# The table.


def machine_line(threads: int) -> str:
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif name.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    shown = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)
    return (f"{model}, {len(os.sched_getaffinity(0))} cores, {threads} threads; {shown}; "
            f"torch {torch.__version__}")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def fastest_lines(loads: list[Workload], cells: list[Cell], default: Setting) -> list[str]:
    """Per model: the fastest named setting, and whether the default runs that same computation."""
    device = torch.device("cpu")
    lines = []
    for workload in loads:
        mine = [c for c in cells if c.workload == workload.key and c.train_rate]
        named = [c for c in mine if c.setting in SETTINGS]
        if not named:
            lines.append(f"{workload.key}: no setting ran")
            continue
        best = max(named, key=lambda c: c.train_rate)
        own = next((c for c in mine if c.setting not in SETTINGS), None)  # the default's own row
        if same_numerics(best.setting, own.setting if own else default, device):
            verdict = "the default runs it: matches"
        elif own is None:
            verdict = "the default's own row did not run"
        elif own.train_rate >= best.train_rate:
            # Different settings, but the default's own row timed no slower: the gap is noise.
            verdict = "the default differs but measured no slower: matches within noise"
        else:
            verdict = f"the default is {1 - own.train_rate / best.train_rate:.0%} slower: does NOT match"
        lines.append(f"{workload.key}: fastest {best.setting.label} ({best.train_rate:.1f} img/s), {verdict}")
    return lines


def render(loads: list[Workload], cells: list[Cell], default: Setting, threads: int, repeats: int,
           accuracy: list[AccuracyRun] | None = None, accuracy_note: str = "") -> str:
    """One plain-text table: a section per model (a row per setting), then the accuracy runs."""
    sections: list[tuple[str, list[tuple[str, str, str, str]]]] = []
    for workload in loads:
        rows = []
        mine = [c for c in cells if c.workload == workload.key]
        if not mine:  # --accuracy-only: no speed rows
            continue
        for cell in mine:
            note = ""
            if cell.failed:
                train = f"failed: {cell.failed}"
            else:
                train = _rate(cell.train_rate)
                if cell.compile_seconds is not None:
                    note = f"compile (first step) {cell.compile_seconds:.1f} s"
            rows.append((f"  {cell.setting.label}", train, _rate(cell.eval_rate), note))
        sections.append((workload.title, rows))
    if accuracy:
        rows = []
        for run in accuracy:
            extra = ", ".join(f"{k} {v:.4f}" for k, v in run.extra.items())
            rows.append((f"  {run.workload}, precision {run.precision}", f"val_acc {run.val_acc:.4f}",
                         f"val_loss {run.val_loss:.4f}", f"{run.seconds:.0f} s" + (f"; {extra}" if extra else "")))
        sections.append((f"accuracy effect of bf16: {accuracy_note}", rows))
    header = ("model / setting", "train img/s", "eval img/s", "note")
    every_row = [header] + [row for _, rows in sections for row in rows]
    widths = [max(len(row[i]) for row in every_row) for i in range(3)]

    def line(row) -> str:
        return f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}".rstrip()

    out = [f"convtricks CPU speed matrix - {machine_line(threads)}",
           f"train: forward + backward + optimizer step, median of {repeats} after warm-up; "
           f"eval: forward only, no grad, at the recipe's validation batch size",
           line(header)]
    for title, rows in sections:
        out.append(title)
        out.extend(line(row) for row in rows)
    if cells:
        out.append("Fastest training step per model (default: each model's own row, `auto` precision resolved "
                   "for it): "
                   + "; ".join(fastest_lines(loads, cells, default)) + ".")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per cell (median); default 5")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default one per core")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 1 warm-up step: a smoke test")
    parser.add_argument("--accuracy", action="store_true",
                        help="also train 2 short epochs with fp32 and with bf16 (minutes)")
    parser.add_argument("--accuracy-only", action="store_true",
                        help="only the --accuracy runs, without timing the matrix first")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "cats_and_dogs_small",
                        help="the lecture split, for --accuracy")
    parser.add_argument("--epochs", type=int, default=2, help="--accuracy: epochs per run")
    parser.add_argument("--steps_per_epoch", type=int, default=20, help="--accuracy: steps per epoch")
    parser.add_argument("--full-lite0", action="store_true",
                        help="also time the Lite0 fine-tune step through the whole network (reference)")
    parser.add_argument("--compile-timeout", type=float, default=900,
                        help="seconds torch.compile's first step may take before its cell reads failed")
    args = parser.parse_args(argv)
    args.accuracy = args.accuracy or args.accuracy_only
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be positive")
    if args.accuracy and not (args.data / "train").is_dir():
        parser.error(f"--accuracy needs the lecture split at {args.data} (convtricks prepare --out {args.data})")
    repeats, warmup = (1, 1) if args.quick else (args.repeats, 2)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)

    loads = workloads(full_lite0=args.full_lite0)
    default = default_setting()
    say = lambda text: print(f"... {text}", file=sys.stderr, flush=True)  # noqa: E731
    cells = [] if args.accuracy_only else measure_matrix(loads, repeats, warmup,
                                                         compile_timeout=args.compile_timeout, progress=say)
    accuracy = None
    if args.accuracy:
        say("accuracy runs")
        with tempfile.TemporaryDirectory() as runs:
            accuracy = accuracy_runs(args.data, Path(runs), args.epochs, args.steps_per_epoch, threads=threads)
    note = (f"{args.epochs} epochs x {args.steps_per_epoch} steps, seed 0, on {args.data.name} "
            f"(validation: all of it)")
    print(render(loads, cells, default, threads, repeats, accuracy, note))


if __name__ == "__main__":
    main()
