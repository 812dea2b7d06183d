"""Two training-time tricks for small data from scratch: mixed images and growing images.

Mixing (mixup, Zhang et al. 2018; CutMix, Yun et al. 2019) trains on blends of two images
with the loss blended in the same proportion, so the net cannot memorise single images.
Progressive resizing trains the early epochs on smaller images (cheaper, and coarse shapes
first) and grows them to the recipe's size, where evaluation happens.

Every draw comes from a numpy generator seeded per (run seed, epoch), so a resumed run
mixes exactly as one that never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Mixed:
    """A batch after mixing: inputs, the partner of each image, and the first image's share."""

    inputs: torch.Tensor
    partner: torch.Tensor  # indices into the batch
    share: float  # of the original image in each blend (1.0: nothing mixed)


def mix_batch(inputs: torch.Tensor, mixup: float, cutmix: float, rng: np.random.Generator) -> Mixed:
    """Blend each image with another of the batch: mixup (alpha `mixup`) or a CutMix patch
    (alpha `cutmix`); with both on, each batch picks one at even odds."""
    n = inputs.shape[0]
    methods = [name for name, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0]
    if not methods or n < 2:
        return Mixed(inputs, torch.arange(n, device=inputs.device), 1.0)
    method = methods[int(rng.integers(len(methods)))]
    partner = torch.as_tensor(rng.permutation(n), device=inputs.device)
    share = float(rng.beta(mixup if method == "mixup" else cutmix, mixup if method == "mixup" else cutmix))
    if method == "mixup":
        return Mixed(inputs * share + inputs[partner] * (1 - share), partner, share)
    height, width = inputs.shape[-2:]
    # A box of (1 - share) of the area, centred anywhere, clipped at the edges; the share is
    # then recomputed from the box actually pasted.
    cut_h, cut_w = int(height * np.sqrt(1 - share)), int(width * np.sqrt(1 - share))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = inputs.clone()
    mixed[..., top:bottom, left:right] = inputs[partner][..., top:bottom, left:right]
    share = 1 - (bottom - top) * (right - left) / (height * width)
    return Mixed(mixed, partner, share)


def mixed_loss(loss_fn, outputs, targets: torch.Tensor, mixed: Mixed | None) -> torch.Tensor:
    """The loss blended as the images were: share x loss(own label) + rest x loss(partner's);
    the plain loss for an unmixed batch (None)."""
    if mixed is None or mixed.share >= 1.0:
        return loss_fn(outputs, targets)
    return mixed.share * loss_fn(outputs, targets) + (1 - mixed.share) * loss_fn(outputs, targets[mixed.partner])


def progressive_size(final: list[int], start: int, until: float, epoch_in_stage: int, epochs: int) -> list[int]:
    """Training size for this epoch: from `start` pixels (shorter side) at the first epoch,
    linearly to `final` at fraction `until` of the stage, in steps of 8 pixels; `final` after."""
    if not start or epochs <= 1 or start >= min(final):
        return list(final)
    progress = epoch_in_stage / max(1.0, until * (epochs - 1))
    if progress >= 1:
        return list(final)
    scale = (start + (min(final) - start) * progress) / min(final)
    return [max(8, int(round(side * scale / 8)) * 8) for side in final]

