"""Tests of the 3-D PAC layers of pac.py against torch layers and the N-d brute-force reference.

The reference (pac_reference_nd.py, checked on its own in test_pac_reference_nd.py) is written from
the equations; numerics are compared in float64 on tiny volumes, for both implementations (the
``impl`` fixture: 'unfold', and 'taps' with its CPU loops compiled and as torch operations). The conventions are those of the 2-D layers.
"""
import math

import pytest
import torch
import torch.nn as nn

import pac
from layer_helpers import max_abs_over_resets, rand, randomise_kernel_params, unpack
import pac_reference_nd as reference
from pac_reference_nd import conv_transpose_out_size, gaussian_nd, linear_profile, ntuple, smoothing_kernel_nd

DT = torch.float64


def memoised(fn):
    """``fn`` with its results kept: both ``impl`` runs of a test draw the same seeded data, so the slow
    reference is computed once for the two."""
    results = {}

    def key_of(value):
        if isinstance(value, torch.Tensor):
            value = value.detach()
            return 'tensor', value.dtype, tuple(value.shape), value.cpu().numpy().tobytes()
        return repr(value)

    def call(*args, **kwargs):
        key = tuple(map(key_of, args)) + tuple((name, key_of(value)) for name, value in sorted(kwargs.items()))
        if key not in results:
            results[key] = fn(*args, **kwargs)
        return results[key]

    return call


ref_kernel_nd = memoised(reference.ref_kernel_nd)
ref_pacconv_nd = memoised(reference.ref_pacconv_nd)
ref_pacconv_transpose_nd = memoised(reference.ref_pacconv_transpose_nd)
ref_pacpool_nd = memoised(reference.ref_pacpool_nd)
KERNEL_TYPES = ['gaussian', 'inv_0.2_0.2', 'inv_1_-1', 'inv_0.5_-0.5_asym', 'inv_0.2_0.2_asym_fixed']


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_mask(*shape, keep=0.6):
    return (torch.rand(*shape) < keep).to(DT)


def raises(match: str):
    return pytest.raises((ValueError, TypeError), match=match)


def detached(module, name):
    value = getattr(module, name, None)
    return None if value is None else value.detach()


def reference_output(module, x, kernel, geometry):
    """What ``module`` must return for input ``x`` and the adaptive kernel ``kernel``."""
    get = geometry.get
    weight, bias = detached(module, 'weight'), detached(module, 'bias')
    if isinstance(module, pac.PacPool3d):
        return ref_pacpool_nd(x, kernel, geometry['kernel_size'], get('stride', 1), get('padding', 0),
                              get('dilation', 1))
    if get('transposed', False):
        return ref_pacconv_transpose_nd(x, kernel, weight, bias, get('stride', 1), get('padding', 0),
                                        get('output_padding', 0), get('dilation', 1), module.shared_filters)
    return ref_pacconv_nd(x, kernel, weight, bias, get('stride', 1), get('padding', 0),
                          get('dilation', 1), module.shared_filters, module.groups, get('padding_mode', 'zeros'))


def check_module_against_reference(module, x, guide, mask=None, **geometry):
    """Run ``module`` on (x, guide[, mask]) and compare output and output mask with the reference."""
    randomise_kernel_params(module)
    out, out_mask = unpack(module(x, guide, mask=mask) if mask is not None else module(x, guide))
    kernel, ref_mask = ref_kernel_nd(guide, mask=mask, inv_alpha=detached(module, 'inv_alpha'),
                                     inv_lambda=detached(module, 'inv_lambda'),
                                     smooth_kernel=detached(module, 'smooth_kernel'), **geometry)
    torch.testing.assert_close(out, reference_output(module, x, kernel, geometry))
    if mask is None:
        assert out_mask is None
    else:
        assert out_mask is not None, 'a masked call must return (output, output_mask)'
        assert out_mask.shape == ref_mask.shape
        torch.testing.assert_close(out_mask.to(DT), ref_mask)
    return out


def transposed_out_size(in_size, k, s, p, op, d):
    per_axis = zip(*(ntuple(v, 3) for v in (k, s, p, op, d)))
    return [conv_transpose_out_size(n, *args) for n, args in zip(in_size, per_axis)]


def copy_conv_parameters(source, target, flip=False):
    with torch.no_grad():
        target.weight.copy_(source.weight.flip(2, 3, 4) if flip else source.weight)
        target.bias.copy_(source.bias)


# ---------------------------------------------------------------- constant guide == torch layers


@pytest.mark.parametrize('args', [dict(kernel_size=3, padding=1),
                                  dict(kernel_size=(3, 1, 5), stride=(1, 2, 2), padding=(2, 0, 1), dilation=(2, 1, 1)),
                                  dict(kernel_size=3, stride=2, groups=2)], ids=['k3p1', 'anisotropic', 's2_groups2'])
def test_conv_with_constant_guide_equals_conv3d(impl, args):
    pac_conv = pac.PacConv3d(4, 2, impl=impl, **args).double()
    conv = nn.Conv3d(4, 2, **args).double()
    copy_conv_parameters(pac_conv, conv)
    x = rand(2, 4, 5, 6, 5)
    torch.testing.assert_close(pac_conv(x, torch.ones(2, 3, 5, 6, 5, dtype=DT)), conv(x))


@pytest.mark.parametrize('mode', ['reflect', 'replicate', 'circular'])
def test_conv_padding_mode_with_constant_guide_equals_conv3d(impl, mode):
    pac_conv = pac.PacConv3d(2, 3, 3, padding=(1, 2, 1), dilation=(1, 2, 1), padding_mode=mode, impl=impl).double()
    conv = nn.Conv3d(2, 3, 3, padding=(1, 2, 1), dilation=(1, 2, 1), padding_mode=mode).double()
    copy_conv_parameters(pac_conv, conv)
    x = rand(1, 2, 4, 5, 4)
    torch.testing.assert_close(pac_conv(x, torch.ones(1, 1, 4, 5, 4, dtype=DT)), conv(x))


@pytest.mark.parametrize('k,s,p,op,d', [(3, 2, 1, 1, 1), ((3, 5, 3), (2, 2, 1), (1, 2, 0), (1, 0, 0), 1),
                                        (3, 2, 2, 1, 2), (3, 3, 1, 2, 1)],
                         ids=['k3s2p1op1', 'anisotropic', 'k3s2p2op1d2', 'k3s3p1op2'])
def test_conv_transpose_with_constant_guide_equals_flipped_conv_transpose3d(impl, k, s, p, op, d):
    pac_conv = pac.PacConvTranspose3d(3, 2, k, s, p, op, d, impl=impl).double()
    conv = nn.ConvTranspose3d(3, 2, k, s, p, op, dilation=d).double()
    copy_conv_parameters(pac_conv, conv, flip=True)
    x = rand(2, 3, 2, 3, 2)
    expected = conv(x)
    out = pac_conv(x, torch.ones(2, 2, *expected.shape[2:], dtype=DT))
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)


def test_conv_transpose_weight_is_not_flipped(impl):
    pac_conv = pac.PacConvTranspose3d(2, 2, 3, 2, 1, 1, impl=impl).double()
    conv = nn.ConvTranspose3d(2, 2, 3, 2, 1, 1).double()
    copy_conv_parameters(pac_conv, conv)
    x = rand(1, 2, 2, 3, 2)
    assert (pac_conv(x, torch.ones(1, 1, 4, 6, 4, dtype=DT)) - conv(x)).abs().max() > 1e-3


@pytest.mark.parametrize('k,s,p', [(3, 1, 1), ((3, 5, 3), (2, 1, 2), (1, 2, 0))], ids=['k3p1', 'anisotropic'])
def test_pool_with_constant_guide_is_volume_times_average(impl, k, s, p):
    x = rand(2, 3, 5, 6, 5)
    out = pac.PacPool3d(k, s, p, impl=impl)(x, torch.ones(2, 2, 5, 6, 5, dtype=DT))
    volume = math.prod(ntuple(k, 3))
    torch.testing.assert_close(out, volume * nn.AvgPool3d(k, s, p, count_include_pad=True)(x))


@pytest.mark.parametrize('k,s,p', [(3, 2, 1), ((3, 5, 3), (2, 1, 2), (1, 2, 0))], ids=['k3s2p1', 'anisotropic'])
def test_normalised_pool_with_constant_guide_is_average_over_valid_taps(impl, k, s, p):
    x = rand(2, 3, 5, 6, 5)
    pool = pac.PacPool3d(k, s, p, normalize_kernel=True, impl=impl)
    out = pool(x, torch.ones(2, 2, 5, 6, 5, dtype=DT))
    torch.testing.assert_close(out, nn.AvgPool3d(k, s, p, count_include_pad=False)(x))


def test_module_attributes_are_triples():
    conv = pac.PacConv3d(2, 2, (3, 1, 5), stride=2, padding=(1, 0, 2))
    assert conv.kernel_size == (3, 1, 5) and conv.stride == (2, 2, 2) and conv.padding == (1, 0, 2)
    assert conv.dilation == (1, 1, 1)
    assert pac.PacConvTranspose3d(2, 2, 3, 2, 1, 1).output_padding == (1, 1, 1)
    assert pac.PacPool3d(3).stride == (1, 1, 1)  # as in 2-D: stride defaults to 1, not to kernel_size


# ---------------------------------------------------------------- packernel3d against the reference


@pytest.mark.parametrize('kernel_type', KERNEL_TYPES)
@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_packernel3d_kernel_types_match_reference(impl, kernel_type, normalize):
    guide = rand(2, 3, 4, 5, 4)
    inv = {} if kernel_type == 'gaussian' else dict(inv_alpha=torch.tensor(0.3, dtype=DT),
                                                    inv_lambda=torch.tensor(-0.7, dtype=DT))
    kernel, out_mask = pac.packernel3d(guide, kernel_size=3, padding=1, kernel_type=kernel_type,
                                       normalize_kernel=normalize, impl=impl, **inv)
    expected, _ = ref_kernel_nd(guide, 3, padding=1, kernel_type=kernel_type, normalize_kernel=normalize, **inv)
    assert out_mask is None
    assert kernel.shape == (2, 1, 3, 3, 3, 4, 5, 4)
    torch.testing.assert_close(kernel, expected)


@pytest.mark.parametrize('k,s,p,d', [(3, 2, 0, 1), ((3, 1, 5), (1, 2, 2), (1, 0, 2), 1), (3, 2, 2, 2),
                                     ((5, 3, 3), (2, 1, 1), (2, 1, 0), (1, 1, 2))],
                         ids=['k3s2', 'anisotropic', 'k3s2p2d2', 'k533_d112'])
@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_packernel3d_geometries_match_reference(impl, k, s, p, d, normalize):
    guide = rand(2, 2, 5, 4, 6)
    kernel, _ = pac.packernel3d(guide, kernel_size=k, stride=s, padding=p, dilation=d, normalize_kernel=normalize,
                                impl=impl)
    expected, _ = ref_kernel_nd(guide, k, s, p, d, normalize_kernel=normalize)
    torch.testing.assert_close(kernel, expected)


@pytest.mark.parametrize('kernel_type', ['gaussian', 'inv_0.3_-1', 'inv_0.2_0.2_asym'])
def test_packernel3d_channel_wise_matches_reference(impl, kernel_type):
    guide = rand(2, 3, 4, 3, 4)
    alpha, lam = (None, None) if kernel_type == 'gaussian' else (rand(3).abs(), -rand(3).abs())
    mask = random_mask(2, 1, 4, 3, 4)
    for m in (None, mask):
        kernel, out_mask = pac.packernel3d(guide, m, kernel_size=3, padding=1, kernel_type=kernel_type,
                                           inv_alpha=alpha, inv_lambda=lam, channel_wise=True, normalize_kernel=True,
                                           impl=impl)
        expected, ref_mask = ref_kernel_nd(guide, 3, padding=1, kernel_type=kernel_type, inv_alpha=alpha,
                                           inv_lambda=lam, channel_wise=True, normalize_kernel=True, mask=m)
        assert kernel.shape == (2, 3, 3, 3, 3, 4, 3, 4)
        torch.testing.assert_close(kernel, expected)
        if m is not None:
            assert out_mask.shape == (2, 3, 4, 3, 4)
            torch.testing.assert_close(out_mask.to(DT), ref_mask)


@pytest.mark.parametrize('k,s,p,op,d', [(3, 2, 1, 1, 1), ((3, 5, 3), (2, 2, 1), (1, 2, 0), (1, 0, 0), 1),
                                        (3, 2, 2, 1, 2)], ids=['k3s2p1op1', 'anisotropic', 'k3s2p2op1d2'])
@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_packernel3d_transposed_matches_reference(impl, k, s, p, op, d, normalize):
    in_size = (2, 3, 2)
    guide = rand(2, 2, *transposed_out_size(in_size, k, s, p, op, d))
    for mask in (None, random_mask(2, 1, *in_size)):
        kernel, out_mask = pac.packernel3d(guide, mask, kernel_size=k, stride=s, padding=p, output_padding=op,
                                           dilation=d, normalize_kernel=normalize, transposed=True, impl=impl)
        expected, ref_mask = ref_kernel_nd(guide, k, s, p, d, normalize_kernel=normalize, transposed=True,
                                           output_padding=op, mask=mask)
        torch.testing.assert_close(kernel, expected)
        if mask is None:
            assert out_mask is None
        else:
            torch.testing.assert_close(out_mask.to(DT), ref_mask)


@pytest.mark.parametrize('smooth', ['gaussian', 'average_3', 'average_5', 'full_3'])
def test_packernel3d_smoothing_matches_reference(impl, smooth):
    guide = rand(2, 2, 4, 5, 4)
    smooth_kernel = smoothing_kernel_nd(smooth) + (0.02 * torch.rand(1) if smooth.startswith('full') else 0)
    kernel, _ = pac.packernel3d(guide, kernel_size=3, stride=(1, 2, 1), padding=1, smooth_kernel_type=smooth,
                                smooth_kernel=smooth_kernel, impl=impl)
    expected, _ = ref_kernel_nd(guide, 3, (1, 2, 1), 1, smooth_kernel=smooth_kernel)
    torch.testing.assert_close(kernel, expected)


def test_packernel3d_dtypes():
    guide = torch.randn(1, 2, 3, 4, 3)
    assert pac.packernel3d(guide, kernel_size=3, padding=1)[0].dtype == torch.float32
    assert pac.packernel3d(guide.double(), kernel_size=3, padding=1)[0].dtype == torch.float64
    kernel, _ = pac.packernel3d(guide.bfloat16(), kernel_size=3, padding=1)
    assert kernel.dtype == torch.float32, 'the adaptive kernel is computed in float32'


# ---------------------------------------------------------------- module options against the reference


@pytest.mark.parametrize('kernel_type', KERNEL_TYPES)
def test_conv_kernel_types_match_reference(impl, kernel_type):
    module = pac.PacConv3d(2, 3, 3, padding=1, kernel_type=kernel_type, impl=impl).double()
    check_module_against_reference(module, rand(2, 2, 3, 4, 3), rand(2, 3, 3, 4, 3), kernel_size=3, padding=1,
                                   kernel_type=kernel_type)


@pytest.mark.parametrize('smooth', ['gaussian', 'average_3', 'full_3'])
def test_conv_smoothing_matches_reference(impl, smooth):
    kernel_type = 'inv_0.5_-1_asym'
    module = pac.PacConv3d(2, 2, 3, stride=2, padding=1, kernel_type=kernel_type, smooth_kernel_type=smooth,
                           normalize_kernel=True, impl=impl).double()
    check_module_against_reference(module, rand(2, 2, 5, 4, 5), rand(2, 3, 5, 4, 5), kernel_size=3, stride=2,
                                   padding=1, kernel_type=kernel_type, normalize_kernel=True)


def test_smoothing_with_dilation_works_or_is_rejected_clearly(impl):
    try:
        module = pac.PacConv3d(1, 1, 3, padding=2, dilation=2, smooth_kernel_type='average_3', impl=impl).double()
        x, guide = rand(1, 1, 5, 5, 5), rand(1, 2, 5, 5, 5)
        module(x, guide)
    except ValueError as error:
        assert 'dilation' in str(error)
        return
    check_module_against_reference(module, x, guide, kernel_size=3, padding=2, dilation=2)


@pytest.mark.parametrize('k,s,p,d', [(3, 1, 1, 1), ((3, 1, 3), (1, 2, 2), (1, 0, 0), 1), (3, 2, 2, 2),
                                     ((5, 3, 3), (2, 1, 1), (2, 1, 0), (1, 1, 2))],
                         ids=['k3p1', 'anisotropic', 'k3s2p2d2', 'k533_d112'])
def test_conv_geometries_match_reference(impl, k, s, p, d):
    module = pac.PacConv3d(2, 3, k, s, p, d, normalize_kernel=True, impl=impl).double()
    check_module_against_reference(module, rand(2, 2, 5, 4, 6), rand(2, 2, 5, 4, 6), kernel_size=k, stride=s,
                                   padding=p, dilation=d, normalize_kernel=True)


@pytest.mark.parametrize('k,s,p,d', [(3, 2, 1, 1), ((3, 1, 5), (1, 2, 2), (1, 0, 2), (2, 1, 1))],
                         ids=['k3s2p1', 'anisotropic'])
def test_pool_geometries_match_reference(impl, k, s, p, d):
    module = pac.PacPool3d(k, s, p, d, impl=impl)
    check_module_against_reference(module, rand(2, 3, 5, 4, 6), rand(2, 2, 5, 4, 6), kernel_size=k, stride=s,
                                   padding=p, dilation=d)


@pytest.mark.parametrize('k,s,p,op,d', [(3, 2, 1, 1, 1), ((3, 5, 3), (2, 2, 1), (1, 2, 0), (1, 0, 0), 1),
                                        (3, 2, 2, 1, 2), (3, 3, 1, 2, 1)],
                         ids=['k3s2p1op1', 'anisotropic', 'k3s2p2op1d2', 'k3s3p1op2'])
def test_conv_transpose_geometries_match_reference(impl, k, s, p, op, d):
    module = pac.PacConvTranspose3d(2, 3, k, s, p, op, d, impl=impl).double()
    x = rand(2, 2, 2, 3, 2)
    guide = rand(2, 2, *transposed_out_size(x.shape[2:], k, s, p, op, d))
    check_module_against_reference(module, x, guide, kernel_size=k, stride=s, padding=p,
                                   output_padding=op, dilation=d, transposed=True)


@pytest.mark.parametrize('kernel_type,smooth', [('gaussian', 'gaussian'), ('inv_1_-1', 'none'),
                                                ('inv_0.2_0.2_asym', 'average_3'), ('gaussian', 'full_3')])
def test_conv_transpose_kernel_types_and_smoothing_match_reference(impl, kernel_type, smooth):
    module = pac.PacConvTranspose3d(2, 3, 3, 2, 1, 1, kernel_type=kernel_type, smooth_kernel_type=smooth,
                                    impl=impl).double()
    check_module_against_reference(module, rand(2, 2, 2, 3, 2), rand(2, 2, 4, 6, 4), kernel_size=3, stride=2,
                                   padding=1, output_padding=1, transposed=True, kernel_type=kernel_type)


@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_conv_mask_and_output_mask_match_reference(impl, normalize):
    x, guide = rand(2, 2, 4, 5, 4), rand(2, 3, 4, 5, 4)
    mask = random_mask(2, 1, 4, 5, 4, keep=0.4)
    mask[0, :, :3] = 0  # some output voxels see no valid input at all
    module = pac.PacConv3d(2, 3, 3, 1, 1, normalize_kernel=normalize, impl=impl).double()
    check_module_against_reference(module, x, guide, mask, kernel_size=3, padding=1, normalize_kernel=normalize)


def test_conv_mask_of_batch_one_and_bool_mask(impl):
    x, guide = rand(2, 2, 3, 4, 3), rand(2, 2, 3, 4, 3)
    mask = torch.rand(1, 1, 3, 4, 3) > 0.4
    module = pac.PacConv3d(2, 2, 3, stride=(1, 2, 1), padding=1, impl=impl).double()
    out = check_module_against_reference(module, x, guide, mask.to(DT), kernel_size=3, stride=(1, 2, 1), padding=1)
    torch.testing.assert_close(module(x, guide, mask=mask)[0], out)


@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_conv_transpose_mask_and_output_mask_match_reference(impl, normalize):
    x, guide = rand(2, 2, 2, 3, 2), rand(2, 3, 4, 6, 4)
    mask = random_mask(2, 1, 2, 3, 2, keep=0.5)
    module = pac.PacConvTranspose3d(2, 3, 3, 2, 1, 1, normalize_kernel=normalize, impl=impl).double()
    check_module_against_reference(module, x, guide, mask, kernel_size=3, stride=2, padding=1, output_padding=1,
                                   transposed=True, normalize_kernel=normalize)


@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_pool_mask_and_output_mask_match_reference(impl, normalize):
    x, guide = rand(2, 3, 5, 4, 5), rand(2, 2, 5, 4, 5)
    mask = random_mask(2, 1, 5, 4, 5, keep=0.5)
    module = pac.PacPool3d(3, 2, 1, normalize_kernel=normalize, impl=impl)
    check_module_against_reference(module, x, guide, mask, kernel_size=3, stride=2, padding=1,
                                   normalize_kernel=normalize)


@pytest.mark.parametrize('kernel_type', ['gaussian', 'inv_0.2_0.2_asym', 'inv_1_-1_fixed'])
def test_channel_wise_pool_matches_reference(impl, kernel_type):
    module = pac.PacPool3d(3, 1, 1, kernel_type=kernel_type, channel_wise=True, out_channels=3, normalize_kernel=True,
                           smooth_kernel_type='average_3', impl=impl).double()
    mask = random_mask(2, 1, 3, 4, 3)
    check_module_against_reference(module, rand(2, 3, 3, 4, 3), rand(2, 3, 3, 4, 3), mask, kernel_size=3,
                                   padding=1, kernel_type=kernel_type, channel_wise=True, normalize_kernel=True)


def test_conv_shared_filters_match_reference(impl):
    module = pac.PacConv3d(3, 3, 3, 2, 1, shared_filters=True, impl=impl).double()
    assert module.weight.shape == (1, 1, 3, 3, 3)
    check_module_against_reference(module, rand(2, 3, 5, 4, 5), rand(2, 2, 5, 4, 5), kernel_size=3, stride=2,
                                   padding=1)


def test_conv_transpose_shared_filters_match_reference(impl):
    module = pac.PacConvTranspose3d(3, 3, (3, 5, 3), 2, (1, 2, 1), 1, shared_filters=True, impl=impl).double()
    assert module.weight.shape == (1, 1, 3, 5, 3)
    check_module_against_reference(module, rand(2, 3, 2, 3, 2), rand(2, 2, 4, 6, 4), kernel_size=(3, 5, 3),
                                   stride=2, padding=(1, 2, 1), output_padding=1, transposed=True)


@pytest.mark.parametrize('in_ch,out_ch,groups', [(4, 6, 2), (3, 3, 3), (4, 2, 2)])
def test_conv_groups_match_reference(impl, in_ch, out_ch, groups):
    module = pac.PacConv3d(in_ch, out_ch, 3, padding=1, groups=groups, impl=impl).double()
    assert module.weight.shape == (out_ch, in_ch // groups, 3, 3, 3)
    check_module_against_reference(module, rand(2, in_ch, 3, 4, 3), rand(2, 2, 3, 4, 3), kernel_size=3, padding=1)


@pytest.mark.parametrize('mode', ['zeros', 'reflect', 'replicate', 'circular'])
@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_conv_padding_mode_matches_reference(impl, mode, normalize):
    module = pac.PacConv3d(2, 3, 3, (2, 1, 1), (1, 2, 1), (1, 2, 1), normalize_kernel=normalize, padding_mode=mode,
                           impl=impl).double()
    check_module_against_reference(module, rand(2, 2, 4, 5, 3), rand(2, 2, 4, 5, 3), kernel_size=3,
                                   stride=(2, 1, 1), padding=(1, 2, 1), dilation=(1, 2, 1), normalize_kernel=normalize,
                                   padding_mode=mode)


def test_conv_padding_mode_with_mask_matches_reference(impl):
    module = pac.PacConv3d(2, 2, 3, padding=1, padding_mode='reflect', normalize_kernel=True, impl=impl).double()
    mask = random_mask(2, 1, 3, 4, 3)
    check_module_against_reference(module, rand(2, 2, 3, 4, 3), rand(2, 2, 3, 4, 3), mask, kernel_size=3, padding=1,
                                   padding_mode='reflect', normalize_kernel=True)


def test_non_contiguous_and_channels_last_inputs(impl):
    module = pac.PacConv3d(3, 2, 3, 2, 1, normalize_kernel=True, impl=impl).double()
    x, guide = rand(2, 3, 5, 4, 5), rand(2, 2, 5, 4, 5)
    expected = module(x, guide)
    torch.testing.assert_close(module(x.transpose(2, 4).contiguous().transpose(2, 4),
                                      guide.transpose(3, 4).contiguous().transpose(3, 4)), expected)
    torch.testing.assert_close(module(x.contiguous(memory_format=torch.channels_last_3d),
                                      guide.contiguous(memory_format=torch.channels_last_3d)), expected)


def test_compute_kernel_matches_reference(impl):
    module = pac.PacConvTranspose3d(2, 2, 3, 2, 1, 1, kernel_type='inv_0.5_-1', normalize_kernel=True,
                                    impl=impl).double()
    randomise_kernel_params(module)
    guide, mask = rand(2, 2, 4, 6, 4), random_mask(2, 1, 2, 3, 2)
    kernel, out_mask = module.compute_kernel(guide, mask)
    expected, ref_mask = ref_kernel_nd(guide, 3, 2, 1, transposed=True, output_padding=1, mask=mask,
                                       kernel_type='inv_0.5_-1', inv_alpha=module.inv_alpha.detach(),
                                       inv_lambda=module.inv_lambda.detach(), normalize_kernel=True)
    torch.testing.assert_close(kernel, expected)
    torch.testing.assert_close(out_mask.to(DT), ref_mask)
    assert module.compute_kernel(guide)[1] is None


# ---------------------------------------------------------------- precomputed kernels and functional forms


def test_conv_precomputed_kernel_matches_reference(impl):
    module = pac.PacConv3d(2, 3, 3, 2, 1, impl=impl).double()
    x = rand(2, 2, 5, 4, 5)
    kernel = torch.rand(2, 1, 3, 3, 3, 3, 2, 3, dtype=DT)
    torch.testing.assert_close(module(x, None, kernel), ref_pacconv_nd(x, kernel, module.weight, module.bias, 2, 1))


def test_conv_transpose_precomputed_kernel_matches_reference(impl):
    module = pac.PacConvTranspose3d(2, 3, 3, 2, 1, 1, impl=impl).double()
    x = rand(2, 2, 2, 3, 2)
    kernel = torch.rand(2, 1, 3, 3, 3, 4, 6, 4, dtype=DT)
    torch.testing.assert_close(module(x, None, kernel),
                               ref_pacconv_transpose_nd(x, kernel, module.weight, module.bias, 2, 1, 1))


@pytest.mark.parametrize('kernel_channels', [1, 3])
def test_pool_precomputed_kernel_matches_reference(impl, kernel_channels):
    channel_wise = kernel_channels > 1
    module = pac.PacPool3d(3, 2, 2, 2, channel_wise=channel_wise, out_channels=3 if channel_wise else -1, impl=impl)
    x = rand(2, 3, 5, 4, 5)
    kernel = torch.rand(2, kernel_channels, 3, 3, 3, 3, 2, 3, dtype=DT)
    torch.testing.assert_close(module(x, None, kernel), ref_pacpool_nd(x, kernel, 3, 2, 2, 2))


def test_functional_forms_match_reference(impl):
    x, guide = rand(2, 2, 3, 4, 3), rand(2, 3, 3, 4, 3)
    weight, bias = rand(4, 2, 3, 3, 3), rand(4)
    kernel, _ = pac.packernel3d(guide, kernel_size=3, padding=1, impl=impl)
    ref_k, _ = ref_kernel_nd(guide, 3, padding=1)
    torch.testing.assert_close(pac.pacconv3d(x, kernel, weight, bias, padding=1, impl=impl),
                               ref_pacconv_nd(x, ref_k, weight, bias, padding=1))
    grouped = rand(4, 1, 3, 3, 3)
    torch.testing.assert_close(pac.pacconv3d(x, kernel, grouped, bias, padding=1, groups=2, padding_mode='replicate',
                                             impl=impl),
                               ref_pacconv_nd(x, ref_k, grouped, bias, padding=1, groups=2, padding_mode='replicate'))
    shared = rand(1, 1, 3, 3, 3)
    torch.testing.assert_close(pac.pacconv3d(x, kernel, shared, padding=1, shared_filters=True, impl=impl),
                               ref_pacconv_nd(x, ref_k, shared, padding=1, shared_filters=True))
    torch.testing.assert_close(pac.pacpool3d(x, kernel, 3, padding=1, impl=impl),
                               ref_pacpool_nd(x, ref_k, 3, padding=1))
    t_guide = rand(2, 3, 6, 8, 6)
    t_kernel, _ = pac.packernel3d(t_guide, kernel_size=3, stride=2, padding=1, output_padding=1, transposed=True,
                                  impl=impl)
    ref_t, _ = ref_kernel_nd(t_guide, 3, 2, 1, transposed=True, output_padding=1)
    t_weight = rand(2, 4, 3, 3, 3)
    torch.testing.assert_close(pac.pacconv_transpose3d(x, t_kernel, t_weight, bias, 2, 1, 1, impl=impl),
                               ref_pacconv_transpose_nd(x, ref_t, t_weight, bias, 2, 1, 1))
    torch.testing.assert_close(pac.pacconv_transpose3d(x, t_kernel, shared, None, 2, 1, 1, shared_filters=True,
                                                       impl=impl),
                               ref_pacconv_transpose_nd(x, ref_t, shared, None, 2, 1, 1, shared_filters=True))


def test_impl_auto_runs_taps_on_cpu_and_triton_is_rejected():
    x, guide = rand(1, 2, 3, 4, 3), rand(1, 2, 3, 4, 3)
    module = pac.PacConv3d(2, 2, 3, padding=1, kernel_type='inv_0.5_-1', impl='auto').double()
    taps = pac.PacConv3d(2, 2, 3, padding=1, kernel_type='inv_0.5_-1', impl='taps').double()
    taps.load_state_dict(module.state_dict())
    torch.testing.assert_close(module(x, guide), taps(x, guide))
    with raises('triton'):  # as in 2-D, the modules reject it; the functional forms run 'taps' for it
        pac.PacConv3d(2, 2, 3, padding=1, impl='triton')(x.float(), guide.float())
    with raises('impl'):
        pac.PacPool3d(3, impl='fast')


# ---------------------------------------------------------------- gradients (float64 gradcheck)


def gradcheck(fn, inputs):
    """float64 gradcheck in fast mode (random projections of the Jacobian) to keep the run quick."""
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-3, fast_mode=True)


@pytest.mark.parametrize('options', [dict(), dict(kernel_type='inv_0.5_-1_asym'), dict(smooth_kernel_type='full_3'),
                                     dict(normalize_kernel=True, padding_mode='reflect')],
                         ids=['gaussian', 'inv_asym', 'full_3', 'normalised_reflect'])
def test_conv_gradcheck_all_inputs(impl, options):
    x, guide = rand(1, 2, 3, 4, 3, grad=True), rand(1, 2, 3, 4, 3, grad=True)
    weight, bias = rand(2, 2, 3, 3, 3, grad=True), rand(2, grad=True)
    extra, names = (), []
    if 'smooth_kernel_type' in options:
        extra, names = (torch.rand(1, 1, 3, 3, 3, dtype=DT, requires_grad=True),), ['smooth_kernel']
    elif 'kernel_type' in options:
        extra = (torch.tensor(0.5, dtype=DT, requires_grad=True), torch.tensor(-1.0, dtype=DT, requires_grad=True))
        names = ['inv_alpha', 'inv_lambda']
    mode = options.get('padding_mode', 'zeros')

    def fn(x, guide, weight, bias, *params):
        kernel, _ = pac.packernel3d(guide, kernel_size=3, stride=(1, 2, 1), padding=1, impl=impl, **options,
                                    **dict(zip(names, params)))
        return pac.pacconv3d(x, kernel, weight, bias, (1, 2, 1), 1, padding_mode=mode, impl=impl)

    gradcheck(fn, (x, guide, weight, bias) + extra)


def test_conv_module_gradcheck_with_mask(impl):
    module = pac.PacConv3d(2, 2, 3, padding=1, normalize_kernel=True, impl=impl).double()
    mask = random_mask(1, 1, 3, 3, 3, keep=0.7)
    x, guide = rand(1, 2, 3, 3, 3, grad=True), rand(1, 2, 3, 3, 3, grad=True)
    gradcheck(lambda x, guide: module(x, guide, mask=mask)[0], (x, guide))


@pytest.mark.parametrize('options', [dict(), dict(normalize_kernel=True, kernel_type='inv_1_-1')],
                         ids=['gaussian', 'inv_normalised'])
def test_conv_transpose_gradcheck_all_inputs(impl, options):
    x, guide = rand(1, 2, 2, 2, 2, grad=True), rand(1, 2, 4, 4, 4, grad=True)
    weight, bias = rand(2, 3, 3, 3, 3, grad=True), rand(3, grad=True)
    inv = dict(inv_alpha=torch.tensor(1.0, dtype=DT), inv_lambda=torch.tensor(-1.0, dtype=DT))

    def fn(x, guide, weight, bias):
        kernel, _ = pac.packernel3d(guide, kernel_size=3, stride=2, padding=1, output_padding=1, transposed=True,
                                    impl=impl, **options, **(inv if 'kernel_type' in options else {}))
        return pac.pacconv_transpose3d(x, kernel, weight, bias, 2, 1, 1, impl=impl)

    gradcheck(fn, (x, guide, weight, bias))


def test_conv_transpose_gradcheck_shared_precomputed_kernel(impl):
    x, kernel = rand(1, 2, 2, 2, 2, grad=True), torch.rand(1, 1, 3, 3, 3, 4, 4, 4, dtype=DT, requires_grad=True)
    weight, bias = rand(1, 1, 3, 3, 3, grad=True), rand(2, grad=True)
    gradcheck(lambda *a: pac.pacconv_transpose3d(*a, stride=2, padding=1, output_padding=1, shared_filters=True,
                                                 impl=impl), (x, kernel, weight, bias))


def test_pool_gradcheck(impl):
    module = pac.PacPool3d(3, 2, 1, kernel_type='inv_0.5_-1', channel_wise=True, out_channels=2,
                           smooth_kernel_type='average_3', normalize_kernel=True, impl=impl).double()
    x, guide = rand(1, 2, 3, 4, 3, grad=True), rand(1, 2, 3, 4, 3, grad=True)
    gradcheck(lambda x, guide: module(x, guide), (x, guide))
    kernel = torch.rand(1, 2, 3, 3, 3, 2, 2, 2, dtype=DT, requires_grad=True)
    gradcheck(lambda x, kernel: module(x, None, kernel), (x, kernel))


def test_module_parameters_receive_gradients(impl):
    module = pac.PacConv3d(2, 2, 3, padding=1, kernel_type='inv_0.5_-1', smooth_kernel_type='full_3',
                           impl=impl).double()
    module(rand(1, 2, 3, 4, 3), rand(1, 2, 3, 4, 3)).square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- state_dict layout (as the 2-D layers)


def layout(module):
    """{key: (kind, shape)} of the state_dict; kind is 'param' or 'buffer'."""
    params = dict(module.named_parameters())
    return {key: ('param' if key in params else 'buffer', tuple(value.shape))
            for key, value in module.state_dict().items()}


@pytest.mark.parametrize('make,expected', [
    (lambda: pac.PacConv3d(3, 4, 3), {'weight': ('param', (4, 3, 3, 3, 3)), 'bias': ('param', (4,))}),
    (lambda: pac.PacConv3d(4, 2, (3, 1, 5), groups=2, bias=False), {'weight': ('param', (2, 2, 3, 1, 5))}),
    (lambda: pac.PacConvTranspose3d(3, 4, 3), {'weight': ('param', (3, 4, 3, 3, 3)), 'bias': ('param', (4,))}),
    (lambda: pac.PacConv3d(3, 3, 3, shared_filters=True), {'weight': ('param', (1, 1, 3, 3, 3)),
                                                           'bias': ('param', (3,))}),
    (lambda: pac.PacConv3d(3, 3, 3, bias=False, shared_filters=True, filler='pool'),
     {'weight': ('buffer', (1, 1, 3, 3, 3))}),
    (lambda: pac.PacConv3d(2, 3, 3, kernel_type='inv_0.2_0.2', smooth_kernel_type='full_3'),
     {'weight': ('param', (3, 2, 3, 3, 3)), 'bias': ('param', (3,)), 'inv_alpha': ('param', ()),
      'inv_lambda': ('param', ()), 'smooth_kernel': ('param', (1, 1, 3, 3, 3))}),
    (lambda: pac.PacConvTranspose3d(2, 3, 3, kernel_type='inv_0.2_0.2_fixed', smooth_kernel_type='average_5'),
     {'weight': ('param', (2, 3, 3, 3, 3)), 'bias': ('param', (3,)), 'inv_alpha': ('buffer', ()),
      'inv_lambda': ('buffer', ()), 'smooth_kernel': ('buffer', (1, 1, 5, 5, 5))}),
    (lambda: pac.PacPool3d(3, kernel_type='inv_0.2_0.2', channel_wise=True, out_channels=4),
     {'inv_alpha': ('param', (4,)), 'inv_lambda': ('param', (4,))}),
    (lambda: pac.PacPool3d(3), {}),
    (lambda: pac.PacPool3d(3, smooth_kernel_type='gaussian'), {'smooth_kernel': ('buffer', (1, 1, 3, 3, 3))}),
], ids=['conv', 'conv_groups_nobias', 'convT', 'shared', 'pool_filler', 'inv_full', 'convT_fixed_average',
        'pool_channel_wise', 'pool', 'pool_gaussian_smooth'])
def test_state_dict_layout(make, expected):
    module = make()
    assert layout(module) == expected
    kinds = [expected[key][0] for key in module.state_dict()]
    assert kinds == sorted(kinds, key=lambda kind: kind == 'buffer'), 'parameters come before buffers'


def test_initial_kernel_parameter_values():
    conv = pac.PacConv3d(2, 3, 3, kernel_type='inv_0.2_-1.5_asym', smooth_kernel_type='full_3')
    assert conv.inv_alpha.item() == pytest.approx(0.2) and conv.inv_lambda.item() == pytest.approx(-1.5)
    torch.testing.assert_close(conv.smooth_kernel.detach(), torch.full((1, 1, 3, 3, 3), 1 / 27))
    pool = pac.PacPool3d(3, kernel_type='inv_1_2', channel_wise=True, out_channels=3, smooth_kernel_type='gaussian')
    torch.testing.assert_close(pool.inv_lambda.detach(), torch.full((3,), 2.0))
    torch.testing.assert_close(pool.smooth_kernel.double(), smoothing_kernel_nd('gaussian'))
    torch.testing.assert_close(pac.PacPool3d(3, smooth_kernel_type='average_5').smooth_kernel.double(),
                               smoothing_kernel_nd('average_5'))
    with torch.no_grad():
        conv.smooth_kernel.add_(1.0)
        conv.inv_alpha.add_(1.0)
    conv.reset_parameters()
    torch.testing.assert_close(conv.smooth_kernel.detach(), torch.full((1, 1, 3, 3, 3), 1 / 27))
    assert conv.inv_alpha.item() == pytest.approx(0.2)


# ---------------------------------------------------------------- fillers


@pytest.mark.parametrize('make,bound', [
    (lambda: pac.PacConv3d(6, 5, 3), 1 / (6 * 27) ** 0.5),
    (lambda: pac.PacConv3d(4, 6, (3, 1, 5), groups=2), 1 / (2 * 15) ** 0.5),
    (lambda: pac.PacConvTranspose3d(6, 2, 3), 1 / (6 * 27) ** 0.5),  # in_channels, not out_channels
    (lambda: pac.PacConv3d(16, 16, 3, shared_filters=True), 16 / (16 * 27) ** 0.5),  # the x in_channels quirk
    (lambda: pac.PacConvTranspose3d(16, 16, 3, shared_filters=True), 16 / (16 * 27) ** 0.5),
], ids=['conv', 'conv_groups_anisotropic', 'convT', 'conv_shared', 'convT_shared'])
def test_uniform_filler_bounds(make, bound):
    largest = max_abs_over_resets(make(), ['weight', 'bias'])
    assert 0.9 * bound < largest <= bound


def outer3(profiles):
    a, b, c = (torch.tensor(p, dtype=torch.float64) for p in profiles)
    return torch.einsum('i,j,k->ijk', a, b, c)


@pytest.mark.parametrize('k,s', [(3, 2), ((5, 3, 7), (2, 1, 4))], ids=['k3s2', 'anisotropic'])
@pytest.mark.parametrize('normalize', [False, True], ids=['raw', 'normalised'])
def test_linear_filler_is_a_trilinear_upsampler_on_the_channel_diagonal(k, s, normalize):
    module = pac.PacConvTranspose3d(3, 3, k, s, filler='linear', normalize_kernel=normalize)
    k3, s3 = (v if isinstance(v, tuple) else (v,) * 3 for v in (k, s))
    volume = outer3([linear_profile(kk, ss, normalize) for kk, ss in zip(k3, s3)])
    expected = torch.zeros(3, 3, *k3, dtype=torch.float64)
    for c in range(3):
        expected[c, c] = volume
    torch.testing.assert_close(module.weight.detach().double(), expected)
    assert (module.bias == 0).all()


def test_linear_filler_shared():
    module = pac.PacConvTranspose3d(4, 4, 3, 2, filler='linear', shared_filters=True)
    torch.testing.assert_close(module.weight.detach().double()[0, 0], outer3([[0.5, 1, 0.5]] * 3))


def crf_gaussian(k: int) -> torch.Tensor:
    g = gaussian_nd(k) * k ** 3
    g[k // 2, k // 2, k // 2] = 0
    return g


@pytest.mark.parametrize('k', [3, 5])
def test_crf_filler_values(k):
    module = pac.PacConv3d(3, 3, k, filler='crf')
    weight = module.weight.detach().double()
    for o in range(3):
        for c in range(3):
            torch.testing.assert_close(weight[o, c], crf_gaussian(k) * (o != c), rtol=1e-5, atol=1e-6)
    assert (module.bias == 0).all()
    shared = pac.PacConv3d(3, 3, k, filler='crf', shared_filters=True)
    torch.testing.assert_close(shared.weight.detach().double()[0, 0], crf_gaussian(k), rtol=1e-5, atol=1e-6)


def test_crf_perturbed_filler_is_within_5e_4():
    weight = pac.PacConv3d(3, 3, 3, filler='crf_perturbed').weight.detach().double()
    expected = torch.stack([torch.stack([crf_gaussian(3) * (o != c) for c in range(3)]) for o in range(3)])
    difference = (weight - expected).abs()
    assert 1e-5 < difference.max() <= 5e-4 + 1e-6


def test_pool_fillers():
    pool = pac.PacConv3d(2, 2, (3, 1, 5), bias=False, shared_filters=True, filler='pool')
    torch.testing.assert_close(pool.weight, torch.ones(1, 1, 3, 1, 5))
    crf_pool = pac.PacConv3d(2, 2, 3, bias=False, shared_filters=True, filler='crf_pool')
    expected = torch.ones(1, 1, 3, 3, 3)
    expected[0, 0, 1, 1, 1] = 0
    torch.testing.assert_close(crf_pool.weight, expected)


# ---------------------------------------------------------------- clear errors


@pytest.mark.parametrize('make', [
    lambda x: pac.PacConv3d(2, 2, 3, padding=1)(x, x), lambda x: pac.PacConvTranspose3d(2, 2, 3)(x, x),
    lambda x: pac.PacPool3d(3, padding=1)(x, x)], ids=['conv', 'convT', 'pool'])
def test_4d_module_input_is_rejected(make):
    with raises('input_3d'):
        make(torch.randn(1, 2, 4, 4))


def test_4d_functional_inputs_are_rejected():
    x4, x5 = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4, 4)
    kernel, _ = pac.packernel3d(x5, kernel_size=3, padding=1)
    with raises('input'):
        pac.packernel3d(x4, kernel_size=3, padding=1)
    with raises('input'):
        pac.pacconv3d(x4, kernel, torch.randn(2, 2, 3, 3, 3), padding=1)
    with raises('input'):
        pac.pacconv_transpose3d(x4, kernel, torch.randn(2, 2, 3, 3, 3), padding=1)
    with raises('input'):
        pac.pacpool3d(x4, kernel, 3, padding=1)
    with raises('kernel'):  # a 2-D kernel shape
        pac.pacconv3d(x5, kernel.flatten(2, 3), torch.randn(2, 2, 3, 3, 3), padding=1)
    with raises('kernel'):  # the wrong output size
        pac.pacpool3d(x5, kernel, 3, padding=0)


@pytest.mark.parametrize('guide_shape', [(1, 2, 4, 4, 5), (2, 2, 4, 4, 4), (1, 2, 4, 4)],
                         ids=['size', 'batch', '4d'])
def test_wrong_guide_is_rejected(guide_shape):
    x = torch.randn(1, 2, 4, 4, 4)
    with raises('input_for_kernel'):
        pac.PacConv3d(2, 2, 3, padding=1)(x, torch.randn(*guide_shape))
    with raises('input_for_kernel'):
        pac.PacPool3d(3, padding=1)(x, torch.randn(*guide_shape))


def test_transposed_guide_must_have_the_output_size():
    x = torch.randn(1, 2, 2, 3, 2)
    with raises('input_for_kernel'):
        pac.PacConvTranspose3d(2, 2, 3, 2, 1, 1)(x, torch.randn(1, 1, 2, 3, 2))  # the input size
    with raises('input_for_kernel'):
        pac.PacConv3d(2, 2, 3, padding=1)(x, None)


@pytest.mark.parametrize('make', [
    lambda: pac.PacConv3d(2, 2, 4), lambda: pac.PacConv3d(2, 2, (3, 4, 3)), lambda: pac.PacConvTranspose3d(2, 2, 2),
    lambda: pac.PacPool3d((3, 3, 0)), lambda: pac.packernel3d(torch.randn(1, 1, 4, 4, 4), kernel_size=(3, 2, 3)),
    lambda: pac.PacConv3d(2, 2, (3, 3)),
], ids=['conv4', 'conv343', 'convT2', 'pool330', 'packernel3d', 'two_values'])
def test_bad_kernel_size(make):
    with raises('kernel_size'):
        make()


@pytest.mark.parametrize('make', [
    lambda: pac.PacConv3d(2, 2, 3, padding=2), lambda: pac.PacConv3d(2, 2, 3, padding=(1, 2, 1)),
    lambda: pac.PacConvTranspose3d(2, 2, 3, 2, padding=2, output_padding=1), lambda: pac.PacPool3d(3, padding=-1),
], ids=['conv_p2', 'conv_p121', 'convT_p2', 'pool_negative'])
def test_padding_above_the_documented_bound(make):
    with raises('padding'):
        make()


def test_option_validation_as_in_2d():
    with raises('kernel_type'):
        pac.PacConv3d(2, 2, 3, kernel_type='box')
    with raises('smooth_kernel_type'):
        pac.PacPool3d(3, smooth_kernel_type='average_4')
    with raises('groups'):
        pac.PacConv3d(4, 6, 3, groups=4)
    with raises('padding_mode'):
        pac.PacConv3d(2, 2, 3, padding=1, padding_mode='mirror')
    with raises('shared_filters'):
        pac.PacConv3d(2, 3, 3, shared_filters=True)
    with raises('out_channels'):
        pac.PacPool3d(3, kernel_type='inv_0.2_0.2', channel_wise=True)
    with raises('filler'):
        pac.PacConv3d(2, 2, 3, filler='linear')  # transposed layers only
    with raises('filler'):
        pac.PacConv3d(2, 2, (3, 3, 5), filler='crf')  # needs a cubic kernel
    with raises('filler'):
        pac.PacConv3d(2, 2, 3, filler='pool')  # needs shared_filters
    with raises('channel'):
        pac.PacPool3d(3, padding=1, channel_wise=True)(torch.randn(1, 3, 3, 3, 3), torch.randn(1, 2, 3, 3, 3))


@pytest.mark.parametrize('mask_shape', [(1, 1, 4, 4), (1, 2, 4, 4, 4), (1, 1, 4, 4, 3), (3, 1, 4, 4, 4)],
                         ids=['4d', 'two_channels', 'size', 'batch'])
def test_bad_mask_shape(mask_shape):
    x, mask = torch.randn(2, 2, 4, 4, 4), torch.ones(*mask_shape)
    with raises('mask'):
        pac.PacConv3d(2, 2, 3, padding=1)(x, x, mask=mask)
    with raises('mask'):
        pac.packernel3d(x, mask, kernel_size=3, padding=1)


def test_transposed_mask_must_have_the_input_size():
    x, guide = torch.randn(1, 2, 2, 3, 2), torch.randn(1, 2, 4, 6, 4)
    with raises('mask'):
        pac.PacConvTranspose3d(2, 2, 3, 2, 1, 1)(x, guide, mask=torch.ones(1, 1, 4, 6, 4))


# ---------------------------------------------------------------- repr


def test_repr():
    module = pac.PacConv3d(2, 3, 3, padding=1, kernel_type='inv_0.2_0.2_asym', smooth_kernel_type='full_3',
                           normalize_kernel=True)
    assert repr(module) == ('PacConv3d(2, 3, kernel_size=(3, 3, 3), kernel_type=inv_0.2_0.2_asym, '
                            'padding=(1, 1, 1), smooth_kernel_type=full_3, normalize_kernel=True)')
    assert repr(pac.PacConvTranspose3d(2, 2, 3, 2, 1, 1, bias=False)) == (
        'PacConvTranspose3d(2, 2, kernel_size=(3, 3, 3), kernel_type=gaussian, stride=(2, 2, 2), '
        'padding=(1, 1, 1), output_padding=(1, 1, 1), bias=False)')
    assert repr(pac.PacPool3d(3)) == 'PacPool3d(kernel_size=(3, 3, 3), kernel_type=gaussian)'
    text = repr(pac.PacPool3d((3, 1, 5), 2, channel_wise=True, out_channels=3, impl='unfold'))
    assert text.startswith('PacPool3d(kernel_size=(3, 1, 5)') and 'stride=(2, 2, 2)' in text
    assert 'channel_wise=True' in text and 'impl=unfold' in text


# ---------------------------------------------------------------- autocast and torch.compile


def test_autocast_bf16(impl):
    x, guide = torch.randn(1, 3, 3, 4, 3), torch.randn(1, 2, 3, 4, 3)
    for module, g in [(pac.PacConv3d(3, 2, 3, padding=1, impl=impl), guide),
                      (pac.PacConvTranspose3d(3, 2, 3, 2, 1, 1, impl=impl), torch.randn(1, 2, 6, 8, 6)),
                      (pac.PacPool3d(3, 1, 1, normalize_kernel=True, impl=impl), guide)]:
        expected = module(x, g)
        x_amp, g_amp = x.clone().requires_grad_(), g.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            kernel, _ = module.compute_kernel(g_amp)
            out = module(x_amp, g_amp)
        assert kernel.dtype == torch.float32, 'the adaptive kernel is computed in float32'
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=5e-2)
        out.float().sum().backward()
        assert torch.isfinite(x_amp.grad).all() and torch.isfinite(g_amp.grad).all()


def test_torch_compile_smoke(impl):
    module = pac.PacConv3d(2, 3, 3, padding=1, kernel_type='inv_0.5_-1', impl=impl)
    x, guide = torch.randn(1, 2, 3, 4, 3, requires_grad=True), torch.randn(1, 2, 3, 4, 3)
    out = torch.compile(module, backend='aot_eager')(x, guide)
    torch.testing.assert_close(out, module(x, guide))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.slow
def test_torch_compile_inductor(impl):
    x, guide = torch.randn(1, 2, 4, 5, 4, requires_grad=True), torch.randn(1, 2, 4, 5, 4)
    for module, g in [(pac.PacConv3d(2, 3, 3, padding=1, normalize_kernel=True, impl=impl), guide),
                      (pac.PacConvTranspose3d(2, 3, 3, 2, 1, 1, impl=impl), torch.randn(1, 2, 8, 10, 8)),
                      (pac.PacPool3d(3, 2, 1, impl=impl), guide)]:
        out = torch.compile(module)(x, g)
        torch.testing.assert_close(out, module(x, g), rtol=1e-4, atol=1e-5)
        out.sum().backward()
        assert x.grad is not None
        x.grad = None


def test_export_with_dynamic_sizes_and_per_sample_gradients():
    """The 'taps' ops are generic over the spatial dims: torch.export keeps B, D, H, W dynamic, and vmap(grad) gives
    per-sample gradients."""
    module = pac.PacConv3d(2, 3, 3, padding=1, normalize_kernel=True)
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO, 4: torch.export.Dim.AUTO}
    program = torch.export.export(module, (torch.rand(2, 2, 4, 5, 6), torch.rand(2, 2, 4, 5, 6)),
                                  dynamic_shapes=(dims, dims))
    x, guide = torch.rand(3, 2, 5, 6, 3), torch.rand(3, 2, 5, 6, 3)
    torch.testing.assert_close(program.module()(x, guide), module(x, guide))

    params = {name: p.detach() for name, p in module.named_parameters()}

    def loss(p, xi, gi):
        return torch.func.functional_call(module, p, (xi[None], gi[None])).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, guide)
    for i in range(3):
        module.zero_grad()
        module(x[i:i + 1], guide[i:i + 1]).square().sum().backward()
        torch.testing.assert_close(per_sample["weight"][i], module.weight.grad)
