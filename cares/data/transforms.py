"""Resizing and seeded data augmentation for (image, mask) slice pairs.

Tensors here are (1, H, W): image float32 in [0, 1], mask float32 in {0, 1}.

Resizing rule: images bilinear (with antialiasing, so that shrinking a 500-pixel slice to 256 does
not alias), masks nearest ("nearest-exact", which keeps the mask centred) and binary.

Augmentation: geometric steps (flips, 90-degree rotations, a small affine warp) are applied to the
image and the mask with the same parameters and the same sampling grid; intensity jitter touches
the image only. All randomness comes from an explicit torch.Generator, normally
`item_generator(seed, epoch, index)`, so a given item of a given epoch is augmented the same way
in every run, in any DataLoader worker, whatever order items are read in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cares.runtime import derive_seed  # noqa: F401  (the one seed derivation; re-exported for cares.data)
from cares.runtime import host_values_to


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The CPU torch.Generator that augments item `index` in epoch `epoch` of a run seeded `seed`."""
    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, epoch, index))
    return generator


# ----------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------

def _check_chw(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 3 or tensor.shape[0] != 1:
        raise ValueError(f"{name} must have shape (1, H, W), got {tuple(tensor.shape)}")


def _check_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """(1, H, W) float image -> (1, size, size), bilinear with antialiasing, clipped to [0, 1]."""
    _check_chw(image, "image")
    _check_size(size)
    if tuple(image.shape[-2:]) == (size, size):
        return image
    resized = F.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=True)[0]
    return resized.clamp_(0.0, 1.0)


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(1, H, W) binary mask (bool or float {0, 1}) -> float32 (1, size, size) in {0, 1}, nearest."""
    _check_chw(mask, "mask")
    _check_size(size)
    mask = mask.float()
    if tuple(mask.shape[-2:]) == (size, size):
        return mask
    return F.interpolate(mask[None], size=(size, size), mode="nearest-exact")[0]


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AugmentConfig:
    """What `augment_pair` may do, and how strongly. Probabilities are per item.

    flip_prob:          chance of a left-right flip, and separately of an up-down flip
    rot90:              rotate by a uniformly drawn multiple of 90 degrees
    affine_prob:        chance of the small affine warp below
    max_rotation_deg:   affine rotation drawn uniformly in +-max_rotation_deg
    scale_range:        affine zoom factor drawn uniformly in this range
    max_translation:    affine shift drawn uniformly in +-max_translation of the image side
    intensity_prob:     chance of the intensity jitter below (image only)
    brightness:         add an offset drawn in +-brightness
    contrast:           scale about the image mean by a factor drawn in 1 +- contrast
    gamma_range:        raise to a power drawn log-uniformly in this range
    """
    flip_prob: float = 0.5
    rot90: bool = True
    affine_prob: float = 0.5
    max_rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_translation: float = 0.05
    intensity_prob: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    gamma_range: tuple[float, float] = (0.8, 1.25)

    def __post_init__(self):
        for name in ("flip_prob", "affine_prob", "intensity_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for name in ("max_rotation_deg", "max_translation", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("scale_range", "gamma_range"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(low, high)}")


DEFAULT_AUGMENT = AugmentConfig()


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _chance(generator: torch.Generator, probability: float) -> bool:
    return torch.rand((), generator=generator).item() < probability


@dataclass(frozen=True)
class AugmentDraw:
    """The random choices of one item's augmentation (drawn by `draw_augment`)."""
    flip_left_right: bool
    flip_up_down: bool
    quarter_turns: int          # 0 when the config has rot90 off
    affine: tuple[float, float, float, float] | None   # (angle_rad, scale, shift_x, shift_y), or None
    intensity: tuple[float, float, float] | None       # (gamma, contrast, brightness), or None


def draw_augment(generator: torch.Generator, config: AugmentConfig = DEFAULT_AUGMENT) -> AugmentDraw:
    """Draw one item's augmentation. Every number is drawn, always in the same order and whether or
    not its step ends up applied, so the draw depends only on the generator's seed and `config`."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    flip_left_right = _chance(generator, config.flip_prob)
    flip_up_down = _chance(generator, config.flip_prob)
    quarter_turns = int(torch.randint(0, 4, (), generator=generator).item())
    do_affine = _chance(generator, config.affine_prob)
    angle_rad = math.radians(_uniform(generator, -config.max_rotation_deg, config.max_rotation_deg))
    scale = _uniform(generator, *config.scale_range)
    shift_x = _uniform(generator, -config.max_translation, config.max_translation)
    shift_y = _uniform(generator, -config.max_translation, config.max_translation)
    do_intensity = _chance(generator, config.intensity_prob)
    gamma = math.exp(_uniform(generator, *(math.log(g) for g in config.gamma_range)))
    contrast = _uniform(generator, 1.0 - config.contrast, 1.0 + config.contrast)
    brightness = _uniform(generator, -config.brightness, config.brightness)
    return AugmentDraw(flip_left_right=flip_left_right, flip_up_down=flip_up_down,
                       quarter_turns=quarter_turns if config.rot90 else 0,
                       affine=(angle_rad, scale, shift_x, shift_y) if do_affine else None,
                       intensity=(gamma, contrast, brightness) if do_intensity else None)


def augment_pair(image: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator,
                 config: AugmentConfig = DEFAULT_AUGMENT) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Randomly flip, rotate, warp and intensity-jitter a square (1, S, S) image and its mask.

    mask may be None (unlabeled data). The random choices come from `draw_augment(generator, config)`,
    so results depend only on the generator's seed and `config`. Returns new tensors: image float32
    in [0, 1], mask float32 in {0, 1}. `augment_batch` applies the same draws to a whole batch at once
    (on any device) and gives the same result.
    """
    _check_chw(image, "image")
    if image.shape[-1] != image.shape[-2]:
        raise ValueError(f"augment_pair expects a square image, got {tuple(image.shape)}; resize first")
    if mask is not None:
        _check_chw(mask, "mask")
        if mask.shape != image.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from image shape {tuple(image.shape)}")
        mask = mask.float()
    return apply_augment(image.float(), mask, draw_augment(generator, config))


def apply_augment(image: torch.Tensor, mask: torch.Tensor | None,
                  draw: AugmentDraw) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply one item's draw to a square (1, S, S) image and mask (or None): `augment_batch` of one."""
    images, masks = augment_batch(image[None], None if mask is None else mask[None], [draw])
    return images[0], None if masks is None else masks[0]


def augment_batch(images: torch.Tensor, masks: torch.Tensor | None,
                  draws: list[AugmentDraw]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply item i's `draws[i]` to images[i] and masks[i] of a (B, 1, S, S) batch, on the batch's device.

    The draws are host-side numbers, so choosing which items a step touches needs no device sync, and
    they reach the device as non-blocking copies (cares.runtime.host_values_to);
    each step runs once for the items that take it (one batched grid_sample for every warped item).
    Returns new float32 tensors: images in [0, 1], masks in {0, 1} (None when masks is None).
    """
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must have shape (B, 1, S, S), got {tuple(images.shape)}")
    if masks is not None and masks.shape != images.shape:
        raise ValueError(f"masks shape {tuple(masks.shape)} differs from images shape {tuple(images.shape)}")
    if len(draws) != len(images):
        raise ValueError(f"got {len(draws)} draws for a batch of {len(images)} images")
    images = images.float().clone()
    masks = None if masks is None else masks.float().clone()

    def apply(selected: list[int], step) -> None:
        if not selected:
            return
        index = host_values_to(selected, images.device, torch.int64)
        images[index] = step(images[index])
        if masks is not None:
            masks[index] = step(masks[index])

    apply([i for i, d in enumerate(draws) if d.flip_left_right], lambda t: torch.flip(t, dims=(-1,)))
    apply([i for i, d in enumerate(draws) if d.flip_up_down], lambda t: torch.flip(t, dims=(-2,)))
    for turns in (1, 2, 3):
        apply([i for i, d in enumerate(draws) if d.quarter_turns == turns],
              lambda t, turns=turns: torch.rot90(t, k=turns, dims=(-2, -1)))

    warped = [i for i, d in enumerate(draws) if d.affine is not None]
    if warped:
        index = host_values_to(warped, images.device, torch.int64)
        theta = host_values_to(torch.stack([_affine_theta(*draws[i].affine) for i in warped]), images.device)
        grid = F.affine_grid(theta, size=(len(warped), 1, *images.shape[-2:]), align_corners=False)
        images[index] = F.grid_sample(images[index], grid, mode="bilinear", padding_mode="reflection",
                                      align_corners=False).clamp_(0.0, 1.0)
        if masks is not None:
            masks[index] = F.grid_sample(masks[index], grid, mode="nearest", padding_mode="reflection",
                                         align_corners=False)

    jittered = [i for i, d in enumerate(draws) if d.intensity is not None]
    if jittered:
        index = host_values_to(jittered, images.device, torch.int64)
        gamma, contrast, brightness = host_values_to([draws[i].intensity for i in jittered], images.device,
                                                     torch.float32).T.reshape(3, -1, 1, 1, 1)
        selected = images[index].clamp(0.0, 1.0) ** gamma
        mean = selected.mean(dim=(1, 2, 3), keepdim=True)
        images[index] = ((selected - mean) * contrast + mean + brightness).clamp_(0.0, 1.0)
    return images.contiguous(), None if masks is None else masks.contiguous()


def _affine_theta(angle_rad: float, scale: float, shift_x: float, shift_y: float) -> torch.Tensor:
    """The (2, 3) affine_grid matrix that rotates by angle_rad, zooms by scale and shifts by
    (shift_x, shift_y) fractions of the side.

    affine_grid maps output coordinates to input coordinates in [-1, 1] units; a zoom-in by `scale`
    samples the input at coordinates divided by scale; a shift of f of the side is 2f units. One
    sampling grid serves image and mask (bilinear for the image, nearest for the mask), so the two
    stay aligned; reflection padding fills the corners the warp uncovers with nearby content.
    """
    cos, sin = math.cos(angle_rad), math.sin(angle_rad)
    return torch.tensor([[cos / scale, -sin / scale, -2.0 * shift_x],
                         [sin / scale, cos / scale, -2.0 * shift_y]], dtype=torch.float32)
