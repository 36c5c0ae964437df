"""Compiled CPU loops for the band primitives of :mod:`pac`'s 'taps' engine.

On a CPU the 'taps' engine spends most of its time in memory-bound passes over the taps of a band: the guide
differences, the modulated input windows and their gradients, each a chain of torch operations that reads and
writes a ``(B, C, taps, outputs)`` temporary several times. Each function here does one such chain in a single
pass of a plain C loop:

* :func:`distance` -- ``D[t, p] = sum_c phi(G[c, read_t(p)] - centre[c, p])^2`` (per channel with ``channel_wise``),
* :func:`modulate` -- ``M[c, t, p] = X[c, read_t(p)] * K[t, p]``, the input of the weight's matrix product,
* :func:`pool` -- ``sum_t X[c, read_t(p)] * K[t, p]``,
* :func:`modulate_backward` -- ``gX[c, read_t(p)] += gM[c, t, p] * K[t, p]`` and ``gK[t, p] = sum_c gM * X``,
* :func:`distance_backward` -- the guide and centre gradients of :func:`distance`,
* :func:`conv`, :func:`conv_backward_input`, :func:`conv_backward_weight` -- a convolution's weight times the
  :func:`modulate` windows and its gradients, without making the windows: register-blocked loops over panels of a
  few vectors of columns that stay in the L1 cache.

``read_t(p)`` is any window of a band (see ``pac._reads``): one row offset per output row, one offset per tap
and a step along the last axis, so every dimensionality, stride, dilation and transposed phase is the same loop.
Inputs are contiguous; a pool's output and output gradient may be views of a band's rows of whole tensors (any
batch and channel strides), so that a band of whole rows needs no temporary for them.
The fused convolution loops replace the ``(B, C, taps, outputs)`` temporary and the BLAS products that read it:
that temporary, written and read back from memory, cost more than the products themselves.

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

__all__ = ["library", "supports", "window", "distance", "modulate", "pool", "modulate_backward", "distance_backward",
           "conv", "conv_backward_input", "conv_backward_weight"]

DTYPES = {torch.float32: ("float", "f32"), torch.float64: ("double", "f64")}

_COMMON = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
typedef int64_t i64;
/* A band's window: element (t, r, j) reads plane[row[r] + tap[t] + j * step]; outputs are (rows, cols). */
typedef struct { i64 plane, taps, rows, cols, step; const i64 *row, *tap; } Window;
/* Register blocks of the convolution loops: output channels (the packed weight is padded to a multiple) and input
   channels per block; each block accumulates two vectors of outputs (conv, conv_backward_input) or one vector of
   the reduction (conv_backward_weight). */
#define CONV_MO 4
#define CONV_MC 4
#define GRAD_MO 4
#define GRAD_PIECE 128
#define CONV_PIECE 128
static inline i64 min_i64(i64 a, i64 b) { return a < b ? a : b; }
/* The statements with the step S of a strided read: a constant 2 (a transposed layer's phases, stride 2; the
   compiler then vectorises the loop) or s. */
#define BY_STEP(s, ...) do { if ((s) == 2) { const i64 S = 2; __VA_ARGS__ } else { const i64 S = (s); __VA_ARGS__ } } while (0)
"""

_TEMPLATE = r"""
/* 32-byte vectors (AVX; two SSE registers without it) and their unaligned loads and stores */
typedef REAL vec_SUF __attribute__((vector_size(32)));
typedef REAL uvec_SUF __attribute__((vector_size(32), aligned(sizeof(REAL)), may_alias));
#define V_SUF ((i64)(32 / sizeof(REAL)))

static inline vec_SUF load_SUF(const REAL *p, i64 s) {
    if (s == 1) return *(const uvec_SUF *)p;
    vec_SUF v;
    for (i64 l = 0; l < V_SUF; l++) v[l] = p[l * s];
    return v;
}

static inline void store_SUF(REAL *p, vec_SUF v) { *(uvec_SUF *)p = v; }

static inline REAL sum_SUF(vec_SUF v) {
    REAL total = 0;
    for (i64 l = 0; l < V_SUF; l++) total += v[l];
    return total;
}

/* The convolution of the modulated windows m[b, c, t, p] = x[b, c, read_t(p)] k[b, c or 0, t, p] with a weight
   w[g, o, c, t] (groups, Og, Cg, T), without storing m (the three functions below). Each works through a row in
   pieces of a few vectors of columns whose operands stay in the L1 cache: the piece's m (or its gradient) as a
   panel, (c, t)-major, and the weight packed in register blocks. The output and its gradient are (B, groups Og,
   P); x, k, gx and gk are as in modulate and modulate_backward. Columns past the last whole piece of a row are done
   one at a time. */

/* The weight in blocks of `block` rows of its (O, K) matrix per group (rows = output channels, K = Cg T), or of
   its transpose (rows = the Cg T taps of all channels), zero padded: packed[g, row block, K or Og, block]. */
static REAL *pack_SUF(const REAL *w, i64 groups, i64 Og, i64 K, i64 block, int transpose) {
    const i64 rows = transpose ? K : Og, cols = transpose ? Og : K, blocks = (rows + block - 1) / block;
    REAL *packed = malloc(groups * blocks * cols * block * sizeof(REAL));
    if (!packed) return NULL;
    for (i64 g = 0; g < groups; g++) for (i64 rb = 0; rb < blocks; rb++) for (i64 q = 0; q < cols; q++)
        for (i64 i = 0; i < block; i++) {
            const i64 row = rb * block + i;
            packed[((g * blocks + rb) * cols + q) * block + i] =
                row >= rows ? 0 : w[(g * Og + (transpose ? q : row)) * K + (transpose ? row : q)];
        }
    return packed;
}

/* out[b, o, p] = sum_{c, t} w[g, o, c, t] m[b, c, t, p]; returns -1 when out of memory */
int conv_SUF(const REAL *restrict x, const REAL *restrict k, const REAL *restrict w, REAL *restrict out,
             i64 batch, i64 groups, i64 Cg, i64 Og, i64 kc, const Window *win) {
    const i64 N = win->cols, P = win->rows * N, T = win->taps, s = win->step, V = V_SUF, K = Cg * T;
    const i64 kcs = kc > 1 ? T * P : 0, blocks = (Og + CONV_MO - 1) / CONV_MO;
    REAL *packed = pack_SUF(w, groups, Og, K, CONV_MO, 0), *panel = malloc(CONV_PIECE * 2 * V * sizeof(REAL));
    REAL *tile = malloc(blocks * CONV_MO * 2 * V * sizeof(REAL));  /* the outputs of a piece of columns */
    if (!packed || !panel || !tile) { free(packed); free(panel); free(tile); return -1; }
    for (i64 b = 0; b < batch; b++) for (i64 g = 0; g < groups; g++) {
        const REAL *xg = x + (b * groups + g) * Cg * win->plane, *kg = k + (b * kc + (kc > 1 ? g * Cg : 0)) * T * P;
        for (i64 r = 0; r < win->rows; r++) {
            REAL *orow = out + (b * groups + g) * Og * P + r * N;
            i64 j = 0;
            for (; j + 2 * V <= N; j += 2 * V) {
                memset(tile, 0, blocks * CONV_MO * 2 * V * sizeof(REAL));
                for (i64 q0 = 0; q0 < K; q0 += CONV_PIECE) {  /* the panel of m, CONV_PIECE taps at a time */
                    const i64 q1 = min_i64(K, q0 + CONV_PIECE);
                    for (i64 q = q0; q < q1; q++) {
                        const i64 c = q / T, t = q % T;
                        const REAL *xp = xg + c * win->plane + win->row[r] + win->tap[t] + j * s;
                        const REAL *kp = kg + c * kcs + t * P + r * N + j;
                        REAL *pp = panel + (q - q0) * 2 * V;
                        store_SUF(pp, load_SUF(xp, s) * load_SUF(kp, 1));
                        store_SUF(pp + V, load_SUF(xp + V * s, s) * load_SUF(kp + V, 1));
                    }
                    for (i64 ob = 0; ob < blocks; ob++) {
                        const REAL *wb = packed + ((g * blocks + ob) * K + q0) * CONV_MO, *pp = panel;
                        REAL *tb = tile + ob * CONV_MO * 2 * V;
                        vec_SUF acc[CONV_MO][2];
                        for (int o = 0; o < CONV_MO; o++) {
                            acc[o][0] = load_SUF(tb + o * 2 * V, 1);
                            acc[o][1] = load_SUF(tb + o * 2 * V + V, 1);
                        }
                        for (i64 q = q0; q < q1; q++, wb += CONV_MO, pp += 2 * V) {
                            const vec_SUF m0 = load_SUF(pp, 1), m1 = load_SUF(pp + V, 1);
                            for (int o = 0; o < CONV_MO; o++) {
                                acc[o][0] += wb[o] * m0;
                                acc[o][1] += wb[o] * m1;
                            }
                        }
                        for (int o = 0; o < CONV_MO; o++) {
                            store_SUF(tb + o * 2 * V, acc[o][0]);
                            store_SUF(tb + o * 2 * V + V, acc[o][1]);
                        }
                    }
                }
                for (i64 o = 0; o < Og; o++) memcpy(orow + o * P + j, tile + o * 2 * V, 2 * V * sizeof(REAL));
            }
            for (; j < N; j++) for (i64 o = 0; o < Og; o++) {
                REAL acc = 0;
                for (i64 c = 0; c < Cg; c++) for (i64 t = 0; t < T; t++)
                    acc += w[(g * Og + o) * K + c * T + t] * xg[c * win->plane + win->row[r] + win->tap[t] + j * s]
                           * kg[c * kcs + t * P + r * N + j];
                orow[o * P + j] = acc;
            }
        }
    }
    free(packed);
    free(panel);
    free(tile);
    return 0;
}

/* With gm[b, c, t, p] = sum_o w[g, o, c, t] gout[b, o, p], the gradient of m: gx[b, c, read_t(p)] += gm k[b, c or
   0, t, p] (when gx) and gk[b, c or 0, t, p] += gm x[b, c, read_t(p)] (when gk); returns -1 when out of memory */
int conv_backward_input_SUF(const REAL *restrict gout, const REAL *restrict x, const REAL *restrict k,
                            const REAL *restrict w, REAL *restrict gx, REAL *restrict gk,
                            i64 batch, i64 groups, i64 Cg, i64 Og, i64 kc, const Window *win) {
    const i64 N = win->cols, P = win->rows * N, T = win->taps, s = win->step, V = V_SUF, K = Cg * T;
    const i64 kcs = kc > 1 ? T * P : 0, blocks = (K + CONV_MC - 1) / CONV_MC;
    REAL *packed = pack_SUF(w, groups, Og, K, CONV_MC, 1), *panel = malloc(blocks * CONV_MC * 2 * V * sizeof(REAL));
    REAL *gpanel = malloc(Og * 2 * V * sizeof(REAL));  /* the output gradient of a piece of columns */
    if (!packed || !panel || !gpanel) { free(packed); free(panel); free(gpanel); return -1; }
    for (i64 b = 0; b < batch; b++) for (i64 g = 0; g < groups; g++) {
        const REAL *gog = gout + (b * groups + g) * Og * P;
        const i64 xofs = (b * groups + g) * Cg * win->plane, kofs = (b * kc + (kc > 1 ? g * Cg : 0)) * T * P;
        for (i64 r = 0; r < win->rows; r++) {
            i64 j = 0;
            for (; j + 2 * V <= N; j += 2 * V) {
                for (i64 o = 0; o < Og; o++)  /* (a copy: rows P apart can share cache sets, when P is 1024 say) */
                    memcpy(gpanel + o * 2 * V, gog + o * P + r * N + j, 2 * V * sizeof(REAL));
                for (i64 qb = 0; qb < blocks; qb++) {  /* the panel of gm */
                    const REAL *wb = packed + (g * blocks + qb) * Og * CONV_MC, *gp = gpanel;
                    vec_SUF acc[CONV_MC][2] = {{{0}}};
                    for (i64 o = 0; o < Og; o++, wb += CONV_MC, gp += 2 * V) {
                        const vec_SUF g0 = load_SUF(gp, 1), g1 = load_SUF(gp + V, 1);
                        for (int i = 0; i < CONV_MC; i++) {
                            acc[i][0] += wb[i] * g0;
                            acc[i][1] += wb[i] * g1;
                        }
                    }
                    for (int i = 0; i < CONV_MC; i++) {
                        store_SUF(panel + (qb * CONV_MC + i) * 2 * V, acc[i][0]);
                        store_SUF(panel + (qb * CONV_MC + i) * 2 * V + V, acc[i][1]);
                    }
                }
                for (i64 t = 0; t < T; t++) {
                    const i64 kt = kofs + t * P + r * N + j;
                    vec_SUF gk0 = {0}, gk1 = {0};  /* summed over the channels when kc == 1 */
                    for (i64 c = 0; c < Cg; c++) {
                        const REAL *pp = panel + (c * T + t) * 2 * V;
                        const vec_SUF m0 = load_SUF(pp, 1), m1 = load_SUF(pp + V, 1);
                        const i64 xc = xofs + c * win->plane + win->row[r] + win->tap[t] + j * s, kp = kt + c * kcs;
                        if (gx) {
                            const vec_SUF v0 = m0 * load_SUF(k + kp, 1), v1 = m1 * load_SUF(k + kp + V, 1);
                            if (s == 1) {
                                store_SUF(gx + xc, load_SUF(gx + xc, 1) + v0);
                                store_SUF(gx + xc + V, load_SUF(gx + xc + V, 1) + v1);
                            } else for (i64 l = 0; l < V; l++) {
                                gx[xc + l * s] += v0[l];
                                gx[xc + (V + l) * s] += v1[l];
                            }
                        }
                        if (gk) {
                            const vec_SUF p0 = m0 * load_SUF(x + xc, s), p1 = m1 * load_SUF(x + xc + V * s, s);
                            if (kc > 1) {
                                store_SUF(gk + kp, load_SUF(gk + kp, 1) + p0);
                                store_SUF(gk + kp + V, load_SUF(gk + kp + V, 1) + p1);
                            } else {
                                gk0 += p0;
                                gk1 += p1;
                            }
                        }
                    }
                    if (gk && kc == 1) {
                        store_SUF(gk + kt, load_SUF(gk + kt, 1) + gk0);
                        store_SUF(gk + kt + V, load_SUF(gk + kt + V, 1) + gk1);
                    }
                }
            }
            for (; j < N; j++) for (i64 c = 0; c < Cg; c++) for (i64 t = 0; t < T; t++) {
                REAL m = 0;
                for (i64 o = 0; o < Og; o++) m += w[(g * Og + o) * K + c * T + t] * gog[o * P + r * N + j];
                const i64 xc = xofs + c * win->plane + win->row[r] + win->tap[t] + j * s;
                const i64 kp = kofs + c * kcs + t * P + r * N + j;
                if (gx) gx[xc] += m * k[kp];
                if (gk) gk[kp] += m * x[xc];
            }
        }
    }
    free(packed);
    free(panel);
    free(gpanel);
    return 0;
}

/* gw[g, o, c, t] += sum_{b, p} gout[b, o, p] m[b, c, t, p] for a kernel shared by the channels (kc == 1); returns
   -1 when out of memory. Vectors run along the input channels of a channels-last copy of the band's input, so that
   the sums over the outputs stay in registers. */
int conv_backward_weight_SUF(const REAL *restrict gout, const REAL *restrict x, const REAL *restrict k,
                             REAL *restrict gw, i64 batch, i64 groups, i64 Cg, i64 Og, const Window *win) {
    const i64 N = win->cols, P = win->rows * N, T = win->taps, s = win->step, V = V_SUF, K = Cg * T;
    const i64 Cp = (Cg + 2 * V - 1) / (2 * V) * (2 * V), Op = (Og + GRAD_MO - 1) / GRAD_MO * GRAD_MO;
    const i64 lo = win->row[0] + win->tap[0], span = win->row[win->rows - 1] + win->tap[T - 1] + (N - 1) * s + 1 - lo;
    REAL *xt = malloc(span * Cp * sizeof(REAL)), *tile = malloc(T * Op * Cp * sizeof(REAL));
    if (!xt || !tile) { free(xt); free(tile); return -1; }
    for (i64 g = 0; g < groups; g++) {
        memset(tile, 0, T * Op * Cp * sizeof(REAL));  /* tile[t, o, c] */
        for (i64 b = 0; b < batch; b++) {
            const REAL *gog = gout + (b * groups + g) * Og * P, *kb = k + b * T * P;
            const REAL *xg = x + (b * groups + g) * Cg * win->plane + lo;
            for (i64 c = 0; c < Cp; c++) for (i64 i = 0; i < span; i++)
                xt[i * Cp + c] = c < Cg ? xg[c * win->plane + i] : 0;
            for (i64 r = 0; r < win->rows; r++) for (i64 j0 = 0; j0 < N; j0 += GRAD_PIECE) {
                const i64 j1 = min_i64(N, j0 + GRAD_PIECE);
                for (i64 t = 0; t < T; t++) {
                    const REAL *xr = xt + (win->row[r] + win->tap[t] - lo) * Cp, *kr = kb + t * P + r * N;
                    for (i64 o0 = 0; o0 < Og; o0 += GRAD_MO) for (i64 c0 = 0; c0 < Cg; c0 += 2 * V) {
                        const REAL *gp[GRAD_MO];  /* (a block past Og repeats the last row) */
                        for (int o = 0; o < GRAD_MO; o++) gp[o] = gog + min_i64(o0 + o, Og - 1) * P + r * N;
                        REAL *tb = tile + (t * Op + o0) * Cp + c0;
                        vec_SUF acc[GRAD_MO][2];
                        for (int o = 0; o < GRAD_MO; o++) {
                            acc[o][0] = load_SUF(tb + o * Cp, 1);
                            acc[o][1] = load_SUF(tb + o * Cp + V, 1);
                        }
                        for (i64 j = j0; j < j1; j++) {
                            const REAL *xp = xr + j * s * Cp + c0;
                            const vec_SUF m0 = load_SUF(xp, 1) * kr[j], m1 = load_SUF(xp + V, 1) * kr[j];
                            for (int o = 0; o < GRAD_MO; o++) {
                                acc[o][0] += gp[o][j] * m0;
                                acc[o][1] += gp[o][j] * m1;
                            }
                        }
                        for (int o = 0; o < GRAD_MO; o++) {
                            store_SUF(tb + o * Cp, acc[o][0]);
                            store_SUF(tb + o * Cp + V, acc[o][1]);
                        }
                    }
                }
            }
        }
        for (i64 o = 0; o < Og; o++) for (i64 c = 0; c < Cg; c++) for (i64 t = 0; t < T; t++)
            gw[(g * Og + o) * K + c * T + t] += tile[(t * Op + o) * Cp + c];
    }
    free(xt);
    free(tile);
    return 0;
}

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
            else BY_STEP(s, for (i64 j = 0; j < N; j++) os[j] = xs[j * S] * ks[j];);
        }
    }
}

/* out[b, c, p] = sum_t x[b, c, read] * k[b, c or 0, t, p]; out's strides are out_b and out_c between batch entries
   and channels, its outputs are contiguous. */
void pool_SUF(const REAL *restrict x, const REAL *restrict k, REAL *restrict out, i64 out_b, i64 out_c,
              i64 batch, i64 channels, i64 kc, const Window *w) {
    const i64 N = w->cols, P = w->rows * N, T = w->taps, s = w->step;
    for (i64 b = 0; b < batch; b++) for (i64 c = 0; c < channels; c++) {
        const REAL *xc = x + (b * channels + c) * w->plane, *kb = k + (b * kc + (kc > 1 ? c : 0)) * T * P;
        REAL *oc = out + b * out_b + c * out_c;
        memset(oc, 0, P * sizeof(REAL));
        for (i64 t = 0; t < T; t++) for (i64 r = 0; r < w->rows; r++) {
            const REAL *xs = xc + w->row[r] + w->tap[t], *ks = kb + t * P + r * N;
            REAL *os = oc + r * N;
            if (s == 1) for (i64 j = 0; j < N; j++) os[j] += xs[j] * ks[j];
            else BY_STEP(s, for (i64 j = 0; j < N; j++) os[j] += xs[j * S] * ks[j];);
        }
    }
}

/* gx[b, c, read] += g[b, c, t, p] * k[b, c or 0, t, p];  gk[b, c or 0, t, p] += g[b, c, t, p] * x[b, c, read].
   g's strides are g_b, g_c and g_tap_stride between batch entries, channels and taps (0 when one gradient per channel
   and output is shared by all taps: pooling); its outputs are contiguous. */
void modulate_backward_SUF(const REAL *restrict g, i64 g_b, i64 g_c, i64 g_tap_stride, const REAL *restrict x,
                           const REAL *restrict k, REAL *restrict gx, REAL *restrict gk,
                           i64 batch, i64 channels, i64 kc, const Window *w) {
    const i64 N = w->cols, P = w->rows * N, T = w->taps, s = w->step;
    for (i64 b = 0; b < batch; b++) for (i64 c = 0; c < channels; c++) {
        const i64 kofs = (b * kc + (kc > 1 ? c : 0)) * T * P;
        const REAL *xc = x + (b * channels + c) * w->plane;
        const REAL *gc = g + b * g_b + c * g_c;
        for (i64 t = 0; t < T; t++) for (i64 r = 0; r < w->rows; r++) {
            const i64 at = w->row[r] + w->tap[t];
            const REAL *xs = xc + at, *gs = gc + t * g_tap_stride + r * N, *ks = k + kofs + t * P + r * N;
            if (gx) {
                REAL *gxs = gx + (b * channels + c) * w->plane + at;
                if (s == 1) for (i64 j = 0; j < N; j++) gxs[j] += gs[j] * ks[j];
                else BY_STEP(s, for (i64 j = 0; j < N; j++) gxs[j * S] += gs[j] * ks[j];);
            }
            if (gk) {
                REAL *gks = gk + kofs + t * P + r * N;
                if (s == 1) for (i64 j = 0; j < N; j++) gks[j] += gs[j] * xs[j];
                else BY_STEP(s, for (i64 j = 0; j < N; j++) gks[j] += gs[j] * xs[j * S];);
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
            else BY_STEP(s, for (i64 j = 0; j < N; j++) { const REAL d = diff_SUF(gs[j * S], cs[j], asym); os[j] += d * d; });
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
            } else BY_STEP(s, for (i64 j = 0; j < N; j++) {
                const REAL v = 2 * diff_SUF(gs[j * S], cs[j], asym) * gds[j];
                ggs[j * S] += v;
                gcs[j] -= v;
            });
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
    return ["-O3", "-std=c99", "-ffp-contract=fast", "-fPIC", "-shared", *extra]


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
    for name in ("conv", "conv_backward_input", "conv_backward_weight"):
        for _, suffix in DTYPES.values():
            getattr(lib, f"{name}_{suffix}").restype = ctypes.c_int
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


def _rows_ptr(t: torch.Tensor, name: str):
    """Pointer to ``t``, whose leading axes may have any strides but whose last axis must be contiguous."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"pac_cpu: {name} must be contiguous along its last axis, got strides {t.stride()}")
    return ctypes.c_void_p(t.data_ptr())


def _call(name: str, dtype: torch.dtype, *args):
    return getattr(library(), f"{name}_{DTYPES[dtype][1]}")(*args)


def _i(v: int):
    return ctypes.c_int64(v)


def modulate(x: torch.Tensor, kernel: torch.Tensor, w: Window) -> torch.Tensor:
    """``(B, C, T, P)``: the windows of the contiguous padded input ``x`` times ``kernel`` ``(B, 1 or C, T, P)``."""
    b, c = x.shape[:2]
    out = x.new_empty(b, c, w.taps, w.outputs)
    _call("modulate", x.dtype, _ptr(x), _ptr(kernel), _ptr(out), _i(b), _i(c), _i(kernel.shape[1]),
          ctypes.byref(w.struct))
    return out


def pool(x: torch.Tensor, kernel: torch.Tensor, w: Window, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, C, P)``: the sum over taps of :func:`modulate`, written into ``out`` when given (contiguous along its last
    axis: a band's rows of a whole output need no copy)."""
    b, c = x.shape[:2]
    out = x.new_empty(b, c, w.outputs) if out is None else out
    _call("pool", x.dtype, _ptr(x), _ptr(kernel), _rows_ptr(out, "out"), *map(_i, out.stride()[:2]), _i(b), _i(c),
          _i(kernel.shape[1]), ctypes.byref(w.struct))
    return out


def modulate_backward(grad: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, w: Window,
                      grad_x: Optional[torch.Tensor], need_kernel: bool) -> Optional[torch.Tensor]:
    """Adds the input gradient of :func:`modulate` (or :func:`pool` when ``grad`` is ``(B, C, P)``) into the
    contiguous padded ``grad_x`` (when given) and returns the kernel gradient (when ``need_kernel``). ``grad`` need
    only be contiguous along its last axis (a band's rows of a whole output gradient need no copy)."""
    b, c = x.shape[:2]
    grad_kernel = torch.zeros_like(kernel) if need_kernel else None
    strides = grad.stride()[:3] if grad.dim() == 4 else (*grad.stride()[:2], 0)
    _call("modulate_backward", x.dtype, _rows_ptr(grad, "grad"), *map(_i, strides), _ptr(x), _ptr(kernel),
          _ptr(grad_x), _ptr(grad_kernel), _i(b), _i(c), _i(kernel.shape[1]), ctypes.byref(w.struct))
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


def _conv_call(name: str, x: torch.Tensor, kernel: torch.Tensor, groups: int, out_channels: int, w: Window,
               *tensors: Optional[torch.Tensor]) -> None:
    b, c = x.shape[:2]
    status = _call(name, x.dtype, *(_ptr(t) for t in tensors), _i(b), _i(groups), _i(c // groups),
                   _i(out_channels // groups), _i(kernel.shape[1]), ctypes.byref(w.struct))
    if status != 0:
        raise MemoryError(f"pac_cpu.{name}: out of memory for its working buffers")


def conv(x: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor, w: Window) -> torch.Tensor:
    """``(B, O, P)``: the contiguous weight ``(groups, O / groups, C / groups * T)`` times the windows of
    :func:`modulate` ``(B, C, T, P)`` (a batched matmul), without making them."""
    groups, og = weight.shape[:2]
    out = x.new_empty(x.shape[0], groups * og, w.outputs)
    _conv_call("conv", x, kernel, groups, groups * og, w, x, kernel, weight, out)
    return out


def conv_backward_input(grad: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor, w: Window,
                        grad_x: Optional[torch.Tensor], need_kernel: bool) -> Optional[torch.Tensor]:
    """Adds the input gradient of :func:`conv` (``grad`` ``(B, O, P)``) into the contiguous padded ``grad_x`` (when
    given) and returns the kernel gradient (when ``need_kernel``): :func:`modulate_backward` of the windows'
    gradient, without making it."""
    grad_kernel = torch.zeros_like(kernel) if need_kernel else None
    _conv_call("conv_backward_input", x, kernel, weight.shape[0], grad.shape[1], w, grad, x, kernel, weight, grad_x,
               grad_kernel)
    return grad_kernel


def conv_backward_weight(grad: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, groups: int,
                         w: Window) -> torch.Tensor:
    """``(groups, O / groups, C / groups * T)``: the weight gradient of :func:`conv`, summed over the batch, for a
    kernel ``(B, 1, T, P)`` shared by the channels."""
    if kernel.shape[1] != 1:
        raise ValueError(f"pac_cpu.conv_backward_weight: expected a kernel shared by the channels (B, 1, T, P), got "
                         f"{tuple(kernel.shape)}")
    b, c = x.shape[:2]
    o = grad.shape[1]
    grad_weight = x.new_zeros(groups, o // groups, c // groups * w.taps)
    status = _call("conv_backward_weight", x.dtype, _ptr(grad), _ptr(x), _ptr(kernel), _ptr(grad_weight), _i(b),
                   _i(groups), _i(c // groups), _i(o // groups), ctypes.byref(w.struct))
    if status != 0:
        raise MemoryError("pac_cpu.conv_backward_weight: out of memory for its working buffers")
    return grad_weight
