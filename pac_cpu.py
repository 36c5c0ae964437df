"""Compiled CPU loops for the band primitives of :mod:`pac`'s 'taps' engine.

On a CPU the 'taps' engine spends most of its time in memory-bound passes over the taps of a band: the guide
differences, the modulated input windows and their gradients, each a chain of torch operations that reads and
writes a ``(B, C, taps, outputs)`` temporary several times. Each function here does one such chain in a single
pass of a plain C loop:

* :func:`distance` -- ``D[t, p] = sum_c phi(G[c, read_t(p)] - centre[c, p])^2`` (per channel with ``channel_wise``),
* :func:`modulate` -- ``M[c, t, p] = X[c, read_t(p)] * K[t, p]``, the input of the weight's matrix product,
* :func:`pool` -- ``sum_t X[c, read_t(p)] * K[t, p]``,
* :func:`modulate_backward` -- ``gX[c, read_t(p)] += gM[c, t, p] * K[t, p]`` and ``gK[t, p] = sum_c gM * X``,
* :func:`distance_backward` -- the guide and centre gradients of :func:`distance`.

``read_t(p)`` is any window of a band (see ``pac._reads``): one row offset per output row, one offset per tap
and a step along the last axis, so every dimensionality, stride, dilation and transposed phase is the same loop.
The weight's matrix products stay with torch (its BLAS is faster than any loop here).

The library is compiled on first use with the system C compiler (``$CC`` or ``cc``), about a second, into
``$PAC_CACHE_DIR`` (default ``~/.cache/pacnet``), and loaded with :mod:`ctypes`, which releases the GIL during
each call so that the engine's band workers run in parallel. Without a compiler, or with ``PAC_CPU_KERNELS=0``,
:func:`library` returns None and :mod:`pac` runs the same steps as torch operations (the results agree to float
rounding; the tests check both).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["library", "supports", "window", "distance", "modulate", "pool", "modulate_backward", "distance_backward"]

DTYPES = {torch.float32: ("float", "f32"), torch.float64: ("double", "f64")}

_COMMON = r"""
#include <stdint.h>
#include <string.h>
typedef int64_t i64;
/* A band's window: element (t, r, j) reads plane[row[r] + tap[t] + j * step]; outputs are (rows, cols). */
typedef struct { i64 plane, taps, rows, cols, step; const i64 *row, *tap; } Window;
"""

_TEMPLATE = r"""
/* out[b, c, t, p] = x[b, c, read] * k[b, c or 0, t, p] */
void modulate_SUF(const REAL *restrict x, const REAL *restrict k, REAL *restrict out,
                  i64 batch, i64 channels, i64 kc, const Window *w) {
    const i64 N = w->cols, P = w->rows * N, T = w->taps, s = w->step;
    for (i64 b = 0; b < batch; b++) for (i64 c = 0; c < channels; c++) {
        const REAL *xc = x + (b * channels + c) * w->plane, *kb = k + (b * kc + (kc > 1 ? c : 0)) * T * P;
        REAL *oc = out + (b * channels + c) * T * P;
        for (i64 t = 0; t < T; t++) for (i64 r = 0; r < w->rows; r++) {
            const REAL *xs = xc + w->row[r] + w->tap[t], *ks = kb + t * P + r * N;
            REAL *os = oc + t * P + r * N;
            if (s == 1) for (i64 j = 0; j < N; j++) os[j] = xs[j] * ks[j];
            else for (i64 j = 0; j < N; j++) os[j] = xs[j * s] * ks[j];
        }
    }
}

/* out[b, c, p] = sum_t x[b, c, read] * k[b, c or 0, t, p] */
void pool_SUF(const REAL *restrict x, const REAL *restrict k, REAL *restrict out,
              i64 batch, i64 channels, i64 kc, const Window *w) {
    const i64 N = w->cols, P = w->rows * N, T = w->taps, s = w->step;
    for (i64 b = 0; b < batch; b++) for (i64 c = 0; c < channels; c++) {
        const REAL *xc = x + (b * channels + c) * w->plane, *kb = k + (b * kc + (kc > 1 ? c : 0)) * T * P;
        REAL *oc = out + (b * channels + c) * P;
        memset(oc, 0, P * sizeof(REAL));
        for (i64 t = 0; t < T; t++) for (i64 r = 0; r < w->rows; r++) {
            const REAL *xs = xc + w->row[r] + w->tap[t], *ks = kb + t * P + r * N;
            REAL *os = oc + r * N;
            if (s == 1) for (i64 j = 0; j < N; j++) os[j] += xs[j] * ks[j];
            else for (i64 j = 0; j < N; j++) os[j] += xs[j * s] * ks[j];
        }
    }
}

/* gx[b, c, read] += g[b, c, t, p] * k[b, c or 0, t, p];  gk[b, c or 0, t, p] += g[b, c, t, p] * x[b, c, read].
   g's tap stride is P, or 0 when one gradient per channel and output is shared by all taps (pooling). */
void modulate_backward_SUF(const REAL *restrict g, i64 g_tap_stride, const REAL *restrict x,
                           const REAL *restrict k, REAL *restrict gx, REAL *restrict gk,
                           i64 batch, i64 channels, i64 kc, const Window *w) {
    const i64 N = w->cols, P = w->rows * N, T = w->taps, s = w->step;
    for (i64 b = 0; b < batch; b++) for (i64 c = 0; c < channels; c++) {
        const i64 kofs = (b * kc + (kc > 1 ? c : 0)) * T * P;
        const REAL *xc = x + (b * channels + c) * w->plane;
        const REAL *gc = g + (b * channels + c) * (g_tap_stride ? T * P : P);
        for (i64 t = 0; t < T; t++) for (i64 r = 0; r < w->rows; r++) {
            const i64 at = w->row[r] + w->tap[t];
            const REAL *xs = xc + at, *gs = gc + t * g_tap_stride + r * N, *ks = k + kofs + t * P + r * N;
            if (gx) {
                REAL *gxs = gx + (b * channels + c) * w->plane + at;
                if (s == 1) for (i64 j = 0; j < N; j++) gxs[j] += gs[j] * ks[j];
                else for (i64 j = 0; j < N; j++) gxs[j * s] += gs[j] * ks[j];
            }
            if (gk) {
                REAL *gks = gk + kofs + t * P + r * N;
                if (s == 1) for (i64 j = 0; j < N; j++) gks[j] += gs[j] * xs[j];
                else for (i64 j = 0; j < N; j++) gks[j] += gs[j] * xs[j * s];
            }
        }
    }
}

static inline REAL diff_SUF(REAL a, REAL b, int asym) {
    REAL d = a - b;
    return asym && d < 0 ? 0 : d;
}

/* out[b, c or 0, t, p] (+)= phi(guide[b, c, read] - centre[b, c, p])^2; phi is ReLU when asym. */
void distance_SUF(const REAL *restrict guide, const REAL *restrict centre, REAL *restrict out,
                  i64 batch, i64 channels, int channel_wise, int asym, const Window *w) {
    const i64 N = w->cols, P = w->rows * N, T = w->taps, s = w->step, kc = channel_wise ? channels : 1;
    memset(out, 0, batch * kc * T * P * sizeof(REAL));
    for (i64 b = 0; b < batch; b++) for (i64 c = 0; c < channels; c++) {
        const REAL *gc = guide + (b * channels + c) * w->plane, *cc = centre + (b * channels + c) * P;
        REAL *oc = out + (b * kc + (channel_wise ? c : 0)) * T * P;
        for (i64 t = 0; t < T; t++) for (i64 r = 0; r < w->rows; r++) {
            const REAL *gs = gc + w->row[r] + w->tap[t], *cs = cc + r * N;
            REAL *os = oc + t * P + r * N;
            if (s == 1) for (i64 j = 0; j < N; j++) { const REAL d = diff_SUF(gs[j], cs[j], asym); os[j] += d * d; }
            else for (i64 j = 0; j < N; j++) { const REAL d = diff_SUF(gs[j * s], cs[j], asym); os[j] += d * d; }
        }
    }
}

/* With v = 2 phi(guide[read] - centre[p]) * gd[t, p]: gguide[read] += v, gcentre[p] -= v. */
void distance_backward_SUF(const REAL *restrict gd, const REAL *restrict guide, const REAL *restrict centre,
                           REAL *restrict gguide, REAL *restrict gcentre,
                           i64 batch, i64 channels, int channel_wise, int asym, const Window *w) {
    const i64 N = w->cols, P = w->rows * N, T = w->taps, s = w->step, kc = channel_wise ? channels : 1;
    for (i64 b = 0; b < batch; b++) for (i64 c = 0; c < channels; c++) {
        const REAL *gc = guide + (b * channels + c) * w->plane, *cc = centre + (b * channels + c) * P;
        const REAL *gdc = gd + (b * kc + (channel_wise ? c : 0)) * T * P;
        REAL *ggc = gguide + (b * channels + c) * w->plane, *gcc = gcentre + (b * channels + c) * P;
        for (i64 t = 0; t < T; t++) for (i64 r = 0; r < w->rows; r++) {
            const i64 at = w->row[r] + w->tap[t];
            const REAL *gs = gc + at, *cs = cc + r * N, *gds = gdc + t * P + r * N;
            REAL *ggs = ggc + at, *gcs = gcc + r * N;
            if (s == 1) for (i64 j = 0; j < N; j++) {
                const REAL v = 2 * diff_SUF(gs[j], cs[j], asym) * gds[j];
                ggs[j] += v;
                gcs[j] -= v;
            } else for (i64 j = 0; j < N; j++) {
                const REAL v = 2 * diff_SUF(gs[j * s], cs[j], asym) * gds[j];
                ggs[j * s] += v;
                gcs[j] -= v;
            }
        }
    }
}
"""


class _Window(ctypes.Structure):
    _fields_ = [("plane", ctypes.c_int64), ("taps", ctypes.c_int64), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("step", ctypes.c_int64), ("row", ctypes.c_void_p),
                ("tap", ctypes.c_void_p)]


def _source() -> str:
    return _COMMON + "".join(_TEMPLATE.replace("REAL", real).replace("SUF", suffix) for real, suffix in DTYPES.values())


def _flags() -> list:
    """Vector instructions the running CPU has (the cached library is named after the flags)."""
    capability = torch.backends.cpu.get_cpu_capability()
    extra = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx512f", "-mavx2", "-mfma"]}.get(capability, [])
    return ["-O3", "-std=c99", "-fPIC", "-shared", *extra]


def _cache_dir() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pacnet")
    return os.environ.get("PAC_CACHE_DIR", default)


def _build() -> Optional[ctypes.CDLL]:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        warnings.warn(f"pac_cpu: no C compiler ({compiler!r}) found; the PAC layers run their CPU band loops as "
                      "torch operations (slower). Install gcc or set CC to use the compiled loops.", RuntimeWarning)
        return None
    source, flags = _source(), _flags()
    digest = hashlib.sha256("\0".join([source, compiler, *flags]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    path = os.path.join(folder, f"pac_cpu_{digest}.so")
    try:
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src, out = os.path.join(tmp, "pac_cpu.c"), os.path.join(tmp, "pac_cpu.so")
                with open(src, "w") as f:
                    f.write(source)
                result = subprocess.run([compiler, *flags, src, "-o", out], capture_output=True, text=True)
                if result.returncode != 0:
                    raise OSError(f"{compiler} said:\n{result.stderr[-2000:]}")
                os.replace(out, path)  # atomic: a concurrent build of the same source writes the same file
        lib = ctypes.CDLL(path)
    except OSError as e:  # no writable cache folder, a failing compiler, a library that does not load
        warnings.warn(f"pac_cpu: building the CPU loops in {folder} failed; the PAC layers run them as torch "
                      f"operations (slower). {e}", RuntimeWarning)
        return None
    for name in ("modulate", "pool", "modulate_backward", "distance", "distance_backward"):
        for _, suffix in DTYPES.values():
            getattr(lib, f"{name}_{suffix}").restype = None
    return lib


_lock = threading.Lock()
_library: list = []  # [the CDLL or None], once built


def library() -> Optional[ctypes.CDLL]:
    """The compiled loops, built on first use; None without a compiler or with ``PAC_CPU_KERNELS=0``."""
    if os.environ.get("PAC_CPU_KERNELS", "1") == "0":
        return None
    if not _library:
        with _lock:
            if not _library:
                _library.append(_build())
    return _library[0]


def supports(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the compiled loops can run on these tensors: on the CPU, all float32 or all float64."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    return (dtype in DTYPES and all(t.device.type == "cpu" and t.dtype == dtype for t in present)
            and library() is not None)


class Window:
    """A band's window over a contiguous ``(B, C, *spatial)`` tensor, from per-axis
    ``(first position, step, tap dilation)`` reads, tap counts and output counts (see :func:`window`)."""

    def __init__(self, spatial: Tuple[int, ...], reads: Tuple[Tuple[int, int, int], ...], taps: Tuple[int, ...],
                 counts: Tuple[int, ...]):
        strides = np.cumprod((1,) + spatial[:0:-1])[::-1]
        row, tap = np.zeros((), np.int64), np.zeros((), np.int64)
        for a, ((start, step, dil), m, n, stride) in enumerate(zip(reads, taps, counts, strides)):
            positions = start if a == len(spatial) - 1 else start + step * np.arange(n)
            row = np.add.outer(row, positions * stride).ravel()
            tap = np.add.outer(tap, np.arange(m) * dil * stride).ravel()
        self.row, self.tap = np.ascontiguousarray(row, np.int64), np.ascontiguousarray(tap, np.int64)
        self.taps, self.outputs = self.tap.size, self.row.size * counts[-1]
        self.struct = _Window(int(np.prod(spatial)), self.taps, self.row.size, counts[-1], reads[-1][1],
                              self.row.ctypes.data, self.tap.ctypes.data)


@functools.lru_cache(maxsize=4096)
def window(spatial: Tuple[int, ...], reads: Tuple[Tuple[int, int, int], ...], taps: Tuple[int, ...],
           counts: Tuple[int, ...]) -> Window:
    """The :class:`Window` of a band (the bands of a layer repeat at every call)."""
    return Window(spatial, reads, taps, counts)


def _ptr(t: Optional[torch.Tensor]):
    if t is None:
        return None
    if not t.is_contiguous():  # the loops index flat memory
        raise ValueError(f"pac_cpu: every tensor must be contiguous, got one of shape {tuple(t.shape)} and strides "
                         f"{t.stride()}")
    return ctypes.c_void_p(t.data_ptr())


def _call(name: str, dtype: torch.dtype, *args) -> None:
    getattr(library(), f"{name}_{DTYPES[dtype][1]}")(*args)


def _i(v: int):
    return ctypes.c_int64(v)


def modulate(x: torch.Tensor, kernel: torch.Tensor, w: Window) -> torch.Tensor:
    """``(B, C, T, P)``: the windows of the contiguous padded input ``x`` times ``kernel`` ``(B, 1 or C, T, P)``."""
    b, c = x.shape[:2]
    out = x.new_empty(b, c, w.taps, w.outputs)
    _call("modulate", x.dtype, _ptr(x), _ptr(kernel), _ptr(out), _i(b), _i(c), _i(kernel.shape[1]),
          ctypes.byref(w.struct))
    return out


def pool(x: torch.Tensor, kernel: torch.Tensor, w: Window) -> torch.Tensor:
    """``(B, C, P)``: the sum over taps of :func:`modulate`."""
    b, c = x.shape[:2]
    out = x.new_empty(b, c, w.outputs)
    _call("pool", x.dtype, _ptr(x), _ptr(kernel), _ptr(out), _i(b), _i(c), _i(kernel.shape[1]),
          ctypes.byref(w.struct))
    return out


def modulate_backward(grad: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, w: Window,
                      grad_x: Optional[torch.Tensor], need_kernel: bool) -> Optional[torch.Tensor]:
    """Adds the input gradient of :func:`modulate` (or :func:`pool` when ``grad`` is ``(B, C, P)``) into the
    contiguous padded ``grad_x`` (when given) and returns the kernel gradient (when ``need_kernel``)."""
    b, c = x.shape[:2]
    grad_kernel = torch.zeros_like(kernel) if need_kernel else None
    tap_stride = w.outputs if grad.dim() == 4 else 0
    _call("modulate_backward", x.dtype, _ptr(grad), _i(tap_stride), _ptr(x), _ptr(kernel), _ptr(grad_x),
          _ptr(grad_kernel), _i(b), _i(c), _i(kernel.shape[1]), ctypes.byref(w.struct))
    return grad_kernel


def distance(guide: torch.Tensor, centre: torch.Tensor, w: Window, channel_wise: bool, asym: bool) -> torch.Tensor:
    """``(B, 1 or C, T, P)`` squared guide differences of the contiguous padded ``guide`` to ``centre``
    ``(B, C, P)``."""
    b, c = guide.shape[:2]
    out = guide.new_empty(b, c if channel_wise else 1, w.taps, w.outputs)
    _call("distance", guide.dtype, _ptr(guide), _ptr(centre), _ptr(out), _i(b), _i(c), ctypes.c_int(channel_wise),
          ctypes.c_int(asym), ctypes.byref(w.struct))
    return out


def distance_backward(grad: torch.Tensor, guide: torch.Tensor, centre: torch.Tensor, w: Window, channel_wise: bool,
                      asym: bool, grad_guide: torch.Tensor, grad_centre: torch.Tensor) -> None:
    """Adds the gradients of :func:`distance` (``grad`` ``(B, 1 or C, T, P)``) into the contiguous ``grad_guide``
    (padded like ``guide``) and ``grad_centre`` ``(B, C, P)``."""
    b, c = guide.shape[:2]
    _call("distance_backward", guide.dtype, _ptr(grad), _ptr(guide), _ptr(centre), _ptr(grad_guide),
          _ptr(grad_centre), _i(b), _i(c), ctypes.c_int(channel_wise), ctypes.c_int(asym), ctypes.byref(w.struct))
