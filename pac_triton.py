"""Optional fused Triton kernels for PAC layers with a gaussian adaptive kernel: forward and backward.

Each function computes, without writing the adaptive kernel ``K`` or any unfolded tensor to memory, what
``pac.packernel2d(kernel_type='gaussian')`` followed by ``pac.pacconv2d``, ``pac.pacconv_transpose2d`` or
``pac.pacpool2d`` compute (zero padding)::

    e[t, p]  = exp(-0.5 * sum_c (G[c, tap_t(p)] - G[c, centre(p)])^2)     (guide outside the image reads 0)
    a[t, p]  = 1 if tap t of pixel p reads a real input pixel (times the mask there, if any), else 0
    K[t, p]  = e * a / S[p],  S = sum_t e * a  (normalize_kernel),
                              S = sum_t a / max(1, #real taps)  (mask without normalize_kernel),  S = 1 otherwise
    out[o, p] = bias[o] + sum_{c, t} W[o, c, t] * K[t, p] * X[c, tap_t(p)]       (pooling: no W, o = c)

and the gradients of ``out`` with respect to the input, the guide, the weight and the bias. A window
whose ``S`` is 0 keeps a zero kernel (and a zero output mask), as in :mod:`pac`. A normalised kernel is computed
relative to the pixel's nearest valid tap (as :mod:`pac` does where a window's centre can be invalid): the forward
keeps the smallest distance so far and rescales its sums when a nearer tap comes (an online shift), so ``e``
cannot underflow on every valid tap; it hands the backward ``log S`` (of the unshifted ``e``, +inf for an empty
window), which recomputes ``K`` directly as ``a * exp(-D / 2 - log S)``.

Public interface (called by pac.py's ``impl='triton'`` dispatch, or directly):

* :func:`supports` -- whether the fused kernels handle a call with these options and tensors.
* :func:`pac_conv2d`, :func:`pac_conv_transpose2d`, :func:`pac_pool2d` -- differentiable layers; with a
  ``mask`` they return ``(output, output_mask)`` like the :mod:`pac` modules.
* :func:`is_available` -- Triton is installed and there is a CUDA device or the interpreter.

The launches are wrapped in two ``torch.library.custom_op`` operators, ``pac_triton::pac_forward`` and
``pac_triton::pac_backward`` (with fake implementations and autograd registered), so ``torch.compile``
keeps them as single ops. Geometry: a transposed convolution reads the input directly (no zero insertion),
with the weight ``(C_in, C_out, kh, kw)`` applied without spatial flip and its guide at the output resolution
with stride-1 "same" windows. The forward and the kernel-gradient kernels run phase by phase (a block of
outputs of one phase skips the taps that hit no input pixel); the input- and weight-gradient kernels mask
those taps instead (their work on them is wasted: a stride-s layer does up to s^2 times the needed work there).

Verification status: developed and tested with the Triton interpreter only (``TRITON_INTERPRET=1``, CPU
tensors): every output and every gradient on every tap against the brute-force reference of
tests/pac_reference.py in float64; every kernel compiles ahead of time for sm_80. No GPU was available:
speed and memory on a GPU are unmeasured and the block sizes are untuned defaults.

Without Triton this module still imports; :func:`is_available` and :func:`supports` then return False.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple, Union

import torch

from pac import _check_4d, _conv_out_size, _transposed_out_size

try:
    import triton
    import triton.language as tl
    from triton import knobs as _triton_knobs
except ImportError:  # the extra is optional: keep `import pac_triton` working without it
    triton = None

__all__ = ["is_available", "supports", "pac_conv2d", "pac_conv_transpose2d", "pac_pool2d"]

IntPair = Union[int, Tuple[int, int]]
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYERS = ("conv", "conv_transpose", "pool")

# The interpreter is chosen when the kernels are decorated, i.e. at import time of this module.
_INTERPRETED = triton is not None and bool(_triton_knobs.runtime.interpret)

# Pixels per program, and caps on the channel blocks. tl.dot needs every block >= 16. The interpreter
# costs about the same per operation whatever the block size, so it runs larger pixel blocks.
_BLOCK_PIXELS = 256 if _INTERPRETED else 64
_MAX_BLOCK_OUT = 64
_MAX_BLOCK_IN = 32
_MAX_BLOCK_GUIDE = 16
_WEIGHT_GRAD_PROGRAMS = 1024  # target program count of the weight-gradient grid (split over pixels)


def is_available() -> bool:
    """True when the kernels can run here: Triton is installed and either a CUDA device is present or
    the Triton interpreter was enabled (``TRITON_INTERPRET=1`` before this module was imported)."""
    return triton is not None and (_INTERPRETED or torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# Geometry, per axis (runtime ints): output y, tap i reads
#   the input at   (y * A + i * dil - POFF) / DIV   (a real pixel only when divisible and inside),
#   the guide at    y * GA + i * dil - GP,  centre  y * GA + (K // 2) * dil - GP.
# Convolution and pooling: A = GA = stride, POFF = GP = padding, DIV = 1.
# Transposed convolution: A = GA = 1, POFF = (k - 1) * dil - padding, DIV = stride, GP = (k - 1) * dil // 2.

if triton is not None:

    @triton.jit
    def _forward_pos(y, i, a, poff, div, dil, size):
        """(position, inside) of tap i of outputs y, for the geometry above."""
        num = y * a + i * dil - poff
        pos = num // div
        return pos, (num >= 0) & (num % div == 0) & (pos < size)

    @triton.jit
    def _inverse_pos(q, i, a, poff, div, dil, out_size):
        """(output, exists) whose tap i reads position q: the inverse of _forward_pos."""
        num = q * div - i * dil + poff
        y = num // a
        return y, (num >= 0) & (num % a == 0) & (y < out_size)

    @triton.jit
    def _phase_pixels(program, phase_blocks, out_height, out_width, div_h, div_w, BLOCK_P: tl.constexpr):
        """(phase_y, phase_x, y, x, valid) of the BLOCK_P output pixels of a program. Pixels are grouped by
        phase (y mod div_h, x mod div_w): div is the stride of a transposed convolution, 1 otherwise."""
        phase = program // phase_blocks
        phase_y = phase // div_w
        phase_x = phase % div_w
        phase_width = (out_width + div_w - 1) // div_w
        phase_size = ((out_height + div_h - 1) // div_h) * phase_width
        local = (program % phase_blocks) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        y = phase_y + div_h * (local // phase_width)
        x = phase_x + div_w * (local % phase_width)
        return phase_y, phase_x, y, x, (local < phase_size) & (y < out_height) & (x < out_width)

    @triton.jit
    def _guide_read(batch, y, x, i, j, pixel_ok, ga_h, ga_w, gp_h, gp_w, dil_h, dil_w, guide_height, guide_width,
                    sg_b, sg_h, sg_w):
        """(offset, inside) of the guide feature that tap (i, j) of outputs (y, x) compares; the centre tap
        is (KH // 2, KW // 2). Outside the guide the feature is zero."""
        ty = y * ga_h + i * dil_h - gp_h
        tx = x * ga_w + j * dil_w - gp_w
        inside = pixel_ok & (ty >= 0) & (ty < guide_height) & (tx >= 0) & (tx < guide_width)
        return batch * sg_b + ty * sg_h + tx * sg_w, inside

    @triton.jit
    def _input_read(mask_ptr, batch, y, x, i, j, pixel_ok, a_h, a_w, poff_h, poff_w, div_h, div_w, dil_h, dil_w,
                    height, width, sm_b, sm_h, sm_w, HAS_MASK: tl.constexpr):
        """(iy, ix, inside, a) of the input pixel that tap (i, j) of outputs (y, x) reads: a is 1 on real pixels
        (times the mask), 0 elsewhere."""
        iy, iy_ok = _forward_pos(y, i, a_h, poff_h, div_h, dil_h, height)
        ix, ix_ok = _forward_pos(x, j, a_w, poff_w, div_w, dil_w, width)
        in_ok = pixel_ok & iy_ok & ix_ok
        a = in_ok.to(tl.float32)
        if HAS_MASK:
            a *= tl.load(mask_ptr + batch * sm_b + iy * sm_h + ix * sm_w, mask=in_ok, other=0.0).to(tl.float32)
        return iy, ix, in_ok, a

    @triton.jit
    def _distance(guide_ptr, tap_off, tap_ok, centre_off, centre_ok, guide_channels, sg_c,
                  BLOCK: tl.constexpr, BLOCK_G: tl.constexpr):
        """D = |G[tap] - G[centre]|^2 for a block of pixels; reads outside the image give 0."""
        dist = tl.zeros((BLOCK,), dtype=tl.float32)
        for g0 in range(0, guide_channels, BLOCK_G):
            gch = g0 + tl.arange(0, BLOCK_G)
            g_ok = gch < guide_channels
            tap = tl.load(guide_ptr + tap_off[:, None] + gch[None, :] * sg_c,
                          mask=tap_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
            centre = tl.load(guide_ptr + centre_off[:, None] + gch[None, :] * sg_c,
                             mask=centre_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
            diff = tap - centre
            dist += tl.sum(diff * diff, axis=1)
        return dist

    @triton.jit
    def _kernel_value(dist, a, norm, ok, NORMALIZE: tl.constexpr, USE_NORM: tl.constexpr):
        """K of one tap for a block of pixels in the backward, from the forward's per-pixel ``norm``: log S when
        normalising (no underflow: see the module docstring), else S; 0 where not ``ok``."""
        if NORMALIZE:
            return tl.where(ok & (a > 0), a * tl.exp(-0.5 * dist - norm), 0.0)
        k = tl.where(ok, a * tl.exp(-0.5 * dist), 0.0)
        if USE_NORM:
            k = k / tl.where(norm == 0.0, 1.0, norm)
        return k

    @triton.jit
    def _forward_kernel(
            x_ptr, guide_ptr, weight_ptr, bias_ptr, mask_ptr, out_ptr, norm_ptr,
            channels, guide_channels, out_channels, height, width, guide_height, guide_width, out_height, out_width,
            group_in, group_out, out_blocks, phase_blocks,
            sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w, sw_o, sw_c, sw_h, sw_w, sm_b, sm_h, sm_w,
            so_b, so_c, so_h, so_w,
            a_h, a_w, poff_h, poff_w, div_h, div_w, ga_h, ga_w, gp_h, gp_w, dil_h, dil_w,
            KH: tl.constexpr, KW: tl.constexpr, POOL: tl.constexpr, HAS_BIAS: tl.constexpr,
            HAS_MASK: tl.constexpr, NORMALIZE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
        """One program: BLOCK_P output pixels x BLOCK_O output channels (of one group) of one image.
        Writes the output and, per pixel (norm_ptr, float32), the kernel's sum S, or log S when normalising."""
        batch = tl.program_id(2).to(tl.int64)
        group = tl.program_id(1) // out_blocks
        outs_local = (tl.program_id(1) % out_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
        out_ok = outs_local < group_out
        outs = group * group_out + outs_local
        phase_y, phase_x, y, x, pixel_ok = _phase_pixels(tl.program_id(0), phase_blocks, out_height, out_width,
                                                         div_h, div_w, BLOCK_P)
        pixels = y * out_width + x
        centre_off, centre_ok = _guide_read(batch, y, x, KH // 2, KW // 2, pixel_ok, ga_h, ga_w, gp_h, gp_w, dil_h,
                                            dil_w, guide_height, guide_width, sg_b, sg_h, sg_w)

        acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
        total = tl.zeros((BLOCK_P,), dtype=tl.float32)
        real = tl.zeros((BLOCK_P,), dtype=tl.float32)
        nearest = tl.full((BLOCK_P,), float("inf"), tl.float32)  # normalising: acc and total are relative to it
        for t in range(KH * KW):  # a loop, not unrolled: compiles fast
            i = t // KW
            j = t % KW
            # Every pixel of the block has the same phase: a tap hits real input pixels for all of them or
            # for none (transposed convolution); taps that hit none are skipped, no work on inserted zeros.
            hit = (((phase_y * a_h + i * dil_h - poff_h) % div_h == 0)
                   & ((phase_x * a_w + j * dil_w - poff_w) % div_w == 0))
            if hit:
                tap_off, tap_ok = _guide_read(batch, y, x, i, j, pixel_ok, ga_h, ga_w, gp_h, gp_w, dil_h, dil_w,
                                              guide_height, guide_width, sg_b, sg_h, sg_w)
                dist = _distance(guide_ptr, tap_off, tap_ok, centre_off, centre_ok, guide_channels, sg_c, BLOCK_P,
                                 BLOCK_G)
                iy, ix, in_ok, a = _input_read(mask_ptr, batch, y, x, i, j, pixel_ok, a_h, a_w, poff_h, poff_w,
                                               div_h, div_w, dil_h, dil_w, height, width, sm_b, sm_h, sm_w, HAS_MASK)
                if NORMALIZE:  # a nearer valid tap: rescale what was summed relative to the previous one
                    closer = tl.where(a > 0, tl.minimum(nearest, dist), nearest)
                    rescale = tl.where(closer < nearest, tl.exp(-0.5 * (nearest - closer)), 1.0)
                    acc = acc * rescale[:, None]
                    nearest = closer
                    ke = tl.where(a > 0, a * tl.exp(-0.5 * (dist - nearest)), 0.0)
                    total = total * rescale + ke
                else:
                    ke = tl.exp(-0.5 * dist) * a
                    total += a
                    real += in_ok.to(tl.float32)
                x_off = batch * sx_b + iy * sx_h + ix * sx_w
                if POOL:
                    xv = tl.load(x_ptr + x_off[:, None] + outs[None, :] * sx_c,
                                 mask=in_ok[:, None] & out_ok[None, :], other=0.0).to(tl.float32)
                    acc += xv * ke[:, None]
                else:
                    for c0 in range(0, group_in, BLOCK_C):
                        ch_local = c0 + tl.arange(0, BLOCK_C)
                        c_ok = ch_local < group_in
                        ch = group * group_in + ch_local
                        xv = tl.load(x_ptr + x_off[:, None] + ch[None, :] * sx_c,
                                     mask=in_ok[:, None] & c_ok[None, :], other=0.0)
                        xk = (xv.to(tl.float32) * ke[:, None]).to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
                        w = tl.load(weight_ptr + outs[None, :] * sw_o + ch_local[:, None] * sw_c + i * sw_h + j * sw_w,
                                    mask=c_ok[:, None] & out_ok[None, :], other=0.0).to(DOT_DTYPE)
                        acc = tl.dot(xk, w, acc, input_precision=DOT_PRECISION)

        if HAS_MASK and not NORMALIZE:
            total = total / tl.maximum(real, 1.0)
        elif not NORMALIZE:
            total = tl.full((BLOCK_P,), 1.0, tl.float32)
        acc = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        norm = total
        if NORMALIZE:
            norm = tl.where(total > 0.0, tl.log(total) - 0.5 * nearest, float("inf"))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        out_offsets = batch * so_b + outs[None, :] * so_c + y[:, None] * so_h + x[:, None] * so_w
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=pixel_ok[:, None] & out_ok[None, :])
        if tl.program_id(1) == 0:  # S is the same for every output channel block: one program writes it
            tl.store(norm_ptr + batch * out_height * out_width + pixels, norm, mask=pixel_ok)

    @triton.jit
    def _kernel_grad_kernel(
            grad_ptr, x_ptr, guide_ptr, weight_ptr, mask_ptr, norm_ptr, dist_grad_ptr,
            channels, guide_channels, height, width, guide_height, guide_width, out_height, out_width,
            groups, group_in, group_out, phase_blocks,
            sd_b, sd_c, sd_h, sd_w, sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w, sw_o, sw_c, sw_h, sw_w,
            sm_b, sm_h, sm_w,
            a_h, a_w, poff_h, poff_w, div_h, div_w, ga_h, ga_w, gp_h, gp_w, dil_h, dil_w,
            KH: tl.constexpr, KW: tl.constexpr, POOL: tl.constexpr, HAS_MASK: tl.constexpr,
            NORMALIZE: tl.constexpr, USE_NORM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
            BLOCK_G: tl.constexpr):
        """One program: BLOCK_P output pixels of one image. Writes dL/dD[t, p] (D: the squared guide
        distance of tap t) for every tap, float32 (B, KH*KW, H', W')."""
        batch = tl.program_id(1).to(tl.int64)
        phase_y, phase_x, y, x, pixel_ok = _phase_pixels(tl.program_id(0), phase_blocks, out_height, out_width,
                                                         div_h, div_w, BLOCK_P)
        pixels = y * out_width + x
        centre_off, centre_ok = _guide_read(batch, y, x, KH // 2, KW // 2, pixel_ok, ga_h, ga_w, gp_h, gp_w, dil_h,
                                            dil_w, guide_height, guide_width, sg_b, sg_h, sg_w)
        taps = tl.arange(0, BLOCK_T)

        if USE_NORM:
            norm = tl.load(norm_ptr + batch * out_height * out_width + pixels, mask=pixel_ok, other=1.0)
        else:
            norm = tl.full((BLOCK_P,), 1.0, tl.float32)
        # Per tap: K (the kernel used) and dL/dK (before the normalisation's chain rule).
        k_all = tl.zeros((BLOCK_P, BLOCK_T), dtype=tl.float32)
        dk_all = tl.zeros((BLOCK_P, BLOCK_T), dtype=tl.float32)
        for t in range(KH * KW):  # a loop, not unrolled: compiles fast
            i = t // KW
            j = t % KW
            # Every pixel of the block has the same phase: a tap hits real input pixels for all of them or
            # for none (transposed convolution); taps that hit none are skipped, no work on inserted zeros.
            hit = (((phase_y * a_h + i * dil_h - poff_h) % div_h == 0)
                   & ((phase_x * a_w + j * dil_w - poff_w) % div_w == 0))
            if hit:
                tap_off, tap_ok = _guide_read(batch, y, x, i, j, pixel_ok, ga_h, ga_w, gp_h, gp_w, dil_h, dil_w,
                                              guide_height, guide_width, sg_b, sg_h, sg_w)
                dist = _distance(guide_ptr, tap_off, tap_ok, centre_off, centre_ok, guide_channels, sg_c, BLOCK_P,
                                 BLOCK_G)
                iy, ix, in_ok, a = _input_read(mask_ptr, batch, y, x, i, j, pixel_ok, a_h, a_w, poff_h, poff_w,
                                               div_h, div_w, dil_h, dil_w, height, width, sm_b, sm_h, sm_w, HAS_MASK)
                k = _kernel_value(dist, a, norm, pixel_ok, NORMALIZE, USE_NORM)
                x_off = batch * sx_b + iy * sx_h + ix * sx_w
                g_off = batch * sd_b + y * sd_h + x * sd_w
                dk = tl.zeros((BLOCK_P,), dtype=tl.float32)
                if POOL:
                    for c0 in range(0, channels, BLOCK_C):
                        ch = c0 + tl.arange(0, BLOCK_C)
                        c_ok = ch < channels
                        xv = tl.load(x_ptr + x_off[:, None] + ch[None, :] * sx_c,
                                     mask=in_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                        gv = tl.load(grad_ptr + g_off[:, None] + ch[None, :] * sd_c,
                                     mask=pixel_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                        dk += tl.sum(xv * gv, axis=1)
                else:
                    for group in range(0, groups):
                        for c0 in range(0, group_in, BLOCK_C):
                            ch_local = c0 + tl.arange(0, BLOCK_C)
                            c_ok = ch_local < group_in
                            ch = group * group_in + ch_local
                            gw = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)  # sum_o dL/dout[o] W[o, c, i, j]
                            for o0 in range(0, group_out, BLOCK_O):
                                outs_local = o0 + tl.arange(0, BLOCK_O)
                                o_ok = outs_local < group_out
                                outs = group * group_out + outs_local
                                gv = tl.load(grad_ptr + g_off[:, None] + outs[None, :] * sd_c,
                                             mask=pixel_ok[:, None] & o_ok[None, :], other=0.0).to(DOT_DTYPE)
                                w = tl.load(weight_ptr + outs[:, None] * sw_o + ch_local[None, :] * sw_c
                                            + i * sw_h + j * sw_w,
                                            mask=o_ok[:, None] & c_ok[None, :], other=0.0).to(DOT_DTYPE)
                                gw = tl.dot(gv, w, gw, input_precision=DOT_PRECISION)
                            xv = tl.load(x_ptr + x_off[:, None] + ch[None, :] * sx_c,
                                         mask=in_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                            dk += tl.sum(xv * gw, axis=1)
                here = taps[None, :] == t
                k_all = tl.where(here, k[:, None], k_all)
                dk_all = tl.where(here, dk[:, None], dk_all)

        # dL/dD_t = -K_t / 2 * dL/dK_t, less sum_u dL/dK_u K_u when normalising (K = e a / sum(e a))
        if NORMALIZE:
            dk_all = dk_all - tl.sum(dk_all * k_all, axis=1)[:, None]
        dd = -0.5 * k_all * dk_all
        plane = out_height * out_width
        tl.store(dist_grad_ptr + batch * (KH * KW) * plane + taps[None, :] * plane + pixels[:, None], dd,
                 mask=pixel_ok[:, None] & (taps[None, :] < KH * KW))

    @triton.jit
    def _guide_grad_kernel(
            guide_ptr, dist_grad_ptr, guide_grad_ptr,
            guide_channels, guide_height, guide_width, out_height, out_width,
            sg_b, sg_c, sg_h, sg_w, sr_b, sr_c, sr_h, sr_w,
            ga_h, ga_w, gp_h, gp_w, dil_h, dil_w,
            KH: tl.constexpr, KW: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr):
        """One program: BLOCK_Q guide pixels x BLOCK_G guide channels of one image. Gathers
        dL/dG[q] = sum over (t, p) reading q as tap t of 2 (G[q] - G[centre p]) dL/dD[t, p]
                 - sum over taps t of the pixel p centred on q of 2 (G[tap t of p] - G[q]) dL/dD[t, p]."""
        batch = tl.program_id(2).to(tl.int64)
        qs = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        gch = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        q_ok = qs < guide_height * guide_width
        g_ok = gch < guide_channels
        qy = qs // guide_width
        qx = qs % guide_width
        img = batch * sg_b
        both = q_ok[:, None] & g_ok[None, :]
        gq = tl.load(guide_ptr + img + qy[:, None] * sg_h + qx[:, None] * sg_w + gch[None, :] * sg_c,
                     mask=both, other=0.0).to(tl.float32)
        plane = out_height * out_width
        dd_img = dist_grad_ptr + batch * (KH * KW) * plane
        # The output pixel whose centre tap is q (at most one).
        my, my_ok = _inverse_pos(qy, KH // 2, ga_h, gp_h, 1, dil_h, out_height)
        mx, mx_ok = _inverse_pos(qx, KW // 2, ga_w, gp_w, 1, dil_w, out_width)
        m_ok = q_ok & my_ok & mx_ok
        acc = tl.zeros((BLOCK_Q, BLOCK_G), dtype=tl.float32)
        for t in range(KH * KW):  # a loop, not unrolled: compiles fast
            i = t // KW
            j = t % KW
            # q read as tap (i, j) of output p.
            py, py_ok = _inverse_pos(qy, i, ga_h, gp_h, 1, dil_h, out_height)
            px, px_ok = _inverse_pos(qx, j, ga_w, gp_w, 1, dil_w, out_width)
            p_ok = q_ok & py_ok & px_ok
            dd = tl.load(dd_img + (i * KW + j) * plane + py * out_width + px, mask=p_ok, other=0.0)
            cy = py * ga_h + (KH // 2) * dil_h - gp_h
            cx = px * ga_w + (KW // 2) * dil_w - gp_w
            c_ok = p_ok & (cy >= 0) & (cy < guide_height) & (cx >= 0) & (cx < guide_width)
            gc = tl.load(guide_ptr + img + cy[:, None] * sg_h + cx[:, None] * sg_w + gch[None, :] * sg_c,
                         mask=c_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
            acc += 2.0 * (gq - gc) * dd[:, None]
            # q as the centre of output m, tap (i, j) of m.
            ty = my * ga_h + i * dil_h - gp_h
            tx = mx * ga_w + j * dil_w - gp_w
            t_ok = m_ok & (ty >= 0) & (ty < guide_height) & (tx >= 0) & (tx < guide_width)
            gt = tl.load(guide_ptr + img + ty[:, None] * sg_h + tx[:, None] * sg_w + gch[None, :] * sg_c,
                         mask=t_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
            dm = tl.load(dd_img + (i * KW + j) * plane + my * out_width + mx, mask=m_ok, other=0.0)
            acc -= 2.0 * (gt - gq) * dm[:, None]
        tl.store(guide_grad_ptr + batch * sr_b + gch[None, :] * sr_c + qy[:, None] * sr_h + qx[:, None] * sr_w,
                 acc.to(guide_grad_ptr.dtype.element_ty), mask=both)

    @triton.jit
    def _input_grad_kernel(
            grad_ptr, guide_ptr, weight_ptr, mask_ptr, norm_ptr, input_grad_ptr,
            guide_channels, height, width, guide_height, guide_width, out_height, out_width,
            group_in, group_out, in_blocks,
            sd_b, sd_c, sd_h, sd_w, sg_b, sg_c, sg_h, sg_w, sw_o, sw_c, sw_h, sw_w, sm_b, sm_h, sm_w,
            si_b, si_c, si_h, si_w,
            a_h, a_w, poff_h, poff_w, div_h, div_w, ga_h, ga_w, gp_h, gp_w, dil_h, dil_w,
            KH: tl.constexpr, KW: tl.constexpr, POOL: tl.constexpr, HAS_MASK: tl.constexpr,
            NORMALIZE: tl.constexpr, USE_NORM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
            BLOCK_Q: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
        """One program: BLOCK_Q input pixels x BLOCK_C input channels (of one group) of one image. Gathers
        dL/dX[c, q] = sum over (t, p) reading q as tap t of K[t, p] sum_o W[o, c, t] dL/dout[o, p]."""
        batch = tl.program_id(2).to(tl.int64)
        group = tl.program_id(1) // in_blocks
        qs = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        ch_local = (tl.program_id(1) % in_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = ch_local < group_in
        ch = group * group_in + ch_local
        q_ok = qs < height * width
        qy = qs // width
        qx = qs % width
        mq = tl.full((BLOCK_Q,), 1.0, tl.float32)
        if HAS_MASK:
            mq = tl.load(mask_ptr + batch * sm_b + qy * sm_h + qx * sm_w, mask=q_ok, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
        for t in range(KH * KW):  # a loop, not unrolled: compiles fast
            i = t // KW
            j = t % KW
            py, py_ok = _inverse_pos(qy, i, a_h, poff_h, div_h, dil_h, out_height)
            px, px_ok = _inverse_pos(qx, j, a_w, poff_w, div_w, dil_w, out_width)
            p_ok = q_ok & py_ok & px_ok
            ty = py * ga_h + i * dil_h - gp_h
            tx = px * ga_w + j * dil_w - gp_w
            t_ok = p_ok & (ty >= 0) & (ty < guide_height) & (tx >= 0) & (tx < guide_width)
            cy = py * ga_h + (KH // 2) * dil_h - gp_h
            cx = px * ga_w + (KW // 2) * dil_w - gp_w
            c_in = p_ok & (cy >= 0) & (cy < guide_height) & (cx >= 0) & (cx < guide_width)
            dist = _distance(guide_ptr, batch * sg_b + ty * sg_h + tx * sg_w, t_ok,
                             batch * sg_b + cy * sg_h + cx * sg_w, c_in, guide_channels, sg_c, BLOCK_Q, BLOCK_G)
            norm = 1.0
            if USE_NORM:
                norm = tl.load(norm_ptr + batch * out_height * out_width + py * out_width + px,
                               mask=p_ok, other=1.0)
            k = _kernel_value(dist, mq, norm, p_ok, NORMALIZE, USE_NORM)
            g_off = batch * sd_b + py * sd_h + px * sd_w
            if POOL:
                gv = tl.load(grad_ptr + g_off[:, None] + ch[None, :] * sd_c,
                             mask=p_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                acc += gv * k[:, None]
            else:
                for o0 in range(0, group_out, BLOCK_O):
                    outs_local = o0 + tl.arange(0, BLOCK_O)
                    o_ok = outs_local < group_out
                    outs = group * group_out + outs_local
                    gv = tl.load(grad_ptr + g_off[:, None] + outs[None, :] * sd_c,
                                 mask=p_ok[:, None] & o_ok[None, :], other=0.0)
                    gk = (gv.to(tl.float32) * k[:, None]).to(grad_ptr.dtype.element_ty).to(DOT_DTYPE)
                    w = tl.load(weight_ptr + outs[:, None] * sw_o + ch_local[None, :] * sw_c + i * sw_h + j * sw_w,
                                mask=o_ok[:, None] & c_ok[None, :], other=0.0).to(DOT_DTYPE)
                    acc = tl.dot(gk, w, acc, input_precision=DOT_PRECISION)
        tl.store(input_grad_ptr + batch * si_b + ch[None, :] * si_c + qy[:, None] * si_h + qx[:, None] * si_w,
                 acc.to(input_grad_ptr.dtype.element_ty), mask=q_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _weight_grad_kernel(
            grad_ptr, x_ptr, guide_ptr, mask_ptr, norm_ptr, partial_ptr,
            guide_channels, height, width, guide_height, guide_width, out_height, out_width, n_pixels,
            group_in, group_out, out_blocks, in_blocks, blocks_per_split,
            sd_b, sd_c, sd_h, sd_w, sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w, sm_b, sm_h, sm_w,
            sp_s, sp_o, sp_c, sp_t,
            a_h, a_w, poff_h, poff_w, div_h, div_w, ga_h, ga_w, gp_h, gp_w, dil_h, dil_w,
            KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr, NORMALIZE: tl.constexpr,
            USE_NORM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
        """One program: tap t, BLOCK_O output x BLOCK_C input channels of one group, one split of the
        batch's pixels. Writes the partial sum over its pixels of dL/dout[o, p] K[t, p] X[c, tap_t(p)]."""
        tap = tl.program_id(0)
        i = tap // KW
        j = tap % KW
        blocks_per_group = out_blocks * in_blocks
        group = tl.program_id(1) // blocks_per_group
        rest = tl.program_id(1) % blocks_per_group
        outs_local = (rest // in_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
        ch_local = (rest % in_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        o_ok = outs_local < group_out
        c_ok = ch_local < group_in
        outs = group * group_out + outs_local
        ch = group * group_in + ch_local
        split = tl.program_id(2)
        plane = out_height * out_width
        acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
        for blk in range(split * blocks_per_split, (split + 1) * blocks_per_split):
            n = blk * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
            n_ok = n < n_pixels
            batch = n // plane
            pix = n % plane
            y = pix // out_width
            x = pix % out_width
            ty = y * ga_h + i * dil_h - gp_h
            tx = x * ga_w + j * dil_w - gp_w
            t_ok = n_ok & (ty >= 0) & (ty < guide_height) & (tx >= 0) & (tx < guide_width)
            cy = y * ga_h + (KH // 2) * dil_h - gp_h
            cx = x * ga_w + (KW // 2) * dil_w - gp_w
            c_in = n_ok & (cy >= 0) & (cy < guide_height) & (cx >= 0) & (cx < guide_width)
            dist = _distance(guide_ptr, batch * sg_b + ty * sg_h + tx * sg_w, t_ok,
                             batch * sg_b + cy * sg_h + cx * sg_w, c_in, guide_channels, sg_c, BLOCK_P, BLOCK_G)
            iy, iy_ok = _forward_pos(y, i, a_h, poff_h, div_h, dil_h, height)
            ix, ix_ok = _forward_pos(x, j, a_w, poff_w, div_w, dil_w, width)
            in_ok = n_ok & iy_ok & ix_ok
            a = tl.full((BLOCK_P,), 1.0, tl.float32)
            if HAS_MASK:
                a = tl.load(mask_ptr + batch * sm_b + iy * sm_h + ix * sm_w, mask=in_ok, other=0.0).to(tl.float32)
            norm = 1.0
            if USE_NORM:
                norm = tl.load(norm_ptr + n, mask=n_ok, other=1.0)
            k = _kernel_value(dist, a, norm, in_ok, NORMALIZE, USE_NORM)
            xv = tl.load(x_ptr + (batch * sx_b + iy * sx_h + ix * sx_w)[:, None] + ch[None, :] * sx_c,
                         mask=in_ok[:, None] & c_ok[None, :], other=0.0)
            xk = (xv.to(tl.float32) * k[:, None]).to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
            gv = tl.load(grad_ptr + (batch * sd_b + y * sd_h + x * sd_w)[None, :] + outs[:, None] * sd_c,
                         mask=o_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_DTYPE)
            acc = tl.dot(gv, xk, acc, input_precision=DOT_PRECISION)
        tl.store(partial_ptr + split * sp_s + outs[:, None] * sp_o + ch_local[None, :] * sp_c + tap * sp_t, acc,
                 mask=o_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------------
# geometry (a list of ints, as the ops take it):
#   [kh, kw, out_h, out_w, guide_h, guide_w, a_h, a_w, poff_h, poff_w, div_h, div_w, ga_h, ga_w, gp_h, gp_w, dil_h, dil_w]

def _dtype_of(weight: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    return None if weight is None else weight.dtype


def _phase_grid(geometry: List[int]) -> Tuple[int, int]:
    """(number of output phases, pixel blocks per phase) of the kernels that run over output pixels."""
    out_h, out_w, div_h, div_w = geometry[2], geometry[3], geometry[10], geometry[11]
    return div_h * div_w, triton.cdiv(triton.cdiv(out_h, div_h) * triton.cdiv(out_w, div_w), _BLOCK_PIXELS)


def _block(size: int, lower: int, upper: int) -> int:
    return max(lower, min(upper, triton.next_power_of_2(max(size, 1))))


def _dot_config(dtype: torch.dtype):
    """(operand dtype, input_precision) of the kernels' tl.dot for inputs of ``dtype``.

    Operands keep the input dtype, except bfloat16 under the interpreter, whose tl.dot returns garbage
    for bfloat16 (Triton 3.9): there the bfloat16-rounded operands are multiplied in float32, which
    gives the same result because a product of two bfloat16 values is exact in float32. float32
    products follow torch's matmul precision setting (TF32 only if the user allowed it).
    """
    if dtype == torch.float32:
        return tl.float32, "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if dtype == torch.bfloat16 and _INTERPRETED:
        return tl.float32, "ieee"
    return (tl.float16 if dtype == torch.float16 else tl.bfloat16), None  # precision applies to float32 only


def _device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _mask_strides(mask: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    if mask is None:
        return 0, 0, 0
    return (mask.stride(0) if mask.shape[0] > 1 else 0), mask.stride(2), mask.stride(3)


def _weight_strides(weight: Optional[torch.Tensor]) -> Tuple[int, ...]:
    return (0, 0, 0, 0) if weight is None else tuple(weight.stride())


def _forward_impl(x, guide, weight, bias, mask, geometry, groups, normalize):
    kh, kw, oh, ow, gh, gw, *axes = geometry
    b, c, h, w = x.shape
    o = c if weight is None else weight.shape[0]
    out = x.new_empty(b, o, oh, ow)
    norm = torch.empty(b, oh, ow, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out, norm
    group_in, group_out = c // groups, o // groups
    block_o = _block(group_out, 16, _MAX_BLOCK_OUT)
    out_blocks = triton.cdiv(group_out, block_o)
    dot_dtype, precision = _dot_config(x.dtype)
    phases, phase_blocks = _phase_grid(geometry)
    grid = (phases * phase_blocks, groups * out_blocks, b)
    with _device_of(x):
        _forward_kernel[grid](
            x, guide, x if weight is None else weight, out if bias is None else bias, x if mask is None else mask,
            out, norm,
            c, guide.shape[1], o, h, w, gh, gw, oh, ow, group_in, group_out, out_blocks, phase_blocks,
            *x.stride(), *guide.stride(), *_weight_strides(weight), *_mask_strides(mask), *out.stride(),
            *axes,
            KH=kh, KW=kw, POOL=weight is None, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
            NORMALIZE=normalize, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
            BLOCK_P=_BLOCK_PIXELS, BLOCK_O=block_o, BLOCK_C=_block(group_in, 16, _MAX_BLOCK_IN),
            BLOCK_G=_block(guide.shape[1], 1, _MAX_BLOCK_GUIDE))
    return out, norm


def _guide_grad(grad, x, guide, weight, mask, norm, geometry, groups, normalize):
    kh, kw, oh, ow, gh, gw, *axes = geometry
    ga_h, ga_w, gp_h, gp_w, dil_h, dil_w = axes[6:]
    b, c, h, w = x.shape
    o = grad.shape[1]
    dist_grad = torch.empty(b, kh * kw, oh, ow, dtype=torch.float32, device=x.device)
    guide_grad = torch.empty(guide.shape, dtype=guide.dtype, device=guide.device)
    dot_dtype, precision = _dot_config(x.dtype)
    block_g = _block(guide.shape[1], 1, _MAX_BLOCK_GUIDE)
    with _device_of(x):
        phases, phase_blocks = _phase_grid(geometry)
        _kernel_grad_kernel[(phases * phase_blocks, b)](
            grad, x, guide, x if weight is None else weight, x if mask is None else mask, norm, dist_grad,
            c, guide.shape[1], h, w, gh, gw, oh, ow, groups, c // groups, o // groups, phase_blocks,
            *grad.stride(), *x.stride(), *guide.stride(), *_weight_strides(weight), *_mask_strides(mask),
            *axes,
            KH=kh, KW=kw, POOL=weight is None, HAS_MASK=mask is not None, NORMALIZE=normalize,
            USE_NORM=normalize or mask is not None, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
            BLOCK_P=_BLOCK_PIXELS, BLOCK_T=triton.next_power_of_2(kh * kw),
            BLOCK_O=_block(o // groups, 16, _MAX_BLOCK_OUT), BLOCK_C=_block(c // groups, 16, _MAX_BLOCK_IN),
            BLOCK_G=block_g)
        _guide_grad_kernel[(triton.cdiv(gh * gw, _BLOCK_PIXELS), triton.cdiv(guide.shape[1], block_g), b)](
            guide, dist_grad, guide_grad,
            guide.shape[1], gh, gw, oh, ow,
            *guide.stride(), *guide_grad.stride(),
            ga_h, ga_w, gp_h, gp_w, dil_h, dil_w,
            KH=kh, KW=kw, BLOCK_Q=_BLOCK_PIXELS, BLOCK_G=block_g)
    return guide_grad


def _input_grad(grad, x, guide, weight, mask, norm, geometry, groups, normalize):
    kh, kw, oh, ow, gh, gw, *axes = geometry
    b, c, h, w = x.shape
    o = grad.shape[1]
    group_in, group_out = c // groups, o // groups
    input_grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_c = _block(group_in, 16, _MAX_BLOCK_IN)
    in_blocks = triton.cdiv(group_in, block_c)
    dot_dtype, precision = _dot_config(x.dtype)
    with _device_of(x):
        _input_grad_kernel[(triton.cdiv(h * w, _BLOCK_PIXELS), groups * in_blocks, b)](
            grad, guide, x if weight is None else weight, x if mask is None else mask, norm, input_grad,
            guide.shape[1], h, w, gh, gw, oh, ow, group_in, group_out, in_blocks,
            *grad.stride(), *guide.stride(), *_weight_strides(weight), *_mask_strides(mask), *input_grad.stride(),
            *axes,
            KH=kh, KW=kw, POOL=weight is None, HAS_MASK=mask is not None, NORMALIZE=normalize,
            USE_NORM=normalize or mask is not None, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
            BLOCK_Q=_BLOCK_PIXELS, BLOCK_O=_block(group_out, 16, _MAX_BLOCK_OUT), BLOCK_C=block_c,
            BLOCK_G=_block(guide.shape[1], 1, _MAX_BLOCK_GUIDE))
    return input_grad


def _weight_grad(grad, x, guide, weight, mask, norm, geometry, groups, normalize):
    kh, kw, oh, ow, gh, gw, *axes = geometry
    b, c, h, w = x.shape
    o = weight.shape[0]
    group_in, group_out = c // groups, o // groups
    block_o, block_c = _block(group_out, 16, _MAX_BLOCK_OUT), _block(group_in, 16, _MAX_BLOCK_IN)
    out_blocks, in_blocks = triton.cdiv(group_out, block_o), triton.cdiv(group_in, block_c)
    n_pixels = b * oh * ow
    pixel_blocks = triton.cdiv(n_pixels, _BLOCK_PIXELS)
    programs = kh * kw * groups * out_blocks * in_blocks
    splits = max(1, min(pixel_blocks, _WEIGHT_GRAD_PROGRAMS // programs))
    blocks_per_split = triton.cdiv(pixel_blocks, splits)
    splits = triton.cdiv(pixel_blocks, blocks_per_split)
    # Partial sums per split, reduced below in a fixed order: deterministic, unlike atomics.
    partial = torch.zeros(splits, o, group_in, kh * kw, dtype=torch.float32, device=x.device)
    dot_dtype, precision = _dot_config(x.dtype)
    with _device_of(x):
        _weight_grad_kernel[(kh * kw, groups * out_blocks * in_blocks, splits)](
            grad, x, guide, x if mask is None else mask, norm, partial,
            guide.shape[1], h, w, gh, gw, oh, ow, n_pixels, group_in, group_out, out_blocks, in_blocks,
            blocks_per_split,
            *grad.stride(), *x.stride(), *guide.stride(), *_mask_strides(mask), *partial.stride(),
            *axes,
            KH=kh, KW=kw, HAS_MASK=mask is not None, NORMALIZE=normalize, USE_NORM=normalize or mask is not None,
            DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
            BLOCK_P=_BLOCK_PIXELS, BLOCK_O=block_o, BLOCK_C=block_c,
            BLOCK_G=_block(guide.shape[1], 1, _MAX_BLOCK_GUIDE))
    return partial.sum(0).view(o, group_in, kh, kw).to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# Operators (torch.library), fake implementations and autograd
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @torch.library.custom_op("pac_triton::pac_forward", mutates_args=())
    def _pac_forward(x: torch.Tensor, guide: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], geometry: List[int], groups: int,
                     normalize: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """(output, norm): the fused PAC layer and, per pixel, its kernel's sum S, or log S when ``normalize``
        (float32, (B, H', W'))."""
        return _forward_impl(x, guide, weight, bias, mask, geometry, groups, normalize)

    @_pac_forward.register_fake
    def _(x, guide, weight, bias, mask, geometry, groups, normalize):
        o = x.shape[1] if weight is None else weight.shape[0]
        return (x.new_empty(x.shape[0], o, geometry[2], geometry[3]),
                x.new_empty(x.shape[0], geometry[2], geometry[3], dtype=torch.float32))

    @torch.library.custom_op("pac_triton::pac_backward", mutates_args=())
    def _pac_backward(grad: torch.Tensor, x: torch.Tensor, guide: torch.Tensor, weight: Optional[torch.Tensor],
                      mask: Optional[torch.Tensor], norm: torch.Tensor, geometry: List[int], groups: int,
                      normalize: bool, needs: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of (input, guide, weight); an empty tensor for each one not in ``needs``."""
        args = (grad, x, guide, weight, mask, norm, geometry, groups, normalize)
        if grad.numel() == 0:  # nothing to launch: zero gradients
            return (x.new_zeros(x.shape if needs[0] else 0), guide.new_zeros(guide.shape if needs[1] else 0),
                    x.new_zeros(weight.shape if needs[2] and weight is not None else 0, dtype=_dtype_of(weight)))
        # A fresh empty tensor for each gradient not needed: custom ops may not return aliases.
        return (_input_grad(*args) if needs[0] else x.new_empty(0),
                _guide_grad(*args) if needs[1] else x.new_empty(0),
                _weight_grad(*args) if needs[2] and weight is not None else x.new_empty(0))

    @_pac_backward.register_fake
    def _(grad, x, guide, weight, mask, norm, geometry, groups, normalize, needs):
        return (x.new_empty(x.shape if needs[0] else 0), guide.new_empty(guide.shape if needs[1] else 0),
                x.new_empty(weight.shape if needs[2] and weight is not None else 0, dtype=_dtype_of(weight)))

    def _setup_context(ctx, inputs, output):
        x, guide, weight, bias, mask, geometry, groups, normalize = inputs
        ctx.save_for_backward(x, guide, weight, mask, output[1])
        ctx.geometry, ctx.groups, ctx.normalize = geometry, groups, normalize
        ctx.bias_dtype = None if bias is None else bias.dtype

    def _backward(ctx, grad_out, grad_norm):
        x, guide, weight, mask, norm = ctx.saved_tensors
        need_x, need_guide, need_weight, need_bias = ctx.needs_input_grad[:4]
        grads = [None, None, None]
        if need_x or need_guide or need_weight:
            # The kernels read the gradient in the input's dtype (the output's dtype).
            grad = grad_out.to(x.dtype)
            needs = [bool(need_x), bool(need_guide), bool(need_weight)]
            results = _pac_backward(grad, x, guide, weight, mask, norm, ctx.geometry, ctx.groups, ctx.normalize, needs)
            grads = [r if n else None for r, n in zip(results, needs)]
        grad_bias = grad_out.sum((0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype) if need_bias else None
        return grads[0], grads[1], grads[2], grad_bias, None, None, None, None

    _pac_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public interface
# ----------------------------------------------------------------------------------------------

def _pair_arg(name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    """``value`` as a pair of ints >= ``minimum``; ValueError/TypeError naming ``name`` otherwise."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when it is active for x's device, else x's."""
    return _autocast_dtype(x.device.type) or x.dtype


def _device_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or (_INTERPRETED and t.device.type == "cpu")


def supports(layer: str, x: torch.Tensor, guide: torch.Tensor, *, kernel_type: str = "gaussian",
             smooth_kernel_type: str = "none", normalize_kernel: bool = False, channel_wise: bool = False,
             shared_filters: bool = False, groups: int = 1, padding_mode: str = "zeros",
             mask: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
             output_padding: IntPair = 0) -> bool:
    """True when the fused kernels handle this call of ``layer`` ('conv', 'conv_transpose' or 'pool').

    Fused: Triton installed, CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``), input computed in
    float32/float16/bfloat16 (autocast's dtype counts), a float32/float16/bfloat16 guide, kernel_type
    'gaussian', smooth_kernel_type 'none', padding_mode 'zeros', no channel_wise, no shared_filters, any
    groups (convolution only), normalize_kernel on or off, and a mask that needs no gradient. The geometry
    (stride, padding, dilation, output_padding) is any that :mod:`pac` accepts; bad values are not judged
    here but raise the usual errors in the call.
    """
    if not is_available() or layer not in LAYERS:
        return False
    tensors = [t for t in (x, guide, mask) if t is not None]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and _device_ok(t) and t.device == x.device
               for t in tensors):
        return False
    if _compute_dtype(x) not in SUPPORTED_DTYPES or guide.dtype not in SUPPORTED_DTYPES:
        return False
    if mask is not None and (mask.requires_grad or not mask.is_floating_point()):
        return False
    if groups != 1 and layer != "conv":
        return False
    return (kernel_type == "gaussian" and smooth_kernel_type == "none" and padding_mode == "zeros"
            and not channel_wise and not shared_filters and isinstance(groups, int) and groups >= 1)


def _require_triton(name: str) -> None:
    if triton is None:
        raise RuntimeError(f"{name} needs Triton: pip install -r requirements-triton.txt")


def _check_call(name: str, x: torch.Tensor, guide: torch.Tensor, guide_hw: Sequence[int],
                mask: Optional[torch.Tensor], normalize_kernel: bool) -> None:
    _check_4d("guide", guide)
    if not _device_ok(x):
        raise ValueError(f"input must be a CUDA tensor (got device {x.device}); CPU tensors run only through "
                         "the Triton interpreter (TRITON_INTERPRET=1 set before importing pac_triton)")
    if _compute_dtype(x) not in SUPPORTED_DTYPES:
        raise TypeError(f"input must be float32, float16 or bfloat16, got {x.dtype}")
    if guide.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"guide must be float32, float16 or bfloat16, got {guide.dtype}")
    if guide.device != x.device:
        raise ValueError(f"guide must be on the input's device {x.device}, got {guide.device}")
    b = x.shape[0]
    if guide.shape[0] != b or tuple(guide.shape[2:]) != tuple(guide_hw):
        raise ValueError(f"guide must have shape ({b}, *, {guide_hw[0]}, {guide_hw[1]}), got {tuple(guide.shape)}")
    if not isinstance(normalize_kernel, bool):
        raise TypeError(f"normalize_kernel must be a bool, got {normalize_kernel!r}")
    if mask is not None:
        _check_4d("mask", mask)
        h, w = x.shape[2:]
        if mask.shape[1] != 1 or mask.shape[0] not in (1, b) or tuple(mask.shape[2:]) != (h, w):
            raise ValueError(f"mask must have shape ({b} or 1, 1, {h}, {w}) (the input's size), got "
                             f"{tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask must be on the input's device {x.device}, got {mask.device}")
        if mask.requires_grad:
            raise ValueError("mask must not require a gradient (the fused kernels treat it as a constant)")


def _check_kernel_size(k: Tuple[int, int]) -> None:
    if any(v <= 0 or v % 2 == 0 for v in k):
        raise ValueError(f"kernel_size must be odd (the adaptive kernel needs a centre tap), got {k}")


def _cast_params(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
    """Input and weight in the compute dtype (autocast's, or the input's); the bias is read in float32."""
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    if weight is not None:
        weight = weight.to(dtype)
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    return x, weight, bias


def _run(x, guide, weight, bias, mask, geometry, groups, normalize_kernel):
    """The forward op, and the output mask when a mask is given (as pac.packernel2d returns it)."""
    if mask is not None:
        mask = mask.to(torch.float32)
    out, norm = _pac_forward(x, guide, weight, bias, mask, geometry, groups, normalize_kernel)
    if mask is None:
        return out
    out_mask = (torch.isfinite(norm) if normalize_kernel else norm != 0).to(torch.float32).unsqueeze(1)
    if not normalize_kernel and mask.shape[0] == 1:  # the mask alone decides: pac keeps the mask's batch of 1
        out_mask = out_mask[:1]
    return out, out_mask


def pac_conv2d(x: torch.Tensor, guide: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
               normalize_kernel: bool = False, mask: Optional[torch.Tensor] = None):
    """Fused gaussian PAC convolution: ``pac.packernel2d(guide, mask, kernel_size, stride, padding, dilation,
    normalize_kernel=...)`` then ``pac.pacconv2d(x, K, weight, bias, stride, padding, dilation, groups=groups)``.

    Args:
        x: ``(B, C, H, W)``; guide: ``(B, C_g, H, W)``; weight: ``(O, C / groups, kh, kw)`` (odd kh, kw);
        bias: ``(O,)`` or None; mask: ``(B or 1, 1, H, W)`` or None.

    Returns:
        ``(B, O, H', W')`` in x's dtype (autocast's under autocast), or ``(output, output_mask)`` with a mask.
        Differentiable with respect to x, guide, weight and bias.

    Example:
        >>> device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: needs TRITON_INTERPRET=1
        >>> x, guide = torch.rand(1, 4, 16, 16, device=device), torch.rand(1, 3, 16, 16, device=device)
        >>> pac_conv2d(x, guide, torch.rand(8, 4, 3, 3, device=device), padding=1).shape
        torch.Size([1, 8, 16, 16])
    """
    _require_triton("pac_conv2d")
    _check_4d("input", x)
    _check_call("pac_conv2d", x, guide, x.shape[2:], mask, normalize_kernel)
    _check_4d("weight", weight)
    s, p, d = _pair_arg("stride", stride, 1), _pair_arg("padding", padding, 0), _pair_arg("dilation", dilation, 1)
    c, o = x.shape[1], weight.shape[0]
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or c % groups or o % groups:
        raise ValueError(f"groups must be a positive integer dividing the input channels ({c}) and the output "
                         f"channels ({o}), got {groups!r}")
    k = tuple(weight.shape[2:])
    if weight.shape[1] != c // groups:
        raise ValueError(f"weight must have shape (out_channels, {c // groups}, kh, kw) for {c} input channels "
                         f"and groups={groups}, got {tuple(weight.shape)}")
    _check_kernel_size(k)
    _check_bias_shape(bias, o)
    out_hw = _conv_out_size(x.shape[2:], k, s, p, d)
    x, weight, bias = _cast_params(x, weight, bias)
    geometry = [*k, *out_hw, *x.shape[2:], *s, *p, 1, 1, *s, *p, *d]
    return _run(x, guide, weight, bias, mask, geometry, groups, normalize_kernel)


def pac_conv_transpose2d(x: torch.Tensor, guide: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                         output_padding: IntPair = 0, dilation: IntPair = 1, normalize_kernel: bool = False,
                         mask: Optional[torch.Tensor] = None):
    """Fused gaussian PAC transposed convolution: ``pac.packernel2d(guide, mask, ..., transposed=True)`` then
    ``pac.pacconv_transpose2d(x, K, weight, bias, stride, padding, output_padding, dilation)``.

    Args:
        x: ``(B, C_in, H, W)``; guide: ``(B, C_g, H', W')`` at the output resolution; weight:
        ``(C_in, C_out, kh, kw)`` (odd kh, kw), applied without spatial flip; bias: ``(C_out,)`` or None;
        mask: ``(B or 1, 1, H, W)`` at the input resolution, or None.

    Returns:
        ``(B, C_out, H', W')`` with ``H' = (H - 1)s - 2p + d(kh - 1) + 1 + output_padding``, or
        ``(output, output_mask)`` with a mask. Differentiable with respect to x, guide, weight and bias.
    """
    _require_triton("pac_conv_transpose2d")
    _check_4d("input", x)
    _check_4d("weight", weight)
    s, p = _pair_arg("stride", stride, 1), _pair_arg("padding", padding, 0)
    op, d = _pair_arg("output_padding", output_padding, 0), _pair_arg("dilation", dilation, 1)
    k = tuple(weight.shape[2:])
    _check_kernel_size(k)
    out_hw = _transposed_out_size(x.shape[2:], k, s, p, op, d)
    _check_call("pac_conv_transpose2d", x, guide, out_hw, mask, normalize_kernel)
    c = x.shape[1]
    if weight.shape[0] != c:
        raise ValueError(f"weight must have shape ({c}, out_channels, kh, kw) for {c} input channels, "
                         f"got {tuple(weight.shape)}")
    _check_bias_shape(bias, weight.shape[1])
    x, weight, bias = _cast_params(x, weight, bias)
    big_p = [(k[a] - 1) * d[a] - p[a] for a in range(2)]
    same = [(k[a] - 1) * d[a] // 2 for a in range(2)]
    geometry = [*k, *out_hw, *out_hw, 1, 1, *big_p, *s, 1, 1, *same, *d]
    # (C_in, C_out, kh, kw) read as a convolution weight (C_out, C_in, kh, kw): a view, no copy, no flip.
    return _run(x, guide, weight.transpose(0, 1), bias, mask, geometry, 1, normalize_kernel)


def pac_pool2d(x: torch.Tensor, guide: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1,
               padding: IntPair = 0, dilation: IntPair = 1, normalize_kernel: bool = False,
               mask: Optional[torch.Tensor] = None):
    """Fused gaussian PAC pooling: ``pac.packernel2d(guide, mask, kernel_size, stride, padding, dilation,
    normalize_kernel=...)`` then ``pac.pacpool2d(x, K, kernel_size, stride, padding, dilation)``: a weighted
    sum of every window, an average with ``normalize_kernel``.

    Returns ``(B, C, H', W')``, or ``(output, output_mask)`` with a mask. Differentiable with respect to x
    and guide.
    """
    _require_triton("pac_pool2d")
    _check_4d("input", x)
    _check_call("pac_pool2d", x, guide, x.shape[2:], mask, normalize_kernel)
    k = _pair_arg("kernel_size", kernel_size, 1)
    _check_kernel_size(k)
    s, p, d = _pair_arg("stride", stride, 1), _pair_arg("padding", padding, 0), _pair_arg("dilation", dilation, 1)
    out_hw = _conv_out_size(x.shape[2:], k, s, p, d)
    x = x.to(_compute_dtype(x))
    geometry = [*k, *out_hw, *x.shape[2:], *s, *p, 1, 1, *s, *p, *d]
    return _run(x, guide, None, None, mask, geometry, 1, normalize_kernel)


def _check_bias_shape(bias: Optional[torch.Tensor], channels: int) -> None:
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (channels,)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or a tensor of shape ({channels},), got {got}")
