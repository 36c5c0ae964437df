"""Tests of paccrf.py against the brute-force mean-field reference in paccrf_reference.py."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import paccrf
from paccrf import DenseCRF, PacCRF, PacCRFLoose, _ceil_pad_factor, create_position_feats, create_YXRGB, crf_refine
from paccrf_reference import (RefKernel, blur_down, blur_up, diagonal_filter, gaussian_edge_kernel, mean_field,
                              message)

DT = torch.float64


@pytest.fixture(autouse=True, scope='module')
def single_thread():
    """The tensors here are tiny: one thread avoids OpenMP wake-up costs on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# one kernel of every kind; blur 2 and 3 on sizes that are not multiples of the blur; pairwise weights are
# exact in float32 (the parameters are created in float32, then the CRF is cast to float64)
MIXED_KERNELS = [
    dict(kernel_size=3, dilation=1, blur=1, compat_type='4d', spatial_filter=False, pairwise_weight=0.75),
    dict(kernel_size=3, dilation=2, blur=2, compat_type='2d', spatial_filter=True, pairwise_weight=1.25),
    dict(kernel_size=5, dilation=1, blur=3, compat_type='potts', spatial_filter=False, pairwise_weight=0.625),
    dict(kernel_size=3, dilation=1, blur=1, compat_type='potts', spatial_filter=True, pairwise_weight=0.5),
    dict(kernel_size=3, dilation=1, blur=2, compat_type='na', pairwise_weight=0.875),
]


def randomize_(crf: nn.Module, seed: int = 0) -> None:
    """Random messenger / compat weights and unary weight, so comparisons do not only test the init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in crf.named_parameters():
            if 'messengers' in name or 'compat' in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
            elif name.endswith('unary_weight'):
                p.fill_(0.7)


def reference_kernels(crf: PacCRF, configs) -> list:
    """RefKernel list from the user-level configs plus the module's (random) weights."""
    kernels = []
    for messenger, compat, cfg in zip(crf.messengers, crf.compat, configs):
        weight = messenger.weight.detach()
        filt = diagonal_filter(weight[0, 0], crf.channels) if weight.shape[:2] == (1, 1) else weight
        signed = -cfg['pairwise_weight'] if cfg['compat_type'] == 'potts' else cfg['pairwise_weight']
        kernels.append(RefKernel(filt=filt, dilation=cfg['dilation'], blur=cfg['blur'], weight=signed,
                                 compat=None if compat is None else compat.weight.detach()[:, :, 0, 0],
                                 adaptive=cfg['compat_type'] != 'na'))
    return kernels


def inputs(B=2, C=3, H=7, W=9, F_=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, H, W, generator=gen, dtype=DT) * 2,
            torch.randn(B, F_, H, W, generator=gen, dtype=DT) * 0.7)


def unary_weight_value(crf: PacCRF) -> float:
    return float(crf.unary_weight.detach())


# ------------------------------------------------------------------------------------------------
# The reference itself (hand-checked cases, torch parity with K = 1)
# ------------------------------------------------------------------------------------------------

def test_reference_kernel_by_hand():
    feat = torch.arange(9, dtype=DT).reshape(1, 1, 3, 3)
    K = gaussian_edge_kernel(feat, 3, 1)
    diff = torch.tensor([[-4, -3, -2], [-1, 0, 1], [2, 3, 4]], dtype=DT)
    torch.testing.assert_close(K[0, :, :, 1, 1], torch.exp(-0.5 * diff ** 2))
    assert K[0, 0, 0, 0, 0] == 1.0  # outside reads 0, centre feature 0
    assert K[0, 2, 2, 2, 2] == pytest.approx(math.exp(-0.5 * 8 ** 2))  # outside reads 0, centre feature 8


def test_reference_message_is_a_convolution_when_k_is_one():
    Q, _ = inputs(B=1, C=2, H=6, W=5)
    filt = torch.randn(2, 2, 3, 3, dtype=DT)
    torch.testing.assert_close(message(Q, None, filt, 2), F.conv2d(Q, filt, padding=2, dilation=2))


def test_reference_blur_round_trip_of_a_constant():
    x = torch.full((1, 2, 7, 9), 3.0, dtype=DT)
    down = blur_down(x, 4)
    assert down.shape == (1, 2, 2, 3)
    torch.testing.assert_close(blur_up(down, 4, (7, 9)), x)


# ------------------------------------------------------------------------------------------------
# Numerics against the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('shared_feat', [True, False], ids=['one-feature', 'feature-per-kernel'])
def test_mixed_kernels_match_reference(shared_feat, device):
    crf = PacCRF(3, 2, pairwise_kernels=MIXED_KERNELS).to(DT)
    randomize_(crf)
    unary, feat = inputs()
    feats = [feat] * len(MIXED_KERNELS) if shared_feat else [feat * (i + 1) / 3 for i in range(len(MIXED_KERNELS))]
    expected = mean_field(unary, feats, reference_kernels(crf, MIXED_KERNELS), 2, unary_weight_value(crf))
    crf, unary, feats = crf.to(device), unary.to(device), [f.to(device) for f in feats]
    out = crf(unary, feats[0] if shared_feat else feats)
    assert out.device.type == device.type
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-10, atol=1e-10)


def test_native_impl_gives_the_same_values_and_gradients(device):
    lean = PacCRF(3, 2, pairwise_kernels=MIXED_KERNELS).to(DT)
    randomize_(lean)
    native = PacCRF(3, 2, native_impl=True, pairwise_kernels=MIXED_KERNELS).to(DT)
    native.load_state_dict(lean.state_dict())
    lean, native = lean.to(device), native.to(device)
    unary, feat = (t.to(device) for t in inputs())
    grads = []
    for crf in (lean, native):
        f = feat.clone().requires_grad_()
        out = crf(unary, f)
        weight_grad, feat_grad = torch.autograd.grad(out.square().sum(), [crf.messengers[0].weight, f])
        grads.append((out, weight_grad, feat_grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_initial_logq_is_used():
    cfg = MIXED_KERNELS[:1]
    crf = PacCRF(3, 1, pairwise_kernels=cfg).to(DT)
    unary, feat = inputs()
    start = torch.randn_like(unary)
    expected = mean_field(unary, [feat], reference_kernels(crf, cfg), 1, 1.0, logQ=start)
    torch.testing.assert_close(crf(unary, feat, logQ=start), expected, rtol=1e-10, atol=1e-10)


def test_blur_4_kernel_matches_reference():
    cfg = [dict(kernel_size=3, dilation=1, blur=4, compat_type='4d', spatial_filter=True, pairwise_weight=1.0)]
    crf = PacCRF(2, 3, pairwise_kernels=cfg).to(DT)
    randomize_(crf, seed=3)
    unary, feat = inputs(C=2, H=10, W=13)
    expected = mean_field(unary, [feat], reference_kernels(crf, cfg), 3, unary_weight_value(crf))
    torch.testing.assert_close(crf(unary, feat), expected, rtol=1e-10, atol=1e-10)


def test_potts_weight_is_negated_and_attracts():
    crf = PacCRF(2, 1, pairwise_kernels=dict(kernel_size=3, compat_type='potts', spatial_filter=False,
                                             pairwise_weight=2.0)).to(DT)
    assert crf.pairwise_weights[0].item() == -2.0
    # 5x5 image of class 0 with one pixel slightly preferring class 1; constant guide (K = 1 inside)
    unary = torch.zeros(1, 2, 5, 5, dtype=DT)
    unary[0, 0] = 1.0
    unary[0, :, 2, 2] = torch.tensor([0.0, 0.5], dtype=DT)
    out = crf(unary, torch.zeros(1, 1, 5, 5, dtype=DT))
    assert out[0, 0, 2, 2] > out[0, 1, 2, 2]  # the neighbours flipped the odd pixel
    cfg = [dict(kernel_size=3, dilation=1, blur=1, compat_type='potts', pairwise_weight=2.0)]
    expected = mean_field(unary, [torch.zeros(1, 1, 5, 5, dtype=DT)], reference_kernels(crf, cfg), 1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_2d_compat_init_is_one_minus_identity():
    cfg = dict(kernel_size=3, compat_type='2d')
    exact = PacCRF(4, 1, perturbed_init=False, pairwise_kernels=cfg)
    torch.testing.assert_close(exact.compat[0].weight[:, :, 0, 0], 1 - torch.eye(4))
    perturbed = PacCRF(4, 1, perturbed_init=True, pairwise_kernels=cfg)
    noise = perturbed.compat[0].weight[:, :, 0, 0] - (1 - torch.eye(4))
    assert 0 < noise.abs().max() <= 0.0005


def test_messenger_configuration():
    crf = PacCRF(3, 1, perturbed_init=False, pairwise_kernels=[
        dict(kernel_size=5, dilation=2, compat_type='4d'),
        dict(kernel_size=3, compat_type='2d', spatial_filter=True),
        dict(kernel_size=3, compat_type='potts', spatial_filter=False),
        dict(kernel_size=3, dilation=3, compat_type='na')])
    four_d, shared, pool, plain = crf.messengers
    assert four_d.weight.shape == (3, 3, 5, 5) and isinstance(four_d.weight, nn.Parameter)
    assert (four_d.weight[0, 0] == 0).all() and four_d.weight[0, 1, 2, 1].item() == pytest.approx(2.006, abs=1e-3)
    assert shared.weight.shape == (1, 1, 3, 3) and isinstance(shared.weight, nn.Parameter)
    assert 'messengers.2.weight' in dict(crf.named_buffers())
    torch.testing.assert_close(pool.weight[0, 0], torch.tensor([[1., 1, 1], [1, 0, 1], [1, 1, 1]]))
    assert type(plain) is nn.Conv2d and plain.padding == (3, 3) and plain.dilation == (3, 3) and plain.bias is None
    assert four_d.padding == (4, 4) and four_d.dilation == (2, 2)


@pytest.mark.parametrize('final_output', ['log_Q', 'log_softmax', 'softmax'])
def test_final_outputs(final_output):
    cfg = MIXED_KERNELS[:3]
    crf = PacCRF(3, 2, final_output=final_output, pairwise_kernels=cfg).to(DT)
    randomize_(crf)
    unary, feat = inputs()
    logQ = mean_field(unary, [feat] * 3, reference_kernels(crf, cfg), 2, unary_weight_value(crf))
    out = crf(unary, feat)
    expected = {'log_Q': logQ, 'log_softmax': F.log_softmax(logQ, 1), 'softmax': F.softmax(logQ, 1)}[final_output]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if final_output == 'softmax':
        torch.testing.assert_close(out.sum(1), torch.ones_like(out[:, 0]))


def test_only_non_spatial_potts_pairwise_weights_learn():
    crf = PacCRF(3, 2, pairwise_kernels=MIXED_KERNELS).to(DT)
    unary, feat = inputs()
    crf(unary, feat).sum().backward()
    learns = [p.grad is not None and p.grad.abs().sum() > 0 for p in crf.pairwise_weights]
    assert learns == [False, False, True, False, False]
    assert crf.unary_weight.grad is not None
    fixed = PacCRF(3, 2, fixed_weighting=True, pairwise_kernels=MIXED_KERNELS).to(DT)
    assert isinstance(fixed.unary_weight, float) and 'unary_weight' not in fixed.state_dict()
    fixed(unary, feat).sum().backward()
    assert all(p.grad is None for p in fixed.pairwise_weights)


def test_precomputed_edge_kernels_give_the_same_result():
    crf = PacCRF(3, 2, pairwise_kernels=MIXED_KERNELS).to(DT)
    unary, feat = inputs()
    kernels = crf.compute_edge_kernels(unary, feat)
    assert kernels[1].shape == (2, 1, 3, 3, 4, 5) and kernels[4] is None  # blur 2 -> ceil(7/2) x ceil(9/2)
    torch.testing.assert_close(crf(unary, None, kernels), crf(unary, feat), rtol=0, atol=0)
    one = PacCRF(3, 2, pairwise_kernels=[MIXED_KERNELS[0], MIXED_KERNELS[3]]).to(DT)
    K = one.compute_edge_kernels(unary, feat)[0]
    torch.testing.assert_close(one(unary, None, K), one(unary, feat), rtol=0, atol=0)  # one tensor, reused


# ------------------------------------------------------------------------------------------------
# Loose CRF, gradients, checkpointing
# ------------------------------------------------------------------------------------------------

def test_loose_with_identical_steps_equals_pac_crf_including_na():
    tight = PacCRF(3, 3, final_output='softmax', pairwise_kernels=MIXED_KERNELS).to(DT)
    randomize_(tight)
    loose = PacCRFLoose(3, 3, final_output='softmax', pairwise_kernels=MIXED_KERNELS).to(DT)
    for step in loose.steps:
        step.load_state_dict(tight.state_dict())
    unary, feat = inputs()
    torch.testing.assert_close(loose(unary, feat), tight(unary, feat), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # each step really uses its own parameters (a class-dependent change)
        loose.steps[2].messengers[0].weight[0].add_(0.1)
    assert not torch.allclose(loose(unary, feat), tight(unary, feat))


def test_loose_with_only_na_kernels_needs_no_features():
    loose = PacCRFLoose(3, 2, pairwise_kernels=dict(kernel_size=3, compat_type='na')).to(DT)
    unary, _ = inputs()
    assert loose(unary, None).shape == unary.shape


def test_gradcheck_unary_features_and_weights():
    cfg = [dict(kernel_size=3, compat_type='4d'),
           dict(kernel_size=3, blur=2, compat_type='potts', spatial_filter=False),
           dict(kernel_size=3, dilation=2, compat_type='2d')]
    crf = PacCRF(2, 2, pairwise_kernels=cfg).to(DT)
    unary, feat = inputs(B=1, C=2, H=5, W=4, F_=2)
    params = {name: p.detach() for name, p in crf.named_parameters()}
    weight = params.pop('messengers.0.weight').clone()

    def run(unary, feat, weight):
        return functional_call(crf, {**params, 'messengers.0.weight': weight}, (unary, feat))

    assert torch.autograd.gradcheck(run, (unary.requires_grad_(), feat.requires_grad_(), weight.requires_grad_()))


@pytest.mark.parametrize('crf_class', [PacCRF, PacCRFLoose])
def test_checkpoint_steps_same_values_and_gradients(crf_class):
    torch.manual_seed(0)
    plain = crf_class(3, 3, pairwise_kernels=MIXED_KERNELS).to(DT)
    ckpt = crf_class(3, 3, pairwise_kernels=MIXED_KERNELS, checkpoint_steps=True).to(DT)
    ckpt.load_state_dict(plain.state_dict())
    unary, feat = inputs()
    results = []
    for crf in (plain, ckpt):
        u, f = unary.clone().requires_grad_(), feat.clone().requires_grad_()
        out = crf(u, f)
        (out * torch.linspace(-1, 1, out.numel(), dtype=DT).view_as(out)).sum().backward()
        grads = [u.grad, f.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in crf.parameters()]
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for g_ckpt, g_plain in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-12, atol=1e-12)


def saved_activation_bytes(crf, unary, feat):
    """Bytes of the distinct storages autograd saves for backward during one forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        crf(unary, feat)
    return sum(storages.values())


def test_checkpoint_steps_keeps_one_logq_per_step():
    cfg = MIXED_KERNELS[:3]
    unary, feat = inputs(B=1)
    unary, feat = unary.float().requires_grad_(), feat.float().requires_grad_()
    logq_bytes = unary.numel() * unary.element_size()
    growth = {}
    for ckpt in (False, True):
        few, many = (saved_activation_bytes(PacCRF(3, n, pairwise_kernels=cfg, checkpoint_steps=ckpt), unary, feat)
                     for n in (2, 6))
        growth[ckpt] = (many - few) / 4
    assert growth[True] <= logq_bytes < 2 * logq_bytes <= growth[False], (growth, logq_bytes)


# ------------------------------------------------------------------------------------------------
# Layout: state_dict keys and shapes, repr, construction forms
# ------------------------------------------------------------------------------------------------

RELEASED = [dict(kernel_size=5, dilation=64, blur=1, compat_type='4d', spatial_filter=False),
            dict(kernel_size=5, dilation=16, blur=1, compat_type='4d', spatial_filter=False)]


def test_state_dict_of_released_pac_crf():
    crf = PacCRF(21, 5, pairwise_kernels=RELEASED)
    shapes = {k: tuple(v.shape) for k, v in crf.state_dict().items()}
    assert shapes == {'unary_weight': (), 'messengers.0.weight': (21, 21, 5, 5),
                      'messengers.1.weight': (21, 21, 5, 5), 'pairwise_weights.0': (), 'pairwise_weights.1': ()}
    assert crf.messengers[0].padding == (128, 128) and crf.messengers[1].padding == (32, 32)
    state = {k: torch.randn(v.shape) for k, v in crf.state_dict().items()}
    PacCRF(21, 5, pairwise_kernels=RELEASED).load_state_dict(state, strict=True)
    assert repr(crf).splitlines()[1].strip() == ('categories=21, num_steps=5, final_output=log_Q, '
                                                 'perturbed_init=True, pairwise_kernels=(4d_5_64_1, 4d_5_16_1)')
    assert sum(p.numel() for p in crf.parameters()) == 2 * 21 * 21 * 25 + 1 + 2


def test_state_dict_of_released_loose_crf():
    loose = PacCRFLoose(21, 5, pairwise_kernels=RELEASED)
    shapes = {k: tuple(v.shape) for k, v in loose.state_dict().items()}
    expected = {}
    for s in range(5):
        expected.update({f'steps.{s}.unary_weight': (), f'steps.{s}.messengers.0.weight': (21, 21, 5, 5),
                         f'steps.{s}.messengers.1.weight': (21, 21, 5, 5), f'steps.{s}.pairwise_weights.0': (),
                         f'steps.{s}.pairwise_weights.1': ()})
    assert shapes == expected
    assert not torch.equal(loose.steps[0].messengers[0].weight, loose.steps[1].messengers[0].weight)


def test_compat_keys_and_repr_of_every_type():
    crf = PacCRF(3, 2, perturbed_init=False, fixed_weighting=True, pairwise_kernels=MIXED_KERNELS)
    assert [k for k in crf.state_dict() if k.startswith('compat')] == ['compat.1.weight']
    assert crf.extra_repr() == ('categories=3, num_steps=2, final_output=log_Q, fixed_weighting=True, '
                                'pairwise_kernels=(4d_3_1_1, 2ds_3_2_2, 0d_5_1_3, 0ds_3_1_1, nas_3_1_2)')
    assert crf.num_pairwise_kernels() == 5


def test_dict_list_and_add_pairwise_kernel_build_the_same_crf():
    torch.manual_seed(0)
    from_list = PacCRF(3, 1, pairwise_kernels=MIXED_KERNELS[:2])
    torch.manual_seed(0)
    added = PacCRF(3, 1)
    for cfg in MIXED_KERNELS[:2]:
        added.add_pairwise_kernel(**cfg)
    for (k1, v1), (k2, v2) in zip(from_list.state_dict().items(), added.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert PacCRF(3, 1, pairwise_kernels=MIXED_KERNELS[0]).num_pairwise_kernels() == 1


def test_reset_parameters_restores_the_init():
    crf = PacCRF(3, 1, perturbed_init=False, unary_weight=0.5, pairwise_kernels=MIXED_KERNELS)
    before = {k: v.clone() for k, v in crf.state_dict().items() if 'messengers.4' not in k}  # na: random init
    randomize_(crf)
    with torch.no_grad():
        for p in crf.pairwise_weights:
            p.fill_(7.0)
    crf.reset_parameters()
    for k, v in before.items():
        torch.testing.assert_close(crf.state_dict()[k], v)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def test_position_and_yxrgb_features():
    yx = create_position_feats((2, 3), scales=[1.0, 2.0], bs=2)
    assert yx.shape == (2, 2, 2, 3) and yx.dtype == torch.float32
    torch.testing.assert_close(yx[1, 0], torch.tensor([[0., 0, 0], [1, 1, 1]]))
    torch.testing.assert_close(yx[1, 1], torch.tensor([[0., .5, 1], [0, .5, 1]]))
    img = torch.arange(12.0).reshape(1, 2, 2, 3)
    feats = create_YXRGB(img, yx_scale=2.0, rgb_scale=[1.0, 4.0])
    torch.testing.assert_close(feats[0, 0], torch.tensor([[0., 0, 0], [.5, .5, .5]]))
    torch.testing.assert_close(feats[0, 1], torch.tensor([[0., .5, 1], [0, .5, 1]]))
    torch.testing.assert_close(feats[0, 2:], img[0] / torch.tensor([1.0, 4.0]).view(2, 1, 1))
    torch.testing.assert_close(create_YXRGB(img, scales=[2.0, 2.0, 1.0, 4.0]), feats)
    with pytest.raises(ValueError, match='scales'):
        create_YXRGB(img, yx_scale=2.0, scales=[2.0, 2.0, 1.0, 4.0])
    half = create_YXRGB(img.half(), yx_scale=2.0, rgb_scale=[1.0, 4.0])
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), feats, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('call, error, message', [
    (lambda img: create_YXRGB(img, yx_scale=[1.0, 2.0, 3.0]), ValueError, 'yx_scale: expected one value or 2'),
    (lambda img: create_YXRGB(img, rgb_scale=[1.0, 2.0]), ValueError, 'rgb_scale: expected one value or 3'),
    (lambda img: create_YXRGB(img, rgb_scale='wide'), TypeError, 'rgb_scale: expected a number'),
    (lambda img: create_position_feats((4, 5), scales=[1.0, 2.0, 3.0]), ValueError, 'scales: expected one value or 2'),
])
def test_error_feature_scales(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.rand(1, 3, 4, 5))


# scales that float32 cannot hold: a float32 detour shows up in float64 features
ODD_YX, ODD_RGB = [80.3, 7.1], [13.7, 0.3, 29.9]


def _features_in(dtype, img, yx_scale, rgb_scale):
    """create_YXRGB written out in one dtype, the scales converted straight from Python floats."""
    h, w = img.shape[-2:]
    rows = torch.arange(h, dtype=dtype).view(h, 1).expand(h, w) / yx_scale[0]
    cols = torch.arange(w, dtype=dtype).view(1, w).expand(h, w) / yx_scale[1]
    colour = img.to(dtype) / torch.tensor(rgb_scale, dtype=dtype).view(-1, 1, 1)
    return torch.cat([torch.stack([rows, cols]).expand(img.shape[0], 2, h, w), colour], dim=1)


def test_yxrgb_float64_is_exact():
    img = torch.rand(2, 3, 37, 300, dtype=torch.float64) * 255
    feats = create_YXRGB(img, yx_scale=ODD_YX, rgb_scale=ODD_RGB)
    assert feats.dtype == torch.float64
    assert torch.equal(feats, _features_in(torch.float64, img, ODD_YX, ODD_RGB))
    pos = create_position_feats((37, 300), ODD_YX, bs=2, dtype=torch.float64)
    assert torch.equal(pos, feats[:, :2])
    # a float64 tensor of scales also keeps the positions in float64
    assert create_position_feats((37, 300), torch.tensor(ODD_YX, dtype=torch.float64)).dtype == torch.float64


def test_yxrgb_float32_unchanged():
    img = torch.rand(2, 3, 37, 300) * 255
    feats = create_YXRGB(img, yx_scale=ODD_YX, rgb_scale=ODD_RGB)
    assert feats.dtype == torch.float32
    assert torch.equal(feats, _features_in(torch.float32, img, ODD_YX, ODD_RGB))
    assert torch.equal(create_position_feats((37, 300), ODD_YX), feats[:1, :2])


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_yxrgb_half_precision_rounds_once(dtype):
    """Positions up to 2047 and the colour quotients are rounded once, to the nearest value of ``dtype``."""
    img = (torch.rand(1, 3, 5, 2048, dtype=torch.float64) * 255).to(dtype)
    feats = create_YXRGB(img, yx_scale=[80.3, 1.0], rgb_scale=ODD_RGB)
    assert feats.dtype == dtype
    exact = _features_in(torch.float64, img, [80.3, 1.0], ODD_RGB)
    error = (feats.double() - exact).abs()
    half_ulp = exact.abs() * torch.finfo(dtype).eps / 2
    assert (error <= half_ulp * (1 + 1e-6)).all()
    assert create_position_feats((3, 4), 2.0, dtype=dtype).dtype == dtype


def test_yxrgb_integer_image_and_scale_gradient():
    img = torch.randint(0, 256, (1, 3, 4, 5), dtype=torch.uint8)
    feats = create_YXRGB(img, yx_scale=2.0, rgb_scale=ODD_RGB)
    assert feats.dtype == torch.float32
    assert torch.equal(feats, _features_in(torch.float32, img, [2.0, 2.0], ODD_RGB))
    scales = torch.tensor(ODD_YX, requires_grad=True)
    create_position_feats((4, 5), scales).sum().backward()
    assert scales.grad is not None and (scales.grad < 0).all()
    with pytest.raises(TypeError, match='dtype: expected a floating-point dtype'):
        create_position_feats((4, 5), dtype=torch.int64)


@pytest.mark.parametrize('size,factor', [(7, 2), (9, 4), (10, 4), (8, 4), (5, 3), (6, 1)])
def test_ceil_pad_factor_gives_ceil_cells(size, factor):
    pad = _ceil_pad_factor((size,), factor)[0]
    assert pad == ((factor - size % factor) % factor + 1) // 2
    pooled = F.avg_pool2d(torch.ones(1, 1, size, size), factor, factor, pad, count_include_pad=False)
    assert pooled.shape[-1] == -(-size // factor)


# ------------------------------------------------------------------------------------------------
# DenseCRF preset and crf_refine
# ------------------------------------------------------------------------------------------------

def piecewise_scene(seed=0, size=64):
    """Flat-coloured regions (grey background, red box and disk, thin blue bars), slightly noisy colours,
    and logits = one-hot + N(0, 1): about 63 % of the pixels are right before refinement."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.zeros(size, size, dtype=torch.long)
    labels[8:30, 10:40] = 1
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')
    labels[(yy - 45) ** 2 + (xx - 20) ** 2 < 100] = 1
    labels[:, 50:53] = 2  # 3-pixel bars
    labels[40:43, 30:60] = 2
    colours = torch.tensor([[120., 120, 120], [200, 60, 40], [40, 80, 210]])
    image = colours[labels].permute(2, 0, 1).unsqueeze(0) + torch.randn(1, 3, size, size, generator=gen) * 8
    logits = F.one_hot(labels, 3).permute(2, 0, 1).unsqueeze(0).float()
    logits = logits + torch.randn(logits.shape, generator=gen)
    return image, logits, labels


def accuracy(scores, labels):
    return (scores.argmax(1)[0] == labels).float().mean().item()


def bar_iou(scores, labels):
    predicted, truth = scores.argmax(1)[0] == 2, labels == 2
    return ((predicted & truth).sum() / (predicted | truth).sum()).item()


def test_crf_refine_raises_accuracy_on_noisy_logits():
    image, logits, labels = piecewise_scene()
    probs = crf_refine(logits, image)
    torch.testing.assert_close(probs.sum(1), torch.ones_like(probs[:, 0]))
    before, after = accuracy(logits, labels), accuracy(probs, labels)
    assert before < 0.7 and after > 0.95, (before, after)  # measured: 0.636 -> 0.977
    # the colour (appearance) kernel keeps the thin bars that position-only smoothing erodes
    smoothed_only = crf_refine(logits, image, appearance_weight=0.0)
    assert bar_iou(probs, labels) > bar_iou(smoothed_only, labels) + 0.2  # measured: 0.72 vs 0.42


def test_crf_refine_chunks_and_batches_agree(device):
    scenes = [piecewise_scene(seed) for seed in (1, 2, 3)]
    images = torch.cat([s[0] for s in scenes]).to(device)
    logits = torch.cat([s[1] for s in scenes]).to(device)
    crf = DenseCRF(3, final_output='log_Q').to(device)
    whole = crf_refine(logits, images, crf, chunk_size=3)
    assert whole.device.type == device.type
    torch.testing.assert_close(crf_refine(logits, images, crf, chunk_size=2), whole)
    torch.testing.assert_close(whole[1:2], crf(logits[1:2], images[1:2]))
    assert not whole.requires_grad


def test_dense_crf_preset_structure():
    crf = DenseCRF(5, appearance_weight=2.5, smoothness_weight=1.5, kernel_size=9, dilation=2, blur=2,
                   smoothness_kernel_size=5, position_scale=40.0, color_scale=10.0, smoothness_scale=2.0)
    assert crf.crf.pairwise_repr == ['0d_9_2_2', '0d_5_1_1']
    # weights are per neighbour: w / (k^2 - 1), negated for Potts
    assert [p.item() for p in crf.crf.pairwise_weights] == [-2.5 / 80, -1.5 / 24]
    assert crf.crf._use_pairwise_weights == [True, True]
    assert list(crf.state_dict()) == ['crf.unary_weight', 'crf.messengers.0.weight', 'crf.messengers.1.weight',
                                      'crf.pairwise_weights.0', 'crf.pairwise_weights.1']
    image = torch.rand(1, 3, 6, 7, dtype=DT) * 255
    appearance, smoothness = crf.edge_features(image)
    torch.testing.assert_close(appearance, create_YXRGB(image, 40.0, 10.0))
    torch.testing.assert_close(smoothness, create_position_feats((6, 7), 2.0).to(DT))
    cfg = [dict(kernel_size=9, dilation=2, blur=2, compat_type='potts', pairwise_weight=2.5 / 80),
           dict(kernel_size=5, dilation=1, blur=1, compat_type='potts', pairwise_weight=1.5 / 24)]
    crf = crf.to(DT)
    unary = torch.randn(1, 5, 6, 7, dtype=DT)
    expected = mean_field(unary, [appearance, smoothness], reference_kernels(crf.crf, cfg), 5)
    torch.testing.assert_close(crf(unary, image), expected, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Clear errors
# ------------------------------------------------------------------------------------------------

def test_error_unary_class_count():
    crf = PacCRF(3, 1, pairwise_kernels=MIXED_KERNELS[0])
    with pytest.raises(ValueError, match=r'unary: expected shape \(B, 3, H, W\).*got \(1, 4, 5, 5\)'):
        crf(torch.randn(1, 4, 5, 5), torch.randn(1, 2, 5, 5))
    with pytest.raises(TypeError, match='unary'):
        crf([[1.0]], torch.randn(1, 2, 5, 5))


def test_error_edge_features():
    crf = PacCRF(3, 1, pairwise_kernels=MIXED_KERNELS[:2])
    unary = torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match=r'edge_feat: expected shape \(1, F, 5, 5\).*got \(1, 2, 5, 6\)'):
        crf(unary, torch.randn(1, 2, 5, 6))
    with pytest.raises(ValueError, match=r'edge_feat: expected 2 feature tensors.*got 3'):
        crf(unary, [torch.randn(1, 2, 5, 5)] * 3)
    with pytest.raises(ValueError, match=r'edge_feat\[1\]'):
        crf(unary, [torch.randn(1, 2, 5, 5), torch.randn(2, 2, 5, 5)])
    with pytest.raises(TypeError, match='edge_feat'):
        crf(unary, None)
    with pytest.raises(ValueError, match=r'edge_kernel\[0\]: expected shape \(1, 1, 3, 3, 5, 5\)'):
        crf(unary, None, torch.ones(1, 1, 5, 5, 5, 5))
    with pytest.raises(ValueError, match=r'edge_kernel: expected 2 kernels'):
        crf(unary, None, [torch.ones(1, 1, 3, 3, 5, 5)])
    with pytest.raises(TypeError, match='edge_kernel'):
        crf(unary, None, 3.0)


@pytest.mark.parametrize('kernel_size', [4, 0, 2.0])
def test_error_kernel_size(kernel_size):
    with pytest.raises(ValueError, match=f'kernel_size: expected a positive odd int, got {kernel_size}'):
        PacCRF(3, 1).add_pairwise_kernel(kernel_size=kernel_size)
    with pytest.raises(ValueError, match='kernel_size'):
        PacCRFLoose(3, 2, pairwise_kernels=dict(kernel_size=kernel_size))


def test_error_compat_type_final_output_and_kernel_list():
    with pytest.raises(ValueError, match=r"compat_type: expected one of .*got '3d'"):
        PacCRF(3, 1, pairwise_kernels=dict(compat_type='3d'))
    with pytest.raises(ValueError, match="final_output: 'probs'"):
        PacCRF(3, 1, final_output='probs')
    with pytest.raises(ValueError, match='final_output'):
        PacCRFLoose(3, 1, final_output='probs')
    crf = PacCRF(3, 1, pairwise_kernels=MIXED_KERNELS[0])
    crf.final_output = 'Q'
    with pytest.raises(ValueError, match='final_output'):
        crf(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4))
    with pytest.raises(TypeError, match='pairwise_kernels'):
        PacCRF(3, 1, pairwise_kernels=['4d_5_1_1'])
    with pytest.raises(TypeError, match="pairwise_weight: expected a real number, got 'x'"):
        PacCRF(3, 1, pairwise_kernels=dict(pairwise_weight='x'))
    with pytest.raises(TypeError, match='unary_weight: expected a real number, got None'):
        PacCRFLoose(3, 2, unary_weight=None)
    crf = PacCRF(3, 1, unary_weight=np.float32(0.5), pairwise_kernels=dict(compat_type='potts', pairwise_weight=2))
    assert crf.init_unary_weight == 0.5 and crf.init_pairwise_weights == [-2.0]


def test_error_crf_refine_inputs():
    with pytest.raises(ValueError, match='images'):
        crf_refine(torch.randn(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match='logits'):
        crf_refine(torch.randn(3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(TypeError, match='dense_crf_kwargs'):
        crf_refine(torch.randn(1, 3, 8, 8), torch.rand(1, 3, 8, 8), DenseCRF(3), blur=2)
    with pytest.raises(ValueError, match='color_scale'):
        DenseCRF(3, color_scale=0.0)
    with pytest.raises(ValueError, match='smoothness_kernel_size'):
        DenseCRF(3, smoothness_kernel_size=1)


# ------------------------------------------------------------------------------------------------
# State_dict layout (released weights depend on it) and per-kernel specs
# ------------------------------------------------------------------------------------------------

ALL_KERNEL_TYPES = [dict(kernel_size=3, compat_type='4d'), dict(kernel_size=5, dilation=2, blur=2, compat_type='2d'),
                    dict(kernel_size=3, compat_type='potts', spatial_filter=False), dict(kernel_size=3, compat_type='potts'),
                    dict(kernel_size=3, compat_type='na'), dict(kernel_size=3, compat_type='2d', spatial_filter=False)]


def test_state_dict_keys_and_shapes_keep_the_2019_layout():
    crf = PacCRF(4, 2, pairwise_kernels=ALL_KERNEL_TYPES)
    assert {k: tuple(v.shape) for k, v in crf.state_dict().items()} == {
        'unary_weight': (), 'messengers.0.weight': (4, 4, 3, 3), 'messengers.1.weight': (1, 1, 5, 5),
        'messengers.2.weight': (1, 1, 3, 3), 'messengers.3.weight': (1, 1, 3, 3),
        'messengers.4.weight': (4, 4, 3, 3), 'messengers.5.weight': (1, 1, 3, 3),
        'compat.1.weight': (4, 4, 1, 1), 'compat.5.weight': (4, 4, 1, 1), 'pairwise_weights.0': (),
        'pairwise_weights.1': (), 'pairwise_weights.2': (), 'pairwise_weights.3': (), 'pairwise_weights.4': (),
        'pairwise_weights.5': ()}
    assert list(crf.state_dict())[:3] == ['unary_weight', 'messengers.0.weight', 'messengers.1.weight']
    loose = PacCRFLoose(4, 2, pairwise_kernels=[ALL_KERNEL_TYPES[1], ALL_KERNEL_TYPES[4]])
    assert list(loose.state_dict()) == [
        f'steps.{s}.{k}' for s in range(2) for k in ('unary_weight', 'messengers.0.weight', 'messengers.1.weight',
                                                      'compat.0.weight', 'pairwise_weights.0', 'pairwise_weights.1')]


def test_kernel_specs_and_the_2019_attribute_views():
    crf = PacCRF(4, 2, pairwise_kernels=ALL_KERNEL_TYPES)
    assert [str(spec) for spec in crf.kernel_specs] == crf.pairwise_repr == [
        '4ds_3_1_1', '2ds_5_2_2', '0d_3_1_1', '0ds_3_1_1', 'nas_3_1_1', '2d_3_1_1']
    assert crf.blur == [1, 2, 1, 1, 1, 1]
    assert crf.init_pairwise_weights == [1.0, 1.0, -1.0, -1.0, 1.0, 1.0]
    assert crf._use_pairwise_weights == [False, False, True, False, False, False]
    assert [spec.adaptive for spec in crf.kernel_specs] == [True, True, True, True, False, True]
    assert len(crf.kernel_specs) == len(crf.messengers) == len(crf.compat) == len(crf.pairwise_weights) == 6
    assert PacCRF(4, 1, fixed_weighting=True, pairwise_kernels=ALL_KERNEL_TYPES)._use_pairwise_weights == [False] * 6
    crf.add_pairwise_kernel(kernel_size=7, compat_type='potts', spatial_filter=False, pairwise_weight=0.5)
    assert crf.kernel_specs[-1] == (7, 1, 1, 'potts', False, -0.5, True)


def test_error_dense_crf_and_feature_inputs():
    crf = DenseCRF(3)
    with pytest.raises(TypeError, match='image'):  # pac._check_4d's style: TypeError for a non-tensor
        crf(torch.randn(1, 3, 8, 8), [[0.0]])
    with pytest.raises(ValueError, match='image'):  # and ValueError for a wrong number of dims
        crf(torch.randn(1, 3, 8, 8), torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r'image: expected shape \(1, F, 8, 8\) to match the unary, got \(1, 3, 8, 9\)'):
        crf(torch.randn(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r'unary: expected shape \(B, 3, H, W\)'):
        crf(torch.randn(1, 4, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(TypeError, match='logits'):
        crf_refine(np.zeros((1, 3, 8, 8)), torch.rand(1, 3, 8, 8))
    with pytest.raises(TypeError, match='img: expected a tensor'):
        create_YXRGB(np.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match=r'img: expected a tensor of shape \(..., C, H, W\), got shape \(8, 8\)'):
        create_YXRGB(torch.zeros(8, 8))
