"""The PASCAL VOC colour palette and label-image I/O (indexed 'P'-mode PNGs)."""
from pathlib import Path
from typing import List, Union

import numpy as np
from PIL import Image

from tools.runtime import atomic_open

__all__ = ['NUM_VOC_CLASSES', 'VOC_CLASSES', 'IGNORE_LABEL', 'voc_palette', 'label_to_image',
           'save_label_png', 'colorize']

VOC_CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
               'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
               'sheep', 'sofa', 'train', 'tvmonitor')
NUM_VOC_CLASSES = len(VOC_CLASSES)
IGNORE_LABEL = 255  # VOC object boundaries / void: excluded from losses and metrics


def voc_palette() -> List[int]:
    """The 256-entry VOC palette as a flat [r0, g0, b0, r1, ...] list (768 ints).

    Indices 0-20 use the standard VOC colour map (bits of the index spread over r, g, b); every other
    index, including the ignore label 255, is white.

    Example:
        >>> voc_palette()[3:6]   # aeroplane
        [128, 0, 0]
    """
    palette = [255] * (256 * 3)
    for index in range(NUM_VOC_CLASSES):
        r = g = b = 0
        code = index
        for bit in range(8):
            r |= ((code >> 0) & 1) << (7 - bit)
            g |= ((code >> 1) & 1) << (7 - bit)
            b |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette[3 * index:3 * index + 3] = [r, g, b]
    return palette


def label_to_image(label: np.ndarray) -> Image.Image:
    """A (H, W) integer label map (values 0-255) as a 'P'-mode image with the VOC palette."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f'label must be a 2-D (H, W) array, got shape {label.shape}')
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f'label values must be in [0, 255], got [{label.min()}, {label.max()}]')
    image = Image.fromarray(label.astype(np.uint8), mode='P')
    image.putpalette(voc_palette())
    return image


def save_label_png(label: np.ndarray, path: Union[str, Path]) -> None:
    """Write a label map as an indexed PNG with the VOC palette, atomically."""
    with atomic_open(path, 'wb') as handle:
        label_to_image(label).save(handle, format='PNG')


def colorize(label: np.ndarray) -> np.ndarray:
    """A (H, W) label map as an (H, W, 3) uint8 RGB image with the VOC colours."""
    palette = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    return palette[np.asarray(label).astype(np.uint8)]
