"""Data-parallel training over several processes (PyTorch DDP), started by torchrun.

`torchrun --nproc_per_node N -m convtricks train RECIPE ...` starts N copies of the command;
torchrun tells each its place through the environment (RANK, WORLD_SIZE, LOCAL_RANK, ...).
Every process holds the whole model and the whole (small) data set. The recipe's batch_size
stays the global batch: every process draws the same global batch order and trains on its own
contiguous slice of each batch, and DistributedDataParallel averages the gradients, so for a
mean loss one step equals the single-process step on the whole batch.

Process 0 (the main one) alone writes the run folder and prints; the others receive what they
need from it (the run folder's path, the recipe, a checkpoint) over the process group, so the
runs folder need only exist where process 0 runs. A plain run (no torchrun) creates no process
group and every helper here is then a no-op: world() is 1 and is_main() is true.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from convtricks.errors import UserError

T = TypeVar("T")
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what env:// initialisation reads


def launched() -> bool:
    """True in a process started by torchrun (or anything else that sets env:// variables)."""
    return all(name in os.environ for name in _RENDEZVOUS)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0)) if launched() else 0


def world() -> int:
    """How many processes train together (before setup(): how many torchrun will start)."""
    if active():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1)) if launched() else 1


def local_world() -> int:
    """Processes on this machine: they share its cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world())) if launched() else 1


def is_main() -> bool:
    return rank() == 0


def check_batch_size(batch_size: int) -> None:
    """Each process takes an equal slice of every global batch, or the averaged gradient would
    weigh some images more than others. Checked before any process waits on another."""
    processes = world()
    if processes > 1 and batch_size % processes:
        raise UserError(f"batch_size {batch_size} cannot be split evenly over {processes} processes; "
                        f"use a multiple of {processes}.")


def setup() -> None:
    """Join the process group torchrun arranged; a plain run does nothing."""
    if not launched() or active():
        return
    if torch.cuda.is_available():
        # One GPU per process on each machine; a bare "cuda" device then means this one.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "cpu:gloo,cuda:nccl"  # CUDA tensors over NCCL; CPU ones (metrics, objects) over gloo
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    if not is_main():
        # One voice: the main process prints the epoch lines; the others only warn.
        logging.getLogger("convtricks").setLevel(logging.WARNING)


def teardown(finished: bool = True) -> None:
    if active():
        if finished:
            # Leave together: a process that tears its group down while another is still
            # evaluating can abort in the transport's threads at exit.
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def session():
    """A process group for the length of a command (when started by torchrun)."""
    setup()
    try:
        yield
    except BaseException:
        teardown(finished=False)  # the others may never reach a barrier
        raise
    teardown()


def barrier() -> None:
    if active():
        dist.barrier()


def from_main(make: Callable[[], T]) -> T:
    """`make()` runs on the main process alone; every process returns its result.

    A UserError on the main process reaches the others too, so all stop with the same sentence
    instead of waiting for a value that never comes."""
    if not active():
        return make()
    message = [None]
    if is_main():
        try:
            message = [("value", make())]
        except UserError as error:
            message = [("error", str(error))]
    dist.broadcast_object_list(message, src=0)
    kind, payload = message[0]
    if kind == "error":
        raise UserError(payload)
    return payload


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This process's contiguous slice of a global batch (the whole batch in a plain run)."""
    if not active():
        return batch
    size = len(batch) // world()
    return batch[rank() * size:(rank() + 1) * size]


def share(n: int) -> slice:
    """This process's contiguous part of n items (evaluation: parts may differ by one)."""
    if not active():
        return slice(0, n)
    return slice(n * rank() // world(), n * (rank() + 1) // world())


def total(sums: dict[str, float], count: int) -> tuple[dict[str, float], int]:
    """Per-process sums of metrics and image counts, added over all processes."""
    if not active():
        return sums, count
    gathered: list = [None] * world()
    dist.all_gather_object(gathered, (sums, count))
    added: dict[str, float] = {}
    for part, _ in gathered:  # in rank order, so every process adds the same floats the same way
        for name, value in part.items():
            added[name] = added.get(name, 0.0) + value
    return added, sum(n for _, n in gathered)


def rank_seed(seed: int) -> int:
    """Process 0 keeps the single-process seed; the others get their own, so the processes do
    not draw the same augmentations and dropout masks for different images."""
    return (seed + rank() * 1_000_000_007) % (2**63 - 1)


class _Layers(nn.Module):
    """The trained layers after a frozen trunk, as one module DDP can wrap (same parameters)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            features = layer(features)
        return features


def trained(model: nn.Module, trunk=None) -> Callable:
    """What a training step calls: the model (or, on cached trunk features, the layers after the
    trunk), wrapped in DistributedDataParallel under torchrun so the gradients are averaged.

    Wrap again whenever freezing changes: DDP fixes at construction which parameters it syncs."""
    if not active():
        return trunk.head if trunk is not None else model
    module = _Layers(trunk.rest) if trunk is not None else model
    on_gpu = next(module.parameters()).device.type == "cuda"
    return nn.parallel.DistributedDataParallel(module, device_ids=[torch.cuda.current_device()] if on_gpu else None)


class Quiet:
    """Stands in for the step progress bar on the processes that do not print."""

    def advance(self, loss: float) -> None:
        pass

    def close(self) -> None:
        pass
