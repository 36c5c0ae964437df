"""FCN-8s backbones, the CRF models and the model-name grammar of task_semanticSegmentation."""
import gc

import pytest
import torch

import paccrf
from task_semanticSegmentation import fcn8s, models
from task_semanticSegmentation.models import PairwiseSpec, create_model, parse_model_name

# (key, shape) of FCN8s in state_dict order (spec section 4.1).
FCN8S_SHAPES = [
    ('conv1_1', (64, 3, 3, 3)), ('conv1_2', (64, 64, 3, 3)),
    ('conv2_1', (128, 64, 3, 3)), ('conv2_2', (128, 128, 3, 3)),
    ('conv3_1', (256, 128, 3, 3)), ('conv3_2', (256, 256, 3, 3)), ('conv3_3', (256, 256, 3, 3)),
    ('conv4_1', (512, 256, 3, 3)), ('conv4_2', (512, 512, 3, 3)), ('conv4_3', (512, 512, 3, 3)),
    ('conv5_1', (512, 512, 3, 3)), ('conv5_2', (512, 512, 3, 3)), ('conv5_3', (512, 512, 3, 3)),
    ('fc6', (4096, 512, 7, 7)), ('fc7', (4096, 4096, 1, 1)),
    ('score_fr', (21, 4096, 1, 1)), ('score_pool3', (21, 256, 1, 1)), ('score_pool4', (21, 512, 1, 1)),
]
UPSCORE_SHAPES = [('upscore2', (21, 21, 4, 4)), ('upscore8', (21, 21, 16, 16)),
                  ('upscore_pool4', (21, 21, 4, 4))]
FCN8S_PARAMETERS = 134_489_759


def expected_fcn8s_state():
    state = []
    for name, shape in FCN8S_SHAPES:
        state += [(f'{name}.weight', shape), (f'{name}.bias', (shape[0],))]
    return state + [(f'{name}.weight', shape) for name, shape in UPSCORE_SHAPES]


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster than 2 threads on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def fcn():
    net = models.FCN8s(21).eval()
    yield net
    del net
    gc.collect()


# ----------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------
def test_fcn8s_download_fetches_the_registry_file_md5_checked(http_server, tmp_path, monkeypatch):
    import hashlib

    import weights
    from tools.download import ChecksumError
    served = http_server.root / 'semantic_segmentation' / 'fcn8s_from_caffe.pth'
    served.parent.mkdir()
    served.write_bytes(b'stand-in weights')
    monkeypatch.setenv('PACNET_WEIGHTS_URL', http_server.url(''))
    with pytest.raises(ChecksumError, match='dbd9bbb3829a3184913bccc74373afbb'):  # the published md5 is enforced
        fcn8s.FCN8s.download(tmp_path / 'cache')
    entry = weights.REGISTRY['fcn8s_from_caffe']
    monkeypatch.setitem(weights.REGISTRY, 'fcn8s_from_caffe',
                        entry._replace(md5=hashlib.md5(b'stand-in weights').hexdigest()))
    path = fcn8s.FCN8s.download(tmp_path / 'cache')
    assert path == tmp_path / 'cache' / 'semantic_segmentation' / 'fcn8s_from_caffe.pth'
    assert path.read_bytes() == b'stand-in weights'


def test_upsampling_weight_is_the_fcn_bilinear_kernel_on_the_diagonal():
    w = fcn8s.get_upsampling_weight(3, 3, 4)
    torch.testing.assert_close(w[1, 1, 0], torch.tensor([0.0625, 0.1875, 0.1875, 0.0625]))
    profile = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(w[1, 1], torch.outer(profile, profile))
    assert w[0, 1].abs().sum() == 0 and w[2, 0].abs().sum() == 0
    odd = fcn8s.get_upsampling_weight(1, 1, 3)[0, 0]  # factor 2, centre 1
    torch.testing.assert_close(odd[1], torch.tensor([0.5, 1.0, 0.5]))


def test_fcn8s_keys_shapes_count_and_init(fcn):
    state = fcn.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected_fcn8s_state()
    assert len(state) == 39
    assert sum(p.numel() for p in fcn.parameters()) == FCN8S_PARAMETERS
    assert fcn.conv1_1.padding == (100, 100) and fcn.fc6.padding == (0, 0)
    assert state['fc6.weight'].abs().sum() == 0 and state['score_fr.bias'].abs().sum() == 0
    torch.testing.assert_close(state['upscore8.weight'], fcn8s.get_upsampling_weight(21, 21, 16))


@pytest.mark.parametrize('size', [(1, 1), (37, 41)])
def test_fcn8s_output_size_equals_input_size(fcn, size):
    with torch.no_grad():
        assert fcn(torch.zeros(1, 3, *size)).shape == (1, 21, *size)


def test_fcn8s_forward_is_the_offset_cropped_fcn_graph_and_out_crop_is_top_left(fcn):
    """With only score_pool3 non-zero, the output is upscore8(upscore_pool4-cropped score_pool3)."""
    torch.manual_seed(0)
    with torch.no_grad():
        fcn.score_pool3.bias.copy_(torch.randn(21))
        try:
            x = torch.randn(1, 3, 40, 40)
            out = fcn(x)
            # pool3 of a 240 x 240 padded input is 30 x 30; its crop at 9 has upscore_pool4's size.
            up4 = fcn.upscore_pool4(fcn.upscore2(torch.zeros(1, 21, 2, 2)))
            crop = fcn.score_pool3.bias.view(1, 21, 1, 1).expand(1, 21, *up4.shape[-2:])
            expected = fcn.upscore8(crop)[:, :, 31:71, 31:71]
            torch.testing.assert_close(out, expected)
            torch.testing.assert_close(fcn(x, out_crop=(10, 12)), out[..., :10, :12])
        finally:
            fcn.score_pool3.bias.zero_()


def test_wrapper_rejects_bad_inputs_before_running(fcn):
    with pytest.raises(ValueError, match='out_crop'):
        fcn(torch.zeros(1, 3, 20, 24), out_crop=(30, 24))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        fcn(torch.zeros(1, 4, 20, 24))


@pytest.fixture(scope='module')
def pac_net():
    net = models.FCN8sPac(21).eval()
    yield net
    del net
    gc.collect()


@pytest.mark.parametrize('name', ['altpad', 'pac'])
def test_altpad_and_pac_geometry_load_fcn8s_weights_and_need_multiples_of_32(fcn, pac_net, name):
    net = models.FCN8sAltPad(21).eval() if name == 'altpad' else pac_net
    try:
        state = net.state_dict()
        assert [(k, tuple(v.shape)) for k, v in state.items()] == expected_fcn8s_state()
        net.load_state_dict(fcn.state_dict(), strict=True)
        assert net.conv1_1.padding == (1, 1) and net.fc6.padding == (3, 3)
        assert net.upscore8.padding == (4, 4) and net.upscore2.padding == (1, 1)
        with torch.no_grad():
            assert net(torch.randn(1, 3, 32, 64)).shape == (1, 21, 32, 64)
            with pytest.raises(ValueError, match=r'multiples of 32.*33x64'):
                net(torch.randn(1, 3, 33, 64))
    finally:
        del net  # the local name only: pac_net stays alive for the next test
        gc.collect()


def test_pacfcn_uses_pac_layers_guided_by_scaled_relu2_2(pac_net):
    import pac
    net = pac_net
    assert all(isinstance(getattr(net, n), pac.PacConv2d) for n in fcn8s.PAC_LAYERS)
    assert isinstance(net.conv3_2, torch.nn.Conv2d) and not isinstance(net.conv3_2, pac.PacConv2d)
    seen, relu = {}, {}
    hooks = [getattr(net, n).register_forward_hook(
        lambda m, args, out, n=n: seen.__setitem__(n, (args[0].shape, args[1]))) for n in fcn8s.PAC_LAYERS]
    hooks.append(net.conv2_2.register_forward_hook(lambda m, a, out: relu.__setitem__('x', torch.relu(out))))
    try:
        with torch.no_grad():
            net.conv2_2.bias.fill_(1.0)  # makes relu2_2 non-zero
            net(torch.zeros(1, 3, 64, 64))
    finally:
        net.conv2_2.bias.data.zero_()
        for hook in hooks:
            hook.remove()
    for name, scale in zip(fcn8s.PAC_LAYERS, (0.5, 0.25, 0.125)):
        shape, guide = seen[name]
        assert guide.shape[-2:] == shape[-2:] and guide.shape[1] == 128
        expected = 1e-4 * torch.nn.functional.interpolate(relu['x'], scale_factor=scale, mode='bilinear',
                                                          align_corners=False)
        torch.testing.assert_close(guide, expected)


def test_tinyfcn_any_size_and_out_crop():
    net = models.TinyFCN(21)
    assert net(torch.randn(2, 3, 37, 45)).shape == (2, 21, 37, 45)
    assert net(torch.randn(1, 3, 37, 45), (20, 30)).shape == (1, 21, 20, 30)


@pytest.mark.parametrize('make', [lambda: models.TinyFCN(21), lambda: create_model('tinyfcn_crfi1p4d311', 21)],
                         ids=['tinyfcn', 'tinyfcn_crf'])
def test_tinyfcn_and_crf_models_reject_bad_inputs_naming_them(make):
    net = make()
    with pytest.raises(ValueError, match=r'expects x of shape \(B, 3, H, W\), got \(1, 1, 8, 8\)'):
        net(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r'expects x of shape \(B, 3, H, W\), got \(3, 8, 8\)'):
        net(torch.zeros(3, 8, 8))
    for out_crop in [(4,), (9, 8), (0, 8)]:
        with pytest.raises(ValueError, match='out_crop'):
            net(torch.zeros(1, 3, 8, 8), out_crop)


# ----------------------------------------------------------------------------------------------
# Grammar
# ----------------------------------------------------------------------------------------------
def P(compat, k, d, b, spatial=False):  # noqa: N802 (reads like the table)
    return PairwiseSpec(compat, k, d, b, spatial)


GRAMMAR_EXAMPLES = {
    'fcn8s': models.ModelSpec('fcn8s'),
    'fcn8saltpad': models.ModelSpec('fcn8saltpad'),
    'fcn8spac': models.ModelSpec('fcn8spac'),
    'fcn8s_crfi5p4d5641p4d5161': models.ModelSpec('fcn8s', False, 'crf', 5, False,
                                                  (P('4d', 5, 64, 1), P('4d', 5, 16, 1))),
    'fcn8s_crfi5lp4d5641p4d5161': models.ModelSpec('fcn8s', False, 'crf', 5, True,
                                                   (P('4d', 5, 64, 1), P('4d', 5, 16, 1))),
    'fcn8sfrozen_crfi5p4d5641p4d5161': models.ModelSpec('fcn8s', True, 'crf', 5, False,
                                                        (P('4d', 5, 64, 1), P('4d', 5, 16, 1))),
    'fcn8s_crfi5p4d5321': models.ModelSpec('fcn8s', False, 'crf', 5, False, (P('4d', 5, 32, 1),)),
    'fcn8s_crf': models.ModelSpec('fcn8s', False, 'crf', 5, False, (P('4d', 5, 16, 1),)),
    'fcn8s_crfv7': models.ModelSpec('fcn8s', False, 'crf', 5, False, (P('4d', 5, 16, 1),)),
    'fcn8spac_crfi5p4d5641p4d5161': models.ModelSpec('fcn8spac', False, 'crf', 5, False,
                                                     (P('4d', 5, 64, 1), P('4d', 5, 16, 1))),
    'fcn8s_crfi3p2ds5111p0d3111p0ds3112': models.ModelSpec(
        'fcn8s', False, 'crf', 3, False,
        (P('2d', 5, 11, 1, True), P('potts', 3, 11, 1), P('potts', 3, 11, 2, True))),
    'fcn8saltpadfrozen_crfv7i12l': models.ModelSpec('fcn8saltpad', True, 'crf', 12, True, (P('4d', 5, 16, 1),)),
    'fcn8s_convcrf': models.ModelSpec('fcn8s', False, 'convcrf'),
    'fcn8s_convcrfv1': models.ModelSpec('fcn8s', False, 'convcrf'),
    'tinyfcnfrozen_crfi2p4d511pnas3121': models.ModelSpec('tinyfcn', True, 'crf', 2, False,
                                                          (P('4d', 5, 1, 1), P('na', 3, 12, 1, True))),
}


@pytest.mark.parametrize('name', list(GRAMMAR_EXAMPLES))
def test_grammar_examples_decode(name):
    assert parse_model_name(name) == GRAMMAR_EXAMPLES[name]


@pytest.mark.parametrize('name', ['fcn9s', 'fcn8s_crf_x', 'vgg_crf', 'fcn8s_crfx', 'fcn8s_crfi5p4x5161',
                                  'fcn8s_crfp4d51', 'fcn8s_crfi0', 'fcn8s_crfip4d5161', 'fcn8s_crfp4d4161',
                                  'fcn8sfrozen', ''])
def test_bad_names_raise_value_error_showing_the_grammar(name):
    with pytest.raises(ValueError, match='model name grammar'):
        parse_model_name(name)


def test_pairwise_strings_of_both_forms():
    assert PairwiseSpec.parse('4d_5_16_1') == PairwiseSpec.parse('4d5161') == P('4d', 5, 16, 1)
    assert PairwiseSpec.parse('0ds_3_11_2') == P('potts', 3, 11, 2, True)
    assert P('potts', 3, 11, 2, True).crf_kwargs() == dict(kernel_size=3, dilation=11, blur=2, compat_type='potts',
                                                           spatial_filter=True, pairwise_weight=1.0)


# ----------------------------------------------------------------------------------------------
# CRF models built from names (FCN8s-sized: built one at a time)
# ----------------------------------------------------------------------------------------------
CRF_KEYS = {'crf.unary_weight': (), 'crf.messengers.0.weight': (21, 21, 5, 5),
            'crf.messengers.1.weight': (21, 21, 5, 5), 'crf.pairwise_weights.0': (),
            'crf.pairwise_weights.1': (), 'feat_scales.0': (3,), 'feat_scales.1': (3,)}


def test_frozen_paccrf_keys_and_trainable_parameters():
    model = create_model('fcn8sfrozen_crfi5p4d5641p4d5161', 21)
    try:
        state = model.state_dict()
        assert len(state) == 46
        assert [(k[len('backbone.'):], tuple(v.shape)) for k, v in state.items()
                if k.startswith('backbone.')] == expected_fcn8s_state()
        assert {k: tuple(v.shape) for k, v in state.items() if not k.startswith('backbone.')} == CRF_KEYS
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 22_059 == 2 * 21 * 21 * 25 + 1 + 2 + 6
        assert {id(p) for p in models.trainable_parameters(model)} == {
            id(p) for name, p in model.named_parameters() if not name.startswith('backbone.')}
        messengers = model.crf.messengers
        assert (messengers[0].dilation, messengers[0].padding) == ((64, 64), (128, 128))
        assert (messengers[1].dilation, messengers[1].padding) == ((16, 16), (32, 32))
        torch.testing.assert_close(model.feat_scales[0].data, torch.tensor([30.0, 30.0, 30.0]))
        assert isinstance(model.crf, paccrf.PacCRF) and model.crf.num_steps == 5
    finally:
        del model
        gc.collect()


def test_loose_paccrf_has_66_keys_and_unfrozen_backbone():
    model = create_model('fcn8s_crfi5lp4d5641p4d5161', 21)
    try:
        state = model.state_dict()
        assert len(state) == 66
        assert isinstance(model.crf, paccrf.PacCRFLoose)
        for step in range(5):
            assert tuple(state[f'crf.steps.{step}.messengers.1.weight'].shape) == (21, 21, 5, 5)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == FCN8S_PARAMETERS + 5 * (
            2 * 21 * 21 * 25 + 1 + 2) + 6
    finally:
        del model
        gc.collect()


def test_convcrf_model():
    model = create_model('tinyfcn_convcrf', 21)
    state = model.state_dict()
    assert tuple(state['crf.messengers.0.weight'].shape) == (1, 1, 11, 11)
    assert tuple(state['crf.compat.1.weight'].shape) == (21, 21, 1, 1)
    assert not any(k.startswith('feat_scales') for k in state)
    assert model.crf.unary_weight.item() == pytest.approx(0.8)
    assert model(torch.randn(1, 3, 24, 30) * 50, (20, 30)).shape == (1, 21, 20, 30)


def test_crf_model_edge_features_are_input_over_scales():
    model = create_model('tinyfcn_crfi1p4d311', 21).double()
    captured = {}
    original = model.crf.forward
    model.crf.forward = lambda unary, feats: captured.setdefault('f', (unary, feats)) and original(unary, feats)
    x = torch.randn(1, 3, 12, 14, dtype=torch.float64) * 50
    with torch.no_grad():
        model.feat_scales[0].copy_(torch.tensor([10.0, 20.0, 40.0]))
        out = model(x, (10, 14))
    unary, feats = captured['f']
    assert out.shape == unary.shape == (1, 21, 10, 14)
    torch.testing.assert_close(feats[0], x[..., :10, :14] / torch.tensor([10.0, 20.0, 40.0]).view(1, 3, 1, 1))


def test_loose_crf_loads_a_non_loose_crf_in_every_step_without_touching_the_dict():
    torch.manual_seed(0)
    tight = create_model('tinyfcn_crfi3p4d521', 21).double().eval()
    loose = create_model('tinyfcn_crfi3lp4d521', 21).double().eval()
    source = tight.state_dict()
    before = {k: v.clone() for k, v in source.items()}
    loose.load_state_dict(source, strict=True)
    assert list(source) == list(before) and all(torch.equal(source[k], before[k]) for k in before)
    for step in range(3):
        torch.testing.assert_close(loose.crf.steps[step].messengers[0].weight, tight.crf.messengers[0].weight)
    x = torch.randn(1, 3, 16, 18, dtype=torch.float64) * 40
    with torch.no_grad():
        torch.testing.assert_close(loose(x), tight(x))


def test_create_model_rejects_bad_num_classes():
    with pytest.raises(ValueError, match='num_classes'):
        create_model('tinyfcn', 0)
