"""The lecture's baseline: 4 conv + 2 dense layers, 3,453,121 parameters at 150x150."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from convtricks.models.registry import register_model


def _conv_block(in_channels: int, out_channels: int, batchnorm: bool) -> list[tuple[str, nn.Module]]:
    # With batch norm the conv bias is redundant (BN's shift replaces it).
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, bias=not batchnorm)
    layers = [("conv", conv)]
    if batchnorm:
        layers.append(("bn", nn.BatchNorm2d(out_channels)))
    layers.append(("relu", nn.ReLU(inplace=True)))
    return layers


class SmallCNN(nn.Sequential):
    """conv3x3(32)-pool-conv3x3(64)-pool-conv3x3(128)-pool-conv3x3(128)-pool-flatten-[dropout]-dense512-dense1.

    Layer names follow the lecture's order (conv1, pool1, ..., dense1, dense2) so that
    `trainable` patterns and the summary table read like the lecture. The output is a logit;
    the sigmoid lives in the loss (BCE-with-logits) and in `predict`.
    """

    def __init__(self, input_size=(150, 150), dropout: float = 0.0, batchnorm: bool = False,
                 widths=(32, 64, 128, 128), dense_units: int = 512, num_outputs: int = 1):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {dropout}")
        height, width = input_size
        layers: list[tuple[str, nn.Module]] = []
        in_channels = 3
        for index, out_channels in enumerate(widths, start=1):
            for suffix, layer in _conv_block(in_channels, out_channels, batchnorm):
                name = f"conv{index}" if suffix == "conv" else f"{suffix}{index}"
                layers.append((name, layer))
            layers.append((f"pool{index}", nn.MaxPool2d(2)))
            height, width = (height - 2) // 2, (width - 2) // 2
            in_channels = out_channels
        if height < 1 or width < 1:
            raise ValueError(f"input_size {tuple(input_size)} is too small for {len(widths)} conv+pool blocks")
        layers.append(("flatten", nn.Flatten()))
        if dropout > 0:
            layers.append(("dropout", nn.Dropout(dropout)))
        layers += [
            ("dense1", nn.Linear(in_channels * height * width, dense_units)),
            ("relu_dense1", nn.ReLU(inplace=True)),
            ("dense2", nn.Linear(dense_units, num_outputs)),
        ]
        super().__init__(OrderedDict(layers))
        self.input_size = tuple(input_size)


@register_model("small-cnn")
def small_cnn(**options) -> nn.Module:
    return SmallCNN(**options)
