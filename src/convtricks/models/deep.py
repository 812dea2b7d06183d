"""The lecture's "tricks for better optimization" on one deep CNN: batch norm, skip connections
(ResNet basic blocks) and gradient injection (GoogLeNet's auxiliary classifiers).

`deep-cnn` is a plain stack of 3x3 convs; three switches turn it into a ResNet with auxiliary
heads, one trick at a time, so each trick can be trained and compared on its own.

How `depth` maps to layers: depth counts the 3x3 convs on the main path. They come in blocks of
two (a residual block wraps exactly such a pair), so depth must be even and the net has
depth / 2 blocks, spread over the stages as evenly as possible, the later stages taking the
remainder (they run on smaller maps, so an extra block costs less time there). With the default
four stages (32, 64, 128, 256 channels):

    depth  8 -> blocks per stage (1, 1, 1, 1)
    depth 14 -> (1, 2, 2, 2)
    depth 20 -> (2, 2, 3, 3)

The first conv of every stage has stride 2 (stage 1 too, which keeps 150x150 inputs affordable
on a CPU): 150 -> 75 -> 38 -> 19 -> 10. Then global average pooling, optional dropout and one
dense layer give `num_outputs` logits.

Layer names read like the description: `stage2.block1.conv1`, `stage2.block1.bn1`,
`stage2.block1.shortcut.conv`, `aux1.dense`, `dense`; so `trainable: ["stage4.*", "dense.*"]`
works.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from convtricks.models.registry import register_model

# The net learns from scratch; standardizing its input with the usual ImageNet statistics
# keeps the first layers' activations near unit scale, which matters most without batch norm.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# Width of the hidden dense layer in each auxiliary classifier: small, because the head only
# exists to inject gradient during training and is dropped at prediction.
AUX_HIDDEN_UNITS = 128


def blocks_per_stage(depth: int, num_stages: int) -> list[int]:
    """How many two-conv blocks each stage gets for `depth` main-path convs (see module doc)."""
    if num_stages < 1:
        raise ValueError("widths must name at least one stage")
    if depth % 2 != 0 or depth < 2 * num_stages:
        raise ValueError(
            f"depth counts 3x3 convs in blocks of two, so it must be even and at least "
            f"{2 * num_stages} for {num_stages} stages, got {depth}"
        )
    blocks = depth // 2
    base, extra = divmod(blocks, num_stages)
    return [base + (1 if stage >= num_stages - extra else 0) for stage in range(num_stages)]


class Normalize(nn.Module):
    """Standardize [0, 1] images per channel; constants, so kept out of the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


class ProjectionShortcut(nn.Module):
    """Reshapes the identity path where a block changes channels or size: [avg pool] -> 1x1 conv (+BN).

    Downsampling pools 2x2 before a stride-1 1x1 conv (ResNet-D, He et al. 2019, "Bag of
    Tricks") instead of a stride-2 1x1 conv: the strided conv would read only one pixel in
    four. It also avoids a oneDNN bug on x86 CPUs: the weight gradient of a stride-2 1x1 conv
    on channels_last input with fewer than 8 channels (the image, here) hangs or crashes
    (uxlfoundation/oneDNN#6035, seen with torch 2.14).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, batchnorm: bool):
        super().__init__()
        # ceil_mode matches the 3x3 stride-2 conv (padding 1) on odd sizes: 75 -> 38.
        self.pool = (nn.AvgPool2d(stride, ceil_mode=True, count_include_pad=False)
                     if stride > 1 else nn.Identity())
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=not batchnorm)
        self.bn = nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.pool(x)))


class ConvPairBlock(nn.Module):
    """Two 3x3 convs: conv-[bn]-relu-conv-[bn], then (+ shortcut if residual) and relu.

    Plain and residual blocks share this class so that the residual switch changes nothing
    but the shortcut: the comparison between them is about the skip connection alone.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int,
                 batchnorm: bool, residual: bool):
        super().__init__()
        # With batch norm a conv bias is redundant: BN's shift replaces it.
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=not batchnorm)
        self.bn1 = nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity()
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=not batchnorm)
        self.bn2 = nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity()
        self.residual = residual
        if not residual:
            self.shortcut = None
        elif in_channels == out_channels and stride == 1:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = ProjectionShortcut(in_channels, out_channels, stride, batchnorm)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu2(out)


class AuxiliaryClassifier(nn.Sequential):
    """GoogLeNet-style side head: pool -> dense -> relu -> logit, on an intermediate feature map."""

    def __init__(self, in_channels: int, num_outputs: int):
        super().__init__(OrderedDict([
            ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
            ("dense", nn.Linear(in_channels, AUX_HIDDEN_UNITS)),
            ("relu", nn.ReLU(inplace=True)),
            ("logit", nn.Linear(AUX_HIDDEN_UNITS, num_outputs)),
        ]))


class DeepCNN(nn.Module):
    """A deep CNN with switchable batch norm, residual blocks and auxiliary heads.

    Output: the main logits (N, num_outputs), except in training mode with auxiliary heads,
    where forward returns {"logits": main, "aux": [aux1, ...], "aux_weight": w} so the
    training loop can add w * loss(aux_i) (see `loss_with_aux`). Auxiliary heads sit after
    every stage but the first (too shallow to classify) and the last (it feeds the main head):
    after stages 2 and 3 with the default four stages.
    """

    def __init__(self, depth: int = 14, widths: Sequence[int] = (32, 64, 128, 256),
                 batchnorm: bool = False, residual: bool = False, aux_heads: bool = False,
                 aux_weight: float = 0.3, dropout: float = 0.0, input_size=(150, 150),
                 num_outputs: int = 1, zero_init_residual: bool = False):
        super().__init__()
        widths = [int(w) for w in widths]
        if any(w < 1 for w in widths):
            raise ValueError(f"widths must be positive channel counts, got {widths}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {dropout}")
        if aux_weight < 0:
            raise ValueError(f"aux_weight must not be negative, got {aux_weight}")
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be at least 1, got {num_outputs}")
        if len(tuple(input_size)) != 2 or min(input_size) < 2 ** len(widths):
            raise ValueError(
                f"input_size must be (height, width) with sides of at least {2 ** len(widths)} "
                f"for {len(widths)} stride-2 stages, got {input_size}"
            )
        if aux_heads and len(widths) < 3:
            raise ValueError(
                f"auxiliary heads go after the intermediate stages, so they need at least 3 stages; "
                f"widths {widths} has {len(widths)}"
            )

        self.input_size = tuple(int(side) for side in input_size)
        self.depth = depth
        self.aux_weight = float(aux_weight)
        self.normalize = Normalize(_IMAGENET_MEAN, _IMAGENET_STD)

        in_channels = 3
        stage_blocks = blocks_per_stage(depth, len(widths))
        for stage_index, (out_channels, num_blocks) in enumerate(zip(widths, stage_blocks), start=1):
            blocks = OrderedDict()
            for block_index in range(1, num_blocks + 1):
                stride = 2 if block_index == 1 else 1
                blocks[f"block{block_index}"] = ConvPairBlock(in_channels, out_channels, stride,
                                                              batchnorm, residual)
                in_channels = out_channels
            self.add_module(f"stage{stage_index}", nn.Sequential(blocks))
        self.num_stages = len(widths)

        # stage number -> auxiliary head name, for the stages that get one.
        self._aux_after = {}
        if aux_heads:
            for aux_index, stage_index in enumerate(range(2, len(widths)), start=1):
                name = f"aux{aux_index}"
                self.add_module(name, AuxiliaryClassifier(widths[stage_index - 1], num_outputs))
                self._aux_after[stage_index] = name
        # The summary marks these as training-only: prediction never runs them.
        self.training_only_modules = tuple(self._aux_after.values())

        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dense = nn.Linear(in_channels, num_outputs)
        self._initialize(zero_init_residual and residual and batchnorm)

    def _initialize(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # fan_in keeps the forward signal's scale through a plain ReLU stack (He et al.).
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            # Each residual block starts as the identity (Goyal et al. 2017). Off by default:
            # at the first step it leaves the residual branches' convs without gradient.
            for module in self.modules():
                if isinstance(module, ConvPairBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward(self, images: torch.Tensor):
        x = self.normalize(images)
        collect_aux = self.training and bool(self._aux_after)
        aux_logits = []
        for stage_index in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{stage_index}")(x)
            if collect_aux and stage_index in self._aux_after:
                aux_logits.append(getattr(self, self._aux_after[stage_index])(x))
        logits = self.dense(self.dropout(self.flatten(self.pool(x))))
        if collect_aux:
            return {"logits": logits, "aux": aux_logits, "aux_weight": self.aux_weight}
        return logits


def loss_with_aux(output, target: torch.Tensor,
                  criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Loss for either output form: main loss, plus aux_weight * loss of each auxiliary head."""
    if not isinstance(output, dict):
        return criterion(output, target)
    loss = criterion(output["logits"], target)
    for aux_logits in output["aux"]:
        loss = loss + output["aux_weight"] * criterion(aux_logits, target)
    return loss


def main_logits(output) -> torch.Tensor:
    """The main head's logits from either output form (for accuracy during training)."""
    return output["logits"] if isinstance(output, dict) else output


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the weight gradient of the first, middle and last trainable conv layer.

    Convs are taken in registration order (input to output for the models here). Projection
    shortcuts (modules named "...shortcut...") are skipped: the vanishing gradient is about
    the depth of the main path. A conv without a gradient yet reports 0.0; a model with no
    trainable conv gives {}. Call it after backward and before the optimizer zeroes the grads.
    """
    convs = [
        module for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.weight.requires_grad and "shortcut" not in name
    ]
    if not convs:
        return {}
    picks = {"first_conv": convs[0], "middle_conv": convs[len(convs) // 2], "last_conv": convs[-1]}
    return {
        key: (0.0 if conv.weight.grad is None else conv.weight.grad.detach().float().norm().item())
        for key, conv in picks.items()
    }


@register_model("deep-cnn")
def deep_cnn(**options) -> nn.Module:
    return DeepCNN(**options)
