"""Trick 4, ensembles: train several members that differ in one thing, then let them vote.

The lecture: vary the data (bagging: one network per bootstrap sample of the training set)
or vary the models (structure, random initialization, optimizer). Deep nets are unstable and
random; averaging several of them reduces the variance of the predictions.

An ensemble folder holds one ordinary run folder per member:

    runs/<recipe>-ensemble-<vary>-<time>/
      ensemble.json          the members, what each varies, how they vote
      members/1-bootstrap/   a run folder like any other (config.yaml, checkpoint.pt, ...)
      metrics.json           every member's and the votes' test numbers, wall time
      log.txt

Members train one after another in this process, or each in a worker process pinned to its
share of the cores. Running the command again on the folder (or `--resume`) keeps finished
members untouched and continues the others from their checkpoints.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path

import torch

from convtricks import config as recipes
from convtricks.atomic import write_text
from convtricks.errors import UserError

log = logging.getLogger("convtricks")

ENSEMBLE_FILE = "ensemble.json"
VARIES = ("data", "seed", "model", "optimizer")
SUBSET_KINDS = ("bootstrap", "disjoint")
VOTES = {
    "soft": "the class with the highest mean probability over the members",
    "hard": "the class most members predict; a tie goes to the soft vote",
}


# ---------------------------------------------------------------------------------------------
# Bagging: which training images a member sees. Applied to the decoded tensors after loading,
# so the image cache on disk stays one file shared by every member.


def _checked_subset(spec) -> tuple[str, int, int, int]:
    example = "{kind: bootstrap, member: 0, members: 5, seed: 0}"
    if not isinstance(spec, dict):
        raise UserError(f"data.subset must be a mapping like {example}, got {spec!r}.")
    unknown = set(spec) - {"kind", "member", "members", "seed"}
    if unknown:
        raise UserError(f"Unknown key(s) {', '.join(sorted(unknown))} in data.subset; it takes kind, member, "
                        "members and seed.")
    kind, member, members, seed = spec.get("kind"), spec.get("member"), spec.get("members"), spec.get("seed", 0)
    if kind not in SUBSET_KINDS:
        raise UserError(f"data.subset kind must be bootstrap or disjoint, got {kind!r}.")
    if not (isinstance(members, int) and members >= 1):
        raise UserError(f"data.subset members must be a positive integer, got {members!r}.")
    if not (isinstance(member, int) and 0 <= member < members):
        raise UserError(f"data.subset member must be an integer from 0 to {members - 1}, got {member!r}.")
    if not isinstance(seed, int):
        raise UserError(f"data.subset seed must be an integer, got {seed!r}.")
    return kind, member, members, seed


def subset_indices(labels: torch.Tensor, spec: dict) -> torch.Tensor:
    """Sorted indices of the training images that member `spec["member"]` trains on.

    bootstrap: n draws with replacement from n images (about 63% distinct), one stream per
    member. disjoint: every class shuffled once (the same shuffle for all members) and dealt
    round-robin, so the members' subsets are disjoint, cover everything, and keep the class
    balance, with sizes that differ by at most one.
    """
    kind, member, members, seed = _checked_subset(spec)
    count = len(labels)
    if kind == "bootstrap":
        generator = torch.Generator().manual_seed(seed * 1_000_003 + member)
        return torch.randint(count, (count,), generator=generator).sort().values
    if count < members:
        raise UserError(f"{members} disjoint subsets need at least {members} training images, found {count}.")
    generator = torch.Generator().manual_seed(seed)
    if labels.dim() == 1 and not labels.is_floating_point():
        groups = [(labels == value).nonzero().view(-1) for value in labels.unique(sorted=True)]
    else:  # targets that are not one class per image (several heads): no classes to balance
        groups = [torch.arange(count)]
    dealt = torch.cat([group[torch.randperm(len(group), generator=generator)] for group in groups])
    return dealt[member::members].sort().values


def subset_key(images_key: str, spec: dict) -> str:
    """A content key for the subset: feature caches must not mistake it for the full set."""
    kind, member, members, seed = _checked_subset(spec)
    return f"{images_key}/{kind}-{member}-of-{members}-seed{seed}"


def training_subset(labels: torch.Tensor, spec: dict) -> torch.Tensor:
    """Indices of this member's training sample (`data.subset` of a recipe), said in the log.

    The loop draws its batches from these indices into the full, shared image tensor (and its
    shared frozen-trunk cache), so bagging copies nothing and recomputes nothing."""
    indices = subset_indices(labels, spec)
    log.info("Bagging: member %d of %d trains on a %s sample of %d of the %d training images (%d distinct).",
             spec["member"] + 1, spec["members"], spec["kind"], len(indices), len(labels), len(indices.unique()))
    return indices


def select_training_subset(images: torch.Tensor, labels: torch.Tensor, spec: dict,
                           images_key: str = "") -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images, labels, content key) of this member's training sample, as tensors of their own."""
    indices = training_subset(labels, spec)
    return images[indices], labels[indices], subset_key(images_key, spec)


# ---------------------------------------------------------------------------------------------
# Planning: one resolved recipe per member, differing from the recipe in one thing.


@dataclass
class Member:
    name: str  # also its folder under members/
    config: dict  # the member's fully resolved recipe
    varies: dict  # what differs from the recipe, for ensemble.json and reports


def parse_optimizers(text: str) -> list[tuple[str, float | None]]:
    """`rmsprop:1e-4,adamw:3e-4` -> [("rmsprop", 1e-4), ("adamw", 3e-4)]; a bare name keeps the recipe's rate."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, rate = item.partition(":")
        try:
            lr = float(rate) if rate else None
        except ValueError:
            raise UserError(f"--optimizers takes name:learning_rate pairs like adamw:3e-4; in '{item}', "
                            f"'{rate}' is not a number.") from None
        if lr is not None and not (lr > 0 and math.isfinite(lr)):
            raise UserError(f"The learning rate in '{item}' must be a positive number.")
        pairs.append((name.strip().lower(), lr))
    if not pairs:
        raise UserError("--optimizers is empty; give pairs like rmsprop:1e-4,adamw:3e-4.")
    return pairs


def parse_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UserError("--models is empty; give model names like small-cnn,deep-cnn.")
    return names


def _rounded(value: float) -> float:
    return float(f"{value:.6g}")  # 1e-4 * (3e-4 / 1e-4) is 3.0000000000000003e-4 otherwise


def _with_optimizer(config: dict, name: str, lr: float | None) -> dict:
    """The optimizer for every stage; the rate for the first stage, later stages keeping their
    ratio to it (a fine-tune stage at a tenth of the rate stays at a tenth)."""
    changed = copy.deepcopy(config)
    changed["train"]["optimizer"] = name
    scale = 1.0 if lr is None else lr / recipes.stage_plan(config)[0]["lr"]
    changed["train"]["lr"] = _rounded(changed["train"]["lr"] * scale)
    for stage in changed["stages"] or []:
        stage.pop("optimizer", None)
        if "lr" in stage:
            stage["lr"] = _rounded(stage["lr"] * scale)
    return changed


def plan_members(config: dict, vary: str, members: int | None = None, models: list[str] | None = None,
                 optimizers: list[tuple[str, float | None]] | None = None, disjoint: bool = False) -> list[Member]:
    """One member per variation of the resolved recipe `config`.

    data: bagging, each member on its own bootstrap sample (or disjoint part) of the training
    images, all else equal. seed: initial weights, dropout masks and batch order. model /
    optimizer: one member per listed choice (cycled, with a new seed, when --members asks for
    more).
    """
    if vary not in VARIES:
        raise UserError(f"--vary must be one of {', '.join(VARIES)}, got {vary!r}.")
    if models is not None and vary != "model":
        raise UserError("--models goes with --vary model.")
    if optimizers is not None and vary != "optimizer":
        raise UserError("--optimizers goes with --vary optimizer.")
    if disjoint and vary != "data":
        raise UserError("--disjoint goes with --vary data (it splits the training images among the members).")
    choices = {"model": models, "optimizer": optimizers}.get(vary, None)
    if vary in ("model", "optimizer") and not choices:
        raise UserError(f"--vary {vary} needs the list to vary over: --{vary}s "
                        + ("small-cnn,deep-cnn." if vary == "model" else "rmsprop:1e-4,adamw:3e-4."))
    if vary == "model":
        from convtricks.models.registry import model_names

        unknown = [name for name in models if name not in model_names()]
        if unknown:
            raise UserError(f"Unknown model(s) {', '.join(unknown)} in --models; known models: {', '.join(model_names())}.")
    count = members if members is not None else (len(choices) if choices else 3)
    if not (isinstance(count, int) and count >= 2):
        raise UserError(f"An ensemble needs at least 2 members, got {count}.")

    base_seed = config["train"]["seed"]
    width = len(str(count))
    planned = []
    for index in range(count):
        member = copy.deepcopy(config)
        if vary == "data":
            kind = "disjoint" if disjoint else "bootstrap"
            member["data"]["subset"] = {"kind": kind, "member": index, "members": count, "seed": base_seed}
            varies, label = {"data.subset": member["data"]["subset"]}, kind
        elif vary == "seed":
            member["train"]["seed"] = base_seed + index
            varies, label = {"train.seed": base_seed + index}, f"seed{base_seed + index}"
        else:
            choice = choices[index % len(choices)]
            repeat = index // len(choices)
            member["train"]["seed"] = base_seed + repeat
            if vary == "model":
                member["model"] = {**member["model"], "name": choice}
                varies, label = {"model.name": choice}, choice
            else:
                name, lr = choice
                member = _with_optimizer(member, name, lr)
                first = recipes.stage_plan(member)[0]
                varies, label = {"train.optimizer": name, "train.lr": first["lr"]}, f"{name}-{first['lr']:g}"
            if repeat:
                varies["train.seed"] = member["train"]["seed"]
                label += f"-seed{member['train']['seed']}"
        planned.append(Member(f"{index + 1:0{width}d}-{label}", recipes.resolve(member), varies))
    return planned


# ---------------------------------------------------------------------------------------------
# The ensemble folder.


def is_ensemble(folder: Path) -> bool:
    return (Path(folder) / ENSEMBLE_FILE).is_file()


def read_ensemble(folder: Path) -> dict:
    folder = Path(folder)
    if not is_ensemble(folder):
        raise UserError(f"{folder} is not an ensemble folder (it has no {ENSEMBLE_FILE}).")
    try:
        info = json.loads((folder / ENSEMBLE_FILE).read_text())
        names = [member["name"] for member in info["members"]]
        if not all(isinstance(member["dir"], str) for member in info["members"]):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{folder / ENSEMBLE_FILE} is damaged; it must list the members and their folders.") from None
    if len(names) < 2:
        raise UserError(f"{folder / ENSEMBLE_FILE} lists fewer than 2 members.")
    return info


def member_dirs(folder: Path, info: dict) -> list[tuple[str, Path]]:
    return [(member["name"], Path(folder) / member["dir"]) for member in info["members"]]


def _member_config_text(member: Member, data_dir: Path) -> str:
    # Exactly what `train.run.start` writes, in a folder named after the member.
    config = dict(member.config)
    config["data"] = {**config["data"], "dir": str(Path(data_dir).resolve())}
    return recipes.dump(config)


def create_ensemble(planned: list[Member], vary: str, data_dir: Path, folder: Path) -> dict:
    """Write every member's config.yaml, then ensemble.json (last, so that a folder with an
    ensemble.json always has all its members)."""
    data_dir = Path(data_dir)
    for member in planned:
        member_dir = folder / "members" / member.name
        member_dir.mkdir(parents=True, exist_ok=True)
        write_text(member_dir / "config.yaml", _member_config_text(member, data_dir))
    info = {
        "format": 1,
        "recipe": planned[0].config["recipe"],
        "vary": vary,
        "data_dir": str(data_dir.resolve()),
        "vote": "soft",
        "votes": VOTES,
        "members": [{"name": m.name, "dir": f"members/{m.name}", "varies": m.varies} for m in planned],
    }
    write_text(folder / ENSEMBLE_FILE, json.dumps(info, indent=1))
    return info


def _check_same_plan(folder: Path, info: dict, planned: list[Member], data_dir: Path) -> None:
    """Running the command again on a folder continues it only if it would build the same members."""
    stored = member_dirs(folder, info)
    same = [name for name, _ in stored] == [m.name for m in planned] and all(
        (path / "config.yaml").is_file() and (path / "config.yaml").read_text() == _member_config_text(m, data_dir)
        for (_, path), m in zip(stored, planned))
    if not same:
        raise UserError(f"{folder} holds an ensemble with other settings; continue it with "
                        f"`convtricks ensemble --resume {folder}`, or pick another --out.")


# ---------------------------------------------------------------------------------------------
# Training the members.


def member_status(member_dir: Path) -> str:
    """finished (metrics written), interrupted (has a checkpoint) or new."""
    if (member_dir / "metrics.json").is_file():
        return "finished"
    return "interrupted" if (member_dir / "checkpoint.pt").is_file() else "new"


def train_member(member_dir: Path) -> dict:
    """Train a member, or continue it from its checkpoint; the training loop is `train_run`'s."""
    from convtricks.train.run import train_run

    return train_run(member_dir, resume=member_status(member_dir) == "interrupted")


def core_slots(cores: list[int], workers: int) -> list[list[int]]:
    """Split the cores among the workers, as evenly as possible (torch threads = cores // workers,
    the remainder going to the first workers); with more workers than cores they share."""
    if workers >= len(cores):
        return [[cores[index % len(cores)]] for index in range(workers)]
    size, extra = divmod(len(cores), workers)
    slots, start = [], 0
    for index in range(workers):
        stop = start + size + (index < extra)
        slots.append(cores[start:stop])
        start = stop
    return slots


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


class _Prefixed(logging.Formatter):
    """Console lines of a worker carry its member's name: parallel members interleave."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def format(self, record):
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        return f"[{self.name}] {kind}{record.getMessage()}"


def _member_worker(member_dir: str, name: str, cores: list[int], connection) -> None:
    """A spawned worker process: train one member on its own cores and report how it ended."""
    from convtricks.logs import LOGGER, log_to_file, setup_console

    # train_run sizes torch's thread pool to the cores this process may use.
    os.sched_setaffinity(0, cores)
    setup_console()
    for handler in LOGGER.handlers:
        if getattr(handler, "_convtricks_console", False):
            handler.setFormatter(_Prefixed(name))
    file_handler = log_to_file(Path(member_dir) / "log.txt")
    try:
        train_member(Path(member_dir))
        outcome = ("finished", "")
    except UserError as error:
        outcome = ("failed", str(error))
    except KeyboardInterrupt:
        outcome = ("interrupted", "")
    except Exception as error:  # a bug: keep the traceback in the member's log for a report
        with open(Path(member_dir) / "log.txt", "a", encoding="utf-8") as file:
            file.write(traceback.format_exc())
        outcome = ("failed", f"{type(error).__name__}: {error} (traceback in {Path(member_dir) / 'log.txt'})")
    finally:
        LOGGER.removeHandler(file_handler)
        file_handler.close()
    connection.send(outcome)
    connection.close()


class Interrupted(Exception):
    """Training stopped by the user; the finished epochs are saved."""


def _train_one_after_another(pending: list[tuple[str, Path]]) -> dict[str, float]:
    from convtricks.logs import log_to_file

    seconds = {}
    for name, member_dir in pending:
        log.info("Member %s (%s).", name, member_status(member_dir))
        handler = log_to_file(member_dir / "log.txt")
        started = time.perf_counter()
        try:
            train_member(member_dir)
        except KeyboardInterrupt:
            raise Interrupted from None
        except UserError as error:
            raise UserError(f"Member {name}: {error}") from None
        finally:
            log.removeHandler(handler)
            handler.close()
        seconds[name] = round(time.perf_counter() - started, 1)
    return seconds


def _train_in_parallel(pending: list[tuple[str, Path]], workers: int) -> dict[str, float]:
    # spawn, not fork: a forked child of a process that already ran torch's thread pools can hang.
    context = multiprocessing.get_context("spawn")
    slots = core_slots(available_cores(), workers)
    free = list(range(workers))
    queue = list(pending)
    running: dict[int, tuple] = {}  # process sentinel -> (name, process, connection, slot, start)
    seconds: dict[str, float] = {}
    failures: list[str] = []
    interrupted = False
    try:
        while queue or running:
            while queue and free and not failures:
                name, member_dir = queue.pop(0)
                slot = free.pop(0)
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_member_worker, name=f"convtricks-{name}",
                                          args=(str(member_dir), name, slots[slot], sender))
                process.start()
                sender.close()
                running[process.sentinel] = (name, process, receiver, slot, time.perf_counter())
                log.info("Member %s (%s) started on core(s) %s.", name, member_status(member_dir),
                         ",".join(map(str, slots[slot])))
            if not running:
                break
            for sentinel in wait_for_any(list(running)):
                name, process, receiver, slot, started = running.pop(sentinel)
                outcome = receiver.recv() if receiver.poll() else ("failed", f"worker exited with code {process.exitcode}")
                process.join()
                receiver.close()
                free.append(slot)
                if outcome[0] == "finished":
                    seconds[name] = round(time.perf_counter() - started, 1)
                    log.info("Member %s finished in %.1f s.", name, seconds[name])
                elif outcome[0] == "interrupted":
                    interrupted = True
                    failures.append(f"{name} was interrupted")
                else:
                    failures.append(f"{name}: {outcome[1]}")
                    log.info("Member %s failed: %s", name, outcome[1])
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for name, process, receiver, _, _ in running.values():
            # A terminal's Ctrl-C reaches the workers too; give them a moment, then stop them.
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
    if interrupted:
        raise Interrupted
    if failures:
        raise UserError(f"{len(failures)} member(s) failed ({'; '.join(failures)}); finished members are kept.")
    return seconds


def default_workers(member_configs: list[dict]) -> int:
    """One worker per core on a CPU; on a GPU members take turns (they would share one device)."""
    from convtricks.train.run import pick_device

    if any(pick_device(config["train"]["device"]).type != "cpu" for config in member_configs):
        return 1
    return len(available_cores())


def train_members(folder: Path, info: dict, parallel: int | None = None) -> dict:
    """Train every member not yet finished; returns timing facts for metrics.json."""
    from convtricks.train.run import read_config

    members = member_dirs(folder, info)
    pending = [(name, path) for name, path in members if member_status(path) != "finished"]
    for name, path in members:
        if (name, path) not in pending:
            log.info("Member %s already finished; kept as it is.", name)
    configs = [read_config(path) for _, path in pending]
    workers = min(parallel or default_workers(configs), max(1, len(pending)))
    facts = {"members_trained": len(pending), "workers": workers}
    if not pending:
        return facts
    started = time.perf_counter()
    if workers == 1:  # the first member fills the caches the next ones read
        seconds = _train_one_after_another(pending)
    else:
        warm_shared_caches([path for _, path in pending])
        facts["cores_per_worker"] = [len(slot) for slot in core_slots(available_cores(), workers)]
        seconds = _train_in_parallel(pending, workers)
    facts["member_seconds"] = seconds
    facts["train_wall_seconds"] = round(time.perf_counter() - started, 1)
    return facts


# ---------------------------------------------------------------------------------------------
# Shared caches, filled once here before the members start: parallel workers would otherwise
# all decode the same images, and all run the same frozen base over the same images, at the
# same moment (the writes are atomic, so that would waste time, not corrupt files).
# `_warm_features` mirrors the choice `fit` makes when a stage starts; should the two drift
# apart, members simply miss the cache and compute their own features.


def warm_shared_caches(member_paths: list[Path]) -> None:
    from convtricks.train.run import load_split, read_config

    loaded: dict = {}
    warmed: set = set()
    for member_dir in member_paths:
        config = read_config(member_dir)
        if not config["data"]["cache"]:
            continue
        place = (config["data"]["dir"], tuple(config["data"]["target_size"]))
        if place not in loaded:
            data_dir = Path(config["data"]["dir"])
            train = load_split(data_dir, "train", config, size=config["data"]["train_decode_size"])
            validation = load_split(data_dir, "validation", config, train.classes)
            load_split(data_dir, "test", config, train.classes, required=False)
            loaded[place] = (train, validation)
        _warm_features(config, *loaded[place], warmed)


def _warm_features(config: dict, train, validation, warmed: set) -> None:
    """For each stage that trains on a cached frozen trunk whose weights no earlier stage has
    changed (so that every member sees the same trunk): its outputs on the validation and the
    training images (bagging members index the full set's outputs)."""
    from convtricks.data.augment import AugmentConfig
    from convtricks.train.features import extract, frozen_trunk
    from convtricks.train.fit import FLIP_ONLY, Batcher, autocast_for, resolve_precision
    from convtricks.train.freezing import freeze_except
    from convtricks.train.run import build_model, pick_device, task_for

    plan = [stage for stage in recipes.stage_plan(config) if stage["epochs"] > 0]
    augment = AugmentConfig.from_dict(config["augment"]) if config["augment"] else None
    signature = json.dumps([config["model"], config["data"]["target_size"], config["train"]["seed"], config["augment"],
                            config["train"]["channels_last"], config["train"]["validation_steps"],
                            [[s["trainable"], s["augment"], s["feature_cache"], s["ema"], s["precision"]] for s in plan]],
                           sort_keys=True)
    if signature in warmed:
        return
    warmed.add(signature)
    _, num_outputs = task_for(config, train.classes)
    torch.manual_seed(config["train"]["seed"])  # as train_run: a base trained from scratch follows the seed
    device = pick_device(config["train"]["device"])
    model = build_model(config, num_outputs).to(device)
    if config["train"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    validation_images = validation.images
    if config["train"]["validation_steps"]:
        validation_images = validation_images[:config["train"]["validation_steps"] * config["data"]["val_batch_size"]]
    to_input = Batcher(config["data"]["rescale"], device, config["train"]["channels_last"])
    batch = config["data"]["val_batch_size"]
    trained: set[int] = set()  # parameters an earlier stage trains: a trunk holding one differs per member
    for stage in plan:
        freeze_except(model, stage["trainable"])
        augmenting = bool(augment is not None and augment.enabled and stage["augment"])
        flip_only = augmenting and augment == FLIP_ONLY
        usable = stage["feature_cache"] and not stage["ema"] and (flip_only or not augmenting)
        trunk = frozen_trunk(model) if usable else None
        if trunk is not None and not any(id(p) in trained for unit in trunk.prefix for p in unit.parameters()):
            started = time.perf_counter()
            # The precision each member's own run resolves for this model, so its cache entries match.
            with autocast_for(device, resolve_precision(stage["precision"], device, model)):
                extract(trunk, validation_images, to_input, batch, validation.cache_key, False)
                extract(trunk, train.images, to_input, batch, train.cache_key, flip_only)
            log.info("Stage '%s' of %s: outputs of the frozen layers ready in the shared cache (%.1f s).",
                     stage["name"], config["model"]["name"], time.perf_counter() - started)
        trained |= {id(p) for p in model.parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# Voting.


def soft_vote(probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, mean probabilities) from members' probabilities (K, N, C)."""
    mean = probabilities.mean(0)
    return mean.argmax(1), mean


def hard_vote(probabilities: torch.Tensor) -> torch.Tensor:
    """Majority of the members' predicted classes; ties go to the class with the higher mean
    probability (the soft vote). Votes are whole numbers and mean probabilities differ by less
    than 1, so half of them can only reorder tied classes."""
    classes = probabilities.shape[2]
    votes = torch.nn.functional.one_hot(probabilities.argmax(2), classes).sum(0).float()
    return (votes + probabilities.mean(0) / 2).argmax(1)


def _sample_std(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return values.std(dim=dim, unbiased=True) if values.shape[dim] > 1 else torch.zeros(values.shape[:dim])


def vote_metrics(probabilities: torch.Tensor, labels: torch.Tensor, names: list[str],
                 resamples: int = 1000, seed: int = 0) -> dict:
    """Members' and votes' accuracy and loss on labelled images, the members' spread, how often
    two members disagree, and the variance over bootstrap resamples of the images.

    `probabilities` is (K members, N images, C classes). Standard deviations are sample
    standard deviations (n - 1).
    """
    members, count, _ = probabilities.shape
    labels = labels.long()
    soft_predicted, mean = soft_vote(probabilities)
    hard_predicted = hard_vote(probabilities)
    member_predicted = probabilities.argmax(2)

    def nll(p: torch.Tensor) -> torch.Tensor:  # cross-entropy of probabilities (BCE for two classes)
        true_class = p.gather(-1, labels.expand(*p.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        return -true_class.clamp_min(1e-7).log()

    member_correct = (member_predicted == labels).float()  # (K, N)
    soft_correct = (soft_predicted == labels).float()
    hard_correct = (hard_predicted == labels).float()
    member_acc = member_correct.mean(1)
    member_loss = nll(probabilities).mean(1)

    pairs = [(a, b) for a in range(members) for b in range(a + 1, members)]
    disagreement = sum(float((member_predicted[a] != member_predicted[b]).float().mean()) for a, b in pairs) / len(pairs)

    # Accuracy on B bootstrap resamples of the images: how much each number would move on
    # another test set of the same size; an ensemble should move less than its members.
    generator = torch.Generator().manual_seed(seed)
    rows = torch.cat([member_correct, soft_correct[None], hard_correct[None]])  # (K + 2, N)
    accuracies = []
    for start in range(0, resamples, 100):
        drawn = torch.randint(count, (min(100, resamples - start), count), generator=generator)
        accuracies.append(rows[:, drawn].mean(-1))  # (K + 2, chunk)
    accuracies = torch.cat(accuracies, 1)
    spread = _sample_std(accuracies, 1)
    member_spread = spread[:members]

    size = probabilities.shape[2]
    confusion = torch.zeros(size, size, dtype=torch.long)
    confusion.index_put_((labels, soft_predicted), torch.ones(count, dtype=torch.long), accumulate=True)
    return {
        "images": count,
        "members": [{"name": name, "acc": float(acc), "loss": float(loss)}
                    for name, acc, loss in zip(names, member_acc, member_loss)],
        "members_mean_acc": float(member_acc.mean()),
        "members_std_acc": float(_sample_std(member_acc, 0)),
        "soft": {"acc": float(soft_correct.mean()), "loss": float(nll(mean).mean())},
        "hard": {"acc": float(hard_correct.mean())},
        "disagreement": disagreement,
        "bootstrap": {
            "resamples": resamples,
            "members_std_acc": [float(v) for v in member_spread],
            "members_mean_std_acc": float(member_spread.mean()),
            "soft_std_acc": float(spread[members]),
            "hard_std_acc": float(spread[members + 1]),
        },
        "confusion_soft": confusion.tolist(),
    }


# ---------------------------------------------------------------------------------------------
# Using a finished ensemble: evaluate on labelled images, predict new ones.


@dataclass
class LoadedEnsemble:
    folder: Path
    info: dict
    names: list[str]
    runs: list  # inference.LoadedRun, one per member
    classes: list[str]


def load_ensemble(folder: Path, weights: str = "final") -> LoadedEnsemble:
    from convtricks.inference import load_run

    folder = Path(folder)
    info = read_ensemble(folder)
    names, runs = [], []
    for name, member_dir in member_dirs(folder, info):
        if weights == "final" and member_status(member_dir) != "finished":
            raise UserError(f"Member {name} of {folder} has not finished; finish the ensemble with "
                            f"`convtricks ensemble --resume {folder}`.")
        run = load_run(member_dir, weights)
        if runs and run.classes != runs[0].classes:
            raise UserError(f"Member {name} was trained on classes {run.classes}, member {names[0]} on "
                            f"{runs[0].classes}; members must share their classes.")
        names.append(name)
        runs.append(run)
    return LoadedEnsemble(folder, info, names, runs, runs[0].classes)


def class_probabilities(run, image_set) -> torch.Tensor:
    """(N, C) probabilities of one member; binary models give [P(first class), P(second class)].

    Members with the same pretrained base share its cached output on these images."""
    from convtricks.train.run import predictions

    if not hasattr(run.task, "probabilities"):
        raise UserError("Ensembles vote on class probabilities; this recipe's model is not a classifier.")
    logits = predictions(run.model, image_set, run.batcher, run.config["data"]["val_batch_size"], run.config)
    probabilities = run.task.probabilities(logits)
    if not isinstance(probabilities, torch.Tensor):
        raise UserError("Ensembles vote on one classifier output per image; this recipe's model has several heads.")
    return torch.stack([1 - probabilities, probabilities], 1) if probabilities.dim() == 1 else probabilities


def _member_image_sets(ensemble: LoadedEnsemble, folder: Path, require_labels: bool) -> list:
    """Each member's view of the images (decoded once per target size)."""
    from convtricks.data.dataset import load_image_set

    by_size, sets = {}, []
    for run in ensemble.runs:
        size = tuple(run.config["data"]["target_size"])
        if size not in by_size:
            by_size[size] = load_image_set(folder, size, use_cache=run.config["data"]["cache"],
                                           require_labels=require_labels)
        sets.append(by_size[size])
    if len({len(s) for s in sets}) > 1:
        raise UserError(f"Some images in {folder} are readable at one member's size and not at another's.")
    return sets


def evaluate_ensemble(ensemble: LoadedEnsemble, data_dir: Path, resamples: int = 1000, seed: int = 0) -> dict:
    data_dir = Path(data_dir)
    sets = _member_image_sets(ensemble, data_dir, require_labels=True)
    if sets[0].classes != ensemble.classes:
        raise UserError(f"{data_dir} has classes {sets[0].classes}, but the members were trained on {ensemble.classes}.")
    probabilities = torch.stack([class_probabilities(run, s) for run, s in zip(ensemble.runs, sets)])
    result = vote_metrics(probabilities, sets[0].labels, ensemble.names, resamples, seed)
    return {"data": str(data_dir), "classes": ensemble.classes, "vary": ensemble.info.get("vary"), **result}


def predict_ensemble(ensemble: LoadedEnsemble, target: Path) -> list[dict]:
    """Rows like `inference.predict`'s, scored by the soft vote, plus the members' votes."""
    from convtricks.inference import predict

    per_member = [predict(run, target) for run in ensemble.runs]
    rows = []
    for member_rows in zip(*per_member):
        scores = torch.tensor([row["scores"] for row in member_rows])  # (K, C)
        mean = scores.mean(0)
        best = int(mean.argmax())
        votes = torch.bincount(scores.argmax(1), minlength=len(ensemble.classes)).tolist()
        rows.append({"file": member_rows[0]["file"], "label": ensemble.classes[best], "probability": float(mean[best]),
                     "scores": [float(v) for v in mean], "votes": votes,
                     "members": [row["label"] for row in member_rows]})
    return rows


def report_text(result: dict) -> str:
    """The table `convtricks evaluate ENSEMBLE` prints."""
    width = max(len(m["name"]) for m in result["members"]) + 2
    width = max(width, len("hard vote") + 2)
    boot = result["bootstrap"]
    lines = [f"{result['images']} images in {result['data']}; {len(result['members'])} members (vary "
             f"{result.get('vary')}).",
             "member".ljust(width) + "loss".rjust(9) + "acc".rjust(9)]
    for member in result["members"]:
        lines.append(member["name"].ljust(width) + f"{member['loss']:9.4f}{member['acc']:9.4f}")
    lines += [
        "soft vote".ljust(width) + f"{result['soft']['loss']:9.4f}{result['soft']['acc']:9.4f}",
        "hard vote".ljust(width) + " " * 9 + f"{result['hard']['acc']:9.4f}",
        f"Members' accuracy: mean {result['members_mean_acc']:.4f}, std {result['members_std_acc']:.4f}; "
        f"soft vote {result['soft']['acc'] - result['members_mean_acc']:+.4f} over the mean member.",
        f"Two members disagree on {result['disagreement']:.1%} of the images on average.",
        f"Variance over {boot['resamples']} bootstrap resamples of the images, std of accuracy: members "
        f"{boot['members_mean_std_acc']:.4f} (mean), soft vote {boot['soft_std_acc']:.4f}, hard vote "
        f"{boot['hard_std_acc']:.4f}.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command.


def _test_report(folder: Path, info: dict, facts: dict) -> None:
    data_dir = Path(info["data_dir"]) / "test"
    metrics = {"vary": info["vary"], "members": len(info["members"]), **facts}
    if data_dir.is_dir():
        try:
            result = evaluate_ensemble(load_ensemble(folder), data_dir)
        except UserError as error:  # the members are trained; only the vote is not possible
            log.info("The members are trained, but not evaluated as an ensemble: %s", error)
        else:
            metrics["test"] = result
            log.info(report_text(result))
    else:
        log.info("No test split in %s: evaluate the ensemble with `convtricks evaluate %s --data DIR`.",
                 info["data_dir"], folder)
    write_text(folder / "metrics.json", json.dumps(metrics, indent=1))


def run_ensemble(config: dict | None = None, data_dir: Path | None = None, runs_dir: Path = Path("runs"),
                 vary: str | None = None, members: int | None = None, models: list[str] | None = None,
                 optimizers: list[tuple[str, float | None]] | None = None, disjoint: bool = False,
                 parallel: int | None = None, out: Path | None = None, resume: Path | None = None) -> int:
    """`convtricks ensemble`: plan (or reopen) an ensemble folder, train what is unfinished,
    then report members and votes on the test split. Returns the exit code."""
    from convtricks.logs import log_to_file
    from convtricks.train.run import new_run_dir

    if parallel is not None and parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {parallel}.")
    if resume is not None:
        folder = Path(resume)
        info = read_ensemble(folder)
    else:
        if config is None or data_dir is None or vary is None:
            raise UserError("Name a recipe and --vary data|seed|model|optimizer, or --resume ENSEMBLE.")
        if not Path(data_dir).is_dir():
            raise UserError(f"Data folder {data_dir} does not exist; build it with `convtricks prepare --out {data_dir}`.")
        planned = plan_members(config, vary, members, models, optimizers, disjoint)
        if out is not None and is_ensemble(out):
            folder = Path(out)
            info = read_ensemble(folder)
            _check_same_plan(folder, info, planned, data_dir)
        else:
            if out is not None and Path(out).exists() and any(Path(out).iterdir()):
                raise UserError(f"{out} exists and is not an ensemble folder; pick a new --out.")
            folder = Path(out) if out is not None else new_run_dir(runs_dir, f"{config['recipe']}-ensemble-{vary}")
            info = create_ensemble(planned, vary, data_dir, folder)
    handler = log_to_file(folder / "log.txt")
    try:
        log.info("Ensemble folder: %s (%d members, vary %s).", folder, len(info["members"]), info["vary"])
        try:
            facts = train_members(folder, info, parallel)
        except Interrupted:
            log.info("Interrupted. Finished members and epochs are saved; continue with: "
                     "convtricks ensemble --resume %s", folder)
            return 130
        _test_report(folder, info, facts)
        log.info("Done. Ensemble folder: %s", folder)
    finally:
        log.removeHandler(handler)
        handler.close()
    return 0


def evaluate_command(folder: Path, data: str | None, weights: str, as_json: bool) -> int:
    """`convtricks evaluate ENSEMBLE [--data DIR]`: members, their spread and the votes."""
    ensemble = load_ensemble(folder, weights)
    data_dir = Path(data) if data else Path(ensemble.info["data_dir"]) / "test"
    if (data_dir / "test").is_dir() and (data_dir / "train").is_dir():
        data_dir = data_dir / "test"  # a whole split was given: judge on its test images
    result = evaluate_ensemble(ensemble, data_dir)
    log.info(report_text(result))
    if as_json:
        print(json.dumps(result))
    return 0


def predict_command(folder: Path, target: str, weights: str, csv: str | None) -> int:
    """`convtricks predict ENSEMBLE TARGET`: soft-vote label and probability, and the members' votes."""
    from convtricks.inference import write_kaggle_csv

    ensemble = load_ensemble(folder, weights)
    rows = predict_ensemble(ensemble, Path(target))
    members = len(ensemble.runs)
    for row in rows:
        agreeing = row["votes"][ensemble.classes.index(row["label"])]
        log.info("%s\t%s\t%.4f\t%d/%d members", row["file"], row["label"], row["probability"], agreeing, members)
    if csv:
        write_kaggle_csv(rows, Path(csv))
        log.info("Wrote %d predictions to %s (id,label = soft-vote probability of %s).", len(rows), csv,
                 ensemble.classes[-1])
    return 0
