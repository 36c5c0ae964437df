"""Brute-force mean-field reference for the PAC-CRF, written from the equations (no pac / paccrf code).

Loops over pixels and kernel taps (vectorised only over batch and classes); meant for tiny float64
inputs in tests. One pairwise kernel is described by a :class:`RefKernel`:

- adaptive kernel  K(y, x, i, j) = exp(-1/2 * sum_c (f_c(y + (i - r) d, x + (j - r) d) - f_c(y, x))^2),
  with r = k // 2 and f = 0 outside the image (so border taps compare against a zero feature);
  K = 1 for a plain-convolution ('na') kernel;
- message          m_o(y, x) = sum_{c, i, j} filt[o, c, i, j] * K(y, x, i, j) * Q_c(y + (i - r) d, x + (j - r) d),
  Q = 0 outside the image; then m <- compat @ m when a compatibility matrix is given;
- blur b > 1       Q and f are average-pooled by b (window = stride = b, centred padding
  ((b - n % b) % b + 1) // 2, padded pixels not counted), m is upsampled bilinearly by b and cropped
  by that padding back to (H, W);
- update           logQ <- unary_weight * unary - sum_kernels weight * m(softmax(logQ)).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class RefKernel:
    filt: Tensor                     # (C, C, k, k) full filter (a shared filter is expanded to its diagonal)
    dilation: int = 1
    blur: int = 1
    weight: float = 1.0              # the weight in the update (already signed)
    compat: Optional[Tensor] = None  # (C, C) compatibility matrix or None
    adaptive: bool = True            # False: plain convolution, K = 1

    @property
    def kernel_size(self) -> int:
        return self.filt.shape[-1]


def diagonal_filter(shared: Tensor, channels: int) -> Tensor:
    """(k, k) filter applied to each class on its own -> (C, C, k, k) block-diagonal filter."""
    return torch.eye(channels, dtype=shared.dtype)[:, :, None, None] * shared


def centred_pad(n: int, b: int) -> int:
    return ((b - n % b) % b + 1) // 2


def blur_down(x: Tensor, b: int) -> Tensor:
    if b == 1:
        return x
    pad = (centred_pad(x.shape[2], b), centred_pad(x.shape[3], b))
    return F.avg_pool2d(x, b, b, padding=pad, count_include_pad=False)


def blur_up(m: Tensor, b: int, size: Sequence[int]) -> Tensor:
    if b == 1:
        return m
    up = F.interpolate(m, scale_factor=b, mode='bilinear', align_corners=False)
    top, left = centred_pad(size[0], b), centred_pad(size[1], b)
    return up[:, :, top:top + size[0], left:left + size[1]]


def _inside(y: int, x: int, H: int, W: int) -> bool:
    return 0 <= y < H and 0 <= x < W


def gaussian_edge_kernel(feat: Tensor, kernel_size: int, dilation: int) -> Tensor:
    """K of shape (B, kernel_size, kernel_size, H, W), by loops over pixels and taps."""
    B, C, H, W = feat.shape
    r = kernel_size // 2
    K = torch.zeros(B, kernel_size, kernel_size, H, W, dtype=feat.dtype)
    for y in range(H):
        for x in range(W):
            centre = feat[:, :, y, x]
            for i in range(kernel_size):
                for j in range(kernel_size):
                    yy, xx = y + (i - r) * dilation, x + (j - r) * dilation
                    neighbour = feat[:, :, yy, xx] if _inside(yy, xx, H, W) else torch.zeros_like(centre)
                    K[:, i, j, y, x] = torch.exp(-0.5 * ((neighbour - centre) ** 2).sum(1))
    return K


def message(Q: Tensor, K: Optional[Tensor], filt: Tensor, dilation: int) -> Tensor:
    """m[b, o, y, x] = sum_{c,i,j} filt[o, c, i, j] * K[b, i, j, y, x] * Q[b, c, y + (i-r)d, x + (j-r)d]."""
    B, C, H, W = Q.shape
    k = filt.shape[-1]
    r = k // 2
    m = torch.zeros(B, filt.shape[0], H, W, dtype=Q.dtype)
    for y in range(H):
        for x in range(W):
            for i in range(k):
                for j in range(k):
                    yy, xx = y + (i - r) * dilation, x + (j - r) * dilation
                    if not _inside(yy, xx, H, W):
                        continue
                    tap = Q[:, :, yy, xx] @ filt[:, :, i, j].T  # (B, O)
                    m[:, :, y, x] += tap if K is None else K[:, i, j, y, x, None] * tap
    return m


def mean_field(unary: Tensor, feats: Sequence[Optional[Tensor]], kernels: List[RefKernel], num_steps: int,
               unary_weight: float = 1.0, logQ: Optional[Tensor] = None) -> Tensor:
    """Final logQ after ``num_steps`` updates; feats[n] is the (B, F, H, W) feature of kernel n."""
    size = unary.shape[-2:]
    edge = [gaussian_edge_kernel(blur_down(f, kern.blur), kern.kernel_size, kern.dilation) if kern.adaptive
            else None for f, kern in zip(feats, kernels)]
    logQ = unary if logQ is None else logQ
    for _ in range(num_steps):
        Q = F.softmax(logQ, dim=1)
        new = unary_weight * unary
        for kern, K in zip(kernels, edge):
            m = message(blur_down(Q, kern.blur), K, kern.filt, kern.dilation)
            if kern.compat is not None:
                m = torch.einsum('oc,bcyx->boyx', kern.compat, m)
            new = new - kern.weight * blur_up(m, kern.blur, size)
        logQ = new
    return logQ
