"""Joint upsampling networks: a low-resolution target (depth, optical flow) is upsampled by ``factor``
under the guidance of a high-resolution image.

Every model treats each target channel (e.g. the u and v of a flow field) as an independent
single-channel image that shares the guide: channels are folded into the batch before the network
and unfolded after it (:func:`convert_to_single_channel`, :func:`repeat_for_channel`,
:func:`recover_from_single_channel`).

Class names, constructor arguments and state_dict keys match the released 2019 weights.

Example:
    >>> net = PacJointUpsample(factor=8)
    >>> target_low, guide = torch.rand(2, 1, 16, 16), torch.rand(2, 3, 128, 128)
    >>> net(target_low, guide).shape
    torch.Size([2, 1, 128, 128])
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from pac import PacConvTranspose2d, _check_4d

__all__ = [
    'convert_to_single_channel', 'recover_from_single_channel', 'repeat_for_channel',
    'th_rmse', 'th_epe',
    'Identity', 'Bilinear', 'JointBilateral', 'DJIF', 'DJIFWide', 'PacJointUpsample', 'PacJointUpsampleLite',
    'init_color_guide_', 'init_passthrough_', 'MODEL_NAMES', 'create_model',
]

IntOrSeq = Union[int, Sequence[int]]


# ---------------------------------------------------------------------------------------------- argument checks
def _check_int(name: str, value, minimum: int = 1) -> None:
    """``value`` must be an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{name} must be an int, got {type(value).__name__} {value!r}')
    if value < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value}')


def _check_scale(name: str, value) -> None:
    """``value`` must be a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f'{name} must be a finite number > 0, got {value!r}')


# ---------------------------------------------------------------------------------------------- channel folding
def convert_to_single_channel(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold the channels into the batch: (B, ch, H, W) -> (B*ch, 1, H, W). Returns the folded tensor and ch."""
    _check_4d('x', x)
    b, ch, h, w = x.shape
    return x.reshape(b * ch, 1, h, w), ch


def recover_from_single_channel(x: torch.Tensor, ch: int) -> torch.Tensor:
    """Inverse of :func:`convert_to_single_channel`: (B*ch, 1, H, W) -> (B, ch, H, W)."""
    _check_4d('x', x)
    if x.shape[0] % ch != 0:
        raise ValueError(f'batch size {x.shape[0]} is not a multiple of the channel count ch={ch}')
    bc, c, h, w = x.shape
    return x.reshape(bc // ch, ch * c, h, w)


def repeat_for_channel(x: torch.Tensor, ch: int) -> torch.Tensor:
    """Repeat each guide of the batch ``ch`` times so it lines up with a folded target: (B, C, H, W) -> (B*ch, C, H, W)."""
    _check_4d('x', x)
    return x if ch == 1 else x.repeat_interleave(ch, dim=0)


# ---------------------------------------------------------------------------------------------- metrics
def _check_same_shape(pred: torch.Tensor, gt: torch.Tensor) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f'pred and gt must have the same shape, got {tuple(pred.shape)} and {tuple(gt.shape)}')


def th_rmse(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image RMSE averaged over the batch (not a pooled RMSE).

    For each image, sqrt(sum over channels of the mean over pixels of (pred - gt)^2); then the mean over images.

    Shape:
        pred, gt: (B, C, H, W). Output: scalar.
    """
    _check_same_shape(pred, gt)
    _check_4d('pred', pred)
    return (pred - gt).pow(2).mean(dim=(2, 3)).sum(dim=1).sqrt().mean()


def th_epe(pred: torch.Tensor, gt: torch.Tensor, small_flow: float = -1.0,
           unknown_flow_thresh: float = 1e7) -> torch.Tensor:
    """Average end-point error of a flow field, over all pixels of the batch.

    Pixels whose ground truth is unknown (|u| or |v| above ``unknown_flow_thresh``) count as error 0 but stay in
    the mean (the 2019 convention). With ``small_flow >= 0`` only pixels with |u| or |v| above it are averaged.
    The inputs are never modified.

    Shape:
        pred, gt: (B, 2, H, W) with channels (u, v). Output: scalar.
    """
    _check_same_shape(pred, gt)
    _check_4d('pred', pred)
    if pred.shape[1] != 2:
        raise ValueError(f'th_epe expects 2 flow channels (u, v), got {pred.shape[1]}')
    if not math.isfinite(small_flow):
        raise ValueError(f'small_flow must be a finite number, got {small_flow!r}')
    pred_u, pred_v = pred[:, 0].reshape(-1), pred[:, 1].reshape(-1)
    gt_u, gt_v = gt[:, 0].reshape(-1), gt[:, 1].reshape(-1)
    known = (gt_u.abs() <= unknown_flow_thresh) & (gt_v.abs() <= unknown_flow_thresh)
    epe = torch.where(known, ((pred_u - gt_u) ** 2 + (pred_v - gt_v) ** 2).sqrt(), torch.zeros_like(pred_u))
    if small_flow >= 0:
        # unknown pixels were zeroed in the reference before this test, so they never pass it
        moving = known & ((gt_u.abs() > small_flow) | (gt_v.abs() > small_flow))
        epe = epe[moving]
    return epe.mean()


# ---------------------------------------------------------------------------------------------- simple models
class Identity(nn.Module):
    """Returns its input unchanged (kept for parity with the 2019 model list; main cannot build it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Bilinear(nn.Module):
    """Plain bilinear upsampling of the target by ``factor`` (align_corners=False); the guide is ignored.

    Example:
        >>> Bilinear(4)(torch.rand(1, 2, 8, 8), None).shape
        torch.Size([1, 2, 32, 32])
    """

    def __init__(self, factor: int, channels: int | None = None, guide_channels: int | None = None):
        super().__init__()
        _check_int('factor', factor)
        self.factor = factor

    def forward(self, target_low: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        _check_4d('target_low', target_low)
        return F.interpolate(target_low, scale_factor=self.factor, mode='bilinear', align_corners=False)


def _pixel_grid(like: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) row and column indices of ``like``'s pixels, in ``like``'s dtype and device."""
    b, _, h, w = like.shape
    rows = torch.arange(h, dtype=like.dtype, device=like.device).view(1, 1, h, 1).expand(b, 1, h, w)
    cols = torch.arange(w, dtype=like.dtype, device=like.device).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat((rows, cols), dim=1)


class JointBilateral(nn.Module):
    """Joint bilateral upsampling (JBU) as a normalised transposed PAC with an identity weight.

    The kernel is a Gaussian over colour (sigma = 1 / scale_color, colours in the guide's units) and space
    (sigma = 1 / scale_space, in high-resolution pixels). The CLI name is ``JBU_<ks>_<scale_color>_<scale_space>``.

    Args:
        factor: upsampling factor.
        channels: target channels.
        kernel_size: odd filter size at high resolution.
        scale_space: inverse spatial bandwidth.
        scale_color: inverse colour bandwidth.
    """

    hand_set = True  # its initial weights are the model (the task program tests it without weights to load)

    def __init__(self, factor: int, channels: int, kernel_size: int, scale_space: float, scale_color: float):
        super().__init__()
        _check_int('factor', factor)
        _check_int('channels', channels)
        _check_int('kernel_size', kernel_size)
        if kernel_size % 2 != 1 or kernel_size < factor - 1:  # (a smaller kernel needs a negative padding)
            raise ValueError(f'kernel_size must be odd and >= factor - 1 = {factor - 1}, got {kernel_size}')
        _check_scale('scale_space', scale_space)
        _check_scale('scale_color', scale_color)
        self.factor, self.channels = factor, channels
        self.scale_space, self.scale_color = scale_space, scale_color
        self.convt = PacConvTranspose2d(channels, channels, kernel_size, stride=factor, dilation=1,
                                        padding=1 + (kernel_size - factor - 1) // 2,
                                        output_padding=(kernel_size - factor) % 2,
                                        normalize_kernel=True, bias=None)
        with torch.no_grad():
            self.convt.weight.zero_()
            for c in range(channels):
                self.convt.weight[c, c] = 1.0

    def forward(self, target_low: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        _check_4d('target_low', target_low)
        _check_4d('guide', guide)
        features = torch.cat((guide * self.scale_color, _pixel_grid(guide) * self.scale_space), dim=1)
        return self.convt(target_low, features)


# ---------------------------------------------------------------------------------------------- DJIF baseline
def _check_odd(name: str, sizes: Sequence[int]) -> None:
    if any(s % 2 != 1 for s in sizes):
        raise ValueError(f'{name} must hold odd filter sizes, got {tuple(sizes)}')


def _three_layer_branch(in_ch: int, channels: Sequence[int], sizes: Sequence[int], paddings: Sequence[int]):
    """conv, ReLU, conv, ReLU, conv (keys 0, 2, 4)."""
    c = (in_ch, *channels)
    return nn.Sequential(
        nn.Conv2d(c[0], c[1], sizes[0], padding=paddings[0]), nn.ReLU(inplace=True),
        nn.Conv2d(c[1], c[2], sizes[1], padding=paddings[1]), nn.ReLU(inplace=True),
        nn.Conv2d(c[2], c[3], sizes[2], padding=paddings[2]))


class DJIF(nn.Module):
    """Deep joint image filter baseline (Li et al., ECCV 2016), as in the 2019 code.

    The low-res target is bilinearly upsampled by ``factor``; a target branch and a guide branch each give one
    feature map, which a joint branch turns into the output. There is no residual connection.

    Args:
        factor: upsampling factor.
        channels: target channels (each is filtered on its own by the same single-channel network).
        guide_channels: guide channels.
        fs: the three (odd) filter sizes of every branch.
        ns_tg: channels of the target and guide branches.
        ns_f: hidden channels of the joint branch.
    """

    def __init__(self, factor: int, channels: int = 1, guide_channels: int = 3, fs: Sequence[int] = (9, 1, 5),
                 ns_tg: Sequence[int] = (96, 48, 1), ns_f: Sequence[int] = (64, 32)):
        super().__init__()
        _check_int('factor', factor)
        _check_int('channels', channels)
        _check_int('guide_channels', guide_channels)
        for name, sizes in (('fs', fs), ('ns_tg', ns_tg), ('ns_f', ns_f)):
            for value in sizes:
                _check_int(name, value)
        _check_odd('fs', fs)
        if len(fs) != 3 or len(ns_tg) != 3 or len(ns_f) != 2:
            raise ValueError(f'DJIF needs 3 filter sizes, 3 ns_tg and 2 ns_f, got fs={fs}, ns_tg={ns_tg}, ns_f={ns_f}')
        self.factor = factor
        paddings = tuple(s // 2 for s in fs)
        # the target/guide branches keep the total padding (6 for the defaults) but spread it evenly over layers
        total = sum(paddings)
        paddings_tg = (total // 3, total // 3, total - 2 * (total // 3))
        self.channels = channels
        # layers see one target channel: the others are folded into the batch (see the module docstring)
        self.branch_t = _three_layer_branch(1, ns_tg, fs, paddings_tg)
        self.branch_g = _three_layer_branch(guide_channels, ns_tg, fs, paddings_tg)
        self.branch_joint = _three_layer_branch(ns_tg[-1] * 2, (*ns_f, 1), fs, paddings)

    def forward(self, target_low: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        _check_4d('target_low', target_low)
        _check_4d('guide', guide)
        target, ch = convert_to_single_channel(target_low)
        if target.shape[-1] < guide.shape[-1]:
            target = F.interpolate(target, scale_factor=self.factor, mode='bilinear', align_corners=False)
        features = torch.cat((self.branch_t(target), repeat_for_channel(self.branch_g(guide), ch)), dim=1)
        return recover_from_single_channel(self.branch_joint(features), ch)


class DJIFWide(DJIF):
    """DJIF with wider branches (ns_tg=(256, 128, 1), ns_f=(256, 128))."""

    def __init__(self, factor: int, channels: int = 1, guide_channels: int = 3):
        super().__init__(factor, channels, guide_channels, ns_tg=(256, 128, 1), ns_f=(256, 128))


# ---------------------------------------------------------------------------------------------- PAC models
def _expand_filters(name: str, filters: IntOrSeq, length: int) -> tuple[int, ...]:
    """An int becomes ``length`` copies; a sequence must have exactly ``length`` entries."""
    filters = (filters,) * length if isinstance(filters, int) else tuple(filters)
    if len(filters) != length:
        raise ValueError(f'{name} must have {length} entries, got {len(filters)}: {filters}')
    for value in filters:
        _check_int(name, value)
    return filters


def _conv_stack(channels: Sequence[int], kernel_size: int, bn: bool, relu_after_last: bool = False) -> nn.Sequential:
    """conv{l} [bn{l}] relu{l} ... conv{n}: the naming of the 2019 state_dicts."""
    layers = OrderedDict()
    n = len(channels) - 1
    for l in range(1, n + 1):
        layers[f'conv{l}'] = nn.Conv2d(channels[l - 1], channels[l], kernel_size, padding=kernel_size // 2)
        if l < n or relu_after_last:
            if bn:
                layers[f'bn{l}'] = nn.BatchNorm2d(channels[l])
            layers[f'relu{l}'] = nn.ReLU()
    return nn.Sequential(layers)


class PacJointUpsample(nn.Module):
    """Joint upsampling with pixel-adaptive transposed convolutions (Su et al., CVPR 2019, section 4.1).

    A target branch encodes the low-res target, a guide branch computes ``k_ch`` adaptive-kernel features per
    x2 stage at full resolution; ``log2(factor)`` PacConvTranspose2d layers (stride 2) upsample the target
    features, each guided by its slice of the guide features resized to that stage; a final branch maps them to
    the output.

    Args:
        factor: upsampling factor, a power of 2.
        channels: target channels (each is upsampled on its own with the shared guide).
        guide_channels: guide channels.
        n_t_layers, n_g_layers, n_f_layers: layers of the target, guide and final branches.
        n_t_filters, n_g_filters, n_f_filters: filters per layer (an int or a tuple; n_f_filters also covers the
            outputs of the upsampling layers: ``n_f_layers + log2(factor) - 1`` entries).
        k_ch: guide feature channels per upsampling layer.
        f_sz_1: (odd) filter size of the plain convolutions.
        f_sz_2: filter size of the transposed PAC layers.
        t_bn, g_bn, u_bn, f_bn: batch norm in the target branch, guide branch, after the upsampling layers and in
            the final branch.
        normalize_kernel: normalise the adaptive kernels of the upsampling layers to sum 1 over the input pixels
            that each output reads (``PacConvTranspose2d(normalize_kernel=True)``), so that every output is a
            kernel-weighted average of its inputs. Off in 2019, and so for the released weights.

    Shape:
        target_low: (B, channels, H, W); guide: (B, guide_channels, factor*H, factor*W);
        output: (B, channels, factor*H, factor*W).
    """

    def __init__(self, factor: int, channels: int = 1, guide_channels: int = 3, n_t_layers: int = 3,
                 n_g_layers: int = 3, n_f_layers: int = 2, n_t_filters: IntOrSeq = 32, n_g_filters: IntOrSeq = 32,
                 n_f_filters: IntOrSeq = 32, k_ch: int = 16, f_sz_1: int = 5, f_sz_2: int = 5, t_bn: bool = False,
                 g_bn: bool = False, u_bn: bool = False, f_bn: bool = False, normalize_kernel: bool = False):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2 or factor & (factor - 1):
            raise ValueError(f'factor needs to be a power of 2 (>= 2), got {factor!r}')
        for name, value in (('n_t_layers', n_t_layers), ('n_g_layers', n_g_layers), ('n_f_layers', n_f_layers),
                            ('channels', channels), ('guide_channels', guide_channels), ('k_ch', k_ch),
                            ('f_sz_1', f_sz_1), ('f_sz_2', f_sz_2)):
            _check_int(name, value)
        _check_odd('f_sz_1', (f_sz_1,))
        self.factor, self.channels, self.guide_channels, self.k_ch = factor, channels, guide_channels, k_ch
        self.num_ups = int(math.log2(factor))
        self.u_bn, self.normalize_kernel = u_bn, normalize_kernel
        n_t = _expand_filters('n_t_filters', n_t_filters, n_t_layers)
        n_g = _expand_filters('n_g_filters', n_g_filters, n_g_layers - 1)
        n_f = _expand_filters('n_f_filters', n_f_filters, n_f_layers + self.num_ups - 1)

        # layers see one target channel: the others are folded into the batch (see the module docstring)
        self.branch_t = _conv_stack((1, *n_t), f_sz_1, t_bn)
        self.branch_g = _conv_stack((guide_channels, *n_g, k_ch * self.num_ups), f_sz_1, g_bn)
        chain = (n_t[-1], *n_f, 1)
        self.up_convts = nn.ModuleList(
            PacConvTranspose2d(chain[i], chain[i + 1], f_sz_2, stride=2, padding=(f_sz_2 - 1) // 2,
                               output_padding=f_sz_2 % 2, normalize_kernel=normalize_kernel)
            for i in range(self.num_ups))
        if u_bn:
            self.up_bns = nn.ModuleList(nn.BatchNorm2d(chain[i + 1]) for i in range(self.num_ups))
        self.branch_f = _conv_stack(chain[self.num_ups:], f_sz_1, f_bn)

    def forward(self, target_low: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        _check_4d('target_low', target_low)
        _check_4d('guide', guide)
        if target_low.shape[0] != guide.shape[0]:
            raise ValueError(f'target_low and guide must have the same batch size, '
                             f'got {target_low.shape[0]} and {guide.shape[0]}')
        expected = (target_low.shape[-2] * self.factor, target_low.shape[-1] * self.factor)
        if tuple(guide.shape[-2:]) != expected:
            raise ValueError(f'guide must be factor x target_low = {expected} in size, got {tuple(guide.shape[-2:])}')
        x, ch = convert_to_single_channel(target_low)
        x = self.branch_t(x)
        g = self.branch_g(guide)
        for i in range(self.num_ups):
            g_i = g[:, i * self.k_ch:(i + 1) * self.k_ch]
            scale = 2 ** (i + 1) / self.factor
            if scale != 1:
                g_i = F.interpolate(g_i, scale_factor=scale, mode='bilinear', align_corners=False)
            x = self.up_convts[i](x, repeat_for_channel(g_i, ch))
            if self.u_bn:
                x = self.up_bns[i](x)
            x = F.relu(x)
        x = self.branch_f(x)
        return recover_from_single_channel(x, ch)


_LITE_CONFIGS = {  # factor: (n_g_filters, n_t_filters, n_f_filters, k_ch); about 56k parameters each
    4: ((12, 22), (12, 16, 22), (12, 16, 22), 12),
    8: ((12, 16), (12, 16, 16), (12, 16, 16, 20), 12),
    16: ((8, 16), (8, 16, 16), (8, 16, 16, 16, 16), 10),
}


class PacJointUpsampleLite(PacJointUpsample):
    """PacJointUpsample with about as many parameters as DJIF (factors 4, 8 and 16 only)."""

    def __init__(self, factor: int, channels: int = 1, guide_channels: int = 3, normalize_kernel: bool = False):
        if factor not in _LITE_CONFIGS:
            raise ValueError(f'factor can only be 4, 8, or 16, got {factor!r}')
        n_g, n_t, n_f, k_ch = _LITE_CONFIGS[factor]
        super().__init__(factor, channels, guide_channels, n_g_filters=n_g, n_t_filters=n_t, n_f_filters=n_f,
                         k_ch=k_ch, normalize_kernel=normalize_kernel)


def _copy_channels_(conv: nn.Conv2d, pairs: Sequence[tuple[int, int]], gain: float, offset: int = 0) -> None:
    """Make each output channel o of ``conv`` copy input channel i times ``gain``, for every (o, i) in ``pairs``,
    from ``offset`` pixels down and right of the centre."""
    cy, cx = conv.kernel_size[0] // 2 + offset, conv.kernel_size[1] // 2 + offset
    for o, i in pairs:
        conv.weight[o].zero_()
        conv.weight[o, i, cy, cx] = gain
        conv.bias[o] = 0.0


@torch.no_grad()
def init_color_guide_(net: PacJointUpsample, scale: float) -> PacJointUpsample:
    """Initialise the guide branch so that every adaptive kernel starts as a Gaussian colour kernel.

    With PyTorch's default initialisation the guide features are small (std about 0.1 for a guide in [0, 1]), so
    every kernel exp(-|f_i - f_j|^2 / 2) is close to 1 and its gradient, proportional to f_i - f_j, nearly
    vanishes. In a short training run the network then learns to flatten the features and ignores the guide.
    This init passes the guide's channels unchanged through the hidden layers of the guide branch (a centre tap
    of 1 in their first ``guide_channels`` filters, zero bias: the guide is non-negative, so the ReLUs keep it)
    and into the first ``guide_channels`` features of every upsampling layer, times ``scale``. The kernels start
    as colour kernels of bandwidth 1 / scale, as in joint bilateral upsampling; every other weight keeps its
    initialisation. State_dict keys and shapes are unchanged.

    The features of pixel ``x`` are the guide at ``x + (factor - 1) // 2`` (down and right): the upsampling layers
    put low-res pixel ``j`` at ``factor * j``, where 'center' sampling took it from ``factor * j + (factor - 1) //
    2`` (the output layer of :func:`init_passthrough_` moves it back there), so each kernel compares the colours of
    the places its depths were sampled at.

    Args:
        net: a PacJointUpsample or PacJointUpsampleLite without batch norm in its guide branch.
        scale: colour scale, in inverse guide units (10 for a guide in [0, 1]).

    Returns:
        ``net``, modified in place.

    Example:
        >>> net = init_color_guide_(PacJointUpsample(factor=4), scale=10.0)
        >>> guide = torch.rand(1, 3, 32, 32)
        >>> torch.allclose(net.branch_g(guide)[:, :3, :-1, :-1], 10 * guide[..., 1:, 1:])
        True
    """
    if not isinstance(net, PacJointUpsample):
        raise TypeError(f'net must be a PacJointUpsample, got {type(net).__name__}')
    _check_scale('scale', scale)
    if any(isinstance(m, nn.BatchNorm2d) for m in net.branch_g):
        raise ValueError('init_color_guide_ needs a guide branch without batch norm (g_bn=False)')
    convs = [m for m in net.branch_g if isinstance(m, nn.Conv2d)]
    n = net.guide_channels
    hidden_widths = [c.out_channels for c in convs[:-1]]
    if min(hidden_widths + [net.k_ch]) < n:
        raise ValueError(f'the guide branch must keep {n} guide channels: got hidden widths {hidden_widths} '
                         f'and k_ch={net.k_ch}')
    for conv in convs[:-1]:
        _copy_channels_(conv, [(c, c) for c in range(n)], gain=1.0)
    _copy_channels_(convs[-1], [(i * net.k_ch + c, c) for i in range(net.num_ups) for c in range(n)], gain=scale,
                    offset=_sample_offset(net, convs[-1]))
    return net


def _sample_offset(net: PacJointUpsample, conv: nn.Conv2d) -> int:
    """How far right and down of ``factor * j`` (where the upsampling layers put low-res pixel j) the 'center'
    sampling took pixel j: ``(factor - 1) // 2``, as far as ``conv``'s taps reach (x8 and up: short by a pixel or
    more)."""
    return min((net.factor - 1) // 2, conv.kernel_size[0] // 2)


def _pass_first_channel_(conv: nn.Module, taps: torch.Tensor, only: bool = False, transposed: bool = False) -> None:
    """Make output channel 0 of ``conv`` apply ``taps`` to input channel 0, with no bias; with ``only``, every
    other output channel is zeroed as well. ``transposed``: the weight is laid out (C_in, C_out, kh, kw)."""
    weight = conv.weight.transpose(0, 1) if transposed else conv.weight  # (C_out, C_in, kh, kw)
    if only:
        weight.zero_()
    weight[0].zero_()
    weight[0, 0] = taps
    if conv.bias is not None:
        conv.bias[0] = 0.0
        if only:
            conv.bias.zero_()


def _centre_tap(conv: nn.Module, dy: int = 0, dx: int = 0) -> torch.Tensor:
    kh, kw = conv.weight.shape[-2:]
    taps = torch.zeros(kh, kw, dtype=conv.weight.dtype, device=conv.weight.device)
    taps[kh // 2 + dy, kw // 2 + dx] = 1.0
    return taps


def _upsampling_taps(convt: PacConvTranspose2d) -> torch.Tensor:
    """The channel-0 taps of an x2 upsampling layer under :func:`init_passthrough_`: linear interpolation, or, when
    the layer normalises its kernel (which then weighs the input pixels of each output), equal weights."""
    k = convt.weight.shape[-1]
    if convt.normalize_kernel:
        return torch.ones(k, k, dtype=convt.weight.dtype)
    line = torch.zeros(k, dtype=convt.weight.dtype)
    line[k // 2 - 1:k // 2 + 2] = torch.tensor([0.5, 1.0, 0.5])
    return line[:, None] * line[None, :]


@torch.no_grad()
def init_passthrough_(net: nn.Module) -> nn.Module:
    """Initialise a DJIF or PacJointUpsample so that it starts as a plain upsampler of its target and learns from there.

    Trained from PyTorch's default init, these networks first have to learn to carry the target through every
    layer, which takes far more than a short run. This init makes channel 0 of every layer carry it: a centre tap
    of 1 from channel 0 (the inputs are non-negative, normalised targets, so the ReLUs keep it), linear
    interpolation in each x2 PacConvTranspose2d (equal weights when it normalises its kernel), and an output layer
    that reads channel 0 only (its other weights start at zero; they get gradients at the first step). DJIF then
    starts as bilinear upsampling; a PacJointUpsample multiplies the interpolation by its adaptive kernels, so with
    :func:`init_color_guide_` it starts as a colour-guided interpolation: unnormalised, or, with
    ``normalize_kernel=True``, two stages of joint bilateral upsampling. The guide branches and every other weight
    keep their initialisation; state_dict keys and shapes are unchanged.

    Returns:
        ``net``, modified in place.

    Example:
        >>> net = init_passthrough_(DJIF(factor=4))
        >>> low, guide = torch.rand(1, 1, 8, 8), torch.rand(1, 3, 32, 32)
        >>> torch.allclose(net(low, guide)[..., 4:-4, 4:-4], Bilinear(4)(low)[..., 4:-4, 4:-4], atol=1e-6)
        True
    """
    if isinstance(net, PacJointUpsample):
        if net.u_bn or any(isinstance(m, nn.BatchNorm2d) for m in (*net.branch_t, *net.branch_f)):
            raise ValueError('init_passthrough_ needs a PacJointUpsample without batch norm (t_bn, u_bn, f_bn)')
        for conv in (m for m in net.branch_t if isinstance(m, nn.Conv2d)):
            _pass_first_channel_(conv, _centre_tap(conv))
        for convt in net.up_convts:
            _pass_first_channel_(convt, _upsampling_taps(convt), transposed=True)
        convs = [m for m in net.branch_f if isinstance(m, nn.Conv2d)]
        for conv in convs[:-1]:
            _pass_first_channel_(conv, _centre_tap(conv))
        shift = _sample_offset(net, convs[-1])  # the output layer moves every pixel to where it was sampled
        _pass_first_channel_(convs[-1], _centre_tap(convs[-1], -shift, -shift), only=True)
        return net
    if isinstance(net, DJIF):
        for branch in (net.branch_t, net.branch_joint):
            convs = [m for m in branch if isinstance(m, nn.Conv2d)]
            for conv in convs[:-1]:
                _pass_first_channel_(conv, _centre_tap(conv))
            _pass_first_channel_(convs[-1], _centre_tap(convs[-1]), only=True)
        return net
    raise TypeError(f'net must be a DJIF or a PacJointUpsample, got {type(net).__name__}')


# ---------------------------------------------------------------------------------------------- factory
MODEL_NAMES = ('PacJointUpsample', 'PacJointUpsampleLite', 'DJIF', 'DJIFWide', 'Bilinear',
               'JBU_<ks>_<scale_color>_<scale_space>')
_CLASSES = {cls.__name__: cls for cls in (PacJointUpsample, PacJointUpsampleLite, DJIF, DJIFWide, Bilinear)}


def create_model(name: str, factor: int, channels: int = 1, guide_channels: int = 3,
                 normalize_kernel: bool = False) -> nn.Module:
    """Build a model from its CLI name: a class name above, or ``JBU_<ks>_<scale_color>_<scale_space>``.
    ``normalize_kernel`` is passed to the PacJointUpsample models (the others have no such option).

    Example:
        >>> create_model('JBU_9_10_0.5', factor=4).convt.weight.shape
        torch.Size([1, 1, 9, 9])
    """
    if name.startswith('JBU_'):
        parts = name.split('_')
        try:
            ks, scale_color, scale_space = int(parts[1]), float(parts[2]), float(parts[3])
            if len(parts) != 4:
                raise IndexError
        except (IndexError, ValueError):
            raise ValueError(f'model {name!r}: expected JBU_<ks>_<scale_color>_<scale_space>, e.g. JBU_9_10_0.5')
        return JointBilateral(factor, channels, ks, scale_space=scale_space, scale_color=scale_color)
    if name not in _CLASSES:
        raise ValueError(f'model {name!r} is unknown; expected one of {", ".join(MODEL_NAMES)}')
    options = dict(normalize_kernel=normalize_kernel) if issubclass(_CLASSES[name], PacJointUpsample) else {}
    return _CLASSES[name](factor=factor, channels=channels, guide_channels=guide_channels, **options)
