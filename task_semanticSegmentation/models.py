"""Segmentation models and the model-name grammar of the PAC paper's experiments.

``create_model(model_name, num_classes)`` builds a model from a name such as
``fcn8s_crfi5p4d5641p4d5161`` (see :data:`GRAMMAR`). The classes keep the state_dict keys of the
released weights: backbones hold the 39 FCN-8s keys directly; :class:`ModelWithCrf` holds
``backbone.*``, ``crf.*`` and ``feat_scales.*``.
"""
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import paccrf
from . import fcn8s

__all__ = ['FCN8s', 'FCN8sAltPad', 'FCN8sPac', 'TinyFCN', 'ModelWithCrf', 'ModelWithConvCrf',
           'PairwiseSpec', 'ModelSpec', 'parse_model_name', 'create_model', 'crop_top_left',
           'trainable_parameters', 'GRAMMAR', 'BACKBONES']

GRAMMAR = """\
model name grammar:
  <backbone>                 a plain backbone
  <backbone>[frozen]_<crf>   a backbone followed by a CRF ('frozen': backbone parameters not trained)
  <backbone> := fcn8s | fcn8saltpad | fcn8spac | tinyfcn (tinyfcn: small demo-only net)
  <crf>      := convcrf | convcrfv1
              | crf[v7][i<steps>[l]][p<pairwise>]...   (l: loose, one set of weights per step;
                                                        default 5 steps; default pairwise p4d5161)
  <pairwise> := <type>[s]<kernel_size:1 digit><dilation:digits><blur:1 digit>
                type 4d | 2d | 0d (potts) | na (plain conv); 's': spatial filter
examples: fcn8s, fcn8s_crfi5p4d5641p4d5161, fcn8sfrozen_crfi5lp4d5641p4d5161, fcn8spac_crf,
          fcn8s_crfi3p2ds5111p0d3111p0ds3112, fcn8s_convcrf"""

EDGE_FEATURE_SCALE = 30.0  # initial scale of the (mean-subtracted, 0-255) BGR edge features


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')


def _check_backbone(backbone) -> None:
    if not isinstance(backbone, nn.Module) or not isinstance(getattr(backbone, 'num_classes', None), int):
        raise TypeError(f'backbone must be an nn.Module with an int num_classes attribute, got '
                        f'{type(backbone).__name__}')


def _check_out_crop(out_crop: Optional[Sequence[int]], size: Sequence[int]) -> None:
    if out_crop is None:
        return
    if len(out_crop) != 2 or not all(0 < int(n) <= limit for n, limit in zip(out_crop, size)):
        raise ValueError(f'out_crop: expected (h, w) with 0 < h, w <= the input size {tuple(size)}, '
                         f'got {tuple(out_crop)}')


def crop_top_left(x: torch.Tensor, out_crop: Optional[Sequence[int]]) -> torch.Tensor:
    """Return the top-left ``out_crop`` = (h, w) window of ``x`` (B, C, H, W); ``None`` keeps ``x``."""
    _check_out_crop(out_crop, x.shape[-2:])
    if out_crop is None or tuple(out_crop) == tuple(x.shape[-2:]):
        return x
    return x[..., :int(out_crop[0]), :int(out_crop[1])]


def _check_image_batch(model: nn.Module, x: torch.Tensor, out_crop: Optional[Sequence[int]]) -> None:
    """ValueError naming the argument unless x is (B, 3, H, W) and out_crop fits inside it."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'{type(model).__name__} expects x of shape (B, 3, H, W), got {got}')
    _check_out_crop(out_crop, x.shape[-2:])


class _SegmentationBackbone:
    """Mixin giving a backbone ``num_classes`` and ``forward(x, out_crop=None)``."""

    def forward(self, x: torch.Tensor, out_crop: Optional[Sequence[int]] = None) -> torch.Tensor:
        _check_image_batch(self, x, out_crop)
        out = super().forward(x)
        if out.shape[-2:] != x.shape[-2:]:  # cannot happen for valid sizes; keeps the contract explicit
            raise RuntimeError(f'output size {tuple(out.shape[-2:])} != input size {tuple(x.shape[-2:])}')
        return crop_top_left(out, out_crop)


class FCN8s(_SegmentationBackbone, fcn8s.FCN8s):
    """:class:`fcn8s.FCN8s` with ``num_classes`` and ``forward(x, out_crop=None)`` (top-left crop).

    Example:
        >>> net = FCN8s(num_classes=21)
        >>> net(torch.zeros(1, 3, 50, 60), out_crop=(40, 60)).shape
        torch.Size([1, 21, 40, 60])
    """

    def __init__(self, num_classes: int = 21):
        _check_positive_int('num_classes', num_classes)
        super().__init__(num_classes)
        self.num_classes = num_classes


class FCN8sAltPad(_SegmentationBackbone, fcn8s.FCN8sAltPad):
    """:class:`fcn8s.FCN8sAltPad` with ``forward(x, out_crop=None)``; H, W multiples of 32."""

    def __init__(self, num_classes: int = 21):
        _check_positive_int('num_classes', num_classes)
        super().__init__(num_classes)
        self.num_classes = num_classes


class FCN8sPac(_SegmentationBackbone, fcn8s.FCN8sPac):
    """:class:`fcn8s.FCN8sPac` (PacFCN) with ``forward(x, out_crop=None)``; H, W multiples of 32."""

    def __init__(self, num_classes: int = 21):
        _check_positive_int('num_classes', num_classes)
        super().__init__(num_classes)
        self.num_classes = num_classes


class TinyFCN(nn.Module):
    """A small fully convolutional net (about 0.1M parameters, output stride 8, no crop or pad) for CPU demos.

    Not part of the paper: it exists so that the Synthetic demo trains in minutes on a CPU. Its
    coarse, bilinearly upsampled scores leave blurry object boundaries for a CRF to refine.
    GroupNorm (no running statistics) keeps a frozen TinyFCN truly fixed in train mode.

    Args:
        num_classes: number of output classes.
        width: channels of the first stage (doubled at each of the three poolings).

    Shape:
        - Input: (B, 3, H, W), any H and W.
        - Output: (B, num_classes, H, W) logits.
    """

    def __init__(self, num_classes: int = 21, width: int = 16):
        super().__init__()
        _check_positive_int('num_classes', num_classes)
        _check_positive_int('width', width)
        self.num_classes = num_classes

        def block(cin: int, cout: int, **conv_args) -> List[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, **conv_args), nn.GroupNorm(4, cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(
            *block(3, width, stride=2, padding=1),                      # 1/2
            *block(width, 2 * width, padding=1), nn.MaxPool2d(2, 2, ceil_mode=True),       # 1/4
            *block(2 * width, 4 * width, padding=1), nn.MaxPool2d(2, 2, ceil_mode=True),   # 1/8
            *block(4 * width, 4 * width, padding=2, dilation=2),
            *block(4 * width, 4 * width, padding=4, dilation=4))
        self.score = nn.Conv2d(4 * width, num_classes, 1)

    def forward(self, x: torch.Tensor, out_crop: Optional[Sequence[int]] = None) -> torch.Tensor:
        _check_image_batch(self, x, out_crop)
        # The inputs are mean-subtracted 0-255 values; /64 keeps the first activations near unit scale.
        scores = self.score(self.features(x / 64.0))
        out = F.interpolate(scores, size=x.shape[-2:], mode='bilinear', align_corners=False)
        return crop_top_left(out, out_crop)


BACKBONES = OrderedDict(fcn8s=FCN8s, fcn8saltpad=FCN8sAltPad, fcn8spac=FCN8sPac, tinyfcn=TinyFCN)


@dataclass(frozen=True)
class PairwiseSpec:
    """One pairwise kernel of a PacCRF: compat type, kernel size, dilation, blur, spatial filter."""
    compat_type: str  # '4d', '2d', 'potts' or 'na'
    kernel_size: int
    dilation: int
    blur: int
    spatial_filter: bool

    @classmethod
    def parse(cls, token: str) -> 'PairwiseSpec':
        """Parse a name token such as ``4d5641`` or a string such as ``4d_5_64_1`` / ``2ds_5_11_1``."""
        if '_' in token:
            m = re.fullmatch(r'(4d|2d|0d|na)(s?)_(\d+)_(\d+)_(\d+)', token)
        else:
            m = re.fullmatch(r'(4d|2d|0d|na)(s?)(\d)(\d+)(\d)', token)
        if m is None:
            raise ValueError(f'invalid pairwise kernel {token!r}\n{GRAMMAR}')
        kind, spatial, k, d, b = m.groups()
        spec = cls('potts' if kind == '0d' else kind, int(k), int(d), int(b), spatial == 's')
        if spec.kernel_size % 2 == 0 or spec.dilation < 1 or spec.blur < 1:
            raise ValueError(f'pairwise kernel {token!r}: kernel_size must be odd and dilation, blur >= 1; '
                             f'got k={spec.kernel_size}, d={spec.dilation}, blur={spec.blur}\n{GRAMMAR}')
        return spec

    def crf_kwargs(self) -> dict:
        """Keyword arguments of ``PacCRF.add_pairwise_kernel``."""
        return dict(kernel_size=self.kernel_size, dilation=self.dilation, blur=self.blur,
                    compat_type=self.compat_type, spatial_filter=self.spatial_filter, pairwise_weight=1.0)


@dataclass(frozen=True)
class ModelSpec:
    """A decoded model name (see :func:`parse_model_name`)."""
    backbone: str
    frozen: bool = False
    crf: Optional[str] = None  # None, 'crf' or 'convcrf'
    num_steps: int = 5
    loose: bool = False
    pairwise: Tuple[PairwiseSpec, ...] = ()


DEFAULT_PAIRWISE = 'p4d5161'


def parse_model_name(model_name: str) -> ModelSpec:
    """Decode a model name of :data:`GRAMMAR` into a :class:`ModelSpec`.

    Example:
        >>> spec = parse_model_name('fcn8sfrozen_crfi5lp4d5641')
        >>> spec.backbone, spec.frozen, spec.num_steps, spec.loose, spec.pairwise[0].dilation
        ('fcn8s', True, 5, True, 64)
    """
    if not isinstance(model_name, str):
        raise TypeError(f'model_name must be a str, got {type(model_name).__name__}')
    parts = model_name.split('_')
    if len(parts) == 1:
        if model_name not in BACKBONES:
            raise ValueError(f'unknown model {model_name!r}\n{GRAMMAR}')
        return ModelSpec(model_name)
    if len(parts) != 2:
        raise ValueError(f'model name {model_name!r} must contain at most one "_"\n{GRAMMAR}')
    backbone, crf = parts
    frozen = backbone.endswith('frozen')
    backbone = backbone[:-len('frozen')] if frozen else backbone
    if backbone not in BACKBONES:
        raise ValueError(f'unknown backbone {backbone!r} in model name {model_name!r}\n{GRAMMAR}')
    if crf in ('convcrf', 'convcrfv1'):
        return ModelSpec(backbone, frozen, 'convcrf')
    if 'p' not in crf:
        crf += DEFAULT_PAIRWISE
    crf_type, _, edges = crf.partition('p')
    m = re.fullmatch(r'(crf|crfv7)(?:i(\d+)(l?))?', crf_type)
    if m is None:
        raise ValueError(f'invalid CRF part {crf_type!r} in model name {model_name!r}\n{GRAMMAR}')
    steps, loose = (int(m.group(2)), m.group(3) == 'l') if m.group(2) else (5, False)
    if steps < 1:
        raise ValueError(f'CRF steps must be >= 1, got {steps} in {model_name!r}\n{GRAMMAR}')
    pairwise = tuple(PairwiseSpec.parse(token) for token in edges.split('p'))
    return ModelSpec(backbone, frozen, 'crf', steps, loose, pairwise)


def _edge_feature(x: torch.Tensor, scales: torch.Tensor, use_yx: bool) -> torch.Tensor:
    """x / scales per channel, with (y, x) position channels first when ``use_yx``.

    ``scales`` holds one value per channel, or [colour] / [position, colour] when shared.
    """
    if use_yx:
        pos = paccrf.create_position_feats(x.shape[2:], bs=x.shape[0], device=x.device, dtype=x.dtype)
        x = torch.cat([pos, x], dim=1)
        if scales.numel() == 2:
            scales = torch.cat([scales[:1].expand(2), scales[1:].expand(x.shape[1] - 2)])
    return x / scales.view(1, -1, 1, 1).to(x.dtype)


class ModelWithCrf(nn.Module):
    """A backbone whose logits are refined by a :class:`paccrf.PacCRF` (or PacCRFLoose).

    The edge features of pairwise kernel i are the network input divided by the learnable
    ``feat_scales[i]`` (initially 30 per BGR channel), optionally with (y, x) positions.

    Args:
        backbone: a module with ``num_classes`` and ``forward(x, out_crop=None)``.
        num_steps: mean-field steps.
        pairwise: an edge string of the model-name grammar (e.g. ``'p4d5641p4d5161'``) or a list of
            ``'type_k_d_b'`` strings (e.g. ``['4d_5_16_1']``) or :class:`PairwiseSpec`.
        loose: one set of CRF parameters per step (PacCRFLoose).
        use_yx: add the pixel position to the edge features.
        shared_scales: one scale for all colour channels (and one for both positions).
        adaptive_init: position scale ((k - 1) d + 1) / 4 instead of 100.

    Shape:
        - Input: (B, 3, H, W) mean-subtracted BGR on the 0-255 scale.
        - Output: (B, num_classes, h, w) log Q, with (h, w) = out_crop or (H, W).
    """

    def __init__(self, backbone: nn.Module, num_steps: int = 5,
                 pairwise: Union[str, Sequence[Union[str, PairwiseSpec]]] = ('4d_5_16_1',),
                 loose: bool = False, use_yx: bool = False, shared_scales: bool = True,
                 adaptive_init: bool = True):
        super().__init__()
        _check_backbone(backbone)
        _check_positive_int('num_steps', num_steps)
        if isinstance(pairwise, str):
            pairwise = [token for token in pairwise.split('p') if token]
        specs = [p if isinstance(p, PairwiseSpec) else PairwiseSpec.parse(p) for p in pairwise]
        if not specs:
            raise ValueError('pairwise must name at least one kernel, got an empty list')
        self.backbone = backbone
        self.use_yx = use_yx
        self.loose = loose
        crf_class = paccrf.PacCRFLoose if loose else paccrf.PacCRF
        self.crf = crf_class(backbone.num_classes, num_steps, final_output='log_Q', perturbed_init=True,
                             fixed_weighting=False, unary_weight=1.0,
                             pairwise_kernels=[s.crf_kwargs() for s in specs])
        self.feat_scales = nn.ParameterList(
            [nn.Parameter(self._initial_scales(s, use_yx, shared_scales, adaptive_init)) for s in specs])

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @staticmethod
    def _initial_scales(spec: PairwiseSpec, use_yx: bool, shared: bool, adaptive: bool) -> torch.Tensor:
        colour = [EDGE_FEATURE_SCALE] if shared else [EDGE_FEATURE_SCALE] * 3
        if not use_yx:
            return torch.tensor(colour)
        position = ((spec.kernel_size - 1) * spec.dilation + 1) / 4.0 if adaptive else 100.0
        return torch.tensor([position] * (1 if shared else 2) + colour)

    def forward(self, x: torch.Tensor, out_crop: Optional[Sequence[int]] = None) -> torch.Tensor:
        unary = self.backbone(x, out_crop)
        x = crop_top_left(x, out_crop)
        edge_feats = [_edge_feature(x, scales, self.use_yx) for scales in self.feat_scales]
        return self.crf(unary, edge_feats)

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Map a non-loose CRF (``crf.X``) onto a loose one (``crf.steps.<s>.X`` for every step).

        This is stage 2 of the two-stage training: the stage-1 PacCRF initialises every step of a
        PacCRFLoose. Other dicts are returned unchanged; the caller's dict is never modified.
        """
        if self.loose and not any(k.startswith('crf.steps.') for k in state_dict):
            return expand_crf_to_loose(state_dict, len(self.crf.steps))
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, **kwargs):
        """``nn.Module.load_state_dict`` after :meth:`adapt_state_dict`."""
        return super().load_state_dict(self.adapt_state_dict(state_dict), strict=strict, **kwargs)


def expand_crf_to_loose(state_dict: Mapping[str, torch.Tensor], num_steps: int) -> 'OrderedDict':
    """Copy of ``state_dict`` where every ``crf.X`` becomes ``crf.steps.<s>.X`` for s < num_steps."""
    expanded = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith('crf.'):
            for step in range(num_steps):
                expanded[f'crf.steps.{step}.{key[len("crf."):]}'] = value.clone()
        else:
            expanded[key] = value
    return expanded


class ModelWithConvCrf(nn.Module):
    """A backbone refined by a ConvCRF-like PacCRF (5 steps, two fixed 11x11 blurred kernels).

    The two kernels use (y/80, x/80, BGR/13) and (y/3, x/3) features with pairwise weights 2.0 and
    0.6, and the unary weight is 0.8.

    Args:
        backbone: a module with ``num_classes`` and ``forward(x, out_crop=None)``.
        compat: compatibility type of both kernels ('potts', '2d', ...).
        kernel_size: kernel size of both kernels.
        blur: blur (down-sampling) factor of both kernels.
        dilation: dilation of both kernels.

    Shape:
        - Input: (B, 3, H, W); output: (B, num_classes, h, w) log Q.
    """

    def __init__(self, backbone: nn.Module, compat: str = 'potts', kernel_size: int = 11, blur: int = 4,
                 dilation: int = 1):
        super().__init__()
        _check_backbone(backbone)
        self.backbone = backbone
        kernel = dict(kernel_size=kernel_size, dilation=dilation, blur=blur, compat_type=compat,
                      spatial_filter=False)
        self.crf = paccrf.PacCRF(backbone.num_classes, 5, unary_weight=0.8,
                                 pairwise_kernels=[dict(kernel, pairwise_weight=2.0),
                                                   dict(kernel, pairwise_weight=0.6)])

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def forward(self, x: torch.Tensor, out_crop: Optional[Sequence[int]] = None) -> torch.Tensor:
        unary = self.backbone(x, out_crop)
        x = crop_top_left(x, out_crop)
        edge_feats = [paccrf.create_YXRGB(x, 80.0, 13.0),
                      paccrf.create_position_feats(x.shape[2:], 3.0, x.shape[0], x.device, x.dtype)]
        return self.crf(unary, edge_feats)


def create_model(model_name: str, num_classes: int = 21) -> nn.Module:
    """Build the model named by ``model_name`` (grammar in :data:`GRAMMAR`).

    Args:
        model_name: e.g. ``'fcn8s'``, ``'fcn8s_crfi5p4d5641p4d5161'``, ``'fcn8sfrozen_crf'``.
        num_classes: number of classes (21 for PASCAL VOC).

    Example:
        >>> model = create_model('tinyfcn_crfi2p4d5161', 21)
        >>> type(model).__name__, type(model.crf).__name__
        ('ModelWithCrf', 'PacCRF')
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')
    spec = parse_model_name(model_name)
    backbone = BACKBONES[spec.backbone](num_classes)
    if spec.frozen:
        backbone.requires_grad_(False)
    if spec.crf is None:
        return backbone
    if spec.crf == 'convcrf':
        return ModelWithConvCrf(backbone, compat='2d')
    return ModelWithCrf(backbone, spec.num_steps, pairwise=list(spec.pairwise), loose=spec.loose,
                        use_yx=False, shared_scales=False)


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters that are trained (``requires_grad``): everything but a frozen backbone."""
    return [p for p in model.parameters() if p.requires_grad]
