"""Trick 1, dropout, as the lecture states it: where it sits, what it does in training and at prediction."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from convtricks.models.small_cnn import SmallCNN

# The smallest input that survives four conv3x3 + pool2 blocks: 46 -> 22 -> 10 -> 4 -> 1.
SMALL = (46, 46)


@pytest.fixture(autouse=True)
def seeded():
    # nn.Dropout draws its masks from torch's global generator.
    torch.manual_seed(0)


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, *SMALL, generator=torch.Generator().manual_seed(1))


def capture_dropout(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record (input, output) of the model's dropout layer at every forward pass."""
    seen = []

    def record(module, inputs, output):
        seen.append((inputs[0].detach(), output.detach()))

    model.dropout.register_forward_hook(record)
    return seen


def test_one_dropout_after_flatten_before_the_largest_dense_layer():
    model = SmallCNN(dropout=0.5)
    names = [name for name, _ in model.named_children()]
    assert names.index("dropout") == names.index("flatten") + 1 == names.index("dense1") - 1
    dropouts = [module for module in model.modules() if isinstance(module, nn.Dropout)]
    assert dropouts == [model.dropout] and model.dropout.p == 0.5
    # The lecture's reason for putting it there: that layer holds most of the parameters.
    dense1 = sum(p.numel() for p in model.dense1.parameters())
    assert dense1 > 0.9 * sum(p.numel() for p in model.parameters())


def test_no_dropout_unless_asked():
    assert not any(isinstance(module, nn.Dropout) for module in SmallCNN().modules())


@pytest.mark.parametrize("rate", [0.5, 0.3])
def test_training_drops_about_p_and_scales_the_kept_units_by_one_over_one_minus_p(rate):
    layer = SmallCNN(input_size=SMALL, dropout=rate).dropout.train()
    units = torch.rand(200, 1000) + 0.5  # no zeros, so a zero output means dropped
    out = layer(units)
    dropped = out == 0
    assert dropped.float().mean().item() == pytest.approx(rate, abs=0.01)
    torch.testing.assert_close(out[~dropped], units[~dropped] / (1 - rate))


def test_inverted_scaling_inside_the_model_and_in_the_gradient():
    model = SmallCNN(input_size=SMALL, dropout=0.5).train()
    seen = capture_dropout(model)
    x = images(8)
    model(x).sum().backward()
    features, out = seen[0]
    active = features != 0  # ReLU + pool leave some exact zeros
    kept = active & (out != 0)
    assert torch.equal(out[kept], features[kept] * 2)  # 1 / (1 - 0.5) = 2, exactly
    assert torch.all(out[~kept] == 0)
    assert kept.sum().item() / active.sum().item() == pytest.approx(0.5, abs=0.1)
    # A dropped unit teaches dense1 nothing in this step: its weight column gets no gradient
    # from that image. With one image the mask is that image's alone.
    model.zero_grad()
    model(x[:1]).sum().backward()
    dropped_units = seen[-1][1][0] == 0
    assert torch.all(model.dense1.weight.grad[:, dropped_units] == 0)
    assert torch.any(model.dense1.weight.grad[:, ~dropped_units] != 0)


def test_prediction_is_deterministic_and_equals_the_model_without_dropout():
    model = SmallCNN(input_size=SMALL, dropout=0.5).eval()
    x = images()
    with torch.no_grad():
        first, second = model(x), model(x)
        without = SmallCNN(input_size=SMALL, dropout=0.0).eval()
        without.load_state_dict(model.state_dict())  # dropout has no weights: same names
        skipped = nn.Sequential(*(m for name, m in model.named_children() if name != "dropout"))(x)
    assert torch.equal(first, second)
    assert torch.equal(first, without(x))
    assert torch.equal(first, skipped)


def test_a_fresh_mask_every_batch():
    model = SmallCNN(input_size=SMALL, dropout=0.5).train()
    seen = capture_dropout(model)
    x = images()
    with torch.no_grad():
        first, second = model(x), model(x)
    masks = [out != 0 for _, out in seen]
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(first, second)
    # And only the mask is random: with dropout off the two passes agree.
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
