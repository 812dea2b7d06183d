"""Optimizers and learning-rate schedules, by the names a recipe uses."""

from __future__ import annotations

import math

import torch


def make_optimizer(params, stage: dict) -> torch.optim.Optimizer:
    name, lr = stage["optimizer"], stage["lr"]
    decay, momentum = stage["weight_decay"], stage["momentum"]
    if name == "rmsprop":
        # Keras' RMSprop: rho 0.9, eps 1e-7 (PyTorch's defaults are alpha 0.99, eps 1e-8).
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-7, weight_decay=decay, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    nesterov = name == "nesterov"
    return torch.optim.SGD(params, lr=lr, weight_decay=decay, momentum=momentum or (0.9 if nesterov else 0.0),
                           nesterov=nesterov)


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the stage's base rate at `step` (0-based) of `total_steps`."""
    if schedule == "constant" or total_steps <= 1:
        return 1.0
    progress = step / (total_steps - 1)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    # onecycle: linear warm-up over the first 25%, then cosine down to ~0.
    warmup = 0.25
    if progress < warmup:
        return 0.04 + 0.96 * progress / warmup
    return 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
