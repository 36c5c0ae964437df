"""Tests of pac.py against torch layers, the brute-force reference (pac_reference.py) and the spec.

Numerics are compared in float64; both implementations (the ``impl`` fixture: 'unfold', and 'taps' with its CPU
loops compiled and as torch operations) are run wherever the option exists. Spec = the spec, section 1.
"""
import pytest
import torch
import torch.nn as nn

import pac
from layer_helpers import max_abs_over_resets, rand, randomise_kernel_params, unpack
from pac import PacConv2d, PacConvTranspose2d, PacPool2d, packernel2d, pacconv2d, pacconv_transpose2d, pacpool2d
from pac_reference import (gaussian_2d, ref_im2col, ref_kernel, ref_pacconv2d,
                           ref_pacconv_transpose2d, ref_pacpool2d, smoothing_kernel)

DT = torch.float64
KERNEL_TYPES = ['gaussian', 'inv_0.2_0.2', 'inv_1_-1', 'inv_0.5_-0.5_asym', 'inv_0.2_0.2_asym_fixed']
SMOOTH_TYPES = ['gaussian', 'average_3', 'average_5', 'average_7', 'full_3']
GEOMETRIES = [(3, 1, 1, 1), (5, 2, 4, 2), (3, 2, 0, 1), (5, 1, 3, 1)]  # (k, s, p, d) of spec 1.9
# modules enforce padding <= d * (k - 1) / 2, which (5, 1, 3, 1) breaks (see test_pac_errors.py)
MODULE_GEOMETRIES = GEOMETRIES[:3] + [(5, 1, 2, 1)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def module_kernel_params(module):
    """Learnable/registered kernel parameters of ``module`` as reference keyword arguments."""
    return dict(inv_alpha=getattr(module, 'inv_alpha', None), inv_lambda=getattr(module, 'inv_lambda', None),
                smooth_kernel=getattr(module, 'smooth_kernel', None))


def check_module_against_reference(module, x, guide, mask=None, **geometry):
    """Run ``module`` on (x, guide[, mask]) and compare output and output mask with the reference."""
    randomise_kernel_params(module)
    out, out_mask = unpack(module(x, guide, mask=mask) if mask is not None else module(x, guide))
    kernel, ref_mask = ref_kernel(guide.detach(), mask=mask, **geometry, **module_kernel_params(module))
    transposed = geometry.get('transposed', False)
    if isinstance(module, PacPool2d):
        expected = ref_pacpool2d(x, kernel, geometry['kernel_size'], geometry.get('stride', 1),
                                 geometry.get('padding', 0), geometry.get('dilation', 1))
    elif transposed:
        expected = ref_pacconv_transpose2d(x, kernel, module.weight, module.bias, geometry.get('stride', 1),
                                           geometry.get('padding', 0), geometry.get('output_padding', 0),
                                           geometry.get('dilation', 1), module.shared_filters)
    else:
        expected = ref_pacconv2d(x, kernel, module.weight, module.bias, geometry.get('stride', 1),
                                 geometry.get('padding', 0), geometry.get('dilation', 1), module.shared_filters,
                                 getattr(module, 'groups', 1), geometry.get('padding_mode', 'zeros'))
    torch.testing.assert_close(out, expected)
    if mask is None:
        assert out_mask is None
    else:
        assert out_mask is not None, 'a masked call must return (output, output_mask)'
        assert out_mask.shape == ref_mask.shape
        torch.testing.assert_close(out_mask.to(DT), ref_mask)
    return out


# ---------------------------------------------------------------- constant guide == torch layers


@pytest.mark.parametrize('args', [dict(kernel_size=5, stride=2, padding=4, dilation=2), dict(kernel_size=3)],
                         ids=['k5s2p4d2', 'defaults'])
def test_conv_with_constant_guide_equals_conv2d(impl, args):
    pac_conv = PacConv2d(4, 3, impl=impl, **args).double()
    conv = nn.Conv2d(4, 3, **args).double()
    with torch.no_grad():
        conv.weight.copy_(pac_conv.weight)
        conv.bias.copy_(pac_conv.bias)
    x = rand(2, 4, 17, 15)
    out = pac_conv(x, torch.ones(2, 5, 17, 15, dtype=DT))
    torch.testing.assert_close(out, conv(x))


@pytest.mark.parametrize('k,s,p,op,d', [(5, 2, 2, 1, 1), (3, 2, 1, 1, 1), (3, 1, 1, 0, 1), (5, 3, 2, 2, 2),
                                        (3, 2, 0, 0, 2), (5, 4, 1, 3, 1)])
def test_conv_transpose_with_constant_guide_equals_flipped_conv_transpose2d(impl, k, s, p, op, d):
    pac_conv = PacConvTranspose2d(3, 2, k, s, p, op, d, impl=impl).double()
    conv = nn.ConvTranspose2d(3, 2, k, s, p, op, dilation=d).double()
    with torch.no_grad():
        conv.weight.copy_(pac_conv.weight.flip(-2, -1))
        conv.bias.copy_(pac_conv.bias)
    x = rand(2, 3, 5, 4)
    expected = conv(x)
    out = pac_conv(x, torch.ones(2, 2, *expected.shape[-2:], dtype=DT))
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)


def test_conv_transpose_weight_is_not_flipped(impl):
    """Released weights rely on the no-flip convention: the unflipped weight must NOT match torch."""
    pac_conv = PacConvTranspose2d(2, 2, 3, 2, 1, 1, impl=impl).double()
    conv = nn.ConvTranspose2d(2, 2, 3, 2, 1, 1).double()
    with torch.no_grad():
        conv.weight.copy_(pac_conv.weight)
        conv.bias.copy_(pac_conv.bias)
    x = rand(1, 2, 4, 4)
    assert (pac_conv(x, torch.ones(1, 1, 8, 8, dtype=DT)) - conv(x)).abs().max() > 1e-3


@pytest.mark.parametrize('k,s,p,d', [(5, 2, 2, 1), (3, 1, 1, 1), (3, 2, 0, 1)])
def test_pool_with_constant_guide_is_k2_times_average(impl, k, s, p, d):
    x = rand(2, 4, 9, 10)
    out = PacPool2d(k, s, p, d, impl=impl)(x, torch.ones(2, 3, 9, 10, dtype=DT))
    torch.testing.assert_close(out, k * k * nn.AvgPool2d(k, s, p, count_include_pad=True)(x))


@pytest.mark.parametrize('k,s,p', [(5, 2, 2), (3, 1, 1), (3, 2, 1)])
def test_normalised_pool_with_constant_guide_is_average_without_padding(impl, k, s, p):
    x = rand(2, 4, 9, 10)
    pool = PacPool2d(k, s, p, normalize_kernel=True, impl=impl)
    out = pool(x, torch.ones(2, 3, 9, 10, dtype=DT))
    torch.testing.assert_close(out, nn.AvgPool2d(k, s, p, count_include_pad=False)(x))


def test_pool_stride_defaults_to_one():
    assert PacPool2d(3).stride == (1, 1)


# ---------------------------------------------------------------- the kernel against the reference


@pytest.mark.parametrize('kernel_type', KERNEL_TYPES)
@pytest.mark.parametrize('k', [3, 5])
def test_conv_kernel_types_match_reference(impl, kernel_type, k):
    module = PacConv2d(2, 3, k, padding=k // 2, kernel_type=kernel_type, impl=impl).double()
    check_module_against_reference(module, rand(2, 2, 5, 6), rand(2, 3, 5, 6),
                                   kernel_size=k, padding=k // 2, kernel_type=kernel_type)


@pytest.mark.parametrize('smooth', SMOOTH_TYPES)
@pytest.mark.parametrize('k', [3, 5])
def test_conv_smoothing_matches_reference(impl, smooth, k):
    module = PacConv2d(2, 2, k, padding=k // 2, smooth_kernel_type=smooth, impl=impl).double()
    check_module_against_reference(module, rand(1, 2, 6, 5), rand(1, 2, 6, 5), kernel_size=k, padding=k // 2)


@pytest.mark.parametrize('smooth', ['average_3', 'full_3'])
def test_smoothing_with_inv_kernel_and_normalisation(impl, smooth):
    kernel_type = 'inv_0.5_-1_asym'
    module = PacConv2d(2, 2, 3, stride=2, padding=1, kernel_type=kernel_type, smooth_kernel_type=smooth,
                       normalize_kernel=True, impl=impl).double()
    check_module_against_reference(module, rand(2, 2, 7, 6), rand(2, 3, 7, 6), kernel_size=3, stride=2,
                                   padding=1, kernel_type=kernel_type, normalize_kernel=True)


@pytest.mark.parametrize('kernel_type,smooth', [('gaussian', 'gaussian'), ('inv_1_-1', 'none'),
                                                ('inv_0.2_0.2_asym', 'average_5'), ('gaussian', 'full_3')])
def test_conv_transpose_kernel_types_and_smoothing_match_reference(impl, kernel_type, smooth):
    module = PacConvTranspose2d(2, 3, 3, 2, 1, 1, kernel_type=kernel_type, smooth_kernel_type=smooth,
                                impl=impl).double()
    check_module_against_reference(module, rand(2, 2, 3, 4), rand(2, 2, 6, 8), kernel_size=3, stride=2,
                                   padding=1, output_padding=1, transposed=True, kernel_type=kernel_type)


def test_smoothing_with_dilation_works_or_is_rejected_clearly(impl):
    """The 2019 code crashed deep inside torch here; either a correct result or a clear ValueError."""
    try:
        module = PacConv2d(1, 1, 3, padding=2, dilation=2, smooth_kernel_type='average_3',
                           impl=impl).double()
        x, guide = rand(1, 1, 6, 6), rand(1, 2, 6, 6)
        module(x, guide)
    except ValueError as error:
        assert 'dilation' in str(error)
        return
    check_module_against_reference(module, x, guide, kernel_size=3, padding=2, dilation=2)


@pytest.mark.parametrize('k,s,p,d', GEOMETRIES)
@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_packernel2d_geometries_match_reference(impl, k, s, p, d, normalize):
    guide = rand(2, 3, 9, 8)
    kernel, out_mask = packernel2d(guide, kernel_size=k, stride=s, padding=p, dilation=d,
                                   normalize_kernel=normalize, impl=impl)
    expected, _ = ref_kernel(guide, k, s, p, d, normalize_kernel=normalize)
    assert out_mask is None
    torch.testing.assert_close(kernel, expected)


@pytest.mark.parametrize('kernel_type', ['gaussian', 'inv_0.3_-1', 'inv_0.2_0.2_asym'])
def test_packernel2d_channel_wise_matches_reference(impl, kernel_type):
    guide = rand(2, 3, 6, 5)
    alpha, lam = (None, None) if kernel_type == 'gaussian' else (rand(3).abs(), -rand(3).abs())
    kernel, _ = packernel2d(guide, kernel_size=3, padding=1, kernel_type=kernel_type, inv_alpha=alpha,
                            inv_lambda=lam, channel_wise=True, impl=impl)
    expected, _ = ref_kernel(guide, 3, padding=1, kernel_type=kernel_type, inv_alpha=alpha, inv_lambda=lam,
                             channel_wise=True)
    assert kernel.shape == (2, 3, 3, 3, 6, 5)
    torch.testing.assert_close(kernel, expected)


@pytest.mark.parametrize('k,s,p,op,d', [(3, 2, 1, 1, 1), (5, 2, 2, 1, 1), (3, 3, 1, 2, 1), (3, 2, 2, 1, 2)])
@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_packernel2d_transposed_matches_reference(impl, k, s, p, op, d, normalize):
    in_h, in_w = 3, 4
    out_size = [(n - 1) * s - 2 * p + d * (k - 1) + 1 + op for n in (in_h, in_w)]
    guide = rand(2, 2, *out_size)
    mask = (torch.rand(2, 1, in_h, in_w) > 0.3).to(DT)
    for m in (None, mask):
        kernel, out_mask = packernel2d(guide, m, kernel_size=k, stride=s, padding=p, output_padding=op,
                                       dilation=d, normalize_kernel=normalize, transposed=True,
                                       impl=impl)
        expected, ref_mask = ref_kernel(guide, k, s, p, d, normalize_kernel=normalize, transposed=True,
                                        output_padding=op, mask=m)
        torch.testing.assert_close(kernel, expected)
        if m is not None:
            torch.testing.assert_close(out_mask.to(DT), ref_mask)


# ---------------------------------------------------------------- module options against the reference


@pytest.mark.parametrize('k,s,p,d', MODULE_GEOMETRIES)
def test_conv_geometries_match_reference(impl, k, s, p, d):
    module = PacConv2d(2, 3, k, s, p, d, normalize_kernel=True, impl=impl).double()
    check_module_against_reference(module, rand(2, 2, 8, 7), rand(2, 2, 8, 7), kernel_size=k, stride=s,
                                   padding=p, dilation=d, normalize_kernel=True)


@pytest.mark.parametrize('k,s,p,d', MODULE_GEOMETRIES)
def test_pool_geometries_match_reference(impl, k, s, p, d):
    module = PacPool2d(k, s, p, d, impl=impl)
    check_module_against_reference(module, rand(2, 3, 8, 7), rand(2, 2, 8, 7), kernel_size=k, stride=s,
                                   padding=p, dilation=d)


@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_conv_mask_and_output_mask_match_reference(impl, normalize):
    x, guide = rand(2, 2, 7, 6), rand(2, 3, 7, 6)
    mask = (torch.rand(2, 1, 7, 6) > 0.6).to(DT)
    mask[0, :, :4, :] = 0  # some output pixels see no valid input at all
    module = PacConv2d(2, 3, 3, 1, 1, normalize_kernel=normalize, impl=impl).double()
    check_module_against_reference(module, x, guide, mask, kernel_size=3, padding=1, normalize_kernel=normalize)


@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_conv_transpose_mask_and_output_mask_match_reference(impl, normalize):
    x, guide = rand(2, 2, 3, 4), rand(2, 3, 6, 8)
    mask = (torch.rand(2, 1, 3, 4) > 0.4).to(DT)
    module = PacConvTranspose2d(2, 3, 3, 2, 1, 1, normalize_kernel=normalize, impl=impl).double()
    check_module_against_reference(module, x, guide, mask, kernel_size=3, stride=2, padding=1,
                                   output_padding=1, transposed=True, normalize_kernel=normalize)


@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_pool_mask_and_output_mask_match_reference(impl, normalize):
    x, guide = rand(2, 3, 7, 6), rand(2, 2, 7, 6)
    mask = (torch.rand(2, 1, 7, 6) > 0.5).to(DT)
    module = PacPool2d(3, 2, 1, normalize_kernel=normalize, impl=impl)
    check_module_against_reference(module, x, guide, mask, kernel_size=3, stride=2, padding=1,
                                   normalize_kernel=normalize)


@pytest.mark.parametrize('layer', ['conv_transpose', 'conv_masked', 'pool_masked'])
def test_normalised_kernel_of_far_apart_features_in_float32(impl, layer):
    """Guide features so far apart (two levels per channel, 20 apart) that exp(-d^2 / 2) underflows in float32 on
    every valid tap of some windows (a transposed layer's windows between input pixels; windows whose centre is masked):
    the normalised kernel still sums to one there, and output and gradients match the float64 reference, which
    does not underflow."""
    def far_apart(*shape):
        return (20 * torch.randint(0, 2, shape, dtype=DT) + torch.rand(shape, dtype=DT)).requires_grad_()

    geometry = dict(kernel_size=5, stride=2, padding=2, normalize_kernel=True)
    mask = None
    if layer == 'conv_transpose':
        geometry.update(output_padding=1, transposed=True)
        x, guide = rand(2, 2, 5, 4, grad=True), far_apart(2, 3, 10, 8)
        module = PacConvTranspose2d(2, 3, 5, 2, 2, 1, normalize_kernel=True, impl=impl)
    else:
        x, guide = rand(2, 2, 9, 8, grad=True), far_apart(2, 3, 9, 8)
        mask = (torch.rand(2, 1, 9, 8) > 0.7).to(DT)
        module = (PacConv2d(2, 3, 5, 2, 2, normalize_kernel=True, impl=impl) if layer == 'conv_masked' else
                  PacPool2d(5, 2, 2, normalize_kernel=True, impl=impl))
    naive32, _ = ref_kernel(guide.detach().float(), mask=None if mask is None else mask.float(), **geometry)
    assert (naive32.sum((2, 3)) == 0).any(), 'the case must underflow in float32 when computed naively'
    kernel, _ = ref_kernel(guide, mask=mask, **geometry)
    if layer == 'conv_transpose':
        expected = ref_pacconv_transpose2d(x, kernel, module.weight.double(), module.bias.double(), 2, 2, 1)
    elif layer == 'conv_masked':
        expected = ref_pacconv2d(x, kernel, module.weight.double(), module.bias.double(), 2, 2)
    else:
        expected = ref_pacpool2d(x, kernel, 5, 2, 2)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (x, guide))
    out, _ = unpack(module(x.float(), guide.float()) if mask is None else module(x.float(), guide.float(),
                                                                                   mask=mask.float()))
    grads = torch.autograd.grad((out * upstream.float()).sum(), (x, guide))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-3, atol=1e-3)


def test_normalised_kernel_with_centres_in_the_padding_in_float32(impl):
    """packernel2d with a padding wider than the window's half: some windows' centres fall in the padding, and with
    far-apart guide features every valid tap of theirs underflows in float32 when computed naively."""
    guide = (20 * torch.randint(0, 2, (2, 3, 6, 5), dtype=DT) + torch.rand(2, 3, 6, 5, dtype=DT)).requires_grad_()
    geometry = dict(kernel_size=5, padding=4, normalize_kernel=True)
    naive32, _ = ref_kernel(guide.detach().float(), **geometry)
    assert (naive32.sum((2, 3)) == 0).any(), 'the case must underflow in float32 when computed naively'
    expected, _ = ref_kernel(guide, **geometry)
    kernel, _ = packernel2d(guide.float(), impl=impl, **geometry)
    torch.testing.assert_close(kernel.double(), expected, rtol=1e-4, atol=1e-5)
    upstream = torch.randn_like(expected)
    expected_grad, = torch.autograd.grad((expected * upstream).sum(), guide)
    grad, = torch.autograd.grad((kernel * upstream.float()).sum(), guide)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-3, atol=1e-3)


def test_bool_mask_is_accepted(impl):
    x, guide = rand(1, 2, 5, 5), rand(1, 2, 5, 5)
    mask = torch.rand(1, 1, 5, 5) > 0.5
    module = PacConv2d(2, 2, 3, padding=1, impl=impl).double()
    out, _ = module(x, guide, mask=mask)
    expected, _ = module(x, guide, mask=mask.to(DT))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize('kernel_type', ['gaussian', 'inv_0.2_0.2_asym', 'inv_1_-1_fixed'])
def test_channel_wise_pool_matches_reference(impl, kernel_type):
    module = PacPool2d(3, 1, 1, kernel_type=kernel_type, channel_wise=True, out_channels=3,
                       normalize_kernel=True, impl=impl).double()
    check_module_against_reference(module, rand(2, 3, 6, 5), rand(2, 3, 6, 5), kernel_size=3, padding=1,
                                   kernel_type=kernel_type, channel_wise=True, normalize_kernel=True)


def test_conv_shared_filters_match_reference(impl):
    module = PacConv2d(3, 3, 3, 2, 1, shared_filters=True, impl=impl).double()
    assert module.weight.shape == (1, 1, 3, 3)
    check_module_against_reference(module, rand(2, 3, 7, 6), rand(2, 2, 7, 6), kernel_size=3, stride=2, padding=1)


def test_conv_transpose_shared_filters_match_reference(impl):
    module = PacConvTranspose2d(3, 3, 5, 2, 2, 1, shared_filters=True, impl=impl).double()
    check_module_against_reference(module, rand(2, 3, 3, 4), rand(2, 2, 6, 8), kernel_size=5, stride=2,
                                   padding=2, output_padding=1, transposed=True)


@pytest.mark.parametrize('in_ch,out_ch,groups', [(4, 6, 2), (3, 3, 3), (4, 2, 2)])
def test_conv_groups_match_reference(impl, in_ch, out_ch, groups):
    module = PacConv2d(in_ch, out_ch, 3, padding=1, impl=impl, groups=groups).double()
    assert module.weight.shape == (out_ch, in_ch // groups, 3, 3)
    check_module_against_reference(module, rand(2, in_ch, 5, 6), rand(2, 2, 5, 6), kernel_size=3, padding=1)


@pytest.mark.parametrize('mode', ['zeros', 'reflect', 'replicate', 'circular'])
@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_conv_padding_mode_matches_reference(impl, mode, normalize):
    module = PacConv2d(2, 3, 3, 2, 2, 2, normalize_kernel=normalize, impl=impl,
                       padding_mode=mode).double()
    check_module_against_reference(module, rand(2, 2, 6, 7), rand(2, 2, 6, 7), kernel_size=3, stride=2,
                                   padding=2, dilation=2, normalize_kernel=normalize, padding_mode=mode)


def test_conv_padding_mode_with_constant_guide_equals_conv2d(impl):
    pac_conv = PacConv2d(2, 3, 3, padding=1, impl=impl, padding_mode='reflect').double()
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode='reflect').double()
    with torch.no_grad():
        conv.weight.copy_(pac_conv.weight)
        conv.bias.copy_(pac_conv.bias)
    x = rand(1, 2, 6, 5)
    torch.testing.assert_close(pac_conv(x, torch.ones(1, 1, 6, 5, dtype=DT)), conv(x))


def test_non_contiguous_and_channels_last_inputs(impl):
    module = PacConv2d(3, 2, 3, 2, 1, normalize_kernel=True, impl=impl).double()
    x, guide = rand(2, 3, 7, 6), rand(2, 2, 7, 6)
    expected = module(x, guide)
    torch.testing.assert_close(module(x.transpose(2, 3).contiguous().transpose(2, 3),
                                      guide.transpose(2, 3).contiguous().transpose(2, 3)), expected)
    torch.testing.assert_close(module(x.contiguous(memory_format=torch.channels_last),
                                      guide.contiguous(memory_format=torch.channels_last)), expected)


# ---------------------------------------------------------------- precomputed kernels


def test_conv_precomputed_kernel_matches_reference(impl):
    module = PacConv2d(2, 3, 3, 2, 1, impl=impl).double()
    x = rand(2, 2, 7, 6)
    kernel = torch.rand(2, 1, 3, 3, 4, 3, dtype=DT)
    out = module(x, None, kernel)
    torch.testing.assert_close(out, ref_pacconv2d(x, kernel, module.weight, module.bias, 2, 1))


def test_conv_transpose_precomputed_kernel_matches_reference(impl):
    module = PacConvTranspose2d(2, 3, 3, 2, 1, 1, impl=impl).double()
    x = rand(2, 2, 3, 4)
    kernel = torch.rand(2, 1, 3, 3, 6, 8, dtype=DT)
    out = module(x, None, kernel)
    torch.testing.assert_close(out, ref_pacconv_transpose2d(x, kernel, module.weight, module.bias, 2, 1, 1))


@pytest.mark.parametrize('kernel_channels', [1, 3])
def test_pool_precomputed_kernel_matches_reference(impl, kernel_channels):
    channel_wise = kernel_channels > 1
    module = PacPool2d(3, 2, 2, 2, channel_wise=channel_wise, out_channels=3 if channel_wise else -1,
                       impl=impl)
    x = rand(2, 3, 8, 7)
    kernel = torch.rand(2, kernel_channels, 3, 3, 4, 4, dtype=DT)
    torch.testing.assert_close(module(x, None, kernel), ref_pacpool2d(x, kernel, 3, 2, 2, 2))


def test_functional_forms_match_reference(impl):
    x, guide = rand(2, 2, 6, 5), rand(2, 3, 6, 5)
    weight, bias = rand(4, 2, 3, 3), rand(4)
    kernel, _ = packernel2d(guide, kernel_size=3, padding=1, impl=impl)
    ref_k, _ = ref_kernel(guide, 3, padding=1)
    torch.testing.assert_close(pacconv2d(x, kernel, weight, bias, padding=1, impl=impl),
                               ref_pacconv2d(x, ref_k, weight, bias, padding=1))
    torch.testing.assert_close(pacpool2d(x, kernel, 3, padding=1, impl=impl),
                               ref_pacpool2d(x, ref_k, 3, padding=1))
    t_guide = rand(2, 3, 12, 10)
    t_kernel, _ = packernel2d(t_guide, kernel_size=3, stride=2, padding=1, output_padding=1, transposed=True,
                              impl=impl)
    t_weight = rand(2, 4, 3, 3)
    out = pacconv_transpose2d(x, t_kernel, t_weight, bias, 2, 1, 1, impl=impl)
    ref_t, _ = ref_kernel(t_guide, 3, 2, 1, transposed=True, output_padding=1)
    torch.testing.assert_close(out, ref_pacconv_transpose2d(x, ref_t, t_weight, bias, 2, 1, 1))


def test_nd2col_matches_reference():
    x = rand(2, 3, 7, 6)
    torch.testing.assert_close(pac.nd2col(x, (3, 3), 2, 2, dilation=2), ref_im2col(x, 3, 2, 2, 2))
    mask = rand(2, 1, 3, 4)  # the transposed form is used on 1-channel masks
    torch.testing.assert_close(pac.nd2col(mask, 3, 2, 1, 1, 1, transposed=True),
                               ref_im2col(mask, 3, 2, 1, 1, transposed=True, output_padding=1))
    torch.testing.assert_close(pac.nd2col(mask, 3, 3, 1, 2, 2, transposed=True),
                               ref_im2col(mask, 3, 3, 1, 2, transposed=True, output_padding=2))


def test_np_gaussian_2d_matches_reference():
    for width, sigma in [(5, -1), (3, -1), (7, 1.5)]:
        torch.testing.assert_close(torch.from_numpy(pac.np_gaussian_2d(width, sigma)).double(),
                                   torch.tensor(gaussian_2d(width, sigma), dtype=DT), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- gradients (float64 gradcheck)


def gradcheck(fn, inputs, fast_mode=True):
    """float64 gradcheck; fast mode (random projections of the Jacobian) keeps the default run quick."""
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-3, fast_mode=fast_mode)


@pytest.mark.parametrize('options', [dict(), dict(kernel_type='inv_0.5_-1_asym'), dict(smooth_kernel_type='full_3'),
                                     dict(normalize_kernel=True), dict(kernel_type='inv_0.2_0.2',
                                                                       normalize_kernel=True)],
                         ids=['gaussian', 'inv_asym', 'full_3', 'normalised', 'inv_normalised'])
def test_conv_gradcheck_all_inputs(impl, options):
    x, guide = rand(1, 2, 5, 5, grad=True), rand(1, 2, 5, 5, grad=True)
    weight, bias = rand(2, 2, 3, 3, grad=True), rand(2, grad=True)
    smooth = torch.rand(1, 1, 3, 3, dtype=DT, requires_grad=True) if 'smooth_kernel_type' in options else None
    alpha, lam = (torch.tensor(0.5, dtype=DT, requires_grad=True), torch.tensor(-1.0, dtype=DT, requires_grad=True))
    inv = options.get('kernel_type', 'gaussian').startswith('inv')

    def fn(x, guide, weight, bias, *extra):
        params = dict(zip(['smooth_kernel'] if smooth is not None else ['inv_alpha', 'inv_lambda'], extra))
        kernel, _ = packernel2d(guide, kernel_size=3, stride=2, padding=1, impl=impl, **options,
                                **params)
        return pacconv2d(x, kernel, weight, bias, 2, 1, impl=impl)

    extra = (smooth,) if smooth is not None else ((alpha, lam) if inv else ())
    gradcheck(fn, (x, guide, weight, bias) + extra)


def test_conv_module_gradcheck_with_mask(impl):
    module = PacConv2d(2, 2, 3, padding=1, normalize_kernel=True, impl=impl).double()
    mask = (torch.rand(1, 1, 5, 5) > 0.3).to(DT)
    x, guide = rand(1, 2, 5, 5, grad=True), rand(1, 2, 5, 5, grad=True)
    gradcheck(lambda x, guide: module(x, guide, mask=mask)[0], (x, guide))


def test_conv_gradcheck_precomputed_kernel(impl):
    x, kernel = rand(1, 2, 6, 6, grad=True), torch.rand(1, 1, 3, 3, 3, 3, dtype=DT, requires_grad=True)
    weight, bias = rand(3, 2, 3, 3, grad=True), rand(3, grad=True)
    gradcheck(lambda *a: pacconv2d(*a, stride=2, padding=2, dilation=2, impl=impl),
              (x, kernel, weight, bias))


@pytest.mark.parametrize('options', [dict(), dict(normalize_kernel=True), dict(kernel_type='inv_1_-1')],
                         ids=['gaussian', 'normalised', 'inv'])
def test_conv_transpose_gradcheck_all_inputs(impl, options):
    x, guide = rand(1, 2, 3, 3, grad=True), rand(1, 2, 6, 6, grad=True)
    weight, bias = rand(2, 3, 3, 3, grad=True), rand(3, grad=True)

    inv = dict(inv_alpha=torch.tensor(1.0, dtype=DT), inv_lambda=torch.tensor(-1.0, dtype=DT))

    def fn(x, guide, weight, bias):
        kernel, _ = packernel2d(guide, kernel_size=3, stride=2, padding=1, output_padding=1, transposed=True,
                                impl=impl, **options, **(inv if 'kernel_type' in options else {}))
        return pacconv_transpose2d(x, kernel, weight, bias, 2, 1, 1, impl=impl)

    gradcheck(fn, (x, guide, weight, bias))


def test_conv_transpose_gradcheck_precomputed_kernel_shared_and_mask(impl):
    x, kernel = rand(1, 2, 3, 3, grad=True), torch.rand(1, 1, 3, 3, 6, 6, dtype=DT, requires_grad=True)
    weight, bias = rand(1, 1, 3, 3, grad=True), rand(2, grad=True)
    gradcheck(lambda *a: pacconv_transpose2d(*a, stride=2, padding=1, output_padding=1, shared_filters=True,
                                             impl=impl), (x, kernel, weight, bias))
    module = PacConvTranspose2d(2, 2, 3, 2, 1, 1, impl=impl).double()
    mask = (torch.rand(1, 1, 3, 3) > 0.3).to(DT)
    guide = rand(1, 2, 6, 6, grad=True)
    gradcheck(lambda x, guide: module(x, guide, mask=mask)[0], (x, guide))


@pytest.mark.parametrize('options', [dict(), dict(normalize_kernel=True, smooth_kernel_type='average_3'),
                                     dict(channel_wise=True, kernel_type='inv_0.5_-1', out_channels=2)],
                         ids=['gaussian', 'normalised_smooth', 'channel_wise_inv'])
def test_pool_gradcheck(impl, options):
    module = PacPool2d(3, 2, 2, 2, impl=impl, **options).double()
    x, guide = rand(1, 2, 6, 6, grad=True), rand(1, 2, 6, 6, grad=True)
    gradcheck(lambda x, guide: module(x, guide), (x, guide))
    kernel = torch.rand(1, 2 if options.get('channel_wise') else 1, 3, 3, 3, 3, dtype=DT, requires_grad=True)
    gradcheck(lambda x, kernel: module(x, None, kernel), (x, kernel))


def test_module_parameters_receive_gradients(impl):
    module = PacConv2d(2, 2, 3, padding=1, kernel_type='inv_0.5_-1', smooth_kernel_type='full_3',
                       impl=impl).double()
    module(rand(1, 2, 5, 5), rand(1, 2, 5, 5)).square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.slow
def test_full_gradcheck_conv_transpose_and_pool(impl):
    """The complete (non-fast) float64 gradcheck of every differentiable input, on tiny shapes."""
    x, guide = rand(1, 2, 4, 4, grad=True), rand(1, 2, 4, 4, grad=True)
    weight, bias = rand(2, 2, 3, 3, grad=True), rand(2, grad=True)
    alpha, lam = torch.tensor(0.5, dtype=DT, requires_grad=True), torch.tensor(-1.0, dtype=DT, requires_grad=True)

    def conv(x, guide, weight, bias, alpha, lam):
        kernel, _ = packernel2d(guide, kernel_size=3, padding=1, kernel_type='inv_0.5_-1_asym', inv_alpha=alpha,
                                inv_lambda=lam, normalize_kernel=True, impl=impl)
        return pacconv2d(x, kernel, weight, bias, padding=1, impl=impl)

    gradcheck(conv, (x, guide, weight, bias, alpha, lam), fast_mode=False)
    t_guide = rand(1, 2, 8, 8, grad=True)

    def conv_transpose(x, guide, weight, bias):
        kernel, _ = packernel2d(guide, kernel_size=3, stride=2, padding=1, output_padding=1, transposed=True,
                                impl=impl)
        return pacconv_transpose2d(x, kernel, weight, bias, 2, 1, 1, impl=impl)

    gradcheck(conv_transpose, (x, t_guide, weight, bias), fast_mode=False)
    smooth = torch.rand(1, 1, 3, 3, dtype=DT, requires_grad=True)

    def pool(x, guide, smooth):
        kernel, _ = packernel2d(guide, kernel_size=3, stride=2, padding=1, smooth_kernel_type='full_3',
                                smooth_kernel=smooth, channel_wise=True, impl=impl)
        return pacpool2d(x, kernel, 3, 2, 1, impl=impl)

    gradcheck(pool, (x, guide, smooth), fast_mode=False)


# ---------------------------------------------------------------- the two implementations agree


def run_both(make_module, inputs):
    """Outputs and input/parameter gradients of both implementations on the same float32 data."""
    results = []
    for impl in ('unfold', 'taps'):
        torch.manual_seed(1)
        module = make_module(impl)
        # x, guide and a precomputed kernel get gradients; a mask (4th input) does not
        leaves = [t.detach().clone().requires_grad_(position < 3) if t is not None else None
                  for position, t in enumerate(inputs)]
        out = module(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads = [t.grad for t in leaves if t is not None and t.requires_grad]
        grads += [p.grad for p in module.parameters()]
        results.append((out, grads))
    return results


def assert_impls_agree(make_module, inputs):
    (out_a, grads_a), (out_b, grads_b) = run_both(make_module, inputs)
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    assert len(grads_a) == len(grads_b)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('options', [dict(), dict(kernel_type='inv_0.2_0.2_asym', smooth_kernel_type='full_3',
                                                  normalize_kernel=True)], ids=['gaussian', 'inv_smooth_norm'])
def test_impls_agree_conv(options):
    assert_impls_agree(lambda n: PacConv2d(4, 3, 3, 2, 2, 2, impl=n, **options),
                       [torch.randn(2, 4, 32, 30), torch.randn(2, 3, 32, 30)])


def test_impls_agree_conv_precomputed_kernel_and_groups():
    assert_impls_agree(lambda n: PacConv2d(4, 6, 3, 1, 1, impl=n, groups=2),
                       [torch.randn(2, 4, 24, 20), None, torch.rand(2, 1, 3, 3, 24, 20)])


@pytest.mark.parametrize('shared', [False, True])
def test_impls_agree_conv_transpose(shared):
    assert_impls_agree(lambda n: PacConvTranspose2d(3, 3, 5, 2, 2, 1, shared_filters=shared, impl=n),
                       [torch.randn(2, 3, 14, 12), torch.randn(2, 2, 28, 24)])


def test_impls_agree_conv_transpose_masked_normalised():
    mask = (torch.rand(2, 1, 14, 12) > 0.3).float()
    assert_impls_agree(lambda n: PacConvTranspose2d(3, 2, 3, 2, 1, 1, normalize_kernel=True, impl=n),
                       [torch.randn(2, 3, 14, 12), torch.randn(2, 2, 28, 24), None, mask])


@pytest.mark.parametrize('channel_wise', [False, True])
def test_impls_agree_pool(channel_wise):
    assert_impls_agree(lambda n: PacPool2d(3, 2, 2, 2, channel_wise=channel_wise, kernel_type='inv_0.5_-0.5',
                                           out_channels=4 if channel_wise else -1, impl=n),
                       [torch.randn(2, 4, 32, 30), torch.randn(2, 4, 32, 30)])


def test_impls_agree_packernel2d():
    guide = torch.randn(2, 8, 48, 40)
    results = []
    for impl in ('unfold', 'taps'):
        g = guide.clone().requires_grad_()
        kernel, _ = packernel2d(g, kernel_size=3, padding=1, impl=impl)
        (kernel * torch.linspace(-1, 1, kernel.numel()).reshape(kernel.shape)).sum().backward()
        results.append((kernel, g.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- state_dict layout (spec table 1.5)


def layout(module):
    """{key: (kind, shape)} of the state_dict; kind is 'param' or 'buffer'."""
    params = dict(module.named_parameters())
    return {key: ('param' if key in params else 'buffer', tuple(value.shape))
            for key, value in module.state_dict().items()}


@pytest.mark.parametrize('make,expected', [
    (lambda: PacConv2d(3, 4, 5), {'weight': ('param', (4, 3, 5, 5)), 'bias': ('param', (4,))}),
    (lambda: PacConv2d(3, 4, 5, bias=False), {'weight': ('param', (4, 3, 5, 5))}),
    (lambda: PacConvTranspose2d(3, 4, 5), {'weight': ('param', (3, 4, 5, 5)), 'bias': ('param', (4,))}),
    (lambda: PacConv2d(3, 3, 3, shared_filters=True), {'weight': ('param', (1, 1, 3, 3)), 'bias': ('param', (3,))}),
    (lambda: PacConvTranspose2d(2, 2, 3, shared_filters=True, bias=False), {'weight': ('param', (1, 1, 3, 3))}),
    (lambda: PacConv2d(3, 3, 5, bias=False, shared_filters=True, filler='pool'), {'weight': ('buffer', (1, 1, 5, 5))}),
    (lambda: PacConv2d(3, 3, 5, bias=False, shared_filters=True, filler='crf_pool'),
     {'weight': ('buffer', (1, 1, 5, 5))}),
    (lambda: PacConv2d(2, 3, 3, kernel_type='inv_0.2_0.2'),
     {'weight': ('param', (3, 2, 3, 3)), 'bias': ('param', (3,)), 'inv_alpha': ('param', ()),
      'inv_lambda': ('param', ())}),
    (lambda: PacConv2d(2, 3, 3, kernel_type='inv_0.2_0.2_fixed'),
     {'weight': ('param', (3, 2, 3, 3)), 'bias': ('param', (3,)), 'inv_alpha': ('buffer', ()),
      'inv_lambda': ('buffer', ())}),
    (lambda: PacPool2d(3, kernel_type='inv_0.2_0.2', channel_wise=True, out_channels=4),
     {'inv_alpha': ('param', (4,)), 'inv_lambda': ('param', (4,))}),
    (lambda: PacPool2d(3, kernel_type='inv_0.2_0.2_asym_fixed', channel_wise=True, out_channels=4),
     {'inv_alpha': ('buffer', ()), 'inv_lambda': ('buffer', ())}),
    (lambda: PacPool2d(3), {}),
    (lambda: PacPool2d(3, smooth_kernel_type='full_5'), {'smooth_kernel': ('param', (1, 1, 5, 5))}),
    (lambda: PacPool2d(3, smooth_kernel_type='gaussian'), {'smooth_kernel': ('buffer', (1, 1, 3, 3))}),
    (lambda: PacConv2d(1, 2, 3, smooth_kernel_type='average_7'),
     {'weight': ('param', (2, 1, 3, 3)), 'bias': ('param', (2,)), 'smooth_kernel': ('buffer', (1, 1, 7, 7))}),
])
def test_state_dict_layout(make, expected):
    module = make()
    assert layout(module) == expected
    keys = list(module.state_dict())
    kinds = [expected[key][0] for key in keys]
    assert kinds == sorted(kinds, key=lambda kind: kind == 'buffer'), 'parameters come before buffers'


def test_state_dict_round_trip_between_implementations():
    source = PacConv2d(2, 3, 3, kernel_type='inv_0.2_0.2', smooth_kernel_type='full_3', native_impl=True)
    target = PacConv2d(2, 3, 3, kernel_type='inv_0.2_0.2', smooth_kernel_type='full_3', native_impl=False)
    target.load_state_dict(source.state_dict())
    x, guide = torch.randn(1, 2, 6, 6), torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(target(x, guide), source(x, guide), rtol=1e-4, atol=1e-5)


def test_initial_kernel_parameter_values():
    conv = PacConv2d(2, 3, 3, kernel_type='inv_0.2_-1.5_asym', smooth_kernel_type='full_3')
    assert conv.inv_alpha.item() == pytest.approx(0.2) and conv.inv_lambda.item() == pytest.approx(-1.5)
    torch.testing.assert_close(conv.smooth_kernel, torch.full((1, 1, 3, 3), 1 / 9))
    pool = PacPool2d(3, kernel_type='inv_1_2', channel_wise=True, out_channels=3, smooth_kernel_type='gaussian')
    torch.testing.assert_close(pool.inv_alpha, torch.ones(3))
    torch.testing.assert_close(pool.inv_lambda, torch.full((3,), 2.0))
    torch.testing.assert_close(pool.smooth_kernel.double(), smoothing_kernel('gaussian'))
    torch.testing.assert_close(PacPool2d(3, smooth_kernel_type='average_5').smooth_kernel,
                               torch.full((1, 1, 5, 5), 1 / 25))
    fixed = PacConv2d(2, 3, 3, kernel_type='inv_0.2_-1_asym_fixed')
    assert fixed.inv_alpha.item() == pytest.approx(0.2) and fixed.inv_lambda.item() == pytest.approx(-1.0)


def test_reset_parameters_restores_kernel_parameters():
    conv = PacConv2d(2, 3, 3, kernel_type='inv_0.2_-1', smooth_kernel_type='full_5')
    with torch.no_grad():
        for param in conv.parameters():
            param.add_(1.0)
    conv.reset_parameters()
    assert conv.inv_alpha.item() == pytest.approx(0.2) and conv.inv_lambda.item() == pytest.approx(-1.0)
    torch.testing.assert_close(conv.smooth_kernel.detach(), torch.full((1, 1, 5, 5), 1 / 25))
    assert conv.weight.abs().max() <= 1 / 18 ** 0.5  # back inside the uniform bound


# ---------------------------------------------------------------- fillers (spec 1.6)


@pytest.mark.parametrize('make,bound', [
    (lambda: PacConv2d(6, 5, 3), 1 / (6 * 9) ** 0.5),
    (lambda: PacConvTranspose2d(6, 2, 3), 1 / (6 * 9) ** 0.5),  # in_channels, not out_channels
    (lambda: PacConv2d(16, 16, 3, shared_filters=True), 16 / (16 * 9) ** 0.5),  # the x in_channels quirk
    (lambda: PacConvTranspose2d(16, 16, 3, shared_filters=True), 16 / (16 * 9) ** 0.5),
])
def test_uniform_filler_bounds(make, bound):
    module = make()
    largest = max_abs_over_resets(module, ['weight', 'bias'])
    assert largest <= bound
    assert largest > 0.9 * bound


@pytest.mark.parametrize('k,s,profile', [
    (3, 2, [0.5, 1, 0.5]),
    (5, 2, [0, 0.5, 1, 0.5, 0]),
    (7, 4, [0.25, 0.5, 0.75, 1, 0.75, 0.5, 0.25]),
])
def test_linear_filler_profiles(k, s, profile):
    module = PacConvTranspose2d(3, 3, k, s, filler='linear')
    profile = torch.tensor(profile)
    expected = torch.zeros(3, 3, k, k)
    for c in range(3):
        expected[c, c] = torch.outer(profile, profile)
    torch.testing.assert_close(module.weight.detach(), expected)
    assert (module.bias == 0).all()


def test_linear_filler_normalised_k5s2():
    module = PacConvTranspose2d(2, 2, 5, 2, filler='linear', normalize_kernel=True)
    torch.testing.assert_close(module.weight[1, 1, 2].detach(), torch.tensor([0.0, 3, 9, 3, 0]))
    assert (module.weight[0, 1] == 0).all()


def test_linear_filler_shared():
    module = PacConvTranspose2d(4, 4, 3, 2, filler='linear', shared_filters=True)
    torch.testing.assert_close(module.weight.detach()[0, 0], torch.outer(*[torch.tensor([0.5, 1, 0.5])] * 2))


def crf_gaussian(k: int) -> torch.Tensor:
    g = torch.tensor(gaussian_2d(k), dtype=torch.float32) * k * k
    g[k // 2, k // 2] = 0
    return g


def test_crf_filler_values():
    module = PacConv2d(3, 3, 5, filler='crf')
    weight = module.weight.detach()
    assert weight[0, 1, 0, 0].item() == pytest.approx(0.2135, abs=1e-4)
    assert weight[0, 1, 2, 2].item() == 0
    assert weight[2, 0, 2, 1].item() == pytest.approx(2.006, abs=1e-3)
    for o in range(3):
        for c in range(3):
            torch.testing.assert_close(weight[o, c], crf_gaussian(5) * (o != c))
    assert (module.bias == 0).all()
    shared = PacConv2d(3, 3, 5, filler='crf', shared_filters=True)
    torch.testing.assert_close(shared.weight.detach()[0, 0], crf_gaussian(5))


def test_crf_perturbed_filler_is_within_5e_4():
    weight = PacConv2d(3, 3, 5, filler='crf_perturbed').weight.detach()
    expected = torch.stack([torch.stack([crf_gaussian(5) * (o != c) for c in range(3)]) for o in range(3)])
    difference = (weight - expected).abs()
    assert difference.max() <= 5e-4 + 1e-7
    assert difference.max() > 1e-5  # it is perturbed


def test_pool_fillers():
    pool = PacConv2d(2, 2, 3, bias=False, shared_filters=True, filler='pool')
    torch.testing.assert_close(pool.weight, torch.ones(1, 1, 3, 3))
    crf_pool = PacConv2d(2, 2, 3, bias=False, shared_filters=True, filler='crf_pool')
    expected = torch.ones(1, 1, 3, 3)
    expected[0, 0, 1, 1] = 0
    torch.testing.assert_close(crf_pool.weight, expected)


# ---------------------------------------------------------------- repr


@pytest.mark.parametrize('module', [
    PacConv2d(2, 3, 3), PacConvTranspose2d(2, 3, 3, 2, 1, 1, bias=False), PacPool2d(3),
    PacPool2d(5, 2, 2, kernel_type='inv_0.2_0.2', channel_wise=True, out_channels=3, normalize_kernel=True),
    PacConv2d(3, 3, 3, shared_filters=True, filler='pool', bias=False), PacConv2d(4, 4, 3, groups=2),
], ids=['conv', 'convT', 'pool', 'pool_channel_wise', 'conv_pool_filler', 'conv_groups'])
def test_repr_works(module):
    text = repr(module)
    assert text.startswith(type(module).__name__ + '(')
    assert 'kernel_size=' in text


def test_extra_repr_matches_spec_example():
    module = PacConv2d(2, 3, 3, padding=1, kernel_type='inv_0.2_0.2_asym', smooth_kernel_type='full_3',
                       normalize_kernel=True)
    assert repr(module) == ('PacConv2d(2, 3, kernel_size=(3, 3), kernel_type=inv_0.2_0.2_asym, padding=(1, 1), '
                            'smooth_kernel_type=full_3, normalize_kernel=True)')


# ---------------------------------------------------------------- autocast and torch.compile


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_autocast_forward_backward(impl, dtype):
    module = PacConv2d(4, 3, 3, padding=1, impl=impl)
    x, guide = torch.randn(2, 4, 12, 10), torch.randn(2, 2, 12, 10)
    reference = module(x, guide)
    x_amp, guide_amp = x.clone().requires_grad_(), guide.clone().requires_grad_()
    with torch.autocast('cpu', dtype=dtype):
        kernel, _ = module.compute_kernel(guide_amp)
        out = module(x_amp, guide_amp)
    assert kernel.dtype == torch.float32, 'the adaptive kernel is computed in float32'
    assert out.dtype in (dtype, torch.float32)
    torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    for tensor in (x_amp, guide_amp, module.weight, module.bias):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    assert module.weight.grad.dtype == torch.float32


def test_autocast_bf16_conv_transpose_and_pool(impl):
    convt = PacConvTranspose2d(3, 2, 3, 2, 1, 1, impl=impl)
    pool = PacPool2d(3, 1, 1, normalize_kernel=True, impl=impl)
    x, guide = torch.randn(1, 3, 6, 5), torch.randn(1, 2, 12, 10)
    x_amp = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = pool(convt(x_amp, guide), guide)
    torch.testing.assert_close(out.float(), pool(convt(x, guide), guide), rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert torch.isfinite(x_amp.grad).all()


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_low_precision_modules(impl, dtype):
    """Modules converted with .to(dtype) run forward and backward and stay close to float32."""
    x = torch.randn(2, 4, 8, 6)
    for module, guide in [(PacConv2d(4, 3, 3, 1, 1, impl=impl), torch.randn(2, 2, 8, 6)),
                          (PacConvTranspose2d(4, 3, 3, 2, 1, 1, impl=impl), torch.randn(2, 2, 16, 12)),
                          (PacPool2d(3, 1, 1, impl=impl), torch.randn(2, 2, 8, 6))]:
        expected = module(x, guide)
        x_low = x.to(dtype).requires_grad_()
        out = module.to(dtype)(x_low, guide.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=5e-2)
        out.float().sum().backward()
        assert x_low.grad.dtype == dtype and torch.isfinite(x_low.grad).all()


def test_torch_compile_smoke(impl):
    module = PacConv2d(2, 3, 3, padding=1, kernel_type='inv_0.5_-1', impl=impl)
    x, guide = torch.randn(1, 2, 8, 8, requires_grad=True), torch.randn(1, 2, 8, 8)
    compiled = torch.compile(module, backend='aot_eager')
    out = compiled(x, guide)
    torch.testing.assert_close(out, module(x, guide))
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.slow
def test_torch_compile_inductor(impl):
    x, guide = torch.randn(1, 2, 8, 8, requires_grad=True), torch.randn(1, 2, 8, 8)
    for module, g in [(PacConv2d(2, 3, 3, padding=1, impl=impl), guide),
                      (PacConvTranspose2d(2, 3, 3, 2, 1, 1, impl=impl), torch.randn(1, 2, 16, 16))]:
        out = torch.compile(module)(x, g)
        torch.testing.assert_close(out, module(x, g), rtol=1e-4, atol=1e-5)
        out.sum().backward()  # the transposed input gradient is a slice of a padded buffer: strides must match
        assert x.grad is not None
        x.grad = None


# ---------------------------------------------------------------- larger sizes (slow)


@pytest.mark.slow
def test_large_conv_matches_reference(impl):
    module = PacConv2d(4, 3, 5, 2, 2, kernel_type='inv_0.2_0.2_asym', smooth_kernel_type='average_5',
                       normalize_kernel=True, impl=impl).double()
    mask = (torch.rand(2, 1, 20, 18) > 0.2).to(DT)
    check_module_against_reference(module, rand(2, 4, 20, 18), rand(2, 3, 20, 18), mask, kernel_size=5,
                                   stride=2, padding=2, kernel_type='inv_0.2_0.2_asym', normalize_kernel=True)


@pytest.mark.slow
def test_two_impls_agree_on_the_original_sizes():
    assert_impls_agree(lambda n: PacConv2d(4, 2, 3, 2, 2, 2, impl=n),
                       [torch.randn(8, 4, 128, 128), torch.randn(8, 3, 128, 128)])
    assert_impls_agree(lambda n: PacConvTranspose2d(2, 3, 3, 2, 1, 1, impl=n),
                       [torch.randn(3, 2, 64, 64), torch.randn(3, 3, 128, 128)])
