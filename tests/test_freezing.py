"""Freezing by name: the lecture's parameter counts, typo safety, and BatchNorm that stays put."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from convtricks.errors import UserError
from convtricks.models.registry import create_model
from convtricks.train.freezing import count_parameters, freeze_except, set_train_mode, trainable_parameters


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vgg():
    return create_model("vgg16", pretrained="none")  # 150x150, flatten-dense: the lecture's model


def _two_bn_net() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 3), bn1=nn.BatchNorm2d(4), relu1=nn.ReLU(),
        conv2=nn.Conv2d(4, 4, 3), bn2=nn.BatchNorm2d(4)))


def test_lecture_parameter_counts(vgg):
    freeze_except(vgg, ["*"])
    assert count_parameters(vgg) == (16_812_353, 16_812_353, 0)
    # Step 4: freeze the base, train the new top.
    assert freeze_except(vgg, ["top.*"]) == (2_097_665, 14_714_688)
    assert count_parameters(vgg) == (16_812_353, 2_097_665, 14_714_688)
    # Step 5: unfreeze block5_conv1..3 as well.
    assert freeze_except(vgg, ["base.block5_*", "top.*"]) == (9_177_089, 7_635_264)
    trainable_names = {n for n, p in vgg.named_parameters() if p.requires_grad}
    assert {n.split(".")[1] for n in trainable_names} == {"block5_conv1", "block5_conv2", "block5_conv3",
                                                           "dense1", "dense2"}


def test_bare_layer_names_and_edge_patterns(vgg):
    assert freeze_except(vgg, ["top"]) == freeze_except(vgg, ["top.*"])
    assert freeze_except(vgg, "base.block1_conv1")[0] == 3 * 64 * 9 + 64  # one string, not its letters
    assert freeze_except(vgg, [])[0] == 0


def test_pattern_that_matches_nothing_names_itself(vgg):
    freeze_except(vgg, ["*"])
    with pytest.raises(UserError, match=r"'base\.blok5_\*' matches no parameter.*base\.block5_conv1"):
        freeze_except(vgg, ["top.*", "base.blok5_*"])
    # Nothing was changed by the refused call.
    assert count_parameters(vgg)[2] == 0
    with pytest.raises(UserError, match="must be a string"):
        freeze_except(vgg, [5])


def test_frozen_parameters_get_no_gradient_and_stay_out_of_the_optimizer():
    net = _two_bn_net()
    freeze_except(net, ["conv2.*", "bn2.*"])
    assert {id(p) for p in trainable_parameters(net)} == {id(p) for n, p in net.named_parameters()
                                                         if n.startswith(("conv2.", "bn2."))}
    set_train_mode(net, True)
    net(torch.rand(2, 3, 8, 8)).sum().backward()
    assert net.conv1.weight.grad is None and net.conv2.weight.grad is not None


def test_frozen_batchnorm_keeps_its_statistics_and_unfrozen_one_learns():
    torch.manual_seed(0)
    net = _two_bn_net()
    freeze_except(net, ["conv2.*", "bn2.*"])
    set_train_mode(net, True)
    assert net.training and net.conv1.training and not net.bn1.training and net.bn2.training
    frozen_mean, learning_mean = net.bn1.running_mean.clone(), net.bn2.running_mean.clone()
    for _ in range(3):
        net(torch.rand(4, 3, 8, 8) * 5 + 2)
    assert torch.equal(net.bn1.running_mean, frozen_mean) and int(net.bn1.num_batches_tracked) == 0
    assert not torch.equal(net.bn2.running_mean, learning_mean) and int(net.bn2.num_batches_tracked) == 3

    set_train_mode(net, False)
    assert not any(m.training for m in net.modules())
    freeze_except(net, ["*"])
    set_train_mode(net, True)
    net(torch.rand(4, 3, 8, 8) * 5 + 2)
    assert not torch.equal(net.bn1.running_mean, frozen_mean)


def test_batchnorm_without_parameters_follows_the_mode():
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4, affine=False)))
    freeze_except(net, [])
    set_train_mode(net, True)
    assert net.bn.training
