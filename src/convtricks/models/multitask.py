"""Trick 5's model: one shared, pretrained conv base and one small head per task.

    faces -> normalize -> base (EfficientNet-Lite, ImageNet) -> top: pool -> age | gender | race heads

The output is one tensor (N, 7) so the shared training loop handles it like any classifier:
    column 0     age in years (a regression: the head predicts a standardized age, and the
                 model maps it back to years with the training set's mean and spread, so the
                 output means what it says and the lecture's Loss1 = (age - predicted age)²
                 is read in years² straight from it);
    column 1     gender logit (1 = female);
    columns 2-6  race logits (White, Black, Asian, Indian, Others).
A model built for a subset of tasks (`tasks=["age", "gender"]`) does not build the other heads;
their columns hold zeros, so the layout never changes.

With `weighting="uncertainty"` the top also owns `loss_log_vars`, one learned log-variance s_i
per task (Kendall et al. 2018): the loss weights each task by exp(-s_i) and adds s_i. They are
parameters under `top.`, so `trainable: ["top.*"]` trains them along with the heads.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn

from convtricks.models.backbones import efficientnet_lite_imagenet, input_normalization, lite_conv_base
from convtricks.models.registry import register_model

TASKS = ("age", "gender", "race")
RACE_CLASSES = 5
OUTPUTS = 2 + RACE_CLASSES
# Where each task's outputs sit in the (N, 7) tensor.
COLUMNS = {"age": slice(0, 1), "gender": slice(1, 2), "race": slice(2, 2 + RACE_CLASSES)}
WIDTHS = {"age": 1, "gender": 1, "race": RACE_CLASSES}
BACKBONES = {"efficientnet-lite0": 0, "efficientnet-lite1": 1, "efficientnet-lite2": 2}


def check_tasks(tasks) -> list[str]:
    """A task list in canonical order; a single name (from `--tasks age`) counts as a list of one."""
    if isinstance(tasks, str):
        tasks = [part.strip() for part in tasks.split(",") if part.strip()]
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise ValueError(f"tasks must name at least one of {', '.join(TASKS)}, got {tasks!r}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(str, unknown))}; tasks are {', '.join(TASKS)}")
    return [t for t in TASKS if t in tasks]


def _head(in_features: int, hidden_units: int, outputs: int) -> nn.Module:
    if not hidden_units:
        return nn.Linear(in_features, outputs)
    return nn.Sequential(OrderedDict([("dense1", nn.Linear(in_features, hidden_units)),
                                      ("relu", nn.ReLU(inplace=True)),
                                      ("dense2", nn.Linear(hidden_units, outputs))]))


class FaceHeads(nn.Module):
    """The new top: pool -> flatten -> dropout -> one head per task, plus the age scale and the
    learned loss weights. Pooling comes first so a cache of the frozen base can hold one vector
    per face (pooling an already pooled map changes nothing)."""

    def __init__(self, in_features: int, tasks: list[str], hidden_units: int = 0, dropout: float = 0.2,
                 uncertainty: bool = False):
        super().__init__()
        self.tasks = list(tasks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        for task in self.tasks:
            self.add_module(task, _head(in_features, hidden_units, WIDTHS[task]))
        # Years = mean + std * head output: the head then learns a quantity of order 1.
        self.register_buffer("age_mean", torch.tensor(30.0))
        self.register_buffer("age_std", torch.tensor(25.0))
        if uncertainty:
            self.loss_log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    @torch.no_grad()
    def set_age_scale(self, mean: float, std: float) -> None:
        """Adopt the training set's age mean and spread; a learned age log-variance starts at
        log(std²), the loss of always guessing the mean, so its weight starts near 1."""
        self.age_mean.fill_(float(mean))
        self.age_std.fill_(max(float(std), 1.0))
        if hasattr(self, "loss_log_vars") and "age" in self.tasks:
            self.loss_log_vars[self.tasks.index("age")] = 2 * math.log(max(float(std), 1.0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.dropout(self.flatten(self.pool(features)))
        columns = []
        for task in TASKS:  # fixed layout; a head not built leaves zeros
            if task in self.tasks:
                value = getattr(self, task)(features)
                if task == "age":
                    value = self.age_mean + self.age_std * value
            else:
                value = features.new_zeros(features.shape[0], WIDTHS[task])
            columns.append(value.to(features.dtype))
        return torch.cat(columns, dim=1)


class MultiTaskNet(nn.Module):
    """normalize -> base -> top, the layout every pretrained model here has, so freezing by name
    (`trainable: ["top.*"]`) and the frozen-base cache work as for any classifier."""

    def __init__(self, backbone: str, normalize: nn.Module, base: nn.Sequential, top: FaceHeads,
                 input_size: tuple[int, int], pretrained_base: bool):
        super().__init__()
        self.normalize = normalize
        self.base = base
        self.top = top
        self.backbone = backbone
        self.input_size = tuple(input_size)
        self.tasks = top.tasks
        self.pretrained_base = pretrained_base  # the loop refuses to fine-tune it under a random top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.base(self.normalize(x)))


def _pretrained(pretrained, weights):
    if weights is not None:
        return weights
    if pretrained is True or pretrained == "imagenet":
        return "imagenet"
    if pretrained in (None, False) or str(pretrained).lower() == "none":
        return None
    return pretrained  # a weights file


@register_model("multitask-faces")
def multitask_faces(tasks=TASKS, weighting="fixed", backbone="efficientnet-lite0", pretrained="imagenet",
                    weights=None, input_size=None, hidden_units=0, dropout=0.2, num_outputs=None) -> nn.Module:
    """A shared EfficientNet-Lite base (ImageNet weights) with age, gender and race heads.

    `num_outputs` is accepted for generic callers and ignored: the layout is always 7 columns.
    """
    tasks = check_tasks(tasks)
    if weighting not in ("fixed", "uncertainty"):
        raise ValueError(f"weighting must be fixed or uncertainty, got {weighting!r}")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {dropout}")
    if not (isinstance(hidden_units, int) and hidden_units >= 0):
        raise ValueError(f"hidden_units must be an integer >= 0, got {hidden_units!r}")
    size = (200, 200) if input_size is None else (
        (input_size, input_size) if isinstance(input_size, int) else tuple(input_size))
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"input_size must be (height, width) of at least 32 pixels, got {input_size!r}")
    source = _pretrained(pretrained, weights)
    network = efficientnet_lite_imagenet(BACKBONES[backbone], source)
    base = lite_conv_base(network)
    top = FaceHeads(network.num_features, tasks, hidden_units, float(dropout), weighting == "uncertainty")
    return MultiTaskNet(backbone, input_normalization("lite"), base, top, size, pretrained_base=source is not None)
