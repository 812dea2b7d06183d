"""Batched augmentation: Keras' meanings, exact geometry, reproducibility, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from convtricks.data.augment import AugmentConfig, affine_grid, affine_theta, augment_batch, resize_batch, warp
from convtricks.errors import UserError

KERAS_RECIPE = dict(rotation_range=40, width_shift_range=0.2, height_shift_range=0.2,
                    shear_range=0.2, zoom_range=0.2, horizontal_flip=True)
EVERYTHING = dict(KERAS_RECIPE, vertical_flip=True, crop_scale=(0.5, 1.0), brightness=0.2,
                  contrast=0.2, saturation=0.2, noise_std=0.02, erase_prob=0.5)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(n: int = 8, height: int = 24, width: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=generator(seed))


def marker(n: int, height: int, width: int, row: int, col: int) -> torch.Tensor:
    images = torch.zeros(n, 3, height, width)
    images[:, :, row, col] = 1.0
    return images


def centre_of_mass(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) in pixels from the image centre, per image, of the first channel's mass."""
    mass = images[:, 0]
    height, width = mass.shape[-2:]
    xs = torch.arange(width) + 0.5 - width / 2
    ys = torch.arange(height) + 0.5 - height / 2
    total = mass.sum(dim=(1, 2))
    return (mass * xs).sum(dim=(1, 2)) / total, (mass * ys[:, None]).sum(dim=(1, 2)) / total


# --- config -------------------------------------------------------------------------------


def test_default_config_is_off_and_every_option_turns_it_on():
    assert not AugmentConfig().enabled
    for key, value in EVERYTHING.items():
        assert AugmentConfig(**{key: value}).enabled, key


def test_unknown_key_is_a_user_error_that_lists_the_known_ones():
    with pytest.raises(UserError) as caught:
        AugmentConfig.from_dict({"rotation_range": 10, "rotation": 40})
    message = str(caught.value)
    assert "'rotation'" in message and "rotation_range" in message and "horizontal_flip" in message


@pytest.mark.parametrize("values", [
    {"rotation_range": -5},
    {"rotation_range": True},
    {"width_shift_range": "0.2"},
    {"horizontal_flip": "yes please"},
    {"shear_range": 90},
    {"zoom_range": 1.5},
    {"zoom_range": [1.2, 0.8]},
    {"zoom_range": [0, 1.2]},
    {"fill_mode": "wrap"},
    {"cval": 2},
    {"crop_scale": [0.5, 1.5]},
    {"crop_ratio": [1.0]},
    {"noise_std": float("nan")},
    {"erase_prob": 1.5},
    {"erase_scale": [0.0, 0.3]},
    {"erase_ratio": [3.0, 0.3]},
])
def test_bad_values_are_user_errors(values):
    with pytest.raises(UserError):
        AugmentConfig.from_dict(values)


def test_from_dict_reads_yaml_lists_and_round_trips_through_plain_types():
    config = AugmentConfig.from_dict({**KERAS_RECIPE, "zoom_range": [0.9, 1.3], "crop_scale": [0.3, 1]})
    assert config.zoom_bounds == (0.9, 1.3)
    assert config.crop_scale == (0.3, 1.0)
    plain = config.to_dict()
    assert plain["zoom_range"] == [0.9, 1.3] and all(not isinstance(v, tuple) for v in plain.values())
    assert AugmentConfig.from_dict(plain) == config
    assert AugmentConfig.from_dict(None) == AugmentConfig()


def test_zoom_range_as_one_number_means_one_minus_to_one_plus():
    assert AugmentConfig(zoom_range=0.2).zoom_bounds == pytest.approx((0.8, 1.2))


# --- contract -----------------------------------------------------------------------------


def test_shape_dtype_range_and_the_input_is_left_alone():
    images = random_images()
    before = images.clone()
    out = augment_batch(images, AugmentConfig(**EVERYTHING), generator())
    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images)
    assert torch.equal(images, before)


def test_all_off_is_the_identity():
    images = random_images()
    assert torch.equal(augment_batch(images, AugmentConfig(), generator()), images)


def test_same_generator_state_same_output_and_the_state_moves_on():
    images = random_images()
    config = AugmentConfig(**EVERYTHING)
    first = augment_batch(images, config, generator(7))
    assert torch.equal(first, augment_batch(images, config, generator(7)))
    assert not torch.equal(first, augment_batch(images, config, generator(8)))
    shared = generator(7)
    assert torch.equal(augment_batch(images, config, shared), first)
    assert not torch.equal(augment_batch(images, config, shared), first)


def test_channels_last_in_channels_last_out_with_the_same_values():
    images = random_images()
    config = AugmentConfig(**EVERYTHING)
    out = augment_batch(images.contiguous(memory_format=torch.channels_last), config, generator(3))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, augment_batch(images, config, generator(3)))


def test_float64_stays_float64():
    images = random_images().double()
    out = augment_batch(images, AugmentConfig(**KERAS_RECIPE), generator())
    assert out.dtype == torch.float64


def test_non_float_input_is_refused():
    with pytest.raises(ValueError):
        augment_batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), AugmentConfig(horizontal_flip=True), generator())


# --- geometry -----------------------------------------------------------------------------


def test_separable_grid_equals_torch_affine_grid():
    theta = affine_theta((24, 20), angle=torch.tensor([0.0, 33.0, -71.0]), shift=(2.5, -4.0), shear=10.0,
                         zoom=(torch.tensor([0.8, 1.0, 1.2]), 1.1), flip_h=torch.tensor([True, False, True]))
    expected = F.affine_grid(theta, (3, 3, 24, 20), align_corners=False)
    torch.testing.assert_close(affine_grid(theta, (24, 20)), expected)


def test_identity_theta_reproduces_the_image():
    images = random_images()
    torch.testing.assert_close(warp(images, affine_theta((24, 20))), images)


def test_horizontal_flip_flips_exactly_about_half_the_images():
    images = random_images(n=64)
    out = augment_batch(images, AugmentConfig(horizontal_flip=True), generator())
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    unchanged = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert torch.all(flipped ^ unchanged)  # each image is exactly one of the two
    assert 16 <= int(flipped.sum()) <= 48


def test_vertical_flip_flips_along_the_height():
    images = random_images(n=32)
    out = augment_batch(images, AugmentConfig(vertical_flip=True), generator())
    flipped = [torch.equal(o, i.flip(-2)) for o, i in zip(out, images)]
    assert any(flipped) and not all(flipped)
    assert all(f or torch.equal(o, i) for f, o, i in zip(flipped, out, images))


def test_flip_folded_into_the_affine_matrix_mirrors_the_image():
    images = random_images()
    torch.testing.assert_close(warp(images, affine_theta((24, 20), flip_h=True)), images.flip(-1))
    torch.testing.assert_close(warp(images, affine_theta((24, 20), flip_v=True)), images.flip(-2))


def test_shift_moves_a_marker_by_the_given_pixels():
    images = marker(1, 24, 20, row=10, col=4)
    moved = warp(images, affine_theta((24, 20), shift=(7.0, -3.0)), fill_mode="constant")
    torch.testing.assert_close(moved, marker(1, 24, 20, row=7, col=11))


@pytest.mark.parametrize("shift_range, most_pixels", [(0.2, 8.0), (5, 5.0)])  # as Keras: below 1 a fraction
def test_random_width_shift_moves_content_sideways_over_the_whole_range(shift_range, most_pixels):
    images = marker(256, 21, 40, row=10, col=20)
    out = augment_batch(images, AugmentConfig(width_shift_range=shift_range, fill_mode="constant"), generator())
    x, y = centre_of_mass(out)
    start_x, start_y = centre_of_mass(images)
    shift = x - start_x
    torch.testing.assert_close(y, start_y.expand_as(y))  # no vertical motion
    assert shift.abs().max() <= most_pixels + 1e-4
    assert shift.min() < -0.75 * most_pixels and shift.max() > 0.75 * most_pixels


def test_rotation_by_90_degrees_turns_content_counter_clockwise():
    # The marker sits right of the centre; a quarter turn counter-clockwise puts it above it.
    images = marker(1, 9, 9, row=4, col=8)
    turned = warp(images, affine_theta((9, 9), angle=90.0), fill_mode="constant")
    torch.testing.assert_close(turned, marker(1, 9, 9, row=0, col=4))
    back = warp(turned, affine_theta((9, 9), angle=-90.0), fill_mode="constant")
    torch.testing.assert_close(back, images)


def test_random_rotation_keeps_the_distance_to_the_centre_and_stays_in_range():
    images = torch.zeros(128, 3, 41, 41)
    images[:, :, 18:23, 33:38] = 1.0  # a blob 15 px right of the centre
    out = augment_batch(images, AugmentConfig(rotation_range=40, fill_mode="constant"), generator())
    x, y = centre_of_mass(out)
    angles = torch.rad2deg(torch.atan2(-y, x))  # y points down
    assert torch.allclose(torch.hypot(x, y), torch.full_like(x, 15.0), atol=0.5)
    assert angles.abs().max() <= 40.5
    assert angles.min() < -30 and angles.max() > 30


def test_zoom_below_one_zooms_in():
    images = marker(1, 21, 21, row=10, col=14)  # 4 px right of the centre
    zoomed = warp(images, affine_theta((21, 21), zoom=(0.5, 0.5)), fill_mode="constant")
    x, y = centre_of_mass(zoomed)
    assert x.item() == pytest.approx(8.0, abs=1e-4) and y.item() == pytest.approx(0.0, abs=1e-4)


def test_random_resized_crop_magnifies_by_the_crop_side():
    width = 32
    ramp = torch.linspace(0, 1, width).expand(16, 3, 32, width).contiguous()
    config = AugmentConfig(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    out = augment_batch(ramp, config, generator())
    slopes = out[:, 0, :, 1:-1].diff(dim=-1)  # inner columns: no edge clamping
    torch.testing.assert_close(slopes, torch.full_like(slopes, 0.5 / (width - 1)))
    starts = out[:, 0, 0, 0]
    assert starts.min() >= 0 and starts.max() <= 0.5 + 1e-6 and starts.std() > 0.05  # crops sit anywhere


def test_fill_nearest_leaves_no_black_border_on_a_constant_image():
    images = torch.full((16, 3, 30, 30), 0.6)
    config = AugmentConfig(rotation_range=45, width_shift_range=0.3, height_shift_range=0.3, zoom_range=0.4)
    out = augment_batch(images, config, generator())
    torch.testing.assert_close(out, images)


def test_fill_constant_uses_cval_outside_the_image():
    images = torch.full((1, 3, 10, 10), 0.6)
    out = warp(images, affine_theta((10, 10), shift=(4.0, 0.0)), fill_mode="constant", cval=0.25)
    torch.testing.assert_close(out[..., :4], torch.full((1, 3, 10, 4), 0.25))
    torch.testing.assert_close(out[..., 4:], torch.full((1, 3, 10, 6), 0.6))


def test_fill_reflect_mirrors_about_the_edge_like_keras():
    images = random_images(n=2, height=6, width=10)
    out = warp(images, affine_theta((6, 10), shift=(3.0, 0.0)), fill_mode="reflect")
    torch.testing.assert_close(out[..., :3], images[..., [2, 1, 0]])
    torch.testing.assert_close(out[..., 3:], images[..., :7])


# --- colour and noise ---------------------------------------------------------------------


def test_brightness_scales_each_image_by_one_factor_within_range():
    images = random_images(n=64) * 0.5  # room to brighten without clamping
    out = augment_batch(images, AugmentConfig(brightness=0.4), generator())
    factors = out / images
    per_image = factors.flatten(1)
    torch.testing.assert_close(per_image, per_image[:, :1].expand_as(per_image))
    assert per_image.min() >= 0.6 - 1e-5 and per_image.max() <= 1.4 + 1e-5
    assert per_image[:, 0].std() > 0.1


def test_contrast_keeps_the_mean_gray_and_scales_the_spread():
    images = 0.25 + random_images(n=32) * 0.5
    out = augment_batch(images, AugmentConfig(contrast=0.3), generator())
    gray = lambda x: (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2))
    torch.testing.assert_close(gray(out), gray(images))
    spread = (out - gray(out)[:, None, None, None]).flatten(1).std(dim=1) / \
             (images - gray(images)[:, None, None, None]).flatten(1).std(dim=1)
    assert spread.min() >= 0.7 - 1e-4 and spread.max() <= 1.3 + 1e-4 and spread.std() > 0.05


def test_saturation_keeps_the_grayscale_version():
    images = 0.25 + random_images(n=16) * 0.5
    out = augment_batch(images, AugmentConfig(saturation=0.5), generator())
    luma = lambda x: 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(luma(out), luma(images))
    assert not torch.allclose(out, images)


def test_noise_has_zero_mean_and_the_asked_std():
    images = torch.full((8, 3, 64, 64), 0.5)
    out = augment_batch(images, AugmentConfig(noise_std=0.05), generator())
    residual = out - images
    assert abs(residual.mean().item()) < 0.002
    assert residual.std().item() == pytest.approx(0.05, rel=0.03)


def test_erasing_fills_one_rectangle_of_the_asked_size_in_about_the_asked_share():
    images = torch.full((400, 3, 40, 40), 0.5)
    config = AugmentConfig(erase_prob=0.25, erase_scale=(0.1, 0.2))
    out = augment_batch(images, config, generator())
    changed = (out != images).any(dim=1)  # (N, H, W): noise pixels
    erased = changed.flatten(1).any(dim=1)
    assert 0.18 < erased.float().mean().item() < 0.32
    for mask in changed[erased][:20]:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        # A rectangle: every pixel of its bounding box is noise (noise can hit 0.5 only by chance).
        assert mask.sum() >= box - 2
        assert 0.1 * 1600 * 0.8 <= box <= 0.2 * 1600 * 1.25


def test_erasing_leaves_the_other_options_draws_unchanged():
    images = random_images(n=16)
    plain = augment_batch(images, AugmentConfig(**KERAS_RECIPE), generator())
    erased = augment_batch(images, AugmentConfig(**KERAS_RECIPE, erase_prob=1.0, erase_scale=(0.05, 0.05)), generator())
    kept = (erased == plain).all(dim=1)
    assert kept.float().mean() > 0.9 and not kept.all()


def test_full_recipe_on_an_odd_shaped_real_sized_batch_runs():
    images = random_images(n=3, height=150, width=120)
    out = augment_batch(images, AugmentConfig(**EVERYTHING), generator())
    assert out.shape == (3, 3, 150, 120) and math.isfinite(out.sum().item())


# --- preview grid -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_image(kaggle_flat) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(kaggle_flat / "dog.3.jpg") as photo:
        pixels = np.asarray(photo.convert("RGB").resize((64, 64)))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def test_preview_writes_a_reproducible_png_grid(real_image, tmp_path):
    import matplotlib.image

    from convtricks.report.preview import render_preview

    config = AugmentConfig(**KERAS_RECIPE)
    path = render_preview(real_image, config, n=3, out=tmp_path / "sub" / "grid.png", seed=3)
    assert path == tmp_path / "sub" / "grid.png"
    pixels = matplotlib.image.imread(path)
    # The original plus 3 variants: a 2 x 2 grid of 2-inch tiles at 100 dpi, plus a title strip.
    assert pixels.shape[:2] == (440, 400)
    again = render_preview(real_image, config, n=3, out=tmp_path / "again.png", seed=3)
    other = render_preview(real_image, config, n=3, out=tmp_path / "other.png", seed=4)
    assert again.read_bytes() == path.read_bytes()
    assert other.read_bytes() != path.read_bytes()


@pytest.mark.parametrize("n, out, shape", [
    (0, "grid.png", (3, 16, 16)),
    (4, "grid.jpg", (3, 16, 16)),
    (4, "grid.png", (1, 16, 16)),
])
def test_preview_refuses_bad_requests_with_a_user_error(tmp_path, n, out, shape):
    from convtricks.report.preview import render_preview

    with pytest.raises(UserError):
        render_preview(torch.rand(shape), AugmentConfig(horizontal_flip=True), n=n, out=tmp_path / out, seed=0)
    assert not (tmp_path / out).exists()


def test_a_larger_source_is_warped_straight_into_the_requested_size():
    width = 32
    ramp = torch.linspace(0, 1, width).expand(4, 3, 24, width).contiguous()
    # A crop of the whole image is an identity warp: into a half-size grid it must equal the
    # antialiased downscale wherever both see a straight ramp (away from the edges).
    whole = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    out = augment_batch(ramp, whole, generator(), size=(12, 16))
    assert out.shape == (4, 3, 12, 16)
    torch.testing.assert_close(out[..., 1:-1], resize_batch(ramp, (12, 16))[..., 1:-1])
    # Every path returns the requested size.
    for options in (EVERYTHING, {"horizontal_flip": True}, {"brightness": 0.3}, {}):
        config = AugmentConfig(**options)
        small = augment_batch(random_images(), config, generator(5), size=(8, 8))
        assert small.shape[-2:] == (8, 8) and small.min() >= 0 and small.max() <= 1
    flipped = augment_batch(ramp, AugmentConfig(horizontal_flip=True), generator(5), size=(12, 16))
    assert torch.equal(flipped, torch.where(flipped[:, :1, :1, :1] > 0.5, resize_batch(ramp, (12, 16)).flip(3),
                                            resize_batch(ramp, (12, 16))))
