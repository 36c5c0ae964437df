"""PNG pictures of joint upsampling results: colour-mapped depth and Middlebury colour-coded flow.

For each sample four files are written: ``<i>_guide.png`` (the RGB guide), ``<i>_input.png`` (the low-res
target, enlarged with nearest neighbours), ``<i>_pred.png`` and ``<i>_gt.png``; :func:`save_comparison` puts
several models' predictions side by side in one grid. Input, predictions and ground truth share one colour
scale, taken from the ground truth, so they can be compared by eye.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from task_jointUpsampling.datasets import center_crop
from tools.runtime import atomic_savefig

__all__ = ['depth_to_image', 'flow_to_image_scaled', 'save_sample_images', 'save_comparison']


def depth_to_image(depth: np.ndarray, vmin: float, vmax: float, cmap: str = 'plasma') -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8 through a matplotlib colour map; near is dark with 'plasma'."""
    from matplotlib import colormaps
    scaled = np.clip((depth - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return (colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)


def flow_to_image_scaled(flow: np.ndarray, max_radius: float) -> np.ndarray:
    """(2, H, W) flow -> (H, W, 3) uint8 Middlebury colours, normalised by ``max_radius`` (not by its own max)."""
    from tools.flowlib import compute_color
    scale = max(max_radius, 1e-12)
    return compute_color(flow[0] / scale, flow[1] / scale)


def _enlarge(low: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(low[None], size=tuple(size), mode='nearest')[0]


def _pictures(kind: str, guide: torch.Tensor, low_raw: torch.Tensor, targets: dict[str, torch.Tensor],
              gt: torch.Tensor) -> dict[str, np.ndarray]:
    """uint8 RGB pictures of one sample: 'guide', 'input', one per entry of ``targets`` (e.g. predictions) and
    'gt', all cut to the ground truth's region and coloured on the ground truth's scale."""
    gt = gt.detach().float().cpu()
    # the target lacks the evaluation border: enlarge the input to the guide's size, then cut the same border
    low = center_crop(_enlarge(low_raw.detach().float().cpu(), guide.shape[-2:]), gt.shape[-2:])
    arrays = {'input': low, **{name: t.detach().float().cpu() for name, t in targets.items()}, 'gt': gt}
    if kind == 'depth':
        vmin, vmax = float(gt.min()), float(gt.max())
        pictures = {name: depth_to_image(a[0].numpy(), vmin, vmax) for name, a in arrays.items()}
    else:
        max_radius = float(gt.square().sum(0).sqrt().max())
        pictures = {name: flow_to_image_scaled(a.numpy(), max_radius) for name, a in arrays.items()}
    rgb = center_crop(guide.detach().float().cpu().clamp(0, 1), gt.shape[-2:])
    return {'guide': (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), **pictures}


def _check_kind(kind: str) -> None:
    if kind not in ('depth', 'flow'):
        raise ValueError(f"kind must be 'depth' or 'flow', got {kind!r}")


def save_sample_images(folder: Path, first_index: int, kind: str, guide: torch.Tensor, low_raw: torch.Tensor,
                       pred_raw: torch.Tensor, target: torch.Tensor) -> None:
    """Write the four PNGs of each sample of a batch, numbered from ``first_index``, all cut to the target's
    region (the target lacks the evaluation border).

    Args:
        folder: output folder (created).
        kind: 'depth' or 'flow'.
        guide: (B, 3, H, W) in [0, 1]; low_raw: (B, C, H / f, W / f); pred_raw, target: (B, C, H', W') in raw
            units, the centre of the guide's area.
    """
    _check_kind(kind)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for b in range(target.shape[0]):
        pictures = _pictures(kind, guide[b], low_raw[b], {'pred': pred_raw[b]}, target[b])
        for name, picture in pictures.items():
            Image.fromarray(picture).save(folder / f'{first_index + b:04d}_{name}.png')


def save_comparison(path: Path, kind: str, guide: torch.Tensor, low_raw: torch.Tensor,
                    preds_raw: dict[str, torch.Tensor], target: torch.Tensor,
                    captions: dict[str, Sequence[str]] | None = None,
                    row_labels: Sequence[str] | None = None, unit: str = 'm') -> Path:
    """One PNG grid, a row per sample: guide, low-res input, each model's prediction and the ground truth, with
    a colour bar per row (depth in ``unit``; flow: the radius of the colour wheel in px).

    Args:
        path: the PNG to write (atomically).
        kind: 'depth' or 'flow'.
        guide, low_raw, target: as in :func:`save_sample_images`.
        preds_raw: model name -> (B, C, H', W') prediction in raw units.
        captions: optional model name -> B texts (e.g. each sample's error) shown under its pictures.
        row_labels: optional B texts shown left of each row.
        unit: the depth unit of the colour bars.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    _check_kind(kind)
    count = target.shape[0]
    titles = ['guide', 'input', *preds_raw, 'ground truth']
    figure = Figure(figsize=(2.0 * len(titles) + 0.6, 2.1 * count))
    axes = figure.subplots(count, len(titles), squeeze=False)
    for row in range(count):
        pictures = _pictures(kind, guide[row], low_raw[row], {n: p[row] for n, p in preds_raw.items()}, target[row])
        for col, (name, picture) in enumerate(pictures.items()):
            ax = axes[row, col]
            ax.imshow(picture, interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=9)
            if captions and name in captions:
                ax.set_xlabel(captions[name][row], fontsize=8)
        if row_labels is not None:
            axes[row, 0].set_ylabel(row_labels[row], fontsize=9)
        gt = target[row].detach().float().cpu()
        if kind == 'depth':
            scale = ScalarMappable(Normalize(float(gt.min()), float(gt.max())), colormaps['plasma'])
            label = f'depth ({unit})'
        else:
            scale = ScalarMappable(Normalize(0, float(gt.square().sum(0).sqrt().max())), colormaps['gray'])
            label = 'wheel radius (px)'
        figure.colorbar(scale, ax=axes[row].tolist(), fraction=0.02, pad=0.01).set_label(label, fontsize=8)
    return atomic_savefig(figure, path, dpi=100)
