"""Learnable mean-field CRFs whose messages are pixel-adaptive convolutions (PAC-CRF).

A PAC-CRF runs ``num_steps`` mean-field iterations on per-pixel class scores (the *unary*, logits of
shape (B, C, H, W)). Each pairwise kernel passes messages with a :class:`pac.PacConv2d` whose adaptive
kernel ``K = exp(-0.5 * ||f_j - f_i||^2)`` comes from *edge features* ``f`` (e.g. position and colour
divided by bandwidths, see :func:`create_YXRGB`)::

    Q     = softmax(logQ)                                  # over classes
    logQ' = unary_weight * unary - sum_k  w_k * compat_k(messenger_k(Q, K_k))

The update uses the *unary*, not the previous ``logQ``; ``logQ`` starts at the unary.

Kernel types (``compat_type`` of :meth:`PacCRF.add_pairwise_kernel`):

=========  ==========================================================================================
``'4d'``   full (C, C, k, k) filter: class compatibility and spatial filter learnt jointly
``'2d'``   learnable (C, C) 1x1 compatibility conv (init ``1 - I``) after a shared spatial filter
``'potts'`` Potts model: the shared spatial message of each class attracts that class; the stored
           pairwise weight is ``-pairwise_weight``
``'na'``   a plain ``nn.Conv2d`` message (no edge features): a ConvCRF-like learnt spatial kernel
=========  ==========================================================================================

The shared spatial filter of '2d'/'potts' is a learnable Gaussian-initialised (1, 1, k, k) weight when
``spatial_filter=True``, and a fixed buffer of ones with a zero centre when ``spatial_filter=False``.

Which pairwise weights ``w_k`` learn (kept from the 2019 reference so released weights behave the same):
the parameter ``pairwise_weights.{k}`` exists for every kernel, but it is used (and so receives a
gradient) **only** for ``compat_type='potts'`` with ``spatial_filter=False`` and ``fixed_weighting=False``.
For every other kernel the forward pass uses the constant initial value and the parameter stays at its
init; in those kernels the scale of the message is learnt through the messenger / compat weights.
``unary_weight`` is learnable unless ``fixed_weighting=True``.

Blur ``b > 1`` runs a kernel at 1/b resolution: Q and the edge features are average-pooled with
kernel = stride = b and a centred ceil padding (``count_include_pad=False``), the message is upsampled
bilinearly by b and cropped back to (H, W).
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from pac import PacConv2d, _check_4d

__all__ = ['PacCRF', 'PacCRFLoose', 'DenseCRF', 'crf_refine', 'create_position_feats', 'create_YXRGB']

COMPAT_TYPES = ('potts', '2d', '4d', 'na')
FINAL_OUTPUTS = ('log_Q', 'log_softmax', 'softmax')
_COMPAT_PERTURBATION = 0.0005  # half-width of the uniform noise of perturbed_init on compat weights

EdgeFeat = Union[Tensor, Sequence[Optional[Tensor]], None]
EdgeKernel = Union[Tensor, Sequence[Optional[Tensor]], None]


# ------------------------------------------------------------------------------------------------
# Feature helpers
# ------------------------------------------------------------------------------------------------

def _scale_tensor(name: str, scales: Any, channels: int, device: Optional[torch.device] = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Scalar / list / tensor of per-channel scales -> ``dtype`` tensor broadcastable over (B, channels, H, W)."""
    if not isinstance(scales, Tensor):
        try:
            scales = torch.tensor(scales, dtype=dtype)  # straight from Python floats: no float32 rounding
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f'{name}: expected a number or a sequence of {channels} numbers, '
                            f'got {scales!r}') from None
    if scales.numel() not in (1, channels):
        raise ValueError(f'{name}: expected one value or {channels} (one per channel), got {scales.numel()}')
    scales = scales.to(device=device, dtype=dtype)
    return scales.view(1, -1, 1, 1) if scales.dim() > 0 else scales


def _compute_dtype(dtype: torch.dtype, scales: Any) -> torch.dtype:
    """Features are computed in float32, or wider when the output or a tensor of scales is wider (float64),
    and rounded to the output dtype once: exact float64 features, one rounding for float16/bfloat16."""
    compute = torch.promote_types(dtype, torch.float32)
    if isinstance(scales, Tensor) and scales.is_floating_point():
        compute = torch.promote_types(compute, scales.dtype)
    return compute


def create_position_feats(shape: Sequence[int], scales: Any = None, bs: int = 1,
                          device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Pixel coordinates as features: channel 0 is the row index, channel 1 the column index.

    Args:
        shape: spatial size (H, W).
        scales: optional divisor, a scalar or one value per channel (list or tensor).
        bs: batch size (the grid is repeated).
        device: device of the result.
        dtype: floating dtype of the result; by default float32, or the dtype of a wider tensor ``scales``.
            The division is done in float32 or wider and rounded to ``dtype`` once.

    Shape:
        Output: (bs, 2, H, W).

    Example:
        >>> create_position_feats((2, 3), scales=2.0)[0, 1]
        tensor([[0.0000, 0.5000, 1.0000],
                [0.0000, 0.5000, 1.0000]])
    """
    if dtype is None:
        dtype = _compute_dtype(torch.float32, scales)
    elif not dtype.is_floating_point:
        raise TypeError(f'dtype: expected a floating-point dtype, got {dtype}')
    compute = _compute_dtype(dtype, scales)
    axes = [torch.arange(n, dtype=compute, device=device) for n in shape]
    feats = torch.stack(torch.meshgrid(*axes, indexing='ij'), dim=0).unsqueeze(0)
    if scales is not None:
        feats = feats / _scale_tensor('scales', scales, len(shape), device, compute)
    return feats.to(dtype).expand(bs, *feats.shape[1:]).contiguous()


def create_YXRGB(img: Tensor, yx_scale: Any = None, rgb_scale: Any = None, scales: Any = None) -> Tensor:
    """Concatenate (row, column) / ``yx_scale`` and ``img`` / ``rgb_scale``: bilateral edge features.

    Args:
        img: image (..., C, H, W); leading dims are flattened into the batch. C is usually 3.
        yx_scale: position bandwidth, scalar or (2,).
        rgb_scale: colour bandwidth, scalar or (C,).
        scales: alternative to the two above: ``scales[:2]`` for position, ``scales[2:]`` for colour.

    Shape:
        Output: (B, 2 + C, H, W), in ``img``'s dtype (float32 for an integer image). The divisions are done
        in float32 or wider and rounded once, so a float64 image gets exact float64 features.

    Example:
        >>> feats = create_YXRGB(torch.rand(1, 3, 64, 64) * 255, yx_scale=80.0, rgb_scale=13.0)
        >>> feats.shape
        torch.Size([1, 5, 64, 64])
    """
    if not isinstance(img, Tensor):
        raise TypeError(f'img: expected a tensor of shape (..., C, H, W), got {type(img).__name__}')
    if img.dim() < 3:
        raise ValueError(f'img: expected a tensor of shape (..., C, H, W), got shape {tuple(img.shape)}')
    if scales is not None:
        if yx_scale is not None or rgb_scale is not None:
            raise ValueError('scales: give either scales or yx_scale/rgb_scale, not both')
        yx_scale, rgb_scale = scales[:2], scales[2:]
    img = img.reshape(-1, *img.shape[-3:])
    dtype = img.dtype if img.is_floating_point() else torch.float32
    if yx_scale is not None:
        yx_scale = _scale_tensor('yx_scale', yx_scale, 2, img.device, _compute_dtype(dtype, yx_scale))
    yx = create_position_feats(img.shape[-2:], yx_scale, img.shape[0], img.device, dtype)
    if rgb_scale is not None:
        compute = _compute_dtype(dtype, rgb_scale)
        img = img.to(compute) / _scale_tensor('rgb_scale', rgb_scale, img.shape[1], img.device, compute)
    return torch.cat([yx, img.to(dtype)], dim=1)


# ------------------------------------------------------------------------------------------------
# Blur (multi-resolution messages)
# ------------------------------------------------------------------------------------------------

def _ceil_pad_factor(sizes: Sequence[int], factor: int) -> Tuple[int, ...]:
    """Padding per dim so that avg-pooling with kernel = stride = ``factor`` gives ceil(size / factor)."""
    return tuple(((factor - size % factor) % factor + 1) // 2 for size in sizes)


def _blur_down(x: Tensor, factor: int) -> Tensor:
    """Average-pool by ``factor`` with centred ceil padding; padded pixels do not count."""
    if factor == 1:
        return x
    return F.avg_pool2d(x, factor, factor, padding=_ceil_pad_factor(x.shape[-2:], factor),
                        count_include_pad=False)


def _blur_up(msg: Tensor, factor: int, size: Sequence[int]) -> Tensor:
    """Inverse of :func:`_blur_down`: bilinear upsampling by ``factor``, then crop the padding."""
    if factor == 1:
        return msg
    pad_h, pad_w = _ceil_pad_factor(size, factor)
    msg = F.interpolate(msg, scale_factor=factor, mode='bilinear', align_corners=False)
    return msg[..., pad_h:pad_h + size[0], pad_w:pad_w + size[1]]


def _blurred_size(size: Sequence[int], factor: int) -> Tuple[int, ...]:
    return tuple(-(-n // factor) for n in size)


# ------------------------------------------------------------------------------------------------
# Validation helpers
# ------------------------------------------------------------------------------------------------

def _check_positive_int(name: str, value: Any, odd: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (odd and value % 2 == 0):
        raise ValueError(f'{name}: expected a positive {"odd " if odd else ""}int, got {value!r}')


def _as_weight(name: str, value: Any) -> float:
    """A real number as float; TypeError naming ``name`` otherwise (bools and strings are refused)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{name}: expected a real number, got {value!r}')
    return float(value)


def _check_final_output(final_output: Any) -> None:
    if final_output not in FINAL_OUTPUTS:
        raise ValueError(f'Unknown value for final_output: {final_output!r}; expected one of {FINAL_OUTPUTS}')


def _check_unary(unary: Any, channels: int) -> None:
    _check_4d('unary', unary)
    if unary.shape[1] != channels:
        raise ValueError(f'unary: expected shape (B, {channels}, H, W) for a CRF with {channels} classes, '
                         f'got {tuple(unary.shape)}')


def _check_guide(name: str, guide: Any, like: Tensor, what: str = 'the unary') -> None:
    """A 4-D guide (edge features, an image) with the batch size and spatial size of ``like``."""
    _check_4d(name, guide)
    expected = (like.shape[0], like.shape[2], like.shape[3])
    if (guide.shape[0], guide.shape[2], guide.shape[3]) != expected:
        raise ValueError(f'{name}: expected shape ({expected[0]}, F, {expected[1]}, {expected[2]}) to match '
                         f'{what}, got {tuple(guide.shape)}')


def _init_settings(crf: nn.Module, channels: int, num_steps: int, final_output: str, perturbed_init: bool,
                   fixed_weighting: bool, checkpoint_steps: bool) -> None:
    """Validate and store the settings shared by PacCRF and PacCRFLoose."""
    _check_positive_int('channels', channels)
    _check_positive_int('num_steps', num_steps)
    _check_final_output(final_output)
    crf.channels, crf.num_steps, crf.final_output = channels, num_steps, final_output
    crf.perturbed_init, crf.fixed_weighting, crf.checkpoint_steps = perturbed_init, fixed_weighting, checkpoint_steps


def _apply_final_output(logQ: Tensor, final_output: str) -> Tensor:
    _check_final_output(final_output)
    if final_output == 'softmax':
        return F.softmax(logQ, dim=1)
    if final_output == 'log_softmax':
        return F.log_softmax(logQ, dim=1)
    return logQ


def _as_kernel_list(pairwise_kernels: Any) -> List[Dict[str, Any]]:
    if pairwise_kernels is None:
        return []
    if isinstance(pairwise_kernels, dict):
        return [pairwise_kernels]
    if isinstance(pairwise_kernels, (list, tuple)) and all(isinstance(k, dict) for k in pairwise_kernels):
        return list(pairwise_kernels)
    raise TypeError(f'pairwise_kernels: expected a dict or a list of dicts of add_pairwise_kernel '
                    f'arguments, got {pairwise_kernels!r}')


def _crf_extra_repr(channels: int, num_steps: int, final_output: str, perturbed_init: bool,
                    fixed_weighting: bool, pairwise_repr: Sequence[str], checkpoint_steps: bool) -> str:
    s = f'categories={channels}, num_steps={num_steps}, final_output={final_output}'
    if perturbed_init:
        s += ', perturbed_init=True'
    if fixed_weighting:
        s += ', fixed_weighting=True'
    if checkpoint_steps:
        s += ', checkpoint_steps=True'
    return s + ', pairwise_kernels=(' + ', '.join(pairwise_repr) + ')'


# ------------------------------------------------------------------------------------------------
# CRFs
# ------------------------------------------------------------------------------------------------

class PairwiseKernelSpec(NamedTuple):
    """What a :class:`PacCRF` keeps about one pairwise kernel besides its modules.

    The kernel's modules live in ``messengers[i]``, ``compat[i]`` and ``pairwise_weights[i]`` (the
    2019 state_dict layout); everything else about kernel ``i`` is ``kernel_specs[i]``.
    """

    kernel_size: int
    dilation: int
    blur: int
    compat_type: str
    spatial_filter: bool
    init_weight: float  # the stored pairwise weight at init (negated for 'potts')
    learn_weight: bool  # forward uses the parameter pairwise_weights[i] instead of init_weight

    @property
    def adaptive(self) -> bool:
        """True when the message is a PacConv2d guided by edge features ('na' is a plain convolution)."""
        return self.compat_type != 'na'

    def __str__(self) -> str:
        type_repr = '0d' if self.compat_type == 'potts' else self.compat_type
        return f'{type_repr}{"s" if self.spatial_filter else ""}_{self.kernel_size}_{self.dilation}_{self.blur}'


class PacCRF(nn.Module):
    r"""Mean-field CRF with pixel-adaptive messages; all steps share their parameters.

    Args:
        channels: number of classes C.
        num_steps: number of mean-field iterations.
        final_output: ``'log_Q'`` (the last logits, default), ``'log_softmax'`` or ``'softmax'``.
        perturbed_init: add U(-5e-4, 5e-4) noise to the initial messenger / compat weights.
        native_impl: use pac.py's plain-autograd path instead of the memory-lean default.
        fixed_weighting: keep ``unary_weight`` and every pairwise weight constant (no parameters used).
        unary_weight: initial weight of the unary term.
        pairwise_kernels: a dict, or a list of dicts, of :meth:`add_pairwise_kernel` arguments.
        checkpoint_steps: recompute each mean-field step in backward (``torch.utils.checkpoint``), so
            training memory does not grow with ``num_steps``. Same values and gradients.

    Shape:
        - unary: (B, C, H, W) logits.
        - edge_feat: (B, F, H, W), or a sequence with one such tensor per kernel (None for 'na').
        - edge_kernel (optional, instead of edge_feat): (B, 1, k, k, H_b, W_b) with H_b = ceil(H / blur),
          or a sequence with one per kernel (None for 'na').
        - Output: (B, C, H, W).

    Example:
        >>> crf = PacCRF(21, num_steps=5, pairwise_kernels=[
        ...     dict(kernel_size=5, dilation=1, compat_type='4d'),
        ...     dict(kernel_size=5, dilation=4, compat_type='4d')])
        >>> img = torch.rand(2, 3, 64, 64) * 255
        >>> out = crf(torch.randn(2, 21, 64, 64), create_YXRGB(img, yx_scale=100.0, rgb_scale=30.0))
        >>> out.shape
        torch.Size([2, 21, 64, 64])
    """

    def __init__(self, channels: int, num_steps: int, final_output: str = 'log_Q', perturbed_init: bool = True,
                 native_impl: bool = False, fixed_weighting: bool = False, unary_weight: float = 1.0,
                 pairwise_kernels: Union[Dict[str, Any], Sequence[Dict[str, Any]], None] = None, *,
                 checkpoint_steps: bool = False) -> None:
        super().__init__()
        _init_settings(self, channels, num_steps, final_output, perturbed_init, fixed_weighting, checkpoint_steps)
        self.native_impl = native_impl
        self.init_unary_weight = _as_weight('unary_weight', unary_weight)
        if fixed_weighting:
            self.unary_weight = self.init_unary_weight
        else:
            self.unary_weight = nn.Parameter(torch.tensor(self.init_unary_weight))
        # modules of kernel i (registered in this order: the 2019 state_dict layout), then its spec
        self.messengers = nn.ModuleList()
        self.compat = nn.ModuleList()
        self.pairwise_weights = nn.ParameterList()
        self.kernel_specs: List[PairwiseKernelSpec] = []
        for kernel_args in _as_kernel_list(pairwise_kernels):
            self.add_pairwise_kernel(**kernel_args)

    # Read-only views kept for code written against the 2019 attributes.
    @property
    def blur(self) -> List[int]:
        return [spec.blur for spec in self.kernel_specs]

    @property
    def pairwise_repr(self) -> List[str]:
        return [str(spec) for spec in self.kernel_specs]

    @property
    def init_pairwise_weights(self) -> List[float]:
        return [spec.init_weight for spec in self.kernel_specs]

    @property
    def _use_pairwise_weights(self) -> List[bool]:
        return [spec.learn_weight for spec in self.kernel_specs]

    def add_pairwise_kernel(self, kernel_size: int = 3, dilation: int = 1, blur: int = 1,
                            compat_type: str = '4d', spatial_filter: bool = True,
                            pairwise_weight: float = 1.0) -> None:
        """Append a pairwise kernel (see the module docstring for the compat types).

        Args:
            kernel_size: odd window size k of the messenger.
            dilation: dilation of the window; the padding is (k // 2) * dilation ("same" size).
            blur: run this kernel at 1 / blur resolution.
            compat_type: 'potts', '2d', '4d' or 'na'.
            spatial_filter: for 'potts' / '2d': learn a Gaussian-initialised shared spatial filter (True)
                or use a fixed window of ones with a zero centre (False). Ignored by '4d' and 'na'.
            pairwise_weight: weight w of the message. Negated for 'potts'. It is a learnt parameter only
                for 'potts' with spatial_filter=False and fixed_weighting=False; otherwise it stays a
                constant (the parameter ``pairwise_weights.{i}`` exists but is unused).
        """
        _check_positive_int('kernel_size', kernel_size, odd=True)
        _check_positive_int('dilation', dilation)
        _check_positive_int('blur', blur)
        if compat_type not in COMPAT_TYPES:
            raise ValueError(f'compat_type: expected one of {COMPAT_TYPES}, got {compat_type!r}')
        channels, padding = self.channels, (kernel_size // 2) * dilation
        if compat_type == 'na':
            messenger = nn.Conv2d(channels, channels, kernel_size, padding=padding, dilation=dilation, bias=False)
        else:
            shared = compat_type != '4d'
            filler = 'crf_pool' if shared and not spatial_filter else \
                ('crf_perturbed' if self.perturbed_init else 'crf')
            messenger = PacConv2d(channels, channels, kernel_size, padding=padding, dilation=dilation, bias=False,
                                  shared_filters=shared, filler=filler, native_impl=self.native_impl)
        weight = _as_weight('pairwise_weight', pairwise_weight)
        spec = PairwiseKernelSpec(
            kernel_size, dilation, blur, compat_type, spatial_filter,
            init_weight=-weight if compat_type == 'potts' else weight,
            learn_weight=compat_type == 'potts' and not spatial_filter and not self.fixed_weighting)
        self.messengers.append(messenger)
        self.compat.append(nn.Conv2d(channels, channels, 1, bias=False) if compat_type == '2d' else None)
        self.pairwise_weights.append(nn.Parameter(torch.tensor(spec.init_weight)))
        self.kernel_specs.append(spec)
        self.reset_parameters(pairwise_idx=-1)

    def num_pairwise_kernels(self) -> int:
        return len(self.messengers)

    def reset_parameters(self, pairwise_idx: Optional[int] = None) -> None:
        """Re-initialise every kernel and the unary weight (None), or only kernel ``pairwise_idx``."""
        if pairwise_idx is None:
            indices = range(self.num_pairwise_kernels())
            if not self.fixed_weighting:
                with torch.no_grad():
                    self.unary_weight.fill_(self.init_unary_weight)
        else:
            indices = [range(self.num_pairwise_kernels())[pairwise_idx]]
        with torch.no_grad():
            for i in indices:
                self.messengers[i].reset_parameters()
                if self.compat[i] is not None:
                    weight = self.compat[i].weight
                    weight.zero_()
                    weight[:, :, 0, 0] = 1 - torch.eye(self.channels, dtype=weight.dtype, device=weight.device)
                    if self.perturbed_init:
                        weight.add_(torch.empty_like(weight).uniform_(-_COMPAT_PERTURBATION, _COMPAT_PERTURBATION))
                self.pairwise_weights[i].fill_(self.kernel_specs[i].init_weight)

    def extra_repr(self) -> str:
        return _crf_extra_repr(self.channels, self.num_steps, self.final_output, self.perturbed_init,
                               self.fixed_weighting, self.pairwise_repr, self.checkpoint_steps)

    def compute_edge_kernels(self, unary: Tensor, edge_feat: EdgeFeat,
                             edge_kernel: EdgeKernel = None) -> List[Optional[Tensor]]:
        """Adaptive kernels K_i of every kernel (None for 'na'), from the guide or checked if given.

        The guide of the messengers is ``edge_feat``: one tensor shared by all kernels, or a sequence with
        one per kernel. ``edge_kernel`` (one tensor reused by every kernel or a sequence with one per kernel)
        replaces it when given.

        Shape:
            - unary: (B, C, H, W).
            - edge_feat: (B, F, H, W), or a sequence of those (None for 'na').
            - edge_kernel: (B, 1, k, k, H_b, W_b) with H_b = ceil(H / blur), or a sequence of those.
            - Output: a list with one (B, 1, k, k, H_b, W_b) kernel per pairwise kernel (None for 'na').
        """
        _check_unary(unary, self.channels)
        n = self.num_pairwise_kernels()
        if edge_kernel is not None:
            if not isinstance(edge_kernel, (Tensor, list, tuple)):
                raise TypeError(f'edge_kernel: expected a Tensor (B, 1, kh, kw, H_b, W_b) or a list of {n}, '
                                f'got {type(edge_kernel).__name__}')
            kernels = [edge_kernel] * n if isinstance(edge_kernel, Tensor) else list(edge_kernel)
            if len(kernels) != n:
                raise ValueError(f'edge_kernel: expected {n} kernels (one per pairwise kernel), got {len(kernels)}')
            return [self._check_edge_kernel(i, kernel, unary) if spec.adaptive else None
                    for i, (spec, kernel) in enumerate(zip(self.kernel_specs, kernels))]
        guide = edge_feat
        shared = isinstance(guide, Tensor)
        if shared:
            _check_guide('edge_feat', guide, unary)
        elif isinstance(guide, (list, tuple)):
            if len(guide) != n:
                raise ValueError(f'edge_feat: expected {n} feature tensors (one per pairwise kernel), '
                                 f'got {len(guide)}')
        elif any(spec.adaptive for spec in self.kernel_specs):
            raise TypeError(f'edge_feat: expected a Tensor (B, F, H, W) or a list of {n}, '
                            f'got {type(guide).__name__}')
        pooled_guides: Dict[int, Tensor] = {}
        kernels: List[Optional[Tensor]] = []
        for i, (spec, messenger) in enumerate(zip(self.kernel_specs, self.messengers)):
            if not spec.adaptive:
                kernels.append(None)
                continue
            if shared:
                if spec.blur not in pooled_guides:
                    pooled_guides[spec.blur] = _blur_down(guide, spec.blur)
                kernel_guide = pooled_guides[spec.blur]
            else:
                _check_guide(f'edge_feat[{i}]', guide[i], unary)
                kernel_guide = _blur_down(guide[i], spec.blur)
            kernels.append(messenger.compute_kernel(kernel_guide)[0])
        return kernels

    def _check_edge_kernel(self, i: int, kernel: Any, unary: Tensor) -> Tensor:
        spec = self.kernel_specs[i]
        size = _blurred_size(unary.shape[-2:], spec.blur)
        expected = (unary.shape[0], 1, spec.kernel_size, spec.kernel_size, *size)
        if not isinstance(kernel, Tensor) or tuple(kernel.shape) != expected:
            got = tuple(kernel.shape) if isinstance(kernel, Tensor) else type(kernel).__name__
            raise ValueError(f'edge_kernel[{i}]: expected shape {expected} (B, 1, kh, kw, H_b, W_b) for kernel '
                             f'{spec}, got {got}')
        return kernel

    def _pairwise_weight(self, i: int) -> Union[Tensor, float]:
        spec = self.kernel_specs[i]
        return self.pairwise_weights[i] if spec.learn_weight else spec.init_weight

    def _mean_field_step(self, unary: Tensor, logQ: Tensor, kernels: List[Optional[Tensor]]) -> Tensor:
        """One mean-field update: the new logits from the unary and the messages of softmax(logQ)."""
        Q = F.softmax(logQ, dim=1)
        new_logQ = unary * self.unary_weight
        pooled_Q: Dict[int, Tensor] = {}
        for i, (spec, messenger) in enumerate(zip(self.kernel_specs, self.messengers)):
            blur = spec.blur
            if blur not in pooled_Q:
                pooled_Q[blur] = _blur_down(Q, blur)
            msg = messenger(pooled_Q[blur], None, kernels[i]) if kernels[i] is not None else messenger(pooled_Q[blur])
            if self.compat[i] is not None:
                msg = self.compat[i](msg)
            msg = _blur_up(msg, blur, Q.shape[-2:])
            new_logQ = new_logQ - self._pairwise_weight(i) * msg
        return new_logQ

    def _step(self, unary: Tensor, logQ: Tensor, kernels: List[Optional[Tensor]]) -> Tensor:
        if self.checkpoint_steps and torch.is_grad_enabled():
            return checkpoint(self._mean_field_step, unary, logQ, kernels, use_reentrant=False)
        return self._mean_field_step(unary, logQ, kernels)

    def forward(self, unary: Tensor, edge_feat: EdgeFeat, edge_kernel: EdgeKernel = None,
                logQ: Optional[Tensor] = None) -> Tensor:
        """Run ``num_steps`` mean-field steps from ``logQ`` (default: the unary).

        Args:
            unary: the class scores (logits).
            edge_feat: the guide of the adaptive messages (edge features, e.g. from :func:`create_YXRGB`):
                one tensor for all kernels, or a sequence with one per kernel (None for 'na').
            edge_kernel: precomputed adaptive kernels used instead of ``edge_feat`` (pass ``edge_feat=None``):
                one tensor for all kernels, or a sequence with one per kernel.
            logQ: the logits the iterations start from.

        Shape:
            - unary: (B, C, H, W).
            - edge_feat: (B, F, H, W), or a sequence of those.
            - edge_kernel: (B, 1, k, k, H_b, W_b) with H_b = ceil(H / blur), or a sequence of those.
            - logQ: (B, C, H, W).
            - Output: (B, C, H, W), ``final_output`` of the last step.
        """
        _check_final_output(self.final_output)
        kernels = self.compute_edge_kernels(unary, edge_feat, edge_kernel)
        if logQ is None:
            logQ = unary
        elif not isinstance(logQ, Tensor) or logQ.shape != unary.shape:
            raise ValueError(f'logQ: expected the shape of the unary {tuple(unary.shape)}, got '
                             f'{tuple(logQ.shape) if isinstance(logQ, Tensor) else type(logQ).__name__}')
        for _ in range(self.num_steps):
            logQ = self._step(unary, logQ, kernels)
        return _apply_final_output(logQ, self.final_output)


class PacCRFLoose(nn.Module):
    """PAC-CRF whose mean-field steps each have their own parameters ("loose" / unrolled CRF).

    Holds ``steps``, ``num_steps`` one-step :class:`PacCRF` with the same kernel configuration (state_dict
    keys ``steps.{s}.*``). Arguments, shapes and the learnable-weight rules are those of :class:`PacCRF`;
    unlike the 2019 code, 'na' kernels work here too. With identical parameters in every step it equals
    :class:`PacCRF`.

    Example:
        >>> crf = PacCRFLoose(21, num_steps=3, pairwise_kernels=dict(kernel_size=5, compat_type='4d'))
        >>> feats = create_YXRGB(torch.rand(1, 3, 32, 32) * 255, 100.0, 30.0)
        >>> crf(torch.randn(1, 21, 32, 32), feats).shape
        torch.Size([1, 21, 32, 32])
    """

    def __init__(self, channels: int, num_steps: int, final_output: str = 'log_Q', perturbed_init: bool = True,
                 native_impl: bool = False, fixed_weighting: bool = False, unary_weight: float = 1.0,
                 pairwise_kernels: Union[Dict[str, Any], Sequence[Dict[str, Any]], None] = None, *,
                 checkpoint_steps: bool = False) -> None:
        super().__init__()
        _init_settings(self, channels, num_steps, final_output, perturbed_init, fixed_weighting, checkpoint_steps)
        self.steps = nn.ModuleList(
            PacCRF(channels, 1, 'log_Q', perturbed_init, native_impl, fixed_weighting, unary_weight,
                   pairwise_kernels, checkpoint_steps=checkpoint_steps)
            for _ in range(num_steps))

    def add_pairwise_kernel(self, **kwargs: Any) -> None:
        """Add the same kernel to every step (arguments of :meth:`PacCRF.add_pairwise_kernel`)."""
        for step in self.steps:
            step.add_pairwise_kernel(**kwargs)

    def num_pairwise_kernels(self) -> int:
        return self.steps[0].num_pairwise_kernels()

    def reset_parameters(self) -> None:
        for step in self.steps:
            step.reset_parameters()

    def extra_repr(self) -> str:
        return _crf_extra_repr(self.channels, self.num_steps, self.final_output, self.perturbed_init,
                               self.fixed_weighting, self.steps[0].pairwise_repr, self.checkpoint_steps)

    def forward(self, unary: Tensor, edge_feat: EdgeFeat, edge_kernel: EdgeKernel = None) -> Tensor:
        """Run each step once, from the unary; the kernels are computed once, with step 0's messengers.

        Args and Shape as :meth:`PacCRF.forward` (without ``logQ``):

        Shape:
            - unary: (B, C, H, W).
            - edge_feat: (B, F, H, W), or a sequence with one per kernel.
            - edge_kernel: (B, 1, k, k, H_b, W_b), or a sequence with one per kernel.
            - Output: (B, C, H, W).
        """
        _check_final_output(self.final_output)
        kernels = self.steps[0].compute_edge_kernels(unary, edge_feat, edge_kernel)
        logQ = unary
        for step in self.steps:
            logQ = step(unary, None, kernels, logQ)
        return _apply_final_output(logQ, self.final_output)


class DenseCRF(nn.Module):
    r"""Preset mirroring the fully-connected DenseCRF of Kraehenbuehl & Koltun (2011), on a window.

    Two Potts kernels with fixed windows (``spatial_filter=False``, learnable weights):

    - appearance: ``w_a * exp(-|p_i - p_j|^2 / (2 theta_alpha^2) - |I_i - I_j|^2 / (2 theta_beta^2))`` on
      :func:`create_YXRGB` features, in a ``kernel_size`` window with ``dilation`` at 1/``blur`` resolution
      (it reaches (kernel_size // 2) * dilation * blur pixels; a theta_alpha far beyond that only flattens it);
    - smoothness: ``w_s * exp(-|p_i - p_j|^2 / (2 theta_gamma^2))`` on position features, in a
      ``smoothness_kernel_size`` window at full resolution.

    It holds a :class:`PacCRF` as ``crf`` (state_dict keys ``crf.*``), and feeds it the edge features of
    the image. Weights are the logit bonus a pixel receives when every tap of the window agrees with it and K = 1:
    the stored Potts weight is ``-w / (k^2 - 1)`` (the message is a sum over the k^2 - 1 neighbours), so
    the same ``w`` means the same strength for any window. ``image`` is expected on the 0-255 scale for
    the default ``color_scale`` (theta_beta = 13). The defaults were chosen on synthetic scenes (flat
    colour regions, thin stripes, noisy logits); for real data, tune or train the weights.

    Args:
        num_classes: number of classes C.
        num_steps: mean-field iterations.
        appearance_weight: w_a.
        smoothness_weight: w_s.
        position_scale: theta_alpha, in pixels.
        color_scale: theta_beta, in image units.
        smoothness_scale: theta_gamma, in pixels.
        kernel_size: window of the appearance kernel.
        dilation: dilation of the appearance window.
        blur: resolution divisor of the appearance kernel (> 1 is faster but blurs thin structures).
        smoothness_kernel_size: window of the smoothness kernel (full resolution, dilation 1).
        final_output, unary_weight, native_impl, checkpoint_steps: as in :class:`PacCRF`.

    Shape:
        - unary: (B, C, H, W) logits.
        - image: (B, 3, H, W) (any channel count works).
        - Output: (B, C, H, W).

    Example:
        >>> crf = DenseCRF(21, final_output='softmax')
        >>> probs = crf(torch.randn(1, 21, 64, 64), torch.rand(1, 3, 64, 64) * 255)
        >>> probs.shape
        torch.Size([1, 21, 64, 64])
    """

    def __init__(self, num_classes: int, num_steps: int = 5, appearance_weight: float = 10.0,
                 smoothness_weight: float = 3.0, position_scale: float = 20.0, color_scale: float = 13.0,
                 smoothness_scale: float = 3.0, kernel_size: int = 11, dilation: int = 2, blur: int = 1,
                 smoothness_kernel_size: int = 5, final_output: str = 'log_Q', unary_weight: float = 1.0,
                 native_impl: bool = False, checkpoint_steps: bool = False) -> None:
        for name, value in (('position_scale', position_scale), ('color_scale', color_scale),
                            ('smoothness_scale', smoothness_scale)):
            if not value > 0:
                raise ValueError(f'{name}: expected a positive bandwidth, got {value!r}')
        for name, value in (('kernel_size', kernel_size), ('smoothness_kernel_size', smoothness_kernel_size)):
            _check_positive_int(name, value, odd=True)
            if value == 1:
                raise ValueError(f'{name}: expected an odd int >= 3 (a 1x1 window has no neighbours), got 1')
        super().__init__()
        self.crf = PacCRF(num_classes, num_steps, final_output, perturbed_init=False, native_impl=native_impl,
                          unary_weight=unary_weight, checkpoint_steps=checkpoint_steps, pairwise_kernels=[
                              dict(kernel_size=kernel_size, dilation=dilation, blur=blur, compat_type='potts',
                                   spatial_filter=False, pairwise_weight=appearance_weight / (kernel_size ** 2 - 1)),
                              dict(kernel_size=smoothness_kernel_size, dilation=1, blur=1, compat_type='potts',
                                   spatial_filter=False,
                                   pairwise_weight=smoothness_weight / (smoothness_kernel_size ** 2 - 1))])
        self.position_scale = float(position_scale)
        self.color_scale = float(color_scale)
        self.smoothness_scale = float(smoothness_scale)

    def edge_features(self, image: Tensor) -> List[Tensor]:
        """[appearance features (B, 2 + C, H, W), smoothness features (B, 2, H, W)] of ``image``."""
        _check_4d('image', image)
        appearance = create_YXRGB(image, yx_scale=self.position_scale, rgb_scale=self.color_scale)
        smoothness = create_position_feats(image.shape[-2:], self.smoothness_scale, image.shape[0],
                                           image.device, image.dtype)
        return [appearance, smoothness]

    def extra_repr(self) -> str:
        return (f'position_scale={self.position_scale}, color_scale={self.color_scale}, '
                f'smoothness_scale={self.smoothness_scale}')

    def forward(self, unary: Tensor, image: Tensor, logQ: Optional[Tensor] = None) -> Tensor:
        """Run the CRF on ``unary`` with the edge features of ``image``.

        Shape:
            - unary: (B, C, H, W) logits.
            - image: (B, 3, H, W) (any channel count works), on the 0-255 scale for the default
              ``color_scale``.
            - logQ: (B, C, H, W), the logits the iterations start from (default: the unary).
            - Output: (B, C, H, W), the CRF's ``final_output``.
        """
        _check_unary(unary, self.crf.channels)
        _check_guide('image', image, unary)
        return self.crf(unary, self.edge_features(image), None, logQ)


@torch.no_grad()
def crf_refine(logits: Tensor, images: Tensor, crf: Optional[DenseCRF] = None, chunk_size: int = 1,
               progress: bool = False, **dense_crf_kwargs: Any) -> Tensor:
    """Refine a batch of segmentation logits with a (by default untrained) :class:`DenseCRF`.

    Inference only (no grad), ``chunk_size`` images at a time to bound memory; works on CPU.

    Args:
        logits: (B, C, H, W) class scores (e.g. a network's output, upsampled to the image size).
        images: (B, 3, H, W) images, on the 0-255 scale for the default ``color_scale``.
        crf: a DenseCRF to use (on the device and dtype of ``logits``); built from ``dense_crf_kwargs``
            when None, with ``final_output='softmax'`` unless given.
        chunk_size: images per forward pass.
        progress: show a tqdm bar over the chunks.
        **dense_crf_kwargs: arguments of :class:`DenseCRF` (not allowed together with ``crf``).

    Returns:
        (B, C, H, W): refined probabilities by default, or the CRF's ``final_output``.

    Example:
        >>> probs = crf_refine(torch.randn(2, 21, 64, 64), torch.rand(2, 3, 64, 64) * 255)
        >>> labels = probs.argmax(1)
    """
    _check_4d('logits', logits)
    _check_guide('images', images, logits, what='the logits')
    _check_positive_int('chunk_size', chunk_size)
    if crf is None:
        dense_crf_kwargs.setdefault('final_output', 'softmax')
        crf = DenseCRF(logits.shape[1], **dense_crf_kwargs).to(device=logits.device, dtype=logits.dtype)
    elif dense_crf_kwargs:
        raise TypeError(f'dense_crf_kwargs: not allowed together with crf, got {sorted(dense_crf_kwargs)}')
    images = images.to(logits.dtype)
    chunks = range(0, logits.shape[0], chunk_size)
    return torch.cat([crf(logits[s:s + chunk_size], images[s:s + chunk_size])
                      for s in tqdm(chunks, desc='crf_refine', disable=not progress)])
