"""One training loop for every recipe: stages, freezing, augmentation, checkpoints, history.

Everything random follows from (seed, epoch), so an interrupted run resumed from its last
checkpoint produces the same history as one that never stopped.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from convtricks.errors import UserError
from convtricks.train import batches, distributed
from convtricks.train.checkpoint import save_checkpoint, save_weights
from convtricks.data.augment import AugmentConfig, augment_batch, resize_batch
from convtricks.train.features import extract, frozen_trunk, pick_flips
from convtricks.train.freezing import freeze_except, set_train_mode
from convtricks.train.history import keras_line, write_history
from convtricks.train.mixing import mix_batch, mixed_loss, progressive_size
from convtricks.train.optim import lr_factor, make_optimizer
from convtricks.train.progress import StepProgress

log = logging.getLogger("convtricks")

DROPOUT, AUGMENT, MIX = 1, 2, 3  # purposes of the per-epoch seeds
FLIP_ONLY = AugmentConfig(horizontal_flip=True)


@dataclass
class Batcher:
    """Turns uint8 image batches into model input: rescale, memory format, device."""

    rescale: float
    device: torch.device
    channels_last: bool

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.to(self.device, non_blocking=True).float().mul_(self.rescale)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch


@dataclass
class TrainingState:
    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)
    best: float | None = None
    optimizer: dict | None = None
    stage: int = -1
    ema: dict | None = None


def has_bf16_units(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware: a CUDA GPU, or a CPU with AVX-512 BF16 or AMX.

    On a CPU without them autocast emulates bf16 and measured 6-17x slower than fp32; on one with
    AVX-512 BF16 it trained the from-scratch recipe 1.3x faster at the same accuracy (README).
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, no public name yet
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def has_depthwise_convs(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())


def resolve_precision(precision: str, device: torch.device, model: torch.nn.Module) -> str:
    """`auto` made concrete for one model on one device: bf16 where it trains faster, else fp32.

    On a CPU with bf16 units, bf16 trained plain convolutions 1.5-2x faster but EfficientNet's
    depthwise ones 24% slower than fp32 (bench/bench_speed.py), so those models stay fp32 there.
    """
    if precision != "auto":
        return precision
    if not has_bf16_units(device):
        return "fp32"
    return "bf16" if device.type == "cuda" or not has_depthwise_convs(model) else "fp32"


def autocast_for(device: torch.device, precision: str):
    # "auto" not yet resolved for a model (resolve_precision): bf16 where the device has bf16 units.
    if precision == "bf16" or (precision == "auto" and has_bf16_units(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def predict_logits(forward: Callable, inputs: torch.Tensor, to_input: Callable, batch_size: int,
                   precision: str, device: torch.device, tta: bool = False) -> torch.Tensor:
    """Outputs for every input, in order; `tta` averages with the horizontal mirror."""
    chunks = []
    for start in range(0, inputs.shape[0], batch_size):
        batch = to_input(inputs[start:start + batch_size])
        with autocast_for(device, precision):
            outputs = forward(batch)
            if tta:
                outputs = (outputs + forward(batch.flip(-1))) / 2
        chunks.append(outputs.float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)  # empty: a process's share of a tiny set


def measure(task, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    sums = task.batch_stats(logits, targets)
    return {name: value / len(targets) for name, value in sums.items()}


def measure_across(task, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """`measure` of a set each process predicted a part of (DDP); the plain `measure` otherwise."""
    sums, count = distributed.total(task.batch_stats(logits, targets) if len(targets) else {}, len(targets))
    return {name: value / count for name, value in sums.items()}


class StagePlan:
    def __init__(self, stages: list[dict]):
        self.stages = stages
        self.starts = []
        total = 0
        for stage in stages:
            self.starts.append(total)
            total += stage["epochs"]
        self.total_epochs = total

    def locate(self, epoch: int) -> tuple[int, dict, int]:
        """(stage index, stage, epoch within the stage) for a global 0-based epoch."""
        for index in reversed(range(len(self.stages))):
            if epoch >= self.starts[index] and self.stages[index]["epochs"] > 0:
                return index, self.stages[index], epoch - self.starts[index]
        raise IndexError(epoch)


def validates(epoch_in_stage: int, stage: dict) -> bool:
    """Keras's `validation_freq`: validate every n-th epoch of a stage, and always its last,
    so every stage ends with a measured model (on 2 CPU cores, validating with mirrored
    evaluation costs about a fifth of a 96 px epoch)."""
    done = epoch_in_stage + 1
    return done % stage["validation_freq"] == 0 or done == stage["epochs"]


def check_finetune_order(model: torch.nn.Module, stages: list[dict]) -> None:
    """Refuse to train a pretrained base under a random top in the first stage (the lecture's
    reason: the random top's large gradients would wreck the pretrained features)."""
    if not getattr(model, "pretrained_base", False) or not stages:
        return
    first = stages[0]
    if first.get("force_finetune"):
        return
    freeze_except(model, first["trainable"])
    if any(p.requires_grad for p in model.base.parameters()):
        raise UserError(
            "The first stage would fine-tune the pretrained base under a randomly initialised top, whose "
            "large gradients destroy the pretrained features; train the top alone first (trainable: "
            "['top.*']) or set force_finetune: true."
        )


def fit(model, task, train_set, val_set, stages: list[dict], settings: dict, run_dir: Path,
        state: TrainingState, augment_config=None, on_epoch: Callable | None = None) -> TrainingState:
    """Train `model` through `stages`, checkpointing after every epoch into `run_dir`.

    `train_set`/`val_set` have `.images` (uint8 N,3,H,W) and `.targets`; `settings` carries
    device, rescale, batch sizes and the seed; `state` is fresh or loaded from a checkpoint.
    """
    plan = StagePlan(stages)
    device = settings["device"]
    seed = settings["seed"]
    to_input = Batcher(settings["rescale"], device, settings["channels_last"])
    batch_size, val_batch_size = settings["batch_size"], settings["val_batch_size"]
    val_images, val_targets = val_set.images, val_set.targets
    # The size the model trains at in the end; training images may be stored larger (data.train_decode_size).
    full_size = list(settings.get("target_size") or train_set.images.shape[-2:])
    if settings.get("validation_steps"):
        keep = settings["validation_steps"] * val_batch_size
        val_images, val_targets = val_images[:keep], val_targets[:keep]

    # Bagging trains on a sample of the training images: batches index the full tensor through it.
    pool = settings.get("train_subset")
    n_train = len(pool) if pool is not None else len(train_set.images)
    ema = None
    current_stage = -1
    optimizer = None
    features = None  # (train, val) outputs of the frozen trunk, while a stage trains only what follows it

    for epoch in range(state.epoch, plan.total_epochs):
        stage_index, stage, epoch_in_stage = plan.locate(epoch)
        if stage_index != current_stage:
            n_trainable, n_frozen = freeze_except(model, stage["trainable"])
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = make_optimizer(params, stage)
            if state.optimizer is not None and state.stage == stage_index:
                optimizer.load_state_dict(state.optimizer)
            state.optimizer = None
            log.info("Stage '%s': %s trainable, %s frozen parameters, %s %.0e, %d epochs.", stage["name"],
                     f"{n_trainable:,}", f"{n_frozen:,}", stage["optimizer"], stage["lr"], stage["epochs"])
            augmenting = bool(augment_config is not None and augment_config.enabled and stage["augment"])
            flip_only = augmenting and augment_config == FLIP_ONLY
            features = None
            mixing = bool(stage["mixup"] or stage["cutmix"])
            usable = (stage["feature_cache"] and not stage["ema"] and (flip_only or not augmenting) and not mixing
                      and not stage["progressive_start"] and list(train_set.images.shape[-2:]) == full_size)
            trunk = frozen_trunk(model) if usable else None
            if trunk is not None:
                started = time.perf_counter()
                with autocast_for(device, stage["precision"]):
                    features = distributed.from_main(lambda: (  # DDP: computed once, sent to every process
                        extract(trunk, train_set.images, to_input, val_batch_size, train_set.key, flip_only, settings["cache"]),
                        extract(trunk, val_images, to_input, val_batch_size, val_set.key, False, settings["cache"]),
                    ))
                frozen = len(trunk.prefix) - 1  # the input normalization is not a layer
                log.info("The base's first %d layers are frozen%s: ran them once (%d + %d images%s, %.1f s); "
                         "training the rest on their cached output.", frozen,
                         " and the only augmentation is a mirror" if flip_only else "", len(train_set.images),
                         len(val_images), ", each also mirrored" if flip_only else "", time.perf_counter() - started)
            if stage["ema"] and (ema is None):
                ema = torch.optim.swa_utils.AveragedModel(
                    model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(stage["ema"]), use_buffers=True)
                if state.ema is not None:
                    ema.load_state_dict(state.ema)
            trained = distributed.trained(model, trunk)  # DDP: what this stage trains, gradients averaged
            current_stage = stage_index

        steps = batches.steps_for(n_train, batch_size, stage["steps_per_epoch"])
        total_steps = steps * stage["epochs"]
        torch.manual_seed(distributed.rank_seed(batches.epoch_seed(seed, epoch, DROPOUT)))
        augment_generator = torch.Generator().manual_seed(distributed.rank_seed(batches.epoch_seed(seed, epoch, AUGMENT)))
        mix_rng = np.random.default_rng(distributed.rank_seed(batches.epoch_seed(seed, epoch, MIX)))
        train_size = progressive_size(full_size, stage["progressive_start"], stage["progressive_until"],
                                      epoch_in_stage, stage["epochs"])
        train_inputs = features[0] if features else train_set.images
        forward = trained  # the model, or the layers after a cached trunk (DDP-wrapped under torchrun)
        set_train_mode(model, True)
        if stage["bn_eval"]:
            # Batches of 32 give noisy statistics; the pretrained running ones are better (as Keras
            # keeps BatchNormalization in inference mode when fine-tuning).
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

        started = time.perf_counter()
        sums = {}
        seen = 0
        grad_sums: dict[str, float] = {}
        progress = StepProgress(f"Epoch {epoch + 1}/{plan.total_epochs}", steps) if distributed.is_main() else distributed.Quiet()
        for step, positions in enumerate(batches.epoch_batches(n_train, batch_size, steps, seed, epoch)):
            positions = distributed.shard(positions)  # DDP: this process's slice of the global batch
            indices = pool[positions] if pool is not None else positions
            for group in optimizer.param_groups:
                group["lr"] = stage["lr"] * lr_factor(stage["schedule"], epoch_in_stage * steps + step, total_steps)
            if features and flip_only:
                inputs = pick_flips(features[0], indices, augment_generator).to(device)
            elif features:
                inputs = train_inputs[indices].to(device)
            else:
                inputs = to_input(train_inputs[indices])
                if augmenting:
                    # Images decoded larger are warped straight into the target size: the warp costs
                    # what it does at that size. Progressive sizes below it come from an antialiased
                    # downscale, since warping far below the source's size would alias.
                    inputs = augment_batch(inputs, augment_config, augment_generator, size=full_size)
                inputs = resize_batch(inputs, train_size)
            mixed = mix_batch(inputs, stage["mixup"], stage["cutmix"], mix_rng) if mixing else None  # never on cached features
            if mixed is not None:
                inputs = mixed.inputs
            targets = train_set.targets[indices].to(device)
            with autocast_for(device, stage["precision"]):
                outputs = forward(inputs)
            loss = mixed_loss(task.loss, outputs, targets, mixed)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if stage["grad_norms"]:
                from convtricks.models.deep import gradient_norms

                for name, value in gradient_norms(model).items():
                    grad_sums[name] = grad_sums.get(name, 0.0) + value
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs  # drop auxiliary heads
            for name, value in task.batch_stats(logits.detach(), targets).items():
                sums[name] = sums.get(name, 0.0) + value
            seen += len(indices)
            progress.advance(sums.get("loss", 0.0) / seen)
        progress.close()
        sums, seen = distributed.total(sums, seen)  # DDP: the history is the global batch's
        train_seconds = time.perf_counter() - started

        evaluated = ema.module if ema is not None else model
        val_metrics = {}
        if validates(epoch_in_stage, stage):
            set_train_mode(evaluated, False)
            part = distributed.share(len(val_targets))  # DDP: each process predicts its part of the set
            if features:
                val_logits = predict_logits(trunk.head, features[1][part], lambda x: x.to(device), val_batch_size,
                                            stage["precision"], device)
            else:
                val_logits = predict_logits(evaluated, val_images[part], to_input, val_batch_size,
                                            stage["precision"], device, tta=stage["tta"])
            val_metrics = measure_across(task, val_logits, val_targets[part])
        seconds = time.perf_counter() - started

        row = {"epoch": epoch + 1, "stage": stage["name"], "lr": optimizer.param_groups[0]["lr"]}
        if train_size != full_size:
            row["train_size"] = train_size[0]  # progressive resizing: this epoch's (shorter) side
        row.update({name: value / seen for name, value in sums.items()})
        row.update({f"val_{name}": value for name, value in val_metrics.items()})
        row.update({"seconds": round(seconds, 3), "train_images_per_s": round(seen / train_seconds, 1)})
        row.update({f"grad_{name}": value / steps for name, value in grad_sums.items()})
        state.history.append(row)
        log.info(keras_line(row, plan.total_epochs, task.metric_names))

        writes = distributed.is_main()  # DDP: only the main process writes the run folder
        monitored = row.get(task.monitor)
        if monitored is not None and (state.best is None or monitored > state.best):
            state.best = monitored
            if writes:
                save_weights(run_dir / "best.safetensors", evaluated)
        state.epoch = epoch + 1
        state.stage = stage_index
        if writes:
            save_checkpoint(run_dir / "checkpoint.pt", {
                "epoch": state.epoch, "stage": stage_index, "history": state.history, "best": state.best,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
            })
            write_history(run_dir, state.history)
        if on_epoch:
            on_epoch(state)

    final = ema.module if ema is not None else model
    if distributed.is_main():
        save_weights(run_dir / "model.safetensors", final)
    return state
