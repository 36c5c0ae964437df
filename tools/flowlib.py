"""Optical flow files and pictures: Middlebury ``.flo`` I/O, colour coding and end-point error.

The ``.flo`` format (little-endian): float32 magic 202021.25 (the bytes "PIEH"), int32 width,
int32 height, then height * width * 2 float32 values, row-major with (u, v) interleaved.

Example:
    >>> gt = np.random.default_rng(0).normal(size=(4, 5, 2)).astype(np.float32)
    >>> write_flow(gt, "frame_0001.flo")
    >>> flow = read_flow("frame_0001.flo")                 # (H, W, 2) float32
    >>> flow.shape, flow.dtype
    ((4, 5, 2), dtype('float32'))
    >>> path = save_flow_image(flow, "frame_0001.png")     # Middlebury colour coding
    >>> round(flow_error(gt[..., 0], gt[..., 1], flow[..., 0] + 3, flow[..., 1] + 4), 4)  # mean end-point error
    5.0
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "UNKNOWN_FLOW_THRESH",
    "FLO_MAGIC",
    "read_flow",
    "write_flow",
    "make_color_wheel",
    "compute_color",
    "flow_to_image",
    "save_flow_image",
    "flow_error",
    "evaluate_flow",
]

UNKNOWN_FLOW_THRESH = 1e7  # |u| or |v| above this marks an unknown (invalid) flow vector
FLO_MAGIC = 202021.25  # float32 whose little-endian bytes spell "PIEH"
_EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------------------------------
# .flo files
# --------------------------------------------------------------------------------------------------
def read_flow(path: PathLike) -> np.ndarray:
    """Read a Middlebury ``.flo`` file.

    Returns:
        (H, W, 2) float32 array, channel 0 = u (x), channel 1 = v (y).

    Raises:
        ValueError: wrong magic number, bad size fields, or truncated data (naming the file).
    """
    with open(path, "rb") as handle:
        header = handle.read(12)
        if len(header) < 12:
            raise ValueError(f"{path}: not a .flo file: {len(header)} bytes, expected a 12-byte "
                             "header")
        magic = np.frombuffer(header, "<f4", count=1)[0]
        if magic != np.float32(FLO_MAGIC):
            raise ValueError(f"{path}: not a .flo file: magic number {magic!r} ({header[:4]!r}), "
                             f"expected {FLO_MAGIC} (b'PIEH')")
        width, height = (int(x) for x in np.frombuffer(header, "<i4", count=2, offset=4))
        if width <= 0 or height <= 0:
            raise ValueError(f"{path}: invalid .flo size {width}x{height}, expected positive "
                             "width and height")
        count = 2 * width * height
        data = np.fromfile(handle, "<f4", count=count)
    if data.size != count:
        raise ValueError(f"{path}: truncated .flo file: {data.size} of {count} values for a "
                         f"{width}x{height} flow")
    return data.astype(np.float32).reshape(height, width, 2)


def write_flow(flow: np.ndarray, path: PathLike) -> None:
    """Write a flow field as a Middlebury ``.flo`` file.

    Args:
        flow: (H, W, 2) with (u, v), or (H, W) holding u only (v is written as 0, which is what
            the 2019 code wrote). Any real dtype; stored as float32.
        path: the output file.
    """
    flow = np.asarray(flow)
    if flow.ndim == 2:
        flow = np.stack([flow, np.zeros_like(flow)], axis=-1)
    if flow.ndim != 3 or flow.shape[2] != 2 or 0 in flow.shape:
        raise ValueError(f"flow: expected shape (H, W, 2) or (H, W) with H, W > 0, got "
                         f"{tuple(flow.shape)}")
    if not np.issubdtype(flow.dtype, np.number) or np.iscomplexobj(flow):
        raise TypeError(f"flow: expected a real numeric array, got dtype {flow.dtype}")
    from tools.runtime import atomic_open  # imported lazily: it imports torch, reading .flo does not

    height, width = flow.shape[:2]
    with atomic_open(path, "wb") as handle:  # a reader never sees a truncated file
        handle.write(np.array([FLO_MAGIC], "<f4").tobytes())
        handle.write(np.array([width, height], "<i4").tobytes())
        handle.write(np.ascontiguousarray(flow, dtype="<f4").tobytes())


# --------------------------------------------------------------------------------------------------
# Colour coding
# --------------------------------------------------------------------------------------------------
def make_color_wheel() -> np.ndarray:
    """The 55-entry Middlebury colour wheel, (55, 3) float64 RGB values in [0, 255].

    Six hue segments with linear ramps floor(255 * i / n): red->yellow (15), yellow->green (6),
    green->cyan (4), cyan->blue (11), blue->magenta (13), magenta->red (6).
    """
    # (length, channel that ramps, ramp direction, channel held at 255)
    segments = [(15, 1, +1, 0), (6, 0, -1, 1), (4, 2, +1, 1),
                (11, 1, -1, 2), (13, 0, +1, 2), (6, 2, -1, 0)]
    rows = []
    for length, ramp_channel, direction, full_channel in segments:
        block = np.zeros((length, 3))
        ramp = np.floor(255 * np.arange(length) / length)
        block[:, full_channel] = 255
        block[:, ramp_channel] = ramp if direction > 0 else 255 - ramp
        rows.append(block)
    return np.concatenate(rows)


def compute_color(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Colour-code flow components already scaled so that radius 1 is full saturation.

    Hue follows the direction (angle of (-u, -v)), saturation the radius; radii above 1 are
    darkened to 75 %. NaN components give black.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    if u.shape != v.shape:
        raise ValueError(f"u and v must have the same shape, got {u.shape} and {v.shape}")
    nan = np.isnan(u) | np.isnan(v)
    u, v = np.where(nan, 0.0, u), np.where(nan, 0.0, v)
    wheel = make_color_wheel() / 255
    ncols = len(wheel)
    radius = np.sqrt(u ** 2 + v ** 2)
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]
    position = (angle + 1) / 2 * (ncols - 1)  # 0-based position on the wheel, in [0, ncols - 1]
    k0 = np.floor(position).astype(int)
    k1 = (k0 + 1) % ncols
    frac = (position - k0)[..., None]
    color = (1 - frac) * wheel[k0] + frac * wheel[k1]
    inside = (radius <= 1)[..., None]
    color = np.where(inside, 1 - radius[..., None] * (1 - color), color * 0.75)
    color[nan] = 0
    return np.floor(255 * color).astype(np.uint8)


def flow_to_image(flow: np.ndarray) -> np.ndarray:
    """Middlebury colour picture of a flow field, normalised by its largest known radius.

    Args:
        flow: (H, W, 2) flow; vectors with |u| or |v| > ``UNKNOWN_FLOW_THRESH`` are unknown.

    Returns:
        (H, W, 3) uint8 RGB; unknown vectors are black, zero flow is white.
    """
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow: expected shape (H, W, 2), got {tuple(flow.shape)}")
    u, v = flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64)
    unknown = (np.abs(u) > UNKNOWN_FLOW_THRESH) | (np.abs(v) > UNKNOWN_FLOW_THRESH)
    u[unknown] = 0
    v[unknown] = 0
    radius = np.sqrt(u ** 2 + v ** 2)
    max_radius = max(-1.0, float(np.nanmax(radius))) if radius.size else -1.0
    scale = max_radius + _EPS
    image = compute_color(u / scale, v / scale)
    image[unknown] = 0
    return image


def save_flow_image(flow: np.ndarray, path: PathLike) -> Path:
    """Write :func:`flow_to_image` of ``flow`` as a PNG (or any Pillow format by suffix), atomically."""
    from PIL import Image  # imported lazily: reading .flo files does not need Pillow or torch

    from tools.runtime import atomic_open

    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"path: cannot tell the image format from the suffix of {path}, "
                         "expected e.g. .png")
    picture = Image.fromarray(flow_to_image(flow))
    with atomic_open(path, "wb") as handle:
        picture.save(handle, format=image_format)
    return path


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def flow_error(tu: np.ndarray, tv: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    """Mean end-point error of a predicted flow (u, v) against the ground truth (tu, tv).

    Ground-truth vectors that are unknown (|component| > ``UNKNOWN_FLOW_THRESH``) or exactly zero
    are left out. The inputs are not modified.

    Returns:
        The mean EPE (float), NaN when no pixel is valid.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (tu, tv, u, v)]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"tu, tv, u, v must have the same shape, got "
                         f"{[a.shape for a in arrays]}")
    tu, tv, u, v = arrays
    unknown = (np.abs(tu) > UNKNOWN_FLOW_THRESH) | (np.abs(tv) > UNKNOWN_FLOW_THRESH)
    valid = ~unknown & ((tu != 0) | (tv != 0))
    if not valid.any():
        return float("nan")
    epe = np.sqrt((u[valid] - tu[valid]) ** 2 + (v[valid] - tv[valid]) ** 2)
    return float(epe.mean())


def evaluate_flow(gt_path: PathLike, pred_path: PathLike) -> float:
    """Mean EPE between two ``.flo`` files (see :func:`flow_error`)."""
    gt, pred = read_flow(gt_path), read_flow(pred_path)
    if gt.shape != pred.shape:
        raise ValueError(f"{pred_path}: flow of shape {pred.shape} does not match the ground "
                         f"truth {gt_path} of shape {gt.shape}")
    return flow_error(gt[..., 0], gt[..., 1], pred[..., 0], pred[..., 1])
