"""The frozen-base fast path: run the conv base once, then train the top on its features.

With the base frozen and no augmentation, every epoch would compute the same features
again; the lecture's "fast feature extraction" computes them once. The cache key covers the
images' content, the input size and the base's weights, so nothing stale is ever reused.
"""

from __future__ import annotations

import hashlib

import torch

from convtricks.data import cache


def weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def base_is_frozen(model: torch.nn.Module) -> bool:
    base = getattr(model, "base", None)
    if base is None or not hasattr(model, "forward_features") or not hasattr(model, "forward_head"):
        return False
    return not any(p.requires_grad for p in base.parameters())


@torch.no_grad()
def extract_features(model, images: torch.Tensor, to_input, batch_size: int, images_key: str,
                     use_cache: bool = True, tta: bool = False) -> torch.Tensor:
    """Base features of uint8 `images` (in eval mode), from the disk cache when possible."""
    key = cache.content_key([], images_key, weights_digest(model.base), tuple(images.shape))
    cached = cache.load("features", key) if use_cache else None
    if cached is not None:
        return cached["features"]
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch = to_input(images[start:start + batch_size])
        chunks.append(model.forward_features(batch).float().cpu())
    model.train(was_training)
    features = torch.cat(chunks)
    if use_cache:
        cache.save("features", key, {"features": features})
    return features
