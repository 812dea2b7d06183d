"""Trick 2, data augmentation: Keras' ImageDataGenerator recipe as tensor ops on whole batches.

Every geometric change of a batch (random crop, rotation, shift, shear, zoom, flips) is
folded into one affine matrix per image, and the whole batch is resampled by a single
`grid_sample` call. Colour jitter and noise are a few broadcast ops. Nothing here touches
PIL or loops over images, so augmenting costs a fraction of a training step.

Geometry conventions (used by `affine_theta`): pixel units, origin at the image centre,
x to the right, y down. A matrix maps an output pixel to the input location it samples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from numbers import Real
from typing import Mapping

import torch
import torch.nn.functional as F

from convtricks.errors import UserError

# Keras' fill_mode names -> grid_sample padding modes. Keras "reflect" is scipy's
# half-sample symmetric reflection (d c b a | a b c d), which is what grid_sample's
# "reflection" does with align_corners=False.
FILL_MODES = {"nearest": "border", "constant": "zeros", "reflect": "reflection"}

# ITU-R 601 luma weights, as torchvision uses for grayscale, contrast and saturation.
_LUMA = (0.299, 0.587, 0.114)

# Columns of the per-image uniform draws. All are drawn whatever the config, so one
# generator state gives the same rotation whether or not, say, zoom is switched on.
_ANGLE, _SHIFT_X, _SHIFT_Y, _SHEAR, _ZOOM_X, _ZOOM_Y, _FLIP_H, _FLIP_V = range(8)
_CROP_AREA, _CROP_RATIO, _CROP_X, _CROP_Y, _BRIGHTNESS, _CONTRAST, _SATURATION = range(8, 15)
_DRAWS = 15


@dataclass
class AugmentConfig:
    """What to randomize, with Keras' names and meanings; everything is off by default.

    rotation_range: degrees; each image turns by a uniform angle in [-r, r].
    width_shift_range, height_shift_range: below 1 a fraction of the width/height, from 1
        up pixels (as Keras); each image shifts by a uniform amount in [-s, s].
    shear_range: shear angle in degrees (as Keras 2), uniform in [-s, s].
    zoom_range: z means a zoom factor in [1-z, 1+z], or give the pair [low, high]; width
        and height draw their factors independently. As in Keras, a factor below 1
        zooms in (the input is sampled at factor x the output coordinate).
    horizontal_flip, vertical_flip: flip half of the images, at random.
    fill_mode: how points outside the input are filled: "nearest" (repeat the edge),
        "constant" (the value cval, in [0, 1]) or "reflect".
    crop_scale, crop_ratio: random resized crop: keep a random region covering a uniform
        fraction of the area in crop_scale, with aspect ratio (width/height) log-uniform in
        crop_ratio, and stretch it back to the full size. Off while crop_scale is None.
    brightness, contrast, saturation: colour jitter as torchvision's ColorJitter: the
        factor is uniform in [max(0, 1-b), 1+b]; brightness scales the pixels, contrast
        blends with the image's mean gray level, saturation with its grayscale version.
    noise_std: standard deviation of gaussian noise added to every pixel (images in [0, 1]).
    erase_prob, erase_scale, erase_ratio: random erasing (Zhong et al. 2017): with probability
        erase_prob an image gets one rectangle, covering a uniform fraction of its area in
        erase_scale with aspect ratio log-uniform in erase_ratio, filled with uniform noise.
    """

    rotation_range: float = 0.0
    width_shift_range: float = 0.0
    height_shift_range: float = 0.0
    shear_range: float = 0.0
    zoom_range: float | tuple[float, float] = 0.0
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: str = "nearest"
    cval: float = 0.0
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    noise_std: float = 0.0
    erase_prob: float = 0.0
    erase_scale: tuple[float, float] = (0.02, 0.33)
    erase_ratio: tuple[float, float] = (0.3, 3.3)

    def __post_init__(self) -> None:
        for name in ("rotation_range", "width_shift_range", "height_shift_range", "shear_range",
                     "cval", "brightness", "contrast", "saturation", "noise_std"):
            _check_non_negative(name, getattr(self, name))
        for name in ("horizontal_flip", "vertical_flip"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"Augmentation '{name}' must be true or false, got {getattr(self, name)!r}.")
        if self.shear_range >= 90:
            raise UserError(f"Augmentation 'shear_range' is an angle in degrees below 90, got {self.shear_range}.")
        if self.cval > 1:
            raise UserError(f"Augmentation 'cval' is a pixel value in [0, 1], got {self.cval}.")
        if self.fill_mode not in FILL_MODES:
            raise UserError(f"Augmentation 'fill_mode' must be one of {', '.join(FILL_MODES)}; "
                            f"got {self.fill_mode!r}.")
        if isinstance(self.zoom_range, (list, tuple)):
            self.zoom_range = _check_range("zoom_range", self.zoom_range, low=0.0, low_open=True)
        else:
            _check_non_negative("zoom_range", self.zoom_range)
            if self.zoom_range >= 1:
                raise UserError("Augmentation 'zoom_range' as one number z means [1-z, 1+z], so z must "
                                f"be below 1; got {self.zoom_range} (give a pair [low, high] instead).")
        if self.crop_scale is not None:
            self.crop_scale = _check_range("crop_scale", self.crop_scale, low=0.0, low_open=True, high=1.0)
        self.crop_ratio = _check_range("crop_ratio", self.crop_ratio, low=0.0, low_open=True)
        _check_non_negative("erase_prob", self.erase_prob)
        if self.erase_prob > 1:
            raise UserError(f"Augmentation 'erase_prob' is a probability in [0, 1], got {self.erase_prob}.")
        self.erase_scale = _check_range("erase_scale", self.erase_scale, low=0.0, low_open=True, high=1.0)
        self.erase_ratio = _check_range("erase_ratio", self.erase_ratio, low=0.0, low_open=True)

    @classmethod
    def from_dict(cls, values: Mapping | None) -> "AugmentConfig":
        """Build from a recipe's `augment:` mapping; unknown keys and bad values are user errors."""
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise UserError(f"The 'augment' section must be a mapping of option: value, got {values!r}.")
        known = [field.name for field in fields(cls)]
        unknown = [key for key in values if key not in known]
        if unknown:
            raise UserError(f"Unknown augmentation option '{unknown[0]}'; known options: {', '.join(known)}.")
        return cls(**values)

    def to_dict(self) -> dict:
        """Plain types only (lists, not tuples), so the resolved recipe dumps as simple YAML."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @property
    def zoom_bounds(self) -> tuple[float, float]:
        if isinstance(self.zoom_range, tuple):
            return self.zoom_range
        return (1.0 - self.zoom_range, 1.0 + self.zoom_range)

    @property
    def warps(self) -> bool:
        """True when the batch must be resampled (anything geometric beyond plain flips)."""
        return bool(self.rotation_range or self.width_shift_range or self.height_shift_range
                    or self.shear_range or self.zoom_bounds != (1.0, 1.0) or self.crop_scale is not None)

    @property
    def enabled(self) -> bool:
        return bool(self.warps or self.horizontal_flip or self.vertical_flip or self.brightness
                    or self.contrast or self.saturation or self.noise_std or self.erase_prob)


def _check_non_negative(name: str, value) -> None:
    # bool is a Real too, and `rotation_range: true` is a mistake, not 1 degree.
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise UserError(f"Augmentation '{name}' must be a number >= 0, got {value!r}.")


def _check_range(name: str, value, low: float, low_open: bool = False,
                 high: float | None = None) -> tuple[float, float]:
    pair_ok = (isinstance(value, (list, tuple)) and len(value) == 2
               and all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if pair_ok:
        first, last = float(value[0]), float(value[1])
        pair_ok = (first > low if low_open else first >= low) and first <= last
        pair_ok = pair_ok and (high is None or last <= high)
    if not pair_ok:
        bounds = f"{'above' if low_open else 'at least'} {low}" + ("" if high is None else f" and at most {high}")
        raise UserError(f"Augmentation '{name}' must be a pair [low, high] with low <= high, both {bounds}; "
                        f"got {value!r}.")
    return (first, last)


# ---------------------------------------------------------------------------------------
# Geometry


def affine_theta(size: tuple[int, int], *, angle=0.0, shift=(0.0, 0.0), shear=0.0, zoom=(1.0, 1.0),
                 flip_h=False, flip_v=False, crop_center=(0.0, 0.0), crop_size=(1.0, 1.0),
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, 2, 3) matrices `grid_sample` needs for explicit per-image transforms.

    Each argument is a Python number or a tensor of shape (N,) (pairs: one of each).
    angle: degrees, counter-clockwise as seen on screen. shift: (x, y) pixels, the content
    moves right/down. shear: degrees, Keras' shear. zoom: (x, y) Keras factors (< 1 zooms
    in). flip_h / flip_v: mirror the result. crop_center (pixels from the centre) and
    crop_size (fractions of width and height): the input region the rest is applied to.
    Keras composes rotation, then shift, shear and zoom (each applied on the right) and
    flips the result; the crop selects the region first.
    """
    height, width = size
    values = [angle, *shift, shear, *zoom, flip_h, flip_v, *crop_center, *crop_size]
    tensors = [v for v in values if torch.is_tensor(v)]
    n = max((v.numel() for v in tensors), default=1)
    device = tensors[0].device if tensors else None
    (angle, shift_x, shift_y, shear, zoom_x, zoom_y, flip_h, flip_v,
     crop_x, crop_y, crop_w, crop_h) = (torch.as_tensor(v, dtype=dtype, device=device).expand(n) for v in values)

    def matrices(*rows):
        # Build (N, 3, 3) homogeneous matrices from row-major entries ((N,) tensors).
        return torch.stack(rows, dim=1).view(n, 3, 3)

    zero, one = torch.zeros(n, dtype=dtype, device=device), torch.ones(n, dtype=dtype, device=device)
    radians = torch.deg2rad(angle)
    cos, sin = torch.cos(radians), torch.sin(radians)
    # The output at p shows the input at R(-angle) p, so the content turns by +angle.
    rotate = matrices(cos, -sin, zero, sin, cos, zero, zero, zero, one)
    translate = matrices(one, zero, -shift_x, zero, one, -shift_y, zero, zero, one)
    shear_rad = torch.deg2rad(shear)
    shear_matrix = matrices(torch.cos(shear_rad), zero, zero, -torch.sin(shear_rad), one, zero, zero, zero, one)
    scale = matrices(zoom_x, zero, zero, zero, zoom_y, zero, zero, zero, one)
    flip = matrices(1 - 2 * flip_h, zero, zero, zero, 1 - 2 * flip_v, zero, zero, zero, one)
    crop = matrices(crop_w, zero, crop_x, zero, crop_h, crop_y, zero, zero, one)
    pixels = crop @ rotate @ translate @ shear_matrix @ scale @ flip
    # grid_sample wants normalized coordinates: x_norm = 2 x / width (align_corners=False).
    to_norm = torch.diag(torch.tensor([2.0 / width, 2.0 / height, 1.0], dtype=dtype, device=device))
    to_pixels = torch.diag(torch.tensor([width / 2.0, height / 2.0, 1.0], dtype=dtype, device=device))
    return (to_norm @ pixels @ to_pixels)[:, :2, :]


def affine_grid(theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Same grid as F.affine_grid(theta, ..., align_corners=False), built from separable terms.

    F.affine_grid multiplies every pixel by theta in a batched matmul of inner size 3, which
    on CPU costs more than grid_sample itself; an affine map is a column term plus a row term,
    so two small outer sums do the same an order of magnitude faster.
    """
    height, width = size
    xs = (torch.arange(width, dtype=theta.dtype, device=theta.device) * 2 + 1) / width - 1
    ys = (torch.arange(height, dtype=theta.dtype, device=theta.device) * 2 + 1) / height - 1
    column_terms = (theta[:, :, 0, None] * xs).transpose(1, 2)                      # (N, W, 2)
    row_terms = (theta[:, :, 1, None] * ys + theta[:, :, 2, None]).transpose(1, 2)  # (N, H, 2)
    return row_terms[:, :, None, :] + column_terms[:, None, :, :]                   # (N, H, W, 2)


def warp(images: torch.Tensor, theta: torch.Tensor, fill_mode: str = "nearest", cval: float = 0.0,
         size=None) -> torch.Tensor:
    """Resample a batch (N, C, H, W) through per-image affine matrices theta (N or 1, 2, 3), bilinearly,
    into a grid of `size` (height, width; default the input's)."""
    theta = theta.to(device=images.device, dtype=images.dtype).expand(images.shape[0], 2, 3)
    grid = affine_grid(theta, tuple(size) if size is not None else images.shape[-2:])
    sample = lambda source: F.grid_sample(source, grid, mode="bilinear", padding_mode=FILL_MODES[fill_mode],
                                          align_corners=False)
    if fill_mode == "constant" and cval:
        # grid_sample pads with zeros only; sampling (image - cval) and adding cval back pads
        # with cval, and blends into it at the border exactly as Keras' linear fill does.
        return sample(images - cval) + cval
    return sample(images)


def _random_box(scale: tuple[float, float], ratio_range: tuple[float, float], area_draws: torch.Tensor,
                ratio_draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Width and height, as fractions of the image's, of boxes covering a uniform share of the
    area in `scale` with aspect ratio (width/height) log-uniform in `ratio_range`."""
    area = scale[0] + (scale[1] - scale[0]) * area_draws
    log_low, log_high = math.log(ratio_range[0]), math.log(ratio_range[1])
    ratio = torch.exp(log_low + (log_high - log_low) * ratio_draws)
    # A box that does not fit is clamped to the full side (torchvision retries instead;
    # clamping keeps the batch vectorized and only shrinks the rare extreme boxes).
    return torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)


def _random_theta(config: AugmentConfig, draws: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    height, width = size
    symmetric = draws * 2 - 1  # uniform in [-1, 1]

    def shift_pixels(shift_range: float, extent: int) -> float:
        return shift_range if shift_range >= 1 else shift_range * extent

    zoom_low, zoom_high = config.zoom_bounds
    zoom_x = zoom_low + (zoom_high - zoom_low) * draws[:, _ZOOM_X]
    zoom_y = zoom_low + (zoom_high - zoom_low) * draws[:, _ZOOM_Y]
    crop_center, crop_size = (0.0, 0.0), (1.0, 1.0)
    if config.crop_scale is not None:
        crop_w, crop_h = _random_box(config.crop_scale, config.crop_ratio, draws[:, _CROP_AREA], draws[:, _CROP_RATIO])
        crop_size = (crop_w, crop_h)
        crop_center = (symmetric[:, _CROP_X] * (1 - crop_w) * width / 2,
                       symmetric[:, _CROP_Y] * (1 - crop_h) * height / 2)
    return affine_theta(
        size,
        angle=config.rotation_range * symmetric[:, _ANGLE],
        shift=(shift_pixels(config.width_shift_range, width) * symmetric[:, _SHIFT_X],
               shift_pixels(config.height_shift_range, height) * symmetric[:, _SHIFT_Y]),
        shear=config.shear_range * symmetric[:, _SHEAR],
        zoom=(zoom_x, zoom_y),
        flip_h=(draws[:, _FLIP_H] < 0.5) & config.horizontal_flip,
        flip_v=(draws[:, _FLIP_V] < 0.5) & config.vertical_flip,
        crop_center=crop_center,
        crop_size=crop_size,
        dtype=draws.dtype,
    )


# ---------------------------------------------------------------------------------------
# Colour and noise


def _factors(strength: float, draws: torch.Tensor) -> torch.Tensor:
    low = max(0.0, 1.0 - strength)
    return (low + (1.0 + strength - low) * draws)[:, None, None, None]


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    red, green, blue = images.unbind(dim=1)
    return (_LUMA[0] * red + _LUMA[1] * green + _LUMA[2] * blue).unsqueeze(1)


def _jitter_colour(images: torch.Tensor, config: AugmentConfig, draws: torch.Tensor) -> torch.Tensor:
    # Clamp after each step, as torchvision does, so an over-bright image does not skew the
    # mean that contrast blends with.
    if config.brightness:
        images = (images * _factors(config.brightness, draws[:, _BRIGHTNESS])).clamp_(0, 1)
    if config.contrast:
        mean_gray = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
        images = torch.lerp(mean_gray, images, _factors(config.contrast, draws[:, _CONTRAST])).clamp_(0, 1)
    if config.saturation:
        images = torch.lerp(_grayscale(images), images, _factors(config.saturation, draws[:, _SATURATION])).clamp_(0, 1)
    return images


def _erase(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    # Its own draws, taken only when erasing is on, so switching it on leaves every other
    # option's random stream (and so earlier recipes' results) exactly as it was.
    n, _, height, width = images.shape
    draws = torch.rand(n, 5, generator=generator, device=generator.device, dtype=images.dtype).to(images.device)
    chosen, area_draw, ratio_draw, x_draw, y_draw = draws.unbind(dim=1)
    box_w, box_h = _random_box(config.erase_scale, config.erase_ratio, area_draw, ratio_draw)
    left, top = x_draw * (1 - box_w), y_draw * (1 - box_h)
    xs = (torch.arange(width, device=images.device, dtype=images.dtype) + 0.5) / width
    ys = (torch.arange(height, device=images.device, dtype=images.dtype) + 0.5) / height
    inside_x = (xs >= left[:, None]) & (xs < (left + box_w)[:, None])  # (N, W)
    inside_y = (ys >= top[:, None]) & (ys < (top + box_h)[:, None])    # (N, H)
    mask = inside_y[:, :, None] & inside_x[:, None, :] & (chosen < config.erase_prob)[:, None, None]
    noise = torch.rand(images.shape, generator=generator, device=generator.device, dtype=images.dtype)
    return torch.where(mask[:, None], noise.to(images.device), images)


# ---------------------------------------------------------------------------------------


def resize_batch(inputs: torch.Tensor, size) -> torch.Tensor:
    """Downscale a batch (antialiased, as a camera would see the smaller image)."""
    if list(inputs.shape[-2:]) == list(size):
        return inputs
    channels_last = inputs.is_contiguous(memory_format=torch.channels_last)
    resized = F.interpolate(inputs, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return resized.contiguous(memory_format=torch.channels_last) if channels_last else resized


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator,
                  size=None) -> torch.Tensor:
    """A randomly augmented copy of a training batch (N, 3, H, W), float in [0, 1].

    `size` (height, width; default the input's) is the output's: images stored larger than
    they train are warped straight into the smaller grid, so the one resampling costs what
    it would at the training size and sees the sharper source. Without a warp they are
    downscaled first. Same dtype and memory format (channels_last stays channels_last),
    values clamped to [0, 1]. The same generator state gives the same output. With nothing
    enabled the input itself is returned (resized if asked). Validation and test batches
    are never passed here.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"augment_batch expects a float (N, C, H, W) batch, got {images.dtype} {tuple(images.shape)}")
    size = tuple(size) if size is not None else tuple(images.shape[-2:])
    if not config.enabled or images.shape[0] == 0:
        return resize_batch(images, size)
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    # Parameters come from the generator's device, then move: a CPU generator can drive a GPU batch.
    draw_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    draws = torch.rand(images.shape[0], _DRAWS, generator=generator, device=generator.device, dtype=draw_dtype)

    if config.warps:
        # Shifts in pixels are the source's; the matrix works in normalized coordinates, so the
        # same one samples into a grid of any size.
        theta = _random_theta(config, draws, tuple(images.shape[-2:]))
        out = warp(images, theta, config.fill_mode, config.cval, size)
    elif config.horizontal_flip or config.vertical_flip:
        # Flips alone need no resampling: an exact, cheaper mirror.
        out = resize_batch(images, size)
        for enabled, column, dim in ((config.horizontal_flip, _FLIP_H, 3), (config.vertical_flip, _FLIP_V, 2)):
            if enabled:
                chosen = (draws[:, column] < 0.5).to(images.device)[:, None, None, None]
                out = torch.where(chosen, out.flip(dim), out)
    else:
        out = resize_batch(images, size)
    if config.brightness or config.contrast or config.saturation:
        out = _jitter_colour(out, config, draws.to(images.device))
    if config.noise_std:
        noise = torch.randn(out.shape, generator=generator, device=generator.device, dtype=images.dtype)
        out = out + config.noise_std * noise.to(images.device)
    if config.erase_prob:
        out = _erase(out, config, generator)
    # Every branch above made a new tensor, so clamping in place never touches the caller's batch.
    out = out.clamp_(0, 1)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out
