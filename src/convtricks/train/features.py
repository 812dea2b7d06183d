"""The frozen-trunk fast path: run the frozen part of the net once, train the rest on its output.

The lecture's "fast feature extraction" runs a frozen conv base once per image and trains
the top on the stored features. The same holds for any frozen *prefix*: when fine-tuning
unfreezes only the base's last blocks, the blocks before them still compute the same maps
every epoch, so they too run once. Horizontal flips are the one augmentation this stays
exact for: the prefix runs on the image and on its mirror, and each step picks one of the
two per image. The cache key covers the images' content, the prefix's weights and its
length, so nothing stale is ever reused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from convtricks.data import cache


def weights_digest(modules: list[nn.Module]) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _units(module: nn.Module) -> list[nn.Module]:
    """A Sequential's layers in the order they run, nested Sequentials opened up."""
    if isinstance(module, nn.Sequential):
        return [unit for child in module for unit in _units(child)]
    return [module]


def _global_pool(model: nn.Module):
    """A top that starts with global average pooling lets the cache hold (C,1,1) instead of (C,H,W):
    pooling an already pooled map is the identity, so the top gives the same outputs."""
    first = next(iter(model.top.children()), None)
    return first if isinstance(first, nn.AdaptiveAvgPool2d) and first.output_size in (1, (1, 1)) else None


@dataclass
class FrozenTrunk:
    """What runs once (`prefix`, frozen) and what trains (`rest`) of a model with a conv base."""

    prefix: list[nn.Module]
    rest: list[nn.Module]
    pool: nn.Module | None

    def head(self, features: torch.Tensor) -> torch.Tensor:
        for unit in self.rest:
            features = unit(features)
        return features


def _base_units(model: nn.Module) -> list[nn.Module] | None:
    base = getattr(model, "base", None)
    if not isinstance(base, nn.Sequential) or not hasattr(model, "top") or not hasattr(model, "normalize"):
        return None
    return _units(base)


def whole_base(model: nn.Module) -> FrozenTrunk | None:
    """The whole base as the trunk: right for prediction, where nothing trains."""
    units = _base_units(model)
    if units is None:
        return None
    return FrozenTrunk([model.normalize] + units, [model.top], _global_pool(model))


def frozen_trunk(model: nn.Module) -> FrozenTrunk | None:
    """The longest frozen prefix of the model's base, or None when nothing worth caching is frozen."""
    units = _base_units(model)
    if units is None:
        return None
    length = 0
    while length < len(units) and not any(p.requires_grad for p in units[length].parameters()):
        length += 1
    if length == 0:
        return None
    prefix = [model.normalize] + units[:length]
    pool = _global_pool(model) if length == len(units) else None
    return FrozenTrunk(prefix, units[length:] + [model.top], pool)


@torch.no_grad()
def extract(trunk: FrozenTrunk, images: torch.Tensor, to_input, batch_size: int, images_key: str,
            with_flips: bool, use_cache: bool = True) -> torch.Tensor:
    """Prefix outputs for uint8 `images`: (N, ...) or, with flips, (2, N, ...) (plain, mirrored)."""
    key = cache.content_key([], images_key, weights_digest(trunk.prefix), len(trunk.prefix),
                            tuple(images.shape), trunk.pool is not None, with_flips)
    cached = cache.load("features", key) if use_cache else None
    if cached is not None:
        return cached["features"]
    modes = [unit.training for unit in trunk.prefix]
    for unit in trunk.prefix:
        unit.eval()  # frozen means frozen: BatchNorm uses its running statistics
    variants = [False, True] if with_flips else [False]
    outputs = []
    for flip in variants:
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            features = to_input(images[start:start + batch_size])
            if flip:
                features = features.flip(-1)
            for unit in trunk.prefix:
                features = unit(features)
            if trunk.pool is not None:
                features = trunk.pool(features)
            chunks.append(features.float().cpu())
        outputs.append(torch.cat(chunks))
    for unit, mode in zip(trunk.prefix, modes):
        unit.train(mode)
    features = torch.stack(outputs) if with_flips else outputs[0]
    if use_cache:
        cache.save("features", key, {"features": features})
    return features


def pick_flips(features: torch.Tensor, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image, the plain or the mirrored prefix output, each with probability 1/2."""
    mirrored = torch.rand(len(indices), generator=generator) < 0.5
    return torch.where(mirrored.view(-1, *[1] * (features.dim() - 2)), features[1][indices], features[0][indices])


@torch.no_grad()
def predict_through_cache(model: nn.Module, images: torch.Tensor, to_input, batch_size: int, images_key: str,
                          tta: bool = False, use_cache: bool = True) -> torch.Tensor | None:
    """Logits for uint8 `images` with the base's output taken from (or put in) the cache.

    Ensemble members and repeated evaluations share a pretrained base: its output on the test
    images is computed once. None when the model has no separable base."""
    trunk = whole_base(model)
    if trunk is None:
        return None
    features = extract(trunk, images, to_input, batch_size, images_key, tta, use_cache)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # the cache lives on the CPU; the head may not
    if tta:  # the mean of the image's and its mirror's logits
        logits = (trunk.head(features[0].to(device)) + trunk.head(features[1].to(device))) / 2
    else:
        logits = trunk.head(features.to(device))
    model.train(was_training)
    return logits.float().cpu()  # where predict_logits leaves its logits too
