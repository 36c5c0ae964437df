"""End-to-end runs of ``python -m task_jointUpsampling.main`` (called in-process, tiny sizes): train, resume,
test-only, weights loading, images, the comparison table, and a flow evaluation on a tiny Sintel."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from task_jointUpsampling import main as joint_main
from task_jointUpsampling.datasets import Sintel
from tools.runtime import read_csv_log

TINY = ['--dataset', 'Synthetic', '--factor', '4', '--model', 'PacJointUpsampleLite', '--synthetic-size', '24',
        '--synthetic-samples', '6', '2', '--train-crop', '16', '--batch-size', '2', '--test-batch-size', '2',
        '--num-data-worker', '0', '--log-interval', '2', '--test-interval', '1', '--lr', '1e-3', '--device', 'cpu']


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Two epochs in one go, and one epoch then a resumed second epoch."""
    root = tmp_path_factory.mktemp('runs')
    threads = torch.get_num_threads()  # as the tests that compare with these runs (one_thread): bit-equal sums
    torch.set_num_threads(1)
    straight = joint_main.main(TINY + ['--epochs', '2', '--exp-root', str(root / 'straight')])
    joint_main.main(TINY + ['--epochs', '1', '--exp-root', str(root / 'resumed')])
    resumed = joint_main.main(TINY + ['--epochs', '2', '--exp-root', str(root / 'resumed')])
    torch.set_num_threads(threads)
    return root, straight, resumed


def test_train_writes_logs_snapshots_and_plot(trained):
    root, straight, _ = trained
    exp = root / 'straight'
    train_log, test_log = read_csv_log(exp / 'train.log'), read_csv_log(exp / 'test.log')
    assert list(train_log) == ['epoch', 'lr', 'loss', 'rmse']
    assert train_log['epoch'] == pytest.approx([2 / 3, 1, 5 / 3, 2])  # every 2 of 3 batches and at epoch ends
    assert test_log['epoch'] == [0, 1, 2]  # the initial test, then every --test-interval epoch
    assert test_log['rmse'][-1] == pytest.approx(straight['rmse'], rel=1e-5)  # rmse in cm
    assert sorted(p.name for p in exp.glob('*.pth')) == ['state_epoch_2.pth', 'weights_epoch_2.pth']
    weights = load(exp / 'weights_epoch_2.pth')  # a plain state_dict, like the released weights
    assert set(weights) == set(joint_main.create_model('PacJointUpsampleLite', 4).state_dict())
    assert (exp / 'log.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_resume_reproduces_an_uninterrupted_run(trained):
    root, straight, resumed = trained
    a, b = load(root / 'straight' / 'weights_epoch_2.pth'), load(root / 'resumed' / 'weights_epoch_2.pth')
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert resumed['rmse'] == straight['rmse']
    assert (root / 'resumed' / 'weights_epoch_1.pth').is_file()
    # the resumed logs hold each epoch once, as the uninterrupted run's do
    assert (root / 'resumed' / 'train.log').read_text() == (root / 'straight' / 'train.log').read_text()
    assert (root / 'resumed' / 'test.log').read_text() == (root / 'straight' / 'test.log').read_text()


def test_save_format_safetensors_resumes_like_pth(trained, tmp_path):
    pytest.importorskip('safetensors')
    root, straight, _ = trained
    exp = tmp_path / 'st'
    joint_main.main(TINY + ['--epochs', '1', '--exp-root', str(exp), '--save-format', 'safetensors'])
    resumed = joint_main.main(TINY + ['--epochs', '2', '--exp-root', str(exp), '--save-format', 'safetensors'])
    assert sorted(p.name for p in exp.glob('*_epoch_*')) == [
        'state_epoch_1.pth', 'state_epoch_2.pth', 'weights_epoch_1.safetensors', 'weights_epoch_2.safetensors']
    import safetensors.torch
    a = load(root / 'straight' / 'weights_epoch_2.pth')
    b = safetensors.torch.load_file(str(exp / 'weights_epoch_2.safetensors'))
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert resumed['rmse'] == straight['rmse']


def test_test_only_runs_in_a_folder_with_snapshots(trained, capsys):
    root, straight, _ = trained
    exp = root / 'straight'
    before = (exp / 'test.log').read_text()
    result = joint_main.main(TINY + ['--exp-root', str(exp), '--save-images', '1'])
    assert result['epoch'] == 2 and result['rmse'] == pytest.approx(straight['rmse'], rel=1e-6)
    assert 'rmse (cm)' in capsys.readouterr().out
    assert (exp / 'test.log').read_text() == before  # a test-only run leaves the training logs alone
    names = sorted(p.name for p in (exp / 'images_test').iterdir())  # next to, not over, training's images
    assert names == ['0000_gt.png', '0000_guide.png', '0000_input.png', '0000_pred.png']


def test_load_weights_from_a_path_and_key_report(trained, tmp_path):
    root, straight, _ = trained
    weights = root / 'straight' / 'weights_epoch_2.pth'
    result = joint_main.main(TINY + ['--exp-root', str(tmp_path / 'fresh'), '--load-weights', str(weights)])
    assert result['rmse'] == pytest.approx(straight['rmse'], rel=1e-6)
    with pytest.raises(ValueError, match='missing'):  # strict: a DJIF file does not fit a PAC model
        bad = tmp_path / 'djif.pth'
        torch.save(joint_main.create_model('DJIF', 4).state_dict(), bad)
        joint_main.main(TINY + ['--exp-root', str(tmp_path / 'fresh'), '--load-weights', str(bad)])
    with pytest.raises(ValueError, match='--overwrite'):  # resuming and --load-weights conflict
        joint_main.main(TINY + ['--epochs', '3', '--exp-root', str(root / 'straight'), '--load-weights', str(weights)])


def test_short_weight_names_resolve_by_dataset(monkeypatch):
    import weights
    seen = []
    monkeypatch.setattr(weights, 'load_state_dict', lambda spec: seen.append(spec) or {})
    monkeypatch.setattr(weights, 'load_into', lambda module, sd, strict: None)
    net = torch.nn.Linear(1, 1)
    joint_main.load_weights(net, 'x8_pac', joint_main.DATASETS['NYUDepthV2'])
    joint_main.load_weights(net, 'x4_djif', joint_main.DATASETS['Sintel'])
    joint_main.load_weights(net, 'depth_x16_paclite', joint_main.DATASETS['Sintel'])
    # the 2019 README's command names a file it expects on disk: when missing, the dataset's release is used
    joint_main.load_weights(net, 'weights_depth/x8_pac_weights_epoch_5000.pth', joint_main.DATASETS['NYUDepthV2'])
    joint_main.load_weights(net, 'weights_flow/x16_djif_weights_epoch_5000.pth', joint_main.DATASETS['Sintel'])
    assert seen == ['depth_x8_pac', 'flow_x4_djif', 'depth_x16_paclite', 'depth_x8_pac', 'flow_x16_djif']


def test_compare_table(tmp_path, capsys):
    rows = joint_main.main(TINY + ['--epochs', '1', '--exp-root', str(tmp_path), '--compare', 'Bilinear', 'DJIF'])
    assert [row['model'] for row in rows] == ['Bilinear', 'DJIF']
    assert rows[0]['params'] == 0 and rows[1]['params'] == 56_323
    assert all(np.isfinite(row['rmse']) for row in rows)
    out = capsys.readouterr().out
    assert 'rmse (cm)' in out and 'Bilinear has no trainable parameters' in out
    table = (tmp_path / 'results.txt').read_text()
    assert 'Bilinear' in table and 'DJIF' in table
    assert (tmp_path / 'DJIF' / 'weights_epoch_1.pth').is_file() and not (tmp_path / 'Bilinear').exists()
    # the two test scenes in rows; guide, input, Bilinear, DJIF and ground truth in columns (2 x 2.1 in at 100 dpi)
    # and a colour bar per row (0.6 in)
    with Image.open(tmp_path / 'compare.png') as figure:
        assert figure.format == 'PNG' and figure.size == (1060, 420)


def test_compare_selects_jbu_on_validation_scenes_and_tests_the_heldout_family(tmp_path, capsys):
    argv = TINY + ['--epochs', '0', '--exp-root', str(tmp_path), '--compare', 'Bilinear', 'JBU',
                   '--synthetic-heldout', 'B']
    rows = joint_main.main(argv)
    args = joint_main.parse_args(argv)
    val = {name: joint_main.evaluate_model(args, joint_main.create_model(name, 4), split='val')['rmse']
           for name in joint_main.jbu_grid(4)}
    assert rows[1]['model'] == min(val, key=val.get)  # chosen on the validation scenes
    for row in rows:  # the held-out column is the model on family B's test scenes
        net = joint_main.create_model(row['model'], 4)
        assert row['rmse heldout'] == pytest.approx(joint_main.evaluate_model(args, net, family='B')['rmse'])
        assert row['rmse heldout'] != pytest.approx(row['rmse'])
    table = (tmp_path / 'results_test.txt').read_text()
    assert 'rmse (cm) A' in table and 'rmse (cm) B (held out)' in table
    out = capsys.readouterr().out
    assert f'selected {rows[1]["model"]}' in out
    assert all(f'{name} {score:.2f}' in out for name, score in val.items())  # the grid's validation errors
    with pytest.raises(SystemExit):  # JBU selection needs Synthetic validation scenes
        joint_main.parse_args(['--dataset', 'NYUDepthV2', '--compare', 'JBU'])
    with pytest.raises(SystemExit):  # a held-out family is tested by --compare on Synthetic
        joint_main.parse_args(TINY + ['--synthetic-heldout', 'B'])


def test_bad_flags_are_rejected(capsys):
    for argv in (['--optimizer', 'RMSprop'], ['--loss', 'l1'], ['--dataset', 'KITTI'], ['--batch-size', '0'],
                 ['--measures', 'epe'], ['--epochs', '-1'], ['--color-guide-init', '-1']):
        with pytest.raises(SystemExit):
            joint_main.parse_args(argv)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # checked before any work
        joint_main.main(TINY + ['--model', 'Transformer'])
    assert "model 'Transformer' is unknown" in capsys.readouterr().err


def test_demo_preset_keeps_explicit_flags():
    args = joint_main.parse_args(['--demo', '--epochs', '1'])
    assert args.dataset == 'Synthetic' and args.compare == ['Bilinear', 'JBU', 'DJIF', 'PacJointUpsample']
    assert args.epochs == 1 and args.passthrough_init and args.normalize_kernel and args.color_guide_init == 5.0
    assert (args.synthetic_family, args.synthetic_heldout) == ('A', 'B')
    defaults = joint_main.parse_args([])
    # the 2019 model and initialisation unless asked
    assert defaults.color_guide_init == 0.0 and not defaults.passthrough_init and not defaults.normalize_kernel
    assert (defaults.dataset, defaults.factor, defaults.lr, defaults.epochs, defaults.train_crop) == \
        ('NYUDepthV2', 8, 1e-4, 0, 256)


def test_color_guide_init_applies_to_pac_models_only():
    def build(argv):
        torch.manual_seed(0)
        return joint_main.build_model(joint_main.parse_args(argv), channels=1)

    def default_init(name, factor):
        torch.manual_seed(0)
        return joint_main.create_model(name, factor)

    def same_weights(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    guide = torch.rand(1, 3, 16, 16)
    for model in ('PacJointUpsample', 'PacJointUpsampleLite'):
        net = build(['--model', model, '--factor', '4', '--color-guide-init', '10'])
        # (features one pixel right and down: where x4 'center' sampling took the low-res pixels)
        torch.testing.assert_close(net.branch_g(guide)[:, :3, :-1, :-1], 10 * guide[..., 1:, 1:])
        assert same_weights(build(['--model', model, '--factor', '4']), default_init(model, 4))
    assert same_weights(build(['--model', 'DJIF', '--color-guide-init', '10']), default_init('DJIF', 8))


def test_normalize_kernel_flag_builds_normalised_pac_models(monkeypatch):
    for model in ('PacJointUpsample', 'PacJointUpsampleLite'):
        for argv, expected in (([], False), (['--normalize-kernel'], True)):
            net = joint_main.build_model(joint_main.parse_args(['--model', model, '--factor', '4'] + argv), 1)
            assert [convt.normalize_kernel for convt in net.up_convts] == [expected] * 2
    djif = joint_main.build_model(joint_main.parse_args(['--model', 'DJIF', '--normalize-kernel']), 1)
    assert sum(p.numel() for p in djif.parameters()) == 56_323  # other models have no such option
    # the released weights were trained unnormalised: a normalised model refuses them before any download
    import weights
    monkeypatch.setattr(weights, 'load_state_dict', lambda spec: pytest.fail('must not load'))
    net = joint_main.create_model('PacJointUpsample', 8, normalize_kernel=True)
    with pytest.raises(ValueError, match='without normalised kernels; drop --normalize-kernel'):
        joint_main.load_weights(net, 'x8_pac', joint_main.DATASETS['NYUDepthV2'])


def test_sintel_flow_evaluation_with_resized_guide(http_server, monkeypatch, tmp_path):
    from test_joint_data import make_tiny_sintel_zip
    zip_path = tmp_path / 'MPI-Sintel-complete.zip'
    md5 = make_tiny_sintel_zip(zip_path, tmp_path)
    (http_server.root / 'sintel.zip').write_bytes(zip_path.read_bytes())
    monkeypatch.setattr(Sintel, 'url', http_server.url('sintel.zip'))
    monkeypatch.setattr(Sintel, 'md5', md5)
    # 4 x 6 frames at x4: the low-res flow is 1 x 2, the net runs at 4 x 8 and its output is resized to 4 x 6
    result = joint_main.main(['--dataset', 'Sintel', '--factor', '4', '--model', 'Bilinear', '--data-root',
                              str(tmp_path / 'sintel'), '--download', '--num-data-worker', '0', '--exp-root',
                              str(tmp_path / 'exp'), '--save-images', '1', '--test-batch-size', '7'])
    # every flow field is constant (u = pair index, v = -1), so bilinear upsampling is exact
    assert result['epe'] == pytest.approx(0.0, abs=1e-4)
    assert (tmp_path / 'exp' / 'images_test' / '0000_pred.png').is_file()


@pytest.mark.slow  # the README's demo as it runs (about 4 minutes)
def test_demo_ranks_as_the_readme_says(tmp_path):
    rows = joint_main.main(['--demo', '--exp-root', str(tmp_path)])
    assert [row['model'] for row in rows][::2] == ['Bilinear', 'DJIF'] and rows[1]['model'].startswith('JBU_')
    jbu = rows[1]['model']
    for column in ('rmse', 'rmse heldout'):  # family A's test scenes, the held-out family B
        error = {row['model']: row[column] for row in rows}
        # the README: in five minutes PacJointUpsample is below the best hand-set JBU, DJIF and Bilinear
        assert error['PacJointUpsample'] < min(error[jbu], error['DJIF']) and max(error[jbu], error['DJIF']) < \
            error['Bilinear']
    assert (tmp_path / 'compare.png').is_file() and (tmp_path / 'results.txt').is_file()
