"""Resumable training state and final weights, written atomically, read without unpickling."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from convtricks.atomic import atomic_path
from convtricks.errors import UserError


def save_checkpoint(path: Path, state: dict) -> None:
    """`state` holds only tensors, numbers, strings, lists and dicts: loadable with weights_only."""
    with atomic_path(path) as temp:
        torch.save(state, temp)


def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"No checkpoint at {path}: this run cannot be resumed.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses pickled code; damaged files fail too
        raise UserError(f"Checkpoint {path} cannot be read safely ({type(error).__name__}).") from None


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # torch.compile wraps the model; its keys carry an "_orig_mod." prefix we never store.
    state = model.state_dict()
    return {key.replace("_orig_mod.", ""): value.detach().contiguous() for key, value in state.items()}


def save_weights(path: Path, model: torch.nn.Module) -> None:
    with atomic_path(path) as temp:
        save_file(_plain_state(model), str(temp))


def load_weights(path: Path, model: torch.nn.Module) -> None:
    if not path.exists():
        raise UserError(f"Weights file {path} does not exist.")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"Weights file {path} is not a readable safetensors file ({error}).") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"Weights file {path} does not fit this model "
            f"({len(missing)} missing and {len(unexpected)} unexpected tensors)."
        )
