"""Every bad argument of pac.py raises ValueError/TypeError with a message naming the argument.

``pytest.raises((ValueError, TypeError), match=...)`` lets an AssertionError or a RuntimeError from
deep inside torch propagate, so such failures make these tests fail.
"""
import pytest
import torch

from pac import PacConv2d, PacConvTranspose2d, PacPool2d, packernel2d, pacconv2d, pacconv_transpose2d, pacpool2d



def raises(match: str):
    return pytest.raises((ValueError, TypeError), match=match)


# ---------------------------------------------------------------- constructors


@pytest.mark.parametrize('make', [
    lambda: PacConv2d(2, 2, 4), lambda: PacConv2d(2, 2, (3, 4)), lambda: PacConvTranspose2d(2, 2, 2, 2),
    lambda: PacPool2d(2), lambda: PacPool2d((5, 0)),
], ids=['conv4', 'conv3x4', 'convT2', 'pool2', 'pool5x0'])
def test_even_kernel_size(make):
    with raises('kernel_size'):
        make()


@pytest.mark.parametrize('smooth', ['average_4', 'full_2', 'average_x', 'box_3', 'gauss'])
def test_bad_smooth_kernel_type(smooth):
    with raises('smooth_kernel_type'):
        PacConv2d(2, 2, 3, padding=1, smooth_kernel_type=smooth)
    with raises('smooth_kernel_type'):
        PacPool2d(3, smooth_kernel_type=smooth)


@pytest.mark.parametrize('kernel_type', ['box', 'inv', 'inv_0.2', 'inv_a_b', 'Gaussian'])
def test_bad_kernel_type(kernel_type):
    with raises('kernel_type'):
        PacConv2d(2, 2, 3, kernel_type=kernel_type)
    with raises('kernel_type'):
        PacConvTranspose2d(2, 2, 3, kernel_type=kernel_type)
    with raises('kernel_type'):
        PacPool2d(3, kernel_type=kernel_type)


def test_bad_filler():
    with raises('filler'):
        PacConv2d(2, 2, 3, filler='xavier')
    with raises('filler'):
        PacConvTranspose2d(2, 2, 3, filler='bilinear')


@pytest.mark.parametrize('make', [
    lambda: PacConv2d(2, 2, 3, filler='linear'),  # linear is for transposed layers only
    lambda: PacConvTranspose2d(2, 3, 3, 2, filler='linear'),  # needs in == out
    lambda: PacConvTranspose2d(2, 2, 3, 3, filler='linear'),  # needs k >= 2s - 1
    lambda: PacConv2d(2, 3, 3, filler='crf'),  # needs in == out
    lambda: PacConv2d(2, 2, (3, 5), filler='crf'),  # needs a square kernel
    lambda: PacConv2d(2, 2, 3, bias=False, filler='pool'),  # needs shared_filters
    lambda: PacConv2d(2, 2, 3, bias=False, filler='crf_pool'),
], ids=['linear_not_transposed', 'linear_in_ne_out', 'linear_k_lt_2s-1', 'crf_in_ne_out', 'crf_not_square',
        'pool_not_shared', 'crf_pool_not_shared'])
def test_filler_preconditions(make):
    with raises('filler'):
        make()


def test_shared_filters_needs_equal_channels():
    with raises('shared_filters'):
        PacConv2d(2, 3, 3, shared_filters=True)
    with raises('shared_filters'):
        PacConvTranspose2d(3, 2, 3, shared_filters=True)


@pytest.mark.parametrize('kernel_type', ['inv_0.2_0.2', 'inv_1_-1_asym'])
def test_channel_wise_pool_needs_out_channels(kernel_type):
    # per-channel learnable alpha / lambda need the channel count (spec 1.5); gaussian and '_fixed' have none
    with raises('out_channels'):
        PacPool2d(3, kernel_type=kernel_type, channel_wise=True)


@pytest.mark.parametrize('make', [
    lambda: PacConv2d(2, 2, 3, padding=2), lambda: PacConv2d(2, 2, 5, 1, 3, 1),  # (5, 1, 3, 1) of spec 1.9
    lambda: PacConv2d(2, 2, 3, padding=3, dilation=2), lambda: PacConv2d(2, 2, (3, 5), padding=(1, 3)),
    lambda: PacConvTranspose2d(2, 2, 3, 2, padding=2, output_padding=1), lambda: PacPool2d(3, padding=2),
    lambda: PacConv2d(2, 2, 3, padding=-1),
], ids=['conv_k3p2', 'conv_k5p3', 'conv_k3p3d2', 'conv_3x5_p1x3', 'convT_k3p2', 'pool_k3p2', 'negative'])
def test_padding_above_the_documented_bound(make):
    with raises('padding'):
        make()


@pytest.mark.parametrize('in_ch,out_ch,groups', [(4, 6, 4), (3, 6, 2), (4, 4, 0)])
def test_groups_must_divide_channels(in_ch, out_ch, groups):
    with raises('groups'):
        PacConv2d(in_ch, out_ch, 3, groups=groups)


def test_bad_padding_mode():
    with raises('padding_mode'):
        PacConv2d(2, 2, 3, padding=1, padding_mode='mirror')


# ---------------------------------------------------------------- forward


def test_conv_guide_must_have_the_input_size(impl):
    conv = PacConv2d(2, 3, 3, padding=1, impl=impl)
    with raises('input_for_kernel|guide'):
        conv(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 7, 8))
    with raises('input_for_kernel|guide|batch'):
        conv(torch.randn(2, 2, 8, 8), torch.randn(1, 2, 8, 8))


def test_conv_transpose_guide_must_have_the_output_size(impl):
    conv = PacConvTranspose2d(2, 3, 3, 2, 1, 1, impl=impl)  # 4x4 -> 8x8
    with raises('input_for_kernel|guide'):
        conv(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4))
    with raises('input_for_kernel|guide'):
        conv(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 7, 8))


def test_pool_guide_must_have_the_input_size(impl):
    with raises('input_for_kernel|guide'):
        PacPool2d(3, padding=1, impl=impl)(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 9))


@pytest.mark.parametrize('shape', [(1, 1, 3, 3, 7, 8), (1, 1, 3, 5, 8, 8), (2, 1, 3, 3, 8, 8), (1, 3, 3, 3, 8, 8),
                                   (1, 3, 3, 8, 8)],
                         ids=['out_size', 'taps', 'batch', 'channels', '5d'])
def test_conv_precomputed_kernel_of_wrong_shape(impl, shape):
    conv = PacConv2d(2, 3, 3, padding=1, impl=impl)
    with raises('kernel'):
        conv(torch.randn(1, 2, 8, 8), None, torch.rand(*shape))


def test_conv_transpose_precomputed_kernel_of_wrong_shape(impl):
    conv = PacConvTranspose2d(2, 3, 3, 2, 1, 1, impl=impl)
    with raises('kernel'):  # the input size instead of the output size
        conv(torch.randn(1, 2, 4, 4), None, torch.rand(1, 1, 3, 3, 4, 4))


def test_pool_precomputed_kernel_of_wrong_shape(impl):
    pool = PacPool2d(3, padding=1, impl=impl)
    with raises('kernel'):
        pool(torch.randn(1, 3, 6, 6), None, torch.rand(1, 2, 3, 3, 6, 6))
    with raises('kernel'):
        pool(torch.randn(1, 3, 6, 6), None, torch.rand(1, 1, 3, 3, 5, 6))
    channel_wise = PacPool2d(3, padding=1, channel_wise=True, out_channels=3, impl=impl)
    with raises('kernel|channel'):
        channel_wise(torch.randn(1, 3, 6, 6), None, torch.rand(1, 1, 3, 3, 6, 6))


def test_input_channels_must_match(impl):
    with raises('in_channels|input'):
        PacConv2d(2, 3, 3, padding=1, impl=impl)(torch.randn(1, 3, 6, 6), torch.randn(1, 2, 6, 6))
    with raises('in_channels|input'):
        PacConvTranspose2d(2, 3, 3, 2, 1, 1, impl=impl)(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 8, 8))
    with raises('out_channels|channel'):
        PacPool2d(3, padding=1, channel_wise=True, out_channels=3, impl=impl)(
            torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6))


@pytest.mark.parametrize('shape', [(1, 1, 7, 8), (1, 2, 8, 8), (2, 1, 8, 8), (1, 8, 8)],
                         ids=['size', 'channels', 'batch', '3d'])
def test_conv_mask_of_wrong_shape(impl, shape):
    conv = PacConv2d(2, 3, 3, padding=1, impl=impl)
    with raises('mask'):
        conv(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), mask=torch.ones(*shape))


def test_conv_transpose_mask_has_the_input_size(impl):
    conv = PacConvTranspose2d(2, 3, 3, 2, 1, 1, impl=impl)
    with raises('mask'):
        conv(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 8, 8), mask=torch.ones(1, 1, 8, 8))


def test_pool_mask_of_wrong_shape(impl):
    with raises('mask'):
        PacPool2d(3, padding=1, impl=impl)(torch.randn(1, 2, 6, 6), torch.randn(1, 2, 6, 6),
                                                          mask=torch.ones(1, 1, 6, 5))


def test_non_4d_tensors(impl):
    conv = PacConv2d(2, 3, 3, padding=1, impl=impl)
    with raises('input'):
        conv(torch.randn(2, 6, 6), torch.randn(1, 2, 6, 6))
    with raises('input'):
        conv(torch.randn(1, 1, 2, 6, 6), torch.randn(1, 2, 6, 6))
    with raises('input_for_kernel|guide|input'):
        conv(torch.randn(1, 2, 6, 6), torch.randn(2, 6, 6))
    with raises('input'):
        PacPool2d(3, impl=impl)(torch.randn(6, 6), torch.randn(1, 1, 6, 6))
    with raises('input'):
        packernel2d(torch.randn(2, 6, 6), kernel_size=3, impl=impl)
    with raises('input'):
        pacconv2d(torch.randn(2, 6, 6), torch.rand(1, 1, 3, 3, 4, 4), torch.randn(3, 2, 3, 3), impl=impl)


def test_non_tensor_input(impl):
    with raises('input'):
        PacConv2d(1, 1, 3, padding=1, impl=impl)([[[[1.0]]]], torch.randn(1, 1, 1, 1))


def test_guide_or_kernel_is_required(impl):
    with raises('input_for_kernel|kernel'):
        PacConv2d(2, 3, 3, padding=1, impl=impl)(torch.randn(1, 2, 6, 6), None)


# ---------------------------------------------------------------- functional forms


def test_packernel2d_arguments(impl):
    guide = torch.randn(1, 2, 6, 6)
    with raises('kernel_size'):
        packernel2d(guide, impl=impl)  # kernel_size defaults to 0
    with raises('kernel_size'):
        packernel2d(guide, kernel_size=4, impl=impl)
    with raises('kernel_type'):
        packernel2d(guide, kernel_size=3, kernel_type='box', impl=impl)
    with raises('smooth_kernel'):
        packernel2d(guide, kernel_size=3, smooth_kernel_type='average_3', impl=impl)
    with raises('inv_alpha|inv_lambda'):
        packernel2d(guide, kernel_size=3, kernel_type='inv_0.2_0.2', impl=impl)
    with raises('mask'):
        packernel2d(guide, torch.ones(1, 1, 5, 6), kernel_size=3, padding=1, impl=impl)
    with raises('input|guide|kernel_size'):  # the window does not fit in the guide
        packernel2d(guide, kernel_size=9, impl=impl)


def test_functional_weight_and_bias_shapes(impl):
    x, kernel = torch.randn(1, 2, 6, 6), torch.rand(1, 1, 3, 3, 6, 6)
    with raises('weight'):
        pacconv2d(x, kernel, torch.randn(3, 3, 3, 3), padding=1, impl=impl)
    with raises('bias'):
        pacconv2d(x, kernel, torch.randn(3, 2, 3, 3), torch.randn(4), padding=1, impl=impl)
    with raises('weight'):
        pacconv2d(x, kernel, torch.randn(1, 1, 3, 3, 1), padding=1, impl=impl)
    t_kernel = torch.rand(1, 1, 3, 3, 12, 12)
    with raises('weight'):
        pacconv_transpose2d(x, t_kernel, torch.randn(3, 3, 3, 3), None, 2, 1, 1, impl=impl)
    with raises('kernel'):
        pacpool2d(x, kernel, 5, padding=2, impl=impl)


def test_impl_switch_and_the_native_impl_alias():
    assert PacConv2d(2, 2, 3).impl == 'auto'
    assert PacConv2d(2, 2, 3, native_impl=True).impl == 'unfold'
    pool = PacPool2d(3, impl='taps')
    assert not pool.native_impl
    pool.native_impl = True  # 2019 code may flip the attribute
    assert pool.impl == 'unfold' and pool.native_impl
    assert 'impl=unfold' in repr(pool)
    with pytest.raises(ValueError, match="impl must be one of"):
        PacConv2d(2, 2, 3, impl='fast')
    with pytest.raises(ValueError, match="native_impl=True means impl='unfold'"):
        PacConvTranspose2d(2, 2, 3, native_impl=True, impl='taps')
    with pytest.raises(TypeError, match="native_impl must be a bool"):
        pacpool2d(torch.randn(1, 1, 4, 4), torch.rand(1, 1, 3, 3, 4, 4), 3, padding=1, native_impl='yes')


def test_impl_triton_where_it_does_not_apply_is_a_clear_error():
    """An 'inv' kernel is never fused (and without triton nothing is): asking for 'triton' is an error."""
    conv = PacConv2d(2, 2, 3, padding=1, kernel_type='inv_1_-1', impl='triton')
    with pytest.raises(ValueError, match="impl='triton' needs"):
        conv(torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5))
