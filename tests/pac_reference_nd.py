"""Brute-force reference of pixel-adaptive convolution in any number of spatial dimensions.

The N-d twin of ``pac_reference.py`` (same conventions, read its docstring), written from the
equations only and used as the oracle of the 3-D layers. It never calls ``unfold``, ``fold`` or any
convolution: every output position and every kernel tap is visited by an explicit loop
(``itertools.product``) and read with an explicit index rule. Slow; meant for tiny float64 inputs.

With n spatial dimensions, k kernel size, s stride, p padding, d dilation (all n-tuples), and an
output position ``y`` and a tap ``t`` (n-tuples):

* non-transposed: tap t of output y reads position ``y*s + t*d - p`` (per dimension); the centre
  tap is ``k // 2``.
* transposed: the adaptive kernel lives at the output resolution (stride 1, "same" padding): tap t
  of output y reads the guide at ``y + (t - k//2)*d``; the data is read from the zero-inserted
  input Z padded by ``P = d*(k-1) - p``, i.e. tap t reads ``Z[y + t*d - P]``, a real input pixel
  only when that index is a multiple of s inside the input. The weight is not flipped.

Kernel: ``D = sum_c (F_c(tap) - F_c(centre))^2`` (per channel with ``channel_wise``; with ``_asym``
only positive differences count); 'gaussian' -> ``exp(-D/2)``; 'inv_{a}_{l}' -> ``a + (D + 1e-4)^(l/2)``.
A smoothing kernel replaces ``F(centre)`` by the guide correlated with it on a window (unit spacing)
centred on the centre-tap position. Mask and normalisation: ``K *= M`` (mask value of the voxel each
tap reads, 0 on padding and inserted zeros); without ``normalize_kernel`` ``K /= mean of M over the
taps that hit real voxels``; with it ``K /= sum of K`` (``K`` first restricted to real taps when
there is no mask); a zero divisor becomes 1, and the output mask is ``divisor != 0``.

``padding_mode`` other than 'zeros' (non-transposed only): input, guide and mask are first padded
by ``padding`` with that mode and then treated as a padding-free image, so padded taps hold real
values and count as valid. Reads beyond that padded border (only a large smoothing window can
reach them) are zero.
"""
import itertools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

# the per-axis geometry, the padding rule and the kernel-type grammar are those of the 2-D reference
from pac_reference import (PADDING_MODES, conv_out_size, conv_transpose_in_size, conv_transpose_out_size,
                           parse_kernel_type, source_index)

IntTuple = Union[int, Sequence[int]]


# ---------------------------------------------------------------- geometry


def ntuple(value: IntTuple, n: int) -> Tuple[int, ...]:
    """``value`` as an n-tuple of ints (an int is repeated)."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f'expected an int or {n} values, got {value}')
    return value


def positions(shape: Sequence[int]):
    """Every index tuple of a grid of this shape, in raster order."""
    return itertools.product(*(range(n) for n in shape))


def tap_position(out_pos, tap, k, s, p, d, transposed: bool) -> Tuple[int, ...]:
    """Guide position read by ``tap`` of output ``out_pos``."""
    if transposed:  # stride 1, "same" padding at the output resolution
        return tuple(y + (t - kk // 2) * dd for y, t, kk, dd in zip(out_pos, tap, k, d))
    return tuple(y * ss + t * dd - pp for y, t, ss, pp, dd in zip(out_pos, tap, s, p, d))


def centre_position(out_pos, k, s, p, d, transposed: bool) -> Tuple[int, ...]:
    """Guide position of the centre tap of output ``out_pos``."""
    return tap_position(out_pos, tuple(kk // 2 for kk in k), k, s, p, d, transposed)


def transposed_source(out_pos, tap, in_size, k, s, p, d) -> Optional[Tuple[int, ...]]:
    """Input voxel read by ``tap`` of transposed output ``out_pos``, or None on an inserted/padded zero."""
    source = []
    for y, t, size, kk, ss, pp, dd in zip(out_pos, tap, in_size, k, s, p, d):
        z = y + t * dd - (dd * (kk - 1) - pp)  # index into the zero-inserted input
        if z < 0 or z % ss != 0 or z // ss >= size:
            return None
        source.append(z // ss)
    return tuple(source)


def source_voxel(pos, size, pad, padding_mode: str) -> Optional[Tuple[int, ...]]:
    """The image voxel a position reads (after padding), or None for a zero read."""
    index = tuple(source_index(q, n, pp, padding_mode) for q, n, pp in zip(pos, size, pad))
    return None if any(i is None for i in index) else index


def read_voxel(image: torch.Tensor, pos, pad=None, padding_mode: str = 'zeros') -> torch.Tensor:
    """``image[:, :, *pos]`` of shape (B, C), with out-of-image positions resolved by ``padding_mode``."""
    size = image.shape[2:]
    index = source_voxel(pos, size, pad or (0,) * len(size), padding_mode)
    if index is None:
        return image.new_zeros(image.shape[:2])
    return image[(slice(None), slice(None)) + index]


# ---------------------------------------------------------------- the adaptive kernel


def _kernel_function(dist: torch.Tensor, family: str, alpha, lam) -> torch.Tensor:
    if family == 'gaussian':
        return torch.exp(-0.5 * dist)
    return alpha + (dist + 1e-4) ** (lam / 2)


def _as_channel_vector(value, channel_wise: bool, dtype) -> Optional[torch.Tensor]:
    """alpha / lambda as a tensor broadcastable against (B, C): scalar or (1, C)."""
    if value is None:
        return None
    value = torch.as_tensor(value, dtype=dtype)
    return value.reshape(1, -1) if (channel_wise and value.dim() == 1) else value


def smoothed_centre(guide: torch.Tensor, centre, smooth_kernel: torch.Tensor, pad, padding_mode: str) -> torch.Tensor:
    """Every guide channel correlated with ``smooth_kernel`` (1, 1, *window) centred on ``centre``: (B, C)."""
    window = smooth_kernel.shape[2:]
    acc = guide.new_zeros(guide.shape[:2])
    for offset in positions(window):
        pos = tuple(c + o - w // 2 for c, o, w in zip(centre, offset, window))
        acc = acc + smooth_kernel[(0, 0) + offset] * read_voxel(guide, pos, pad, padding_mode)
    return acc


def _divisor(norm: torch.Tensor) -> torch.Tensor:
    return torch.where(norm == 0, norm + 1, norm)


def ref_kernel_nd(guide: torch.Tensor, kernel_size: IntTuple, stride: IntTuple = 1, padding: IntTuple = 0,
                  dilation: IntTuple = 1, kernel_type: str = 'gaussian',
                  smooth_kernel: Optional[torch.Tensor] = None, inv_alpha=None, inv_lambda=None,
                  channel_wise: bool = False, normalize_kernel: bool = False, transposed: bool = False,
                  output_padding: IntTuple = 0, mask: Optional[torch.Tensor] = None,
                  padding_mode: str = 'zeros') -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Adaptive kernel K of shape (B, 1 or Cg, *k, *out) and the output mask (or None).

    ``guide`` is (B, Cg, *size): the layer's input size, or its output size when ``transposed``.
    ``inv_alpha`` / ``inv_lambda`` default to the numbers in ``kernel_type``; pass tensors of shape
    (Cg,) for per-channel values with ``channel_wise``. ``mask`` is (B or 1, 1, *in_size) at the
    layer's input size. The output mask is (B, 1, *out) for a masked unnormalised kernel and
    (B, Ck, *out) for a normalised one, 1.0 where the divisor is non-zero.
    """
    n = guide.dim() - 2
    k, s, p, d, op = (ntuple(v, n) for v in (kernel_size, stride, padding, dilation, output_padding))
    if padding_mode not in PADDING_MODES:
        raise ValueError(f'unknown padding_mode {padding_mode!r}')
    if padding_mode != 'zeros' and transposed:
        raise ValueError('padding_mode is defined for non-transposed kernels only')
    family, alpha, lam, asym = parse_kernel_type(kernel_type)
    alpha = _as_channel_vector(alpha if inv_alpha is None else inv_alpha, channel_wise, guide.dtype)
    lam = _as_channel_vector(lam if inv_lambda is None else inv_lambda, channel_wise, guide.dtype)
    batch, guide_channels = guide.shape[:2]
    size = tuple(guide.shape[2:])
    if transposed:
        out_size = size
        in_size = tuple(conv_transpose_in_size(m, *a) for m, a in zip(size, zip(k, s, p, op, d)))
    else:
        out_size = tuple(conv_out_size(m, *a) for m, a in zip(size, zip(k, s, p, d)))
        in_size = size
    if mask is not None:
        if mask.dim() != n + 2 or mask.shape[0] not in (1, batch) or tuple(mask.shape[1:]) != (1,) + in_size:
            raise ValueError(f'mask must be ({batch} or 1, 1, *{in_size}), got {tuple(mask.shape)}')
        mask = mask.to(guide.dtype).expand(batch, *mask.shape[1:])
    kernel_channels = guide_channels if channel_wise else 1
    kernel = guide.new_zeros(batch, kernel_channels, *k, *out_size)
    pattern = guide.new_zeros(1, 1, *k, *out_size)     # 1 where a tap reads a real voxel
    mask_cols = guide.new_zeros(batch, 1, *k, *out_size)
    all_ = (slice(None), slice(None))
    for out_pos in positions(out_size):
        centre = centre_position(out_pos, k, s, p, d, transposed)
        if smooth_kernel is None:
            centre_feature = read_voxel(guide, centre, p, padding_mode)
        else:
            centre_feature = smoothed_centre(guide, centre, smooth_kernel, p, padding_mode)
        for tap in positions(k):
            delta = read_voxel(guide, tap_position(out_pos, tap, k, s, p, d, transposed), p, padding_mode)
            delta = delta - centre_feature
            if asym:
                delta = delta.clamp(min=0)
            dist = delta ** 2 if channel_wise else (delta ** 2).sum(1, keepdim=True)
            kernel[all_ + tap + out_pos] = _kernel_function(dist, family, alpha, lam)
            if transposed:
                source = transposed_source(out_pos, tap, in_size, k, s, p, d)
            else:
                source = source_voxel(tap_position(out_pos, tap, k, s, p, d, False), in_size, p, padding_mode)
            if source is not None:
                pattern[(0, 0) + tap + out_pos] = 1
                if mask is not None:
                    mask_cols[(slice(None), 0) + tap + out_pos] = mask[(slice(None), 0) + source]
    taps_dims = tuple(range(2, 2 + n))
    expand_taps = (slice(None), slice(None)) + (None,) * n  # (B, C, *out) -> (B, C, 1.., *out)
    out_mask = None
    if mask is not None:
        kernel = kernel * mask_cols
        if not normalize_kernel:
            valid = pattern.sum(taps_dims)
            norm = mask_cols.sum(taps_dims) / torch.where(valid == 0, torch.ones_like(valid), valid)
            kernel = kernel / _divisor(norm)[expand_taps]
            out_mask = (norm != 0).to(guide.dtype)
    if normalize_kernel:
        if mask is None:
            kernel = kernel * pattern
        norm = kernel.sum(taps_dims)
        kernel = kernel / _divisor(norm)[expand_taps]
        if mask is not None:
            out_mask = (norm != 0).to(guide.dtype)
    return kernel, out_mask


# ---------------------------------------------------------------- filtering with a given kernel


def _check_kernel(kernel: torch.Tensor, batch: int, channels: int, k, out_size) -> None:
    n = len(k)
    expected = (batch,) + tuple(k) + tuple(out_size)
    got = (kernel.shape[0],) + tuple(kernel.shape[2:])
    if kernel.dim() != 2 + 2 * n or got != expected or kernel.shape[1] not in (1, channels):
        raise ValueError(f'kernel must be (B, 1 or C, *k, *out) with (B, *k, *out) = {expected}, '
                         f'got {tuple(kernel.shape)}')


def _accumulate(out: torch.Tensor, out_pos, taps: torch.Tensor, weight: torch.Tensor, groups: int,
                shared_filters: bool) -> None:
    """out[:, :, *out_pos] += filtered taps; taps (B, C, *k), weight (O, C/groups, *k)."""
    index = (slice(None), slice(None)) + tuple(out_pos)
    taps = taps.flatten(2)
    if shared_filters:  # one filter applied to every channel on its own
        out[index] += (taps * weight.flatten(2)[0, 0]).sum(2)
        return
    weight = weight.flatten(2)
    in_per_group, out_per_group = taps.shape[1] // groups, out.shape[1] // groups
    group_outs = []
    for g in range(groups):
        group_taps = taps[:, g * in_per_group:(g + 1) * in_per_group]
        group_weight = weight[g * out_per_group:(g + 1) * out_per_group]
        group_outs.append((group_taps[:, None] * group_weight[None]).sum((2, 3)))  # (B, O/groups)
    out[index] += torch.cat(group_outs, 1)


def _add_bias(out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if bias is None:
        return out
    return out + bias.reshape((1, -1) + (1,) * (out.dim() - 2))


def ref_pacconv_nd(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, stride: IntTuple = 1, padding: IntTuple = 0,
                   dilation: IntTuple = 1, shared_filters: bool = False, groups: int = 1,
                   padding_mode: str = 'zeros') -> torch.Tensor:
    """out[b,o,y] = bias[o] + sum_{c in group(o)} sum_t W[o,c,t] K[b,.,t,y] X[b,c,y*s+t*d-p].

    ``weight`` is (O, C/groups, *k), or (1, 1, *k) with ``shared_filters`` (then O = C).
    """
    n = input.dim() - 2
    s, p, d = (ntuple(v, n) for v in (stride, padding, dilation))
    k = tuple(weight.shape[2:])
    batch, channels = input.shape[:2]
    out_size = tuple(conv_out_size(m, *a) for m, a in zip(input.shape[2:], zip(k, s, p, d)))
    _check_kernel(kernel, batch, channels, k, out_size)
    out = input.new_zeros(batch, channels if shared_filters else weight.shape[0], *out_size)
    all_ = (slice(None), slice(None))
    for out_pos in positions(out_size):
        taps = input.new_zeros(batch, channels, *k)
        for tap in positions(k):
            pos = tap_position(out_pos, tap, k, s, p, d, False)
            taps[all_ + tap] = read_voxel(input, pos, p, padding_mode) * kernel[all_ + tap + out_pos]
        _accumulate(out, out_pos, taps, weight, groups, shared_filters)
    return _add_bias(out, bias)


def ref_pacconv_transpose_nd(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor] = None, stride: IntTuple = 1, padding: IntTuple = 0,
                             output_padding: IntTuple = 0, dilation: IntTuple = 1, shared_filters: bool = False,
                             groups: int = 1) -> torch.Tensor:
    """Transposed PAC with the no-flip weight convention.

    out[b,o,y] = bias[o] + sum_c sum_t W[c,o,t] K[b,.,t,y] Zpad[b,c,y+t*d], Z the zero-inserted input
    padded by d*(k-1)-p (plus ``output_padding`` at the far side). ``weight`` is (C, O/groups, *k)
    as in nn.ConvTranspose3d, or (1, 1, *k) with ``shared_filters``.
    """
    n = input.dim() - 2
    s, p, op, d = (ntuple(v, n) for v in (stride, padding, output_padding, dilation))
    k = tuple(weight.shape[2:])
    batch, channels = input.shape[:2]
    in_size = tuple(input.shape[2:])
    out_size = tuple(conv_transpose_out_size(m, *a) for m, a in zip(in_size, zip(k, s, p, op, d)))
    _check_kernel(kernel, batch, channels, k, out_size)
    if shared_filters:
        conv_weight = weight
    else:  # (C, O/g, *k) -> (O, C/g, *k), same spatial orientation (no flip)
        in_per_group = channels // groups
        conv_weight = torch.cat([weight[g * in_per_group:(g + 1) * in_per_group].transpose(0, 1)
                                 for g in range(groups)], 0)
    out = input.new_zeros(batch, channels if shared_filters else conv_weight.shape[0], *out_size)
    all_ = (slice(None), slice(None))
    for out_pos in positions(out_size):
        taps = input.new_zeros(batch, channels, *k)
        for tap in positions(k):
            source = transposed_source(out_pos, tap, in_size, k, s, p, d)
            if source is not None:
                taps[all_ + tap] = input[all_ + source] * kernel[all_ + tap + out_pos]
        _accumulate(out, out_pos, taps, conv_weight, groups, shared_filters)
    return _add_bias(out, bias)


def ref_pacpool_nd(input: torch.Tensor, kernel: torch.Tensor, kernel_size: IntTuple, stride: IntTuple = 1,
                   padding: IntTuple = 0, dilation: IntTuple = 1) -> torch.Tensor:
    """Weighted sum out[b,c,y] = sum_t K[b,0 or c,t,y] X[b,c,y*s+t*d-p] (zero padding)."""
    n = input.dim() - 2
    k, s, p, d = (ntuple(v, n) for v in (kernel_size, stride, padding, dilation))
    batch, channels = input.shape[:2]
    out_size = tuple(conv_out_size(m, *a) for m, a in zip(input.shape[2:], zip(k, s, p, d)))
    _check_kernel(kernel, batch, channels, k, out_size)
    out = input.new_zeros(batch, channels, *out_size)
    all_ = (slice(None), slice(None))
    for out_pos in positions(out_size):
        for tap in positions(k):
            pos = tap_position(out_pos, tap, k, s, p, d, False)
            out[all_ + out_pos] += read_voxel(input, pos) * kernel[all_ + tap + out_pos]
    return out


# ---------------------------------------------------------------- registered tensors and fillers


def smoothing_kernel_nd(smooth_kernel_type: str, n: int = 3, dtype=torch.float64) -> Optional[torch.Tensor]:
    """The (1, 1, w, .., w) smoothing kernel a module registers for ``smooth_kernel_type`` ('full_w' at init)."""
    if smooth_kernel_type == 'none':
        return None
    if smooth_kernel_type == 'gaussian':
        profile = [0.25, 0.5, 0.25]
        values = [math.prod(profile[i] for i in index) for index in positions((3,) * n)]
        return torch.tensor(values, dtype=dtype).reshape((1, 1) + (3,) * n)
    name, width = smooth_kernel_type.rsplit('_', 1)
    if name in ('average', 'full'):
        width = int(width)
        return torch.full((1, 1) + (width,) * n, 1.0 / width ** n, dtype=dtype)
    raise ValueError(f'unknown smooth_kernel_type {smooth_kernel_type!r}')


def gaussian_nd(width: int, n: int = 3, sigma: float = -1.0) -> torch.Tensor:
    """Normalised n-d Gaussian of odd ``width`` (sigma defaults to width / 4), float64 (width,) * n."""
    sigma = width / 4 if sigma <= 0 else sigma
    g = [math.exp(-r * r / (2 * sigma * sigma)) for r in range(-(width // 2), width // 2 + 1)]
    values = [math.prod(g[i] for i in index) for index in positions((width,) * n)]
    return torch.tensor(values, dtype=torch.float64).reshape((width,) * n) / sum(g) ** n


def linear_profile(k: int, s: int, normalize_kernel: bool = False) -> List[float]:
    """The 1-D triangle of the 'linear' (bilinear upsampling) filler for kernel size k and stride s.

    [0]*q + [1, 2, .., s, .., 2, 1] / s + [0]*q with q = (k - (2s - 1)) // 2; with ``normalize_kernel``
    tap j is multiplied by the number of input pixels its phase sees, (k-j-1)//s + j//s + 1.
    """
    q = (k - (2 * s - 1)) // 2
    profile = [0.0] * q + [t / s for t in range(1, s + 1)] + [t / s for t in range(s - 1, 0, -1)] + [0.0] * q
    if normalize_kernel:
        profile = [v * ((k - j - 1) // s + j // s + 1) for j, v in enumerate(profile)]
    return profile
