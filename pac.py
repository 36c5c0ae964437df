"""Pixel-Adaptive Convolution (PAC) layers for PyTorch.

A clean-room implementation of the layers of "Pixel-Adaptive Convolutional Neural Networks"
(Su et al., CVPR 2019), keeping the public interface, defaults and state_dict layout of the 2019 code.

A PAC layer filters its input with a spatially invariant weight ``W`` modulated, at every output
pixel and tap, by an adaptive kernel ``K`` computed from a guide ``F``::

    out[b, o, y, x] = bias[o] + sum_{c, i, j} W[o, c, i, j] * K[b, i, j, y, x] * X[b, c, y*s + i*d - p, x*s + j*d - p]
    K[b, i, j, y, x] = f( sum_c (F[b, c, tap(i, j)] - F[b, c, centre])^2 )

with ``f(D) = exp(-D / 2)`` ('gaussian') or ``f(D) = alpha + (D + 1e-4)^(lambda / 2)`` ('inv_*').

Every layer and functional form takes ``impl``:

- ``'taps'`` (what ``'auto'`` runs on CPU): registered ``torch.library`` ops (``pac::filter``,
  ``pac::kernel`` and their backward ops). They work band by band over the output rows; for each
  band a few large operations compute the kernel from the guide, modulate the input windows and
  apply the weight as one matrix product. ``K`` is never stored and backward recomputes it, so the
  extra memory is one band. Transposed convolutions are computed one output phase at a time (each
  tap reads a stride-1 window of the input), so they never pay for zero insertion.
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

import math
from concurrent.futures import ThreadPoolExecutor
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

__all__ = [
    "PacConv2d", "PacConvTranspose2d", "PacPool2d",
    "pacconv2d", "pacconv_transpose2d", "pacpool2d", "packernel2d", "nd2col", "np_gaussian_2d",
]

IntPair = Union[int, Tuple[int, int]]
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

IMPLS = ("auto", "unfold", "taps", "triton")

# Size of the largest temporary of one band of the 'taps' path (the modulated input windows). On a CPU,
# large enough that each band is a few big operations (every torch operation pays a thread
# synchronisation) and small enough to keep the extra memory a fraction of the activations; on a GPU,
# large enough to fill the device.
_CPU_BAND_BYTES = 4 << 20
_GPU_BAND_BYTES = 256 << 20


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def np_gaussian_2d(width: int, sigma: float = -1) -> np.ndarray:
    """Normalised 2-D Gaussian of odd ``width`` (``sigma <= 0`` means ``width / 4``), float32."""
    if width % 2 != 1:
        raise ValueError(f"width must be odd, got {width}")
    if sigma <= 0:
        sigma = float(width) / 4
    r = np.arange(-(width // 2), width // 2 + 1, dtype=np.float32)
    g = np.exp(-r ** 2 / (2 * sigma ** 2))
    g2 = np.outer(g, g)
    return (g2 / g2.sum()).astype(np.float32)


def _check_4d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")


def _conv_out_hw(hw, k, s, p, d, name: str = "input") -> Tuple[int, int]:
    """Output size of a (non-transposed) convolution or pooling; ValueError if it would be empty."""
    out = tuple((hw[a] + 2 * p[a] - d[a] * (k[a] - 1) - 1) // s[a] + 1 for a in range(2))
    if min(out) <= 0:
        raise ValueError(f"{name} of size {tuple(hw)} is too small for kernel_size={k}, stride={s}, padding={p}, "
                         f"dilation={d}")
    return out


def _transposed_out_hw(hw, k, s, p, op, d) -> Tuple[int, int]:
    """Output size of a transposed convolution; ValueError if it would be empty."""
    out = tuple((hw[a] - 1) * s[a] - 2 * p[a] + d[a] * (k[a] - 1) + 1 + op[a] for a in range(2))
    if min(out) <= 0:
        raise ValueError(f"input of size {tuple(hw)} gives an empty output for kernel_size={k}, stride={s}, "
                         f"padding={p}, output_padding={op}, dilation={d}")
    return out


def _transposed_in_size(size: int, k: int, s: int, p: int, op: int, d: int) -> int:
    return (size - 1 - op + 2 * p - d * (k - 1)) // s + 1


def _pad(x: torch.Tensor, padding: Tuple[int, int], mode: str = "zeros") -> torch.Tensor:
    if padding == (0, 0):
        return x
    pads = (padding[1], padding[1], padding[0], padding[0])
    if mode == "zeros":
        return F.pad(x, pads)
    return F.pad(x, pads, mode=mode)


def _strided(start: int, count: int, step: int) -> slice:
    return slice(start, start + step * (count - 1) + 1, step)


def _zero_insert(x: torch.Tensor, stride: Tuple[int, int]) -> torch.Tensor:
    if stride == (1, 1):
        return x
    b, c, h, w = x.shape
    z = x.new_zeros(b, c, (h - 1) * stride[0] + 1, (w - 1) * stride[1] + 1)
    z[:, :, ::stride[0], ::stride[1]] = x
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
    """im2col returning ``(N, C, kh, kw, H', W')``.

    Non-transposed: the windows of a zero-padded convolution. Transposed: the windows of the
    equivalent stride-1 convolution over the zero-inserted, padded input, so ``(H', W')`` is the
    transposed-convolution output size. ``use_pyinn_if_possible`` is accepted for compatibility and
    ignored.

    Example:
        >>> nd2col(torch.ones(1, 2, 4, 4), 3, padding=1).shape
        torch.Size([1, 2, 3, 3, 4, 4])
    """
    _check_4d("input_nd", input_nd)
    k, s, p, op, d = (_pair(v) for v in (kernel_size, stride, padding, output_padding, dilation))
    n, c, h, w = input_nd.shape
    if transposed:
        x = _transposed_padded_input(input_nd, k, s, p, op, d)
        cols = F.unfold(x, k, dilation=d)
        out_hw = _transposed_out_hw((h, w), k, s, p, op, d)
    else:
        cols = F.unfold(input_nd, k, dilation=d, padding=p, stride=s)
        out_hw = _conv_out_hw((h, w), k, s, p, d)
    return cols.view(n, c, k[0], k[1], *out_hw)


def _transposed_padded_input(x, k, s, p, op, d):
    """Zero-insert by the stride and pad by ``(k-1)d - p`` (plus output_padding at the far side);
    negative amounts crop."""
    z = _zero_insert(x, s)
    pad_h, pad_w = ((k[i] - 1) * d[i] - p[i] for i in range(2))
    return F.pad(z, (pad_w, pad_w + op[1], pad_h, pad_h + op[0]))


# ----------------------------------------------------------------------------------------------
# The 'unfold' path's building blocks and the option parsers
# ----------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _native_taps(cols, kernel, weight, bias, groups):
    """Readable reference: ``cols`` is the unfolded input (B, C, kh, kw, H', W')."""
    b, c, kh, kw, h, w = cols.shape
    cols = cols * kernel
    if weight is None:
        return cols.sum((2, 3))
    o = weight.shape[0]
    cols = cols.reshape(b, groups, c // groups, kh, kw, h, w)
    out = torch.einsum("bgcijyx,gocij->bgoyx", cols, weight.reshape(groups, o // groups, c // groups, kh, kw))
    out = out.reshape(b, o, h, w)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _native_distance(guide, centre, kernel_size, stride, dilation, asym, channel_wise):
    b, c, h, w = centre.shape
    cols = F.unfold(guide, kernel_size, dilation=dilation, stride=stride)
    diff = cols.view(b, c, kernel_size[0], kernel_size[1], h, w) - centre.view(b, c, 1, 1, h, w)
    if asym:
        diff = F.relu(diff)
    dist = diff * diff
    return dist if channel_wise else dist.sum(1, keepdim=True)


def _smoothed_centre(guide_padded, smooth_kernel, kernel_size, stride, dilation, out_hw):
    """Each guide channel correlated with ``smooth_kernel``, centred on the centre tap of every window."""
    c = guide_padded.shape[1]
    ss = smooth_kernel.shape[-2:]
    ext = [ss[a] // 2 - (kernel_size[a] // 2) * dilation[a] for a in range(2)]
    g = F.pad(guide_padded, (ext[1], ext[1], ext[0], ext[0]))
    weight = smooth_kernel.reshape(1, 1, *ss).to(g.dtype).expand(c, 1, *ss)
    return F.conv2d(g, weight, stride=stride, groups=c)[:, :, :out_hw[0], :out_hw[1]]


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


def _phases(transposed: bool, k, s, p, d, out_hw, before=(0, 0)) -> Tuple[List[_Phase], List[_Phase]]:
    if transposed:
        return tuple(_transposed_phases(k[a], s[a], p[a], d[a], out_hw[a], before[a]) for a in range(2))
    return tuple(_conv_phases(k[a], s[a], d[a], out_hw[a]) for a in range(2))


class _Band(NamedTuple):
    """Output rows ``[t0, t1)`` of the phase ``rows`` (and all of ``cols``)."""
    rows: _Phase
    cols: _Phase
    t0: int
    t1: int


def _reads(band: _Band, guide: bool):
    """(first row, row step, row dilation, first column, column step, column dilation) of what the taps of
    ``band`` read in the padded input, or in the padded guide when ``guide``."""
    fields = ("g_start", "g_step", "g_dil") if guide else ("x_start", "x_step", "x_dil")
    (r0, rs, rd), (c0, cs, cd) = ([getattr(ph, f) for f in fields] for ph in (band.rows, band.cols))
    return r0 + rs * band.t0, rs, rd, c0, cs, cd


def _window(t: torch.Tensor, band: _Band, guide: bool = False) -> torch.Tensor:
    """View ``(B, C, taps_rows, taps_cols, t1 - t0, count_cols)`` of what every tap of ``band`` reads
    from the padded input ``t``, or from the padded guide when ``guide``."""
    r0, rs, rd, c0, cs, cd = _reads(band, guide)
    ny, nx = band.t1 - band.t0, band.cols.count
    span_r, span_c = (band.rows.taps - 1) * rd + 1, (band.cols.taps - 1) * cd + 1
    v = t[:, :, r0:r0 + (ny - 1) * rs + span_r, c0:c0 + (nx - 1) * cs + span_c]
    v = v.unfold(2, span_r, rs).unfold(3, span_c, cs)[..., ::rd, ::cd]  # (B, C, ny, nx, taps_r, taps_c)
    return v.permute(0, 1, 4, 5, 2, 3)


def _fold_into(target: torch.Tensor, grad_window: torch.Tensor, band: _Band, guide: bool = False) -> None:
    """``target[window] += grad_window``, summing overlapping taps (the adjoint of :func:`_window`)."""
    r0, rs, rd, c0, cs, cd = _reads(band, guide)
    b, c, tr, tc, ny, nx = grad_window.shape
    size = ((ny - 1) * rs + (tr - 1) * rd + 1, (nx - 1) * cs + (tc - 1) * cd + 1)
    folded = F.fold(grad_window.reshape(b, c * tr * tc, ny * nx), size, (tr, tc), dilation=(rd, cd), stride=(rs, cs))
    target[:, :, r0:r0 + size[0], c0:c0 + size[1]] += folded


def _bands(rows: _Phase, cols: _Phase, row_bytes: int, device: torch.device, guide: bool) -> List[_Band]:
    """Bands of output rows whose largest temporary is about ``_band_bytes(device)``. Each band is at least
    as tall as its input (and guide) window, so bands two apart never read the same rows: the backward
    folds the bands of one parity in parallel."""
    spans = [((rows.taps - 1) * rows.x_dil + 1, rows.x_step)]
    if guide:
        spans.append(((rows.taps - 1) * rows.g_dil + 1, rows.g_step))
    min_rows = max(-(-span // step) for span, step in spans)
    size = max(1, min(rows.count, max(min_rows, _band_bytes(device) // max(row_bytes, 1))))
    return [_Band(rows, cols, t0, min(rows.count, t0 + size)) for t0 in range(0, rows.count, size)]


def _band_bytes(device: torch.device) -> int:
    return _CPU_BAND_BYTES if device.type == "cpu" else _GPU_BAND_BYTES


_executors: dict = {}


def _map_bands(fn, items: list, device: torch.device) -> list:
    """``[fn(item) for item in items]``, where an item is a band (or a list of bands).

    On a CPU with several torch threads the items run on as many worker threads, each of which runs
    single-threaded torch ops. A band is a few large operations, and a multi-threaded operation waits for
    its slowest thread at every step: next to other busy processes those waits dominate, while here a
    descheduled worker delays only its own bands. (A worker's thread count is its own: the caller's is
    untouched, so the OpenMP team of the caller's next operation is not rebuilt.)
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads <= 1:
        return [fn(item) for item in items]
    if threads not in _executors:
        _executors[threads] = ThreadPoolExecutor(threads, thread_name_prefix="pac-band",
                                                 initializer=torch.set_num_threads, initargs=(1,))

    def run(item):
        # Grad mode and autocast are per thread: a worker starts with both at their defaults.
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return fn(item)

    return list(_executors[threads].map(run, items))


# ----------------------------------------------------------------------------------------------
# The adaptive kernel of one band, computed from the guide, and its backward
# ----------------------------------------------------------------------------------------------

class _KernelSpec(NamedTuple):
    """How a layer turns its guide into the adaptive kernel (see :func:`packernel2d`)."""
    kind: int            # _GAUSSIAN or _INV
    asym: bool
    channel_wise: bool
    normalize: bool


_GIVEN, _GAUSSIAN, _INV = 0, 1, 2
_INV_EPS = 1e-4


def _contiguous_mul(window: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``window * other`` written in the contiguous ``(B, C, taps_r, taps_c, ny, nx)`` layout: left to
    itself, torch would follow the strides of the window view and make every later reshape a copy."""
    shape = torch.broadcast_shapes(window.shape, other.shape)
    return torch.mul(window, other, out=window.new_empty(shape, dtype=torch.promote_types(window.dtype, other.dtype)))


def _guide_differences(guide_win: torch.Tensor, centre: torch.Tensor, asym: bool) -> torch.Tensor:
    """``phi(tap - centre)`` of one band, contiguous; phi is ReLU for asymmetric kernels."""
    diff = torch.sub(guide_win, centre[:, :, None, None], out=guide_win.new_empty(guide_win.shape))
    return diff.relu_() if asym else diff


def _band_kernel(spec: _KernelSpec, guide_win, centre, valid_win, pattern_win, alpha, lam):
    """Adaptive kernel ``(B, 1 or C, taps_r, taps_c, ny, nx)`` of one band, and the output mask flags.

    ``guide_win`` is the window view of the padded guide, ``centre`` the centre features
    ``(B, C, ny, nx)``; ``valid_win`` the window of the layer's mask (or of the real-pixel pattern when
    only normalising), ``pattern_win`` the real-pixel pattern (used with a mask and no normalisation).
    """
    diff = _guide_differences(guide_win, centre, spec.asym)
    dist = diff.square_() if spec.channel_wise else diff.square_().sum(1, keepdim=True)
    if spec.kind == _GAUSSIAN:
        kernel = dist.mul_(-0.5).exp_()
    else:
        kernel = dist.add_(_INV_EPS).pow_(0.5 * _channel_view(lam, dist)).add_(_channel_view(alpha, dist))
    return _restrict(spec, kernel, valid_win, pattern_win)


def _channel_view(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-channel kernel parameter, shaped to broadcast against a ``(B, C, ...)`` tensor."""
    param = param.to(like.dtype)
    return param.view(1, -1, *([1] * (like.dim() - 2))) if param.dim() else param


def _restrict(spec: _KernelSpec, kernel, valid_win, pattern_win):
    """Zero the taps that fall on masked or non-existent pixels and renormalise. Returns the kernel,
    the per-pixel divisor (or None) and the non-empty flags ``(B, 1 or C, ny, nx)`` (or None)."""
    if valid_win is None:
        return kernel, None, None
    kernel = kernel * valid_win
    if spec.normalize:
        norm = kernel.sum((2, 3), keepdim=True)
    else:  # a mask without normalisation: rescale by the fraction of valid taps
        norm = valid_win.sum((2, 3), keepdim=True) / pattern_win.sum((2, 3), keepdim=True).clamp(min=1)
    empty = norm == 0
    norm = norm + empty.to(norm.dtype)
    return kernel.div_(norm), norm, (~empty)[:, :, 0, 0]


def _band_kernel_backward(spec: _KernelSpec, grad_kernel, guide_win, centre, valid_win, pattern_win, alpha, lam):
    """Gradients of one band's kernel with respect to the guide window, the centre and alpha/lambda."""
    diff = _guide_differences(guide_win, centre, spec.asym)
    dist = diff.square() if spec.channel_wise else diff.square().sum(1, keepdim=True)
    if spec.kind == _GAUSSIAN:
        base = dist.mul(-0.5).exp_()
    else:
        shifted = dist.add_(_INV_EPS)
        power = shifted.pow(0.5 * _channel_view(lam, dist))
        base = power + _channel_view(alpha, dist)
    if valid_win is not None:
        kernel, norm, _ = _restrict(spec, base, valid_win, pattern_win)
        if spec.normalize:  # d(K1 / sum K1): (g - sum(g K)) / sum K1
            grad_kernel = (grad_kernel - (grad_kernel * kernel).sum((2, 3), keepdim=True)) / norm
        else:
            grad_kernel = grad_kernel / norm
        grad_kernel = grad_kernel * valid_win
    grad_alpha = grad_lambda = None
    if spec.kind == _GAUSSIAN:
        grad_dist = grad_kernel * base * -0.5
    else:
        half_lam = 0.5 * _channel_view(lam, dist)
        grad_dist = grad_kernel * half_lam * power / shifted
        dims = (0, 2, 3, 4, 5) if alpha.dim() else None
        grad_alpha = grad_kernel.sum(dims) if dims else grad_kernel.sum()
        g_lam = grad_kernel * power * shifted.log() * 0.5
        grad_lambda = g_lam.sum(dims) if dims else g_lam.sum()
    grad_diff = diff.mul_(grad_dist).mul_(2)  # d(phi(diff)^2) = 2 phi(diff), for the identity and ReLU
    return grad_diff, -grad_diff.sum((2, 3)), grad_alpha, grad_lambda


# ----------------------------------------------------------------------------------------------
# The 'taps' engine: band by band, each band a few large operations; registered as torch ops
# ----------------------------------------------------------------------------------------------

class _OpArgs(NamedTuple):
    """The integer arguments of the ``pac::`` ops, decoded."""
    k: Tuple[int, int]
    s: Tuple[int, int]
    p: Tuple[int, int]
    op: Tuple[int, int]
    d: Tuple[int, int]
    out_hw: Tuple[int, int]
    transposed: bool
    groups: int
    spec: Optional[_KernelSpec]  # None when the kernel is given
    padding_mode: str

    @staticmethod
    def decode(geometry: Sequence[int], options: Sequence[int]) -> "_OpArgs":
        kh, kw, sh, sw, ph, pw, oph, opw, dh, dw, oh, ow = geometry  # the output size is symbolic under export
        transposed, groups, kind, asym, channel_wise, normalize, mode = options
        spec = None if kind == _GIVEN else _KernelSpec(kind, bool(asym), bool(channel_wise), bool(normalize))
        return _OpArgs((kh, kw), (sh, sw), (ph, pw), (oph, opw), (dh, dw), (oh, ow), bool(transposed), groups,
                       spec, PADDING_MODES[mode])


def _encode(k, s, p, op, d, out_hw, transposed, groups, kernel_type, channel_wise, normalize, padding_mode,
            kernel_given: bool):
    """The (geometry, options) integer lists of the ``pac::`` ops."""
    geometry = [k[0], k[1], s[0], s[1], p[0], p[1], op[0], op[1], d[0], d[1], out_hw[0], out_hw[1]]
    if kernel_given:
        kind, asym = _GIVEN, False
    else:
        name, _, _, asym, _ = _parse_kernel_type(kernel_type)
        kind = _GAUSSIAN if name == "gaussian" else _INV
    options = [int(transposed), groups, kind, int(asym), int(channel_wise), int(normalize),
               PADDING_MODES.index(padding_mode)]
    return geometry, options


def _as_read(image: torch.Tensor, a: _OpArgs, pads=None) -> torch.Tensor:
    """``image`` (a mask, or ones) at the layer's input resolution, laid out like what the taps read:
    padded by ``pads`` around a transposed layer's input, zero-inserted and padded for a transposed
    layer's kernel, or padded by the layer's padding mode (reflected borders are real pixels)."""
    if pads is not None:
        return F.pad(image, pads)
    if a.transposed:
        return _transposed_padded_input(image, a.k, a.s, a.p, a.op, a.d)
    return _pad(image, a.p, a.padding_mode)


def _validity(mask, a: _OpArgs, in_hw, dtype, device, pads=None):
    """(valid, pattern) images laid out like the taps read: ``valid`` is the mask, or the real-pixel
    pattern when only normalising; ``pattern`` is needed with a mask and no normalisation."""
    if a.spec is None or (mask is None and not a.spec.normalize):
        return None, None
    pattern = _as_read(torch.ones(1, 1, *in_hw, dtype=dtype, device=device), a, pads)
    if mask is None:
        return pattern, None
    return _as_read(mask.to(dtype), a, pads), (None if a.spec.normalize else pattern)


class _Prepared(NamedTuple):
    x: torch.Tensor                 # the input as the taps read it (padded)
    rows: List[_Phase]
    cols: List[_Phase]
    valid: Optional[torch.Tensor]   # mask (or real-pixel pattern when only normalising), laid out like x
    pattern: Optional[torch.Tensor]  # real-pixel pattern, with a mask and no normalisation
    unpad: Tuple[slice, slice]      # where the input sits in the padded x


def _prepare_filter(x, mask, a: _OpArgs, kernel_dtype) -> _Prepared:
    if a.transposed:
        h, w = x.shape[2:]
        top, bottom = _transposed_pads(a.k[0], a.s[0], a.p[0], a.d[0], h, a.out_hw[0])
        left, right = _transposed_pads(a.k[1], a.s[1], a.p[1], a.d[1], w, a.out_hw[1])
        pads = (left, right, top, bottom)
        rows, cols = _phases(True, a.k, a.s, a.p, a.d, a.out_hw, (top, left))
        valid, pattern = _validity(mask, a, (h, w), kernel_dtype, x.device, pads)
        return _Prepared(F.pad(x, pads), rows, cols, valid, pattern, (slice(top, top + h), slice(left, left + w)))
    rows, cols = _phases(False, a.k, a.s, a.p, a.d, a.out_hw)
    in_hw = (x.shape[2] - 2 * a.p[0], x.shape[3] - 2 * a.p[1])
    valid, pattern = _validity(mask, a, in_hw, kernel_dtype, x.device)
    return _Prepared(x, rows, cols, valid, pattern, (slice(None), slice(None)))


def _band_of(t: Optional[torch.Tensor], band: _Band):
    return None if t is None else _window(t, band)


def _kernel_of_band(a: _OpArgs, kernel, guide, centre, prep: _Prepared, alpha, lam, band: _Band):
    """The kernel of one band: a slice of the given kernel, or computed from the guide."""
    rows, cols, t0, t1 = band
    out_r, out_c = rows.out_slice(t0, t1), cols.out_slice(0, cols.count)
    if a.spec is None:
        return kernel[:, :, rows.tap_slice(), cols.tap_slice(), out_r, out_c], None
    kernel, _, flags = _band_kernel(a.spec, _window(guide, band, guide=True), centre[:, :, out_r, out_c],
                                    _band_of(prep.valid, band), _band_of(prep.pattern, band), alpha, lam)
    return kernel, flags


def _band_rows_bytes(x, guide, rows: _Phase, cols: _Phase) -> int:
    """Bytes of one output row's largest temporary: the modulated input, or the guide differences."""
    channels = max(x.shape[1], 0 if guide is None else guide.shape[1])
    return x.shape[0] * channels * rows.taps * cols.taps * cols.count * max(x.element_size(), 4)


def _phase_weight(weight, groups, rows: _Phase, cols: _Phase):
    """The weight of a phase's taps as ``(groups, O / groups, C / groups * taps)``."""
    if weight is None:
        return None
    return weight[:, :, rows.tap_slice(), cols.tap_slice()].reshape(groups, weight.shape[0] // groups, -1)


def _filter_forward(x, weight, kernel, guide, centre, mask, alpha, lam, a: _OpArgs):
    kernel_dtype = (kernel if a.spec is None else guide).dtype
    prep = _prepare_filter(x, mask, a, kernel_dtype)
    b, c = x.shape[:2]
    out = x.new_zeros(b, c if weight is None else weight.shape[0], *a.out_hw)
    flags_out = None
    if mask is not None and a.spec is not None:
        flags_out = x.new_zeros(b, centre.shape[1] if a.spec.channel_wise else 1, *a.out_hw, dtype=kernel_dtype)
    tasks = [(band, _phase_weight(weight, a.groups, rows, cols))
             for rows in prep.rows for cols in prep.cols
             for band in _bands(rows, cols, _band_rows_bytes(x, guide, rows, cols), x.device, guide is not None)]

    def run(task) -> None:  # output phases and bands write disjoint outputs: all of them run in parallel
        band, w = task
        out_r, out_c = band.rows.out_slice(band.t0, band.t1), band.cols.out_slice(0, band.cols.count)
        kb, flags = _kernel_of_band(a, kernel, guide, centre, prep, alpha, lam, band)
        if flags_out is not None:
            flags_out[:, :, out_r, out_c] = flags.to(kernel_dtype)
        modulated = _contiguous_mul(_window(prep.x, band), kb.to(x.dtype))
        out[:, :, out_r, out_c] = _apply_weight(modulated, w, a.groups)

    _map_bands(run, tasks, x.device)
    return out, (x.new_zeros(0) if flags_out is None else flags_out)


def _apply_weight(modulated, w, groups):
    """``sum_{c, taps} W * modulated`` as one batched matmul (or the per-channel sum when pooling)."""
    if w is None:
        return modulated.sum((2, 3), dtype=_acc_dtype(modulated.dtype)).to(modulated.dtype)
    b, c, tr, tc, ny, nx = modulated.shape
    out = torch.matmul(w, modulated.reshape(b, groups, c // groups * tr * tc, ny * nx))
    return out.view(b, -1, ny, nx)


def _filter_backward(grad_out, x, weight, kernel, guide, centre, mask, alpha, lam, a: _OpArgs, needs):
    need_x, need_w, need_k, need_guide, need_centre, need_alpha, need_lam = (bool(n) for n in needs)
    kernel_dtype = (kernel if a.spec is None else guide).dtype
    prep = _prepare_filter(x, mask, a, kernel_dtype)
    b, c = x.shape[:2]
    acc = _acc_dtype(x.dtype)
    gx = torch.zeros(prep.x.shape, dtype=acc, device=x.device) if need_x else None
    gw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
    gk = torch.zeros_like(kernel) if need_k else None
    gguide = torch.zeros_like(guide) if need_guide or need_centre else None
    gcentre = torch.zeros_like(centre) if need_guide or need_centre else None
    need_kernel_grad = need_k or gguide is not None or need_alpha or need_lam
    params = _ParamGrads(alpha if need_alpha else None, lam if need_lam else None)
    grad_out = grad_out.to(x.dtype)

    def run(band: _Band, w, gx, gguide):
        """Fold one band's input and guide gradients into ``gx`` and ``gguide``; return its weight and
        kernel-parameter gradients."""
        rows, cols = band.rows, band.cols
        ny, nx = band.t1 - band.t0, cols.count
        out_r, out_c = rows.out_slice(band.t0, band.t1), cols.out_slice(0, nx)
        kb, _ = _kernel_of_band(a, kernel, guide, centre, prep, alpha, lam, band)
        kbx = kb.to(x.dtype)
        xw = _window(prep.x, band)
        go = grad_out[:, :, out_r, out_c]
        if w is None:  # pooling: every tap of a channel gets the channel's output gradient
            g_mod = go[:, :, None, None]
        else:
            go = go.reshape(b, a.groups, -1, ny * nx)
            g_mod = torch.matmul(w.transpose(1, 2), go).view(b, c, rows.taps, cols.taps, ny, nx)
        if gx is not None:
            _fold_into(gx, _contiguous_mul(g_mod, kbx), band)
        g_weight = g_params = None
        if need_w:
            modulated = _contiguous_mul(xw, kbx).view(b, a.groups, -1, ny * nx)
            g_weight = torch.matmul(go, modulated.transpose(2, 3)).sum(0, dtype=acc)
        if need_kernel_grad:
            gkb = _contiguous_mul(xw, g_mod)
            gkb = gkb.sum(1, keepdim=True, dtype=kernel_dtype) if kb.shape[1] == 1 else gkb.to(kernel_dtype)
            if gk is not None:
                gk[:, :, rows.tap_slice(), cols.tap_slice(), out_r, out_c] = gkb
            if gguide is not None or params.needed:
                g_params = _kernel_band_backward_into(a.spec, gkb, guide, centre, prep.valid, prep.pattern, alpha, lam,
                                                      band, gguide, gcentre)
        return band, g_weight, g_params

    phases = [(_phase_weight(weight, a.groups, rows, cols),
               _bands(rows, cols, _band_rows_bytes(x, guide, rows, cols), x.device, guide is not None))
              for rows in prep.rows for cols in prep.cols]
    if len(phases) == 1:  # bands two apart read disjoint rows: fold each parity in parallel
        w, bands = phases[0]
        results = [r for parity in (bands[0::2], bands[1::2])
                   for r in _map_bands(lambda band: run(band, w, gx, gguide), parity, x.device)]
    else:  # output phases read overlapping inputs: fixed groups of phases, each folding into its own buffers
        groups = [phases[i::torch.get_num_threads()] for i in range(min(len(phases), torch.get_num_threads()))]

        def run_group(group):
            own = [None if t is None else torch.zeros_like(t) for t in (gx, gguide)]
            return own, [run(band, w, *own) for w, bands in group for band in bands]

        results = []
        for own, group_results in _map_bands(run_group, groups, x.device):  # summed in a fixed order
            for total, part in zip((gx, gguide), own):
                if total is not None:
                    total += part
            results += group_results
    for band, g_weight, g_params in results:
        if g_weight is not None:
            gw[:, :, band.rows.tap_slice(), band.cols.tap_slice()] += g_weight.view(
                gw.shape[0], gw.shape[1], band.rows.taps, band.cols.taps)
        params.add(g_params)
    if gx is not None:
        gx = gx[:, :, prep.unpad[0], prep.unpad[1]].to(x.dtype)
    if gw is not None:
        gw = gw.to(weight.dtype)
    return (gx, gw, gk, gguide, gcentre) + params.result()


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


def _kernel_band_backward_into(spec, gkb, guide, centre, valid, pattern, alpha, lam, band: _Band, gguide, gcentre):
    """Backpropagate one band's kernel gradient into the guide and centre; return the band's
    ``(grad alpha, grad lambda)`` (None for a gaussian kernel)."""
    rows, cols, t0, t1 = band
    out_r, out_c = rows.out_slice(t0, t1), cols.out_slice(0, cols.count)
    grad_win, grad_centre, ga, gl = _band_kernel_backward(
        spec, gkb, _window(guide, band, guide=True), centre[:, :, out_r, out_c], _band_of(valid, band),
        _band_of(pattern, band), alpha, lam)
    if gguide is not None:
        _fold_into(gguide, grad_win, band, guide=True)
        gcentre[:, :, out_r, out_c] += grad_centre
    return None if ga is None else (ga, gl)


def _kernel_phases(guide, a: _OpArgs):
    """Window geometry of :func:`packernel2d` over the padded guide: a stride-1 'same' window for a
    transposed layer (the guide is at the output resolution), the layer's own window otherwise."""
    win_s = (1, 1) if a.transposed else a.s
    rows, cols = _phases(False, a.k, win_s, a.p, a.d, a.out_hw)
    if a.transposed:
        in_hw = tuple(_transposed_in_size(a.out_hw[i], a.k[i], a.s[i], a.p[i], a.op[i], a.d[i]) for i in range(2))
    else:
        in_hw = (guide.shape[2] - 2 * a.p[0], guide.shape[3] - 2 * a.p[1])
    return rows[0], cols[0], in_hw


def _kernel_forward(guide, centre, mask, alpha, lam, a: _OpArgs):
    rows, cols, in_hw = _kernel_phases(guide, a)
    valid, pattern = _validity(mask, a, in_hw, guide.dtype, guide.device)
    b = guide.shape[0]
    kernel = guide.new_empty(b, centre.shape[1] if a.spec.channel_wise else 1, *a.k, *a.out_hw)
    flags_out = None if mask is None else guide.new_zeros(b, kernel.shape[1], *a.out_hw)

    def run(band: _Band) -> None:
        t0, t1 = band.t0, band.t1
        kb, _, flags = _band_kernel(a.spec, _window(guide, band, guide=True), centre[:, :, t0:t1],
                                    _band_of(valid, band), _band_of(pattern, band), alpha, lam)
        kernel[..., t0:t1, :] = kb
        if flags_out is not None:
            flags_out[:, :, t0:t1] = flags.to(guide.dtype)

    _map_bands(run, _bands(rows, cols, _band_rows_bytes(guide, None, rows, cols), guide.device, True), guide.device)
    return kernel, (guide.new_zeros(0) if flags_out is None else flags_out)


def _kernel_backward(grad_kernel, guide, centre, mask, alpha, lam, a: _OpArgs, needs):
    need_guide, need_centre, need_alpha, need_lam = (bool(n) for n in needs)
    rows, cols, in_hw = _kernel_phases(guide, a)
    valid, pattern = _validity(mask, a, in_hw, guide.dtype, guide.device)
    gguide, gcentre = torch.zeros_like(guide), torch.zeros_like(centre)
    params = _ParamGrads(alpha if need_alpha else None, lam if need_lam else None)
    grad_kernel = grad_kernel.to(guide.dtype)

    def run(band: _Band):
        return _kernel_band_backward_into(a.spec, grad_kernel[..., band.t0:band.t1, :], guide, centre, valid, pattern,
                                          alpha, lam, band, gguide, gcentre)

    bands = _bands(rows, cols, _band_rows_bytes(guide, None, rows, cols), guide.device, True)
    for parity in (bands[0::2], bands[1::2]):
        for g_params in _map_bands(run, parity, guide.device):
            params.add(g_params)
    return (gguide, gcentre) + params.result()


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
                               _OpArgs.decode(geometry, options))


@_filter_op.register_fake
def _(x, weight, kernel, guide, centre, mask, inv_alpha, inv_lambda, geometry, options):
    a = _OpArgs.decode(geometry, options)
    b, c = x.shape[:2]
    out = x.new_empty(b, c if weight is None else weight.shape[0], *a.out_hw)
    if mask is None or a.spec is None:
        return out, x.new_empty(0)
    return out, guide.new_empty(b, centre.shape[1] if a.spec.channel_wise else 1, *a.out_hw)


@torch.library.custom_op("pac::filter_backward", mutates_args=())
def _filter_backward_op(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], kernel: Optional[Tensor],
                        guide: Optional[Tensor], centre: Optional[Tensor], mask: Optional[Tensor],
                        inv_alpha: Optional[Tensor], inv_lambda: Optional[Tensor], geometry: List[int],
                        options: List[int], needs: List[int]) -> List[Tensor]:
    """Gradients of ``pac::filter`` for (x, weight, kernel, guide, centre, inv_alpha, inv_lambda)."""
    with torch.autocast(x.device.type, enabled=False):
        grads = _filter_backward(grad_out, x, weight, kernel, guide, centre, mask, inv_alpha, inv_lambda,
                                 _OpArgs.decode(geometry, options), needs)
    return _empty_if_none(grads, x)


@_filter_backward_op.register_fake
def _(grad_out, x, weight, kernel, guide, centre, mask, inv_alpha, inv_lambda, geometry, options, needs):
    inputs = (x, weight, kernel, guide, centre, inv_alpha, inv_lambda)
    return [t.new_empty(t.shape) if n and t is not None else x.new_empty(0) for t, n in zip(inputs, needs)]


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
def _kernel_op(guide: Tensor, centre: Tensor, mask: Optional[Tensor], inv_alpha: Optional[Tensor],
               inv_lambda: Optional[Tensor], geometry: List[int], options: List[int]) -> Tuple[Tensor, Tensor]:
    """The adaptive kernel ``(K, output mask flags or an empty tensor)`` of :func:`packernel2d`."""
    with torch.autocast(guide.device.type, enabled=False):
        return _kernel_forward(guide, centre, mask, inv_alpha, inv_lambda, _OpArgs.decode(geometry, options))


@_kernel_op.register_fake
def _(guide, centre, mask, inv_alpha, inv_lambda, geometry, options):
    a = _OpArgs.decode(geometry, options)
    channels = centre.shape[1] if a.spec.channel_wise else 1
    flags = guide.new_empty(0) if mask is None else guide.new_empty(guide.shape[0], channels, *a.out_hw)
    return guide.new_empty(guide.shape[0], channels, *a.k, *a.out_hw), flags


@torch.library.custom_op("pac::kernel_backward", mutates_args=())
def _kernel_backward_op(grad_kernel: Tensor, guide: Tensor, centre: Tensor, mask: Optional[Tensor],
                        inv_alpha: Optional[Tensor], inv_lambda: Optional[Tensor], geometry: List[int],
                        options: List[int], needs: List[int]) -> List[Tensor]:
    """Gradients of ``pac::kernel`` for (guide, centre, inv_alpha, inv_lambda)."""
    with torch.autocast(guide.device.type, enabled=False):
        grads = _kernel_backward(grad_kernel, guide, centre, mask, inv_alpha, inv_lambda,
                                 _OpArgs.decode(geometry, options), needs)
    return _empty_if_none(grads, guide)


@_kernel_backward_op.register_fake
def _(grad_kernel, guide, centre, mask, inv_alpha, inv_lambda, geometry, options, needs):
    inputs = (guide, centre, inv_alpha, inv_lambda)
    return [t.new_empty(t.shape) if n and t is not None else guide.new_empty(0) for t, n in zip(inputs, needs)]


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
    guide: torch.Tensor        # the padded guide, float32 (float64 for a float64 guide)
    centre: torch.Tensor       # the (smoothed) centre feature of every window, (B, C, H', W')
    out_hw: Tuple[int, int]
    in_hw: Tuple[int, int]     # the layer's input size


def _guide_geometry(input, k, s, p, op, d, transposed, padding_mode, smooth_kernel) -> _GuideGeometry:
    """Pad the guide as the kernel's windows read it and take (or smooth) every window's centre."""
    guide = input if input.dtype == torch.float64 else input.float()
    h, w = guide.shape[2:]
    if transposed:
        win_s, win_p = (1, 1), tuple((k[a] - 1) * d[a] // 2 for a in range(2))
        out_hw = (h, w)
        in_hw = tuple(_transposed_in_size(sz, *args) for sz, args in zip((h, w), zip(k, s, p, op, d)))
    else:
        win_s, win_p = s, p
        out_hw = _conv_out_hw((h, w), k, s, p, d, name="the guide")
        in_hw = (h, w)
    guide_padded = _pad(guide, win_p, "zeros" if transposed else padding_mode)
    if smooth_kernel is not None:
        centre = _smoothed_centre(guide_padded, smooth_kernel.to(guide.dtype), k, win_s, d, out_hw)
    else:
        centre = guide_padded[:, :, _strided(k[0] // 2 * d[0], out_hw[0], win_s[0]),
                              _strided(k[1] // 2 * d[1], out_hw[1], win_s[1])]
    return _GuideGeometry(guide_padded, centre, out_hw, in_hw)


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
    _check_4d("input", input)
    impl = _resolve_impl(impl, native_impl)
    k, s, p, op, d = (_pair(v) for v in (kernel_size, stride, padding, output_padding, dilation))
    if any(v <= 0 or v % 2 == 0 for v in k):
        raise ValueError(f"kernel_size only accept odd numbers, got {k}")
    kind, _, _, asym, _ = _parse_kernel_type(kernel_type)
    smooth_kind, _ = _parse_smooth_kernel_type(smooth_kernel_type)
    if smooth_kind != "none" and smooth_kernel is None:
        raise ValueError(f"smooth_kernel must be given when smooth_kernel_type is {smooth_kernel_type!r}")
    if kind == "inv" and (inv_alpha is None or inv_lambda is None):
        raise ValueError(f"inv_alpha and inv_lambda must be given for kernel_type {kernel_type!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")

    with torch.autocast(input.device.type, enabled=False):
        geo = _guide_geometry(input, k, s, p, op, d, transposed, padding_mode,
                              smooth_kernel if smooth_kind != "none" else None)
        if mask is not None:
            _check_mask(mask, input.shape[0], geo.in_hw)
        alpha, lam = _kernel_params(kernel_type, inv_alpha, inv_lambda, geo.guide.dtype)
        if _backend(_without_triton(impl), input.device) == "unfold":
            return _native_kernel(geo, mask, k, s, p, op, d, kind, asym, alpha, lam, channel_wise, normalize_kernel,
                                  transposed, padding_mode)
        geometry, options = _encode(k, s, p, op, d, geo.out_hw, transposed, 1, kernel_type, channel_wise,
                                    normalize_kernel, padding_mode, kernel_given=False)
        kernel, flags = _kernel(geo.guide, geo.centre, mask, alpha, lam, geometry, options)
    return kernel, (flags if mask is not None else None)


def _native_kernel(geo: _GuideGeometry, mask, k, s, p, op, d, kind, asym, alpha, lam, channel_wise, normalize,
                   transposed, padding_mode):
    """The 'unfold' implementation of :func:`packernel2d`: plain autograd through ``unfold``."""
    win_s = (1, 1) if transposed else s
    dist = _native_distance(geo.guide, geo.centre, k, win_s, d, asym, channel_wise)
    if kind == "gaussian":
        kernel = torch.exp(-0.5 * dist)
    else:
        kernel = _channel_view(alpha, dist) + (dist + _INV_EPS).pow(0.5 * _channel_view(lam, dist))
    if mask is None and not normalize:
        return kernel, None

    # Which taps fall on real pixels. Zero padding and inserted zeros are not real; a border
    # padded by reflection, replication or wrapping is, and a mask is padded the same way.
    def taps_of(m):
        if transposed or padding_mode == "zeros":
            return nd2col(m, k, s, p, op, d, transposed=transposed)
        return nd2col(_pad(m, p, padding_mode), k, s, 0, 0, d)

    pattern = taps_of(geo.guide.new_ones(1, 1, *geo.in_hw))
    if mask is not None:
        mask_cols = taps_of(mask.to(geo.guide.dtype))
        kernel = kernel * mask_cols
        if not normalize:
            # Windows without any real pixel have mask_cols == 0 everywhere: avoid 0 / 0.
            norm = mask_cols.sum((2, 3), keepdim=True) / pattern.sum((2, 3), keepdim=True).clamp(min=1)
    else:
        kernel = kernel * pattern
    if normalize:
        norm = kernel.sum((2, 3), keepdim=True)
    empty = norm == 0
    kernel = kernel / (norm + empty.to(norm.dtype))
    output_mask = None if mask is None else (~empty).to(geo.guide.dtype).flatten(1, 3)
    return kernel, output_mask


def _check_mask(mask: torch.Tensor, batch: int, in_hw: Tuple[int, int]) -> None:
    _check_4d("mask", mask)
    if mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != tuple(in_hw):
        raise ValueError(f"mask must have shape ({batch} or 1, 1, {in_hw[0]}, {in_hw[1]}) (the layer's input "
                         f"size), got {tuple(mask.shape)}")


# ----------------------------------------------------------------------------------------------
# Functional convolution and pooling with a precomputed kernel
# ----------------------------------------------------------------------------------------------

def _check_kernel(kernel: torch.Tensor, batch: int, channels: int, k, out_hw) -> None:
    if not isinstance(kernel, torch.Tensor):
        raise TypeError(f"kernel must be a torch.Tensor, got {type(kernel).__name__}")
    if (kernel.dim() != 6 or kernel.shape[0] != batch or kernel.shape[1] not in (1, channels)
            or tuple(kernel.shape[2:4]) != tuple(k) or tuple(kernel.shape[4:]) != tuple(out_hw)):
        expected = f"({batch}, 1{' or ' + str(channels) if channels != 1 else ''}, " \
                   f"{k[0]}, {k[1]}, {out_hw[0]}, {out_hw[1]})"
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
    k: Tuple[int, int]
    s: Tuple[int, int]
    p: Tuple[int, int]
    op: Tuple[int, int]
    d: Tuple[int, int]
    transposed: bool
    groups: int
    padding_mode: str

    def out_hw(self, in_hw) -> Tuple[int, int]:
        if self.transposed:
            return _transposed_out_hw(in_hw, self.k, self.s, self.p, self.op, self.d)
        return _conv_out_hw(in_hw, self.k, self.s, self.p, self.d)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the taps read it: padded by the layer (a transposed layer's op pads itself)."""
        return x if self.transposed else _pad(x, self.p, self.padding_mode)

    def unfolded(self, x: torch.Tensor) -> torch.Tensor:
        """The windows ``(B, C, kh, kw, H', W')`` of the padded input, for the 'unfold' path."""
        if self.transposed:
            return nd2col(x, self.k, self.s, self.p, self.op, self.d, transposed=True)
        return nd2col(x, self.k, self.s, 0, 0, self.d)


def _filter_with_kernel(layer: _Layer, x, kernel, weight, bias, impl: str) -> torch.Tensor:
    """Filter ``x`` with a precomputed kernel on the chosen backend, under autocast's dtype when active."""
    x, kernel, weight, bias = _cast_all(_autocast_dtype(x.device.type), x, kernel, weight, bias)
    kernel = kernel.to(x.dtype)
    x = layer.padded(x)
    if _backend(_without_triton(impl), x.device) == "unfold":
        with torch.autocast(x.device.type, enabled=False):
            return _native_taps(layer.unfolded(x), kernel, weight, bias, layer.groups)
    geometry, options = _encode(layer.k, layer.s, layer.p, layer.op, layer.d, tuple(kernel.shape[-2:]),
                                layer.transposed, layer.groups, "gaussian", False, False, layer.padding_mode,
                                kernel_given=True)
    out, _ = _filter(x, weight, kernel, None, None, None, None, None, geometry, options)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _conv_weight(weight, shared_filters: bool, groups: int, channels: int, transposed: bool):
    """Check ``weight`` and return it in convolution layout ``(O, C / groups, kh, kw)`` with its groups."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D, got shape {tuple(weight.shape)}")
    k = tuple(weight.shape[-2:])
    if shared_filters:
        _check_weight(weight, (1, 1) + k, "shared filters")
        return weight.expand(channels, 1, *k), channels
    if transposed:
        _check_weight(weight, (channels, weight.shape[1]) + k, "in_channels, out_channels, kh, kw")
        return weight.transpose(0, 1), 1
    if not isinstance(groups, int) or groups <= 0 or channels % groups or weight.shape[0] % groups:
        raise ValueError(f"groups must be a positive integer dividing the input channels ({channels}) and the output "
                         f"channels ({weight.shape[0]}), got {groups}")
    _check_weight(weight, (weight.shape[0], channels // groups) + k, "out_channels, in_channels / groups, kh, kw")
    return weight, groups


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
    _check_4d("input", input)
    _check_padding_mode(padding_mode)
    impl = _resolve_impl(impl, native_impl)
    weight, groups = _conv_weight(weight, shared_filters, groups, input.shape[1], transposed=False)
    _check_bias(bias, weight.shape[0])
    layer = _Layer(tuple(weight.shape[-2:]), _pair(stride), _pair(padding), (0, 0), _pair(dilation), False, groups,
                   padding_mode)
    _check_kernel(kernel, input.shape[0], input.shape[1], layer.k, layer.out_hw(input.shape[2:]))
    return _filter_with_kernel(layer, input, kernel, weight, bias, impl)


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
    _check_4d("input", input)
    impl = _resolve_impl(impl, native_impl)
    weight, groups = _conv_weight(weight, shared_filters, 1, input.shape[1], transposed=True)
    _check_bias(bias, weight.shape[0])
    layer = _Layer(tuple(weight.shape[-2:]), _pair(stride), _pair(padding), _pair(output_padding), _pair(dilation),
                   True, groups, "zeros")
    _check_kernel(kernel, input.shape[0], input.shape[1], layer.k, layer.out_hw(input.shape[2:]))
    return _filter_with_kernel(layer, input, kernel, weight, bias, impl)


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
    _check_4d("input", input)
    impl = _resolve_impl(impl, native_impl)
    layer = _Layer(_pair(kernel_size), _pair(stride), _pair(padding), (0, 0), _pair(dilation), False, 1, "zeros")
    _check_kernel(kernel, input.shape[0], input.shape[1], layer.k, layer.out_hw(input.shape[2:]))
    return _filter_with_kernel(layer, input, kernel, None, None, impl)


# ----------------------------------------------------------------------------------------------
# Fillers: the initial weights of the 2019 code (spec section 1.6)
# ----------------------------------------------------------------------------------------------

def _fill_uniform(weight, bias, in_channels: int, groups: int, shared_filters: bool) -> None:
    bound = 1.0 / math.sqrt(in_channels // groups * weight.shape[2] * weight.shape[3])
    if shared_filters:  # kept from the 2019 code: the bound grows with the channel count
        bound *= in_channels
    weight.uniform_(-bound, bound)
    if bias is not None:
        bias.uniform_(-bound, bound)


def _fill_linear(weight, bias, stride, normalize_kernel: bool, channels: int) -> None:
    """A bilinear upsampler: the outer product of two triangles, on the diagonal of the channels."""
    profiles = []
    for k, s in zip(weight.shape[2:], stride):
        q = (k - (2 * s - 1)) // 2
        prof = np.array([0.0] * q + [(t + 1) / s for t in range(s)] + [(s - t) / s for t in range(1, s)] + [0.0] * q)
        if normalize_kernel:
            prof *= np.array([(k - j - 1) // s + j // s + 1 for j in range(k)])
        profiles.append(prof)
    w2d = torch.from_numpy(np.outer(*profiles)).to(weight)
    weight.zero_()
    for ch in range(channels):
        weight[ch, ch] = w2d
    if bias is not None:
        bias.zero_()


def _fill_crf(weight, bias, shared_filters: bool, perturbed: bool) -> None:
    """A spatial Gaussian without its centre, times a Potts compatibility ``1 - I`` unless shared."""
    k = weight.shape[-1]
    g = torch.from_numpy(np_gaussian_2d(k) * k * k).to(weight)
    g[k // 2, k // 2] = 0
    if shared_filters:
        weight.copy_(g.view(1, 1, k, k))
    else:
        compat = 1 - torch.eye(weight.shape[0], dtype=g.dtype, device=g.device)
        weight.copy_(compat.view(*compat.shape, 1, 1) * g)
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

    def __init__(self, *, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair,
                 padding: IntPair, dilation: IntPair, output_padding: IntPair, transposed: bool, pool_only: bool,
                 kernel_type: str, smooth_kernel_type: str, channel_wise: bool, normalize_kernel: bool,
                 shared_filters: bool, filler: str, groups: int, padding_mode: str, impl: str, native_impl: bool):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation, self.output_padding = (
            _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), _pair(output_padding))
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
        if any(p[a] < 0 or p[a] > d[a] * (k[a] - 1) // 2 for a in range(2)):
            raise ValueError(f"padding must be between 0 and dilation * (kernel_size - 1) / 2 = "
                             f"{tuple(d[a] * (k[a] - 1) // 2 for a in range(2))}, got {p}")
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
        if smooth_kind == "gaussian":
            g = torch.tensor([0.25, 0.5, 0.25])
            self.register_buffer("smooth_kernel", torch.outer(g, g).view(1, 1, 3, 3))
        elif smooth_kind == "average":
            self.register_buffer("smooth_kernel", torch.full((1, 1, width, width), 1.0 / width ** 2))
        elif smooth_kind == "full":
            self.smooth_kernel = nn.Parameter(torch.full((1, 1, width, width), 1.0 / width ** 2))

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
        """The adaptive kernel of this layer for a guide (see :func:`packernel2d`)."""
        return packernel2d(input_for_kernel, input_mask, kernel_size=self.kernel_size, stride=self.stride,
                           padding=self.padding, output_padding=self.output_padding, dilation=self.dilation,
                           kernel_type=self.kernel_type, smooth_kernel_type=self.smooth_kernel_type,
                           smooth_kernel=getattr(self, "smooth_kernel", None),
                           inv_alpha=getattr(self, "inv_alpha", None), inv_lambda=getattr(self, "inv_lambda", None),
                           channel_wise=self.channel_wise, normalize_kernel=self.normalize_kernel,
                           transposed=self.transposed, padding_mode=self.padding_mode,
                           impl=self.impl)

    def _layer(self, groups: int) -> _Layer:
        return _Layer(self.kernel_size, self.stride, self.padding, self.output_padding, self.dilation, self.transposed,
                      groups, self.padding_mode)

    def _check_guide(self, input: torch.Tensor, guide: Optional[torch.Tensor]) -> torch.Tensor:
        """The guide must match the input's batch and the input size (the output size when transposed)."""
        if guide is None:
            raise ValueError("input_for_kernel (the guide) is required when no precomputed kernel is given")
        _check_4d("input_for_kernel", guide)
        guide_hw = self._layer(1).out_hw(input.shape[2:]) if self.transposed else tuple(input.shape[2:])
        if tuple(guide.shape[2:]) != tuple(guide_hw) or guide.shape[0] != input.shape[0]:
            where = "output" if self.transposed else "input"
            raise ValueError(f"input_for_kernel must match the layer's {where} batch and size "
                             f"({input.shape[0]}, *, {guide_hw[0]}, {guide_hw[1]}), got {tuple(guide.shape)}")
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
            geo = _guide_geometry(guide, layer.k, layer.s, layer.p, layer.op, layer.d, layer.transposed,
                                  layer.padding_mode, smooth)
            alpha, lam = _kernel_params(self.kernel_type, getattr(self, "inv_alpha", None),
                                        getattr(self, "inv_lambda", None), geo.guide.dtype)
        if mask is not None:
            _check_mask(mask, input.shape[0], geo.in_hw)
        x, weight, bias = _cast_all(_autocast_dtype(input.device.type), input, weight, bias)
        geometry, options = _encode(layer.k, layer.s, layer.p, layer.op, layer.d, geo.out_hw, layer.transposed,
                                    groups, self.kernel_type, self.channel_wise, self.normalize_kernel,
                                    layer.padding_mode, kernel_given=False)
        out, flags = _filter(layer.padded(x), weight, None, geo.guide, geo.centre, mask, alpha, lam,
                                          geometry, options)
        if bias is not None:
            out = out + bias.view(1, -1, 1, 1)
        return out, (flags if mask is not None else None)

    def _triton_supports(self, triton, input, guide, mask) -> bool:
        return triton.supports("pool" if self.pool_only else "conv_transpose" if self.transposed else "conv",
                               input, guide, kernel_type=self.kernel_type, smooth_kernel_type=self.smooth_kernel_type,
                               normalize_kernel=self.normalize_kernel, channel_wise=self.channel_wise,
                               shared_filters=self.shared_filters, groups=self.groups, padding_mode=self.padding_mode,
                               mask=mask, stride=self.stride, padding=self.padding, dilation=self.dilation,
                               output_padding=self.output_padding)

    def extra_repr(self) -> str:
        s = "kernel_size={kernel_size}, kernel_type={kernel_type}"
        if not self.pool_only:
            s = "{in_channels}, {out_channels}, " + s
        if self.stride != (1, 1):
            s += ", stride={stride}"
        if self.padding != (0, 0):
            s += ", padding={padding}"
        if self.dilation != (1, 1):
            s += ", dilation={dilation}"
        if self.output_padding != (0, 0):
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
    """The convolution part of :class:`PacConv2d` and :class:`PacConvTranspose2d`: weight, bias, fillers."""

    def __init__(self, *, in_channels: int, out_channels: int, bias: bool, shared_filters: bool, filler: str,
                 groups: int = 1, **kernel_options):
        super().__init__(in_channels=in_channels, out_channels=out_channels, pool_only=False, channel_wise=False,
                         shared_filters=shared_filters, filler=filler, groups=groups, **kernel_options)
        self._validate_conv_options()
        kh, kw = self.kernel_size
        if filler in ("pool", "crf_pool"):
            self.register_buffer("weight", torch.ones(1, 1, kh, kw))
            if filler == "crf_pool":
                self.weight[0, 0, kh // 2, kw // 2] = 0
        elif shared_filters:
            self.weight = nn.Parameter(torch.empty(1, 1, kh, kw))
        elif self.transposed:
            self.weight = nn.Parameter(torch.empty(in_channels, out_channels, kh, kw))
        else:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
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
                                        or any(k[a] < 2 * s[a] - 1 for a in range(2))):
            raise ValueError("filler='linear' needs a transposed layer with in_channels == out_channels and "
                             f"kernel_size >= 2 * stride - 1, got transposed={self.transposed}, channels "
                             f"{self.in_channels}->{self.out_channels}, kernel_size={k}, stride={s}")
        if self.filler in ("crf", "crf_perturbed") and (k[0] != k[1] or self.in_channels != self.out_channels):
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

    def _check_input(self, input: torch.Tensor) -> None:
        _check_4d("input_2d", input)
        if input.shape[1] != self.in_channels:
            raise ValueError(f"input_2d must have in_channels={self.in_channels} channels, got {input.shape[1]}")


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
        self._check_input(input_2d)
        weight, groups = _conv_weight(self.weight, self.shared_filters, self.groups, self.in_channels, False)
        return self._filter(
            input_2d, input_for_kernel, kernel, mask, weight, self.bias, groups,
            lambda k: pacconv2d(input_2d, k, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                self.shared_filters, groups=self.groups, padding_mode=self.padding_mode,
                                impl=self.impl))

    def _triton_forward(self, triton, input, guide, mask):
        weight, groups = _conv_weight(self.weight, self.shared_filters, self.groups, self.in_channels, False)
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
        self._check_input(input_2d)
        weight, groups = _conv_weight(self.weight, self.shared_filters, 1, self.in_channels, True)
        return self._filter(
            input_2d, input_for_kernel, kernel, mask, weight, self.bias, groups,
            lambda k: pacconv_transpose2d(input_2d, k, self.weight, self.bias, self.stride, self.padding,
                                          self.output_padding, self.dilation, self.shared_filters,
                                          impl=self.impl))

    def _triton_forward(self, triton, input, guide, mask):
        return triton.pac_conv_transpose2d(input, guide, self.weight, self.bias, self.stride, self.padding,
                                           self.output_padding, self.dilation, self.normalize_kernel, mask=mask)


class PacPool2d(_PacKernelLayer):
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
        super().__init__(in_channels=-1, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                         padding=padding, dilation=dilation, output_padding=0, transposed=False, pool_only=True,
                         kernel_type=kernel_type, smooth_kernel_type=smooth_kernel_type, channel_wise=channel_wise,
                         normalize_kernel=normalize_kernel, shared_filters=False, filler="uniform", groups=1,
                         padding_mode="zeros", impl=impl, native_impl=native_impl)
        self._register_kernel_parameters()
        self.reset_parameters()

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
        _check_4d("input_2d", input_2d)
        channels = input_2d.shape[1]
        if self.out_channels > 0 and self.out_channels != channels:
            raise ValueError(f"input_2d must have out_channels={self.out_channels} channels, got {channels}")
        if self.channel_wise:
            source = kernel if kernel is not None else input_for_kernel
            if isinstance(source, torch.Tensor) and source.shape[1] != channels:
                raise ValueError("input and kernel must have the same number of channels when channel_wise=True: "
                                 f"input has {channels}, {'kernel' if kernel is not None else 'guide'} "
                                 f"{source.shape[1]}")
        return self._filter(
            input_2d, input_for_kernel, kernel, mask, None, None, 1,
            lambda k: pacpool2d(input_2d, k, self.kernel_size, self.stride, self.padding, self.dilation,
                                impl=self.impl))

    def _triton_forward(self, triton, input, guide, mask):
        return triton.pac_pool2d(input, guide, self.kernel_size, self.stride, self.padding, self.dilation,
                                 self.normalize_kernel, mask=mask)
