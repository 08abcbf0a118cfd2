"""Synthetic CT-like slices with ground-glass lesions: a dataset that needs no download.

Each slice is drawn on a [-1, 1] x [-1, 1] canvas (x to the right, y downwards) and rendered at
the requested size, roughly like an axial chest CT in a lung window:

    outside the body    ~0.02   (air)
    body                ~0.62   (soft tissue), brighter spine at the back
    lungs               ~0.10   (two dark ellipses), faint texture
    vessels             ~0.45-0.8 peaks: small bright blobs and thin branches inside the lungs
    lesions             ~0.2-0.5: soft-edged, irregular ground-glass patches inside the lungs,
                        some faint; 0-3 per slice (about a fifth of slices have none)
    noise               Gaussian, sigma 0.015-0.035

The mask marks lesion pixels (inside a lesion's soft outline and inside a lung). Vessel tails and
lesion cores share intensities, so intensity alone does not segment lesions; shape and texture do.
Item i depends only on (seed, stream, i): it is the same whatever order items are read in.
"""
from __future__ import annotations

import numpy as np

from .base import SliceDataset
from .transforms import AugmentConfig, derive_seed

# Probabilities of 0, 1, 2, 3 lesions on a slice.
_LESION_COUNT_PROBABILITIES = (0.2, 0.35, 0.3, 0.15)

# First seed key of the rendering streams (any constant; keeps them apart from augmentation seeds).
_RENDER_TAG = 0x5C7


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise that varies over about size/cells pixels:
    a (cells+1)^2 random lattice interpolated bilinearly to (size, size)."""
    lattice = rng.standard_normal((cells + 1, cells + 1))
    position = np.linspace(0.0, cells, size)
    low = np.minimum(position.astype(int), cells - 1)
    frac = position - low
    rows = lattice[low] * (1 - frac)[:, None] + lattice[low + 1] * frac[:, None]         # (size, cells+1)
    return rows[:, low] * (1 - frac)[None, :] + rows[:, low + 1] * frac[None, :]         # (size, size)


def _ellipse_field(x, y, cx, cy, ax, ay, angle=0.0) -> np.ndarray:
    """Normalised radius of each pixel in a rotated ellipse: < 1 inside, 1 on the edge."""
    cos, sin = np.cos(angle), np.sin(angle)
    u = (x - cx) * cos + (y - cy) * sin
    v = -(x - cx) * sin + (y - cy) * cos
    return np.sqrt((u / ax) ** 2 + (v / ay) ** 2)


def _soft_inside(radius_field: np.ndarray, edge: float) -> np.ndarray:
    """1 well inside (field < 1), 0 well outside, a sigmoid ramp of width ~edge across the edge."""
    return 1.0 / (1.0 + np.exp(np.clip((radius_field - 1.0) / edge, -50, 50)))


def _segment_distance(x, y, start, end) -> np.ndarray:
    """Distance of each pixel from the line segment start-end."""
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))


def _point_in_ellipse(rng, cx, cy, ax, ay, angle, fraction: float) -> tuple[float, float]:
    """A uniformly drawn point inside the ellipse shrunk by `fraction`."""
    r, phi = fraction * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    u, v = r * ax * np.cos(phi), r * ay * np.sin(phi)
    cos, sin = np.cos(angle), np.sin(angle)
    return cx + u * cos - v * sin, cy + u * sin + v * cos


def render_synthetic_slice(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one slice. Returns (image float32 (size, size) in [0, 1], mask bool (size, size))."""
    coords = np.linspace(-1.0, 1.0, size, dtype=np.float64)
    x, y = np.meshgrid(coords, coords)            # x varies along columns, y along rows
    pixel = 2.0 / size                            # one pixel in canvas units
    edge = max(pixel, 0.012)                      # edge softness, about a pixel at 128-256 px

    # Body and spine.
    body = _soft_inside(_ellipse_field(x, y, rng.uniform(-0.03, 0.03), rng.uniform(0.0, 0.08),
                                       rng.uniform(0.82, 0.94), rng.uniform(0.62, 0.74)), edge / 0.8)
    tissue = rng.uniform(0.56, 0.68) + 0.03 * _smooth_noise(rng, size, 6)
    image = 0.02 + (tissue - 0.02) * body
    spine = _soft_inside(_ellipse_field(x, y, 0.0, rng.uniform(0.5, 0.58), 0.11, 0.09), edge / 0.1)
    image += (rng.uniform(0.85, 0.95) - image) * spine

    # Lungs: two dark ellipses, mirror images up to random differences.
    lung_value = rng.uniform(0.07, 0.13)
    lungs, lung_shapes = np.zeros_like(x), []
    for side in (-1.0, 1.0):
        shape = (side * rng.uniform(0.34, 0.42), rng.uniform(-0.08, 0.02),   # centre
                 rng.uniform(0.24, 0.31), rng.uniform(0.38, 0.48),              # semi-axes
                 side * rng.uniform(-0.05, 0.2))                               # tilt
        lung_shapes.append(shape)
        lungs = np.maximum(lungs, _soft_inside(_ellipse_field(x, y, *shape), edge / 0.3))
    lung_texture = lung_value + 0.015 * _smooth_noise(rng, size, 24)
    image += (lung_texture - image) * lungs
    lung_mask = lungs > 0.5

    # Vessels: bright round blobs (vessels cut across) and thin branches (vessels in plane).
    vessels = np.zeros_like(x)
    for cx, cy, ax, ay, angle in lung_shapes:
        for _ in range(rng.integers(6, 14)):
            px, py = _point_in_ellipse(rng, cx, cy, ax, ay, angle, 0.9)
            radius = rng.uniform(0.008, 0.025) + pixel / 2
            peak = rng.uniform(0.45, 0.8)
            vessels = np.maximum(vessels, peak * np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * radius ** 2)))
        for _ in range(rng.integers(2, 5)):
            start = _point_in_ellipse(rng, cx, cy, ax, ay, angle, 0.4)
            heading, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.35)
            end = (start[0] + length * np.cos(heading), start[1] + length * np.sin(heading))
            width = rng.uniform(0.005, 0.012) + pixel / 3
            peak = rng.uniform(0.45, 0.75)
            distance = _segment_distance(x, y, start, end)
            vessels = np.maximum(vessels, peak * np.exp(-distance ** 2 / (2 * width ** 2)))
    vessels *= lungs                              # no vessels outside the lungs
    image = np.maximum(image, vessels)

    # Ground-glass lesions: irregular blobs with soft edges and mottled texture, inside the lungs.
    # `extent` (0..1 across the soft edge) defines the mask; `opacity` (extent times a per-lesion
    # strength, so some lesions are faint) defines how much of the lesion's gray replaces the lung.
    extent, opacity = np.zeros_like(x), np.zeros_like(x)
    lesion_count = rng.choice(len(_LESION_COUNT_PROBABILITIES), p=_LESION_COUNT_PROBABILITIES)
    for _ in range(lesion_count):
        cx, cy, ax, ay, angle = lung_shapes[rng.integers(2)]
        px, py = _point_in_ellipse(rng, cx, cy, ax, ay, angle, 0.75)
        base_radius = rng.uniform(0.05, 0.2)
        theta = np.arctan2(y - py, x - px)
        outline = np.ones_like(x)                 # radius multiplier by direction: a lumpy outline
        for harmonic in (2, 3, 5):
            outline += rng.uniform(0.0, 0.6 / harmonic) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
        field = np.hypot(x - px, y - py) / (base_radius * np.maximum(outline, 0.4))
        this_extent = _soft_inside(field, 0.12)
        extent = np.maximum(extent, this_extent)
        opacity = np.maximum(opacity, this_extent * rng.uniform(0.55, 1.0))
    if lesion_count:
        lesion_value = rng.uniform(0.3, 0.5) + 0.06 * _smooth_noise(rng, size, 20)
        image += (lesion_value - image) * opacity * lungs
        image = np.maximum(image, vessels)        # vessels stay visible through ground glass
    mask = (extent > 0.5) & lung_mask

    image += rng.uniform(0.015, 0.035) * rng.standard_normal(image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask


class SyntheticCT(SliceDataset):
    """`num_samples` synthetic CT slices of `image_size` x `image_size` (see the module docstring).

    Item i is drawn from a random stream seeded by (seed, stream, i), so it is reproducible and
    independent of reading order; different `stream` values give disjoint sets of slices
    (`build_dataset` uses one stream per split). labeled=False gives the same images without masks.
    augment / augment seeding work as in every `SliceDataset`; "orig_size" is (image_size, image_size).
    """

    def __init__(self, num_samples: int, image_size: int = 256, seed: int = 0, labeled: bool = True,
                 *, augment: bool | AugmentConfig = False, stream: int = 0):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if image_size is None:
            raise TypeError("image_size must be an int for synthetic data, got None")
        if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
            raise ValueError(f"stream must be a non-negative int, got {stream!r}")
        super().__init__(image_size=image_size, augment=augment, seed=seed, labeled=labeled)
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 for synthetic slices, got {image_size}")
        self.num_samples = num_samples
        self.stream = stream

    def __len__(self) -> int:
        return self.num_samples

    def load_slice(self, index: int) -> tuple[np.ndarray, np.ndarray | None, str]:
        # A tag separates this stream from the augmentation streams derived from the same seed.
        rng = np.random.default_rng(derive_seed(_RENDER_TAG, self.seed, self.stream, index))
        image, mask = render_synthetic_slice(rng, self.image_size)
        return image, (mask if self.labeled else None), f"synthetic_{index}"
