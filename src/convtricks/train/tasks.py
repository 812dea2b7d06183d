"""What a model's outputs mean: the loss to minimise and the metrics to report.

The training loop knows nothing about labels; a task does. Binary classification (the
lecture's dogs vs cats) is here; other tasks (multi-task faces) implement the same methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_outputs(outputs):
    """Models with auxiliary heads return {"logits", "aux", "aux_weight"} while training."""
    if isinstance(outputs, dict) and "aux" in outputs:
        return outputs["logits"], outputs["aux"], float(outputs.get("aux_weight", 0.3))
    return outputs, [], 0.0


class BinaryTask:
    """One logit per image; label 1 is the second class in sorted order (dogs)."""

    metric_names = ("acc",)
    monitor = "val_acc"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def _bce(self, logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
        targets = targets.float().view(-1, 1)
        if smoothing:
            targets = targets * (1 - smoothing) + 0.5 * smoothing
        return F.binary_cross_entropy_with_logits(logits.float().view(-1, 1), targets)

    def loss(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        logits, aux, aux_weight = split_outputs(outputs)
        total = self._bce(logits, targets, self.label_smoothing)
        for aux_logits in aux:  # gradient injection: auxiliary classifiers add their loss
            total = total + aux_weight * self._bce(aux_logits, targets, self.label_smoothing)
        return total

    def batch_stats(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Sums over the batch (the loop divides by the count): loss without smoothing, correct."""
        logits = logits.float().view(-1)
        loss = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="sum")
        correct = ((logits > 0).long() == targets.long()).sum()
        return {"loss": float(loss), "acc": float(correct)}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float().view(-1))


class CategoricalTask:
    """One logit per class, softmax cross-entropy; for more than two classes."""

    metric_names = ("acc",)
    monitor = "val_acc"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def loss(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        logits, aux, aux_weight = split_outputs(outputs)
        total = F.cross_entropy(logits.float(), targets.long(), label_smoothing=self.label_smoothing)
        for aux_logits in aux:
            total = total + aux_weight * F.cross_entropy(aux_logits.float(), targets.long(),
                                                         label_smoothing=self.label_smoothing)
        return total

    def batch_stats(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        logits = logits.float()
        loss = F.cross_entropy(logits, targets.long(), reduction="sum")
        correct = (logits.argmax(1) == targets.long()).sum()
        return {"loss": float(loss), "acc": float(correct)}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1)
