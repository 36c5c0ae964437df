"""Brute-force reference of pixel-adaptive convolution, written from the equations only.

This module is an independent oracle for the tests of ``pac.py``. It never calls ``unfold``,
``fold`` or any convolution: every output pixel and every kernel tap is visited by an explicit
Python loop and read with an explicit index rule. It is slow and meant for tiny float64 inputs.

Geometry (spec section 1.2-1.4), with k kernel size, s stride, p padding, d dilation:

* non-transposed: tap (i, j) of output (y, x) reads position (y*s + i*d - p, x*s + j*d - p);
  the centre tap is (kh // 2, kw // 2).
* transposed: the adaptive kernel lives at the output resolution (stride 1, "same" padding), so
  tap (i, j) of output (y, x) reads the guide at (y + (i - kh//2)*d, x + (j - kw//2)*d); the data
  is read from the zero-inserted input Z padded by P = d*(k-1) - p, i.e. tap (i, j) reads
  Z[y + i*d - P], which is a real input pixel only when that index is a multiple of s inside
  the input.

Kernel (spec 1.3): D = sum_c (F_c(tap) - F_c(centre))^2 (per channel if ``channel_wise``; with
``_asym`` only positive differences count); 'gaussian' -> exp(-D/2); 'inv_{a}_{l}' ->
a + (D + 1e-4)^(l/2). A smoothing kernel replaces F(centre) by the smoothing window centred on
the centre-tap position. Masks and normalisation follow spec 1.3 ("norm == 0 -> norm + 1").

``padding_mode`` other than 'zeros' means: input and guide are first padded by ``padding`` with
that mode (as ``F.pad`` would do) and then treated as a padding-free image, so the padded taps
hold real values and count as valid taps in normalisation. Reads beyond that padded border
(only a large smoothing window can reach them) are zero.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

IntPair = Union[int, Sequence[int]]

PADDING_MODES = ('zeros', 'reflect', 'replicate', 'circular')


def pair(value: IntPair) -> Tuple[int, int]:
    """Return ``value`` as an (h, w) tuple."""
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output length of a (non-transposed) convolution or pooling along one dimension."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_transpose_out_size(size: int, k: int, s: int, p: int, op: int, d: int) -> int:
    """Output length of a transposed convolution along one dimension."""
    return (size - 1) * s - 2 * p + d * (k - 1) + 1 + op


def conv_transpose_in_size(out_size: int, k: int, s: int, p: int, op: int, d: int) -> int:
    """Input length of a transposed convolution whose output length is ``out_size``."""
    span = out_size + 2 * p - d * (k - 1) - 1 - op
    if span < 0 or span % s != 0:
        raise ValueError(f'output size {out_size} is not reachable with k={k} s={s} p={p} op={op} d={d}')
    return span // s + 1


def parse_kernel_type(kernel_type: str) -> Tuple[str, Optional[float], Optional[float], bool]:
    """Split a kernel type string into (family, alpha, lambda, asym).

    ``'gaussian'`` -> ('gaussian', None, None, False);
    ``'inv_0.2_-1_asym_fixed'`` -> ('inv', 0.2, -1.0, True).
    """
    parts = kernel_type.split('_')
    asym = 'asym' in parts[1:]
    if parts[0] == 'gaussian':
        return 'gaussian', None, None, asym
    if parts[0] == 'inv' and len(parts) >= 3:
        return 'inv', float(parts[1]), float(parts[2]), asym
    raise ValueError(f'unknown kernel_type {kernel_type!r}')


def source_index(pos: int, size: int, pad: int, padding_mode: str) -> Optional[int]:
    """Map a (possibly out-of-image) position to an image index, or None for a zero read.

    ``pad`` is the width of the border filled by ``padding_mode`` (ignored for 'zeros').
    """
    if 0 <= pos < size:
        return pos
    if padding_mode == 'zeros' or pos < -pad or pos >= size + pad:
        return None
    if padding_mode == 'replicate':
        return min(max(pos, 0), size - 1)
    if padding_mode == 'circular':
        return pos % size
    if padding_mode == 'reflect':  # mirror without repeating the edge pixel
        return -pos if pos < 0 else 2 * (size - 1) - pos
    raise ValueError(f'unknown padding_mode {padding_mode!r}')


def read_pixel(image: torch.Tensor, y: int, x: int, pad: Tuple[int, int] = (0, 0),
               padding_mode: str = 'zeros') -> torch.Tensor:
    """Return image[:, :, y, x] of shape (B, C), with out-of-image positions resolved by padding_mode."""
    yy = source_index(y, image.shape[-2], pad[0], padding_mode)
    xx = source_index(x, image.shape[-1], pad[1], padding_mode)
    if yy is None or xx is None:
        return image.new_zeros(image.shape[:2])
    return image[:, :, yy, xx]


def _tap_positions(y: int, x: int, i: int, j: int, k, s, p, d, transposed: bool):
    """(guide position, centre position) of tap (i, j) for output (y, x)."""
    if transposed:  # stride 1, "same" padding at the output resolution
        centre = (y, x)
        tap = (y + (i - k[0] // 2) * d[0], x + (j - k[1] // 2) * d[1])
    else:
        centre = (y * s[0] + (k[0] // 2) * d[0] - p[0], x * s[1] + (k[1] // 2) * d[1] - p[1])
        tap = (y * s[0] + i * d[0] - p[0], x * s[1] + j * d[1] - p[1])
    return tap, centre


def _transposed_source(y: int, x: int, i: int, j: int, in_size, k, s, p, d) -> Optional[Tuple[int, int]]:
    """Input pixel read by tap (i, j) of transposed output (y, x), or None on an inserted/padded zero."""
    source = []
    for out_pos, tap, size, kk, ss, pp, dd in zip((y, x), (i, j), in_size, k, s, p, d):
        z = out_pos + tap * dd - (dd * (kk - 1) - pp)  # index into the zero-inserted input
        if z < 0 or z % ss != 0 or z // ss >= size:
            return None
        source.append(z // ss)
    return source[0], source[1]


def _smoothed_centre(guide: torch.Tensor, centre: Tuple[int, int], smooth_kernel: torch.Tensor,
                     pad: Tuple[int, int], padding_mode: str) -> torch.Tensor:
    """Correlation of every guide channel with ``smooth_kernel`` centred on ``centre``: (B, Cg)."""
    sh, sw = smooth_kernel.shape[-2:]
    acc = guide.new_zeros(guide.shape[:2])
    for a in range(sh):
        for b in range(sw):
            value = read_pixel(guide, centre[0] + a - sh // 2, centre[1] + b - sw // 2, pad, padding_mode)
            acc = acc + smooth_kernel[0, 0, a, b] * value
    return acc


def _kernel_function(dist: torch.Tensor, family: str, alpha, lam) -> torch.Tensor:
    if family == 'gaussian':
        return torch.exp(-0.5 * dist)
    return alpha + (dist + 1e-4) ** (lam / 2)


def _as_channel_vector(value, channel_wise: bool, dtype) -> torch.Tensor:
    """alpha / lambda as a tensor broadcastable against (B, C): scalar or (C,)."""
    if value is None:  # gaussian kernels have no alpha / lambda
        return None
    value = torch.as_tensor(value, dtype=dtype)
    return value.reshape(1, -1) if (channel_wise and value.dim() == 1) else value


def _divisor(norm: torch.Tensor) -> torch.Tensor:
    return torch.where(norm == 0, norm + 1, norm)


def ref_kernel(guide: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0,
               dilation: IntPair = 1, kernel_type: str = 'gaussian',
               smooth_kernel: Optional[torch.Tensor] = None, inv_alpha=None, inv_lambda=None,
               channel_wise: bool = False, normalize_kernel: bool = False, transposed: bool = False,
               output_padding: IntPair = 0, mask: Optional[torch.Tensor] = None,
               padding_mode: str = 'zeros') -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Adaptive kernel K of shape (B, 1 or Cg, kh, kw, H', W') and the output mask (or None).

    ``inv_alpha`` / ``inv_lambda`` default to the numbers in ``kernel_type``; pass tensors of
    shape (Cg,) for per-channel values with ``channel_wise``. ``mask`` is (B, 1, H, W) at the
    conv input resolution (low resolution when ``transposed``). The output mask is (B, 1, H', W')
    for a masked unnormalised kernel and (B, Ck, H', W') for a normalised one, 1.0 where the
    normaliser is non-zero.
    """
    k, s, p, d, op = map(pair, (kernel_size, stride, padding, dilation, output_padding))
    if padding_mode not in PADDING_MODES:
        raise ValueError(f'unknown padding_mode {padding_mode!r}')
    if padding_mode != 'zeros' and (transposed or mask is not None):
        raise NotImplementedError('padding_mode is defined here for non-transposed unmasked kernels only')
    family, alpha, lam, asym = parse_kernel_type(kernel_type)
    alpha = _as_channel_vector(alpha if inv_alpha is None else inv_alpha, channel_wise, guide.dtype)
    lam = _as_channel_vector(lam if inv_lambda is None else inv_lambda, channel_wise, guide.dtype)
    batch, guide_channels, gh, gw = guide.shape
    if transposed:
        out_h, out_w = gh, gw
        in_size = tuple(conv_transpose_in_size(n, *a) for n, a in zip((gh, gw), zip(k, s, p, op, d)))
    else:
        out_h, out_w = (conv_out_size(n, *a) for n, a in zip((gh, gw), zip(k, s, p, d)))
        in_size = (gh, gw)
    if mask is not None and tuple(mask.shape) != (batch, 1) + in_size:
        raise ValueError(f'mask must be {(batch, 1) + in_size}, got {tuple(mask.shape)}')
    kernel_channels = guide_channels if channel_wise else 1
    kernel = guide.new_zeros(batch, kernel_channels, k[0], k[1], out_h, out_w)
    pattern = guide.new_zeros(1, 1, k[0], k[1], out_h, out_w)
    mask_cols = guide.new_zeros(batch, 1, k[0], k[1], out_h, out_w)
    for y in range(out_h):
        for x in range(out_w):
            _, centre = _tap_positions(y, x, 0, 0, k, s, p, d, transposed)
            if smooth_kernel is None:
                centre_feature = read_pixel(guide, *centre, p, padding_mode)
            else:
                centre_feature = _smoothed_centre(guide, centre, smooth_kernel, p, padding_mode)
            for i in range(k[0]):
                for j in range(k[1]):
                    tap, _ = _tap_positions(y, x, i, j, k, s, p, d, transposed)
                    delta = read_pixel(guide, *tap, p, padding_mode) - centre_feature
                    if asym:
                        delta = delta.clamp(min=0)
                    dist = delta ** 2 if channel_wise else (delta ** 2).sum(1, keepdim=True)
                    kernel[:, :, i, j, y, x] = _kernel_function(dist, family, alpha, lam)
                    if transposed:
                        source = _transposed_source(y, x, i, j, in_size, k, s, p, d)
                    else:
                        inside = padding_mode != 'zeros' or (0 <= tap[0] < gh and 0 <= tap[1] < gw)
                        source = tap if inside else None
                    if source is not None:
                        pattern[0, 0, i, j, y, x] = 1
                        if mask is not None:
                            mask_cols[:, 0, i, j, y, x] = mask[:, 0, source[0], source[1]]
    out_mask = None
    if mask is not None:
        kernel = kernel * mask_cols
        if not normalize_kernel:
            valid = pattern.sum((2, 3))
            norm = mask_cols.sum((2, 3)) / torch.where(valid == 0, torch.ones_like(valid), valid)
            kernel = kernel / _divisor(norm)[:, :, None, None]
            out_mask = (norm != 0).to(guide.dtype)
    if normalize_kernel:
        if mask is None:
            kernel = kernel * pattern
        norm = kernel.sum((2, 3))
        kernel = kernel / _divisor(norm)[:, :, None, None]
        if mask is not None:
            out_mask = (norm != 0).to(guide.dtype)
    return kernel, out_mask


def _check_kernel(kernel: torch.Tensor, batch: int, channels: int, k, out_hw) -> None:
    expected = (batch, k[0], k[1], out_hw[0], out_hw[1])
    got = (kernel.shape[0],) + tuple(kernel.shape[2:])
    if kernel.dim() != 6 or got != expected or kernel.shape[1] not in (1, channels):
        raise ValueError(f'kernel must be (B, 1 or C, kh, kw, H\', W\') = {expected}, got {tuple(kernel.shape)}')


def _accumulate(out: torch.Tensor, y: int, x: int, taps: torch.Tensor, weight_taps: torch.Tensor,
                groups: int, shared_filters: bool) -> None:
    """out[:, :, y, x] += filtered taps; taps (B, C, kh, kw), weight_taps (O, C/groups, kh, kw)."""
    if shared_filters:  # one filter applied to every channel on its own
        out[:, :, y, x] += (taps * weight_taps[0, 0]).sum((2, 3))
        return
    in_per_group = taps.shape[1] // groups
    out_per_group = out.shape[1] // groups
    for g in range(groups):
        group_taps = taps[:, g * in_per_group:(g + 1) * in_per_group]
        group_weight = weight_taps[g * out_per_group:(g + 1) * out_per_group]
        group_out = torch.einsum('bcij,ocij->bo', group_taps, group_weight)
        out[:, g * out_per_group:(g + 1) * out_per_group, y, x] += group_out


def _add_bias(out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


def ref_pacconv2d(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                  dilation: IntPair = 1, shared_filters: bool = False, groups: int = 1,
                  padding_mode: str = 'zeros') -> torch.Tensor:
    """out[b,o,y,x] = bias[o] + sum_{c in group(o)} sum_{ij} W[o,c,i,j] K[b,.,i,j,y,x] X[b,c,y*s+i*d-p,x*s+j*d-p].

    ``weight`` is (O, C/groups, kh, kw), or (1, 1, kh, kw) with ``shared_filters`` (then O = C).
    """
    s, p, d = map(pair, (stride, padding, dilation))
    k = tuple(weight.shape[-2:])
    batch, channels, h, w = input.shape
    out_hw = tuple(conv_out_size(n, *a) for n, a in zip((h, w), zip(k, s, p, d)))
    _check_kernel(kernel, batch, channels, k, out_hw)
    out_channels = channels if shared_filters else weight.shape[0]
    out = input.new_zeros(batch, out_channels, *out_hw)
    for y in range(out_hw[0]):
        for x in range(out_hw[1]):
            taps = input.new_zeros(batch, channels, *k)
            for i in range(k[0]):
                for j in range(k[1]):
                    pos = (y * s[0] + i * d[0] - p[0], x * s[1] + j * d[1] - p[1])
                    taps[:, :, i, j] = read_pixel(input, *pos, p, padding_mode) * kernel[:, :, i, j, y, x]
            _accumulate(out, y, x, taps, weight, groups, shared_filters)
    return _add_bias(out, bias)


def ref_pacconv_transpose2d(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor] = None, stride: IntPair = 1,
                            padding: IntPair = 0, output_padding: IntPair = 0, dilation: IntPair = 1,
                            shared_filters: bool = False, groups: int = 1) -> torch.Tensor:
    """Transposed PAC with the no-flip weight convention of spec 1.4.

    out[b,o,y,x] = bias[o] + sum_c sum_{ij} W[c,o,i,j] K[b,.,i,j,y,x] Zpad[b,c,y+i*d,x+j*d], where Z
    is the zero-inserted input padded by d*(k-1)-p (plus ``output_padding`` at the far side).
    ``weight`` is (C, O/groups, kh, kw) as in nn.ConvTranspose2d, or (1, 1, kh, kw) if shared.
    """
    s, p, op, d = map(pair, (stride, padding, output_padding, dilation))
    k = tuple(weight.shape[-2:])
    batch, channels, h, w = input.shape
    out_hw = tuple(conv_transpose_out_size(n, *a) for n, a in zip((h, w), zip(k, s, p, op, d)))
    _check_kernel(kernel, batch, channels, k, out_hw)
    if shared_filters:
        conv_weight = weight
    else:  # (C, O/g, kh, kw) -> (O, C/g, kh, kw), same spatial orientation (no flip)
        in_per_group = channels // groups
        conv_weight = torch.cat([weight[g * in_per_group:(g + 1) * in_per_group].transpose(0, 1)
                                 for g in range(groups)], 0)
    out = input.new_zeros(batch, channels if shared_filters else conv_weight.shape[0], *out_hw)
    for y in range(out_hw[0]):
        for x in range(out_hw[1]):
            taps = input.new_zeros(batch, channels, *k)
            for i in range(k[0]):
                for j in range(k[1]):
                    source = _transposed_source(y, x, i, j, (h, w), k, s, p, d)
                    if source is not None:
                        taps[:, :, i, j] = input[:, :, source[0], source[1]] * kernel[:, :, i, j, y, x]
            _accumulate(out, y, x, taps, conv_weight, groups, shared_filters)
    return _add_bias(out, bias)


def ref_pacpool2d(input: torch.Tensor, kernel: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1,
                  padding: IntPair = 0, dilation: IntPair = 1) -> torch.Tensor:
    """Weighted sum out[b,c,y,x] = sum_{ij} K[b,0 or c,i,j,y,x] X[b,c,y*s+i*d-p,x*s+j*d-p] (zero padding)."""
    k, s, p, d = map(pair, (kernel_size, stride, padding, dilation))
    batch, channels, h, w = input.shape
    out_hw = tuple(conv_out_size(n, *a) for n, a in zip((h, w), zip(k, s, p, d)))
    _check_kernel(kernel, batch, channels, k, out_hw)
    out = input.new_zeros(batch, channels, *out_hw)
    for y in range(out_hw[0]):
        for x in range(out_hw[1]):
            for i in range(k[0]):
                for j in range(k[1]):
                    pos = (y * s[0] + i * d[0] - p[0], x * s[1] + j * d[1] - p[1])
                    out[:, :, y, x] += read_pixel(input, *pos) * kernel[:, :, i, j, y, x]
    return out


def ref_im2col(input: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0,
               dilation: IntPair = 1, transposed: bool = False, output_padding: IntPair = 0) -> torch.Tensor:
    """(B, C, kh, kw, H', W') columns of the zero-padded image, or of the zero-inserted one if transposed."""
    k, s, p, d, op = map(pair, (kernel_size, stride, padding, dilation, output_padding))
    size = input.shape[-2:]
    if transposed:
        out_hw = tuple(conv_transpose_out_size(n, *a) for n, a in zip(size, zip(k, s, p, op, d)))
    else:
        out_hw = tuple(conv_out_size(n, *a) for n, a in zip(size, zip(k, s, p, d)))
    cols = input.new_zeros(*input.shape[:2], *k, *out_hw)
    for y in range(out_hw[0]):
        for x in range(out_hw[1]):
            for i in range(k[0]):
                for j in range(k[1]):
                    if transposed:
                        source = _transposed_source(y, x, i, j, size, k, s, p, d)
                        if source is not None:
                            cols[:, :, i, j, y, x] = input[:, :, source[0], source[1]]
                    else:
                        cols[:, :, i, j, y, x] = read_pixel(input, y * s[0] + i * d[0] - p[0],
                                                            x * s[1] + j * d[1] - p[1])
    return cols


def smoothing_kernel(smooth_kernel_type: str, dtype=torch.float64) -> Optional[torch.Tensor]:
    """The (1, 1, ss, ss) smoothing kernel a module registers for ``smooth_kernel_type`` (spec 1.3)."""
    if smooth_kernel_type == 'none':
        return None
    if smooth_kernel_type == 'gaussian':
        g = torch.tensor([0.25, 0.5, 0.25], dtype=dtype)
        return torch.outer(g, g).reshape(1, 1, 3, 3)
    name, width = smooth_kernel_type.rsplit('_', 1)
    if name in ('average', 'full'):
        width = int(width)
        return torch.full((1, 1, width, width), 1.0 / width ** 2, dtype=dtype)
    raise ValueError(f'unknown smooth_kernel_type {smooth_kernel_type!r}')


def gaussian_2d(width: int, sigma: float = -1.0) -> List[List[float]]:
    """Normalised 2-D Gaussian of odd ``width`` (sigma defaults to width / 4), as nested lists."""
    sigma = width / 4 if sigma <= 0 else sigma
    g = [math.exp(-r * r / (2 * sigma * sigma)) for r in range(-(width // 2), width // 2 + 1)]
    total = sum(g) ** 2
    return [[a * b / total for b in g] for a in g]
