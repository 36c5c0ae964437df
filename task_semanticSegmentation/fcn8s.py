"""FCN-8s backbones (VGG-16 based) with the layer names of the caffe / pytorch-fcn models.

Three variants share one layer layout, so one state_dict (39 keys, e.g. ``fcn8s_from_caffe.pth``)
loads into all of them:

- :class:`FCN8s`: the caffe-compatible net, padding 100 on conv1_1 and offset crops 5 / 9 / 31.
  Works for any input size.
- :class:`FCN8sAltPad`: "same" paddings and no crops; input sides must be multiples of 32.
- :class:`FCN8sPac`: AltPad geometry where conv3_3, conv4_3 and conv5_3 are :class:`pac.PacConv2d`
  guided by the relu2_2 features, and the final x8 upsampling is bilinear (``upscore8`` is kept in the
  state_dict but unused).

Expected input: BGR, 0-255 scale, mean-subtracted (see ``datasets.DeepLabInputs``).
"""
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import pac
import weights

__all__ = ['get_upsampling_weight', 'FCN8s', 'FCN8sAltPad', 'FCN8sPac', 'check_multiple_of_32']

# (name, in_channels, out_channels) of the 13 VGG-16 convolutions, grouped by pooling stage.
VGG16_STAGES = (
    (('conv1_1', 3, 64), ('conv1_2', 64, 64)),
    (('conv2_1', 64, 128), ('conv2_2', 128, 128)),
    (('conv3_1', 128, 256), ('conv3_2', 256, 256), ('conv3_3', 256, 256)),
    (('conv4_1', 256, 512), ('conv4_2', 512, 512), ('conv4_3', 512, 512)),
    (('conv5_1', 512, 512), ('conv5_2', 512, 512), ('conv5_3', 512, 512)),
)
PAC_LAYERS = ('conv3_3', 'conv4_3', 'conv5_3')
PAC_GUIDE_SCALE = 1e-4  # small guide => K ~ 1, so PAC layers start out as the plain convolutions


def get_upsampling_weight(in_channels: int, out_channels: int, kernel_size: int) -> torch.Tensor:
    """Bilinear upsampling kernel of FCN, placed on the channel diagonal only.

    Args:
        in_channels: input channels of the transposed convolution.
        out_channels: output channels.
        kernel_size: square kernel size, e.g. 4 for x2 or 16 for x8.

    Shape:
        Output: (in_channels, out_channels, kernel_size, kernel_size), float32.

    Example:
        >>> get_upsampling_weight(1, 1, 4)[0, 0, 0]
        tensor([0.0625, 0.1875, 0.1875, 0.0625])
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = np.ogrid[:kernel_size, :kernel_size]
    filt = (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)
    weight = np.zeros((in_channels, out_channels, kernel_size, kernel_size), dtype=np.float64)
    channels = np.arange(min(in_channels, out_channels))
    weight[channels, channels] = filt
    return torch.from_numpy(weight).float()


def check_multiple_of_32(x: torch.Tensor, model_name: str) -> None:
    """Raise a clear ValueError if the spatial size of ``x`` is not a multiple of 32."""
    if x.dim() != 4:
        raise ValueError(f'{model_name} expects input of shape (B, 3, H, W), got shape {tuple(x.shape)}')
    h, w = x.shape[-2:]
    if h % 32 or w % 32:
        raise ValueError(f'{model_name} needs input height and width that are multiples of 32 '
                         f'(5 poolings and no crops), got {h}x{w}; pad or crop the input, e.g. '
                         f'--test-crop 512')


def _zero_conv(in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> nn.Conv2d:
    # skip_init avoids the (slow, 134M-parameter) default init that would be overwritten anyway.
    conv = torch.nn.utils.skip_init(nn.Conv2d, in_channels, out_channels, kernel_size, padding=padding)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _bilinear_upscore(n_class: int, kernel_size: int, stride: int, padding: int) -> nn.ConvTranspose2d:
    up = torch.nn.utils.skip_init(nn.ConvTranspose2d, n_class, n_class, kernel_size, stride=stride,
                                  padding=padding, bias=False)
    with torch.no_grad():
        up.weight.copy_(get_upsampling_weight(n_class, n_class, kernel_size))
    return up


class FCN8s(nn.Module):
    """FCN-8s as converted from caffe: padding 100 on conv1_1, offset crops 5, 9 and 31.

    All convolutions start at zero and the upscore layers at the bilinear kernel; load
    ``fcn8s_from_caffe.pth`` for the trained weights.

    Args:
        n_class: number of output classes.

    Shape:
        - Input: (B, 3, H, W), any H and W.
        - Output: (B, n_class, H, W) logits.

    Example:
        >>> net = FCN8s(21)
        >>> net(torch.zeros(1, 3, 37, 41)).shape
        torch.Size([1, 21, 37, 41])
    """
    conv1_padding = 100
    fc6_padding = 0
    upscore2_padding = 0
    upscore8_padding = 0

    def __init__(self, n_class: int = 21):
        super().__init__()
        if isinstance(n_class, bool) or not isinstance(n_class, int) or n_class < 1:
            raise ValueError(f'n_class must be a positive int, got {n_class!r}')
        self.n_class = n_class
        for stage in VGG16_STAGES:
            for name, cin, cout in stage:
                padding = self.conv1_padding if name == 'conv1_1' else 1
                setattr(self, name, self._make_conv(name, cin, cout, padding))
        self.fc6 = _zero_conv(512, 4096, 7, padding=self.fc6_padding)
        self.drop6 = nn.Dropout2d(0.5)
        self.fc7 = _zero_conv(4096, 4096, 1)
        self.drop7 = nn.Dropout2d(0.5)
        self.score_fr = _zero_conv(4096, n_class, 1)
        self.score_pool3 = _zero_conv(256, n_class, 1)
        self.score_pool4 = _zero_conv(512, n_class, 1)
        self.upscore2 = _bilinear_upscore(n_class, 4, 2, self.upscore2_padding)
        self.upscore8 = _bilinear_upscore(n_class, 16, 8, self.upscore8_padding)
        self.upscore_pool4 = _bilinear_upscore(n_class, 4, 2, self.upscore2_padding)

    @staticmethod
    def download(cache_dir: Optional[Union[str, Path]] = None) -> Path:
        """Fetch the caffe-converted ``fcn8s_from_caffe.pth`` (md5-verified) and return its local path.

        It goes through the weights registry (``weights.resolve_weights('fcn8s_from_caffe')``): cached in
        ``cache_dir`` (default ``$PACNET_CACHE`` or ``~/.cache/pacnet``), from ``$PACNET_WEIGHTS_URL`` if set.
        """
        return weights.resolve_weights('fcn8s_from_caffe', cache_dir)

    def _make_conv(self, name: str, in_channels: int, out_channels: int, padding: int) -> nn.Module:
        return _zero_conv(in_channels, out_channels, 3, padding=padding)

    def _stage(self, stage_idx: int, h: torch.Tensor, guides: Dict[str, torch.Tensor]) -> torch.Tensor:
        for name, _, _ in VGG16_STAGES[stage_idx]:
            conv = getattr(self, name)
            h = conv(h, guides[name]) if name in guides else conv(h)
            h = F.relu(h, inplace=True)
        return h

    def _features(self, x: torch.Tensor, make_guides: Callable[[torch.Tensor], Dict[str, torch.Tensor]]
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VGG trunk; returns (pool3, pool4, score_fr)."""
        h = F.max_pool2d(self._stage(0, x, {}), 2, 2, ceil_mode=True)
        relu2_2 = self._stage(1, h, {})
        guides = make_guides(relu2_2)
        h = F.max_pool2d(relu2_2, 2, 2, ceil_mode=True)
        pool3 = F.max_pool2d(self._stage(2, h, guides), 2, 2, ceil_mode=True)
        pool4 = F.max_pool2d(self._stage(3, pool3, guides), 2, 2, ceil_mode=True)
        h = F.max_pool2d(self._stage(4, pool4, guides), 2, 2, ceil_mode=True)
        h = self.drop6(F.relu(self.fc6(h), inplace=True))
        h = self.drop7(F.relu(self.fc7(h), inplace=True))
        return pool3, pool4, self.score_fr(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool3, pool4, score = self._features(x, lambda relu2_2: {})
        upscore2 = self.upscore2(score)
        h = upscore2 + _crop(self.score_pool4(pool4), 5, upscore2.shape[-2:])
        upscore_pool4 = self.upscore_pool4(h)
        h = upscore_pool4 + _crop(self.score_pool3(pool3), 9, upscore_pool4.shape[-2:])
        return _crop(self.upscore8(h), 31, x.shape[-2:])


def _crop(x: torch.Tensor, offset: int, size) -> torch.Tensor:
    return x[:, :, offset:offset + size[0], offset:offset + size[1]]


class FCN8sAltPad(FCN8s):
    """FCN-8s with "same" paddings (conv1_1 pad 1, fc6 pad 3, exact x2 / x8 upscores) and no crops.

    Same keys and shapes as :class:`FCN8s`, but different geometry, so it is not numerically the same
    net. Input height and width must be multiples of 32.

    Args:
        n_class: number of output classes.

    Shape:
        - Input: (B, 3, H, W) with H, W multiples of 32.
        - Output: (B, n_class, H, W).

    Example:
        >>> FCN8sAltPad(21)(torch.zeros(1, 3, 64, 96)).shape
        torch.Size([1, 21, 64, 96])
    """
    conv1_padding = 1
    fc6_padding = 3
    upscore2_padding = 1
    upscore8_padding = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_multiple_of_32(x, type(self).__name__)
        pool3, pool4, score = self._features(x, self._guides)
        h = self.upscore2(score) + self.score_pool4(pool4)
        h = self.upscore_pool4(h) + self.score_pool3(pool3)
        return self._upsample8(h)

    def _guides(self, relu2_2: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {}

    def _upsample8(self, h: torch.Tensor) -> torch.Tensor:
        return self.upscore8(h)


class FCN8sPac(FCN8sAltPad):
    """FCN-8s with pixel-adaptive conv3_3, conv4_3 and conv5_3 ("hot-swapping", PacFCN).

    The guide is relu2_2 (128 channels, 1/2 resolution), bilinearly resized to 1/4, 1/8 and 1/16 and
    multiplied by 1e-4, so the adaptive kernels start close to 1 and FCN8s weights are a good start.
    The final x8 upsampling is bilinear interpolation; ``upscore8`` stays in the state_dict unused.

    Args:
        n_class: number of output classes.

    Shape:
        - Input: (B, 3, H, W) with H, W multiples of 32.
        - Output: (B, n_class, H, W).
    """

    def _make_conv(self, name: str, in_channels: int, out_channels: int, padding: int) -> nn.Module:
        if name in PAC_LAYERS:
            return pac.PacConv2d(in_channels, out_channels, 3, padding=padding)
        return super()._make_conv(name, in_channels, out_channels, padding)

    def _guides(self, relu2_2: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {name: PAC_GUIDE_SCALE * F.interpolate(relu2_2, scale_factor=scale, mode='bilinear',
                                                      align_corners=False)
                for name, scale in zip(PAC_LAYERS, (0.5, 0.25, 0.125))}

    def _upsample8(self, h: torch.Tensor) -> torch.Tensor:
        return F.interpolate(h, scale_factor=8, mode='bilinear', align_corners=False)
