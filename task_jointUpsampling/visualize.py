"""PNG pictures of joint upsampling results: colour-mapped depth and Middlebury colour-coded flow.

For each sample four files are written: ``<i>_guide.png`` (the RGB guide), ``<i>_input.png`` (the low-res
target, enlarged with nearest neighbours), ``<i>_pred.png`` and ``<i>_gt.png``. Input, prediction and ground
truth share one colour scale, taken from the ground truth, so they can be compared by eye.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from task_jointUpsampling.datasets import center_crop

__all__ = ['depth_to_image', 'flow_to_image_scaled', 'save_sample_images']


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
    if kind not in ('depth', 'flow'):
        raise ValueError(f"kind must be 'depth' or 'flow', got {kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for b in range(target.shape[0]):
        gt = target[b].detach().float().cpu()
        # the target lacks the evaluation border: enlarge the input to the guide's size, then cut the same border
        low = center_crop(_enlarge(low_raw[b].detach().float().cpu(), guide.shape[-2:]), gt.shape[-2:])
        images = {'input': low.numpy(),
                  'pred': pred_raw[b].detach().float().cpu().numpy(), 'gt': gt.numpy()}
        if kind == 'depth':
            vmin, vmax = float(gt.min()), float(gt.max())
            pictures = {name: depth_to_image(a[0], vmin, vmax) for name, a in images.items()}
        else:
            max_radius = float(gt.square().sum(0).sqrt().max())
            pictures = {name: flow_to_image_scaled(a, max_radius) for name, a in images.items()}
        rgb = center_crop(guide[b].detach().float().cpu().clamp(0, 1), gt.shape[-2:])
        pictures['guide'] = (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        for name, picture in pictures.items():
            Image.fromarray(picture).save(folder / f'{first_index + b:04d}_{name}.png')
