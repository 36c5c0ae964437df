"""A generated, VOC-like segmentation dataset so the task runs end to end on a CPU without downloads.

Every image is a scene drawn from a seed: a smooth, low-saturation background (class 0) and one to four
objects (ellipses, rectangles, triangles) of eight VOC object classes (:data:`SCENE_CLASSES`; the other
VOC classes never occur, so the metrics report them as excluded). Each class has its own colour,
jittered per object and per pixel, so the classes are learnable from appearance while object
boundaries must be found from the image: the situation where a PacCRF refines a coarse network output.
Labels are VOC-palette 'P' images, so :class:`~task_semanticSegmentation.datasets.DeepLabInputs`,
the metrics and ``--eval pred`` work unchanged. Use it with ``--dataset Synthetic``.
"""
import colorsys
from typing import Callable, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

from .datasets import Seed, parse_rand_split, subset_ids
from .palette import NUM_VOC_CLASSES, label_to_image

__all__ = ['Synthetic', 'class_colours', 'render_scene']

SPLIT_SIZES = {'train': 300, 'val': 100, 'test': 100}
_SPLIT_CODES = {name: code for code, name in enumerate(SPLIT_SIZES)}


# VOC classes that appear in the scenes (few enough to learn in minutes on a CPU; the models still
# predict all 21 VOC classes): aeroplane, bird, car, cat, dog, horse, person, train.
SCENE_CLASSES = (1, 3, 7, 8, 12, 13, 15, 19)


def class_colours(classes: Tuple[int, ...] = SCENE_CLASSES) -> np.ndarray:
    """(21, 3) float RGB colours (0-255): the scene classes are spread over the hue circle."""
    colours = np.zeros((NUM_VOC_CLASSES, 3))
    for position, c in enumerate(classes):
        hue = position / len(classes)
        colours[c] = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.9 if position % 2 else 0.7)) * 255
    return colours


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth grey-ish gradient with mild noise, (H, W, 3) float."""
    grey = rng.uniform(60, 200)
    tint = rng.uniform(-15, 15, size=3)
    gy, gx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing='ij')
    slope = rng.uniform(-30, 30, size=2)
    base = grey + slope[0] * gy + slope[1] * gx
    return base[..., None] + tint + rng.normal(0, 6, size=(height, width, 3))


def _draw_object(draw: ImageDraw.ImageDraw, rng: np.random.Generator, height: int, width: int, fill: int):
    shape = rng.integers(3)
    h, w = rng.uniform(0.25, 0.6) * height, rng.uniform(0.25, 0.6) * width
    top, left = rng.uniform(-0.1 * height, height - 0.9 * h), rng.uniform(-0.1 * width, width - 0.9 * w)
    box = [left, top, left + w, top + h]
    if shape == 0:
        draw.ellipse(box, fill=fill)
    elif shape == 1:
        draw.rectangle(box, fill=fill)
    else:
        apex = left + rng.uniform(0, w)
        draw.polygon([(apex, top), (left, top + h), (left + w, top + h)], fill=fill)


def render_scene(rng: np.random.Generator, size_range: Tuple[int, int] = (64, 96)
                 ) -> Tuple[Image.Image, Image.Image]:
    """Draw one scene: (RGB image, 'P'-mode label image with the VOC palette)."""
    height, width = (int(rng.integers(size_range[0], size_range[1] + 1)) for _ in range(2))
    label = Image.new('L', (width, height), 0)
    draw = ImageDraw.Draw(label)
    colours = class_colours()
    object_colour = {}
    for index in range(1, int(rng.integers(1, 5)) + 1):
        cls = SCENE_CLASSES[int(rng.integers(len(SCENE_CLASSES)))]
        # Objects are drawn with a temporary id (100 + index) so each keeps its own jittered colour.
        _draw_object(draw, rng, height, width, 100 + index)
        object_colour[100 + index] = (cls, colours[cls] + rng.uniform(-12, 12, size=3))
    ids = np.asarray(label)
    image = _background(rng, height, width)
    classes = np.zeros((height, width), dtype=np.uint8)
    for object_id, (cls, colour) in object_colour.items():
        mask = ids == object_id
        image[mask] = colour + rng.normal(0, 8, size=(int(mask.sum()), 3))
        classes[mask] = cls
    rgb = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode='RGB')
    # A slight blur gives soft, camera-like edges (the label keeps the hard boundary).
    return rgb.filter(ImageFilter.GaussianBlur(0.7)), label_to_image(classes)


class Synthetic(Dataset):
    """Generated VOC-like scenes (21 classes, VOC palette); deterministic given ``seed``.

    Args:
        split: 'train' (300 images), 'val' (100) or 'test' (100), optionally with a ``_rand<N>`` suffix
            (N random images; all, shuffled, for N empty or 0).
        transform: called as ``transform(image, label, image_id)`` (PIL images), like :class:`PascalVOC`.
        seed: seed of the scenes; the same seed gives the same dataset on every machine.
        subset_seed: seed of the ``_rand<N>`` draw.
        size_range: (min, max) side length in pixels.

    Example:
        >>> image, label, image_id = Synthetic('val')[0]
        >>> image.mode, label.mode, image_id
        ('RGB', 'P', 'val_00000')
    """
    num_classes = NUM_VOC_CLASSES

    def __init__(self, split: str = 'train', transform: Optional[Callable] = None, seed: int = 0,
                 subset_seed: Seed = None, size_range: Tuple[int, int] = (64, 96)):
        base, count = parse_rand_split(split)
        if base not in SPLIT_SIZES:
            raise ValueError(f'Synthetic split must be one of {tuple(SPLIT_SIZES)} (optionally with a '
                             f'_rand<N> suffix), got {split!r}')
        if not (len(size_range) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in size_range)
                and 8 <= size_range[0] <= size_range[1]):
            raise ValueError(f'size_range must be (min, max) ints with 8 <= min <= max, got {size_range!r}')
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f'seed must be an int >= 0, got {seed!r}')
        self.split, self.transform, self.seed, self.size_range = split, transform, seed, tuple(size_range)
        indices = list(range(SPLIT_SIZES[base]))
        if count is not None:
            indices = subset_ids(indices, count, subset_seed)
        self._split_code = _SPLIT_CODES[base]
        self.indices = indices
        self.ids = [f'{base}_{i:05d}' for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self._split_code, self.indices[index]])
        image, label = render_scene(rng, self.size_range)
        if self.transform is None:
            return image, label, self.ids[index]
        return self.transform(image, label, self.ids[index])
