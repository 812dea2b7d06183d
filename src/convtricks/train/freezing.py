"""Freezing by name, like the lecture's `layer.trainable = False`.

A recipe lists what trains: `trainable: ["top.*"]` (train only the new top), then
`trainable: ["base.block5_*", "top.*"]` (fine-tune the last conv block). Patterns are shell
globs (fnmatch) on `named_parameters()` names; a bare layer name also covers its parameters,
so "top" means the same as "top.*".
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch.nn as nn

from convtricks.errors import UserError

# Public BatchNorm classes (timm's BatchNormAct2d subclasses BatchNorm2d).
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def _layer_names(model: nn.Module, depth: int = 2, limit: int = 24) -> str:
    # Names the user could have meant: parameter names cut to their first `depth` parts.
    seen: list[str] = []
    for name, _ in model.named_parameters():
        prefix = ".".join(name.split(".")[:depth])
        if prefix not in seen:
            seen.append(prefix)
    shown = ", ".join(seen[:limit])
    return shown + (", ..." if len(seen) > limit else "")


def freeze_except(model: nn.Module, trainable_patterns: list[str] | str) -> tuple[int, int]:
    """Make exactly the parameters matching one of the patterns trainable, freeze the rest.

    "*" trains everything; an empty list freezes everything. A pattern that matches nothing is
    an error, because a typo would otherwise silently freeze the whole model.
    Returns (trainable, frozen) counts of parameter values, as a summary prints them.
    """
    patterns = [trainable_patterns] if isinstance(trainable_patterns, str) else list(trainable_patterns)
    named = list(model.named_parameters())
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise UserError(f"A trainable pattern must be a string like 'top.*', got {pattern!r}.")
        if not any(_matches(name, pattern) for name, _ in named):
            raise UserError(f"The trainable pattern '{pattern}' matches no parameter of the model; "
                            f"its layers are: {_layer_names(model)}.")
    trainable = frozen = 0
    for name, parameter in named:
        parameter.requires_grad_(any(_matches(name, pattern) for pattern in patterns))
        if parameter.requires_grad:
            trainable += parameter.numel()
        else:
            frozen += parameter.numel()
    return trainable, frozen


def set_train_mode(model: nn.Module, train: bool = True) -> nn.Module:
    """`model.train(train)`, except that a BatchNorm whose parameters are all frozen stays in eval
    mode: it keeps normalizing with its pretrained running statistics and does not update them.

    Without this a frozen base still drifts, since BatchNorm's statistics are buffers that
    training-mode forward passes overwrite whatever requires_grad says. A BatchNorm without
    affine parameters has nothing to judge by and follows `train`.
    """
    model.train(train)
    if train:
        for module in model.modules():
            if isinstance(module, _BATCH_NORMS):
                parameters = list(module.parameters())
                if parameters and not any(p.requires_grad for p in parameters):
                    module.eval()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int, int]:
    """(total, trainable, non_trainable) parameter values; BatchNorm's running statistics are
    buffers, not parameters, and are not counted."""
    total = trainable = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return total, trainable, total - trainable


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer should get: frozen parameters stay out of it (and out of weight decay)."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]
