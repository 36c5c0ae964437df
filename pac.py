"""Pixel-Adaptive Convolution (PAC) layers for PyTorch.

A clean-room implementation of the layers of "Pixel-Adaptive Convolutional Neural Networks"
(Su et al., CVPR 2019), keeping the public interface, defaults and state_dict layout of the 2019 code.

A PAC layer filters its input with a spatially invariant weight ``W`` modulated, at every output
pixel and tap, by an adaptive kernel ``K`` computed from a guide ``F``::

    out[b, o, y, x] = bias[o] + sum_{c, i, j} W[o, c, i, j] * K[b, i, j, y, x] * X[b, c, y*s + i*d - p, x*s + j*d - p]
    K[b, i, j, y, x] = f( sum_c (F[b, c, tap(i, j)] - F[b, c, centre])^2 )

with ``f(D) = exp(-D / 2)`` ('gaussian') or ``f(D) = alpha + (D + 1e-4)^(lambda / 2)`` ('inv_*').
The 3-D layers (``PacConv3d``, ``PacConvTranspose3d``, ``PacPool3d``, ``packernel3d``) are the same equations
over ``(D, H, W)``, on the same engine: its geometry is per spatial axis, and the 2-D and 3-D functions and modules
are thin front ends over it.

Every layer and functional form takes ``impl``:

- ``'taps'`` (what ``'auto'`` runs on CPU): registered ``torch.library`` ops (``pac::filter``,
  ``pac::kernel`` and their backward ops). They work band by band over the first output axis; for each
  band a few large operations compute the kernel from the guide, modulate the input windows and
  apply the weight as one matrix product. ``K`` is never stored and backward recomputes it; each band
  reads zero-padded copies of just the rows it needs, so no padded copy of a whole input or gradient is
  made and the extra memory is one band. On a CPU the element-wise passes over a band's taps (guide distances,
  modulation, pooling and their gradients) are plain C loops from :mod:`pac_cpu`, compiled on first
  use; without a C compiler the same steps run as torch operations. Transposed convolutions are
  computed one output phase at a time (each tap reads a stride-1 window of the input), so they never
  pay for zero insertion.
- ``'unfold'`` (the 2019 flag ``native_impl=True``): plain autograd through ``unfold``, the readable
  reference. It materialises the unfolded input ``[B, C, k*k, H', W']``. ONNX and TorchScript
  tracing always run it.
- ``'triton'`` (what ``'auto'`` runs on CUDA when :mod:`pac_triton` supports the options): fused
  GPU kernels.

All implementations support every option, agree to float rounding, and run under ``torch.autocast``
(the adaptive kernel is always computed in float32), ``torch.compile``, ``torch.export`` and
``torch.func``.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import pac_cpu

__all__ = [
    "PacConv2d", "PacConvTranspose2d", "PacPool2d",
    "pacconv2d", "pacconv_transpose2d", "pacpool2d", "packernel2d",
    "PacConv3d", "PacConvTranspose3d", "PacPool3d",
    "pacconv3d", "pacconv_transpose3d", "pacpool3d", "packernel3d",
    "nd2col", "np_gaussian_2d",
]

IntPair = Union[int, Tuple[int, int]]
IntTriple = Union[int, Tuple[int, int, int]]
_SPATIAL_NAMES = {2: "H, W", 3: "D, H, W"}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

IMPLS = ("auto", "unfold", "taps", "triton")

# Size of the largest temporary of one band of the 'taps' path (the modulated input windows). On a CPU,
# large enough that each band's fixed costs (Python, a dozen small torch operations) are small against its work,
# and small enough to keep the extra memory a fraction of the activations (2 and 4 MB ran equally fast in the
# layer benchmark; 1 MB was slower); on a GPU, large enough to fill the device.
_CPU_BAND_BYTES = 2 << 20
_GPU_BAND_BYTES = 256 << 20


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def np_gaussian_2d(width: int, sigma: float = -1) -> np.ndarray:
    """Normalised 2-D Gaussian of odd ``width`` (``sigma <= 0`` means ``width / 4``), float32."""
    return _np_gaussian(width, 2, sigma)


def _np_gaussian(width: int, dims: int, sigma: float = -1) -> np.ndarray:
    """Normalised ``dims``-D Gaussian of odd ``width`` (``sigma <= 0`` means ``width / 4``), float32."""
    if width % 2 != 1:
        raise ValueError(f"width must be odd, got {width}")
    if sigma <= 0:
        sigma = float(width) / 4
    r = np.arange(-(width // 2), width // 2 + 1, dtype=np.float32)
    g = np.exp(-r ** 2 / (2 * sigma ** 2))
    gn = functools.reduce(np.multiply.outer, [g] * dims)
    return (gn / gn.sum()).astype(np.float32)


def _check_dims(name: str, t: torch.Tensor, dims: int) -> None:
    """``t`` must be a tensor ``(B, C, *spatial)`` with ``dims`` spatial dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims + 2:
        raise ValueError(f"{name} must be {dims + 2}-D (B, C, {_SPATIAL_NAMES[dims]}), got shape {tuple(t.shape)}")


def _check_4d(name: str, t: torch.Tensor) -> None:
    _check_dims(name, t, 2)


def _conv_out_size(size, k, s, p, d, name: str = "input") -> Tuple[int, ...]:
    """Output size of a (non-transposed) convolution or pooling; ValueError if it would be empty."""
    out = tuple((size[a] + 2 * p[a] - d[a] * (k[a] - 1) - 1) // s[a] + 1 for a in range(len(k)))
    if min(out) <= 0:
        raise ValueError(f"{name} of size {tuple(size)} is too small for kernel_size={k}, stride={s}, padding={p}, "
                         f"dilation={d}")
    return out


def _transposed_out_size(size, k, s, p, op, d) -> Tuple[int, ...]:
    """Output size of a transposed convolution; ValueError if it would be empty."""
    out = tuple((size[a] - 1) * s[a] - 2 * p[a] + d[a] * (k[a] - 1) + 1 + op[a] for a in range(len(k)))
    if min(out) <= 0:
        raise ValueError(f"input of size {tuple(size)} gives an empty output for kernel_size={k}, stride={s}, "
                         f"padding={p}, output_padding={op}, dilation={d}")
    return out


def _transposed_in_size(size: int, k: int, s: int, p: int, op: int, d: int) -> int:
    return (size - 1 - op + 2 * p - d * (k - 1)) // s + 1


def _torch_pads(before, after=None) -> Tuple[int, ...]:
    """Per-axis padding ``(before, after)`` in :func:`F.pad`'s order (last axis first)."""
    after = before if after is None else after
    return tuple(v for a in reversed(range(len(before))) for v in (before[a], after[a]))


def _pad(x: torch.Tensor, padding: Tuple[int, ...], mode: str = "zeros") -> torch.Tensor:
    if not any(padding):
        return x
    if mode == "zeros":
        return F.pad(x, _torch_pads(padding))
    return F.pad(x, _torch_pads(padding), mode=mode)


def _geometry(dims: int, **values) -> Tuple[Tuple[int, ...], ...]:
    """Each of ``values`` (kernel_size=..., stride=...) as a ``dims``-tuple: an int is repeated, a sequence
    must have ``dims`` entries."""
    result = []
    for name, value in values.items():
        if isinstance(value, (int, np.integer)):
            result.append((int(value),) * dims)
            continue
        try:
            entries = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            entries = ()
        if len(entries) != dims:
            raise ValueError(f"{name} must be an int or a sequence of {dims} ints, got {value!r}")
        result.append(entries)
    return tuple(result)


def _strided(start: int, count: int, step: int) -> slice:
    return slice(start, start + step * (count - 1) + 1, step)


def _centre_index(k, d, out_size, step) -> tuple:
    """Index of every window's centre tap in the padded guide (windows ``step`` apart)."""
    return (slice(None), slice(None), *(_strided(k[i] // 2 * d[i], out_size[i], step[i]) for i in range(len(k))))


def _zero_insert(x: torch.Tensor, stride: Tuple[int, ...]) -> torch.Tensor:
    if all(v == 1 for v in stride):
        return x
    z = x.new_zeros(*x.shape[:2], *((n - 1) * s + 1 for n, s in zip(x.shape[2:], stride)))
    z[(slice(None), slice(None), *(slice(None, None, s) for s in stride))] = x
    return z


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None (works on torch 2.1 and later)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def _cast_all(dtype: Optional[torch.dtype], *tensors):
    if dtype is None:
        return tensors
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


# ----------------------------------------------------------------------------------------------
# nd2col
# ----------------------------------------------------------------------------------------------

def nd2col(input_nd: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0,
           output_padding: IntPair = 0, dilation: IntPair = 1, transposed: bool = False,
           use_pyinn_if_possible: bool = False) -> torch.Tensor:
    """im2col returning ``(N, C, kh, kw, H', W')`` for a 4-D input, ``(N, C, kd, kh, kw, D', H', W')`` for a 5-D one.

    Non-transposed: the windows of a zero-padded convolution. Transposed: the windows of the
    equivalent stride-1 convolution over the zero-inserted, padded input, so ``(H', W')`` is the
    transposed-convolution output size. ``use_pyinn_if_possible`` is accepted for compatibility and
    ignored.

    Example:
        >>> nd2col(torch.ones(1, 2, 4, 4), 3, padding=1).shape
        torch.Size([1, 2, 3, 3, 4, 4])
    """
    if not isinstance(input_nd, torch.Tensor):
        raise TypeError(f"input_nd must be a torch.Tensor, got {type(input_nd).__name__}")
    if input_nd.dim() not in (4, 5):
        raise ValueError(f"input_nd must be 4-D (B, C, H, W) or 5-D (B, C, D, H, W), got shape {tuple(input_nd.shape)}")
    dims = input_nd.dim() - 2
    k, s, p, op, d = _geometry(dims, kernel_size=kernel_size, stride=stride, padding=padding,
                               output_padding=output_padding, dilation=dilation)
    if transposed:
        return _windows(_transposed_padded_input(input_nd, k, s, p, op, d), k, (1,) * dims, d)
    _conv_out_size(input_nd.shape[2:], k, s, p, d)
    return _windows(_pad(input_nd, p), k, s, d)


def _windows(x: torch.Tensor, k, s, d) -> torch.Tensor:
    """The windows ``(N, C, *k, *out)`` of a convolution over the (already padded) ``x``."""
    n, c = x.shape[:2]
    dims = len(k)
    out = _conv_out_size(x.shape[2:], k, s, (0,) * dims, d)
    if dims == 2:  # F.unfold: the form that ONNX and TorchScript translate
        return F.unfold(x, k, dilation=d, stride=s).view(n, c, *k, *out)
    v = x
    for a in range(dims):
        v = v.unfold(2 + a, (k[a] - 1) * d[a] + 1, s[a])
    v = v[(..., *(slice(None, None, step) for step in d))]  # (N, C, *out, *k)
    return v.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))


def _transposed_padded_input(x, k, s, p, op, d):
    """Zero-insert by the stride and pad by ``(k-1)d - p`` (plus output_padding at the far side);
    negative amounts crop."""
    before = tuple((k[a] - 1) * d[a] - p[a] for a in range(len(k)))
    return F.pad(_zero_insert(x, s), _torch_pads(before, tuple(b + o for b, o in zip(before, op))))


# ----------------------------------------------------------------------------------------------
# The 'unfold' path's building blocks and the option parsers
# ----------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tap_dims(t: torch.Tensor) -> Tuple[int, ...]:
    """The tap dimensions of a ``(B, C, *taps, *out)`` tensor."""
    return tuple(range(2, 2 + (t.dim() - 2) // 2))


def _native_taps(cols, kernel, weight, bias, groups):
    """Readable reference: ``cols`` is the unfolded input (B, C, *k, *out)."""
    cols = cols * kernel
    if weight is None:
        return cols.sum(_tap_dims(cols))
    b, c = cols.shape[:2]
    dims = len(_tap_dims(cols))
    out_size = cols.shape[2 + dims:]
    o = weight.shape[0]
    cols = cols.reshape(b, groups, c // groups, -1, *out_size)
    out = torch.einsum("bgct...,goct->bgo...", cols, weight.reshape(groups, o // groups, c // groups, -1))
    out = out.reshape(b, o, *out_size)
    if bias is not None:
        out = out + bias.view(1, -1, *([1] * dims))
    return out


def _native_distance(guide, centre, kernel_size, stride, dilation, asym, channel_wise):
    b, c = centre.shape[:2]
    cols = _windows(guide, kernel_size, stride, dilation)
    diff = cols - centre.view(b, c, *([1] * len(kernel_size)), *centre.shape[2:])
    if asym:
        diff = F.relu(diff)
    dist = diff * diff
    return dist if channel_wise else dist.sum(1, keepdim=True)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _smoothed_centre(guide_padded, smooth_kernel, kernel_size, stride, dilation, out_size):
    """Each guide channel correlated with ``smooth_kernel``, centred on the centre tap of every window."""
    c = guide_padded.shape[1]
    dims = len(kernel_size)
    ss = smooth_kernel.shape[-dims:]
    ext = tuple(ss[a] // 2 - (kernel_size[a] // 2) * dilation[a] for a in range(dims))
    g = F.pad(guide_padded, _torch_pads(ext))
    weight = smooth_kernel.reshape(1, 1, *ss).to(g.dtype).expand(c, 1, *ss)
    smoothed = _CONV[dims](g, weight, stride=stride, groups=c)
    return smoothed[(slice(None), slice(None), *(slice(n) for n in out_size))]


def _parse_kernel_type(kernel_type: str):
    """('gaussian' | 'inv', alpha, lambda, asym, fixed); ValueError for anything else."""
    if not isinstance(kernel_type, str):
        raise TypeError(f"kernel_type must be a str, got {type(kernel_type).__name__}")
    parts = kernel_type.split("_")
    if kernel_type == "gaussian":
        return "gaussian", None, None, False, False
    flags = parts[3:]
    if parts[0] == "inv" and len(parts) >= 3 and set(flags) <= {"asym", "fixed"} and len(set(flags)) == len(flags):
        try:
            return "inv", float(parts[1]), float(parts[2]), "asym" in flags, "fixed" in flags
        except ValueError:
            pass
    raise ValueError(f"kernel_type set to invalid value ({kernel_type}): expected 'gaussian' or "
                     "'inv_{alpha}_{lambda}[_asym][_fixed]'")


def _parse_smooth_kernel_type(smooth_kernel_type: str):
    """('none' | 'gaussian' | 'average' | 'full', width)."""
    if not isinstance(smooth_kernel_type, str):
        raise TypeError(f"smooth_kernel_type must be a str, got {type(smooth_kernel_type).__name__}")
    if smooth_kernel_type in ("none", "gaussian"):
        return smooth_kernel_type, (3 if smooth_kernel_type == "gaussian" else 0)
    name, _, width = smooth_kernel_type.rpartition("_")
    if name in ("average", "full") and width.isdigit():
        if int(width) % 2 != 1:
            raise ValueError(f"smooth_kernel_type only accept kernels of odd widths, got {smooth_kernel_type!r}")
        return name, int(width)
    raise ValueError(f"smooth_kernel_type set to invalid value ({smooth_kernel_type}): expected 'none', "
                     "'gaussian', 'average_{odd width}' or 'full_{odd width}'")


# ----------------------------------------------------------------------------------------------
# Tap geometry: which input and guide positions every kernel tap reads for every output
# ----------------------------------------------------------------------------------------------

class _Phase(NamedTuple):
    """One output phase along one axis and the taps that write it.

    Output ``out_start + t * out_step`` (``t < count``) is written by the taps ``tap_start + m * tap_step``
    (``m < taps``); tap m reads the padded input at ``x_start + t * x_step + m * x_dil`` and the padded
    guide at ``g_start + t * g_step + m * g_dil``.
    """
    out_start: int
    out_step: int
    count: int
    tap_start: int
    tap_step: int
    taps: int
    x_start: int
    x_step: int
    x_dil: int
    g_start: int
    g_step: int
    g_dil: int

    def out_slice(self, t0: int, t1: int) -> slice:
        return _strided(self.out_start + self.out_step * t0, t1 - t0, self.out_step)

    def tap_slice(self) -> slice:
        return _strided(self.tap_start, self.taps, self.tap_step)


def _conv_phases(k: int, s: int, d: int, out_size: int) -> List[_Phase]:
    """A convolution over an input padded by the layer: output t, tap i reads input ``t*s + i*d``;
    the guide is padded the same way and read at the same place."""
    return [_Phase(0, 1, out_size, 0, 1, k, 0, s, d, 0, s, d)]


def _transposed_pads(k: int, s: int, p: int, d: int, in_size: int, out_size: int) -> Tuple[int, int]:
    """Padding (before, after) of the input that makes every tap's window of a transposed
    convolution cover its whole output phase (the padding reads zeros, as inserted zeros do)."""
    big_p = (k - 1) * d - p
    first = [-((big_p - i * d) // s) for i in range(k)]  # ceil((i*d - P) / s)
    phase = [f * s - i * d + big_p for i, f in enumerate(first)]
    before = max(0, max(-f for f in first))
    after = max(0, max(f + -(-(out_size - q) // s) - in_size for f, q in zip(first, phase)))
    return before, after


def _transposed_phases(k: int, s: int, p: int, d: int, out_size: int, before: int) -> List[_Phase]:
    """Phase decomposition of a transposed convolution along one axis.

    Output y, tap i reads the zero-inserted input at ``y + i*d - P`` (``P = (k-1)d - p``): a real pixel m
    only when ``y + i*d - P = m*s``. So every tap writes one output phase and reads a stride-1 window of
    the input; the taps of one phase are ``s / gcd(s, d)`` apart and read ``d / gcd(s, d)`` apart. The
    guide (at the output resolution, padded by ``(k-1)d/2``) is read at ``y + i*d``.
    """
    big_p = (k - 1) * d - p
    g = math.gcd(s, d)
    phases = []
    for q in range(s):
        taps = [i for i in range(k) if (big_p - i * d) % s == q]
        count = -(-(out_size - q) // s) if out_size > q else 0
        if not taps or count == 0:
            continue
        i0 = taps[0]
        x0 = (q + i0 * d - big_p) // s + before
        phases.append(_Phase(q, s, count, i0, s // g, len(taps), x0, 1, d // g, q + i0 * d, s, d * s // g))
    return phases


def _phases(transposed: bool, k, s, p, d, out_size, before=None) -> Tuple[List[_Phase], ...]:
    """The output phases of every spatial axis."""
    if transposed:
        return tuple(_transposed_phases(k[a], s[a], p[a], d[a], out_size[a], before[a]) for a in range(len(k)))
    return tuple(_conv_phases(k[a], s[a], d[a], out_size[a]) for a in range(len(k)))


class _Band(NamedTuple):
    """Outputs ``[t0, t1)`` of the first axis's phase ``phases[0]`` and all outputs of the other axes' phases."""
    phases: Tuple[_Phase, ...]
    t0: int
    t1: int

    @property
    def counts(self) -> Tuple[int, ...]:
        return (self.t1 - self.t0,) + tuple(ph.count for ph in self.phases[1:])

    @property
    def taps(self) -> Tuple[int, ...]:
        return tuple(ph.taps for ph in self.phases)

    def out_index(self) -> tuple:
        """Index of the band's outputs in a ``(B, C, *out)`` tensor."""
        first, *rest = self.phases
        return (slice(None), slice(None), first.out_slice(self.t0, self.t1), *(ph.out_slice(0, ph.count) for ph in rest))

    def tap_index(self) -> tuple:
        """Index of the band's taps in a ``(O, C, *k)`` weight."""
        return (slice(None), slice(None), *(ph.tap_slice() for ph in self.phases))


def _reads(band: _Band, guide: bool) -> List[Tuple[int, int, int]]:
    """Per axis, (first position, step, tap dilation) of what the taps of ``band`` read in the padded input,
    or in the padded guide when ``guide``."""
    fields = ("g_start", "g_step", "g_dil") if guide else ("x_start", "x_step", "x_dil")
    reads = [tuple(getattr(ph, f) for f in fields) for ph in band.phases]
    start, step, dil = reads[0]
    reads[0] = (start + step * band.t0, step, dil)
    return reads


def _window(t: torch.Tensor, band: _Band, guide: bool = False) -> torch.Tensor:
    """View ``(B, C, *taps, *counts)`` of what every tap of ``band`` reads from the padded input ``t``, or
    from the padded guide when ``guide``."""
    reads, taps, counts = _reads(band, guide), band.taps, band.counts
    spans = [(m - 1) * dil + 1 for m, (_, _, dil) in zip(taps, reads)]
    v = t[(slice(None), slice(None), *(slice(start, start + (n - 1) * step + span)
                                       for (start, step, _), n, span in zip(reads, counts, spans)))]
    for a, ((_, step, _), span) in enumerate(zip(reads, spans)):
        v = v.unfold(2 + a, span, step)
    dims = len(reads)
    v = v[(..., *(slice(None, None, dil) for _, _, dil in reads))]  # (B, C, *counts, *taps)
    return v.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))


def _fold_into(target: torch.Tensor, grad_window: torch.Tensor, band: _Band, guide: bool = False) -> None:
    """``target[window] += grad_window``, summing overlapping taps (the adjoint of :func:`_window`).

    F.fold sums the taps of the last two axes; the taps of any leading axis (the depth of a 3-D layer)
    are added one at a time, with that axis's outputs moved into the batch."""
    reads, taps, counts = _reads(band, guide), band.taps, band.counts
    lead = len(reads) - 2
    b, c = grad_window.shape[:2]
    (r0, rs, rd), (c0, cs, cd) = reads[lead:]
    tr, tc, ny, nx = taps[lead], taps[lead + 1], counts[lead], counts[lead + 1]
    size = ((ny - 1) * rs + (tr - 1) * rd + 1, (nx - 1) * cs + (tc - 1) * cd + 1)
    lead_count = math.prod(counts[:lead])
    count_dims = tuple(range(4, 4 + lead))
    for lead_taps in itertools.product(*(range(m) for m in taps[:lead])):
        g = grad_window[(slice(None), slice(None), *lead_taps)].movedim(count_dims, tuple(range(1, 1 + lead)))
        folded = F.fold(g.reshape(b * lead_count, c * tr * tc, ny * nx), size, (tr, tc), dilation=(rd, cd),
                        stride=(rs, cs))
        folded = folded.view(b, *counts[:lead], c, *size).movedim(tuple(range(1, 1 + lead)), tuple(range(2, 2 + lead)))
        index = (slice(None), slice(None),
                 *(_strided(start + i * dil, n, step) for (start, step, dil), i, n in zip(reads, lead_taps, counts)),
                 slice(r0, r0 + size[0]), slice(c0, c0 + size[1]))
        target[index] += folded


def _bands(phases: Sequence[_Phase], row_bytes: int, device: torch.device, guide: bool,
           limit: Optional[int] = None) -> List[_Band]:
    """Bands of outputs along the first axis whose temporaries (``row_bytes`` per row) are about
    ``_band_bytes(device)``, and at most ``limit`` bytes when given. A band is as tall as its input (and guide)
    window when that costs at most twice the budget, so that bands two apart never read the same positions (see
    :func:`_disjoint_sets`); a 3-D layer's rows can be too large."""
    first = phases[0]
    budget, row_bytes = _band_bytes(device), max(row_bytes, 1)
    min_rows = max(-(-span // step) for span, step in _read_spans(first, guide))
    size = max(1, budget // row_bytes, min(min_rows, 2 * budget // row_bytes))
    if limit is not None:
        size = max(1, min(size, limit // row_bytes))
    size = min(first.count, size)
    return [_Band(tuple(phases), t0, min(first.count, t0 + size)) for t0 in range(0, first.count, size)]


def _read_spans(first: _Phase, guide: bool) -> List[Tuple[int, int]]:
    """(rows read by one output, rows between outputs) along the first axis, in the input and the guide."""
    spans = [((first.taps - 1) * first.x_dil + 1, first.x_step)]
    if guide:
        spans.append(((first.taps - 1) * first.g_dil + 1, first.g_step))
    return spans


def _disjoint_sets(items: list, first: _Band, guide: bool) -> List[list]:
    """``items``, the consecutive bands of a phase (or work on them) from ``first`` on, dealt into sets whose members
    read disjoint rows of the input (and of the guide): the backward folds the bands of one set in parallel, and the
    sets one after the other (deterministic)."""
    size = first.t1 - first.t0
    # band i reads rows from i*size*step on, (size-1)*step + span of them: bands m apart are disjoint
    # when (m-1)*size*step >= span - step
    sets = 1 + max(max(0, -(-(span - step) // (size * step))) for span, step in _read_spans(first.phases[0], guide))
    return [items[i::sets] for i in range(sets)]


def _band_bytes(device: torch.device) -> int:
    return _CPU_BAND_BYTES if device.type == "cpu" else _GPU_BAND_BYTES


# CPU thread pools whose threads run single-threaded torch ops: the band workers (one pool per torch thread
# count) and, per calling thread, the coordinator that runs the body of each ``pac::`` op.
_band_pools: dict = {}
_thread_state = threading.local()  # .coordinator of a calling thread; .threads inside a coordinated op
_pools_lock = threading.Lock()


def _forget_threads() -> None:
    """In a forked child the pools' threads do not exist: start new pools when they are next needed."""
    _band_pools.clear()
    _thread_state.__dict__.clear()


os.register_at_fork(after_in_child=_forget_threads)


def _single_threaded() -> None:
    torch.get_num_threads()  # torch's lazy per-thread set-up first: it would later reset the count to the process's
    torch.set_num_threads(1)  # (the last count any thread set)


def _start_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` single-threaded threads, all started before it is returned."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=_single_threaded)
    started = threading.Barrier(workers + 1)
    for _ in range(workers):
        pool.submit(started.wait)
    started.wait()
    return pool


def _coordinated_op(fn):
    """Run ``fn(tensor, ...)``, the body of a ``pac::`` op, on a coordinator thread with one torch thread when the
    caller has several (one coordinator per calling thread): the op's own set-up and reductions (padding,
    zero-filled buffers, sums) then never wait for a descheduled OpenMP thread, and its bands run on as many
    workers as the caller has threads (see :func:`_map_bands`)."""
    @functools.wraps(fn)
    def run(*args):
        threads = torch.get_num_threads()
        if args[0].device.type != "cpu" or threads <= 1 or getattr(_thread_state, "threads", None):
            return fn(*args)
        with _pools_lock:
            started = False
            if getattr(_thread_state, "coordinator", None) is None:
                _thread_state.coordinator, started = _start_pool("pac-op", 1), True
            if threads not in _band_pools:
                _band_pools[threads], started = _start_pool("pac-band", threads), True
            if started:  # a worker's set_num_threads(1) also set the count that torch gives to new threads
                torch.set_num_threads(threads)  # (this thread's own count is unchanged)

        def coordinate():
            _thread_state.threads = threads
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                return fn(*args)

        return _thread_state.coordinator.submit(coordinate).result()
    return run


def _map_bands(fn, items: list) -> list:
    """``[fn(item) for item in items]``, where an item is a band (or a list of bands).

    Inside a coordinated op (a CPU caller with several torch threads) the items run on as many worker threads,
    each of which runs single-threaded torch ops. A band is a few large operations, and a multi-threaded
    operation waits for its slowest thread at every step: next to other busy processes those waits dominate,
    while here a descheduled worker delays only its own bands.
    """
    threads = getattr(_thread_state, "threads", None)
    if threads is None:
        return [fn(item) for item in items]

    def run(item):
        # Grad mode and autocast are per thread: a worker starts with both at their defaults.
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return fn(item)

    return list(_band_pools[threads].map(run, items))


# ----------------------------------------------------------------------------------------------
# The adaptive kernel of one band, computed from the guide, and its backward
# ----------------------------------------------------------------------------------------------

class _KernelSpec(NamedTuple):
    """How a layer turns its guide into the adaptive kernel (see :func:`packernel2d`)."""
    kind: int            # _GAUSSIAN or _INV
    asym: bool
    channel_wise: bool
    normalize: bool
    shift: bool = False  # a normalised gaussian kernel computed relative to the nearest valid tap (_gaussian_)


def _centre_may_be_invalid(k, p, d, transposed: bool, masked: bool) -> bool:
    """Whether a window's own centre can fall on a tap that is not a real, unmasked pixel: then all its valid taps
    can be far from it in guide features (otherwise the centre tap, at distance 0, keeps a normalised kernel's sum
    at 1 or more)."""
    return transposed or masked or any(p[i] > d[i] * (k[i] // 2) for i in range(len(k)))


_GIVEN, _GAUSSIAN, _INV = 0, 1, 2
_INV_EPS = 1e-4


def _contiguous_mul(window: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``window * other`` written in the contiguous ``(B, C, *taps, *counts)`` layout: left to
    itself, torch would follow the strides of the window view and make every later reshape a copy."""
    shape = torch.broadcast_shapes(window.shape, other.shape)
    return torch.mul(window, other, out=window.new_empty(shape, dtype=torch.promote_types(window.dtype, other.dtype)))


def _guide_differences(guide_win: torch.Tensor, centre: torch.Tensor, asym: bool) -> torch.Tensor:
    """``phi(tap - centre)`` of one band, contiguous; phi is ReLU for asymmetric kernels."""
    centre = centre.view(*centre.shape[:2], *([1] * (centre.dim() - 2)), *centre.shape[2:])
    diff = torch.sub(guide_win, centre, out=guide_win.new_empty(guide_win.shape))
    return diff.relu_() if asym else diff


def _compiled(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether :mod:`pac_cpu`'s compiled loops run the band primitives of these tensors (else torch ops do)."""
    return pac_cpu.supports(*tensors)


def _cpu_window(t: torch.Tensor, band: _Band, guide: bool = False) -> "pac_cpu.Window":
    return pac_cpu.window(tuple(t.shape[2:]), tuple(_reads(band, guide)), band.taps, band.counts)


def _as_taps(t: torch.Tensor, band: _Band) -> torch.Tensor:
    """A ``(B, C, T, P)`` result of :mod:`pac_cpu` as ``(B, C, *taps, *counts)``."""
    return t.view(*t.shape[:2], *band.taps, *band.counts)


def _flat(t: torch.Tensor, band: _Band) -> torch.Tensor:
    """A ``(B, C, [*taps,] *counts)`` tensor as :mod:`pac_cpu` reads it: contiguous ``(B, C, [T,] P)``."""
    taps = (math.prod(band.taps),) if t.dim() > 2 + len(band.counts) else ()
    return t.reshape(*t.shape[:2], *taps, math.prod(band.counts)).contiguous()


def _band_distance(spec: _KernelSpec, guide, centre, band: _Band, compiled: bool) -> torch.Tensor:
    """``(B, 1 or C, *taps, *counts)``: the squared guide differences ``phi(tap - centre)^2`` of one band, summed
    over the guide channels unless channel-wise. ``centre`` holds the band's centre features ``(B, C, *counts)``."""
    if compiled:
        dist = pac_cpu.distance(guide, _flat(centre, band), _cpu_window(guide, band, guide=True), spec.channel_wise,
                                spec.asym)
        return _as_taps(dist, band)
    diff = _guide_differences(_window(guide, band, guide=True), centre, spec.asym)
    return diff.square_() if spec.channel_wise else diff.square_().sum(1, keepdim=True)


def _band_kernel(spec: _KernelSpec, dist, valid_win, pattern_win, alpha, lam):
    """Adaptive kernel ``(B, 1 or C, *taps, *counts)`` of one band from its guide distances (overwritten), its
    divisor (or None), the output mask flags (or None) and the kernel before masking and normalisation (``dist``).

    ``valid_win`` is the window of the layer's mask (or of the real-pixel pattern when only normalising),
    ``pattern_win`` the real-pixel pattern (used with a mask and no normalisation).
    """
    if spec.kind == _GAUSSIAN:
        kernel = _gaussian_(spec, dist, valid_win)
    else:
        kernel = dist.add_(_INV_EPS).pow_(0.5 * _channel_view(lam, dist)).add_(_channel_view(alpha, dist))
    return (*_restrict(spec, kernel, valid_win, pattern_win), kernel)


def _gaussian_(spec: _KernelSpec, dist, valid_win):
    """``exp(-dist / 2)``, in place. With ``spec.shift`` (a normalised kernel whose window centres can be invalid
    taps) it is computed as ``exp(-(dist - nearest) / 2)`` instead, ``nearest`` being each pixel's smallest distance
    over its valid taps: the normalisation cancels the shift, and the kernel of a pixel far (in guide features) from
    all its taps no longer underflows to zero, nor its gradient (divided by the kernel's sum) to infinity."""
    if spec.shift:  # (the clamp only touches invalid taps, which the kernel zeroes: no inf * 0)
        dist = dist.sub_(_nearest_valid(dist, valid_win)).clamp_(min=0)
    return dist.mul_(-0.5).exp_()


def _nearest_valid(dist: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per pixel, the smallest of ``dist`` over the taps where ``valid`` is non-zero; 0 where there is none."""
    nearest = dist.masked_fill(valid == 0, math.inf).amin(_tap_dims(dist), keepdim=True)
    return nearest.masked_fill_(nearest == math.inf, 0.0)


def _channel_view(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-channel kernel parameter, shaped to broadcast against a ``(B, C, ...)`` tensor."""
    param = param.to(like.dtype)
    return param.view(1, -1, *([1] * (like.dim() - 2))) if param.dim() else param


def _restrict(spec: _KernelSpec, kernel, valid_win, pattern_win):
    """Zero the taps that fall on masked or non-existent pixels and renormalise. Returns the kernel,
    the per-pixel divisor (or None) and the non-empty flags ``(B, 1 or C, *counts)`` (or None)."""
    if valid_win is None:
        return kernel, None, None
    taps = _tap_dims(kernel)
    kernel = _contiguous_mul(kernel, valid_win)
    if spec.normalize:
        norm = kernel.sum(taps, keepdim=True)
    else:  # a mask without normalisation: rescale by the fraction of valid taps
        norm = valid_win.sum(taps, keepdim=True) / pattern_win.sum(taps, keepdim=True).clamp(min=1)
    empty = norm == 0
    norm = norm + empty.to(norm.dtype)
    return kernel.div_(norm), norm, (~empty)[(slice(None), slice(None), *([0] * len(taps)))]


def _band_kernel_backward(spec: _KernelSpec, grad_kernel, dist, valid_win, pattern_win, alpha, lam, base=None):
    """Gradients of one band's kernel with respect to its guide distances ``dist`` and alpha/lambda, computed in
    the memory of ``grad_kernel`` and ``dist`` (both overwritten). A gaussian kernel's ``base`` (its value before
    masking and normalisation), when given, replaces ``dist``."""
    if spec.kind == _GAUSSIAN:
        base = _gaussian_(spec, dist, valid_win) if base is None else base
    else:
        shifted = dist.add_(_INV_EPS)
        power = shifted.pow(0.5 * _channel_view(lam, dist))
        base = power + _channel_view(alpha, dist)
    taps = _tap_dims(grad_kernel)
    if valid_win is not None:
        kernel, norm, _ = _restrict(spec, base, valid_win, pattern_win)
        if spec.normalize:  # d(K1 / sum K1): (g - sum(g K)) / sum K1
            grad_kernel = (grad_kernel - (grad_kernel * kernel).sum(taps, keepdim=True)) / norm
        else:
            grad_kernel = grad_kernel / norm
        grad_kernel = grad_kernel * valid_win
    if spec.kind == _GAUSSIAN:
        return grad_kernel.mul_(base).mul_(-0.5), None, None
    dims = tuple(d for d in range(grad_kernel.dim()) if d != 1) if alpha.dim() else None
    grad_alpha = grad_kernel.sum(dims) if dims else grad_kernel.sum()
    g_lam = grad_kernel * power * shifted.log() * 0.5
    grad_lambda = g_lam.sum(dims) if dims else g_lam.sum()
    grad_dist = grad_kernel.mul_(0.5 * _channel_view(lam, dist)).mul_(power).div_(shifted)
    return grad_dist, grad_alpha, grad_lambda


def _band_distance_backward_into(spec: _KernelSpec, grad_dist, guide, centre, band: _Band, gguide, gcentre,
                                 compiled: bool) -> None:
    """Add the gradients of :func:`_band_distance` into the padded guide's ``gguide`` and into ``gcentre``, the
    band's part of the centre gradient."""
    if compiled:
        centre = _flat(centre, band)
        band_gcentre = torch.zeros_like(centre)
        pac_cpu.distance_backward(_flat(grad_dist, band), guide, centre, _cpu_window(guide, band, guide=True),
                                  spec.channel_wise, spec.asym, gguide, band_gcentre)
        gcentre += band_gcentre.view(gcentre.shape)
        return
    diff = _guide_differences(_window(guide, band, guide=True), centre, spec.asym)
    grad_diff = diff.mul_(grad_dist).mul_(2)  # d(phi(diff)^2) = 2 phi(diff), for the identity and ReLU
    _fold_into(gguide, grad_diff, band, guide=True)
    gcentre -= grad_diff.sum(_tap_dims(grad_diff))


def _modulated(x, kernel, band: _Band, compiled: bool) -> torch.Tensor:
    """``(B, C, *taps, *counts)``: the band's windows of the padded input times its kernel."""
    if compiled:
        return _as_taps(pac_cpu.modulate(x, _flat(kernel, band), _cpu_window(x, band)), band)
    return _contiguous_mul(_window(x, band), kernel)


def _pool_into(out: torch.Tensor, x, kernel, band: _Band, compiled: bool) -> None:
    """``out`` ``(B, C, *counts)`` = :func:`_modulated` summed over the taps."""
    if compiled and _outputs_contiguous(out):  # (a pool's band of whole output rows: no temporary)
        pac_cpu.pool(x, _flat(kernel, band), _cpu_window(x, band), out.view(*out.shape[:2], -1))
    elif compiled:
        out.copy_(pac_cpu.pool(x, _flat(kernel, band), _cpu_window(x, band)).view(out.shape))
    else:
        modulated = _modulated(x, kernel, band, compiled)
        out.copy_(modulated.sum(_tap_dims(modulated), dtype=_acc_dtype(x.dtype)))


def _outputs_contiguous(t: torch.Tensor) -> bool:
    """Whether ``t`` ``(B, C, *counts)`` holds each channel's outputs contiguously (it views as ``(B, C, P)``)."""
    expected = 1
    for n, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if n != 1 and stride != expected:
            return False
        expected *= n
    return True


def _modulated_backward(grad, x, kernel, band: _Band, gx, need_kernel: bool, compiled: bool):
    """Backward of :func:`_modulated` (``grad`` ``(B, C, *taps, *counts)``), or of :func:`_pool_into` (``grad``
    ``(B, C, *counts)``): adds the input gradient into the padded ``gx`` (when given) and returns the kernel
    gradient ``(B, 1 or C, *taps, *counts)`` (when ``need_kernel``)."""
    if compiled:
        pooled_rows = grad.dim() == 2 + len(band.counts) and _outputs_contiguous(grad)  # (a view: no copy)
        grad = grad.view(*grad.shape[:2], -1) if pooled_rows else _flat(grad, band)
        gk = pac_cpu.modulate_backward(grad, x, _flat(kernel, band), _cpu_window(x, band), gx, need_kernel)
        return None if gk is None else _as_taps(gk, band)
    if grad.dim() == 2 + len(band.counts):  # pooling: every tap of a channel gets the channel's output gradient
        grad = grad.view(*grad.shape[:2], *([1] * len(band.counts)), *band.counts)
    if gx is not None:
        _fold_into(gx, _contiguous_mul(grad, kernel), band)
    if not need_kernel:
        return None
    gk = _contiguous_mul(_window(x, band), grad)
    return gk.sum(1, keepdim=True, dtype=kernel.dtype) if kernel.shape[1] == 1 else gk.to(kernel.dtype)


# ----------------------------------------------------------------------------------------------
# The 'taps' engine: band by band, each band a few large operations; registered as torch ops
# ----------------------------------------------------------------------------------------------

class _OpArgs(NamedTuple):
    """The integer arguments of the ``pac::`` ops, decoded (one entry per spatial axis in each tuple)."""
    k: Tuple[int, ...]
    s: Tuple[int, ...]
    p: Tuple[int, ...]
    op: Tuple[int, ...]
    d: Tuple[int, ...]
    out_size: Tuple[int, ...]
    transposed: bool
    groups: int
    spec: Optional[_KernelSpec]  # None when the kernel is given

    @staticmethod
    def decode(geometry: Sequence[int], options: Sequence[int], masked: bool = False) -> "_OpArgs":
        dims = len(geometry) // 6  # the output size is symbolic under export
        k, s, p, op, d, out_size = (tuple(geometry[i * dims:(i + 1) * dims]) for i in range(6))
        transposed, groups, kind, asym, channel_wise, normalize = options
        shift = bool(normalize) and kind == _GAUSSIAN and _centre_may_be_invalid(k, p, d, bool(transposed), masked)
        spec = None if kind == _GIVEN else _KernelSpec(kind, bool(asym), bool(channel_wise), bool(normalize), shift)
        return _OpArgs(k, s, p, op, d, out_size, bool(transposed), groups, spec)


def _encode(layer: "_Layer", out_size, kernel_type: str, channel_wise: bool, normalize: bool, kernel_given: bool):
    """The (geometry, options) integer lists of the ``pac::`` ops for a layer's call."""
    geometry = [*layer.k, *layer.s, *layer.op_padding, *layer.op, *layer.d, *out_size]
    if kernel_given:
        kind, asym = _GIVEN, False
    else:
        name, _, _, asym, _ = _parse_kernel_type(kernel_type)
        kind = _GAUSSIAN if name == "gaussian" else _INV
    return geometry, [int(layer.transposed), layer.groups, kind, int(asym), int(channel_wise), int(normalize)]


def _guide_pads(a: _OpArgs) -> Tuple[int, ...]:
    """The zeros that the kernel's windows read around the guide: the layer's padding, or half a window around a
    transposed layer's guide (which is at the output resolution)."""
    return tuple((k - 1) * d // 2 for k, d in zip(a.k, a.d)) if a.transposed else a.p


def _as_read(image: torch.Tensor, a: _OpArgs) -> torch.Tensor:
    """``image`` (a mask, or ones) at the layer's input resolution, laid out like the windows of ``pac::kernel``
    read it: zero-inserted and padded for a transposed layer, zero padded otherwise."""
    if a.transposed:
        return _transposed_padded_input(image, a.k, a.s, a.p, a.op, a.d)
    return _pad(image, a.p)


def _validity(mask, a: _OpArgs, in_size, dtype, device):
    """(valid, pattern) images at the layer's input size: ``valid`` is the mask, or the real pixels (ones) when only
    normalising; ``pattern`` (ones) is needed with a mask and no normalisation. What the windows read around them,
    padding and inserted zeros, is not real."""
    if a.spec is None or (mask is None and not a.spec.normalize):
        return None, None
    pattern = torch.ones(1, 1, *in_size, dtype=dtype, device=device)
    if mask is None:
        return pattern, None
    return mask.to(dtype), (None if a.spec.normalize else pattern)


class _Prepared(NamedTuple):
    x: torch.Tensor                  # the input (contiguous when compiled)
    x_pads: Tuple[Tuple[int, int], ...]  # per axis, the zeros that the taps read before and after x
    guide: Optional[torch.Tensor]    # the guide (contiguous when compiled)
    guide_pads: Tuple[Tuple[int, int], ...]
    phases: Tuple[List[_Phase], ...]  # the output phases of every axis
    valid: Optional[torch.Tensor]    # mask (or real pixels when only normalising), at x's size
    pattern: Optional[torch.Tensor]  # real pixels, with a mask and no normalisation
    compiled: bool                   # whether pac_cpu's compiled loops run the band primitives


def _prepare_filter(x, guide, mask, a: _OpArgs, kernel_dtype) -> _Prepared:
    dims = len(a.k)
    compiled = _compiled(x) and (guide is None or _compiled(guide))
    if compiled:
        x, guide = x.contiguous(), (None if guide is None else guide.contiguous())
    in_size = tuple(x.shape[2:])
    if a.transposed:
        x_pads = tuple(_transposed_pads(a.k[i], a.s[i], a.p[i], a.d[i], in_size[i], a.out_size[i])
                       for i in range(dims))
        phases = _phases(True, a.k, a.s, a.p, a.d, a.out_size, tuple(before for before, _ in x_pads))
    else:
        x_pads, phases = tuple((p, p) for p in a.p), _phases(False, a.k, a.s, a.p, a.d, a.out_size)
    valid, pattern = _validity(mask, a, in_size, kernel_dtype, x.device)
    guide_pads = tuple((p, p) for p in _guide_pads(a))
    return _Prepared(x, x_pads, guide, guide_pads, phases, valid, pattern, compiled)


def _laid_out_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``like`` (as the fake kernels promise: ``empty_like``)."""
    return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)


def _band_of(t: Optional[torch.Tensor], band: _Band):
    return None if t is None else _window(t, band)


def _own_centres(guide: torch.Tensor, a: _OpArgs) -> torch.Tensor:
    """The centre features of the kernel op's windows when no (smoothed) centre is given: a view of the padded
    guide, so that their gradient folds straight into the guide's (a separate centre tensor would cost a gradient
    buffer and autograd's scatter of it back into the guide)."""
    return guide[_centre_index(a.k, a.d, a.out_size, (1,) * len(a.k) if a.transposed else a.s)]


# Per band, the filter op reads band-sized zero-padded copies of the rows of its inputs that the band reads
# (a band's "rows" are along the first spatial axis): it never holds padded copies of whole inputs, nor of
# their gradients, which the band copies' gradients are added into.

def _rows_read(band: _Band, guide: bool, step: int = 1) -> Tuple[int, int, int]:
    """``(r0, r1, step)``: the rows ``r0, r0 + step, ...`` (before ``r1``) of the padded input (or guide) among which
    the taps of ``band`` read (``step`` must divide the distances between the rows they read)."""
    start, row_step, dil = _reads(band, guide)[0]
    return start, start + (band.counts[0] - 1) * row_step + (band.taps[0] - 1) * dil + 1, step


def _guide_row_step(prep: "_Prepared", a: _OpArgs, first: _Phase) -> int:
    """The step between the guide rows that the bands of a transposed layer's first-axis phase read: its guide is at
    the output resolution, read ``stride`` rows apart, and its bands copy only those rows (at stride 16, a sixteenth
    of the span). 1 elsewhere, and for a single first-axis phase, whose backward folds bands in parallel and needs
    the window centres among the copied rows."""
    if not a.transposed or prep.guide is None or len(prep.phases[0]) < 2:
        return 1
    return math.gcd(first.g_step if first.count > 1 else 0, first.g_dil if first.taps > 1 else 0) or 1


def _centre_reads(a: _OpArgs, band: _Band) -> List[Tuple[int, int, int]]:
    """Per axis, (first position, count, step) of the centres of the band's windows in the padded guide."""
    steps = (1,) * len(a.k) if a.transposed else a.s
    reads = []
    for i, ph in enumerate(band.phases):
        t0, count = (band.t0, band.t1 - band.t0) if i == 0 else (0, ph.count)
        first = (ph.out_start + ph.out_step * t0) * steps[i] + a.k[i] // 2 * a.d[i]
        reads.append((first, count, ph.out_step * steps[i]))
    return reads


def _band_centres(guide: torch.Tensor, a: _OpArgs, band: _Band, shifts: Sequence[int]) -> torch.Tensor:
    """The guide's own centre features of the band's windows: a view of ``guide``, the padded guide's rows copied
    from row ``shifts[0]`` on (or the unpadded guide, ``shifts`` being its padding before each axis), so that their
    gradient folds straight into the guide's."""
    index = [_strided(first - shift, count, step)
             for (first, count, step), shift in zip(_centre_reads(a, band), shifts)]
    return guide[(slice(None), slice(None), *index)]


def _interior(t: torch.Tensor, pads, row: int, count: int) -> tuple:
    """Index, in padded rows of ``t``, of ``count`` rows of ``t`` from padded row ``row`` on."""
    return (slice(None), slice(None), slice(row, row + count),
            *(slice(before, before + n) for n, (before, _) in zip(t.shape[3:], pads[1:])))


def _real_rows(t: torch.Tensor, pads, rows: Tuple[int, int, int]) -> Tuple[int, int, slice]:
    """Of the padded rows ``rows`` (see :func:`_rows_read`), those ``[j0, j1)`` that are rows of ``t``, and where they
    are in ``t``."""
    (r0, r1, step), before = rows, pads[0][0]
    j0 = max(0, -(-(before - r0) // step))
    j1 = min(-(-(r1 - r0) // step), -(-(before + t.shape[2] - r0) // step))
    lo = r0 + j0 * step - before
    return j0, j1, slice(lo, lo + (j1 - j0 - 1) * step + 1, step)


def _padded_rows(t: Optional[torch.Tensor], pads, rows: Tuple[int, int, int]) -> Optional[torch.Tensor]:
    """The padded rows ``rows`` (see :func:`_rows_read`) of ``t`` zero-padded by ``pads`` (per axis, before and
    after): a contiguous copy, whole along the other axes."""
    if t is None:
        return None
    j0, j1, real = _real_rows(t, pads, rows)
    count = -(-(rows[1] - rows[0]) // rows[2])
    out = t.new_zeros(*t.shape[:2], count, *(n + sum(p) for n, p in zip(t.shape[3:], pads[1:])))
    if j1 > j0:
        out[_interior(t, pads, j0, j1 - j0)] = t[:, :, real]
    return out


def _add_padded_rows(target: torch.Tensor, grad: torch.Tensor, pads, rows: Tuple[int, int, int]) -> None:
    """The adjoint of :func:`_padded_rows`: adds the part of ``grad`` that lies on ``target`` into it."""
    j0, j1, real = _real_rows(target, pads, rows)
    if j1 > j0:
        target[:, :, real] += grad[_interior(target, pads, j0, j1 - j0)]


class _RowInputs(NamedTuple):
    """The rows of the padded input, guide and validity images that a band of rows reads, copied out."""
    x: torch.Tensor
    x_rows: Tuple[int, int, int]      # the padded input's rows in ``x`` (see :func:`_rows_read`)
    guide: Optional[torch.Tensor]
    guide_rows: Tuple[int, int, int]  # the padded guide's rows in ``guide``
    valid: Optional[torch.Tensor]
    pattern: Optional[torch.Tensor]


def _row_inputs(prep: _Prepared, a: _OpArgs, band: _Band, own_centres: bool) -> _RowInputs:
    """What the bands of ``band``'s rows read (whatever their phases along the other axes): with ``own_centres``,
    the guide's copy also covers the centres of their windows, unless it holds only every few rows (see
    :func:`_guide_row_step`)."""
    x_rows, guide_rows, guide = _rows_read(band, guide=False), (0, 0, 1), None
    if prep.guide is not None:
        guide_rows = _rows_read(band, True, _guide_row_step(prep, a, band.phases[0]))
        if own_centres and guide_rows[2] == 1:
            first, count, step = _centre_reads(a, band)[0]
            guide_rows = (min(guide_rows[0], first), max(guide_rows[1], first + (count - 1) * step + 1), 1)
        guide = _padded_rows(prep.guide, prep.guide_pads, guide_rows)
    return _RowInputs(_padded_rows(prep.x, prep.x_pads, x_rows), x_rows, guide, guide_rows,
                      _padded_rows(prep.valid, prep.x_pads, x_rows), _padded_rows(prep.pattern, prep.x_pads, x_rows))


class _BandInputs(NamedTuple):
    """What one band reads: its rows' copies and the centres of its windows."""
    band: _Band                       # the band, its reads along the first axis moved to the copies' rows
    x: torch.Tensor
    guide: Optional[torch.Tensor]
    centre: Optional[torch.Tensor]
    valid: Optional[torch.Tensor]
    pattern: Optional[torch.Tensor]


def _own_band_centres(prep: _Prepared, rows: _RowInputs, guide_rows: torch.Tensor, guide: torch.Tensor, a: _OpArgs,
                      band: _Band) -> torch.Tensor:
    """The guide's own centres of ``band``'s windows, as a view of ``guide_rows`` (the copy of ``rows.guide_rows``,
    or its gradient) when it holds them, else of ``guide`` (the unpadded guide, or its gradient)."""
    if rows.guide_rows[2] == 1:
        return _band_centres(guide_rows, a, band, (rows.guide_rows[0],) + (0,) * (len(a.k) - 1))
    return _band_centres(guide, a, band, [before for before, _ in prep.guide_pads])


def _band_inputs(prep: _Prepared, rows: _RowInputs, a: _OpArgs, band: _Band,
                 centre: Optional[torch.Tensor]) -> _BandInputs:
    """``band``'s view of its rows' copies; its window centres are the given ``centre``'s, or (None) the guide's
    own."""
    band_centre = None
    if rows.guide is not None:
        band_centre = _own_band_centres(prep, rows, rows.guide, prep.guide, a, band) if centre is None else \
            centre[band.out_index()]
    first, step = band.phases[0], rows.guide_rows[2]
    first = first._replace(x_start=first.x_start - rows.x_rows[0], g_start=(first.g_start - rows.guide_rows[0]) // step,
                           g_step=max(1, first.g_step // step), g_dil=max(1, first.g_dil // step))
    return _BandInputs(band._replace(phases=(first, *band.phases[1:])), rows.x, rows.guide, band_centre, rows.valid,
                       rows.pattern)


def _kernel_of_band(a: _OpArgs, kernel, inputs: _BandInputs, alpha, lam, compiled: bool):
    """The kernel of one band: a slice of the given kernel, or computed from the guide; its output mask flags and its
    value before masking and normalisation (see :func:`_band_kernel`)."""
    band = inputs.band
    if a.spec is None:
        return kernel[band.tap_index() + band.out_index()[2:]], None, None
    dist = _band_distance(a.spec, inputs.guide, inputs.centre, band, compiled)
    kernel, _, flags, base = _band_kernel(a.spec, dist, _band_of(inputs.valid, band), _band_of(inputs.pattern, band),
                                          alpha, lam)
    return kernel, flags, base


def _band_rows_bytes(batch: int, values: int, phases: Sequence[_Phase], element_size: int) -> int:
    """Bytes of one output row (along the first axis) of a band's largest temporary, ``values`` per output."""
    return batch * values * math.prod(ph.count for ph in phases[1:]) * max(element_size, 4)


def _temporary_values(x_channels: int, guide_channels: int, kernel_channels: int, taps: int, conv: bool,
                      compiled: bool) -> int:
    """Values per output of a band's largest temporaries: on the torch path the modulated input (channels x taps)
    and the guide differences; with the compiled loops, which convolve, pool and take distances without such
    temporaries, the output gradient (channels) or the four kernel-sized temporaries that the backward holds at once
    (distances, kernel, kernel gradient, distance gradient), and a convolution's modulated input where its weight
    gradient makes it (a kernel per channel)."""
    if compiled:
        return x_channels * taps if conv and kernel_channels > 1 else max(x_channels, 4 * kernel_channels * taps)
    return max(x_channels, guide_channels) * taps


def _phase_weight(weight, groups, phases: Sequence[_Phase]):
    """The weight of a phase's taps as ``(groups, O / groups, C / groups * taps)``."""
    if weight is None:
        return None
    index = (slice(None), slice(None), *(ph.tap_slice() for ph in phases))
    return weight[index].reshape(groups, weight.shape[0] // groups, -1).contiguous()


def _filter_rows_bytes(x, weight, kernel, guide, a: _OpArgs, prep: _Prepared, phases) -> int:
    """:func:`_band_rows_bytes` of a ``pac::filter`` phase."""
    kernel_channels = kernel.shape[1] if a.spec is None else guide.shape[1] if a.spec.channel_wise else 1
    values = _temporary_values(x.shape[1], 0 if guide is None else guide.shape[1], kernel_channels,
                               math.prod(ph.taps for ph in phases), weight is not None, prep.compiled)
    return _band_rows_bytes(x.shape[0], values, phases, x.element_size())


def _copied_row_bytes(prep: _Prepared, a: _OpArgs, first: _Phase) -> int:
    """Bytes per output row (along the first axis) of a band's copies of the input and guide rows
    (:func:`_row_inputs`)."""
    def row_bytes(t, pads, step):
        size = math.prod(n + sum(p) for n, p in zip(t.shape[3:], pads[1:]))
        return step * t.shape[0] * t.shape[1] * size * max(t.element_size(), 4)

    return row_bytes(prep.x, prep.x_pads, first.x_step) + (
        0 if prep.guide is None else row_bytes(prep.guide, prep.guide_pads,
                                               max(1, first.g_step // _guide_row_step(prep, a, first))))


def _row_tasks(x, weight, kernel, guide, a: _OpArgs, prep: _Prepared, limit: Optional[int] = None) -> List[List[list]]:
    """The filter op's work: per output phase along the first axis, its bands of rows (see :func:`_bands` for
    ``limit``); each band of rows is a list of ``(band, phase weight)``, one per combination of phases along the other
    axes (they read the same rows, which are copied once)."""
    units = []
    for first in prep.phases[0]:
        combos = [(first, *rest) for rest in itertools.product(*prep.phases[1:])]
        if not combos:
            continue
        weights = [_phase_weight(weight, a.groups, phases) for phases in combos]
        row_bytes = max(_filter_rows_bytes(x, weight, kernel, guide, a, prep, phases) for phases in combos) + \
            _copied_row_bytes(prep, a, first)
        units.append([[(_Band(phases, rows.t0, rows.t1), w) for phases, w in zip(combos, weights)]
                      for rows in _bands(combos[0], row_bytes, x.device, guide is not None, limit)])
    return units


@_coordinated_op
def _filter_forward(x, weight, kernel, guide, centre, mask, alpha, lam, a: _OpArgs):
    kernel_dtype = (kernel if a.spec is None else guide).dtype
    prep = _prepare_filter(x, guide, mask, a, kernel_dtype)
    b, c = x.shape[:2]
    out = x.new_zeros(b, c if weight is None else weight.shape[0], *a.out_size)
    flags_out = None
    if mask is not None and a.spec is not None:
        flags_out = x.new_zeros(b, guide.shape[1] if a.spec.channel_wise else 1, *a.out_size, dtype=kernel_dtype)
    def run(task) -> None:  # output phases and bands write disjoint outputs: all of them run in parallel
        rows = _row_inputs(prep, a, task[0][0], centre is None)
        for band, w in task:
            inputs = _band_inputs(prep, rows, a, band, centre)
            kb, flags, _ = _kernel_of_band(a, kernel, inputs, alpha, lam, prep.compiled)
            if flags_out is not None:
                flags_out[band.out_index()] = flags.to(kernel_dtype)
            kb = kb.to(x.dtype)
            if w is None:
                _pool_into(out[band.out_index()], inputs.x, kb, inputs.band, prep.compiled)
            else:
                out[band.out_index()] = _convolved(inputs.x, kb, w, a.groups, inputs.band, prep.compiled)

    _map_bands(run, [task for unit in _row_tasks(x, weight, kernel, guide, a, prep) for task in unit])
    return out, (x.new_zeros(0) if flags_out is None else flags_out)


def _convolved(x, kernel, weight, groups: int, band: _Band, compiled: bool) -> torch.Tensor:
    """``(B, O, *counts)``: a phase's weight ``(groups, O / groups, C / groups * taps)`` times the band's
    :func:`_modulated` windows, a batched matmul (which the compiled loops do without making the windows)."""
    b = x.shape[0]
    if compiled:
        return pac_cpu.conv(x, _flat(kernel, band), weight, _cpu_window(x, band)).view(b, -1, *band.counts)
    modulated = _modulated(x, kernel, band, compiled)
    return torch.matmul(weight, modulated.view(b, groups, -1, math.prod(band.counts))).view(b, -1, *band.counts)


def _convolved_backward(grad, x, kernel, weight, groups: int, band: _Band, gx, need_kernel: bool, need_weight: bool,
                        compiled: bool):
    """Backward of :func:`_convolved` (``grad`` ``(B, O, *counts)``): adds the input gradient into the padded ``gx``
    (when given); returns the kernel gradient ``(B, 1 or C, *taps, *counts)`` (when ``need_kernel``) and the weight
    gradient ``(groups, O / groups, C / groups * taps)``, summed over the batch (when ``need_weight``)."""
    b, c = x.shape[:2]
    grad = grad.reshape(b, groups, -1, math.prod(band.counts))
    if compiled:
        grad = grad.contiguous()
        gk = pac_cpu.conv_backward_input(grad.view(b, -1, grad.shape[-1]), x, _flat(kernel, band), weight,
                                         _cpu_window(x, band), gx, need_kernel)
        gk = None if gk is None else _as_taps(gk, band)
    else:
        g_mod = torch.matmul(weight.transpose(1, 2), grad).view(b, c, *band.taps, *band.counts)
        gk = _modulated_backward(g_mod, x, kernel, band, gx, need_kernel, compiled)
        del g_mod  # (channels x taps per output: freed before the modulated input is made)
    if not need_weight:
        return gk, None
    if compiled and kernel.shape[1] == 1:
        return gk, pac_cpu.conv_backward_weight(grad.view(b, -1, grad.shape[-1]), x, _flat(kernel, band), groups,
                                                _cpu_window(x, band))
    modulated = _modulated(x, kernel, band, compiled).view(b, groups, -1, grad.shape[-1])
    return gk, torch.matmul(grad, modulated.transpose(2, 3)).sum(0, dtype=_acc_dtype(x.dtype))


@_coordinated_op
def _filter_backward(grad_out, x, weight, kernel, guide, centre, mask, alpha, lam, a: _OpArgs, needs):
    need_x, need_w, need_k, need_guide, need_centre, need_alpha, need_lam = (bool(n) for n in needs)
    kernel_dtype = (kernel if a.spec is None else guide).dtype
    prep = _prepare_filter(x, guide, mask, a, kernel_dtype)
    own_centres = centre is None and guide is not None  # their gradient is part of the guide's
    acc = _acc_dtype(x.dtype)
    gx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
    gw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
    gk = torch.zeros_like(kernel) if need_k else None
    gguide = torch.zeros(guide.shape, dtype=guide.dtype, device=x.device) if need_guide or need_centre else None
    gcentre = torch.zeros_like(centre) if (need_guide or need_centre) and not own_centres else None
    need_kernel_grad = need_k or gguide is not None or need_alpha or need_lam
    params = _ParamGrads(alpha if need_alpha else None, lam if need_lam else None)
    grad_out = grad_out.to(x.dtype)

    def run(task, gx, gguide):
        """Add the input and guide gradients of one band of rows into ``gx`` and ``gguide``; return its bands'
        weight and kernel-parameter gradients. Each band's kernel is freed before its guide gradients are made, and
        the rows' input copies and their gradient (folded into ``gx``) before the last band's."""
        rows = _row_inputs(prep, a, task[0][0], own_centres)
        rows_gx = None if gx is None else torch.zeros(rows.x.shape, dtype=gx.dtype, device=x.device)
        rows_gguide = None
        results = []
        for i, (band, w) in enumerate(task):
            out = band.out_index()
            inputs = _band_inputs(prep, rows, a, band, centre)
            kb, _, base = _kernel_of_band(a, kernel, inputs, alpha, lam, prep.compiled)
            go = grad_out[out]
            g_weight = g_params = None
            if w is None:  # pooling: every tap of a channel gets the channel's output gradient
                gkb = _modulated_backward(go, inputs.x, kb.to(x.dtype), inputs.band, rows_gx, need_kernel_grad,
                                          prep.compiled)
            else:
                gkb, g_weight = _convolved_backward(go, inputs.x, kb.to(x.dtype), w, a.groups, inputs.band, rows_gx,
                                                    need_kernel_grad, need_w, prep.compiled)
            del kb
            if i == len(task) - 1:
                if rows_gx is not None:
                    _add_padded_rows(gx, rows_gx, prep.x_pads, rows.x_rows)
                rows_gx, rows, inputs = None, rows._replace(x=None), inputs._replace(x=None)
            if need_kernel_grad:
                gkb = gkb.to(kernel_dtype)
                if gk is not None:
                    gk[band.tap_index() + out[2:]] = gkb
                if gguide is not None or params.needed:
                    grad_dist, g_params = _band_kernel_grads(a.spec, gkb, inputs, alpha, lam, prep.compiled, base)
                    del gkb, base
                    if gguide is not None:
                        if rows_gguide is None:
                            rows_gguide = torch.zeros_like(inputs.guide)
                        band_gcentre = _own_band_centres(prep, rows, rows_gguide, gguide, a, band) if own_centres \
                            else gcentre[out]
                        _band_distance_backward_into(a.spec, grad_dist, inputs.guide, inputs.centre, inputs.band,
                                                     rows_gguide, band_gcentre, prep.compiled)
            results.append((band, g_weight, g_params))
        if rows_gguide is not None:
            _add_padded_rows(gguide, rows_gguide, prep.guide_pads, rows.guide_rows)
        return results

    # A band's temporaries in the backward (twice the forward's: the gradients of its row copies) come on top of
    # the input and guide gradients: on a CPU they stay within a quarter of the op's inputs and output.
    limit = None
    if x.device.type == "cpu":
        out_bytes = grad_out.numel() * x.element_size()
        limit = (sum(t.numel() * t.element_size() for t in (x, kernel, guide) if t is not None) + out_bytes) // 4
    units = _row_tasks(x, weight, kernel, guide, a, prep, limit)
    if len(units) == 1:  # the bands of rows of a disjoint set read disjoint rows: each set is folded in parallel
        tasks = units[0]
        results = [r for disjoint in _disjoint_sets(tasks, tasks[0][0][0], guide is not None)
                   for task_results in _map_bands(lambda task: run(task, gx, gguide), disjoint)
                   for r in task_results]
    else:  # phases along the first axis read overlapping rows: fixed groups of them, each folding into own buffers
        workers = getattr(_thread_state, "threads", None) or 1
        groups = _balanced_groups(units, min(len(units), workers))

        def run_group(group):  # one group (one worker) folds straight into the totals
            own = (gx, gguide) if len(groups) == 1 else [None if t is None else torch.zeros_like(t) for t in (gx, gguide)]
            return own, [r for unit in group for task in unit for r in run(task, *own)]

        results = []
        for own, group_results in _map_bands(run_group, groups):  # summed in a fixed order
            for total, part in zip((gx, gguide), own):
                if total is not None and part is not total:
                    total += part
            results += group_results
    for band, g_weight, g_params in results:
        if g_weight is not None:
            gw[band.tap_index()] += g_weight.view(gw.shape[0], gw.shape[1], *band.taps)
        params.add(g_params)
    if gx is not None:
        gx = gx.to(x.dtype)
    if gguide is not None:
        gguide = _laid_out_like(gguide, guide)
    if gw is not None:
        gw = gw.to(weight.dtype)
    return (gx, gw, gk, gguide, gcentre) + params.result()


def _balanced_groups(units: list, count: int) -> List[list]:
    """The filter op's units of work (see :func:`_row_tasks`) dealt into ``count`` groups of about equal work (taps x
    outputs): each unit in turn, largest first, to the group with the least work so far (a fixed order, so sums are
    deterministic)."""
    def work(unit):
        return sum(math.prod(band.taps) * math.prod(band.counts) for task in unit for band, _ in task)

    groups, loads = [[] for _ in range(count)], [0] * count
    for unit in sorted(units, key=work, reverse=True):
        i = loads.index(min(loads))
        groups[i].append(unit)
        loads[i] += work(unit)
    return groups


class _ParamGrads:
    """Sums the per-band gradients of inv_alpha and inv_lambda (None when not needed)."""

    def __init__(self, alpha, lam):
        self.grads = [None if alpha is None else torch.zeros_like(alpha), None if lam is None else torch.zeros_like(lam)]

    @property
    def needed(self) -> bool:
        return any(g is not None for g in self.grads)

    def add(self, band_grads) -> None:
        if band_grads is not None:
            for total, g in zip(self.grads, band_grads):
                if total is not None:
                    total += g

    def result(self):
        return tuple(self.grads)


def _band_kernel_grads(spec: _KernelSpec, gkb, inputs: _BandInputs, alpha, lam, compiled: bool, base=None):
    """The gradients of one band's kernel ``gkb`` (overwritten) with respect to its guide distances (in the memory
    of ``gkb``) and ``(grad alpha, grad lambda)`` (None for a gaussian kernel). ``base``, when the caller has it, is
    the kernel before masking and normalisation (a gaussian kernel's gradient then needs no distances)."""
    if spec.kind != _GAUSSIAN:
        base = None  # (the 'inv' kernels' gradients need the distances themselves)
    dist = None if base is not None else _band_distance(spec, inputs.guide, inputs.centre, inputs.band, compiled)
    grad_dist, ga, gl = _band_kernel_backward(spec, gkb, dist, _band_of(inputs.valid, inputs.band),
                                              _band_of(inputs.pattern, inputs.band), alpha, lam, base)
    return grad_dist, None if ga is None else (ga, gl)


def _kernel_inputs(guide, mask, a: _OpArgs):
    """What ``pac::kernel`` reads: the padded guide, the window geometry over it (a stride-1 'same' window for a
    transposed layer, whose guide is at the output resolution, the layer's own window otherwise) and the validity
    images laid out like the windows read them."""
    dims = len(a.k)
    win_s = (1,) * dims if a.transposed else a.s
    phases = tuple(ph[0] for ph in _phases(False, a.k, win_s, a.p, a.d, a.out_size))
    if a.transposed:
        in_size = tuple(_transposed_in_size(a.out_size[i], a.k[i], a.s[i], a.p[i], a.op[i], a.d[i])
                        for i in range(dims))
    else:
        in_size = tuple(guide.shape[2:])
    valid, pattern = (None if v is None else _as_read(v, a) for v in _validity(mask, a, in_size, guide.dtype,
                                                                             guide.device))
    return _pad(guide, _guide_pads(a)), phases, valid, pattern


def _first_axis_rows(t: torch.Tensor, band: _Band) -> torch.Tensor:
    """The band's outputs of a ``(B, C, [*taps,] *out)`` tensor of a stride-1 window (no phases)."""
    return t.narrow(t.dim() - len(band.phases), band.t0, band.t1 - band.t0)


def _kernel_rows_bytes(guide, centre, a: _OpArgs, phases, compiled: bool) -> int:
    """:func:`_band_rows_bytes` of ``pac::kernel``."""
    kernel_channels = centre.shape[1] if a.spec.channel_wise else 1
    values = _temporary_values(0, guide.shape[1], kernel_channels, math.prod(ph.taps for ph in phases), False, compiled)
    return _band_rows_bytes(guide.shape[0], values, phases, guide.element_size())


@_coordinated_op
def _kernel_forward(guide, centre, mask, alpha, lam, a: _OpArgs):
    guide, phases, valid, pattern = _kernel_inputs(guide, mask, a)
    compiled = _compiled(guide)
    centre = _own_centres(guide, a) if centre is None else centre
    b = guide.shape[0]
    kernel = guide.new_empty(b, guide.shape[1] if a.spec.channel_wise else 1, *a.k, *a.out_size)
    flags_out = None if mask is None else guide.new_zeros(b, kernel.shape[1], *a.out_size)

    def run(band: _Band) -> None:
        dist = _band_distance(a.spec, guide, _first_axis_rows(centre, band), band, compiled)
        kb, _, flags, _ = _band_kernel(a.spec, dist, _band_of(valid, band), _band_of(pattern, band), alpha, lam)
        _first_axis_rows(kernel, band).copy_(kb)
        if flags_out is not None:
            _first_axis_rows(flags_out, band).copy_(flags)

    _map_bands(run, _bands(phases, _kernel_rows_bytes(guide, centre, a, phases, compiled), guide.device, True))
    return kernel, (guide.new_zeros(0) if flags_out is None else flags_out)


@_coordinated_op
def _kernel_backward(grad_kernel, guide, centre, mask, alpha, lam, a: _OpArgs, needs):
    need_guide, need_centre, need_alpha, need_lam = (bool(n) for n in needs)
    given = guide
    guide, phases, valid, pattern = _kernel_inputs(guide, mask, a)
    compiled = _compiled(guide)
    gguide = torch.zeros_like(guide)
    own_centres = centre is None  # their gradient is part of the guide's
    centre, gcentre = ((_own_centres(guide, a), _own_centres(gguide, a)) if own_centres else
                       (centre, torch.zeros_like(centre)))
    params = _ParamGrads(alpha if need_alpha else None, lam if need_lam else None)
    grad_kernel = grad_kernel.to(guide.dtype)

    def run(band: _Band):
        inputs = _BandInputs(band, None, guide, _first_axis_rows(centre, band), valid, pattern)
        grad_dist, g_params = _band_kernel_grads(a.spec, _first_axis_rows(grad_kernel, band).clone(), inputs, alpha,
                                                 lam, compiled)
        _band_distance_backward_into(a.spec, grad_dist, guide, inputs.centre, band, gguide,
                                     _first_axis_rows(gcentre, band), compiled)
        return g_params

    bands = _bands(phases, _kernel_rows_bytes(guide, centre, a, phases, compiled), guide.device, True)
    for disjoint in _disjoint_sets(bands, bands[0], True):
        for g_params in _map_bands(run, disjoint):
            params.add(g_params)
    unpad = (slice(None), slice(None), *(slice(p, p + n) for p, n in zip(_guide_pads(a), given.shape[2:])))
    return (_laid_out_like(gguide[unpad], given), None if own_centres else gcentre) + params.result()


# Registration. The ops take the layer geometry and options as integer lists (see _encode); optional
# tensors are None when unused. Unneeded gradients come back as empty tensors.

def _empty_if_none(tensors, like):
    return [like.new_empty(0) if t is None else t for t in tensors]


@torch.library.custom_op("pac::filter", mutates_args=())
def _filter_op(x: Tensor, weight: Optional[Tensor], kernel: Optional[Tensor], guide: Optional[Tensor],
               centre: Optional[Tensor], mask: Optional[Tensor], inv_alpha: Optional[Tensor],
               inv_lambda: Optional[Tensor], geometry: List[int], options: List[int]) -> Tuple[Tensor, Tensor]:
    """PAC filtering ``(output without bias, output mask flags or an empty tensor)``."""
    with torch.autocast(x.device.type, enabled=False):
        return _filter_forward(x, weight, kernel, guide, centre, mask, inv_alpha, inv_lambda,
                               _OpArgs.decode(geometry, options, mask is not None))


@_filter_op.register_fake
def _(x, weight, kernel, guide, centre, mask, inv_alpha, inv_lambda, geometry, options):
    a = _OpArgs.decode(geometry, options)
    b, c = x.shape[:2]
    out = x.new_empty(b, c if weight is None else weight.shape[0], *a.out_size)
    if mask is None or a.spec is None:
        return out, x.new_empty(0)
    return out, guide.new_empty(b, guide.shape[1] if a.spec.channel_wise else 1, *a.out_size)


@torch.library.custom_op("pac::filter_backward", mutates_args=())
def _filter_backward_op(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], kernel: Optional[Tensor],
                        guide: Optional[Tensor], centre: Optional[Tensor], mask: Optional[Tensor],
                        inv_alpha: Optional[Tensor], inv_lambda: Optional[Tensor], geometry: List[int],
                        options: List[int], needs: List[int]) -> List[Tensor]:
    """Gradients of ``pac::filter`` for (x, weight, kernel, guide, centre, inv_alpha, inv_lambda)."""
    with torch.autocast(x.device.type, enabled=False):
        grads = _filter_backward(grad_out, x, weight, kernel, guide, centre, mask, inv_alpha, inv_lambda,
                                 _OpArgs.decode(geometry, options, mask is not None), needs)
    return _empty_if_none(grads, x)


@_filter_backward_op.register_fake
def _(grad_out, x, weight, kernel, guide, centre, mask, inv_alpha, inv_lambda, geometry, options, needs):
    # The input and weight gradients are contiguous; the others are laid out like their tensors (zeros_like).
    inputs = (x, weight, kernel, guide, centre, inv_alpha, inv_lambda)
    return [x.new_empty(0) if not n or t is None else t.new_empty(t.shape) if i < 2 else torch.empty_like(t)
            for i, (t, n) in enumerate(zip(inputs, needs))]


def _filter_setup_context(ctx, inputs, output):
    x, weight, kernel, guide, centre, mask, inv_alpha, inv_lambda, geometry, options = inputs
    ctx.save_for_backward(x, weight, kernel, guide, centre, mask, inv_alpha, inv_lambda)
    ctx.geometry, ctx.options = geometry, options


def _filter_autograd(ctx, grad_out, grad_flags):
    needs = [int(ctx.needs_input_grad[i]) for i in (0, 1, 2, 3, 4, 6, 7)]
    grads = _FilterBackwardFn.apply(grad_out, *ctx.saved_tensors, ctx.geometry, ctx.options, needs)
    gx, gw, gk, gguide, gcentre, galpha, glam = (g if n else None for g, n in zip(grads, needs))
    return gx, gw, gk, gguide, gcentre, None, galpha, glam, None, None


_filter_op.register_autograd(_filter_autograd, setup_context=_filter_setup_context)


@torch.library.custom_op("pac::kernel", mutates_args=())
def _kernel_op(guide: Tensor, centre: Optional[Tensor], mask: Optional[Tensor], inv_alpha: Optional[Tensor],
               inv_lambda: Optional[Tensor], geometry: List[int], options: List[int]) -> Tuple[Tensor, Tensor]:
    """The adaptive kernel ``(K, output mask flags or an empty tensor)`` of :func:`packernel2d`."""
    with torch.autocast(guide.device.type, enabled=False):
        return _kernel_forward(guide, centre, mask, inv_alpha, inv_lambda,
                               _OpArgs.decode(geometry, options, mask is not None))


@_kernel_op.register_fake
def _(guide, centre, mask, inv_alpha, inv_lambda, geometry, options):
    a = _OpArgs.decode(geometry, options)
    channels = guide.shape[1] if a.spec.channel_wise else 1
    flags = guide.new_empty(0) if mask is None else guide.new_empty(guide.shape[0], channels, *a.out_size)
    return guide.new_empty(guide.shape[0], channels, *a.k, *a.out_size), flags


@torch.library.custom_op("pac::kernel_backward", mutates_args=())
def _kernel_backward_op(grad_kernel: Tensor, guide: Tensor, centre: Optional[Tensor], mask: Optional[Tensor],
                        inv_alpha: Optional[Tensor], inv_lambda: Optional[Tensor], geometry: List[int],
                        options: List[int], needs: List[int]) -> List[Tensor]:
    """Gradients of ``pac::kernel`` for (guide, centre, inv_alpha, inv_lambda)."""
    with torch.autocast(guide.device.type, enabled=False):
        grads = _kernel_backward(grad_kernel, guide, centre, mask, inv_alpha, inv_lambda,
                                 _OpArgs.decode(geometry, options, mask is not None), needs)
    return _empty_if_none(grads, guide)


@_kernel_backward_op.register_fake
def _(grad_kernel, guide, centre, mask, inv_alpha, inv_lambda, geometry, options, needs):
    inputs = (guide, centre, inv_alpha, inv_lambda)
    return [torch.empty_like(t) if n and t is not None else guide.new_empty(0) for t, n in zip(inputs, needs)]


def _kernel_setup_context(ctx, inputs, output):
    guide, centre, mask, inv_alpha, inv_lambda, geometry, options = inputs
    ctx.save_for_backward(guide, centre, mask, inv_alpha, inv_lambda)
    ctx.geometry, ctx.options = geometry, options


def _kernel_autograd(ctx, grad_kernel, grad_flags):
    needs = [int(ctx.needs_input_grad[i]) for i in (0, 1, 3, 4)]
    grads = _KernelBackwardFn.apply(grad_kernel, *ctx.saved_tensors, ctx.geometry, ctx.options, needs)
    gguide, gcentre, galpha, glam = (g if n else None for g, n in zip(grads, needs))
    return gguide, gcentre, None, galpha, glam, None, None


_kernel_op.register_autograd(_kernel_autograd, setup_context=_kernel_setup_context)


def _first_order_only(op):
    """An autograd.Function running backward op ``op`` (vmap rule generated for ``torch.func``);
    differentiating it again is an error, not a silent zero."""

    class FirstOrderOnly(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return tuple(op(*args))

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, *grads):
            raise NotImplementedError(f"{op} cannot be differentiated: the 'taps' path of the PAC layers has first "
                                      "derivatives only; use impl='unfold' for higher-order derivatives")

    return FirstOrderOnly


_FilterBackwardFn = _first_order_only(torch.ops.pac.filter_backward.default)
_KernelBackwardFn = _first_order_only(torch.ops.pac.kernel_backward.default)


def _transformable(op, setup_context_fn, backward_fn):
    """``(call, Function)`` for a forward op. ``call`` runs the registered op itself while torch.compile or
    torch.export trace (they use its ``register_autograd``), and otherwise an autograd.Function with
    ``setup_context`` and a generated vmap rule: ``torch.func`` transforms (grad, vjp, jacrev, per-sample
    gradients) compose with that, which they cannot do through ``register_autograd`` alone."""

    class Function(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return op(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context_fn(ctx, inputs, output)
            ctx.mark_non_differentiable(output[1])  # the output-mask flags

        backward = staticmethod(backward_fn)

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else Function.apply(*args)

    return call, Function


_filter, _FilterFn = _transformable(torch.ops.pac.filter, _filter_setup_context, _filter_autograd)
_kernel, _KernelFn = _transformable(torch.ops.pac.kernel, _kernel_setup_context, _kernel_autograd)


def _vmap_by_loop(op):
    """A vmap rule that runs ``op`` once per vmapped sample and stacks the results: PAC ops mix the
    batch with parameters (weight gradients), so folding the vmapped dimension into it is not valid."""
    def rule(info, in_dims, *args):
        samples = []
        for i in range(info.batch_size):
            samples.append(op(*(arg.select(dim, i) if isinstance(dim, int) else arg for arg, dim in zip(args, in_dims))))
        outputs = [torch.stack(list(parts)) for parts in zip(*samples)]
        if isinstance(samples[0], list):
            return outputs, [0] * len(outputs)
        return tuple(outputs), (0,) * len(outputs)
    return rule


for _op in (_filter_op, _filter_backward_op, _kernel_op, _kernel_backward_op):
    torch.library.register_vmap(_op, _vmap_by_loop(_op))


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------

def _resolve_impl(impl: str, native_impl: bool = False) -> str:
    """The constructor-time choice: ``native_impl=True`` (the 2019 flag) is an alias of 'unfold'."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(native_impl, bool):
        raise TypeError(f"native_impl must be a bool, got {type(native_impl).__name__}")
    if native_impl:
        if impl not in ("auto", "unfold"):
            raise ValueError(f"native_impl=True means impl='unfold', but impl={impl!r} was given")
        return "unfold"
    return impl


def _backend(impl: str, device: torch.device, triton_ok=None) -> str:
    """The backend that runs a call: 'unfold', 'taps' or 'triton'.

    'auto' runs 'triton' on CUDA when ``triton_ok()`` says the fused kernel supports the call, and 'taps'
    otherwise. Exporters that trace through Python (ONNX, TorchScript) get 'unfold', the plain torch ops
    they know how to translate.
    """
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return "unfold"
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_ok is not None and triton_ok() else "taps"
    if impl == "triton" and (triton_ok is None or not triton_ok()):
        raise ValueError("impl='triton' needs the optional Triton extra, a CUDA tensor (or TRITON_INTERPRET=1) and "
                         "options that the fused kernel supports (see pac_triton.supports); use impl='auto' to fall "
                         "back to the 'taps' path")
    return impl


def _without_triton(impl: str) -> str:
    """The fused Triton kernels start from the guide: a precomputed kernel, and the kernel itself, are
    computed on the 'taps' path when 'triton' is asked for."""
    return "taps" if impl == "triton" else impl


def _pac_triton():
    try:
        import pac_triton
    except ImportError:
        return None
    return pac_triton if pac_triton.is_available() else None


# ----------------------------------------------------------------------------------------------
# The adaptive kernel
# ----------------------------------------------------------------------------------------------

class _GuideGeometry(NamedTuple):
    guide: torch.Tensor        # the guide as the ops take it (see _Layer.for_ops), float32 (float64 for float64)
    pads: Tuple[int, ...]      # the zeros that the kernel's windows read around it
    win_s: Tuple[int, ...]     # the windows' stride over it
    out_size: Tuple[int, ...]
    in_size: Tuple[int, ...]   # the layer's input size
    op_centre: Optional[torch.Tensor]  # the smoothed centre feature of every window (B, C, *out), or None: the guide's

    def padded(self) -> torch.Tensor:
        """The guide padded as the kernel's windows read it."""
        return _pad(self.guide, self.pads)


def _guide_geometry(input: torch.Tensor, layer: "_Layer", smooth_kernel) -> _GuideGeometry:
    """The guide as the ops take it, the geometry of the kernel's windows over it and, with a smoothing kernel,
    every window's smoothed centre."""
    guide = input if input.dtype == torch.float64 else input.float()
    k, s, p, op, d = layer.k, layer.s, layer.p, layer.op, layer.d
    size, dims = tuple(guide.shape[2:]), len(k)
    if layer.transposed:
        win_s, win_p = (1,) * dims, tuple((k[a] - 1) * d[a] // 2 for a in range(dims))
        out_size = size
        in_size = tuple(_transposed_in_size(size[a], k[a], s[a], p[a], op[a], d[a]) for a in range(dims))
    else:
        win_s, win_p = s, layer.op_padding
        out_size = _conv_out_size(size, k, s, p, d, name="the guide")
        in_size = size
    geo = _GuideGeometry(layer.for_ops(guide), win_p, win_s, out_size, in_size, None)
    if smooth_kernel is None:
        return geo
    return geo._replace(op_centre=_smoothed_centre(geo.padded(), smooth_kernel.to(guide.dtype), k, win_s, d, out_size))


def _kernel_params(kernel_type: str, inv_alpha, inv_lambda, dtype):
    """``(alpha, lambda)`` in the kernel's dtype for 'inv_*' kernels, else ``(None, None)``."""
    if not kernel_type.startswith("inv"):
        return None, None
    return inv_alpha.to(dtype), inv_lambda.to(dtype)


def packernel2d(input: torch.Tensor, mask: Optional[torch.Tensor] = None, kernel_size: IntPair = 0,
                stride: IntPair = 1, padding: IntPair = 0, output_padding: IntPair = 0, dilation: IntPair = 1,
                kernel_type: str = "gaussian", smooth_kernel_type: str = "none",
                smooth_kernel: Optional[torch.Tensor] = None, inv_alpha: Optional[torch.Tensor] = None,
                inv_lambda: Optional[torch.Tensor] = None, channel_wise: bool = False,
                normalize_kernel: bool = False, transposed: bool = False, native_impl: bool = False,
                padding_mode: str = "zeros", impl: str = "auto") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Compute the adaptive kernel ``K`` of a PAC layer from its guide.

    Args:
        input: the guide ``F``. At the layer's input resolution, or at its output resolution when
            ``transposed``.
        mask: optional validity mask at the layer's *input* resolution, ``(B, 1, H, W)``. Masked-out taps
            get zero weight; ``K`` is renormalised by the fraction of valid taps (or to sum 1 when
            ``normalize_kernel``).
        kernel_size, stride, padding, output_padding, dilation: the layer's geometry.
        kernel_type: ``'gaussian'`` (``exp(-D/2)``) or ``'inv_{alpha}_{lambda}[_asym][_fixed]'``
            (``alpha + (D + 1e-4)^(lambda/2)``: lambda < 0 decays with distance). ``_asym`` counts only
            neighbours whose feature exceeds the centre's.
        smooth_kernel_type, smooth_kernel: when not ``'none'``, the centre feature is replaced by the guide
            correlated with ``smooth_kernel`` ``(1, 1, s, s)`` around the centre tap.
        inv_alpha, inv_lambda: tensors (scalars, or per channel with ``channel_wise``) for 'inv_*' kernels.
        channel_wise: keep one kernel per guide channel instead of summing distances over channels.
        normalize_kernel: make the kernel sum to one over the taps that fall on real pixels.
        transposed: compute the kernel of a transposed convolution (stride-1 "same" windows on the
            output-resolution guide; the geometry only shapes the mask pattern).
        native_impl: the 2019 flag, an alias of ``impl='unfold'``.
        padding_mode: how the guide is padded ('zeros', 'reflect', 'replicate', 'circular').
        impl: ``'auto'`` or ``'taps'`` (the registered ``pac::kernel`` op, computed band by band), or
            ``'unfold'`` (plain autograd through ``unfold``).

    Returns:
        ``(K, output_mask)``: ``K`` of shape ``(B, 1 or C, kh, kw, H', W')`` in float32 (float64 for a
        float64 guide); ``output_mask`` ``(B, 1 or C, H', W')`` is returned only when ``mask`` is given.

    Example:
        >>> guide = torch.rand(2, 3, 16, 16)
        >>> K, _ = packernel2d(guide, kernel_size=5, padding=2)
        >>> K.shape
        torch.Size([2, 1, 5, 5, 16, 16])
    """
    return _packernel(2, input, mask, kernel_size, stride, padding, output_padding, dilation, kernel_type,
                      smooth_kernel_type, smooth_kernel, inv_alpha, inv_lambda, channel_wise, normalize_kernel,
                      transposed, padding_mode, _resolve_impl(impl, native_impl))


def packernel3d(input: torch.Tensor, mask: Optional[torch.Tensor] = None, kernel_size: IntTriple = 0,
                stride: IntTriple = 1, padding: IntTriple = 0, output_padding: IntTriple = 0,
                dilation: IntTriple = 1, kernel_type: str = "gaussian", smooth_kernel_type: str = "none",
                smooth_kernel: Optional[torch.Tensor] = None, inv_alpha: Optional[torch.Tensor] = None,
                inv_lambda: Optional[torch.Tensor] = None, channel_wise: bool = False,
                normalize_kernel: bool = False, transposed: bool = False, padding_mode: str = "zeros",
                impl: str = "auto") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Compute the adaptive kernel ``K`` of a 3-D PAC layer from its guide ``(B, C, D, H, W)``.

    The 3-D form of :func:`packernel2d` (same arguments; ``smooth_kernel`` is ``(1, 1, s, s, s)``, ``mask``
    ``(B, 1, D, H, W)``).

    Returns:
        ``(K, output_mask)``: ``K`` of shape ``(B, 1 or C, kd, kh, kw, D', H', W')``; ``output_mask``
        ``(B, 1 or C, D', H', W')`` only when ``mask`` is given.

    Example:
        >>> K, _ = packernel3d(torch.rand(1, 3, 8, 16, 16), kernel_size=3, padding=1)
        >>> K.shape
        torch.Size([1, 1, 3, 3, 3, 8, 16, 16])
    """
    return _packernel(3, input, mask, kernel_size, stride, padding, output_padding, dilation, kernel_type,
                      smooth_kernel_type, smooth_kernel, inv_alpha, inv_lambda, channel_wise, normalize_kernel,
                      transposed, padding_mode, _resolve_impl(impl))


def _packernel(dims: int, input, mask, kernel_size, stride, padding, output_padding, dilation, kernel_type,
               smooth_kernel_type, smooth_kernel, inv_alpha, inv_lambda, channel_wise, normalize, transposed,
               padding_mode, impl):
    """:func:`packernel2d` and :func:`packernel3d`."""
    _check_dims("input", input, dims)
    k, s, p, op, d = _geometry(dims, kernel_size=kernel_size, stride=stride, padding=padding,
                               output_padding=output_padding, dilation=dilation)
    if any(v <= 0 or v % 2 == 0 for v in k):
        raise ValueError(f"kernel_size only accept odd numbers, got {k}")
    kind, _, _, asym, _ = _parse_kernel_type(kernel_type)
    smooth_kind, _ = _parse_smooth_kernel_type(smooth_kernel_type)
    if smooth_kind != "none" and smooth_kernel is None:
        raise ValueError(f"smooth_kernel must be given when smooth_kernel_type is {smooth_kernel_type!r}")
    if kind == "inv" and (inv_alpha is None or inv_lambda is None):
        raise ValueError(f"inv_alpha and inv_lambda must be given for kernel_type {kernel_type!r}")
    _check_padding_mode(padding_mode)

    layer = _Layer(k, s, p, op, d, transposed, 1, padding_mode)
    with torch.autocast(input.device.type, enabled=False):
        geo = _guide_geometry(input, layer, smooth_kernel if smooth_kind != "none" else None)
        if mask is not None:
            _check_mask(mask, input.shape[0], geo.in_size)
        alpha, lam = _kernel_params(kernel_type, inv_alpha, inv_lambda, geo.guide.dtype)
        if _backend(_without_triton(impl), input.device) == "unfold":
            return _native_kernel(geo, mask, k, s, p, op, d, kind, asym, alpha, lam, channel_wise, normalize,
                                  transposed, padding_mode)
        geometry, options = _encode(layer, geo.out_size, kernel_type, channel_wise, normalize, kernel_given=False)
        kernel, flags = _kernel(geo.guide, geo.op_centre, layer.mask_for_ops(mask, geo.guide.dtype), alpha, lam,
                                geometry, options)
    return kernel, (flags if mask is not None else None)


def _native_base(dist: torch.Tensor, kind: str, alpha, lam) -> torch.Tensor:
    """The unnormalised kernel of the 'unfold' implementation from its guide distances."""
    if kind == "gaussian":
        return torch.exp(-0.5 * dist)
    return _channel_view(alpha, dist) + (dist + _INV_EPS).pow(0.5 * _channel_view(lam, dist))


def _native_kernel(geo: _GuideGeometry, mask, k, s, p, op, d, kind, asym, alpha, lam, channel_wise, normalize,
                   transposed, padding_mode):
    """The 'unfold' implementation of :func:`packernel2d`: plain autograd through ``unfold``."""
    guide = geo.padded()
    centre = guide[_centre_index(k, d, geo.out_size, geo.win_s)] if geo.op_centre is None else geo.op_centre
    dist = _native_distance(guide, centre, k, geo.win_s, d, asym, channel_wise)
    if mask is None and not normalize:
        return _native_base(dist, kind, alpha, lam), None

    # Which taps fall on real pixels. Zero padding and inserted zeros are not real; a border
    # padded by reflection, replication or wrapping is, and a mask is padded the same way.
    def taps_of(m):
        if transposed or padding_mode == "zeros":
            return nd2col(m, k, s, p, op, d, transposed=transposed)
        return nd2col(_pad(m, p, padding_mode), k, s, 0, 0, d)

    taps = _tap_dims(dist)
    pattern = taps_of(geo.guide.new_ones(1, 1, *geo.in_size))
    valid = pattern if mask is None else taps_of(mask.to(geo.guide.dtype))
    if normalize and kind == "gaussian" and _centre_may_be_invalid(k, p, d, transposed, mask is not None):
        # as _gaussian_: the shift cancels, its gradient is zero
        dist = (dist - _nearest_valid(dist.detach(), valid)).clamp(min=0)
    kernel = _native_base(dist, kind, alpha, lam) * valid
    if not normalize:
        # Windows without any real pixel have a zero mask everywhere: avoid 0 / 0.
        norm = valid.sum(taps, keepdim=True) / pattern.sum(taps, keepdim=True).clamp(min=1)
    else:
        norm = kernel.sum(taps, keepdim=True)
    empty = norm == 0
    kernel = kernel / (norm + empty.to(norm.dtype))
    if mask is None:
        return kernel, None
    # one flag per kernel (a mask of batch 1 still gives a batch of flags, as on the 'taps' path)
    return kernel, (~empty).expand(*kernel.shape[:2], *empty.shape[2:]).to(guide.dtype).flatten(1, 1 + len(k))


def _check_mask(mask: torch.Tensor, batch: int, in_size: Tuple[int, ...]) -> None:
    _check_dims("mask", mask, len(in_size))
    if mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != tuple(in_size):
        raise ValueError(f"mask must have shape ({batch} or 1, 1, {', '.join(map(str, in_size))}) (the layer's "
                         f"input size), got {tuple(mask.shape)}")


# ----------------------------------------------------------------------------------------------
# Functional convolution and pooling with a precomputed kernel
# ----------------------------------------------------------------------------------------------

def _check_kernel(kernel: torch.Tensor, batch: int, channels: int, k, out_size) -> None:
    if not isinstance(kernel, torch.Tensor):
        raise TypeError(f"kernel must be a torch.Tensor, got {type(kernel).__name__}")
    dims = len(k)
    if (kernel.dim() != 2 + 2 * dims or kernel.shape[0] != batch or kernel.shape[1] not in (1, channels)
            or tuple(kernel.shape[2:2 + dims]) != tuple(k) or tuple(kernel.shape[2 + dims:]) != tuple(out_size)):
        expected = f"({batch}, 1{' or ' + str(channels) if channels != 1 else ''}, " \
                   f"{', '.join(map(str, (*k, *out_size)))})"
        raise ValueError(f"kernel must have shape {expected} (batch, channels, kernel_size, output size), "
                         f"got {tuple(kernel.shape)}")


def _check_weight(weight: torch.Tensor, expected: Tuple[int, ...], what: str) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if tuple(weight.shape) != tuple(expected):
        raise ValueError(f"weight must have shape {tuple(expected)} ({what}), got {tuple(weight.shape)}")


def _check_bias(bias: Optional[torch.Tensor], channels: int) -> None:
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (channels,)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or a tensor of shape ({channels},), got {got}")


def _check_padding_mode(padding_mode: str) -> None:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")


class _Layer(NamedTuple):
    """What a PAC layer call needs besides its tensors: the geometry of a stride-``s`` convolution over the
    input padded by ``p`` (``transposed``: of the transposed convolution) and its filter arrangement."""
    k: Tuple[int, ...]
    s: Tuple[int, ...]
    p: Tuple[int, ...]
    op: Tuple[int, ...]
    d: Tuple[int, ...]
    transposed: bool
    groups: int
    padding_mode: str

    def out_size(self, in_size) -> Tuple[int, ...]:
        if self.transposed:
            return _transposed_out_size(in_size, self.k, self.s, self.p, self.op, self.d)
        return _conv_out_size(in_size, self.k, self.s, self.p, self.d)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the 'unfold' path reads it: padded by the layer (``unfolded`` pads a transposed layer's)."""
        return x if self.transposed else _pad(x, self.p, self.padding_mode)

    @property
    def pads_first(self) -> bool:
        """Whether the layer pads the ops' input, guide and mask itself: the ops read zeros around their inputs,
        so a padding mode other than zeros is applied before them."""
        return not self.transposed and self.padding_mode != "zeros"

    @property
    def op_padding(self) -> Tuple[int, ...]:
        """The zeros that the ops read around the input."""
        return (0,) * len(self.p) if self.pads_first else self.p

    def for_ops(self, t: torch.Tensor) -> torch.Tensor:
        """The input or guide as the ops take it: padded first by a padding mode other than zeros."""
        return _pad(t, self.p, self.padding_mode) if self.pads_first else t

    def mask_for_ops(self, mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The mask as the ops take it: padded like the input when :attr:`pads_first` (reflected borders are real
        pixels)."""
        return mask if mask is None or not self.pads_first else self.for_ops(mask.to(dtype))

    def unfolded(self, x: torch.Tensor) -> torch.Tensor:
        """The windows ``(B, C, *k, *out)`` of the padded input, for the 'unfold' path."""
        if self.transposed:
            return nd2col(x, self.k, self.s, self.p, self.op, self.d, transposed=True)
        return nd2col(x, self.k, self.s, 0, 0, self.d)


def _filter_with_kernel(layer: _Layer, x, kernel, weight, bias, impl: str) -> torch.Tensor:
    """Filter ``x`` with a precomputed kernel on the chosen backend, under autocast's dtype when active."""
    _check_kernel(kernel, x.shape[0], x.shape[1], layer.k, layer.out_size(x.shape[2:]))
    x, kernel, weight, bias = _cast_all(_autocast_dtype(x.device.type), x, kernel, weight, bias)
    kernel = kernel.to(x.dtype)
    if _backend(_without_triton(impl), x.device) == "unfold":
        with torch.autocast(x.device.type, enabled=False):
            return _native_taps(layer.unfolded(layer.padded(x)), kernel, weight, bias, layer.groups)
    dims = len(layer.k)
    geometry, options = _encode(layer, tuple(kernel.shape[-dims:]), "gaussian", False, False, kernel_given=True)
    out, _ = _filter(layer.for_ops(x), weight, kernel, None, None, None, None, None, geometry, options)
    return out if bias is None else out + bias.view(1, -1, *([1] * dims))


def _conv_weight(weight, shared_filters: bool, groups: int, channels: int, transposed: bool, dims: int):
    """Check ``weight`` and return it in convolution layout ``(O, C / groups, *k)`` with its groups."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 + dims:
        raise ValueError(f"weight must be {2 + dims}-D, got shape {tuple(weight.shape)}")
    k = tuple(weight.shape[2:])
    taps = "kd, kh, kw" if dims == 3 else "kh, kw"
    if shared_filters:
        _check_weight(weight, (1, 1) + k, "shared filters")
        return weight.expand(channels, 1, *k), channels
    if transposed:
        _check_weight(weight, (channels, weight.shape[1]) + k, f"in_channels, out_channels, {taps}")
        return weight.transpose(0, 1), 1
    if not isinstance(groups, int) or groups <= 0 or channels % groups or weight.shape[0] % groups:
        raise ValueError(f"groups must be a positive integer dividing the input channels ({channels}) and the output "
                         f"channels ({weight.shape[0]}), got {groups}")
    _check_weight(weight, (weight.shape[0], channels // groups) + k, f"out_channels, in_channels / groups, {taps}")
    return weight, groups


def _pacconv(dims: int, input, kernel, weight, bias, stride, padding, dilation, shared_filters, groups, padding_mode,
             impl) -> torch.Tensor:
    """:func:`pacconv2d` and :func:`pacconv3d`."""
    _check_dims("input", input, dims)
    _check_padding_mode(padding_mode)
    weight, groups = _conv_weight(weight, shared_filters, groups, input.shape[1], False, dims)
    _check_bias(bias, weight.shape[0])
    s, p, d = _geometry(dims, stride=stride, padding=padding, dilation=dilation)
    layer = _Layer(tuple(weight.shape[2:]), s, p, (0,) * dims, d, False, groups, padding_mode)
    return _filter_with_kernel(layer, input, kernel, weight, bias, impl)


def _pacconv_transpose(dims: int, input, kernel, weight, bias, stride, padding, output_padding, dilation,
                       shared_filters, impl) -> torch.Tensor:
    """:func:`pacconv_transpose2d` and :func:`pacconv_transpose3d`."""
    _check_dims("input", input, dims)
    weight, groups = _conv_weight(weight, shared_filters, 1, input.shape[1], True, dims)
    _check_bias(bias, weight.shape[0])
    s, p, op, d = _geometry(dims, stride=stride, padding=padding, output_padding=output_padding, dilation=dilation)
    layer = _Layer(tuple(weight.shape[2:]), s, p, op, d, True, groups, "zeros")
    return _filter_with_kernel(layer, input, kernel, weight, bias, impl)


def _pacpool(dims: int, input, kernel, kernel_size, stride, padding, dilation, impl) -> torch.Tensor:
    """:func:`pacpool2d` and :func:`pacpool3d`."""
    _check_dims("input", input, dims)
    k, s, p, d = _geometry(dims, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    layer = _Layer(k, s, p, (0,) * dims, d, False, 1, "zeros")
    return _filter_with_kernel(layer, input, kernel, None, None, impl)


def pacconv2d(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
              dilation: IntPair = 1, shared_filters: bool = False, native_impl: bool = False,
              groups: int = 1, padding_mode: str = "zeros", impl: str = "auto") -> torch.Tensor:
    """Pixel-adaptive convolution with a given adaptive kernel.

    ``out[b,o,y,x] = bias[o] + sum_{c,i,j} W[o,c,i,j] K[b,·,i,j,y,x] X[b,c,y*s+i*d-p,x*s+j*d-p]``.

    Args:
        input: ``(B, C, H, W)``.
        kernel: ``(B, 1, kh, kw, H', W')``, or ``(B, C, ...)`` for one kernel per input channel.
        weight: ``(O, C / groups, kh, kw)``, or ``(1, 1, kh, kw)`` with ``shared_filters`` (every channel
            filtered on its own by the same filter, O = C).
        bias: ``(O,)`` or None.
        stride, padding, dilation, groups: as in :func:`torch.nn.functional.conv2d`.
        padding_mode: 'zeros', 'reflect', 'replicate' or 'circular'.
        native_impl: the 2019 flag, an alias of ``impl='unfold'``.
        impl: ``'auto'`` / ``'taps'`` (the registered ``pac::filter`` op) or ``'unfold'`` (plain autograd);
            ``'triton'`` runs 'taps' here, since the fused kernels start from the guide.

    Shape:
        Output ``(B, O, H', W')`` with ``H' = (H + 2p - d(kh - 1) - 1) // s + 1``.

    Example:
        >>> x, guide = torch.rand(1, 4, 16, 16), torch.rand(1, 3, 16, 16)
        >>> K, _ = packernel2d(guide, kernel_size=3, padding=1)
        >>> pacconv2d(x, K, torch.rand(8, 4, 3, 3), padding=1).shape
        torch.Size([1, 8, 16, 16])
    """
    return _pacconv(2, input, kernel, weight, bias, stride, padding, dilation, shared_filters, groups, padding_mode,
                    _resolve_impl(impl, native_impl))


def pacconv_transpose2d(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                        output_padding: IntPair = 0, dilation: IntPair = 1, shared_filters: bool = False,
                        native_impl: bool = False, impl: str = "auto") -> torch.Tensor:
    """Pixel-adaptive transposed convolution with a given adaptive kernel.

    Equivalent to zero-inserting the input by the stride, padding it by ``(k-1)d - p`` (plus
    ``output_padding`` at the far side) and running a stride-1 PAC correlation with ``W`` permuted to
    ``(C_out, C_in, kh, kw)``. Note the weight is *not* spatially flipped: with a constant kernel this
    equals :class:`torch.nn.ConvTranspose2d` whose weight is flipped in both spatial axes (the
    convention of the released weights). The 'taps' implementation computes one output phase at a
    time and only the real taps, so it never pays for the inserted zeros.

    Args:
        input: ``(B, C_in, H, W)``.
        kernel: ``(B, 1 or C_in, kh, kw, H', W')`` at the output resolution.
        weight: ``(C_in, C_out, kh, kw)``, or ``(1, 1, kh, kw)`` with ``shared_filters``.
        bias: ``(C_out,)`` or None.
        native_impl, impl: as in :func:`pacconv2d`.

    Shape:
        Output ``(B, C_out, H', W')`` with ``H' = (H - 1)s - 2p + d(kh - 1) + 1 + output_padding``.

    Example:
        >>> x, guide = torch.rand(1, 4, 8, 8), torch.rand(1, 3, 16, 16)
        >>> K, _ = packernel2d(guide, kernel_size=5, stride=2, padding=2, output_padding=1, transposed=True)
        >>> pacconv_transpose2d(x, K, torch.rand(4, 2, 5, 5), stride=2, padding=2, output_padding=1).shape
        torch.Size([1, 2, 16, 16])
    """
    return _pacconv_transpose(2, input, kernel, weight, bias, stride, padding, output_padding, dilation,
                              shared_filters, _resolve_impl(impl, native_impl))


def pacpool2d(input: torch.Tensor, kernel: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1,
              padding: IntPair = 0, dilation: IntPair = 1, native_impl: bool = False,
              impl: str = "auto") -> torch.Tensor:
    """Pixel-adaptive pooling: ``out[b,c,y,x] = sum_{i,j} K[b,·,i,j,y,x] X[b,c,y*s+i*d-p,x*s+j*d-p]``.

    A weighted *sum*; it is an average when the kernel is normalised (``normalize_kernel=True``).

    Args:
        input: ``(B, C, H, W)``.
        kernel: ``(B, 1 or C, kh, kw, H', W')``.
        native_impl, impl: as in :func:`pacconv2d`.

    Example:
        >>> x, guide = torch.rand(1, 4, 16, 16), torch.rand(1, 3, 16, 16)
        >>> K, _ = packernel2d(guide, kernel_size=3, stride=2, padding=1, normalize_kernel=True)
        >>> pacpool2d(x, K, 3, stride=2, padding=1).shape
        torch.Size([1, 4, 8, 8])
    """
    return _pacpool(2, input, kernel, kernel_size, stride, padding, dilation, _resolve_impl(impl, native_impl))


def pacconv3d(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor] = None, stride: IntTriple = 1, padding: IntTriple = 0,
              dilation: IntTriple = 1, shared_filters: bool = False, groups: int = 1, padding_mode: str = "zeros",
              impl: str = "auto") -> torch.Tensor:
    """3-D pixel-adaptive convolution with a given adaptive kernel: :func:`pacconv2d` over ``(D, H, W)``.

    Args:
        input: ``(B, C, D, H, W)``.
        kernel: ``(B, 1 or C, kd, kh, kw, D', H', W')`` (see :func:`packernel3d`).
        weight: ``(O, C / groups, kd, kh, kw)``, or ``(1, 1, kd, kh, kw)`` with ``shared_filters``.
        bias, stride, padding, dilation, groups, padding_mode, impl: as in :func:`pacconv2d`.

    Shape:
        Output ``(B, O, D', H', W')`` with ``D' = (D + 2p - d(kd - 1) - 1) // s + 1`` (and so on).

    Example:
        >>> x, guide = torch.rand(1, 4, 8, 16, 16), torch.rand(1, 3, 8, 16, 16)
        >>> K, _ = packernel3d(guide, kernel_size=3, padding=1)
        >>> pacconv3d(x, K, torch.rand(8, 4, 3, 3, 3), padding=1).shape
        torch.Size([1, 8, 8, 16, 16])
    """
    return _pacconv(3, input, kernel, weight, bias, stride, padding, dilation, shared_filters, groups, padding_mode,
                    _resolve_impl(impl))


def pacconv_transpose3d(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, stride: IntTriple = 1, padding: IntTriple = 0,
                        output_padding: IntTriple = 0, dilation: IntTriple = 1, shared_filters: bool = False,
                        impl: str = "auto") -> torch.Tensor:
    """3-D pixel-adaptive transposed convolution with a given adaptive kernel: :func:`pacconv_transpose2d`
    over ``(D, H, W)`` (the weight ``(C_in, C_out, kd, kh, kw)`` is likewise not spatially flipped).

    Shape:
        Output ``(B, C_out, D', H', W')`` with ``D' = (D - 1)s - 2p + d(kd - 1) + 1 + output_padding``.

    Example:
        >>> x, guide = torch.rand(1, 4, 4, 8, 8), torch.rand(1, 3, 8, 16, 16)
        >>> K, _ = packernel3d(guide, kernel_size=3, stride=2, padding=1, output_padding=1, transposed=True)
        >>> pacconv_transpose3d(x, K, torch.rand(4, 2, 3, 3, 3), stride=2, padding=1, output_padding=1).shape
        torch.Size([1, 2, 8, 16, 16])
    """
    return _pacconv_transpose(3, input, kernel, weight, bias, stride, padding, output_padding, dilation,
                              shared_filters, _resolve_impl(impl))


def pacpool3d(input: torch.Tensor, kernel: torch.Tensor, kernel_size: IntTriple, stride: IntTriple = 1,
              padding: IntTriple = 0, dilation: IntTriple = 1, impl: str = "auto") -> torch.Tensor:
    """3-D pixel-adaptive pooling (a weighted sum of every window): :func:`pacpool2d` over ``(D, H, W)``.

    Example:
        >>> x, guide = torch.rand(1, 4, 8, 16, 16), torch.rand(1, 3, 8, 16, 16)
        >>> K, _ = packernel3d(guide, kernel_size=3, stride=2, padding=1, normalize_kernel=True)
        >>> pacpool3d(x, K, 3, stride=2, padding=1).shape
        torch.Size([1, 4, 4, 8, 8])
    """
    return _pacpool(3, input, kernel, kernel_size, stride, padding, dilation, _resolve_impl(impl))


# ----------------------------------------------------------------------------------------------
# Fillers: the initial weights of the 2019 code (spec section 1.6)
# ----------------------------------------------------------------------------------------------

def _fill_uniform(weight, bias, in_channels: int, groups: int, shared_filters: bool) -> None:
    bound = 1.0 / math.sqrt(in_channels // groups * math.prod(weight.shape[2:]))
    if shared_filters:  # kept from the 2019 code: the bound grows with the channel count
        bound *= in_channels
    weight.uniform_(-bound, bound)
    if bias is not None:
        bias.uniform_(-bound, bound)


def _fill_linear(weight, bias, stride, normalize_kernel: bool, channels: int) -> None:
    """A bilinear (trilinear) upsampler: the outer product of triangles, on the diagonal of the channels."""
    profiles = []
    for k, s in zip(weight.shape[2:], stride):
        q = (k - (2 * s - 1)) // 2
        prof = np.array([0.0] * q + [(t + 1) / s for t in range(s)] + [(s - t) / s for t in range(1, s)] + [0.0] * q)
        if normalize_kernel:
            prof *= np.array([(k - j - 1) // s + j // s + 1 for j in range(k)])
        profiles.append(prof)
    taps = torch.from_numpy(functools.reduce(np.multiply.outer, profiles)).to(weight)
    weight.zero_()
    for ch in range(channels):
        weight[ch, ch] = taps
    if bias is not None:
        bias.zero_()


def _fill_crf(weight, bias, shared_filters: bool, perturbed: bool) -> None:
    """A spatial Gaussian without its centre, times a Potts compatibility ``1 - I`` unless shared."""
    k, dims = weight.shape[-1], weight.dim() - 2
    g = _np_gaussian(k, dims)
    for _ in range(dims):  # scaled by k per axis, in the 2019 order of float32 products
        g = g * k
    g = torch.from_numpy(g).to(weight)
    g[(k // 2,) * dims] = 0
    if shared_filters:
        weight.copy_(g.view(1, 1, *g.shape))
    else:
        compat = 1 - torch.eye(weight.shape[0], dtype=g.dtype, device=g.device)
        weight.copy_(compat.view(*compat.shape, *([1] * dims)) * g)
    if perturbed:
        weight.add_(torch.empty_like(weight).uniform_(-0.0005, 0.0005))
    if bias is not None:
        bias.zero_()


FILLERS = ("uniform", "linear", "crf", "crf_perturbed", "pool", "crf_pool")


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class _PacKernelLayer(nn.Module):
    """The adaptive-kernel part shared by every PAC layer: window geometry, kernel type, smoothing,
    normalisation, padding and backend; the learnable kernel parameters; :meth:`compute_kernel`."""

    _dims = 2  # spatial dimensions (the 3-D layers set 3)

    def __init__(self, *, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair,
                 padding: IntPair, dilation: IntPair, output_padding: IntPair, transposed: bool, pool_only: bool,
                 kernel_type: str, smooth_kernel_type: str, channel_wise: bool, normalize_kernel: bool,
                 shared_filters: bool, filler: str, groups: int, padding_mode: str, impl: str, native_impl: bool):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation, self.output_padding = _geometry(
            self._dims, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
            output_padding=output_padding)
        self.transposed, self.pool_only = transposed, pool_only
        self.kernel_type, self.smooth_kernel_type = kernel_type, smooth_kernel_type
        self.channel_wise, self.normalize_kernel = channel_wise, normalize_kernel
        self.shared_filters, self.filler, self.groups, self.padding_mode = shared_filters, filler, groups, padding_mode
        self.impl = _resolve_impl(impl, native_impl)
        self._validate_kernel_options()

    @property
    def native_impl(self) -> bool:
        """The 2019 flag: True when this layer runs the 'unfold' implementation."""
        return self.impl == "unfold"

    @native_impl.setter
    def native_impl(self, value: bool) -> None:
        self.impl = _resolve_impl("auto", value)

    def _validate_kernel_options(self) -> None:
        k, d, p = self.kernel_size, self.dilation, self.padding
        if any(v <= 0 or v % 2 == 0 for v in k):
            raise ValueError(f"kernel_size only accept odd numbers, got {k}")
        _parse_smooth_kernel_type(self.smooth_kernel_type)
        _parse_kernel_type(self.kernel_type)
        if any(v < 1 for v in self.stride + d):
            raise ValueError(f"stride and dilation must be positive, got stride={self.stride}, dilation={d}")
        if any(p[a] < 0 or p[a] > d[a] * (k[a] - 1) // 2 for a in range(self._dims)):
            raise ValueError(f"padding must be between 0 and dilation * (kernel_size - 1) / 2 = "
                             f"{tuple(d[a] * (k[a] - 1) // 2 for a in range(self._dims))}, got {p}")
        if any(v < 0 for v in self.output_padding):
            raise ValueError(f"output_padding must be non-negative, got {self.output_padding}")
        if self.channel_wise and self.kernel_type.startswith("inv") and "fixed" not in self.kernel_type \
                and self.out_channels <= 0:
            raise ValueError(f"out_channels needed for channel_wise {self.kernel_type}: got "
                             f"out_channels={self.out_channels}, expected the number of guide channels")
        _check_padding_mode(self.padding_mode)

    def _register_kernel_parameters(self) -> None:
        """inv_alpha / inv_lambda and smooth_kernel, registered after any weight and bias (the 2019 key order)."""
        kind, alpha, lam, _, fixed = _parse_kernel_type(self.kernel_type)
        if kind == "inv":
            self.inv_alpha_init, self.inv_lambda_init = alpha, lam
            if fixed:
                self.register_buffer("inv_alpha", torch.tensor(alpha))
                self.register_buffer("inv_lambda", torch.tensor(lam))
            else:
                shape = (self.out_channels,) if self.channel_wise else ()
                self.inv_alpha = nn.Parameter(torch.full(shape, alpha))
                self.inv_lambda = nn.Parameter(torch.full(shape, lam))
        smooth_kind, width = _parse_smooth_kernel_type(self.smooth_kernel_type)
        shape = (1, 1) + (width,) * self._dims
        if smooth_kind == "gaussian":  # the outer product of [1/4, 1/2, 1/4] over every axis
            g = taps = torch.tensor([0.25, 0.5, 0.25])
            for _ in range(self._dims - 1):
                taps = taps[..., None] * g
            self.register_buffer("smooth_kernel", taps.view(shape))
        elif smooth_kind == "average":
            self.register_buffer("smooth_kernel", torch.full(shape, 1.0 / width ** self._dims))
        elif smooth_kind == "full":
            self.smooth_kernel = nn.Parameter(torch.full(shape, 1.0 / width ** self._dims))

    def reset_parameters(self) -> None:
        """Re-initialise the learnable kernel parameters."""
        with torch.no_grad():
            if isinstance(getattr(self, "inv_alpha", None), nn.Parameter):
                self.inv_alpha.fill_(self.inv_alpha_init)
                self.inv_lambda.fill_(self.inv_lambda_init)
            if isinstance(getattr(self, "smooth_kernel", None), nn.Parameter):
                self.smooth_kernel.fill_(1.0 / self.smooth_kernel.numel())

    def compute_kernel(self, input_for_kernel: torch.Tensor, input_mask: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The adaptive kernel of this layer for a guide (see :func:`packernel2d` and :func:`packernel3d`)."""
        return _packernel(self._dims, input_for_kernel, input_mask, self.kernel_size, self.stride, self.padding,
                          self.output_padding, self.dilation, self.kernel_type, self.smooth_kernel_type,
                          getattr(self, "smooth_kernel", None), getattr(self, "inv_alpha", None),
                          getattr(self, "inv_lambda", None), self.channel_wise, self.normalize_kernel, self.transposed,
                          self.padding_mode, self.impl)

    def _layer(self, groups: int) -> _Layer:
        return _Layer(self.kernel_size, self.stride, self.padding, self.output_padding, self.dilation, self.transposed,
                      groups, self.padding_mode)

    def _check_guide(self, input: torch.Tensor, guide: Optional[torch.Tensor]) -> torch.Tensor:
        """The guide must match the input's batch and the input size (the output size when transposed)."""
        if guide is None:
            raise ValueError("input_for_kernel (the guide) is required when no precomputed kernel is given")
        _check_dims("input_for_kernel", guide, self._dims)
        size = self._layer(1).out_size(input.shape[2:]) if self.transposed else tuple(input.shape[2:])
        if tuple(guide.shape[2:]) != tuple(size) or guide.shape[0] != input.shape[0]:
            where = "output" if self.transposed else "input"
            raise ValueError(f"input_for_kernel must match the layer's {where} batch and size "
                             f"({input.shape[0]}, *, {', '.join(map(str, size))}), got {tuple(guide.shape)}")
        return guide

    def _filter(self, input: torch.Tensor, guide: Optional[torch.Tensor], kernel: Optional[torch.Tensor],
                mask: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                groups: int, functional) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """One forward call: with a given kernel through ``functional``, or from the guide on the backend
        that ``impl`` selects (the kernel computed band by band inside the 'taps' op)."""
        if kernel is not None:
            return functional(kernel)
        guide = self._check_guide(input, guide)
        triton = _pac_triton() if self.impl in ("auto", "triton") else None
        backend = _backend(self.impl, input.device,
                           None if triton is None else lambda: self._triton_supports(triton, input, guide, mask))
        if backend == "unfold":
            kernel, output_mask = self.compute_kernel(guide, mask)
            return _with_mask(functional(kernel), output_mask)
        if backend == "triton":
            return self._triton_forward(triton, input, guide, mask)
        return _with_mask(*self._fused(input, guide, mask, weight, bias, groups))

    def _fused(self, input, guide, mask, weight, bias, groups):
        """The 'taps' path from the guide: one ``pac::filter`` op computes each band's kernel itself."""
        layer = self._layer(groups)
        with torch.autocast(input.device.type, enabled=False):
            smooth = getattr(self, "smooth_kernel", None) if self.smooth_kernel_type != "none" else None
            geo = _guide_geometry(guide, layer, smooth)
            alpha, lam = _kernel_params(self.kernel_type, getattr(self, "inv_alpha", None),
                                        getattr(self, "inv_lambda", None), geo.guide.dtype)
        if mask is not None:
            _check_mask(mask, input.shape[0], geo.in_size)
        x, weight, bias = _cast_all(_autocast_dtype(input.device.type), input, weight, bias)
        geometry, options = _encode(layer, geo.out_size, self.kernel_type, self.channel_wise, self.normalize_kernel,
                                    kernel_given=False)
        out, flags = _filter(layer.for_ops(x), weight, None, geo.guide, geo.op_centre,
                             layer.mask_for_ops(mask, geo.guide.dtype), alpha, lam, geometry, options)
        if bias is not None:
            out = out + bias.view(1, -1, *([1] * self._dims))
        return out, (flags if mask is not None else None)

    def _triton_supports(self, triton, input, guide, mask) -> bool:
        return self._dims == 2 and triton.supports("pool" if self.pool_only else "conv_transpose" if self.transposed else "conv",
                               input, guide, kernel_type=self.kernel_type, smooth_kernel_type=self.smooth_kernel_type,
                               normalize_kernel=self.normalize_kernel, channel_wise=self.channel_wise,
                               shared_filters=self.shared_filters, groups=self.groups, padding_mode=self.padding_mode,
                               mask=mask, stride=self.stride, padding=self.padding, dilation=self.dilation,
                               output_padding=self.output_padding)

    def extra_repr(self) -> str:
        s = "kernel_size={kernel_size}, kernel_type={kernel_type}"
        if not self.pool_only:
            s = "{in_channels}, {out_channels}, " + s
        ones, zeros = (1,) * self._dims, (0,) * self._dims
        if self.stride != ones:
            s += ", stride={stride}"
        if self.padding != zeros:
            s += ", padding={padding}"
        if self.dilation != ones:
            s += ", dilation={dilation}"
        if self.output_padding != zeros:
            s += ", output_padding={output_padding}"
        if not self.pool_only and self.bias is None:
            s += ", bias=False"
        if self.smooth_kernel_type != "none":
            s += ", smooth_kernel_type={smooth_kernel_type}"
        if self.channel_wise:
            s += ", channel_wise=True"
        if self.normalize_kernel:
            s += ", normalize_kernel=True"
        if self.shared_filters:
            s += ", shared_filters=True"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode}"
        if self.impl != "auto":
            s += ", impl={impl}"
        return s.format(**self.__dict__)


class _PacConvLayer(_PacKernelLayer):
    """The convolution part of the PAC convolutions and transposed convolutions: weight, bias, fillers."""

    def __init__(self, *, in_channels: int, out_channels: int, bias: bool, shared_filters: bool, filler: str,
                 groups: int = 1, **kernel_options):
        super().__init__(in_channels=in_channels, out_channels=out_channels, pool_only=False, channel_wise=False,
                         shared_filters=shared_filters, filler=filler, groups=groups, **kernel_options)
        self._validate_conv_options()
        k = self.kernel_size
        if filler in ("pool", "crf_pool"):
            self.register_buffer("weight", torch.ones(1, 1, *k))
            if filler == "crf_pool":
                self.weight[(0, 0, *(v // 2 for v in k))] = 0
        elif shared_filters:
            self.weight = nn.Parameter(torch.empty(1, 1, *k))
        elif self.transposed:
            self.weight = nn.Parameter(torch.empty(in_channels, out_channels, *k))
        else:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *k))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self._register_kernel_parameters()
        self.reset_parameters()

    def _validate_conv_options(self) -> None:
        if self.shared_filters and self.in_channels != self.out_channels:
            raise ValueError("when specifying shared_filters, number of channels should not change: got "
                             f"in_channels={self.in_channels}, out_channels={self.out_channels}")
        if not isinstance(self.groups, int) or self.groups <= 0 or self.in_channels % self.groups \
                or self.out_channels % self.groups:
            raise ValueError(f"groups must divide in_channels ({self.in_channels}) and out_channels "
                             f"({self.out_channels}), got {self.groups}")
        if self.filler not in FILLERS:
            raise ValueError(f"Initialization method (filler={self.filler!r}) not supported: expected one of "
                             f"{FILLERS}")
        if self.filler in ("pool", "crf_pool") and not self.shared_filters:
            raise ValueError(f"filler={self.filler!r} needs shared_filters=True")
        k, s = self.kernel_size, self.stride
        if self.filler == "linear" and (not self.transposed or self.in_channels != self.out_channels
                                        or any(k[a] < 2 * s[a] - 1 for a in range(self._dims))):
            raise ValueError("filler='linear' needs a transposed layer with in_channels == out_channels and "
                             f"kernel_size >= 2 * stride - 1, got transposed={self.transposed}, channels "
                             f"{self.in_channels}->{self.out_channels}, kernel_size={k}, stride={s}")
        if self.filler in ("crf", "crf_perturbed") and (len(set(k)) != 1 or self.in_channels != self.out_channels):
            raise ValueError(f"filler={self.filler!r} needs a square kernel and in_channels == out_channels, got "
                             f"kernel_size={k}, channels {self.in_channels}->{self.out_channels}")

    def reset_parameters(self) -> None:
        """Re-initialise the weight and bias with ``filler``, and the learnable kernel parameters."""
        with torch.no_grad():
            if self.filler == "uniform":
                _fill_uniform(self.weight, self.bias, self.in_channels, self.groups, self.shared_filters)
            elif self.filler == "linear":
                _fill_linear(self.weight, self.bias, self.stride, self.normalize_kernel,
                             1 if self.shared_filters else self.in_channels)
            elif self.filler in ("crf", "crf_perturbed"):
                _fill_crf(self.weight, self.bias, self.shared_filters, self.filler == "crf_perturbed")
        super().reset_parameters()

    def _conv_forward(self, input: torch.Tensor, guide: Optional[torch.Tensor], kernel: Optional[torch.Tensor],
                      mask: Optional[torch.Tensor]) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        name = f"input_{self._dims}d"
        _check_dims(name, input, self._dims)
        if input.shape[1] != self.in_channels:
            raise ValueError(f"{name} must have in_channels={self.in_channels} channels, got {input.shape[1]}")
        weight, groups = _conv_weight(self.weight, self.shared_filters, self.groups, self.in_channels, self.transposed,
                                      self._dims)
        if self.transposed:
            def functional(k):
                return _pacconv_transpose(self._dims, input, k, self.weight, self.bias, self.stride, self.padding,
                                          self.output_padding, self.dilation, self.shared_filters, self.impl)
        else:
            def functional(k):
                return _pacconv(self._dims, input, k, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                self.shared_filters, self.groups, self.padding_mode, self.impl)
        return self._filter(input, guide, kernel, mask, weight, self.bias, groups, functional)


def _with_mask(output: torch.Tensor, output_mask: Optional[torch.Tensor]):
    return output if output_mask is None else (output, output_mask)


class PacConv2d(_PacConvLayer):
    """Pixel-adaptive convolution (Su et al., CVPR 2019).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as in
            :class:`torch.nn.Conv2d`. ``kernel_size`` must be odd and ``padding <= dilation*(k-1)/2``.
        kernel_type: 'gaussian' or 'inv_{alpha}_{lambda}[_asym][_fixed]' (see :func:`packernel2d`).
        smooth_kernel_type: 'none', 'gaussian', 'average_{s}' or 'full_{s}' (learnable).
        normalize_kernel: normalise the adaptive kernel to sum 1 over the valid taps.
        shared_filters: filter every channel on its own with one shared ``(1, 1, kh, kw)`` filter.
        filler: weight initialisation: 'uniform', 'crf', 'crf_perturbed', 'pool' or 'crf_pool'.
        native_impl: the 2019 flag, an alias of ``impl='unfold'``.
        groups, padding_mode: as in :class:`torch.nn.Conv2d` (the guide is padded the same way).
        impl: ``'auto'`` (default: 'triton' on CUDA when it supports the options, else 'taps'), ``'taps'``
            (registered ``pac::`` ops that compute the adaptive kernel band by band and never store it),
            ``'unfold'`` (plain autograd through ``unfold``) or ``'triton'``.

    Example:
        >>> conv = PacConv2d(16, 32, kernel_size=5, padding=2)
        >>> conv(torch.rand(2, 16, 64, 64), torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 32, 64, 64])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, bias: bool = True, kernel_type: str = "gaussian",
                 smooth_kernel_type: str = "none", normalize_kernel: bool = False, shared_filters: bool = False,
                 filler: str = "uniform", native_impl: bool = False, groups: int = 1, padding_mode: str = "zeros",
                 impl: str = "auto"):
        super().__init__(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                         padding=padding, dilation=dilation, output_padding=0, transposed=False, bias=bias,
                         kernel_type=kernel_type, smooth_kernel_type=smooth_kernel_type,
                         normalize_kernel=normalize_kernel, shared_filters=shared_filters, filler=filler,
                         groups=groups, padding_mode=padding_mode, impl=impl, native_impl=native_impl)

    def forward(self, input_2d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Filter ``input_2d`` with kernels adapted to the guide ``input_for_kernel``.

        Args:
            input_2d: the input.
            input_for_kernel: the guide; ignored (may be None) when ``kernel`` is given.
            kernel: optional precomputed kernel (see :meth:`compute_kernel`).
            mask: optional validity mask: masked pixels get no weight.

        Returns:
            The output, or ``(output, output_mask)`` when a mask is given.

        Shape:
            - input_2d: ``(B, C_in, H, W)``; input_for_kernel: ``(B, C_g, H, W)``; mask: ``(B or 1, 1, H, W)``;
              kernel: ``(B, 1 or C_in, kh, kw, H', W')``.
            - output: ``(B, C_out, H', W')`` with ``H' = (H + 2p - d(kh - 1) - 1) // s + 1``; output_mask:
              ``(B, 1, H', W')``.
        """
        return self._conv_forward(input_2d, input_for_kernel, kernel, mask)

    def _triton_forward(self, triton, input, guide, mask):
        weight, groups = _conv_weight(self.weight, self.shared_filters, self.groups, self.in_channels, False, 2)
        return triton.pac_conv2d(input, guide, weight, self.bias, self.stride, self.padding, self.dilation, groups,
                                 self.normalize_kernel, mask=mask)


class PacConvTranspose2d(_PacConvLayer):
    """Pixel-adaptive transposed convolution.

    The weight has the :class:`torch.nn.ConvTranspose2d` layout ``(C_in, C_out, kh, kw)`` but is applied
    without the spatial flip (see :func:`pacconv_transpose2d`). The guide has the *output* resolution.
    Other arguments as :class:`PacConv2d`, plus ``output_padding``; ``filler='linear'`` initialises a
    bilinear upsampler.

    Example:
        >>> up = PacConvTranspose2d(8, 8, kernel_size=5, stride=2, padding=2, output_padding=1)
        >>> up(torch.rand(1, 8, 32, 32), torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 8, 64, 64])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, output_padding: IntPair = 0, dilation: IntPair = 1, bias: bool = True,
                 kernel_type: str = "gaussian", smooth_kernel_type: str = "none", normalize_kernel: bool = False,
                 shared_filters: bool = False, filler: str = "uniform", native_impl: bool = False,
                 impl: str = "auto"):
        super().__init__(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                         padding=padding, dilation=dilation, output_padding=output_padding, transposed=True,
                         bias=bias, kernel_type=kernel_type, smooth_kernel_type=smooth_kernel_type,
                         normalize_kernel=normalize_kernel, shared_filters=shared_filters, filler=filler,
                         padding_mode="zeros", impl=impl, native_impl=native_impl)

    def forward(self, input_2d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Upsample ``input_2d`` with kernels adapted to the output-resolution guide ``input_for_kernel``.

        Args:
            input_2d: the input.
            input_for_kernel: the guide, at the *output* size; ignored (may be None) when ``kernel`` is given.
            kernel: optional precomputed kernel (see :meth:`compute_kernel`).
            mask: optional validity mask, at the *input* size.

        Returns:
            The output, or ``(output, output_mask)`` when a mask is given.

        Shape:
            - input_2d: ``(B, C_in, H, W)``; input_for_kernel: ``(B, C_g, H', W')``; mask: ``(B or 1, 1, H, W)``;
              kernel: ``(B, 1 or C_in, kh, kw, H', W')``.
            - output: ``(B, C_out, H', W')`` with ``H' = (H - 1)s - 2p + d(kh - 1) + 1 + output_padding``;
              output_mask: ``(B, 1, H', W')``.
        """
        return self._conv_forward(input_2d, input_for_kernel, kernel, mask)

    def _triton_forward(self, triton, input, guide, mask):
        return triton.pac_conv_transpose2d(input, guide, self.weight, self.bias, self.stride, self.padding,
                                           self.output_padding, self.dilation, self.normalize_kernel, mask=mask)


class _PacPoolLayer(_PacKernelLayer):
    """The pooling layers: an adaptive kernel and no weight."""

    def __init__(self, *, kernel_size, stride, padding, dilation, kernel_type: str, smooth_kernel_type: str,
                 channel_wise: bool, normalize_kernel: bool, out_channels: int, impl: str, native_impl: bool = False):
        super().__init__(in_channels=-1, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                         padding=padding, dilation=dilation, output_padding=0, transposed=False, pool_only=True,
                         kernel_type=kernel_type, smooth_kernel_type=smooth_kernel_type, channel_wise=channel_wise,
                         normalize_kernel=normalize_kernel, shared_filters=False, filler="uniform", groups=1,
                         padding_mode="zeros", impl=impl, native_impl=native_impl)
        self._register_kernel_parameters()
        self.reset_parameters()

    def _pool_forward(self, input: torch.Tensor, guide: Optional[torch.Tensor], kernel: Optional[torch.Tensor],
                      mask: Optional[torch.Tensor]) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        name = f"input_{self._dims}d"
        _check_dims(name, input, self._dims)
        channels = input.shape[1]
        if self.out_channels > 0 and self.out_channels != channels:
            raise ValueError(f"{name} must have out_channels={self.out_channels} channels, got {channels}")
        if self.channel_wise:
            source = kernel if kernel is not None else guide
            if isinstance(source, torch.Tensor) and source.shape[1] != channels:
                raise ValueError("input and kernel must have the same number of channels when channel_wise=True: "
                                 f"input has {channels}, {'kernel' if kernel is not None else 'guide'} "
                                 f"{source.shape[1]}")
        return self._filter(
            input, guide, kernel, mask, None, None, 1,
            lambda k: _pacpool(self._dims, input, k, self.kernel_size, self.stride, self.padding, self.dilation,
                               self.impl))


class PacPool2d(_PacPoolLayer):
    """Pixel-adaptive pooling: a weighted sum of every window (an average with ``normalize_kernel``).

    Note ``stride`` defaults to 1 (not to ``kernel_size`` as in :class:`torch.nn.AvgPool2d`).

    Args:
        kernel_size, stride, padding, dilation: window geometry.
        kernel_type, smooth_kernel_type, normalize_kernel, native_impl, impl: see :class:`PacConv2d`.
        channel_wise: one adaptive kernel per channel; the guide then has as many channels as the input.
        out_channels: number of channels, needed for learnable per-channel 'inv_*' parameters.

    Example:
        >>> pool = PacPool2d(kernel_size=3, stride=2, padding=1, normalize_kernel=True)
        >>> pool(torch.rand(1, 4, 32, 32), torch.rand(1, 3, 32, 32)).shape
        torch.Size([1, 4, 16, 16])
    """

    def __init__(self, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
                 kernel_type: str = "gaussian", smooth_kernel_type: str = "none", channel_wise: bool = False,
                 normalize_kernel: bool = False, out_channels: int = -1, native_impl: bool = False,
                 impl: str = "auto"):
        super().__init__(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                         kernel_type=kernel_type, smooth_kernel_type=smooth_kernel_type, channel_wise=channel_wise,
                         normalize_kernel=normalize_kernel, out_channels=out_channels, impl=impl,
                         native_impl=native_impl)

    def forward(self, input_2d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Pool ``input_2d`` over windows weighted by kernels adapted to the guide ``input_for_kernel``.

        Args:
            input_2d: the input.
            input_for_kernel: the guide; ignored (may be None) when ``kernel`` is given.
            kernel: optional precomputed kernel (see :meth:`compute_kernel`).
            mask: optional validity mask: masked pixels get no weight.

        Returns:
            The output, or ``(output, output_mask)`` when a mask is given.

        Shape:
            - input_2d: ``(B, C, H, W)``; input_for_kernel: ``(B, C_g, H, W)`` (``C_g = C`` when channel_wise);
              mask: ``(B or 1, 1, H, W)``; kernel: ``(B, 1 or C, kh, kw, H', W')``.
            - output: ``(B, C, H', W')`` with ``H' = (H + 2p - d(kh - 1) - 1) // s + 1``; output_mask:
              ``(B, 1 or C, H', W')``.
        """
        return self._pool_forward(input_2d, input_for_kernel, kernel, mask)

    def _triton_forward(self, triton, input, guide, mask):
        return triton.pac_pool2d(input, guide, self.kernel_size, self.stride, self.padding, self.dilation,
                                 self.normalize_kernel, mask=mask)


# ----------------------------------------------------------------------------------------------
# 3-D layers: the same engine over (D, H, W)
# ----------------------------------------------------------------------------------------------

class PacConv3d(_PacConvLayer):
    """3-D pixel-adaptive convolution: :class:`PacConv2d` over volumes or videos ``(B, C, D, H, W)``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, groups, padding_mode: as in
            :class:`torch.nn.Conv3d` (``kernel_size`` odd, ``padding <= dilation*(k-1)/2``).
        kernel_type, smooth_kernel_type, normalize_kernel, shared_filters, filler, impl: see :class:`PacConv2d`;
            smoothing kernels and fillers are their 3-D forms. ``'auto'`` runs 'taps' (the Triton kernels are
            2-D only).

    Example:
        >>> conv = PacConv3d(4, 8, kernel_size=3, padding=1)
        >>> conv(torch.rand(1, 4, 8, 16, 16), torch.rand(1, 3, 8, 16, 16)).shape
        torch.Size([1, 8, 8, 16, 16])
    """

    _dims = 3

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntTriple, stride: IntTriple = 1,
                 padding: IntTriple = 0, dilation: IntTriple = 1, bias: bool = True, kernel_type: str = "gaussian",
                 smooth_kernel_type: str = "none", normalize_kernel: bool = False, shared_filters: bool = False,
                 filler: str = "uniform", groups: int = 1, padding_mode: str = "zeros", impl: str = "auto"):
        super().__init__(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                         padding=padding, dilation=dilation, output_padding=0, transposed=False, bias=bias,
                         kernel_type=kernel_type, smooth_kernel_type=smooth_kernel_type,
                         normalize_kernel=normalize_kernel, shared_filters=shared_filters, filler=filler,
                         groups=groups, padding_mode=padding_mode, impl=impl, native_impl=False)

    def forward(self, input_3d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Filter ``input_3d`` with kernels adapted to the guide ``input_for_kernel``.

        Args and returns as :meth:`PacConv2d.forward`.

        Shape:
            - input_3d: ``(B, C_in, D, H, W)``; input_for_kernel: ``(B, C_g, D, H, W)``; mask:
              ``(B or 1, 1, D, H, W)``; kernel: ``(B, 1 or C_in, kd, kh, kw, D', H', W')``.
            - output: ``(B, C_out, D', H', W')`` with ``D' = (D + 2p - d(kd - 1) - 1) // s + 1`` (and so on);
              output_mask: ``(B, 1, D', H', W')``.
        """
        return self._conv_forward(input_3d, input_for_kernel, kernel, mask)


class PacConvTranspose3d(_PacConvLayer):
    """3-D pixel-adaptive transposed convolution: :class:`PacConvTranspose2d` over ``(B, C, D, H, W)``.

    The weight has the :class:`torch.nn.ConvTranspose3d` layout ``(C_in, C_out, kd, kh, kw)`` and is applied
    without the spatial flip; the guide has the *output* resolution; ``filler='linear'`` initialises a
    trilinear upsampler.

    Example:
        >>> up = PacConvTranspose3d(4, 4, kernel_size=3, stride=2, padding=1, output_padding=1)
        >>> up(torch.rand(1, 4, 4, 8, 8), torch.rand(1, 3, 8, 16, 16)).shape
        torch.Size([1, 4, 8, 16, 16])
    """

    _dims = 3

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntTriple, stride: IntTriple = 1,
                 padding: IntTriple = 0, output_padding: IntTriple = 0, dilation: IntTriple = 1, bias: bool = True,
                 kernel_type: str = "gaussian", smooth_kernel_type: str = "none", normalize_kernel: bool = False,
                 shared_filters: bool = False, filler: str = "uniform", impl: str = "auto"):
        super().__init__(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                         padding=padding, dilation=dilation, output_padding=output_padding, transposed=True,
                         bias=bias, kernel_type=kernel_type, smooth_kernel_type=smooth_kernel_type,
                         normalize_kernel=normalize_kernel, shared_filters=shared_filters, filler=filler,
                         padding_mode="zeros", impl=impl, native_impl=False)

    def forward(self, input_3d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Upsample ``input_3d`` with kernels adapted to the output-resolution guide ``input_for_kernel``.

        Args and returns as :meth:`PacConvTranspose2d.forward`.

        Shape:
            - input_3d: ``(B, C_in, D, H, W)``; input_for_kernel: ``(B, C_g, D', H', W')``; mask:
              ``(B or 1, 1, D, H, W)``; kernel: ``(B, 1 or C_in, kd, kh, kw, D', H', W')``.
            - output: ``(B, C_out, D', H', W')`` with ``D' = (D - 1)s - 2p + d(kd - 1) + 1 + output_padding``;
              output_mask: ``(B, 1, D', H', W')``.
        """
        return self._conv_forward(input_3d, input_for_kernel, kernel, mask)


class PacPool3d(_PacPoolLayer):
    """3-D pixel-adaptive pooling: :class:`PacPool2d` over ``(B, C, D, H, W)`` (``stride`` defaults to 1).

    Example:
        >>> pool = PacPool3d(kernel_size=3, stride=2, padding=1, normalize_kernel=True)
        >>> pool(torch.rand(1, 4, 8, 16, 16), torch.rand(1, 3, 8, 16, 16)).shape
        torch.Size([1, 4, 4, 8, 8])
    """

    _dims = 3

    def __init__(self, kernel_size: IntTriple, stride: IntTriple = 1, padding: IntTriple = 0,
                 dilation: IntTriple = 1, kernel_type: str = "gaussian", smooth_kernel_type: str = "none",
                 channel_wise: bool = False, normalize_kernel: bool = False, out_channels: int = -1,
                 impl: str = "auto"):
        super().__init__(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                         kernel_type=kernel_type, smooth_kernel_type=smooth_kernel_type, channel_wise=channel_wise,
                         normalize_kernel=normalize_kernel, out_channels=out_channels, impl=impl)

    def forward(self, input_3d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Pool ``input_3d`` over windows weighted by kernels adapted to the guide ``input_for_kernel``.

        Args and returns as :meth:`PacPool2d.forward`.

        Shape:
            - input_3d: ``(B, C, D, H, W)``; input_for_kernel: ``(B, C_g, D, H, W)``; mask: ``(B or 1, 1, D, H, W)``;
              kernel: ``(B, 1 or C, kd, kh, kw, D', H', W')``.
            - output: ``(B, C, D', H', W')``; output_mask: ``(B, 1 or C, D', H', W')``.
        """
        return self._pool_forward(input_3d, input_for_kernel, kernel, mask)
