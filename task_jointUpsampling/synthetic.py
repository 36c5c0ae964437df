"""A procedurally generated RGB-D dataset for joint depth upsampling: no download, made on the fly from a seed.

Each scene is a slanted background plane with flat shapes (ellipses, rotated rectangles, triangles) stacked in
front of it, each on its own slanted depth plane. Every depth edge is an occlusion boundary of a shape, so
it coincides with a colour edge of the image. On top, "decals" (painted shapes, stripes and checkerboards)
and pixel noise add colour edges with no depth edge at all: a filter that trusts every colour edge copies
them into the depth, a filter that ignores colour blurs the real edges.

Samples look like NYU Depth V2 ones: ``(image uint8 (3, H, W), depth float32 (H, W))``, depth in metres.

Example:
    >>> ds = Synthetic(split='train', num_samples=4, size=64)
    >>> image, depth = ds[0]
    >>> image.shape, image.dtype, depth.shape, depth.dtype
    ((3, 64, 64), dtype('uint8'), (64, 64), dtype('float32'))
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

__all__ = ['Synthetic', 'make_scene']

_SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}
_DEFAULT_NUM_SAMPLES = {'train': 400, 'val': 50, 'test': 50}


def _shape_mask(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, h: int, w: int) -> np.ndarray:
    """Boolean mask of a random ellipse, rotated rectangle or triangle of a random size."""
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(0.08, 0.3) * h, rng.uniform(0.08, 0.3) * w
    kind = rng.integers(3)
    if kind == 0:
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    angle = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    if kind == 1:
        return (np.abs(u) <= rx) & (np.abs(v) <= ry)
    return (v >= -ry) & (v <= ry - 2 * ry * np.abs(u) / rx)  # isosceles triangle, apex up


def _plane(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, h: int, w: int, base: float,
           slope: float) -> np.ndarray:
    """A slanted plane of value ``base`` at the centre that changes by up to ``slope`` across the image."""
    gy, gx = rng.uniform(-slope, slope, size=2)
    return base + gy * (yy / h - 0.5) + gx * (xx / w - 0.5)


def _colour(rng: np.random.Generator, avoid: Sequence[np.ndarray] = (), min_distance: float = 120.0) -> np.ndarray:
    """A random RGB colour at least ``min_distance`` (in 0..255 units) from each colour in ``avoid``."""
    for _ in range(100):
        colour = rng.uniform(0, 255, size=3)
        if all(np.linalg.norm(colour - other) >= min_distance for other in avoid):
            return colour
    return colour


def _decal(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask and per-pixel colour offset of a colour-only pattern: a painted shape, stripes or a checkerboard."""
    mask = _shape_mask(rng, yy, xx, h, w)
    kind = rng.integers(3)
    amplitude = rng.uniform(25, 70) * rng.choice([-1.0, 1.0], size=3)
    if kind == 0:
        pattern = np.ones_like(yy)
    else:
        period = rng.uniform(4, 16)
        angle = rng.uniform(0, np.pi)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        if kind == 1:
            pattern = np.sign(np.sin(2 * np.pi * u / period))
        else:
            v = -xx * np.sin(angle) + yy * np.cos(angle)
            pattern = np.sign(np.sin(np.pi * u / period) * np.sin(np.pi * v / period))
    return mask, pattern[..., None] * amplitude


def make_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate one scene: ``(image uint8 (3, H, W), depth float32 (H, W))`` with depth in metres (0.5 to 10)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    far = rng.uniform(6.0, 9.0)
    depth = _plane(rng, yy, xx, height, width, far, slope=1.5)
    background = _colour(rng)
    image = np.broadcast_to(background, (height, width, 3)).copy()
    image += _plane(rng, yy, xx, height, width, 0.0, slope=40.0)[..., None]  # smooth shading, no depth edge
    colours = [background]
    num_shapes = rng.integers(4, 9)
    # painter's order: every new shape is nearer than all earlier ones, so occlusions are consistent
    for near in np.sort(rng.uniform(1.0, far - 1.0, size=num_shapes))[::-1]:
        mask = _shape_mask(rng, yy, xx, height, width)
        colour = _colour(rng, avoid=colours[-3:])
        colours.append(colour)
        depth[mask] = _plane(rng, yy, xx, height, width, near, slope=0.8)[mask]
        image[mask] = colour + _plane(rng, yy, xx, height, width, 0.0, slope=30.0)[mask][:, None]
    # 1 to 3 decals, whose colour steps (43 to 121 in RGB distance) are at most those between a shape and the last
    # three surfaces drawn (>= 120): they mislead a filter that trusts every colour edge, yet leave the occlusion
    # boundaries the strongest edges
    for _ in range(rng.integers(1, 4)):
        mask, offset = _decal(rng, yy, xx, height, width)
        image[mask] += offset[mask]
    image += rng.normal(0, 6.0, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return np.ascontiguousarray(image), np.clip(depth, 0.5, 10.0).astype(np.float32)


class Synthetic(Dataset):
    """Procedural RGB-D scenes (see the module docstring), generated on the fly and reproducible from ``seed``.

    Args:
        root: ignored (accepted so the dataset is built like the others).
        split: 'train', 'val' or 'test'; each split draws from its own random stream.
        num_samples: number of scenes; default 400 for 'train', 50 for 'val' and 'test'.
        size: scene size, an int or (height, width).
        seed: base seed; sample ``i`` of a split is always the same scene for a given seed.
        transform: called as ``transform(image, depth)``.
        download: ignored (nothing to download).
    """

    def __init__(self, root: str | None = None, split: str = 'train', num_samples: int | None = None,
                 size: int | Sequence[int] = 128, seed: int = 0, transform: Callable | None = None,
                 download: bool = False):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {tuple(_SPLIT_IDS)}, got {split!r}")
        num_samples = _DEFAULT_NUM_SAMPLES[split] if num_samples is None else num_samples
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f'num_samples must be a positive int, got {num_samples!r}')
        size = (size, size) if isinstance(size, int) else size
        if not isinstance(size, (tuple, list)) or len(size) != 2 or \
                not all(isinstance(s, int) and not isinstance(s, bool) and s >= 8 for s in size):
            raise ValueError(f'size must be an int or (height, width) of at least 8 pixels, got {size!r}')
        size = tuple(size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f'seed must be an int >= 0, got {seed!r}')
        self.split, self.num_samples, self.size, self.seed = split, num_samples, size, seed
        self.transform = transform

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int):
        if not 0 <= i < self.num_samples:
            raise IndexError(f'index {i} out of range for {self.num_samples} samples')
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], i])
        sample = make_scene(rng, *self.size)
        return self.transform(*sample) if self.transform is not None else sample
