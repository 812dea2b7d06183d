"""Models made by name, as timm does it: a recipe says `model: {name: small-cnn, ...}`."""

from __future__ import annotations

import importlib
from typing import Callable

import torch.nn as nn

from convtricks.errors import UserError

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}

# Modules that register models when imported. Kept as names so `create_model` pays
# for importing timm only when a recipe asks for a backbone.
_MODEL_MODULES = (
    "convtricks.models.small_cnn",
    "convtricks.models.backbones",
    "convtricks.models.deep",
    "convtricks.models.multitask",
)


def register_model(name: str):
    """Decorator: make `factory(**options) -> nn.Module` available as `name`."""

    def decorate(factory):
        _FACTORIES[name] = factory
        return factory

    return decorate


def _import_all() -> None:
    for module in _MODEL_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as missing:
            # A model module that is not written yet must not break the others.
            if missing.name != module:
                raise


def model_names() -> list[str]:
    _import_all()
    return sorted(_FACTORIES)


def create_model(name: str, **options) -> nn.Module:
    """Build the model registered as `name`; unknown names and options are user errors."""
    _import_all()
    if name not in _FACTORIES:
        raise UserError(f"Unknown model '{name}'; known models: {', '.join(sorted(_FACTORIES))}.")
    try:
        return _FACTORIES[name](**options)
    except TypeError as bad_option:
        raise UserError(f"Model '{name}' does not accept these options ({bad_option}).") from None
    except ValueError as bad_value:
        raise UserError(f"Model '{name}': {bad_value}.") from None
