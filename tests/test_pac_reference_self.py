"""Tests of the brute-force reference itself: hand-computed tiny cases and torch parity with K = 1.

If these fail, the oracle is wrong and every comparison in test_pac_layers.py is meaningless.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from pac_reference import (conv_transpose_in_size, gaussian_2d, parse_kernel_type, ref_im2col, ref_kernel,
                           ref_pacconv2d, ref_pacconv_transpose2d, ref_pacpool2d, smoothing_kernel)

DT = torch.float64


def grid_guide() -> torch.Tensor:
    """1x1x3x3 guide [[0, 1, 2], [3, 4, 5], [6, 7, 8]]."""
    return torch.arange(9, dtype=DT).reshape(1, 1, 3, 3)


def test_gaussian_kernel_centre_pixel_by_hand():
    k, _ = ref_kernel(grid_guide(), 3, padding=1)
    assert k.shape == (1, 1, 3, 3, 3, 3)
    # centre feature 4: differences -4..4 in raster order
    expected = torch.tensor([[-4, -3, -2], [-1, 0, 1], [2, 3, 4]], dtype=DT)
    torch.testing.assert_close(k[0, 0, :, :, 1, 1], torch.exp(-0.5 * expected ** 2))


def test_gaussian_kernel_corner_reads_zero_padding():
    k, _ = ref_kernel(grid_guide(), 3, padding=1)
    # output (0, 0): centre F[0,0] = 0; out-of-image taps read 0, so their difference is 0 too
    dist = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 9, 16]], dtype=DT)
    torch.testing.assert_close(k[0, 0, :, :, 0, 0], torch.exp(-0.5 * dist))


def test_stride_dilation_geometry_by_hand():
    guide = torch.arange(25, dtype=DT).reshape(1, 1, 5, 5)
    k, _ = ref_kernel(guide, 3, stride=2, padding=2, dilation=2)
    assert k.shape[-2:] == (3, 3)  # (5 + 4 - 4 - 1) // 2 + 1
    # output (1, 2): centre at (1*2 + 2 - 2, 2*2 + 2 - 2) = (2, 4) -> 14; tap (0, 0) at (0, 2) -> 2
    torch.testing.assert_close(k[0, 0, 0, 0, 1, 2], torch.exp(torch.tensor(-0.5 * 12 ** 2, dtype=DT)))
    # tap (2, 2) at (4, 6): outside -> feature 0
    torch.testing.assert_close(k[0, 0, 2, 2, 1, 2], torch.exp(torch.tensor(-0.5 * 14 ** 2, dtype=DT)))


def test_channels_are_summed_or_kept_channel_wise():
    guide = torch.cat([grid_guide(), 2 * grid_guide()], 1)
    summed, _ = ref_kernel(guide, 3, padding=1)
    per_channel, _ = ref_kernel(guide, 3, padding=1, channel_wise=True)
    assert summed.shape[1] == 1 and per_channel.shape[1] == 2
    # tap (0, 0) of the centre pixel: differences -4 and -8
    assert summed[0, 0, 0, 0, 1, 1].item() == pytest.approx(math.exp(-0.5 * (16 + 64)))
    assert per_channel[0, 0, 0, 0, 1, 1].item() == pytest.approx(math.exp(-8))
    assert per_channel[0, 1, 0, 0, 1, 1].item() == pytest.approx(math.exp(-32))


def test_asym_keeps_only_positive_differences():
    k, _ = ref_kernel(grid_guide(), 3, padding=1, kernel_type='inv_0.5_2_asym')
    # centre pixel: taps below the centre (differences > 0) count; taps above compare as 0
    assert k[0, 0, 0, 0, 1, 1].item() == pytest.approx(0.5 + (0 + 1e-4) ** 1)
    assert k[0, 0, 2, 2, 1, 1].item() == pytest.approx(0.5 + (16 + 1e-4) ** 1)


def test_inv_kernel_sign_convention_and_negative_lambda():
    k, _ = ref_kernel(grid_guide(), 3, padding=1, kernel_type='inv_1_-1')
    # lambda < 0 decays with distance: 1 + (D + 1e-4)^(-1/2)
    assert k[0, 0, 0, 0, 1, 1].item() == pytest.approx(1 + (16 + 1e-4) ** -0.5)
    grow, _ = ref_kernel(grid_guide(), 3, padding=1, kernel_type='inv_0.2_0.2')
    assert grow[0, 0, 0, 0, 1, 1].item() == pytest.approx(0.2 + (16 + 1e-4) ** 0.1)
    assert grow[0, 0, 0, 0, 1, 1] > grow[0, 0, 1, 0, 1, 1]  # grows with distance


def test_inv_per_channel_parameters_override_the_string():
    guide = torch.cat([grid_guide(), grid_guide()], 1)
    k, _ = ref_kernel(guide, 3, padding=1, kernel_type='inv_9_9', channel_wise=True,
                      inv_alpha=torch.tensor([0.0, 1.0], dtype=DT), inv_lambda=torch.tensor([-2.0, 2.0], dtype=DT))
    assert k[0, 0, 0, 0, 1, 1].item() == pytest.approx((16 + 1e-4) ** -1)
    assert k[0, 1, 0, 0, 1, 1].item() == pytest.approx(1 + (16 + 1e-4))


def test_parse_kernel_type():
    assert parse_kernel_type('gaussian') == ('gaussian', None, None, False)
    assert parse_kernel_type('inv_0.2_-1_asym_fixed') == ('inv', 0.2, -1.0, True)
    with pytest.raises(ValueError):
        parse_kernel_type('box')


def test_smoothing_replaces_the_centre_by_a_window_average():
    smooth = smoothing_kernel('average_3')
    k, _ = ref_kernel(grid_guide(), 3, padding=1, smooth_kernel=smooth)
    # output (0, 0): window centred on (0, 0) over the zero-padded guide -> (0 + 1 + 3 + 4) / 9
    centre = 8 / 9
    assert k[0, 0, 1, 1, 0, 0].item() == pytest.approx(math.exp(-0.5 * centre ** 2))
    assert k[0, 0, 2, 2, 0, 0].item() == pytest.approx(math.exp(-0.5 * (4 - centre) ** 2))
    # the centre pixel's window average is 4 = its own value
    plain, _ = ref_kernel(grid_guide(), 3, padding=1)
    torch.testing.assert_close(k[..., 1, 1], plain[..., 1, 1])


def test_smoothing_window_wider_than_kernel():
    guide = torch.arange(25, dtype=DT).reshape(1, 1, 5, 5)
    k, _ = ref_kernel(guide, 3, padding=0, smooth_kernel=smoothing_kernel('average_5'))
    # output (0, 0) has its centre at (1, 1): the 5x5 window covers rows/cols -1..3
    window = sum(guide[0, 0, r, c].item() for r in range(4) for c in range(4)) / 25
    assert k[0, 0, 0, 0, 0, 0].item() == pytest.approx(math.exp(-0.5 * window ** 2))


def test_builtin_smoothing_kernels():
    torch.testing.assert_close(smoothing_kernel('gaussian')[0, 0],
                               torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=DT) / 16)
    assert smoothing_kernel('full_5').shape == (1, 1, 5, 5)
    assert smoothing_kernel('average_7').sum().item() == pytest.approx(1.0)
    assert smoothing_kernel('none') is None


def test_normalised_kernel_sums_to_one_over_valid_taps():
    guide = torch.randn(2, 3, 5, 6, dtype=DT)
    k, out_mask = ref_kernel(guide, 3, padding=1, normalize_kernel=True)
    assert out_mask is None
    torch.testing.assert_close(k.sum((2, 3)), torch.ones(2, 1, 5, 6, dtype=DT))
    assert (k[..., 0, :][:, :, 0] == 0).all()  # row -1 is padding for output row 0
    assert (k[:, :, 0, 0, 0, 0] == 0).all()


def test_mask_scaling_and_empty_windows_by_hand():
    guide = torch.zeros(1, 1, 3, 3, dtype=DT)  # K == 1 before masking
    mask = torch.zeros(1, 1, 3, 3, dtype=DT)
    mask[0, 0, 0, 0] = 1
    k, out_mask = ref_kernel(guide, 3, padding=1, mask=mask)
    # output (0, 0): 4 valid taps, 1 unmasked -> norm = 1/4, so the kept tap gets 4
    assert k[0, 0, 1, 1, 0, 0].item() == pytest.approx(4.0)
    assert k[0, 0, :, :, 0, 0].sum().item() == pytest.approx(4.0)
    # output (2, 2) sees no unmasked pixel: norm 0 -> divisor 1, kernel 0, output mask 0
    assert (k[..., 2, 2] == 0).all()
    torch.testing.assert_close(out_mask, torch.tensor([[[[1, 1, 0], [1, 1, 0], [0, 0, 0]]]], dtype=DT))


def test_mask_with_normalisation_by_hand():
    guide = torch.zeros(1, 1, 3, 3, dtype=DT)
    mask = torch.ones(1, 1, 3, 3, dtype=DT)
    mask[0, 0, 1, 1] = 0
    k, out_mask = ref_kernel(guide, 3, padding=1, mask=mask, normalize_kernel=True)
    # centre output: 8 unmasked taps, each 1/8
    expected = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=DT) / 8
    torch.testing.assert_close(k[0, 0, :, :, 1, 1], expected)
    assert (out_mask == 1).all()


def test_transposed_pattern_from_zero_insertion_by_hand():
    # input 2x2, k3 s2 p1 op1 -> output 4x4; P = 1; tap i of row y reads Z[y + i - 1]
    guide = torch.zeros(1, 1, 4, 4, dtype=DT)
    assert conv_transpose_in_size(4, 3, 2, 1, 1, 1) == 2
    k, _ = ref_kernel(guide, 3, stride=2, padding=1, output_padding=1, transposed=True, normalize_kernel=True)
    rows = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=DT)
    for y in range(4):
        for x in range(4):
            pattern = torch.outer(rows[y], rows[x])
            torch.testing.assert_close(k[0, 0, :, :, y, x], pattern / pattern.sum())


def test_transposed_unnormalised_kernel_is_the_same_padded_stride1_kernel():
    guide = torch.randn(2, 3, 8, 6, dtype=DT)  # from a 4x3 input
    transposed, _ = ref_kernel(guide, 5, stride=2, padding=2, output_padding=1, dilation=1, transposed=True)
    same, _ = ref_kernel(guide, 5, stride=1, padding=2)
    torch.testing.assert_close(transposed, same)


def test_transposed_mask_reads_the_low_resolution_mask():
    guide = torch.zeros(1, 1, 4, 4, dtype=DT)
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]], dtype=DT)
    k, out_mask = ref_kernel(guide, 3, stride=2, padding=1, output_padding=1, transposed=True, mask=mask)
    # output (1, 1) reads input (0,0), (0,1), (1,0), (1,1) via taps (0,0), (0,2), (2,0), (2,2)
    assert k[0, 0, 0, 2, 1, 1].item() == 0
    assert k[0, 0, 0, 0, 1, 1].item() == pytest.approx(4 / 3)
    # output (0, 1) reads only input (0, 0) and (0, 1) -> one of two valid taps unmasked
    assert k[0, 0, 1, 0, 0, 1].item() == pytest.approx(2.0)
    # row 0 only reads input row 0, whose right pixel is masked: outputs (0, 2) and (0, 3) are empty
    expected = torch.ones(1, 1, 4, 4, dtype=DT)
    expected[0, 0, 0, 2:] = 0
    torch.testing.assert_close(out_mask, expected)
    assert (k[..., 0, 2:] == 0).all()


def test_conv_by_hand():
    x = torch.arange(9, dtype=DT).reshape(1, 1, 3, 3)
    kernel = torch.ones(1, 1, 3, 3, 1, 1, dtype=DT)
    kernel[0, 0, 2, 2] = 2  # tap (2, 2) reads x = 8 and counts twice
    weight = torch.ones(2, 1, 3, 3, dtype=DT)
    weight[1] *= -1
    out = ref_pacconv2d(x, kernel, weight, torch.tensor([0.5, 0.0], dtype=DT))
    torch.testing.assert_close(out.flatten(), torch.tensor([44.5, -44.0], dtype=DT))


def test_transposed_conv_by_hand():
    # a single input pixel spreads the (unflipped) weight times the kernel around itself
    x = torch.full((1, 1, 1, 1), 2.0, dtype=DT)
    weight = torch.arange(9, dtype=DT).reshape(1, 1, 3, 3)
    kernel = torch.ones(1, 1, 3, 3, 3, 3, dtype=DT)
    out = ref_pacconv_transpose2d(x, kernel, weight)
    # output (y, x) uses tap (2 - y, 2 - x): the weight appears flipped in the output
    torch.testing.assert_close(out[0, 0], 2 * weight[0, 0].flip(0, 1))


def test_pool_by_hand():
    x = torch.arange(4, dtype=DT).reshape(1, 1, 2, 2)
    kernel = torch.full((1, 1, 3, 3, 2, 2), 0.5, dtype=DT)
    out = ref_pacpool2d(x, kernel, 3, padding=1)
    torch.testing.assert_close(out, torch.full((1, 1, 2, 2), 3.0, dtype=DT))


@pytest.mark.parametrize('k,s,p,d,groups', [(3, 1, 1, 1, 1), (5, 2, 4, 2, 1), (3, 2, 0, 1, 2), (5, 1, 3, 1, 2)])
def test_conv_with_unit_kernel_matches_torch(k, s, p, d, groups):
    x = torch.randn(2, 4, 9, 8, dtype=DT)
    weight = torch.randn(6, 4 // groups, k, k, dtype=DT)
    bias = torch.randn(6, dtype=DT)
    expected = F.conv2d(x, weight, bias, s, p, d, groups)
    ones = torch.ones(2, 1, k, k, *expected.shape[-2:], dtype=DT)
    torch.testing.assert_close(ref_pacconv2d(x, ones, weight, bias, s, p, d, groups=groups), expected)


def test_shared_filters_is_a_depthwise_conv():
    x = torch.randn(2, 3, 6, 7, dtype=DT)
    weight = torch.randn(1, 1, 3, 3, dtype=DT)
    expected = F.conv2d(x, weight.expand(3, 1, 3, 3), None, 1, 1, 1, 3)
    ones = torch.ones(2, 1, 3, 3, 6, 7, dtype=DT)
    torch.testing.assert_close(ref_pacconv2d(x, ones, weight, padding=1, shared_filters=True), expected)
    ones_t = torch.ones(2, 1, 3, 3, 12, 14, dtype=DT)
    expected_t = F.conv_transpose2d(x, weight.flip(-2, -1).expand(3, 1, 3, 3), None, 2, 1, 1, 3)
    got_t = ref_pacconv_transpose2d(x, ones_t, weight, stride=2, padding=1, output_padding=1, shared_filters=True)
    torch.testing.assert_close(got_t, expected_t)


@pytest.mark.parametrize('mode', ['reflect', 'replicate', 'circular'])
def test_padding_modes_match_explicit_padding(mode):
    x = torch.randn(1, 2, 5, 6, dtype=DT)
    weight = torch.randn(3, 2, 3, 3, dtype=DT)
    expected = F.conv2d(F.pad(x, (2, 2, 2, 2), mode=mode), weight, dilation=2)
    ones = torch.ones(1, 1, 3, 3, 5, 6, dtype=DT)
    torch.testing.assert_close(ref_pacconv2d(x, ones, weight, padding=2, dilation=2, padding_mode=mode), expected)


def test_padding_mode_applies_to_the_guide_too():
    guide = torch.randn(1, 2, 4, 5, dtype=DT)
    k, _ = ref_kernel(guide, 3, padding=1, padding_mode='replicate', normalize_kernel=True)
    padded = F.pad(guide, (1, 1, 1, 1), mode='replicate')
    expected, _ = ref_kernel(padded, 3, padding=0, normalize_kernel=True)
    torch.testing.assert_close(k, expected)


@pytest.mark.parametrize('k,s,p,op,d,groups', [(5, 2, 2, 1, 1, 1), (3, 2, 1, 1, 1, 2), (3, 3, 0, 2, 2, 1),
                                               (5, 1, 4, 0, 2, 2)])
def test_transposed_conv_with_unit_kernel_matches_torch_with_flipped_weight(k, s, p, op, d, groups):
    x = torch.randn(2, 4, 4, 5, dtype=DT)
    weight = torch.randn(4, 6 // groups, k, k, dtype=DT)
    bias = torch.randn(6, dtype=DT)
    expected = F.conv_transpose2d(x, weight.flip(-2, -1), bias, s, p, op, groups, d)
    ones = torch.ones(2, 1, k, k, *expected.shape[-2:], dtype=DT)
    got = ref_pacconv_transpose2d(x, ones, weight, bias, s, p, op, d, groups=groups)
    torch.testing.assert_close(got, expected)


def test_pool_with_unit_kernel_is_k2_times_average():
    x = torch.randn(2, 3, 9, 9, dtype=DT)
    ones = torch.ones(2, 1, 5, 5, 5, 5, dtype=DT)
    expected = 25 * F.avg_pool2d(x, 5, 2, 2, count_include_pad=True)
    torch.testing.assert_close(ref_pacpool2d(x, ones, 5, 2, 2), expected)


def test_im2col_matches_unfold():
    x = torch.randn(2, 3, 6, 7, dtype=DT)
    cols = ref_im2col(x, 3, 2, 1, 2)
    expected = F.unfold(x, 3, 2, 1, 2).reshape(cols.shape)
    torch.testing.assert_close(cols, expected)


def test_transposed_im2col_matches_the_pattern_and_conv_transpose():
    x = torch.randn(2, 3, 3, 4, dtype=DT)
    cols = ref_im2col(x, 3, 2, 1, 1, transposed=True, output_padding=1)
    weight = torch.randn(3, 2, 3, 3, dtype=DT)
    # a transposed conv is the (unflipped) weight applied to the columns of the zero-inserted input
    expected = F.conv_transpose2d(x, weight.flip(-2, -1), None, 2, 1, 1)
    torch.testing.assert_close(torch.einsum('bcijyx,coij->boyx', cols, weight), expected)
    ones, _ = ref_kernel(torch.zeros(1, 1, 6, 8, dtype=DT), 3, 2, 1, transposed=True, output_padding=1,
                         mask=torch.ones(1, 1, 3, 4, dtype=DT))
    pattern = ref_im2col(torch.ones(1, 1, 3, 4, dtype=DT), 3, 2, 1, 1, transposed=True, output_padding=1)
    torch.testing.assert_close(ones * pattern, ones)  # the masked kernel lives on the pattern only


def test_gaussian_2d_matches_spec_values():
    g = gaussian_2d(5)
    assert g[2][2] == pytest.approx(0.1104935, abs=1e-7)
    assert g[0][0] == pytest.approx(0.00854167, abs=1e-8)
    assert g[0][1] == pytest.approx(0.02230825, abs=1e-8)
    assert g[1][2] == pytest.approx(0.08023474, abs=1e-8)
