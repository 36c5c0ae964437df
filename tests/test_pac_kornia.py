"""kornia's joint bilateral filter as an independent oracle for the normalised PacPool2d.

With a guide of positions / sigma_space and colours / sigma_color (``create_YXRGB``), the PAC Gaussian kernel
``exp(-0.5 * ||f_i - f_j||^2)`` is the bilateral kernel, so a normalised PacPool2d is
``kornia.filters.joint_bilateral_blur`` with the squared-L2 colour distance. The two handle borders differently
(PAC renormalises over the taps inside the image, kornia pads), so only the interior is compared.
kornia is an optional dependency (requirements-bench.txt): these tests are skipped without it.
"""
import pytest
import torch

import pac
from paccrf import create_YXRGB

kornia = pytest.importorskip('kornia')

DT = torch.float64
SIGMA_SPACE, SIGMA_COLOR = 2.3, 0.17  # neither is exact in binary: the guide must stay in float64


def _interior(t: torch.Tensor, kernel_size) -> torch.Tensor:
    ry, rx = kernel_size[0] // 2, kernel_size[1] // 2
    return t[..., ry:t.shape[-2] - ry, rx:t.shape[-1] - rx]


def _pac_and_kornia(kernel_size, impl, x, image):
    pool = pac.PacPool2d(kernel_size, padding=(kernel_size[0] // 2, kernel_size[1] // 2), normalize_kernel=True,
                         impl=impl)
    ours = pool(x, create_YXRGB(image, yx_scale=SIGMA_SPACE, rgb_scale=SIGMA_COLOR))
    theirs = kornia.filters.joint_bilateral_blur(x, image, kernel_size, SIGMA_COLOR, (SIGMA_SPACE, SIGMA_SPACE),
                                                 color_distance_type='l2')
    return _interior(ours, kernel_size), _interior(theirs, kernel_size)


@pytest.mark.parametrize('kernel_size', [(5, 5), (9, 9), (7, 3)])
def test_normalised_pool_is_joint_bilateral_blur(kernel_size, impl):
    torch.manual_seed(0)
    x, image = torch.randn(2, 4, 23, 31, dtype=DT), torch.rand(2, 3, 23, 31, dtype=DT)
    with torch.no_grad():
        ours, theirs = _pac_and_kornia(kernel_size, impl, x, image)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_normalised_pool_gradients_match_joint_bilateral_blur(impl):
    torch.manual_seed(1)
    x = torch.randn(1, 2, 17, 19, dtype=DT, requires_grad=True)
    image = torch.rand(1, 3, 17, 19, dtype=DT, requires_grad=True)
    ours, theirs = _pac_and_kornia((5, 5), impl, x, image)
    seed = torch.randn_like(ours)
    grads_ours = torch.autograd.grad((ours * seed).sum(), (x, image))
    grads_theirs = torch.autograd.grad((theirs * seed).sum(), (x, image))
    for g_ours, g_theirs in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-12)
