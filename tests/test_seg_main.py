"""The segmentation program end to end on Synthetic data (CPU, tiny crops, a few images)."""
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from task_semanticSegmentation import main as seg
from task_semanticSegmentation.models import create_model
from task_semanticSegmentation.synthetic import Synthetic
from tools.runtime import atomic_save, read_csv_log

TINY = ['--dataset', 'Synthetic', '--device', 'cpu', '--num-data-worker', '0', '--num-threads', '1',
        '--train-crop', '32', '--test-crop', '-1', '--batch-size', '2', '--log-interval', '1', '--seed', '0']


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # main(--num-threads 1) changes the process-wide setting
    yield
    torch.set_num_threads(threads)


def run(tmp_path, *extra, exp='exp'):
    return seg.main(TINY + ['--exp-root', str(tmp_path / exp)] + [str(e) for e in extra])


def test_train_resume_test_only_and_predictions(tmp_path, capsys):
    exp = tmp_path / 'exp'
    values = run(tmp_path, '--model', 'tinyfcn', '--epochs', 1, '--train-split', 'train_rand4',
                 '--test-split', 'val_rand3', '--lr-steps', 2)
    assert set(values) == {'miou', 'acc', 'macc'} and 0 <= values['acc'] <= 1
    train_log, test_log = read_csv_log(exp / 'train.log'), read_csv_log(exp / 'test.log')
    assert list(train_log) == seg.TRAIN_COLUMNS == ['epoch', 'lr', 'time', 'time-data', 'loss', 'loss-avg', 'miou',
                                                    'miou-avg', 'acc', 'acc-avg', 'macc', 'macc-avg']
    assert list(test_log) == seg.TEST_COLUMNS == ['epoch', 'lr', 'time', 'time-data', 'loss', 'miou', 'acc', 'macc']
    assert train_log['epoch'] == [0.5, 1.0] and test_log['epoch'] == [0.0, 1.0]
    assert (exp / 'weights_epoch_1.pth').is_file() and (exp / 'adam_epoch_1.pth').is_file()
    first_rows = (exp / 'train.log').read_text().splitlines()

    capsys.readouterr()
    run(tmp_path, '--model', 'tinyfcn', '--epochs', 2, '--train-split', 'train_rand4',
        '--test-split', 'val_rand3', '--lr-steps', 2)
    assert 'optimizer state loaded' in capsys.readouterr().out
    assert (exp / 'train.log').read_text().splitlines()[:3] == first_rows
    train_log, test_log = read_csv_log(exp / 'train.log'), read_csv_log(exp / 'test.log')
    assert test_log['epoch'] == [0.0, 1.0, 2.0] and train_log['epoch'] == [0.5, 1.0, 1.5, 2.0]
    assert test_log['lr'] == pytest.approx([1e-3, 1e-3, 1e-4])   # --lr-steps 2 applies from epoch 2
    w1, w2 = (torch.load(exp / f'weights_epoch_{e}.pth', weights_only=True) for e in (1, 2))
    assert set(w1) == set(create_model('tinyfcn', 21).state_dict())
    assert not torch.equal(w1['score.weight'], w2['score.weight'])

    # a test-only run in a folder with snapshots tests the latest one and leaves the logs alone
    logs = [(exp / n).read_text() for n in ('train.log', 'test.log')]
    tested = run(tmp_path, '--model', 'tinyfcn', '--test-split', 'val_rand3')
    assert tested['miou'] == pytest.approx(test_log['miou'][-1], abs=1e-6)
    assert [(exp / n).read_text() for n in ('train.log', 'test.log')] == logs

    run(tmp_path, '--model', 'tinyfcn', '--test-split', 'val_rand3', '--eval', 'pred')
    run(tmp_path, '--model', 'tinyfcn', '--test-split', 'val_rand3', '--eval', 'raw')
    pngs = sorted((exp / 'outputs_val_rand3_pred').glob('*.png'))
    assert len(pngs) == 3
    synthetic = Synthetic('val')
    for png in pngs:
        pred = Image.open(png)
        image = synthetic[int(png.stem.split('_')[1])][0]
        assert pred.mode == 'P' and pred.size == image.size
        raw = np.load(exp / 'outputs_val_rand3_raw' / f'{png.stem}.npy')
        assert raw.dtype == np.float32 and raw.shape == (21, image.height, image.width)
        assert np.array_equal(raw.argmax(0), np.asarray(pred))


def test_save_format_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip('safetensors.torch')
    exp = tmp_path / 'exp'
    trained = run(tmp_path, '--model', 'tinyfcn', '--epochs', 1, '--train-split', 'train_rand2',
                  '--test-split', 'val_rand2', '--save-format', 'safetensors')
    assert sorted(p.name for p in exp.glob('*_epoch_*')) == ['adam_epoch_1.pth', 'weights_epoch_1.safetensors']
    state = safetensors_torch.load_file(str(exp / 'weights_epoch_1.safetensors'))
    assert set(state) == set(create_model('tinyfcn', 21).state_dict())
    # a test-only run in that folder finds and loads the .safetensors snapshot
    tested = run(tmp_path, '--model', 'tinyfcn', '--test-split', 'val_rand2')
    assert tested['miou'] == pytest.approx(trained['miou'], abs=1e-6)


def test_frozen_crf_stage_and_loose_stage_two(tmp_path, capsys):
    backbone = tmp_path / 'backbone.pth'
    torch.manual_seed(0)
    atomic_save(create_model('tinyfcn', 21).state_dict(), backbone)
    stage1 = ['--model', 'tinyfcnfrozen_crfi2p4d311', '--load-weights-backbone', backbone,
              '--train-split', 'train_rand2', '--test-split', 'val_rand2', '--train-crop', 24]
    run(tmp_path, *stage1, '--epochs', 1, exp='stage1')
    snapshot = torch.load(tmp_path / 'stage1' / 'weights_epoch_1.pth', weights_only=True)
    assert snapshot and not any(k.startswith('backbone') for k in snapshot)
    assert set(snapshot) == {'crf.unary_weight', 'crf.messengers.0.weight', 'crf.pairwise_weights.0', 'feat_scales.0'}
    # resuming a frozen stage needs the backbone again; the snapshot then loads without backbone keys
    run(tmp_path, *stage1, '--epochs', 1, exp='stage1')

    capsys.readouterr()
    run(tmp_path, '--model', 'tinyfcn_crfi2lp4d311', '--load-weights-backbone', backbone,
        '--load-weights', tmp_path / 'stage1' / 'weights_epoch_1.pth', '--test-split', 'val_rand2', exp='stage2')
    out = capsys.readouterr().out
    assert 'has no backbone.* keys: the backbone stays as --load-weights-backbone loaded it' in out
    assert 'non-strict' not in out  # the loose CRF takes the stage-1 CRF strictly (adapt_state_dict)

    model = create_model('tinyfcn_crfi2lp4d311', 21)
    with pytest.raises(ValueError, match='frozen backbone needs the backbone it was trained on'):
        seg.load_weights(model, str(tmp_path / 'stage1' / 'weights_epoch_1.pth'), 'model')
    seg.load_weights(model, str(tmp_path / 'stage1' / 'weights_epoch_1.pth'), 'model', fill_backbone=True)
    for step in model.crf.steps:
        torch.testing.assert_close(step.messengers[0].weight, snapshot['crf.messengers.0.weight'])


def test_same_seed_same_run(tmp_path):
    args = ['--model', 'tinyfcn', '--epochs', 1, '--train-split', 'train_rand2', '--test-split', 'val_rand2',
            '--train-aug-scale', 0.25, '--train-aug-color', '--loss', 'fce_0.9']
    run(tmp_path, *args, exp='a')
    run(tmp_path, *args, exp='b')
    logs = [read_csv_log(tmp_path / e / 'train.log') for e in 'ab']
    for column in ('loss', 'miou', 'acc'):
        assert logs[0][column] == logs[1][column]


@pytest.mark.parametrize('extra, message', [
    (['--model', 'fcn8s_crfq'], 'model name grammar'),  # the last --model wins
    (['--loss', 'l1'], '--loss'),
    (['--test-batch-size', '2'], '--test-batch-size 1'),
    (['--train-aug-scale', '1.5'], '--train-aug-scale'),
    (['--batch-size', '0'], '--batch-size'),
])
def test_bad_arguments_are_parser_errors_naming_the_flag(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:  # parser.error, as the joint-upsampling program
        run(tmp_path, '--model', 'tinyfcn', *extra)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_eval_needs_a_test_only_run(tmp_path):
    with pytest.raises(ValueError, match='test-only'):  # depends on the snapshots: checked when the run is planned
        run(tmp_path, '--model', 'tinyfcn', '--eval', 'pred', '--epochs', 1)


def test_reference_flags_and_defaults():
    args = seg.build_parser().parse_args([])
    expected = dict(data_root='data', exp_root='exp', download=False, load_weights='', load_weights_backbone='',
                    model='fcn8s', dataset='VOC2012', num_data_worker=4, gpu=None, val_ratio=0.0, train_split='',
                    test_split='', eval='', batch_size=1, test_batch_size=1, train_crop=449, test_crop=513,
                    train_aug_scale=0.0, train_aug_color=False, epochs=0, optimizer='Adam', loss='ce', lr=0.001,
                    lr_steps=None, weight_decay=0.0, momentum=0.5, seed=-1, overwrite=False, print_interval=10,
                    log_interval=10, test_interval=1, snapshot_interval=1, device='auto')
    assert {k: getattr(args, k) for k in expected} == expected


def test_help_shows_defaults_and_the_grammar_line_by_line():
    text = seg.build_parser().format_help()
    assert '(default: 449)' in text and '(default: fcn8s)' in text
    assert '\n  <pairwise> := <type>[s]<kernel_size:1 digit><dilation:digits><blur:1 digit>\n' in text


README_COMMANDS = [
    '--data-root data/voc --exp-root exp/voc --download --load-weights fcn8s_from_caffe.pth --model fcn8s '
    '--test-split val11_sbd --test-crop -1',
    '--data-root data/voc --exp-root exp/voc/crf_only --download --load-weights-backbone fcn8s_from_caffe.pth '
    '--train-split train11 --test-split val11_sbd --train-crop 449 --test-crop -1 '
    '--model fcn8sfrozen_crfi5p4d5641p4d5161 --epochs 40 --lr 0.001 --lr-steps 20',
    '--data-root data/voc --exp-root exp/voc/joint --download --load-weights-backbone fcn8s_from_caffe.pth '
    '--load-weights exp/voc/crf_only/weights_epoch_40.pth --train-split train11 --test-split val11_sbd '
    '--train-crop 449 --test-crop -1 --model fcn8s_crfi5lp4d5641p4d5161 --epochs 30 --lr 0.0000001 --lr-steps 20',
    '--data-root data/voc --exp-root exp/voc --load-weights fcn8s_paccrf_epoch_30.pth --eval pred '
    '--test-split test --test-crop -1 --model fcn8s_crfi5p4d5641p4d5161',
    '--data-root data/voc --exp-root exp/voc --load-weights fcn8s_pacfcn_epoch_20.pth --model fcn8spac '
    '--test-split val11_sbd --test-crop 512',
]


@pytest.mark.parametrize('command', README_COMMANDS)
def test_reference_readme_commands_parse_and_validate(command):
    seg.check_args(seg.build_parser().parse_args(shlex.split(command)))


@pytest.mark.slow
def test_fcn8s_paccrf_and_pacfcn_names_run_through_the_program(tmp_path):
    backbone = tmp_path / 'fcn8s.pth'  # a frozen backbone must be loaded: random FCN8s weights stand in
    torch.manual_seed(0)
    atomic_save(create_model('fcn8s', 21).state_dict(), backbone)
    values = run(tmp_path, '--model', 'fcn8sfrozen_crfi2p4d5161', '--load-weights-backbone', backbone, '--epochs', 1,
                 '--train-split', 'train_rand1', '--test-split', 'val_rand1', '--batch-size', 1, exp='paccrf')
    assert 0 <= values['acc'] <= 1
    snapshot = torch.load(tmp_path / 'paccrf' / 'weights_epoch_1.pth', weights_only=True)
    assert set(snapshot) == {'crf.unary_weight', 'crf.messengers.0.weight', 'crf.pairwise_weights.0',
                             'feat_scales.0'}
    pacfcn = tmp_path / 'fcn8spac.pth'  # a test-only run needs weights: random ones stand in
    atomic_save(create_model('fcn8spac', 21).state_dict(), pacfcn)
    with pytest.raises(ValueError, match='multiples of 32'):   # whole 64-96 px images
        run(tmp_path, '--model', 'fcn8spac', '--load-weights', pacfcn, '--test-split', 'val_rand1', exp='pacfcn')
    run(tmp_path, '--model', 'fcn8spac', '--load-weights', pacfcn, '--test-split', 'val_rand1', '--test-crop', 96,
        exp='pacfcn')
