"""A procedurally generated RGB-D dataset for joint depth upsampling: no download, made on the fly from a seed.

Each scene is a background (a room of wall and floor, or rolling terrain) with objects stacked in front of it in
painter's order, and it holds what real scenes ask of a guided upsampler:

- **curved and slanted surfaces**: slanted planes, a floor whose depth grows towards the horizon, spherical and
  cylindrical bulges, undulating terrain;
- **texture-copy traps**: colour textures (stripes, checkerboards, painted patches, dots, rings, marbling), a
  wall/floor albedo change and cast shadows, all on smooth depth: colour edges with no depth edge;
- **depth edges with weak or no colour contrast**: some objects ("camouflaged") take nearly the colour of the
  surface behind them;
- **shading and lighting**: Lambertian shading from each surface's own normals, a smooth illumination falloff,
  image noise;
- **a depth sensor**: the low-resolution input is sampled from a *sensor* depth with depth-dependent noise and
  holes (occlusion shadows beside depth edges, dropouts, patches that return nothing), filled with the nearest
  valid measurement as a simple driver would. The ground truth is the clean depth: every pixel of the target is
  valid, so loss and measures need no mask;
- **varied object scales**: object sizes are drawn log-uniformly over nearly a decade.

Scenes come in two *families* with different statistics (see ``FAMILIES``): train on one, test on the other to
measure generalisation. ``'A'`` (rooms: boxes, ellipses, triangles, spheres; stripes, checkerboards, painted
patches; moderate noise) and ``'B'`` (terrain: stars, superellipses, blobs, cylinders; dots, rings, marbling; a
muted palette, more camouflage, stronger noise and more holes). ``docs/synthetic_scenes.png`` shows samples
(``python -m task_jointUpsampling.synthetic docs/synthetic_scenes.png`` draws it).

Samples look like NYU Depth V2 ones: ``(image uint8 (3, H, W), depth float32 (H, W))``, depth in metres; with
``sensor=True`` a third array, the sensor depth the low-res input is sampled from.

Example:
    >>> ds = Synthetic(split='train', num_samples=4, size=64)
    >>> image, depth = ds[0]
    >>> image.shape, image.dtype, depth.shape, depth.dtype
    ((3, 64, 64), dtype('uint8'), (64, 64), dtype('float32'))
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage
from torch.utils.data import Dataset

__all__ = ['Synthetic', 'make_scene', 'FAMILIES', 'SceneFamily', 'save_scene_samples']

_SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}
_DEFAULT_NUM_SAMPLES = {'train': 400, 'val': 50, 'test': 50}
MIN_DEPTH, MAX_DEPTH = 0.5, 10.0


@dataclass(frozen=True)
class SceneFamily:
    """The statistics of a family of scenes."""
    background: str  # 'room' (wall and floor planes) or 'terrain' (an undulating surface)
    shapes: tuple[str, ...]  # object outlines
    bulges: tuple[str, ...]  # curved object surfaces: 'sphere', 'cylinder'
    textures: tuple[str, ...]  # colour-only patterns
    saturation: float  # colours are grey + saturation * (random colour - grey)
    camouflage: float  # probability that an object takes nearly the colour behind it
    image_noise: float  # std of the image noise, 0..255 units
    depth_noise: float  # sensor noise std = depth_noise * depth^2 (metres)
    dropout: float  # fraction of sensor pixels that return nothing
    shadow_band: float  # width of the sensor's occlusion shadows, as a fraction of the image width
    max_range: float  # the sensor returns nothing beyond this depth (metres)


FAMILIES = {
    'A': SceneFamily(background='room', shapes=('ellipse', 'box', 'triangle'), bulges=('sphere',),
                     textures=('stripes', 'checker', 'patch'), saturation=1.0, camouflage=0.25, image_noise=3.0,
                     depth_noise=0.002, dropout=0.01, shadow_band=0.02, max_range=9.5),
    'B': SceneFamily(background='terrain', shapes=('star', 'superellipse', 'blob'), bulges=('cylinder',),
                     textures=('dots', 'rings', 'marble'), saturation=0.6, camouflage=0.4, image_noise=6.0,
                     depth_noise=0.004, dropout=0.03, shadow_band=0.03, max_range=9.0),
}


# ---------------------------------------------------------------------------------------------- geometry
def _rotated(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float):
    angle = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    return u, v


def _shape(rng: np.random.Generator, kind: str, yy: np.ndarray, xx: np.ndarray, size: float):
    """(mask, r): a random outline of the given kind, about ``size`` pixels in radius, and a radial coordinate r
    (0 at the centre, about 1 on the outline) for curved surfaces."""
    h, w = yy.shape
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = size * rng.uniform(0.6, 1.4, size=2)
    u, v = _rotated(rng, yy, xx, cy, cx)
    r = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    if kind == 'ellipse':
        return r <= 1, r
    if kind == 'box':
        box = np.maximum(np.abs(u) / rx, np.abs(v) / ry)
        return box <= 1, box
    if kind == 'triangle':  # isosceles, apex up
        return (v >= -ry) & (v <= ry - 2 * ry * np.abs(u) / rx), r
    if kind == 'superellipse':
        p = rng.uniform(3, 6)
        s = (np.abs(u / rx) ** p + np.abs(v / ry) ** p) ** (1 / p)
        return s <= 1, s
    theta = np.arctan2(v, u)
    if kind == 'star':
        points, depth = rng.integers(4, 8), rng.uniform(0.3, 0.55)
        outline = 1 - depth * (0.5 + 0.5 * np.cos(points * theta))
    elif kind == 'blob':
        outline = 1 + sum(rng.uniform(-0.2, 0.2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    else:
        raise ValueError(f'unknown shape {kind!r}')
    return r <= outline, r / outline


def _plane(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, base: float, slope: float) -> np.ndarray:
    """A slanted plane of value ``base`` at the centre that changes by up to ``slope`` across the image."""
    h, w = yy.shape
    gy, gx = rng.uniform(-slope, slope, size=2)
    return base + gy * (yy / h - 0.5) + gx * (xx / w - 0.5)


def _background(rng: np.random.Generator, family: SceneFamily, yy: np.ndarray, xx: np.ndarray):
    """(depth, region): the background's depth and an integer region map (0 and 1: e.g. wall and floor)."""
    h, w = yy.shape
    if family.background == 'room':
        wall = _plane(rng, yy, xx, rng.uniform(5.0, 8.0), slope=1.5)
        horizon = rng.uniform(0.3, 0.6) * h
        near_row = rng.uniform(1.5, 2.5)  # the floor's depth at the bottom row; 1 / depth is linear in the row
        inverse = (1 / near_row) * np.maximum(yy - horizon, 1e-3) / (h - horizon)
        floor = 1 / inverse
        return np.minimum(wall, floor), (floor < wall).astype(int)
    depth = _plane(rng, yy, xx, rng.uniform(4.5, 7.0), slope=2.0)
    for _ in range(3):
        fy, fx = rng.uniform(0.5, 2.5, size=2) * 2 * np.pi
        depth = depth + rng.uniform(0.15, 0.5) * np.sin(fy * yy / h + fx * xx / w + rng.uniform(0, 2 * np.pi))
    return depth, (depth > np.median(depth)).astype(int)


def _bulge(rng: np.random.Generator, kind: str, r: np.ndarray, u: np.ndarray, size: float) -> np.ndarray:
    """How much nearer a curved surface is than its plane, in metres."""
    height = rng.uniform(0.2, 0.8) * size / 32
    if kind == 'sphere':
        return height * np.sqrt(np.clip(1 - r ** 2, 0, 1))
    return height * np.sqrt(np.clip(1 - (u / size) ** 2, 0, 1))  # a cylinder across the object


# ---------------------------------------------------------------------------------------------- appearance
def _colour(rng: np.random.Generator, family: SceneFamily, near: np.ndarray | None = None) -> np.ndarray:
    """A random RGB colour of the family's palette, or one 4 to 15 away from ``near`` (a camouflaged surface)."""
    if near is not None:
        offset = rng.normal(size=3)
        return near + offset / np.linalg.norm(offset) * rng.uniform(4, 15)
    grey = rng.uniform(60, 200)
    return grey + family.saturation * (rng.uniform(0, 255, size=3) - grey)


def _texture(rng: np.random.Generator, kind: str, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A pattern in [-1, 1] (0 outside a painted patch) that changes colour only."""
    h, w = yy.shape
    u, v = _rotated(rng, yy, xx, h / 2, w / 2)
    period = rng.uniform(4, 16)
    if kind == 'stripes':
        return np.sign(np.sin(2 * np.pi * u / period))
    if kind == 'checker':
        return np.sign(np.sin(np.pi * u / period) * np.sin(np.pi * v / period))
    if kind == 'patch':
        mask, _ = _shape(rng, str(rng.choice(('ellipse', 'box'))), yy, xx, rng.uniform(0.08, 0.25) * min(h, w))
        return mask * rng.choice([-1.0, 1.0])
    if kind == 'dots':
        cell = period * 1.5
        du, dv = (u % cell) - cell / 2, (v % cell) - cell / 2
        return np.where(du ** 2 + dv ** 2 <= (cell * rng.uniform(0.2, 0.4)) ** 2, 1.0, -0.3)
    if kind == 'rings':
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        return np.sign(np.sin(2 * np.pi * np.hypot(yy - cy, xx - cx) / period))
    if kind == 'marble':
        turbulence = sum(np.sin(2 * np.pi * (a * u + b * v) / (period * 3) + rng.uniform(0, 6.3))
                         for a, b in rng.uniform(-1, 1, size=(3, 2)))
        return np.tanh(3 * np.sin(2 * np.pi * u / (period * 2) + 1.5 * turbulence))
    raise ValueError(f'unknown texture {kind!r}')


def _light(rng: np.random.Generator) -> np.ndarray:
    """A random distant light's direction, towards the camera and from above."""
    light = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.2), 1.0])
    return light / np.linalg.norm(light)


def _shading(light: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Lambertian shading in [0.35, 1] of a smooth depth map (focal length = width)."""
    focal = depth.shape[1]
    gy, gx = np.gradient(depth)
    normal = np.stack((-gx * focal / depth, -gy * focal / depth, np.ones_like(depth)))
    normal /= np.linalg.norm(normal, axis=0)
    return 0.35 + 0.65 * np.clip(np.tensordot(light, normal, axes=1), 0, 1)


# ---------------------------------------------------------------------------------------------- sensor
def _sensor_depth(rng: np.random.Generator, family: SceneFamily, depth: np.ndarray) -> np.ndarray:
    """What a depth camera returns: depth-dependent noise and holes, the holes filled with the nearest valid
    measurement. Holes: occlusion shadows (pixels left of a nearer surface within a band, as a projector to the
    right of the camera casts them), random dropouts, a few patches that return nothing, and depth beyond range."""
    h, w = depth.shape
    noisy = depth + rng.normal(size=depth.shape) * family.depth_noise * depth ** 2
    holes = (rng.random(depth.shape) < family.dropout) | (depth > family.max_range)
    band = max(1, int(round(family.shadow_band * w)))
    for shift in range(1, band + 1):
        holes[:, :-shift] |= depth[:, :-shift] - depth[:, shift:] > 0.3
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    for _ in range(rng.integers(0, 3)):
        mask, _ = _shape(rng, 'ellipse', yy, xx, rng.uniform(0.02, 0.06) * min(h, w))
        holes |= mask
    if holes.all():
        return noisy
    nearest = ndimage.distance_transform_edt(holes, return_distances=False, return_indices=True)
    return noisy[tuple(nearest)]


# ---------------------------------------------------------------------------------------------- scenes
def make_scene(rng: np.random.Generator, height: int, width: int,
               family: str | SceneFamily = 'A') -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one scene: ``(image uint8 (3, H, W), depth float32 (H, W), sensor_depth float32 (H, W))`` with
    depths in metres (0.5 to 10)."""
    family = _family(family)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    size = min(height, width)
    depth, region = _background(rng, family, yy, xx)
    colours = [_colour(rng, family), _colour(rng, family)]
    albedo = np.where(region[..., None] == 1, colours[1], colours[0])
    light = _light(rng)
    shading = _shading(light, depth)  # each surface is shaded from its own normals: creases, bulges, slants
    for _ in range(rng.integers(1, 3)):  # textures on the background
        albedo += rng.uniform(15, 50) * rng.choice([-1.0, 1.0], size=3) * \
            _texture(rng, str(rng.choice(family.textures)), yy, xx)[..., None]
    far = float(np.median(depth))
    num_objects = rng.integers(3, 8)
    # painter's order: every new object is nearer than all earlier ones, so occlusions are consistent
    for near in np.sort(rng.uniform(1.0, far - 0.8, size=num_objects))[::-1]:
        radius = size * np.exp(rng.uniform(np.log(0.05), np.log(0.35)))
        mask, r = _shape(rng, str(rng.choice(family.shapes)), yy, xx, radius)
        if not mask.any():
            continue
        surface = _plane(rng, yy, xx, near, slope=0.8)
        if rng.random() < 0.5:
            u, _ = _rotated(rng, yy, xx, *np.argwhere(mask).mean(0))
            surface = surface - _bulge(rng, str(rng.choice(family.bulges)), r, u, radius)
        centre = tuple(np.argwhere(mask)[len(np.argwhere(mask)) // 2])
        behind = albedo[centre] if rng.random() < family.camouflage else None
        colour = _colour(rng, family, near=behind)
        texture = np.zeros_like(yy)
        if behind is None and rng.random() < 0.5:  # camouflaged objects stay plain
            texture = rng.uniform(15, 50) * _texture(rng, str(rng.choice(family.textures)), yy, xx)
        depth = np.where(mask, surface, depth)
        albedo = np.where(mask[..., None], colour + texture[..., None] * rng.choice([-1.0, 1.0], size=3), albedo)
        shading = np.where(mask, _shading(light, np.maximum(surface, 0.3)), shading)
    # lighting: a smooth illumination falloff and a cast shadow (a soft-edged half plane), neither a depth edge
    illumination = 1 + _plane(rng, yy, xx, 0.0, slope=0.5)
    u, _ = _rotated(rng, yy, xx, rng.uniform(0, height), rng.uniform(0, width))
    illumination *= 1 - rng.uniform(0.0, 0.45) * (u > 0)
    image = albedo * (shading * illumination)[..., None] + rng.normal(0, family.image_noise, size=albedo.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    depth = np.clip(depth, MIN_DEPTH, MAX_DEPTH)
    sensor = np.clip(_sensor_depth(rng, family, depth), MIN_DEPTH, MAX_DEPTH)
    return np.ascontiguousarray(image), depth.astype(np.float32), sensor.astype(np.float32)


def _family(family: str | SceneFamily) -> SceneFamily:
    if isinstance(family, SceneFamily):
        return family
    if family not in FAMILIES:
        raise ValueError(f'family must be one of {tuple(FAMILIES)}, got {family!r}')
    return FAMILIES[family]


class Synthetic(Dataset):
    """Procedural RGB-D scenes (see the module docstring), generated on the fly and reproducible from ``seed``.

    Args:
        root: ignored (accepted so the dataset is built like the others).
        split: 'train', 'val' or 'test'; each split draws from its own random stream.
        num_samples: number of scenes; default 400 for 'train', 50 for 'val' and 'test'.
        size: scene size, an int or (height, width).
        seed: base seed; sample ``i`` of a split and family is always the same scene for a given seed.
        transform: called as ``transform(image, depth)``, or ``transform(image, depth, sensor_depth)`` with
            ``sensor=True``.
        download: ignored (nothing to download).
        family: 'A' or 'B', the scene statistics (``FAMILIES``); each family draws from its own random stream.
        sensor: also return the sensor depth (noise, holes filled), from which the low-res input is to be sampled.
    """

    def __init__(self, root: str | None = None, split: str = 'train', num_samples: int | None = None,
                 size: int | Sequence[int] = 128, seed: int = 0, transform: Callable | None = None,
                 download: bool = False, family: str = 'A', sensor: bool = False):
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
        _family(family)
        self.split, self.num_samples, self.size, self.seed = split, num_samples, size, seed
        self.family, self.sensor, self.transform = family, bool(sensor), transform

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int):
        if not 0 <= i < self.num_samples:
            raise IndexError(f'index {i} out of range for {self.num_samples} samples')
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], i, list(FAMILIES).index(self.family)])
        sample = make_scene(rng, *self.size, family=self.family)
        sample = sample if self.sensor else sample[:2]
        return self.transform(*sample) if self.transform is not None else sample


# ---------------------------------------------------------------------------------------------- picture
def save_scene_samples(path: str, count: int = 3, size: int = 128, seed: int = 0) -> str:
    """A PNG of ``count`` scenes of each family: image, depth and sensor depth (metres, with a colour bar)."""
    from matplotlib.figure import Figure
    from tools.runtime import atomic_savefig
    rows = [(name, Synthetic(split='train', num_samples=count, size=size, seed=seed, family=name, sensor=True)[i])
            for name in FAMILIES for i in range(count)]
    figure = Figure(figsize=(3 * 2.3, len(rows) * 2.1))
    axes = figure.subplots(len(rows), 3, squeeze=False)
    for row, (name, (image, depth, sensor)) in enumerate(rows):
        axes[row, 0].imshow(image.transpose(1, 2, 0))
        axes[row, 0].set_ylabel(f'family {name}', fontsize=9)
        for col, (array, title) in enumerate(((depth, 'depth (m)'), (sensor, 'sensor depth (m)')), start=1):
            shown = axes[row, col].imshow(array, cmap='plasma', vmin=float(depth.min()), vmax=float(depth.max()))
            figure.colorbar(shown, ax=axes[row, col], fraction=0.046, pad=0.04)
            if row == 0:
                axes[row, col].set_title(title, fontsize=9)
        if row == 0:
            axes[row, 0].set_title('image', fontsize=9)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    figure.tight_layout()
    return str(atomic_savefig(figure, path, dpi=64))


if __name__ == '__main__':
    print(save_scene_samples(sys.argv[1] if len(sys.argv) > 1 else 'synthetic_scenes.png'))
