"""task_jointUpsampling.models: released state_dict layouts, parameter counts, a step-by-step reference forward,
channel folding and the metrics on hand-computed cases."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pac
from task_jointUpsampling.datasets import get_lowres
from task_jointUpsampling.models import (DJIF, Bilinear, DJIFWide, Identity, JointBilateral, PacJointUpsample,
                                         PacJointUpsampleLite, convert_to_single_channel, create_model,
                                         init_color_guide_, init_passthrough_, recover_from_single_channel,
                                         repeat_for_channel, th_epe, th_rmse)


def conv_stack_shapes(prefix, channels, k=5):
    shapes = {}
    for l in range(1, len(channels)):
        shapes[f'{prefix}.conv{l}.weight'] = (channels[l], channels[l - 1], k, k)
        shapes[f'{prefix}.conv{l}.bias'] = (channels[l],)
    return shapes


def pac_layout(n_t, n_g, k_ch, n_f, num_ups):
    """The released PacJointUpsample state_dict layout (spec 3.1), built from the filter lists."""
    shapes = conv_stack_shapes('branch_t', (1, *n_t))
    shapes.update(conv_stack_shapes('branch_g', (3, *n_g, k_ch * num_ups)))
    chain = (n_t[-1], *n_f, 1)
    for i in range(num_ups):
        shapes[f'up_convts.{i}.weight'] = (chain[i], chain[i + 1], 5, 5)  # transposed layout (in, out, k, k)
        shapes[f'up_convts.{i}.bias'] = (chain[i + 1],)
    shapes.update(conv_stack_shapes('branch_f', chain[num_ups:]))
    return shapes


PAC_CASES = {  # factor: (layout, parameter count from the spec)
    4: (pac_layout((32,) * 3, (32,) * 2, 16, (32,) * 3, 2), 183_489),
    8: (pac_layout((32,) * 3, (32,) * 2, 16, (32,) * 4, 3), 221_937),
    16: (pac_layout((32,) * 3, (32,) * 2, 16, (32,) * 5, 4), 260_385),
}
LITE_CASES = {
    4: (pac_layout((12, 16, 22), (12, 22), 12, (12, 16, 22), 2), 55_509),
    8: (pac_layout((12, 16, 16), (12, 16), 12, (12, 16, 16, 20), 3), 56_273),
    16: (pac_layout((8, 16, 16), (8, 16), 10, (8, 16, 16, 16, 16), 4), 55_777),
}


def djif_layout(ns_tg, ns_f):
    shapes = {}
    for branch, in_ch in (('branch_t', 1), ('branch_g', 3)):
        for idx, (cin, cout, k) in zip((0, 2, 4), ((in_ch, ns_tg[0], 9), (ns_tg[0], ns_tg[1], 1), (ns_tg[1], 1, 5))):
            shapes[f'{branch}.{idx}.weight'], shapes[f'{branch}.{idx}.bias'] = (cout, cin, k, k), (cout,)
    for idx, (cin, cout, k) in zip((0, 2, 4), ((2, ns_f[0], 9), (ns_f[0], ns_f[1], 1), (ns_f[1], 1, 5))):
        shapes[f'branch_joint.{idx}.weight'], shapes[f'branch_joint.{idx}.bias'] = (cout, cin, k, k), (cout,)
    return shapes


def layout_of(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def num_params(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize('factor', [4, 8, 16])
def test_pac_joint_upsample_layout_and_count(factor):
    layout, count = PAC_CASES[factor]
    net = PacJointUpsample(factor)
    assert layout_of(net) == layout
    assert num_params(net) == count
    # spot checks straight from the spec table
    assert layout['branch_g.conv3.weight'] == {4: (32, 32, 5, 5), 8: (48, 32, 5, 5), 16: (64, 32, 5, 5)}[factor]


@pytest.mark.parametrize('factor', [4, 8, 16])
def test_pac_joint_upsample_lite_layout_and_count(factor):
    layout, count = LITE_CASES[factor]
    net = PacJointUpsampleLite(factor)
    assert layout_of(net) == layout
    assert num_params(net) == count
    expected_g3 = {4: (24, 22), 8: (36, 16), 16: (40, 16)}[factor]
    assert layout['branch_g.conv3.weight'][:2] == expected_g3


def test_djif_layouts_and_counts():
    assert layout_of(DJIF(8)) == djif_layout((96, 48, 1), (64, 32))
    assert num_params(DJIF(8)) == 56_323
    assert layout_of(DJIFWide(8)) == djif_layout((256, 128, 1), (256, 128))
    assert num_params(DJIFWide(8)) == 233_475


def test_jbu_and_parameter_free_models():
    jbu = create_model('JBU_9_10_0.5', factor=8, channels=2)
    assert isinstance(jbu, JointBilateral) and (jbu.scale_color, jbu.scale_space) == (10.0, 0.5)
    assert layout_of(jbu) == {'convt.weight': (2, 2, 9, 9)}
    assert torch.equal(jbu.convt.weight[:, :, 4, 4], torch.eye(2))
    assert num_params(Bilinear(4)) == 0 and num_params(Identity()) == 0


def random_state_dict(layout, generator):
    return {k: torch.randn(shape, generator=generator, dtype=torch.float64) * 0.2 for k, shape in layout.items()}


def reference_pac_forward(sd, target_low, guide, factor, k_ch=16):
    """PacJointUpsample recomputed step by step from a state_dict with F.conv2d and pac's functional ops."""
    num_ups = int(math.log2(factor))
    b, ch, h, w = target_low.shape

    def stack(prefix, x):
        n = sum(1 for k in sd if k.startswith(prefix + '.conv') and k.endswith('.weight'))
        for l in range(1, n + 1):
            x = F.conv2d(x, sd[f'{prefix}.conv{l}.weight'], sd[f'{prefix}.conv{l}.bias'], padding=2)
            if l < n:
                x = F.relu(x)
        return x

    x = stack('branch_t', target_low.reshape(b * ch, 1, h, w))
    g = stack('branch_g', guide)
    for i in range(num_ups):
        g_i = g[:, i * k_ch:(i + 1) * k_ch]
        scale = 2 ** (i + 1) / factor
        if scale != 1:
            g_i = F.interpolate(g_i, scale_factor=scale, mode='bilinear', align_corners=False)
        g_i = g_i.repeat_interleave(ch, dim=0)
        kernel, _ = pac.packernel2d(g_i, kernel_size=5, stride=2, padding=2, output_padding=1, transposed=True)
        x = pac.pacconv_transpose2d(x, kernel, sd[f'up_convts.{i}.weight'], sd[f'up_convts.{i}.bias'],
                                    stride=2, padding=2, output_padding=1)
        x = F.relu(x)
    return stack('branch_f', x).reshape(b, ch, h * factor, w * factor)


@pytest.mark.parametrize('factor,channels', [(4, 1), (8, 2)])
def test_released_layout_loads_strictly_and_matches_reference(factor, channels):
    generator = torch.Generator().manual_seed(factor)
    sd = random_state_dict(PAC_CASES[factor][0], generator)
    net = PacJointUpsample(factor, channels=channels).double()
    net.load_state_dict(sd, strict=True)
    target_low = torch.rand(2, channels, 3, 4, generator=generator, dtype=torch.float64)
    guide = torch.rand(2, 3, 3 * factor, 4 * factor, generator=generator, dtype=torch.float64)
    out = net(target_low, guide)
    assert out.shape == (2, channels, 3 * factor, 4 * factor)
    torch.testing.assert_close(out, reference_pac_forward(sd, target_low, guide, factor), rtol=1e-10, atol=1e-10)


def test_djif_matches_reference_and_folds_channels():
    generator = torch.Generator().manual_seed(0)
    sd = random_state_dict(djif_layout((96, 48, 1), (64, 32)), generator)
    net = DJIF(4, channels=2).double()
    net.load_state_dict(sd, strict=True)
    low = torch.rand(1, 2, 5, 5, generator=generator, dtype=torch.float64)
    guide = torch.rand(1, 3, 20, 20, generator=generator, dtype=torch.float64)

    def seq(prefix, x, paddings):
        for idx, p in zip((0, 2, 4), paddings):
            x = F.conv2d(x, sd[f'{prefix}.{idx}.weight'], sd[f'{prefix}.{idx}.bias'], padding=p)
            x = F.relu(x) if idx < 4 else x
        return x

    expected = []
    for c in range(2):
        up = F.interpolate(low[:, c:c + 1], scale_factor=4, mode='bilinear', align_corners=False)
        joint = torch.cat((seq('branch_t', up, (2, 2, 2)), seq('branch_g', guide, (2, 2, 2))), dim=1)
        expected.append(seq('branch_joint', joint, (4, 0, 2)))
    torch.testing.assert_close(net(low, guide), torch.cat(expected, dim=1), rtol=1e-10, atol=1e-10)


def test_jbu_maps_constant_to_constant_and_follows_edges():
    net = JointBilateral(4, channels=1, kernel_size=9, scale_space=0.5, scale_color=20.0).double()
    guide = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    guide[..., 8:] = 1.0  # a vertical colour edge between columns 7 and 8
    const = net(torch.full((1, 1, 4, 4), 3.0, dtype=torch.float64), guide)
    torch.testing.assert_close(const, torch.full_like(const, 3.0))
    step = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    step[..., 2:] = 1.0  # the same edge at low resolution
    out = net(step, guide)
    # a colour-aware filter keeps the edge sharp; bilinear smears it over several columns
    assert out[..., 7].abs().max() < 1e-3 and (out[..., 8] - 1).abs().max() < 1e-3
    bilinear = Bilinear(4)(step)
    assert bilinear[..., 7].min() > 0.1


def test_channel_folding_roundtrip():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    folded, ch = convert_to_single_channel(x)
    assert ch == 3 and folded.shape == (6, 1, 2, 2)
    assert torch.equal(folded[4, 0], x[1, 1])  # batch index b * ch + c
    assert torch.equal(recover_from_single_channel(folded, ch), x)
    guide = torch.rand(2, 3, 2, 2)
    repeated = repeat_for_channel(guide, 3)
    assert repeated.shape == (6, 3, 2, 2) and torch.equal(repeated[4], guide[1])


@pytest.mark.parametrize('name', ['PacJointUpsample', 'PacJointUpsampleLite', 'DJIF', 'Bilinear', 'JBU_5_1_1'])
def test_multichannel_output_size(name):
    net = create_model(name, factor=4, channels=2)
    assert net(torch.rand(3, 2, 5, 6), torch.rand(3, 3, 20, 24)).shape == (3, 2, 20, 24)


def test_th_rmse_is_per_image_mean():
    gt = torch.zeros(2, 2, 2, 2)
    pred = torch.zeros(2, 2, 2, 2)
    pred[0, 0] = 3.0  # image 0: channel 0 errs by 3 everywhere -> sqrt(9 + 0) = 3
    pred[1, :, 0, 0] = 4.0  # image 1: one pixel of each channel errs by 4 -> sqrt(16/4 + 16/4) = sqrt(8)
    expected = (3.0 + math.sqrt(8.0)) / 2
    assert th_rmse(pred, gt).item() == pytest.approx(expected)
    pooled = (pred - gt).pow(2).mean().sqrt().item()
    assert pooled != pytest.approx(expected)  # it is not a pooled RMSE


def test_th_epe_unknown_and_small_flow():
    gt = torch.zeros(1, 2, 1, 4)
    pred = torch.zeros(1, 2, 1, 4)
    gt[0, :, 0, 0] = torch.tensor([3.0, 0.0])      # pixel 0: moving, predicted 0 -> error 3
    pred[0, :, 0, 1] = torch.tensor([3.0, 4.0])    # pixel 1: still, predicted (3, 4) -> error 5
    gt[0, :, 0, 2] = torch.tensor([2e7, 0.0])      # pixel 2: unknown -> error 0, but counted
    pred[0, :, 0, 2] = torch.tensor([1.0, 1.0])
    gt_before, pred_before = gt.clone(), pred.clone()
    assert th_epe(pred, gt).item() == pytest.approx((3 + 5 + 0 + 0) / 4)
    assert th_epe(pred, gt, small_flow=0.0).item() == pytest.approx(3.0)  # only pixel 0 moves
    assert torch.equal(gt, gt_before) and torch.equal(pred, pred_before)  # batch 1: inputs untouched


@pytest.mark.parametrize('make', [lambda: PacJointUpsample(4), lambda: PacJointUpsample(8, n_g_layers=1),
                                  lambda: PacJointUpsampleLite(16)])
def test_color_guide_init_passes_the_scaled_guide_to_every_upsampling_layer(make):
    torch.manual_seed(0)
    net = make()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert init_color_guide_(net, scale=10.0) is net
    guide = torch.rand(2, 3, 16, 16)
    features = net.branch_g(guide)
    shift = min((net.factor - 1) // 2, 2)  # to where 'center' sampling took the low-res pixels, within 5x5 taps
    for i in range(net.num_ups):
        torch.testing.assert_close(features[:, i * net.k_ch:i * net.k_ch + 3, :-shift, :-shift],
                                   10 * guide[..., shift:, shift:])
    # only the branch_g rows that carry the guide changed; every other weight keeps its initial value
    after = net.state_dict()
    assert layout_of(net) == {k: tuple(v.shape) for k, v in before.items()}
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith('branch_g.') for k in changed)
    last = [m for m in net.branch_g if isinstance(m, torch.nn.Conv2d)][-1]
    carried = [i * net.k_ch + c for i in range(net.num_ups) for c in range(3)]
    others = [r for r in range(last.out_channels) if r not in carried]
    last_key = [k for k in after if k.startswith('branch_g.') and k.endswith('.weight')][-1]
    assert torch.equal(after[last_key][others], before[last_key][others])


def test_color_guide_init_makes_kernels_follow_colour_edges():
    torch.manual_seed(0)
    guide = torch.zeros(1, 3, 16, 16)
    guide[..., 8:] = 0.5  # a colour edge between columns 7 and 8
    kernels = {}
    for init in ('default', 'color'):
        net = PacJointUpsample(4)
        if init == 'color':
            init_color_guide_(net, scale=10.0)
        features = net.branch_g(guide)[:, net.k_ch:2 * net.k_ch]  # the full-resolution layer's features
        k = pac.packernel2d(features, kernel_size=5, padding=2)[0]  # (1, 1, 5, 5, H, W)
        # from pixel (7, 6) to its right neighbour, whose features are the guide one pixel right and down of each
        kernels[init] = k[0, 0, 2, 3, 7, 6].item()
    assert kernels['default'] > 0.9  # default init: the kernel hardly sees the edge
    assert kernels['color'] < 1e-6  # exp(-0.5 * 3 * 5^2)


def test_passthrough_init_starts_djif_as_bilinear():
    torch.manual_seed(0)
    net = DJIF(4)
    layout = layout_of(net)
    assert init_passthrough_(net) is net and layout_of(net) == layout
    low, guide = torch.rand(2, 1, 8, 8), torch.rand(2, 3, 32, 32)
    # the 1x1 layers of the 2019 padding add a 2-pixel frame; inside it the network is bilinear upsampling
    torch.testing.assert_close(net(low, guide)[..., 4:-4, 4:-4], Bilinear(4)(low)[..., 4:-4, 4:-4])


def test_passthrough_init_starts_pac_as_a_guided_interpolation():
    torch.manual_seed(0)
    net = init_color_guide_(init_passthrough_(PacJointUpsample(4)), scale=3.0)
    # a constant guide: every kernel is 1, and a linear ramp sampled at the 'center' pixels comes back exactly
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    ramp = (0.3 * yy + 0.7 * xx) / 64
    low = torch.from_numpy(get_lowres(ramp, 4))[None, None]
    out = net(low, torch.full((1, 3, 64, 64), 0.5))[0, 0]
    torch.testing.assert_close(out[8:-8, 8:-8], torch.from_numpy(ramp)[8:-8, 8:-8], rtol=0, atol=1e-4)
    # a colour edge in the guide weakens the interpolation across it (unnormalised kernels): the output dips there
    guide = torch.full((1, 3, 64, 64), 0.2)
    guide[..., 32:] = 0.8
    edge = net(torch.ones(1, 1, 16, 16), guide)[0, 0, 32]
    assert edge[31].item() < 0.9 and edge[16].item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(TypeError, match='DJIF or a PacJointUpsample'):
        init_passthrough_(Bilinear(4))
    with pytest.raises(ValueError, match='batch norm'):
        init_passthrough_(PacJointUpsample(4, f_bn=True))


def test_normalised_pac_starts_as_joint_bilateral_upsampling():
    torch.manual_seed(0)
    plain = PacJointUpsample(4)
    net = PacJointUpsample(4, normalize_kernel=True)
    assert layout_of(net) == layout_of(plain)  # the same state_dict: only the layers' normalisation differs
    assert all(convt.normalize_kernel for convt in net.up_convts)
    assert not any(convt.normalize_kernel for convt in plain.up_convts)
    assert create_model('PacJointUpsampleLite', 4, normalize_kernel=True).up_convts[0].normalize_kernel
    init_color_guide_(init_passthrough_(net), scale=10.0)
    # a constant input comes back constant (weights that sum to one), whatever the guide
    guide = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(net(torch.full((1, 1, 16, 16), 0.7), guide)[0, 0, 8:-8, 8:-8],
                               torch.full((48, 48), 0.7))
    # a depth step along a colour edge comes out as a sharp step exactly there; Bilinear ramps across it, and the
    # unnormalised start dips towards zero beside it
    guide = torch.full((1, 3, 64, 64), 0.2)
    guide[..., 31:] = 0.8  # between the columns 4 * 7 + 1 = 29 and 33 that 'center' sampling takes
    low = torch.full((1, 1, 16, 16), 0.25)
    low[..., 8:] = 0.75
    step = torch.full((64,), 0.25)
    step[31:] = 0.75
    torch.testing.assert_close(net(low, guide)[0, 0, 32, 8:-8], step[8:-8], rtol=0, atol=1e-3)
    assert (Bilinear(4)(low)[0, 0, 32, 8:-8] - step[8:-8]).abs().max() > 0.1
    unnormalised = init_color_guide_(init_passthrough_(PacJointUpsample(4)), scale=10.0)
    assert unnormalised(low, guide)[0, 0, 32, 8:-8].min() < 0.2


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match='power of 2'):
        PacJointUpsample(6)
    with pytest.raises(ValueError, match='factor can only be 4, 8, or 16'):
        PacJointUpsampleLite(2)
    with pytest.raises(ValueError, match='f_sz_1'):
        PacJointUpsample(4, f_sz_1=4)
    with pytest.raises(ValueError, match='n_f_filters must have 3 entries'):
        PacJointUpsample(4, n_f_filters=(8, 8))
    with pytest.raises(ValueError, match='n_g_layers'):
        PacJointUpsample(4, n_g_layers=0)
    with pytest.raises(ValueError, match='fs'):
        DJIF(4, fs=(9, 2, 5))
    with pytest.raises(ValueError, match='unknown'):
        create_model('Nope', 4)
    with pytest.raises(ValueError, match='JBU_<ks>'):
        create_model('JBU_9_x', 4)
    with pytest.raises(ValueError, match='guide must be factor x target_low'):
        PacJointUpsample(4)(torch.rand(1, 1, 4, 4), torch.rand(1, 3, 15, 16))
    with pytest.raises(ValueError, match='same shape'):
        th_rmse(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 3))
    with pytest.raises(ValueError, match='2 flow channels'):
        th_epe(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2))
    with pytest.raises(TypeError, match='PacJointUpsample, got DJIF'):
        init_color_guide_(DJIF(4), 10.0)
    with pytest.raises(ValueError, match='scale must be a finite number > 0'):
        init_color_guide_(PacJointUpsample(4), 0.0)
    with pytest.raises(ValueError, match='batch norm'):
        init_color_guide_(PacJointUpsample(4, g_bn=True), 10.0)
    with pytest.raises(ValueError, match='k_ch=2'):
        init_color_guide_(PacJointUpsample(4, k_ch=2), 10.0)
