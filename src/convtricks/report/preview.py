"""A grid of augmented variants of one image, as the lecture shows them, to check a recipe by eye."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch

from convtricks.data.augment import AugmentConfig, augment_batch
from convtricks.errors import UserError

MAX_VARIANTS = 256  # beyond this the tiles are too small to see anything


def render_preview(image: torch.Tensor, config: AugmentConfig, n: int, out: Path, seed: int) -> Path:
    """Write a PNG: the original (first tile, titled) followed by n augmented variants.

    image: float (3, H, W) in [0, 1]. The variants come from one `augment_batch` call on n
    copies of the image, so they show exactly what training sees; the same seed gives the
    same grid.
    """
    if not 1 <= n <= MAX_VARIANTS:
        raise UserError(f"The number of variants must be between 1 and {MAX_VARIANTS}, got {n}.")
    if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise UserError(f"The preview needs one RGB image as a float (3, H, W) tensor, got "
                        f"{image.dtype} {tuple(image.shape)}.")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"The preview is written as PNG; give an output file ending in .png, not '{out.name}'.")

    generator = torch.Generator().manual_seed(seed)
    batch = image.detach().to("cpu", torch.float32).unsqueeze(0).expand(n, -1, -1, -1).contiguous()
    variants = augment_batch(batch, config, generator)
    tiles = [("original", image.detach().cpu().float())] + [(f"#{k}", variants[k - 1]) for k in range(1, n + 1)]

    # Imported here so that training never pays for matplotlib; Agg writes files without a display.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.0 * rows + 0.4), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (title, tile) in zip(axes.flat, tiles):
        axis.imshow(tile.clamp(0, 1).permute(1, 2, 0).numpy())
        axis.set_title(title, fontsize=9)
    # About 14 characters of 9-point text fit in an inch of figure width.
    figure.suptitle(textwrap.fill(_describe(config), width=28 * columns), fontsize=9)
    figure.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, format="png", dpi=100)
    except OSError as problem:
        raise UserError(f"Could not write the preview to '{out}': {problem.strerror or problem}.") from None
    finally:
        plt.close(figure)
    return out


def _describe(config: AugmentConfig) -> str:
    """The options that differ from the defaults, e.g. 'rotation_range=40, horizontal_flip=True'."""
    defaults = AugmentConfig().to_dict()
    changed = [f"{key}={value}" for key, value in config.to_dict().items() if value != defaults[key]]
    return ", ".join(changed) if changed else "no augmentation"
