"""Tests of the N-d brute-force reference (pac_reference_nd.py) itself.

In 2-D it must equal the 2-D reference (pac_reference.py) with every option; in 3-D, with a
constant guide (K == 1), it must equal torch's conv3d / conv_transpose3d (weight flipped) / summed
pooling. If these fail, every comparison in test_pac3d.py is meaningless.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import pac_reference as ref2d
from pac_reference_nd import (conv_transpose_out_size, gaussian_nd, linear_profile, ref_kernel_nd, ref_pacconv_nd,
                              ref_pacconv_transpose_nd, ref_pacpool_nd, smoothing_kernel_nd)

DT = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, dtype=DT)


def random_mask(*shape, keep=0.6):
    return (torch.rand(*shape) < keep).to(DT)


def assert_same_kernel(got, expected):
    torch.testing.assert_close(got[0], expected[0])
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1])


# ---------------------------------------------------------------- 2-D: equal to pac_reference.py

KERNEL_OPTIONS = [
    dict(),
    dict(kernel_type='inv_0.2_0.2'),
    dict(kernel_type='inv_1_-1_asym', normalize_kernel=True),
    dict(kernel_type='inv_0.5_-0.5', channel_wise=True, inv_alpha=torch.tensor([0.3, 1.0, 0.1], dtype=DT),
         inv_lambda=torch.tensor([-1.0, 0.5, -2.0], dtype=DT)),
    dict(channel_wise=True, normalize_kernel=True),
    dict(smooth_kernel=ref2d.smoothing_kernel('gaussian')),
    dict(smooth_kernel=ref2d.smoothing_kernel('average_5'), normalize_kernel=True),
    dict(smooth_kernel=torch.rand(1, 1, 3, 3, dtype=DT), kernel_type='inv_0.5_-1_asym'),
]
KERNEL_IDS = ['gaussian', 'inv', 'inv_asym_norm', 'inv_channel_wise', 'channel_wise_norm', 'smooth_gaussian',
              'smooth_avg5_norm', 'smooth_full_inv_asym']
GEOMETRIES_2D = [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 5), stride=(2, 1), padding=(0, 2)),
                 dict(kernel_size=5, stride=2, padding=4, dilation=2), dict(kernel_size=(5, 3), dilation=(1, 2))]


@pytest.mark.parametrize('geometry', GEOMETRIES_2D, ids=['k3p1', 'k3x5s2x1', 'k5s2p4d2', 'k5x3d1x2'])
@pytest.mark.parametrize('options', KERNEL_OPTIONS, ids=KERNEL_IDS)
def test_kernel_2d_equals_2d_reference(geometry, options):
    guide = rand(2, 3, 7, 6)
    assert_same_kernel(ref_kernel_nd(guide, **geometry, **options), ref2d.ref_kernel(guide, **geometry, **options))


@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
@pytest.mark.parametrize('channel_wise', [False, True], ids=['summed', 'channel_wise'])
def test_masked_kernel_2d_equals_2d_reference(normalize, channel_wise):
    guide, mask = rand(2, 2, 6, 7), random_mask(2, 1, 6, 7)
    mask[0, :, :3] = 0  # some windows see no unmasked pixel
    options = dict(kernel_size=3, stride=(2, 1), padding=1, normalize_kernel=normalize, channel_wise=channel_wise,
                   mask=mask, smooth_kernel=ref2d.smoothing_kernel('average_3'))
    assert_same_kernel(ref_kernel_nd(guide, **options), ref2d.ref_kernel(guide, **options))


@pytest.mark.parametrize('geometry', [dict(kernel_size=3, stride=2, padding=1, output_padding=1),
                                      dict(kernel_size=(5, 3), stride=(2, 3), padding=(2, 0), output_padding=(1, 2)),
                                      dict(kernel_size=3, stride=2, padding=2, dilation=2, output_padding=1)],
                         ids=['k3s2p1op1', 'k5x3s2x3', 'k3s2p2d2'])
@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_transposed_kernel_2d_equals_2d_reference(geometry, normalize):
    in_size = (3, 4)
    k, s, p, op, d = (ref2d.pair(geometry.get(name, default)) for name, default in
                      [('kernel_size', 0), ('stride', 1), ('padding', 0), ('output_padding', 0), ('dilation', 1)])
    out_size = [ref2d.conv_transpose_out_size(n, *a) for n, a in zip(in_size, zip(k, s, p, op, d))]
    guide = rand(2, 2, *out_size)
    for mask in (None, random_mask(2, 1, *in_size)):
        options = dict(geometry, transposed=True, normalize_kernel=normalize, mask=mask,
                       smooth_kernel=ref2d.smoothing_kernel('gaussian'), kernel_type='inv_0.3_-1')
        assert_same_kernel(ref_kernel_nd(guide, **options), ref2d.ref_kernel(guide, **options))


@pytest.mark.parametrize('mode', ['reflect', 'replicate', 'circular'])
@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_padding_mode_kernel_2d_equals_2d_reference(mode, normalize):
    guide = rand(2, 2, 6, 5)
    options = dict(kernel_size=3, stride=2, padding=2, dilation=2, normalize_kernel=normalize, padding_mode=mode,
                   smooth_kernel=ref2d.smoothing_kernel('average_5'))
    assert_same_kernel(ref_kernel_nd(guide, **options), ref2d.ref_kernel(guide, **options))


@pytest.mark.parametrize('mode', ['reflect', 'replicate', 'circular'])
@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_padding_mode_with_mask_equals_explicitly_padded_inputs(mode, normalize):
    """The 2-D reference has no mask with padding_mode: a mode pads the mask like the guide."""
    guide, mask = rand(2, 2, 3, 5, 4), random_mask(1, 1, 3, 5, 4)
    padded_guide = F.pad(guide, (1, 1, 2, 2, 1, 1), mode=mode)
    padded_mask = F.pad(mask, (1, 1, 2, 2, 1, 1), mode=mode)
    got = ref_kernel_nd(guide, 3, padding=(1, 2, 1), dilation=(1, 2, 1), mask=mask, padding_mode=mode,
                        normalize_kernel=normalize)
    expected = ref_kernel_nd(padded_guide, 3, dilation=(1, 2, 1), mask=padded_mask, normalize_kernel=normalize)
    assert_same_kernel(got, expected)


@pytest.mark.parametrize('geometry', [dict(stride=1, padding=1, dilation=1),
                                      dict(stride=(2, 1), padding=(2, 0), dilation=(2, 1))], ids=['k3p1', 'mixed'])
@pytest.mark.parametrize('mode', ['zeros', 'reflect', 'circular'])
@pytest.mark.parametrize('shared,groups', [(False, 1), (False, 2), (True, 1)], ids=['dense', 'groups2', 'shared'])
def test_conv_2d_equals_2d_reference(geometry, mode, shared, groups):
    x = rand(2, 4, 6, 7)
    weight = rand(1, 1, 3, 3) if shared else rand(6, 4 // groups, 3, 3)
    bias = rand(4 if shared else 6)
    kernel, _ = ref2d.ref_kernel(rand(2, 2, 6, 7), 3, padding_mode=mode, **geometry)
    args = dict(geometry, shared_filters=shared, groups=groups, padding_mode=mode)
    torch.testing.assert_close(ref_pacconv_nd(x, kernel, weight, bias, **args),
                               ref2d.ref_pacconv2d(x, kernel, weight, bias, **args))


@pytest.mark.parametrize('shared,groups', [(False, 1), (False, 2), (True, 1)], ids=['dense', 'groups2', 'shared'])
def test_conv_transpose_2d_equals_2d_reference(shared, groups):
    x = rand(2, 4, 3, 4)
    weight = rand(1, 1, 5, 3) if shared else rand(4, 6 // groups, 5, 3)
    geometry = dict(stride=(2, 3), padding=(2, 1), output_padding=(1, 2), dilation=(1, 2))
    out_size = [conv_transpose_out_size(n, *a) for n, a in zip((3, 4), zip((5, 3), (2, 3), (2, 1), (1, 2), (1, 2)))]
    kernel = torch.rand(2, 4 if shared else 1, 5, 3, *out_size, dtype=DT)
    bias = rand(4 if shared else 6)
    args = dict(geometry, shared_filters=shared, groups=groups)
    torch.testing.assert_close(ref_pacconv_transpose_nd(x, kernel, weight, bias, **args),
                               ref2d.ref_pacconv_transpose2d(x, kernel, weight, bias, **args))


@pytest.mark.parametrize('kernel_channels', [1, 3])
def test_pool_2d_equals_2d_reference(kernel_channels):
    x = rand(2, 3, 7, 6)
    kernel = torch.rand(2, kernel_channels, 3, 5, 4, 3, dtype=DT)
    args = dict(kernel_size=(3, 5), stride=(2, 2), padding=(1, 2), dilation=(1, 1))
    torch.testing.assert_close(ref_pacpool_nd(x, kernel, **args), ref2d.ref_pacpool2d(x, kernel, **args))


def test_builtin_smoothing_kernels_2d_equal_2d_reference():
    for name in ('gaussian', 'average_3', 'full_5'):
        torch.testing.assert_close(smoothing_kernel_nd(name, 2), ref2d.smoothing_kernel(name))
    torch.testing.assert_close(gaussian_nd(5, 2), torch.tensor(ref2d.gaussian_2d(5), dtype=DT))


# ---------------------------------------------------------------- 3-D: hand-computed cases


def test_3d_kernel_centre_voxel_by_hand():
    guide = torch.arange(27, dtype=DT).reshape(1, 1, 3, 3, 3)
    kernel, _ = ref_kernel_nd(guide, 3, padding=1)
    assert kernel.shape == (1, 1, 3, 3, 3, 3, 3, 3)
    expected = torch.exp(-0.5 * (torch.arange(27, dtype=DT) - 13) ** 2).reshape(3, 3, 3)
    torch.testing.assert_close(kernel[0, 0, ..., 1, 1, 1], expected)
    # corner output (0, 0, 0): centre 0, the out-of-image taps read 0 as well
    assert kernel[0, 0, 2, 2, 2, 0, 0, 0].item() == pytest.approx(math.exp(-0.5 * 13 ** 2))
    assert kernel[0, 0, 0, 1, 1, 0, 0, 0].item() == 1.0


def test_3d_anisotropic_geometry_by_hand():
    guide = torch.arange(4 * 5 * 6, dtype=DT).reshape(1, 1, 4, 5, 6)
    kernel, _ = ref_kernel_nd(guide, (1, 3, 5), stride=(1, 2, 3), padding=(0, 1, 2), dilation=(1, 2, 1))
    assert kernel.shape == (1, 1, 1, 3, 5, 4, 2, 2)  # (5 + 2 - 4 - 1)//2 + 1, (6 + 4 - 4 - 1)//3 + 1
    # output (2, 1, 1): centre at (2, 1*2 + 2 - 1, 1*3 + 2 - 2) = (2, 3, 3); tap (0, 0, 4) at (2, 1, 5)
    centre, tap = guide[0, 0, 2, 3, 3], guide[0, 0, 2, 1, 5]
    torch.testing.assert_close(kernel[0, 0, 0, 0, 4, 2, 1, 1], torch.exp(-0.5 * (tap - centre) ** 2))


def test_3d_mask_scaling_by_hand():
    guide = torch.zeros(1, 1, 3, 3, 3, dtype=DT)  # K == 1 before masking
    mask = torch.zeros(1, 1, 3, 3, 3, dtype=DT)
    mask[0, 0, 0, 0, 0] = 1
    kernel, out_mask = ref_kernel_nd(guide, 3, padding=1, mask=mask)
    # output (0, 0, 0): 8 valid taps, 1 unmasked -> the kept tap gets 8
    assert kernel[0, 0, 1, 1, 1, 0, 0, 0].item() == pytest.approx(8.0)
    assert kernel[..., 0, 0, 0].sum().item() == pytest.approx(8.0)
    expected_mask = torch.zeros(1, 1, 3, 3, 3, dtype=DT)
    expected_mask[0, 0, :2, :2, :2] = 1
    torch.testing.assert_close(out_mask, expected_mask)
    normalised, _ = ref_kernel_nd(guide, 3, padding=1, mask=mask, normalize_kernel=True)
    assert normalised[0, 0, 1, 1, 1, 1, 1, 1].item() == 0 and normalised[0, 0, 0, 0, 0, 1, 1, 1].item() == 1


def test_3d_mask_of_batch_one_is_broadcast():
    guide, mask = rand(2, 2, 3, 4, 3), random_mask(1, 1, 3, 4, 3)
    got = ref_kernel_nd(guide, 3, padding=1, mask=mask)
    assert_same_kernel(got, ref_kernel_nd(guide, 3, padding=1, mask=mask.expand(2, 1, 3, 4, 3)))


def test_3d_normalised_kernel_sums_to_one_over_valid_taps():
    kernel, out_mask = ref_kernel_nd(rand(2, 3, 3, 4, 5), 3, padding=1, normalize_kernel=True, channel_wise=True)
    assert out_mask is None
    torch.testing.assert_close(kernel.sum((2, 3, 4)), torch.ones(2, 3, 3, 4, 5, dtype=DT))
    assert (kernel[:, :, 0, :, :, 0] == 0).all()  # depth -1 is padding for output depth 0


def test_3d_smoothing_by_hand():
    guide = torch.arange(27, dtype=DT).reshape(1, 1, 3, 3, 3)
    kernel, _ = ref_kernel_nd(guide, 3, padding=1, smooth_kernel=smoothing_kernel_nd('average_3'))
    # output (0, 0, 0): the window over the zero-padded guide holds voxels {0, 1} ^ 3
    centre = sum(guide[0, 0, a, b, c].item() for a in (0, 1) for b in (0, 1) for c in (0, 1)) / 27
    assert kernel[0, 0, 2, 2, 2, 0, 0, 0].item() == pytest.approx(math.exp(-0.5 * (13 - centre) ** 2))
    plain, _ = ref_kernel_nd(guide, 3, padding=1)
    torch.testing.assert_close(kernel[..., 1, 1, 1], plain[..., 1, 1, 1])  # a linear ramp averages to itself


def test_3d_transposed_pattern_by_hand():
    # along each axis: input 2, k3 s2 p1 op1 -> output 4; tap i of output y reads Z[y + i - 1]
    guide = torch.zeros(1, 1, 4, 4, 4, dtype=DT)
    kernel, _ = ref_kernel_nd(guide, 3, stride=2, padding=1, output_padding=1, transposed=True,
                              normalize_kernel=True)
    rows = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=DT)
    for y, x, z in [(0, 0, 0), (1, 2, 3), (3, 1, 0), (2, 2, 2)]:
        pattern = torch.einsum('i,j,k->ijk', rows[y], rows[x], rows[z])
        torch.testing.assert_close(kernel[0, 0, ..., y, x, z], pattern / pattern.sum())


def test_3d_transposed_unnormalised_kernel_is_the_same_padded_stride1_kernel():
    guide = rand(2, 2, 6, 5, 4)
    transposed, _ = ref_kernel_nd(guide, (3, 5, 3), stride=2, padding=(1, 2, 1), output_padding=(1, 0, 1),
                                  transposed=True)
    same, _ = ref_kernel_nd(guide, (3, 5, 3), padding=(1, 2, 1))
    torch.testing.assert_close(transposed, same)


def test_transposed_conv_3d_by_hand():
    # a single input voxel spreads the (unflipped) weight around itself: the output shows it flipped
    weight = torch.arange(27, dtype=DT).reshape(1, 1, 3, 3, 3)
    out = ref_pacconv_transpose_nd(torch.full((1, 1, 1, 1, 1), 2.0, dtype=DT),
                                   torch.ones(1, 1, 3, 3, 3, 3, 3, 3, dtype=DT), weight)
    torch.testing.assert_close(out[0, 0], 2 * weight[0, 0].flip(0, 1, 2))


def test_fillers_helpers():
    g = gaussian_nd(5)
    assert g.shape == (5, 5, 5) and g.sum().item() == pytest.approx(1.0)
    g1 = torch.tensor([math.exp(-r * r / (2 * 1.25 ** 2)) for r in range(-2, 3)], dtype=DT)
    g1 = g1 / g1.sum()
    torch.testing.assert_close(g, torch.einsum('i,j,k->ijk', g1, g1, g1))
    assert linear_profile(3, 2) == [0.5, 1, 0.5]
    assert linear_profile(5, 2) == [0, 0.5, 1, 0.5, 0]
    assert linear_profile(7, 4) == [0.25, 0.5, 0.75, 1, 0.75, 0.5, 0.25]
    assert linear_profile(5, 2, normalize_kernel=True) == [0, 1, 3, 1, 0]  # 2-D centre row [0, 3, 9, 3, 0]
    torch.testing.assert_close(smoothing_kernel_nd('gaussian')[0, 0, 1],
                               torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=DT) / 32)
    assert smoothing_kernel_nd('full_3').shape == (1, 1, 3, 3, 3)
    assert smoothing_kernel_nd('average_5').sum().item() == pytest.approx(1.0)


# ---------------------------------------------------------------- 3-D: K == 1 equals torch


def ones_kernel(batch, k, out_size):
    return torch.ones(batch, 1, *k, *out_size, dtype=DT)


@pytest.mark.parametrize('k,s,p,d,groups', [
    ((3, 3, 3), 1, 1, 1, 1), ((3, 1, 5), (2, 1, 1), (1, 0, 2), 1, 2), ((3, 3, 3), (1, 2, 2), 2, 2, 1),
    ((1, 3, 3), 2, 0, (1, 1, 2), 4)], ids=['k3p1', 'aniso_groups2', 'k3s122p2d2', 'k133_depthwise'])
def test_conv_3d_with_unit_kernel_equals_conv3d(k, s, p, d, groups):
    x = rand(2, 4, 5, 4, 6)
    weight, bias = rand(4, 4 // groups, *k), rand(4)
    expected = F.conv3d(x, weight, bias, s, p, d, groups)
    got = ref_pacconv_nd(x, ones_kernel(2, k, expected.shape[2:]), weight, bias, s, p, d, groups=groups)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize('mode', ['reflect', 'replicate', 'circular'])
def test_conv_3d_padding_modes_equal_conv3d(mode):
    x = rand(1, 2, 4, 5, 4)
    weight = rand(3, 2, 3, 3, 3)
    expected = F.conv3d(F.pad(x, (1, 1, 2, 2, 1, 1), mode=mode), weight, dilation=(1, 2, 1))
    got = ref_pacconv_nd(x, ones_kernel(1, (3, 3, 3), expected.shape[2:]), weight, padding=(1, 2, 1),
                         dilation=(1, 2, 1), padding_mode=mode)
    torch.testing.assert_close(got, expected)


def test_shared_filters_3d_is_a_depthwise_conv():
    x, weight = rand(2, 3, 4, 4, 5), rand(1, 1, 3, 3, 3)
    expected = F.conv3d(x, weight.expand(3, 1, 3, 3, 3), None, 1, 1, 1, 3)
    got = ref_pacconv_nd(x, ones_kernel(2, (3, 3, 3), (4, 4, 5)), weight, padding=1, shared_filters=True)
    torch.testing.assert_close(got, expected)
    expected_t = F.conv_transpose3d(x, weight.flip(2, 3, 4).expand(3, 1, 3, 3, 3), None, 2, 1, 1, 3)
    got_t = ref_pacconv_transpose_nd(x, ones_kernel(2, (3, 3, 3), expected_t.shape[2:]), weight, stride=2,
                                     padding=1, output_padding=1, shared_filters=True)
    torch.testing.assert_close(got_t, expected_t)


@pytest.mark.parametrize('k,s,p,op,d,groups', [
    ((3, 3, 3), 2, 1, 1, 1, 1), ((3, 5, 3), (1, 2, 3), (0, 2, 1), (0, 1, 2), 1, 2), ((3, 3, 3), 2, 2, 1, 2, 1),
    ((1, 3, 3), (1, 3, 2), 0, (0, 2, 0), (1, 1, 2), 1)], ids=['k3s2p1op1', 'aniso_groups2', 'k3s2p2d2', 'k133'])
def test_conv_transpose_3d_with_unit_kernel_equals_flipped_conv_transpose3d(k, s, p, op, d, groups):
    x = rand(2, 4, 3, 2, 3)
    weight, bias = rand(4, 6 // groups, *k), rand(6)
    expected = F.conv_transpose3d(x, weight.flip(2, 3, 4), bias, s, p, op, groups, d)
    got = ref_pacconv_transpose_nd(x, ones_kernel(2, k, expected.shape[2:]), weight, bias, s, p, op, d,
                                   groups=groups)
    torch.testing.assert_close(got, expected)
    unflipped = F.conv_transpose3d(x, weight, bias, s, p, op, groups, d)
    assert (got - unflipped).abs().max() > 1e-3  # the weight is really applied without a flip


@pytest.mark.parametrize('k,s,p', [((3, 3, 3), 1, 1), ((3, 5, 3), (2, 1, 2), (1, 2, 0)), ((5, 3, 3), 2, (2, 1, 1))])
def test_pool_3d_with_unit_kernel_is_volume_times_average(k, s, p):
    x = rand(2, 3, 5, 6, 5)
    expected = math.prod(k) * F.avg_pool3d(x, k, s, p, count_include_pad=True)
    torch.testing.assert_close(ref_pacpool_nd(x, ones_kernel(2, k, expected.shape[2:]), k, s, p), expected)


def test_pool_3d_dilated_unit_kernel_equals_a_ones_depthwise_conv():
    x = rand(1, 2, 6, 5, 6)  # avg_pool3d has no dilation: a depthwise ones filter is the same sum
    expected = F.conv3d(x, torch.ones(2, 1, 3, 3, 3, dtype=DT), None, (2, 1, 1), (2, 1, 2), (2, 1, 2), 2)
    got = ref_pacpool_nd(x, ones_kernel(1, (3, 3, 3), expected.shape[2:]), 3, (2, 1, 1), (2, 1, 2), (2, 1, 2))
    torch.testing.assert_close(got, expected)


def test_normalised_unit_kernel_pool_is_average_without_padding():
    x, guide = rand(2, 3, 5, 4, 5), torch.ones(2, 2, 5, 4, 5, dtype=DT)
    kernel, _ = ref_kernel_nd(guide, 3, stride=2, padding=1, normalize_kernel=True)
    torch.testing.assert_close(ref_pacpool_nd(x, kernel, 3, 2, 1), F.avg_pool3d(x, 3, 2, 1, count_include_pad=False))
