"""Which images go in which batch: a seeded, resumable stream of shuffled passes.

Keras' `steps_per_epoch` decouples epochs from passes (100 steps of 32 = 1.6 passes). The
stream is an endless concatenation of permutations, permutation p seeded by (seed, p), so
the batches of any epoch follow from (seed, epoch) alone: resuming needs no sampler state.
"""

from __future__ import annotations

import torch


def _permutation(n: int, seed: int, pass_index: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + pass_index)
    return torch.randperm(n, generator=generator)


def epoch_batches(n: int, batch_size: int, steps: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index tensors of the `steps` batches of `epoch` (0-based)."""
    start = epoch * steps * batch_size
    stop = start + steps * batch_size
    first_pass, last_pass = start // n, (stop - 1) // n
    stream = torch.cat([_permutation(n, seed, p) for p in range(first_pass, last_pass + 1)])
    window = stream[start - first_pass * n: stop - first_pass * n]
    return list(window.split(batch_size))


def steps_for(n: int, batch_size: int, steps_per_epoch: int | None) -> int:
    """One pass by default: full batches only, so every step sees `batch_size` images."""
    if steps_per_epoch:
        return steps_per_epoch
    return max(1, n // batch_size)


def epoch_seed(seed: int, epoch: int, purpose: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, purpose: dropout, augmentation...)."""
    return (seed * 7_919 + epoch * 104_729 + purpose * 15_485_863) % (2**63 - 1)
