"""The deep CNN with batch norm, skip connections and auxiliary heads, and gradient_norms."""

from __future__ import annotations

import fnmatch
import itertools

import pytest
import torch
import torch.nn as nn

from convtricks.errors import UserError
from convtricks.models.deep import (
    AUX_HIDDEN_UNITS,
    ConvPairBlock,
    ProjectionShortcut,
    blocks_per_stage,
    gradient_norms,
    loss_with_aux,
    main_logits,
)
from convtricks.models.registry import create_model

# Stage 3 keeps stage 2's width, so its projection is there for the stride alone.
WIDTHS = (8, 16, 16, 32)
SIZE = (64, 64)
SWITCHES = list(itertools.product([False, True], repeat=3))


def build(depth=8, batchnorm=False, residual=False, aux_heads=False, **options):
    torch.manual_seed(0)
    return create_model("deep-cnn", depth=depth, widths=WIDTHS, input_size=SIZE,
                        batchnorm=batchnorm, residual=residual, aux_heads=aux_heads, **options)


def batch(n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, *SIZE, generator=generator)
    labels = (torch.rand(n, 1, generator=generator) > 0.5).float()
    return images, labels


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main_path_convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and "shortcut" not in name]


@pytest.mark.parametrize("depth, expected", [(8, [1, 1, 1, 1]), (14, [1, 2, 2, 2]), (20, [2, 2, 3, 3])])
def test_depth_counts_main_path_convs(depth, expected):
    assert blocks_per_stage(depth, 4) == expected
    model = build(depth=depth, residual=True)
    convs = main_path_convs(model)
    assert len(convs) == depth
    assert all(conv.kernel_size == (3, 3) for conv in convs)


@pytest.mark.parametrize("options", [
    {"depth": 9}, {"depth": 6}, {"dropout": 1.0}, {"aux_weight": -0.1}, {"widths": (8, 16), "aux_heads": True},
    {"input_size": (8, 8)}, {"unknown_option": 1},
])
def test_bad_options_are_user_errors(options):
    settings = {"depth": 8, "widths": WIDTHS, "input_size": SIZE, **options}
    with pytest.raises(UserError):
        create_model("deep-cnn", **settings)


@pytest.mark.parametrize("batchnorm, residual, aux_heads", SWITCHES)
def test_output_shapes_in_train_and_eval(batchnorm, residual, aux_heads):
    model = build(batchnorm=batchnorm, residual=residual, aux_heads=aux_heads)
    images, _ = batch()
    model.train()
    out = model(images)
    if aux_heads:
        assert set(out) == {"logits", "aux", "aux_weight"}
        assert out["logits"].shape == (4, 1)
        assert [a.shape for a in out["aux"]] == [(4, 1), (4, 1)]
        assert out["aux_weight"] == pytest.approx(0.3)
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (4, 1)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 1)
    assert torch.isfinite(out).all()
    assert model.input_size == SIZE


def test_num_outputs_reaches_main_and_aux_heads():
    model = build(aux_heads=True, num_outputs=5)
    images, _ = batch()
    out = model.train()(images)
    assert out["logits"].shape == (4, 5)
    assert all(a.shape == (4, 5) for a in out["aux"])


def test_parameter_count_of_plain_net_matches_hand_count():
    def conv3x3(c_in, c_out):
        return c_in * c_out * 9 + c_out  # weights + bias

    expected = (conv3x3(3, 8) + conv3x3(8, 8) + conv3x3(8, 16) + conv3x3(16, 16)
                + conv3x3(16, 16) * 2 + conv3x3(16, 32) + conv3x3(32, 32) + (32 + 1))
    assert count(build()) == expected


@pytest.mark.parametrize("depth", [8, 14])
def test_each_switch_adds_the_parameters_it_should(depth):
    plain = count(build(depth=depth))
    blocks = blocks_per_stage(depth, len(WIDTHS))
    # Batch norm: each conv loses its bias (c_out) and gains gamma and beta (2 * c_out).
    bn_extra = sum(2 * n * width for n, width in zip(blocks, WIDTHS))
    assert count(build(depth=depth, batchnorm=True)) - plain == bn_extra
    # Skip connections: a 1x1 projection (with bias) at each stage's first block, where the
    # stride is 2; identity shortcuts elsewhere are free.
    projections = sum(c_in * c_out + c_out for c_in, c_out in zip((3,) + WIDTHS[:-1], WIDTHS))
    assert count(build(depth=depth, residual=True)) - plain == projections
    # Auxiliary heads after stages 2 and 3: dense (C -> hidden) and logit (hidden -> 1).
    aux_extra = sum(c * AUX_HIDDEN_UNITS + AUX_HIDDEN_UNITS + AUX_HIDDEN_UNITS + 1 for c in WIDTHS[1:3])
    assert count(build(depth=depth, aux_heads=True)) - plain == aux_extra


def test_projection_exactly_where_channels_or_stride_change():
    model = build(depth=14, residual=True, batchnorm=True)
    blocks = [m for m in model.modules() if isinstance(m, ConvPairBlock)]
    assert len(blocks) == 7
    projected = 0
    for block in blocks:
        changes = block.conv1.in_channels != block.conv1.out_channels or block.conv1.stride != (1, 1)
        if changes:
            projected += 1
            assert isinstance(block.shortcut, ProjectionShortcut)
            assert block.shortcut.conv.kernel_size == (1, 1)
            # Downsampling happens in the pool, so the 1x1 conv reads every pixel.
            assert block.shortcut.conv.stride == (1, 1)
            assert isinstance(block.shortcut.pool, nn.AvgPool2d) == (block.conv1.stride == (2, 2))
            assert isinstance(block.shortcut.bn, nn.BatchNorm2d)
        else:
            assert isinstance(block.shortcut, nn.Identity)
    assert projected == len(WIDTHS)
    plain = build(depth=14, batchnorm=True)
    assert all(m.shortcut is None for m in plain.modules() if isinstance(m, ConvPairBlock))


def test_residual_block_adds_its_input():
    block = ConvPairBlock(4, 4, stride=1, batchnorm=False, residual=True)
    for conv in (block.conv1, block.conv2):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    x = torch.rand(2, 4, 6, 6)  # non-negative, so relu(0 + x) == x
    assert torch.equal(block(x), x)
    block.residual, block.shortcut = False, None
    assert torch.equal(block(x), torch.zeros_like(x))


def test_aux_heads_run_only_in_training():
    model = build(aux_heads=True)
    assert model.training_only_modules == ("aux1", "aux2")
    assert build().training_only_modules == ()
    calls = []
    for name in model.training_only_modules:
        getattr(model, name).register_forward_hook(lambda *_, n=name: calls.append(n))
    images, _ = batch()
    model.train()(images)
    assert calls == ["aux1", "aux2"]
    calls.clear()
    model.eval()(images)
    assert calls == []


def test_loss_with_aux_weights_auxiliary_losses():
    model = build(aux_heads=True, aux_weight=0.5)
    images, labels = batch()
    criterion = nn.BCEWithLogitsLoss()
    out = model.train()(images)
    expected = (criterion(out["logits"], labels) + 0.5 * criterion(out["aux"][0], labels)
                + 0.5 * criterion(out["aux"][1], labels))
    assert torch.allclose(loss_with_aux(out, labels, criterion), expected)
    assert main_logits(out) is out["logits"]
    logits = model.eval()(images)
    assert torch.equal(loss_with_aux(logits, labels, criterion), criterion(logits, labels))
    assert main_logits(logits) is logits


def test_aux_loss_sends_gradient_to_aux_heads_and_earlier_stages():
    images, labels = batch()
    model = build(aux_heads=True)
    loss_with_aux(model.train()(images), labels, nn.BCEWithLogitsLoss()).backward()
    assert model.aux1.dense.weight.grad.abs().sum() > 0
    assert model.aux2.logit.weight.grad.abs().sum() > 0


def test_layer_names_read_like_the_lecture():
    model = build(residual=True, batchnorm=True, aux_heads=True, dropout=0.5)
    names = [name for name, _ in model.named_parameters()]
    assert "stage1.block1.conv1.weight" in names
    assert "stage2.block1.shortcut.conv.weight" in names
    assert "aux1.dense.weight" in names and "dense.weight" in names
    stage4 = fnmatch.filter(names, "stage4.*")
    assert stage4 and all(n.startswith("stage4.") for n in stage4)
    # Dropout sits right before the final dense layer.
    children = [name for name, _ in model.named_children()]
    assert children.index("dropout") == children.index("dense") - 1
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5


def test_zero_init_residual_starts_each_block_as_identity_branch():
    model = build(residual=True, batchnorm=True, zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, ConvPairBlock)]
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    default = build(residual=True, batchnorm=True)
    assert all(torch.all(b.bn2.weight == 1) for b in default.modules() if isinstance(b, ConvPairBlock))


def test_odd_sizes_keep_shortcut_and_main_path_aligned():
    model = build(depth=8, residual=True, batchnorm=True).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 75, 75)).shape == (2, 1)  # 75 -> 38 -> 19 -> 10 -> 5


def test_channels_last_training_step_matches_contiguous():
    # Also guards the shortcut design: a stride-2 1x1 conv on the 3-channel image hangs or
    # crashes the channels_last backward on x86 CPUs (see ProjectionShortcut).
    images, labels = batch()
    criterion = nn.BCEWithLogitsLoss()
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model = build(depth=8, residual=True, batchnorm=True, aux_heads=True)
        model = model.to(memory_format=memory_format).train()
        loss = loss_with_aux(model(images.contiguous(memory_format=memory_format)), labels, criterion)
        loss.backward()
        results.append((loss.detach(), model.stage1.block1.shortcut.conv.weight.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert torch.allclose(grad_a, grad_b, rtol=1e-3, atol=1e-5)


def test_gradient_norms_keys_and_positivity_after_backward():
    model = build(depth=8, residual=True, batchnorm=True, aux_heads=True)
    assert gradient_norms(model) == {"first_conv": 0.0, "middle_conv": 0.0, "last_conv": 0.0}
    images, labels = batch()
    loss_with_aux(model.train()(images), labels, nn.BCEWithLogitsLoss()).backward()
    norms = gradient_norms(model)
    assert set(norms) == {"first_conv", "middle_conv", "last_conv"}
    assert all(value > 0 for value in norms.values())
    convs = main_path_convs(model)
    assert norms["first_conv"] == pytest.approx(convs[0].weight.grad.norm().item())
    assert norms["last_conv"] == pytest.approx(convs[-1].weight.grad.norm().item())


def test_gradient_norms_works_on_other_models_and_skips_frozen_convs():
    model = create_model("small-cnn", input_size=(48, 48))
    images = torch.rand(2, 3, 48, 48)
    model(images).sum().backward()
    norms = gradient_norms(model)
    assert norms["first_conv"] == pytest.approx(model.conv1.weight.grad.norm().item())
    assert norms["middle_conv"] == pytest.approx(model.conv3.weight.grad.norm().item())
    assert norms["last_conv"] == pytest.approx(model.conv4.weight.grad.norm().item())
    model.conv1.weight.requires_grad_(False)
    assert gradient_norms(model)["first_conv"] == pytest.approx(model.conv2.weight.grad.norm().item())
    assert gradient_norms(nn.Linear(3, 1)) == {}


def relative_first_to_last_gradient(**switches) -> float:
    """(first conv's grad/weight norm) / (last conv's grad/weight norm) at init, depth 20."""
    torch.manual_seed(0)
    model = create_model("deep-cnn", depth=20, widths=(8, 16, 32, 64), input_size=(32, 32), **switches)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 32, 32, generator=generator)
    labels = (torch.rand(8, 1, generator=generator) > 0.5).float()
    nn.functional.binary_cross_entropy_with_logits(model.train()(images), labels).backward()
    norms = gradient_norms(model)
    convs = main_path_convs(model)
    first = norms["first_conv"] / convs[0].weight.norm().item()
    last = norms["last_conv"] / convs[-1].weight.norm().item()
    return first / last


def test_skip_connections_and_batchnorm_keep_the_first_layers_learning():
    plain = relative_first_to_last_gradient()
    residual_bn = relative_first_to_last_gradient(residual=True, batchnorm=True)
    # Relative to its weights, the deep plain net's first conv gets far less gradient than
    # its last; batch norm with skip connections carries it down to the first layers.
    assert residual_bn > 3 * plain
