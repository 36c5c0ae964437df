"""Optional fused Triton kernel for PAC inference with a gaussian adaptive kernel.

:func:`pacconv2d_gaussian` computes, in one kernel launch, what ``pac.packernel2d`` followed by
``pac.pacconv2d`` compute in two steps::

    K[b, i, j, y, x] = exp(-0.5 * sum_c (G[b, c, tap] - G[b, c, centre])^2)
    out[b, o, y, x]  = bias[o] + sum_{c, i, j} W[o, c, i, j] * K[b, i, j, y, x] * X[b, c, y*s + i*d - p, x*s + j*d - p]

The adaptive kernel ``K`` is computed on the fly from the guide and never written to memory, and
neither is the unfolded input: the memory traffic is that of a plain convolution plus one read of
the guide per tap. That matters for inference on large images on a CUDA GPU, where the
``(B, 1, kh, kw, H', W')`` kernel tensor of the two-step path can be larger than the activations.

When to use it: CUDA inference with a dense weight ``(O, C, kh, kw)``, zero padding and the plain
``'gaussian'`` kernel (optionally normalised). For training, masks, groups, shared filters, other
kernel types or padding modes, use :mod:`pac`.

Verification status: this kernel was developed and tested with the Triton interpreter only
(``TRITON_INTERPRET=1``, CPU tensors), against both implementations of :mod:`pac`; no GPU was
available. Its speed on a GPU has not been measured, and the block sizes are untuned defaults.

Install the extra with ``pip install -r requirements-triton.txt``. Without Triton this module still
imports; :func:`is_available` then returns False and :func:`pacconv2d_gaussian` raises.

Example:
    >>> import torch, pac_triton
    >>> if pac_triton.is_available() and torch.cuda.is_available():
    ...     x, guide = torch.rand(1, 16, 64, 64, device="cuda"), torch.rand(1, 3, 64, 64, device="cuda")
    ...     weight = torch.randn(32, 16, 5, 5, device="cuda")
    ...     with torch.inference_mode():
    ...         out = pac_triton.pacconv2d_gaussian(x, guide, weight, padding=2)  # (1, 32, 64, 64)
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import torch

from pac import _check_4d, _check_bias, _conv_out_hw

try:
    import triton
    import triton.language as tl
    from triton import knobs as _triton_knobs
except ImportError:  # the extra is optional: keep `import pac_triton` working without it
    triton = None

__all__ = ["pacconv2d_gaussian", "is_available"]

IntPair = Union[int, Tuple[int, int]]
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Output pixels per program, and caps on the channel blocks. tl.dot needs every block >= 16.
_BLOCK_PIXELS = 64
_MAX_BLOCK_OUT = 64
_MAX_BLOCK_IN = 32
_MAX_BLOCK_GUIDE = 16

# The interpreter is chosen when the kernel is decorated, i.e. at import time of this module.
_INTERPRETED = triton is not None and bool(_triton_knobs.runtime.interpret)


def is_available() -> bool:
    """True when the kernel can run here: Triton is installed and either a CUDA device is present or
    the Triton interpreter was enabled (``TRITON_INTERPRET=1`` before this module was imported)."""
    return triton is not None and (_INTERPRETED or torch.cuda.is_available())


if triton is not None:

    @triton.jit
    def _pac_gaussian_forward_kernel(
            x_ptr, guide_ptr, weight_ptr, bias_ptr, out_ptr,
            channels, guide_channels, out_channels, height, width, out_height, out_width,
            sx_b, sx_c, sx_h, sx_w,
            sg_b, sg_c, sg_h, sg_w,
            sw_o, sw_c, sw_h, sw_w,
            so_b, so_c, so_h, so_w,
            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
            KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
            DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
        """One program: BLOCK_P output pixels x BLOCK_O output channels of one image."""
        batch = tl.program_id(2).to(tl.int64)
        # int64 pixel indices: offsets of large images with many channels exceed 2^31.
        pixels = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        pixel_ok = pixels < out_height * out_width
        out_ok = outs < out_channels
        top = (pixels // out_width) * stride_h - pad_h  # input row of tap i = 0
        left = (pixels % out_width) * stride_w - pad_w
        centre_y = top + (KH // 2) * dil_h
        centre_x = left + (KW // 2) * dil_w
        # Guide taps outside the image read 0, as in pac.packernel2d's zero-padded guide.
        centre_ok = pixel_ok & (centre_y >= 0) & (centre_y < height) & (centre_x >= 0) & (centre_x < width)
        x_img = x_ptr + batch * sx_b
        guide_img = guide_ptr + batch * sg_b

        acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
        norm = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for i in tl.static_range(KH):
            for j in tl.static_range(KW):
                tap_y = top + i * dil_h
                tap_x = left + j * dil_w
                tap_ok = pixel_ok & (tap_y >= 0) & (tap_y < height) & (tap_x >= 0) & (tap_x < width)

                dist = tl.zeros((BLOCK_P,), dtype=tl.float32)
                for g0 in range(0, guide_channels, BLOCK_G):
                    gch = g0 + tl.arange(0, BLOCK_G)
                    g_ok = gch < guide_channels
                    tap = tl.load(guide_img + tap_y[:, None] * sg_h + tap_x[:, None] * sg_w + gch[None, :] * sg_c,
                                  mask=tap_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
                    centre = tl.load(guide_img + centre_y[:, None] * sg_h + centre_x[:, None] * sg_w
                                     + gch[None, :] * sg_c,
                                     mask=centre_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
                    diff = tap - centre
                    dist += tl.sum(diff * diff, axis=1)
                k = tl.exp(-0.5 * dist)
                if NORMALIZE:  # the kernel sums to one over the taps on real pixels
                    k = tl.where(tap_ok, k, 0.0)
                    norm += k

                for c0 in range(0, channels, BLOCK_C):
                    ch = c0 + tl.arange(0, BLOCK_C)
                    c_ok = ch < channels
                    x = tl.load(x_img + tap_y[:, None] * sx_h + tap_x[:, None] * sx_w + ch[None, :] * sx_c,
                                mask=tap_ok[:, None] & c_ok[None, :], other=0.0)
                    xk = (x.to(tl.float32) * k[:, None]).to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
                    w = tl.load(weight_ptr + outs[None, :] * sw_o + ch[:, None] * sw_c + i * sw_h + j * sw_w,
                                mask=c_ok[:, None] & out_ok[None, :], other=0.0).to(DOT_DTYPE)
                    acc = tl.dot(xk, w, acc, input_precision=DOT_PRECISION)

        if NORMALIZE:  # a window without any real pixel keeps a zero kernel, as in pac.packernel2d
            acc = acc / tl.where(norm == 0.0, 1.0, norm)[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        out_y = pixels // out_width
        out_x = pixels % out_width
        out_offsets = batch * so_b + outs[None, :] * so_c + out_y[:, None] * so_h + out_x[:, None] * so_w
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=pixel_ok[:, None] & out_ok[None, :])


def _pair_arg(name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    """``value`` as a pair of ints >= ``minimum``; ValueError/TypeError naming ``name`` otherwise."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _block(size: int, lower: int, upper: int) -> int:
    return max(lower, min(upper, triton.next_power_of_2(max(size, 1))))


def _dot_config(dtype: torch.dtype) -> Tuple["tl.dtype", Optional[str]]:
    """(operand dtype, input_precision) of the kernel's tl.dot for inputs of ``dtype``.

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


def _check_inputs(input: torch.Tensor, guide: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> None:
    """Types, shapes, dtypes, devices and autograd state of the tensor arguments."""
    _check_4d("input", input)
    _check_4d("guide", guide)
    _check_4d("weight", weight)
    _check_bias(bias, weight.shape[0])
    for name, t in (("input", input), ("guide", guide)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight must have the input's dtype {input.dtype}, got {weight.dtype}")
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    b, c, h, w = input.shape
    if guide.shape[0] != b or tuple(guide.shape[2:]) != (h, w):
        raise ValueError(f"guide must have the input's batch and size ({b}, *, {h}, {w}), got {tuple(guide.shape)}")
    kh, kw = weight.shape[2:]
    if weight.shape[1] != c:
        raise ValueError(f"weight must have shape (out_channels, {c}, kh, kw) for an input with {c} channels, "
                         f"got {tuple(weight.shape)}")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"weight must have an odd kernel size (the adaptive kernel needs a centre tap), "
                         f"got {(kh, kw)}")
    tensors = {"input": input, "guide": guide, "weight": weight, "bias": bias}
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} must be on the input's device {input.device}, got {t.device}")
    if input.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"input must be a CUDA tensor (got device {input.device}); CPU tensors run only through "
                         "the Triton interpreter (TRITON_INTERPRET=1 set before importing pac_triton)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors.values()):
        raise RuntimeError("pacconv2d_gaussian is inference-only and has no backward: call it under "
                           "torch.no_grad() or torch.inference_mode(), or use pac.pacconv2d for training")


def pacconv2d_gaussian(input: torch.Tensor, guide: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                       dilation: IntPair = 1, normalize_kernel: bool = False) -> torch.Tensor:
    """Fused PAC convolution with a gaussian adaptive kernel computed from ``guide`` (inference only).

    Equals ``pac.pacconv2d(input, pac.packernel2d(guide, kernel_size=weight.shape[-2:], stride=stride,
    padding=padding, dilation=dilation, normalize_kernel=normalize_kernel)[0], weight, bias, stride,
    padding, dilation)`` up to float rounding, without materialising the adaptive kernel. Input and
    guide are zero-padded. Products are accumulated in float32 whatever the input dtype; autocast
    does not apply (cast the inputs yourself).

    Args:
        input: ``(B, C, H, W)``, float32, float16 or bfloat16, on a CUDA device (or on the CPU under
            the Triton interpreter).
        guide: ``(B, C_g, H, W)`` guide features, float32, float16 or bfloat16. The adaptive kernel is
            computed in float32.
        weight: ``(O, C, kh, kw)`` with odd ``kh``, ``kw``, in the dtype of ``input``.
        bias: ``(O,)`` or None.
        stride, padding, dilation: as in :func:`torch.nn.functional.conv2d`.
        normalize_kernel: normalise the adaptive kernel to sum 1 over the taps on real pixels.

    Returns:
        ``(B, O, H', W')`` in the dtype of ``input``, with ``H' = (H + 2p - d(kh - 1) - 1) // s + 1``.

    Raises:
        RuntimeError: Triton is not installed, or autograd would need a gradient (this function has
            no backward: use it under ``torch.no_grad()`` / ``torch.inference_mode()``).

    Example:
        >>> x, guide = torch.rand(1, 4, 16, 16), torch.rand(1, 3, 16, 16)  # .cuda() on a GPU
        >>> with torch.no_grad():
        ...     pacconv2d_gaussian(x, guide, torch.rand(8, 4, 3, 3), padding=1).shape
        torch.Size([1, 8, 16, 16])
    """
    if triton is None:
        raise RuntimeError("pacconv2d_gaussian needs Triton: pip install -r requirements-triton.txt")
    _check_inputs(input, guide, weight, bias)
    s = _pair_arg("stride", stride, 1)
    p = _pair_arg("padding", padding, 0)
    d = _pair_arg("dilation", dilation, 1)
    if not isinstance(normalize_kernel, bool):
        raise TypeError(f"normalize_kernel must be a bool, got {normalize_kernel!r}")
    b, o = input.shape[0], weight.shape[0]
    out_hw = _conv_out_hw(input.shape[2:], weight.shape[2:], s, p, d)
    out = torch.empty(b, o, *out_hw, dtype=input.dtype, device=input.device)
    if out.numel() > 0:
        # Triton launches on the current CUDA device: make it the input's.
        with torch.cuda.device(input.device) if input.is_cuda else contextlib.nullcontext():
            _launch(input, guide, weight, bias, out, s, p, d, normalize_kernel)
    return out


def _launch(input: torch.Tensor, guide: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            out: torch.Tensor, stride: Tuple[int, int], padding: Tuple[int, int], dilation: Tuple[int, int],
            normalize_kernel: bool) -> None:
    """Fill ``out`` (B, O, H', W'): one program per block of output pixels x output channels x image."""
    b, c, h, w = input.shape
    o, _, kh, kw = weight.shape
    block_o = _block(o, 16, _MAX_BLOCK_OUT)
    grid = (triton.cdiv(out.shape[2] * out.shape[3], _BLOCK_PIXELS), triton.cdiv(o, block_o), b)
    dot_dtype, precision = _dot_config(input.dtype)
    _pac_gaussian_forward_kernel[grid](
        input, guide, weight, bias if bias is not None else out, out,  # `out` stands in for a missing bias
        c, guide.shape[1], o, h, w, out.shape[2], out.shape[3],
        *input.stride(), *guide.stride(), *weight.stride(), *out.stride(),
        *stride, *padding, *dilation,
        KH=kh, KW=kw, HAS_BIAS=bias is not None, NORMALIZE=normalize_kernel,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        BLOCK_P=_BLOCK_PIXELS, BLOCK_O=block_o, BLOCK_C=_block(c, 16, _MAX_BLOCK_IN),
        BLOCK_G=_block(guide.shape[1], 1, _MAX_BLOCK_GUIDE))
