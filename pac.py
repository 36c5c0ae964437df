"""Pixel-Adaptive Convolution (PAC) layers for PyTorch.

A clean-room implementation of the layers of "Pixel-Adaptive Convolutional Neural Networks"
(Su et al., CVPR 2019), keeping the public interface, defaults and state_dict layout of the 2019 code.

A PAC layer filters its input with a spatially invariant weight ``W`` modulated, at every output
pixel and tap, by an adaptive kernel ``K`` computed from a guide ``F``::

    out[b, o, y, x] = bias[o] + sum_{c, i, j} W[o, c, i, j] * K[b, i, j, y, x] * X[b, c, y*s + i*d - p, x*s + j*d - p]
    K[b, i, j, y, x] = f( sum_c (F[b, c, tap(i, j)] - F[b, c, centre])^2 )

with ``f(D) = exp(-D / 2)`` ('gaussian') or ``f(D) = alpha + (D + 1e-4)^(lambda / 2)`` ('inv_*').

Two implementations are selected with ``native_impl``:

- ``native_impl=True``: plain autograd through ``unfold``, the readable reference. It materialises the
  unfolded input ``[B, C, k*k, H', W']``.
- ``native_impl=False`` (default): custom autograd functions that never materialise the unfolded input
  or guide. Work is done per kernel tap over cache-sized bands of output rows, only the inputs are saved
  for backward and everything else is recomputed. Transposed convolutions are computed phase by phase
  (each tap reads a stride-1 window of the input and writes a strided phase of the output), so they
  never pay for zero insertion.

Both implementations support every option, agree to float rounding, run under ``torch.autocast``
(the adaptive kernel is always computed in float32) and ``torch.compile``, and are device-agnostic.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

__all__ = [
    "PacConv2d", "PacConvTranspose2d", "PacPool2d",
    "pacconv2d", "pacconv_transpose2d", "pacpool2d", "packernel2d", "nd2col",
]

IntPair = Union[int, Tuple[int, int]]
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

# Bytes of input rows processed per band by the lean path: small enough to stay in cache across
# the k*k taps, large enough to amortise the per-operation overhead.
_BAND_BYTES = 1 << 20
_MAX_BANDS = 64


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


def _band_rows(row_bytes: int, rows: int) -> int:
    """Rows per band: about _BAND_BYTES of input each, and at most _MAX_BANDS bands."""
    return min(rows, max(_BAND_BYTES // max(row_bytes, 1), -(-rows // _MAX_BANDS), 1))


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
# Tap geometry: which input positions every kernel tap reads, and which output positions it writes
# ----------------------------------------------------------------------------------------------

class _AxisTaps(NamedTuple):
    """Geometry of the taps along one axis: tap i maps output ``out_start[i] + out_step * t`` to input
    ``in_start[i] + in_step * t``, for every t of its output phase (all outputs congruent to
    ``out_start[i]`` modulo ``out_step``)."""
    out_step: int
    in_step: int
    out_start: Tuple[int, ...]
    in_start: Tuple[int, ...]
    out_size: int

    def phase_len(self, start: int) -> int:
        return max(0, -(-(self.out_size - start) // self.out_step))

    def phases(self) -> List[Tuple[int, List[int]]]:
        return [(p, [i for i, q in enumerate(self.out_start) if q == p]) for p in sorted(set(self.out_start))]


def _conv_axis(k: int, s: int, d: int, out_size: int) -> _AxisTaps:
    # The input is already padded: output t, tap i reads input t*s + i*d.
    return _AxisTaps(1, s, (0,) * k, tuple(i * d for i in range(k)), out_size)


def _transposed_axis(k: int, s: int, p: int, d: int, in_size: int, out_size: int) -> Tuple[_AxisTaps, Tuple[int, int]]:
    """Phase decomposition of a transposed convolution along one axis.

    Output y, tap i reads the zero-inserted input at ``y + i*d - P`` (``P = (k-1)d - p``): a real pixel m
    only when ``y + i*d - P = m*s``. So each tap writes one output phase and reads a stride-1 input
    window. Returns the geometry over an input padded by the returned (before, after) amounts, which
    make every tap's window cover its whole phase (the padding reads zeros, as the inserted zeros do).
    """
    big_p = (k - 1) * d - p
    phase = [(big_p - i * d) % s for i in range(k)]
    first = [(phase[i] + i * d - big_p) // s for i in range(k)]
    axis = _AxisTaps(s, 1, tuple(phase), tuple(first), out_size)
    before = max(0, max(-f for f in first))
    after = max(0, max(f + axis.phase_len(q) - in_size for f, q in zip(first, phase)))
    return axis._replace(in_start=tuple(f + before for f in first)), (before, after)


def _phase_bands(x: torch.Tensor, rows: _AxisTaps, cols: _AxisTaps):
    """Yield (row phase, its row taps, col phase, its col taps, t0, t1): bands of output-phase rows
    small enough that the input rows they read stay in cache across the taps."""
    row_bytes = x.shape[0] * x.shape[1] * x.shape[3] * x.element_size() * rows.in_step
    for py, taps_i in rows.phases():
        ny = rows.phase_len(py)
        band = _band_rows(row_bytes, ny)
        for px, taps_j in cols.phases():
            if cols.phase_len(px) == 0:
                continue
            for t0 in range(0, ny, band):
                yield py, taps_i, px, taps_j, t0, min(ny, t0 + band)


def _tap_slices(rows: _AxisTaps, cols: _AxisTaps, i: int, j: int, t0: int, ny: int, nx: int):
    """(input rows, input cols, output rows, output cols) of tap (i, j) over phase rows [t0, t0 + ny)."""
    return (_strided(rows.in_start[i] + rows.in_step * t0, ny, rows.in_step),
            _strided(cols.in_start[j], nx, cols.in_step),
            _strided(rows.out_start[i] + rows.out_step * t0, ny, rows.out_step),
            _strided(cols.out_start[j], nx, cols.out_step))


class _PacTapsFn(torch.autograd.Function):
    """Lean PAC filtering: ``out = bias + sum_taps W_t (K_t * X_t)``, tap by tap over phase bands.

    ``weight`` is in convolution layout ``(O, C / groups, kh, kw)``, or None for pooling (each channel
    summed on its own). ``kernel`` is ``(B, 1 or C, kh, kw, H', W')``. Saves only its inputs.
    """

    @staticmethod
    def forward(ctx, x, kernel, weight, bias, rows, cols, groups):
        with torch.autocast(x.device.type, enabled=False):
            out = _taps_forward(x, kernel, weight, bias, rows, cols, groups)
        ctx.save_for_backward(x, kernel, weight)
        ctx.geometry = (rows, cols, groups, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, kernel, weight = ctx.saved_tensors
        rows, cols, groups, has_bias = ctx.geometry
        need_x, need_k, need_w, need_b = ctx.needs_input_grad[:4]
        with torch.autocast(grad_out.device.type, enabled=False):
            gx, gk, gw = _taps_backward(grad_out.to(x.dtype), x, kernel, weight, rows, cols, groups,
                                        need_x, need_k, need_w)
        gb = grad_out.sum((0, 2, 3)) if (has_bias and need_b) else None
        return gx, gk, gw, gb, None, None, None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _weight_mode(weight: Optional[torch.Tensor], groups: int, channels: int) -> str:
    if weight is None:
        return "pool"
    return "depthwise" if weight.shape[1] == 1 and weight.shape[0] == groups == channels else "dense"


def _tap_weight(weight: torch.Tensor, groups: int, i: int, j: int, batch: int) -> torch.Tensor:
    """Weight of tap (i, j) as a batch of matrices (batch * groups, O/g, C/g)."""
    o, cg = weight.shape[:2]
    w = weight[:, :, i, j].reshape(1, groups, o // groups, cg)
    return w.expand(batch, -1, -1, -1).reshape(batch * groups, o // groups, cg)


def _taps_forward(x, kernel, weight, bias, rows, cols, groups):
    b, c = x.shape[:2]
    o = c if weight is None else weight.shape[0]
    mode = _weight_mode(weight, groups, c)
    out = x.new_zeros(b, o, rows.out_size, cols.out_size)
    for py, taps_i, px, taps_j, t0, t1 in _phase_bands(x, rows, cols):
        ny, nx = t1 - t0, cols.phase_len(px)
        acc = torch.zeros(b, o, ny, nx, dtype=_acc_dtype(x.dtype), device=x.device)
        flat = acc.view(b * groups, o // groups, ny * nx)
        for i in taps_i:
            for j in taps_j:
                rows_in, cols_in, rows_out, cols_out = _tap_slices(rows, cols, i, j, t0, ny, nx)
                y = x[:, :, rows_in, cols_in] * kernel[:, :, i, j, rows_out, cols_out]
                if mode == "pool":
                    acc.add_(y)
                elif mode == "depthwise":
                    acc.addcmul_(y, weight[:, 0, i, j].view(1, c, 1, 1))
                elif acc.dtype == y.dtype:
                    flat.baddbmm_(_tap_weight(weight, groups, i, j, b), y.view(b * groups, c // groups, ny * nx))
                else:  # low-precision inputs: multiply in their dtype, accumulate in float32
                    flat.add_(torch.bmm(_tap_weight(weight, groups, i, j, b), y.view(b * groups, c // groups, -1)))
        out[:, :, _strided(py + rows.out_step * t0, ny, rows.out_step), _strided(px, nx, cols.out_step)] = acc
    if bias is not None:
        out += bias.view(1, -1, 1, 1)
    return out


def _taps_backward(grad_out, x, kernel, weight, rows, cols, groups, need_x, need_k, need_w):
    b, c = x.shape[:2]
    o = grad_out.shape[1]
    mode = _weight_mode(weight, groups, c)
    acc_dtype = _acc_dtype(x.dtype)
    gx = torch.zeros(x.shape, dtype=acc_dtype, device=x.device) if need_x else None
    gk = torch.zeros(kernel.shape, dtype=acc_dtype, device=x.device) if need_k else None
    gw = torch.zeros(weight.shape, dtype=acc_dtype, device=x.device) if need_w and weight is not None else None
    for py, taps_i, px, taps_j, t0, t1 in _phase_bands(x, rows, cols):
        ny, nx = t1 - t0, cols.phase_len(px)
        go = grad_out[:, :, _strided(py + rows.out_step * t0, ny, rows.out_step),
                      _strided(px, nx, cols.out_step)].contiguous()
        go_flat = go.view(b * groups, o // groups, ny * nx)
        for i in taps_i:
            for j in taps_j:
                rows_in, cols_in, rows_out, cols_out = _tap_slices(rows, cols, i, j, t0, ny, nx)
                xs, ks = x[:, :, rows_in, cols_in], kernel[:, :, i, j, rows_out, cols_out]
                # gy = dL/d(K_t * X_t): the gradient reaching the modulated input of this tap.
                if mode == "pool":
                    gy = go
                elif mode == "depthwise":
                    gy = go * weight[:, 0, i, j].view(1, c, 1, 1)
                else:
                    gy = torch.bmm(_tap_weight(weight, groups, i, j, b).transpose(1, 2), go_flat).view(b, c, ny, nx)
                if need_x:
                    gx[:, :, rows_in, cols_in].addcmul_(gy, ks)
                if need_k:
                    gxk = gy * xs
                    gk[:, :, i, j, rows_out, cols_out] = gxk.sum(1, keepdim=True) if kernel.shape[1] == 1 else gxk
                if gw is not None:
                    y = xs * ks
                    if mode == "depthwise":
                        gw[:, 0, i, j] += (go * y).sum((0, 2, 3))
                    else:
                        gwt = torch.bmm(go_flat, y.view(b * groups, c // groups, ny * nx).transpose(1, 2))
                        gw[:, :, i, j] += gwt.view(b, o, c // groups).sum(0)
    cast = lambda g, ref: None if g is None else g.to(ref.dtype)  # noqa: E731
    return cast(gx, x), cast(gk, kernel), cast(gw, weight)


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


# ----------------------------------------------------------------------------------------------
# Adaptive kernel
# ----------------------------------------------------------------------------------------------

class _TapDistanceFn(torch.autograd.Function):
    """D[b, c?, i, j, y, x] = sum_c phi(G[tap] - centre)^2 over a padded guide, tap by tap.

    ``phi`` is the identity, or ReLU for asymmetric kernels. Never materialises the unfolded guide.
    """

    @staticmethod
    def forward(ctx, guide, centre, kernel_size, stride, dilation, asym, channel_wise):
        ctx.save_for_backward(guide, centre)
        ctx.args = (kernel_size, stride, dilation, asym, channel_wise)
        b, c, h, w = centre.shape
        dist = guide.new_empty(b, c if channel_wise else 1, kernel_size[0], kernel_size[1], h, w)
        for i, j, rows, diff in _tap_differences(guide, centre, kernel_size, stride, dilation, asym):
            diff.square_()
            dist[:, :, i, j, rows] = diff if channel_wise else diff.sum(1, keepdim=True)
        return dist

    @staticmethod
    def backward(ctx, grad_dist):
        guide, centre = ctx.saved_tensors
        kernel_size, stride, dilation, asym, channel_wise = ctx.args
        w = centre.shape[3]
        grad_guide = torch.zeros_like(guide)
        grad_centre = torch.zeros_like(centre)
        for i, j, rows, diff in _tap_differences(guide, centre, kernel_size, stride, dilation, asym):
            # d(phi(diff)^2)/d diff = 2 phi(diff) for both the identity and ReLU.
            g = diff.mul_(2 * grad_dist[:, :, i, j, rows])
            tap_rows = _strided(i * dilation[0] + rows.start * stride[0], rows.stop - rows.start, stride[0])
            grad_guide[:, :, tap_rows, _strided(j * dilation[1], w, stride[1])] += g
            grad_centre[:, :, rows] -= g
        return grad_guide, grad_centre, None, None, None, None, None


def _tap_differences(guide, centre, kernel_size, stride, dilation, asym):
    """Yield (i, j, output rows, phi(guide tap - centre)) over cache-sized bands of output rows."""
    b, c, h, w = centre.shape
    band = _band_rows(b * c * guide.shape[3] * guide.element_size() * stride[0], h)
    for r0 in range(0, h, band):
        rows = slice(r0, min(h, r0 + band))
        n = rows.stop - r0
        for i in range(kernel_size[0]):
            tap_rows = _strided(i * dilation[0] + r0 * stride[0], n, stride[0])
            for j in range(kernel_size[1]):
                tap = guide[:, :, tap_rows, _strided(j * dilation[1], w, stride[1])]
                diff = tap - centre[:, :, rows]
                yield i, j, rows, (diff.relu_() if asym else diff)


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


def packernel2d(input: torch.Tensor, mask: Optional[torch.Tensor] = None, kernel_size: IntPair = 0,
                stride: IntPair = 1, padding: IntPair = 0, output_padding: IntPair = 0, dilation: IntPair = 1,
                kernel_type: str = "gaussian", smooth_kernel_type: str = "none",
                smooth_kernel: Optional[torch.Tensor] = None, inv_alpha: Optional[torch.Tensor] = None,
                inv_lambda: Optional[torch.Tensor] = None, channel_wise: bool = False,
                normalize_kernel: bool = False, transposed: bool = False, native_impl: bool = False,
                padding_mode: str = "zeros") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
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
        native_impl: use the plain-autograd implementation.
        padding_mode: how the guide is padded ('zeros', 'reflect', 'replicate', 'circular').

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
        if smooth_kind != "none":
            centre = _smoothed_centre(guide_padded, smooth_kernel.to(guide.dtype), k, win_s, d, out_hw)
        else:
            centre = guide_padded[:, :, _strided(k[0] // 2 * d[0], out_hw[0], win_s[0]),
                                  _strided(k[1] // 2 * d[1], out_hw[1], win_s[1])]
        distance = _native_distance if native_impl else _TapDistanceFn.apply
        dist = distance(guide_padded, centre, k, win_s, d, asym, channel_wise)

        if kind == "gaussian":
            kernel = dist.mul_(-0.5).exp_()  # in place: the distances are not needed by any backward
        else:
            shape = (1, -1, 1, 1, 1, 1)
            alpha = inv_alpha.to(dist.dtype).reshape(shape) if inv_alpha.dim() else inv_alpha.to(dist.dtype)
            lam = inv_lambda.to(dist.dtype).reshape(shape) if inv_lambda.dim() else inv_lambda.to(dist.dtype)
            kernel = alpha + (dist + 1e-4).pow(0.5 * lam)

        output_mask = None
        if mask is not None or normalize_kernel:
            # Which taps fall on real pixels. Zero padding and inserted zeros are not real; a border
            # padded by reflection, replication or wrapping is, and a mask is padded the same way.
            def taps_of(m):
                if transposed or padding_mode == "zeros":
                    return nd2col(m, k, s, p, op, d, transposed=transposed)
                return nd2col(_pad(m, p, padding_mode), k, s, 0, 0, d)

            pattern = taps_of(guide.new_ones(1, 1, *in_hw))
            if mask is not None:
                _check_mask(mask, guide.shape[0], in_hw)
                mask_cols = taps_of(mask.to(guide.dtype))
                kernel = kernel * mask_cols
                if not normalize_kernel:
                    # Windows without any real pixel have mask_cols == 0 everywhere: avoid 0 / 0.
                    norm = mask_cols.sum((2, 3), keepdim=True) / pattern.sum((2, 3), keepdim=True).clamp(min=1)
            else:
                kernel = kernel * pattern
            if normalize_kernel:
                norm = kernel.sum((2, 3), keepdim=True)
            empty = norm == 0
            kernel = kernel / (norm + empty.to(norm.dtype))
            if mask is not None:
                output_mask = (~empty).to(guide.dtype).flatten(1, 3)
    return kernel, output_mask


def _check_mask(mask: torch.Tensor, batch: int, in_hw: Tuple[int, int]) -> None:
    _check_4d("mask", mask)
    if mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != tuple(in_hw):
        raise ValueError(f"mask must have shape ({batch} or 1, 1, {in_hw[0]}, {in_hw[1]}) (the layer's input "
                         f"size), got {tuple(mask.shape)}")


# ----------------------------------------------------------------------------------------------
# Functional convolution and pooling
# ----------------------------------------------------------------------------------------------

def _check_kernel(kernel: torch.Tensor, batch: int, channels: int, k, out_hw, allow_channels: bool = True) -> None:
    if not isinstance(kernel, torch.Tensor):
        raise TypeError(f"kernel must be a torch.Tensor, got {type(kernel).__name__}")
    ok_c = (1, channels) if allow_channels else (1,)
    if (kernel.dim() != 6 or kernel.shape[0] != batch or kernel.shape[1] not in ok_c
            or tuple(kernel.shape[2:4]) != tuple(k) or tuple(kernel.shape[4:]) != tuple(out_hw)):
        expected = f"({batch}, 1{' or ' + str(channels) if allow_channels and channels != 1 else ''}, " \
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


def _run_taps(x, kernel, weight, bias, groups, native_cols, lean_geometry, native_impl):
    """Dispatch to one of the two implementations, under autocast's dtype when it is active.

    ``native_cols(x)`` unfolds the input for the native path; ``lean_geometry(x)`` returns the
    (possibly padded) input and the row and column tap geometry for the lean path.
    """
    dtype = _autocast_dtype(x.device.type)
    x, kernel, weight, bias = _cast_all(dtype, x, kernel, weight, bias)
    kernel = kernel.to(x.dtype)
    if native_impl:
        with torch.autocast(x.device.type, enabled=False):
            return _native_taps(native_cols(x), kernel, weight, bias, groups)
    x, rows, cols = lean_geometry(x)
    return _PacTapsFn.apply(x, kernel, weight, bias, rows, cols, groups)


def _transposed_lean_input(x, k, s, p, d, out_hw):
    rows, (top, bottom) = _transposed_axis(k[0], s[0], p[0], d[0], x.shape[2], out_hw[0])
    cols, (left, right) = _transposed_axis(k[1], s[1], p[1], d[1], x.shape[3], out_hw[1])
    return F.pad(x, (left, right, top, bottom)), rows, cols


def pacconv2d(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
              dilation: IntPair = 1, shared_filters: bool = False, native_impl: bool = False,
              groups: int = 1, padding_mode: str = "zeros") -> torch.Tensor:
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
        native_impl: use the plain-autograd implementation.

    Shape:
        Output ``(B, O, H', W')`` with ``H' = (H + 2p - d(kh - 1) - 1) // s + 1``.

    Example:
        >>> x, guide = torch.rand(1, 4, 16, 16), torch.rand(1, 3, 16, 16)
        >>> K, _ = packernel2d(guide, kernel_size=3, padding=1)
        >>> pacconv2d(x, K, torch.rand(8, 4, 3, 3), padding=1).shape
        torch.Size([1, 8, 16, 16])
    """
    _check_4d("input", input)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    b, c, h, w = input.shape
    k = tuple(weight.shape[-2:])
    if shared_filters:
        _check_weight(weight, (1, 1) + k, "shared filters")
        weight, groups = weight.expand(c, 1, *k), c
    else:
        if not isinstance(groups, int) or groups <= 0 or c % groups or weight.shape[0] % groups:
            raise ValueError(f"groups must be a positive integer dividing the input channels ({c}) and the output "
                             f"channels ({weight.shape[0]}), got {groups}")
        _check_weight(weight, (weight.shape[0], c // groups) + k, "out_channels, in_channels / groups, kh, kw")
    _check_bias(bias, weight.shape[0])
    out_hw = _conv_out_hw((h, w), k, s, p, d)
    _check_kernel(kernel, b, c, k, out_hw)
    x = _pad(input, p, padding_mode)
    return _run_taps(x, kernel, weight, bias, groups,
                     lambda xp: nd2col(xp, k, s, 0, 0, d),
                     lambda xp: (xp, _conv_axis(k[0], s[0], d[0], out_hw[0]), _conv_axis(k[1], s[1], d[1], out_hw[1])),
                     native_impl)


def pacconv_transpose2d(input: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                        output_padding: IntPair = 0, dilation: IntPair = 1, shared_filters: bool = False,
                        native_impl: bool = False) -> torch.Tensor:
    """Pixel-adaptive transposed convolution with a given adaptive kernel.

    Equivalent to zero-inserting the input by the stride, padding it by ``(k-1)d - p`` (plus
    ``output_padding`` at the far side) and running a stride-1 PAC correlation with ``W`` permuted to
    ``(C_out, C_in, kh, kw)``. Note the weight is *not* spatially flipped: with a constant kernel this
    equals :class:`torch.nn.ConvTranspose2d` whose weight is flipped in both spatial axes (the
    convention of the released weights). The lean implementation computes only the real taps.

    Args:
        input: ``(B, C_in, H, W)``.
        kernel: ``(B, 1 or C_in, kh, kw, H', W')`` at the output resolution.
        weight: ``(C_in, C_out, kh, kw)``, or ``(1, 1, kh, kw)`` with ``shared_filters``.
        bias: ``(C_out,)`` or None.

    Shape:
        Output ``(B, C_out, H', W')`` with ``H' = (H - 1)s - 2p + d(kh - 1) + 1 + output_padding``.

    Example:
        >>> x, guide = torch.rand(1, 4, 8, 8), torch.rand(1, 3, 16, 16)
        >>> K, _ = packernel2d(guide, kernel_size=5, stride=2, padding=2, output_padding=1, transposed=True)
        >>> pacconv_transpose2d(x, K, torch.rand(4, 2, 5, 5), stride=2, padding=2, output_padding=1).shape
        torch.Size([1, 2, 16, 16])
    """
    _check_4d("input", input)
    s, p, op, d = _pair(stride), _pair(padding), _pair(output_padding), _pair(dilation)
    b, c, h, w = input.shape
    k = tuple(weight.shape[-2:])
    if shared_filters:
        _check_weight(weight, (1, 1) + k, "shared filters")
        conv_weight, groups = weight.expand(c, 1, *k), c
    else:
        _check_weight(weight, (c, weight.shape[1]) + k, "in_channels, out_channels, kh, kw")
        conv_weight, groups = weight.transpose(0, 1), 1
    _check_bias(bias, conv_weight.shape[0])
    out_hw = _transposed_out_hw((h, w), k, s, p, op, d)
    _check_kernel(kernel, b, c, k, out_hw)
    return _run_taps(input, kernel, conv_weight, bias, groups,
                     lambda x: F.unfold(_transposed_padded_input(x, k, s, p, op, d), k, dilation=d)
                     .view(b, c, k[0], k[1], *out_hw),
                     lambda x: _transposed_lean_input(x, k, s, p, d, out_hw),
                     native_impl)


def pacpool2d(input: torch.Tensor, kernel: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1,
              padding: IntPair = 0, dilation: IntPair = 1, native_impl: bool = False) -> torch.Tensor:
    """Pixel-adaptive pooling: ``out[b,c,y,x] = sum_{i,j} K[b,·,i,j,y,x] X[b,c,y*s+i*d-p,x*s+j*d-p]``.

    A weighted *sum*; it is an average when the kernel is normalised (``normalize_kernel=True``).

    Args:
        input: ``(B, C, H, W)``.
        kernel: ``(B, 1 or C, kh, kw, H', W')``.

    Example:
        >>> x, guide = torch.rand(1, 4, 16, 16), torch.rand(1, 3, 16, 16)
        >>> K, _ = packernel2d(guide, kernel_size=3, stride=2, padding=1, normalize_kernel=True)
        >>> pacpool2d(x, K, 3, stride=2, padding=1).shape
        torch.Size([1, 4, 8, 8])
    """
    _check_4d("input", input)
    k, s, p, d = (_pair(v) for v in (kernel_size, stride, padding, dilation))
    b, c, h, w = input.shape
    out_hw = _conv_out_hw((h, w), k, s, p, d)
    _check_kernel(kernel, b, c, k, out_hw)
    x = _pad(input, p)
    return _run_taps(x, kernel, None, None, 1, lambda xp: nd2col(xp, k, s, 0, 0, d),
                     lambda xp: (xp, _conv_axis(k[0], s[0], d[0], out_hw[0]), _conv_axis(k[1], s[1], d[1], out_hw[1])),
                     native_impl)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class _PacConvNd(nn.Module):
    """Shared construction, parameters, fillers and kernel computation of the PAC modules."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, transposed,
                 output_padding, bias, pool_only, kernel_type, smooth_kernel_type, channel_wise,
                 normalize_kernel, shared_filters, filler, native_impl, groups=1, padding_mode="zeros"):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation, self.output_padding = (
            _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), _pair(output_padding))
        self.transposed, self.pool_only = transposed, pool_only
        self.kernel_type, self.smooth_kernel_type = kernel_type, smooth_kernel_type
        self.channel_wise, self.normalize_kernel = channel_wise, normalize_kernel
        self.shared_filters, self.filler, self.native_impl = shared_filters, filler, native_impl
        self.groups, self.padding_mode = groups, padding_mode
        self._validate()

        kh, kw = self.kernel_size
        if not pool_only:
            if filler in ("pool", "crf_pool"):
                self.register_buffer("weight", torch.ones(1, 1, kh, kw))
                if filler == "crf_pool":
                    self.weight[0, 0, kh // 2, kw // 2] = 0
            elif shared_filters:
                self.weight = nn.Parameter(torch.empty(1, 1, kh, kw))
            elif transposed:
                self.weight = nn.Parameter(torch.empty(in_channels, out_channels, kh, kw))
            else:
                self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
            self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

        kind, alpha, lam, _, fixed = _parse_kernel_type(kernel_type)
        if kind == "inv":
            self.inv_alpha_init, self.inv_lambda_init = alpha, lam
            if fixed:
                self.register_buffer("inv_alpha", torch.tensor(alpha))
                self.register_buffer("inv_lambda", torch.tensor(lam))
            else:
                shape = (out_channels,) if channel_wise else ()
                self.inv_alpha = nn.Parameter(torch.full(shape, alpha))
                self.inv_lambda = nn.Parameter(torch.full(shape, lam))

        smooth_kind, width = _parse_smooth_kernel_type(smooth_kernel_type)
        if smooth_kind == "gaussian":
            g = torch.tensor([0.25, 0.5, 0.25])
            self.register_buffer("smooth_kernel", torch.outer(g, g).view(1, 1, 3, 3))
        elif smooth_kind == "average":
            self.register_buffer("smooth_kernel", torch.full((1, 1, width, width), 1.0 / width ** 2))
        elif smooth_kind == "full":
            self.smooth_kernel = nn.Parameter(torch.full((1, 1, width, width), 1.0 / width ** 2))
        self.reset_parameters()

    def _validate(self) -> None:
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
        if self.shared_filters and self.in_channels != self.out_channels:
            raise ValueError("when specifying shared_filters, number of channels should not change: got "
                             f"in_channels={self.in_channels}, out_channels={self.out_channels}")
        if self.channel_wise and self.kernel_type.startswith("inv") and "fixed" not in self.kernel_type \
                and self.out_channels <= 0:
            raise ValueError(f"out_channels needed for channel_wise {self.kernel_type}: got "
                             f"out_channels={self.out_channels}, expected the number of guide channels")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        if not self.pool_only:
            if not isinstance(self.groups, int) or self.groups <= 0 or self.in_channels % self.groups \
                    or self.out_channels % self.groups:
                raise ValueError(f"groups must divide in_channels ({self.in_channels}) and out_channels "
                                 f"({self.out_channels}), got {self.groups}")
            if self.filler in ("pool", "crf_pool") and not self.shared_filters:
                raise ValueError(f"filler={self.filler!r} needs shared_filters=True")
            if self.filler not in ("uniform", "linear", "crf", "crf_perturbed", "pool", "crf_pool"):
                raise ValueError(f"Initialization method (filler={self.filler!r}) not supported: expected "
                                 "'uniform', 'linear', 'crf', 'crf_perturbed', 'pool' or 'crf_pool'")

    def reset_parameters(self) -> None:
        """Re-initialise the weight and bias with ``filler``, and the learnable kernel parameters."""
        if not self.pool_only and self.filler not in ("pool", "crf_pool"):
            with torch.no_grad():
                getattr(self, "_fill_" + self.filler.replace("crf_perturbed", "crf"))()
        with torch.no_grad():
            if isinstance(getattr(self, "inv_alpha", None), nn.Parameter):
                self.inv_alpha.fill_(self.inv_alpha_init)
                self.inv_lambda.fill_(self.inv_lambda_init)
            if isinstance(getattr(self, "smooth_kernel", None), nn.Parameter):
                self.smooth_kernel.fill_(1.0 / self.smooth_kernel.numel())

    def _fill_uniform(self) -> None:
        n = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(n)
        if self.shared_filters:  # kept from the 2019 code: the bound grows with the channel count
            bound *= self.in_channels
        self.weight.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    def _fill_linear(self) -> None:
        k, s = self.kernel_size, self.stride
        if not self.transposed or self.in_channels != self.out_channels or any(k[a] < 2 * s[a] - 1 for a in range(2)):
            raise ValueError("filler='linear' needs a transposed layer with in_channels == out_channels and "
                             f"kernel_size >= 2 * stride - 1, got transposed={self.transposed}, channels "
                             f"{self.in_channels}->{self.out_channels}, kernel_size={k}, stride={s}")
        profiles = []
        for a in range(2):
            q = (k[a] - (2 * s[a] - 1)) // 2
            ramp = [(t + 1) / s[a] for t in range(s[a])] + [(s[a] - t) / s[a] for t in range(1, s[a])]
            prof = np.array([0.0] * q + ramp + [0.0] * q)
            if self.normalize_kernel:
                prof *= np.array([(k[a] - j - 1) // s[a] + j // s[a] + 1 for j in range(k[a])])
            profiles.append(prof)
        w2d = torch.from_numpy(np.outer(*profiles)).to(self.weight)
        self.weight.zero_()
        for ch in range(1 if self.shared_filters else self.in_channels):
            self.weight[ch, ch] = w2d
        if self.bias is not None:
            self.bias.zero_()

    def _fill_crf(self) -> None:
        k = self.kernel_size
        if k[0] != k[1] or self.in_channels != self.out_channels:
            raise ValueError(f"filler={self.filler!r} needs a square kernel and in_channels == out_channels, got "
                             f"kernel_size={k}, channels {self.in_channels}->{self.out_channels}")
        g = torch.from_numpy(np_gaussian_2d(k[0]) * k[0] * k[0]).to(self.weight)
        g[k[0] // 2, k[1] // 2] = 0
        if self.shared_filters:
            self.weight.copy_(g.view(1, 1, *k))
        else:
            compat = 1 - torch.eye(self.out_channels, dtype=g.dtype, device=g.device)
            self.weight.copy_(compat.view(*compat.shape, 1, 1) * g)
        if self.filler == "crf_perturbed":
            self.weight.add_(torch.empty_like(self.weight).uniform_(-0.0005, 0.0005))
        if self.bias is not None:
            self.bias.zero_()

    def compute_kernel(self, input_for_kernel: torch.Tensor, input_mask: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The adaptive kernel of this layer for a guide (see :func:`packernel2d`)."""
        return packernel2d(input_for_kernel, input_mask, kernel_size=self.kernel_size, stride=self.stride,
                           padding=self.padding, output_padding=self.output_padding, dilation=self.dilation,
                           kernel_type=self.kernel_type, smooth_kernel_type=self.smooth_kernel_type,
                           smooth_kernel=getattr(self, "smooth_kernel", None),
                           inv_alpha=getattr(self, "inv_alpha", None), inv_lambda=getattr(self, "inv_lambda", None),
                           channel_wise=self.channel_wise, normalize_kernel=self.normalize_kernel,
                           transposed=self.transposed, native_impl=self.native_impl,
                           padding_mode=self.padding_mode)

    def _guide_size(self, input_2d: torch.Tensor) -> Tuple[int, int]:
        """Spatial size the guide must have: the input's, or the output's for a transposed layer."""
        if not self.transposed:
            return tuple(input_2d.shape[2:])
        return _transposed_out_hw(input_2d.shape[2:], self.kernel_size, self.stride, self.padding,
                                  self.output_padding, self.dilation)

    def _kernel_for(self, input_2d, input_for_kernel, kernel, mask):
        """Compute (or pass through) the adaptive kernel for a forward call."""
        _check_4d("input_2d", input_2d)
        guide_hw = self._guide_size(input_2d)
        if not self.pool_only and input_2d.shape[1] != self.in_channels:
            raise ValueError(f"input_2d must have in_channels={self.in_channels} channels, got {input_2d.shape[1]}")
        if kernel is not None:
            return kernel, None
        if input_for_kernel is None:
            raise ValueError("input_for_kernel (the guide) is required when no precomputed kernel is given")
        _check_4d("input_for_kernel", input_for_kernel)
        if tuple(input_for_kernel.shape[2:]) != tuple(guide_hw) or input_for_kernel.shape[0] != input_2d.shape[0]:
            where = "output" if self.transposed else "input"
            raise ValueError(f"input_for_kernel must match the layer's {where} batch and size "
                             f"({input_2d.shape[0]}, *, {guide_hw[0]}, {guide_hw[1]}), got "
                             f"{tuple(input_for_kernel.shape)}")
        return self.compute_kernel(input_for_kernel, mask)

    def extra_repr(self) -> str:
        s = "kernel_size={kernel_size}, kernel_type={kernel_type}"
        if not self.pool_only:
            s = "{in_channels}, {out_channels}, " + s
        if self.stride != (1,) * len(self.stride):
            s += ", stride={stride}"
        if self.padding != (0,) * len(self.padding):
            s += ", padding={padding}"
        if self.dilation != (1,) * len(self.dilation):
            s += ", dilation={dilation}"
        if self.output_padding != (0,) * len(self.output_padding):
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
        return s.format(**self.__dict__)


def _with_mask(output: torch.Tensor, output_mask: Optional[torch.Tensor]):
    return output if output_mask is None else (output, output_mask)


class PacConv2d(_PacConvNd):
    """Pixel-adaptive convolution (Su et al., CVPR 2019).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as in
            :class:`torch.nn.Conv2d`. ``kernel_size`` must be odd and ``padding <= dilation*(k-1)/2``.
        kernel_type: 'gaussian' or 'inv_{alpha}_{lambda}[_asym][_fixed]' (see :func:`packernel2d`).
        smooth_kernel_type: 'none', 'gaussian', 'average_{s}' or 'full_{s}' (learnable).
        normalize_kernel: normalise the adaptive kernel to sum 1 over the valid taps.
        shared_filters: filter every channel on its own with one shared ``(1, 1, kh, kw)`` filter.
        filler: weight initialisation: 'uniform', 'crf', 'crf_perturbed', 'pool' or 'crf_pool'.
        native_impl: use the plain-autograd implementation instead of the lean one.
        groups, padding_mode: as in :class:`torch.nn.Conv2d` (the guide is padded the same way).

    Shape:
        - input_2d: ``(B, C_in, H, W)``; input_for_kernel (guide): ``(B, C_g, H, W)``;
          mask (optional): ``(B, 1, H, W)``; kernel (optional, replaces the guide):
          ``(B, 1, kh, kw, H', W')``.
        - Output: ``(B, C_out, H', W')``, plus the output mask ``(B, 1, H', W')`` when a mask is given.

    Example:
        >>> conv = PacConv2d(16, 32, kernel_size=5, padding=2)
        >>> conv(torch.rand(2, 16, 64, 64), torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 32, 64, 64])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, bias: bool = True, kernel_type: str = "gaussian",
                 smooth_kernel_type: str = "none", normalize_kernel: bool = False, shared_filters: bool = False,
                 filler: str = "uniform", native_impl: bool = False, groups: int = 1, padding_mode: str = "zeros"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, False, 0, bias,
                         False, kernel_type, smooth_kernel_type, False, normalize_kernel, shared_filters,
                         filler, native_impl, groups, padding_mode)

    def forward(self, input_2d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        kernel, output_mask = self._kernel_for(input_2d, input_for_kernel, kernel, mask)
        output = pacconv2d(input_2d, kernel, self.weight, self.bias, self.stride, self.padding, self.dilation,
                           self.shared_filters, self.native_impl, self.groups, self.padding_mode)
        return _with_mask(output, output_mask)


class PacConvTranspose2d(_PacConvNd):
    """Pixel-adaptive transposed convolution.

    The weight has the :class:`torch.nn.ConvTranspose2d` layout ``(C_in, C_out, kh, kw)`` but is applied
    without the spatial flip (see :func:`pacconv_transpose2d`). The guide has the *output* resolution.
    Other arguments as :class:`PacConv2d`, plus ``output_padding``; ``filler='linear'`` initialises a
    bilinear upsampler.

    Shape:
        - input_2d: ``(B, C_in, H, W)``; input_for_kernel: ``(B, C_g, H', W')``; mask: ``(B, 1, H, W)``.
        - Output: ``(B, C_out, H', W')`` with ``H' = (H - 1)s - 2p + d(k - 1) + 1 + output_padding``.

    Example:
        >>> up = PacConvTranspose2d(8, 8, kernel_size=5, stride=2, padding=2, output_padding=1)
        >>> up(torch.rand(1, 8, 32, 32), torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 8, 64, 64])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, output_padding: IntPair = 0, dilation: IntPair = 1, bias: bool = True,
                 kernel_type: str = "gaussian", smooth_kernel_type: str = "none", normalize_kernel: bool = False,
                 shared_filters: bool = False, filler: str = "uniform", native_impl: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, True, output_padding,
                         bias, False, kernel_type, smooth_kernel_type, False, normalize_kernel, shared_filters,
                         filler, native_impl)

    def forward(self, input_2d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        kernel, output_mask = self._kernel_for(input_2d, input_for_kernel, kernel, mask)
        output = pacconv_transpose2d(input_2d, kernel, self.weight, self.bias, self.stride, self.padding,
                                     self.output_padding, self.dilation, self.shared_filters, self.native_impl)
        return _with_mask(output, output_mask)


class PacPool2d(_PacConvNd):
    """Pixel-adaptive pooling: a weighted sum of every window (an average with ``normalize_kernel``).

    Note ``stride`` defaults to 1 (not to ``kernel_size`` as in :class:`torch.nn.AvgPool2d`).

    Args:
        kernel_size, stride, padding, dilation: window geometry.
        kernel_type, smooth_kernel_type, normalize_kernel: see :class:`PacConv2d`.
        channel_wise: one adaptive kernel per channel; the guide then has as many channels as the input.
        out_channels: number of channels, needed for learnable per-channel 'inv_*' parameters.

    Shape:
        - input_2d: ``(B, C, H, W)``; input_for_kernel: ``(B, C_g, H, W)`` (``C_g = C`` when channel_wise).
        - Output: ``(B, C, H', W')``.

    Example:
        >>> pool = PacPool2d(kernel_size=3, stride=2, padding=1, normalize_kernel=True)
        >>> pool(torch.rand(1, 4, 32, 32), torch.rand(1, 3, 32, 32)).shape
        torch.Size([1, 4, 16, 16])
    """

    def __init__(self, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
                 kernel_type: str = "gaussian", smooth_kernel_type: str = "none", channel_wise: bool = False,
                 normalize_kernel: bool = False, out_channels: int = -1, native_impl: bool = False):
        super().__init__(-1, out_channels, kernel_size, stride, padding, dilation, False, 0, False, True,
                         kernel_type, smooth_kernel_type, channel_wise, normalize_kernel, False, "uniform",
                         native_impl)

    def forward(self, input_2d: torch.Tensor, input_for_kernel: Optional[torch.Tensor],
                kernel: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        kernel, output_mask = self._kernel_for(input_2d, input_for_kernel, kernel, mask)
        channels = input_2d.shape[1]
        if self.out_channels > 0 and self.out_channels != channels:
            raise ValueError(f"input_2d must have out_channels={self.out_channels} channels, got {channels}")
        if self.channel_wise and kernel.shape[1] != channels:
            raise ValueError("input and kernel must have the same number of channels when channel_wise=True: "
                             f"input has {channels}, kernel {kernel.shape[1]}")
        output = pacpool2d(input_2d, kernel, self.kernel_size, self.stride, self.padding, self.dilation,
                           self.native_impl)
        return _with_mask(output, output_mask)
