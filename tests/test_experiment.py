"""The shared harness (tools/experiment.py) as both task programs use it: the 2019 learning-rate schedule, resume
of old segmentation optimizer files, --seed -1, config.json and the one --load-weights policy."""
import json

import pytest
import torch

from task_jointUpsampling import main as joint_main
from task_semanticSegmentation import main as seg_main
from tools import experiment
from tools.runtime import read_csv_log

JOINT = ['--dataset', 'Synthetic', '--factor', '4', '--model', 'PacJointUpsampleLite', '--synthetic-size', '24',
         '--synthetic-samples', '4', '2', '--train-crop', '16', '--batch-size', '2', '--test-batch-size', '2',
         '--num-data-worker', '0', '--log-interval', '2', '--test-interval', '1', '--device', 'cpu']
SEG = ['--dataset', 'Synthetic', '--model', 'tinyfcn', '--device', 'cpu', '--num-data-worker', '0', '--num-threads',
       '1', '--train-crop', '24', '--test-crop', '-1', '--batch-size', '2', '--seed', '0', '--train-split',
       'train_rand2', '--test-split', 'val_rand2']
PROGRAMS = {'joint': (joint_main.main, JOINT), 'seg': (seg_main.main, SEG)}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # --num-threads changes the process-wide setting
    yield
    torch.set_num_threads(threads)


def lr_by_epoch(log: dict) -> dict:
    """{epoch: lr} of a train.log (the rows of an epoch share its lr) or a test.log."""
    return {int(-(-epoch // 1)): lr for epoch, lr in zip(log['epoch'], log['lr'])}


def test_the_2019_schedule():
    # reference-behaviour 3.3 / 4.4: scheduler.step() before each epoch, so epoch e trains with
    # lr * 0.1 ** (number of milestones <= e)
    assert experiment.lr_schedule(1.0, [2, 4], 5) == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])
    assert experiment.lr_schedule(1.0, None, 2) == [1, 1]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = experiment.make_scheduler(optimizer, [2, 4])
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(experiment.lr_schedule(1.0, [2, 4], 5))


@pytest.mark.parametrize('program', sorted(PROGRAMS))
def test_lr_at_each_epoch_is_the_2019_one_also_when_resumed(tmp_path, program):
    main, base = PROGRAMS[program]
    flags = base + ['--lr', '1e-3', '--lr-steps', '2', '3', '--snapshot-interval', '1']
    expected = {1: 1e-3, 2: 1e-4, 3: 1e-5}
    main(flags + ['--epochs', '3', '--exp-root', str(tmp_path / 'straight')])
    main(flags + ['--epochs', '1', '--exp-root', str(tmp_path / 'resumed')])
    main(flags + ['--epochs', '3', '--exp-root', str(tmp_path / 'resumed')])
    for exp in ('straight', 'resumed'):
        assert lr_by_epoch(read_csv_log(tmp_path / exp / 'train.log')) == pytest.approx(expected)
        # test rows: the lr the epoch trained with (epoch 0: the initial lr)
        assert lr_by_epoch(read_csv_log(tmp_path / exp / 'test.log')) == pytest.approx({0: 1e-3, **expected})


def test_a_2019_segmentation_optimizer_file_resumes_on_schedule(tmp_path):
    exp = tmp_path / 'exp'
    flags = SEG + ['--lr', '1e-3', '--lr-steps', '2', '3', '--exp-root', str(exp)]
    seg_main.main(flags + ['--epochs', '1'])
    state = torch.load(exp / 'adam_epoch_1.pth', weights_only=True)
    assert {'epoch', 'model', 'optimizer', 'scheduler', 'rng'} <= set(state)
    optimizer_state = state['optimizer']
    for group in optimizer_state['param_groups']:
        group['lr'] = 1e-3  # the 2019 file: the bare optimizer state, holding the lr epoch 1 trained with
    torch.save(optimizer_state, exp / 'adam_epoch_1.pth')
    seg_main.main(flags + ['--epochs', '3'])
    assert lr_by_epoch(read_csv_log(exp / 'train.log')) == pytest.approx({1: 1e-3, 2: 1e-4, 3: 1e-5})


def test_seed_minus_one_draws_a_32_bit_seed_saved_in_config_json(tmp_path, capsys):
    draws = {experiment.resolve_seed(-1) for _ in range(20)}
    assert all(0 <= d < 2 ** 32 for d in draws) and max(draws) >= 2 ** 16  # not one of 256 values
    assert experiment.resolve_seed(7) == 7
    for name, (main, base) in PROGRAMS.items():
        exp = tmp_path / name
        main(base + ['--seed', '-1', '--epochs', '1', '--exp-root', str(exp)])  # the last --seed wins
        config = json.loads((exp / 'config.json').read_text())
        assert 0 <= config['seed'] < 2 ** 32 and f'seed {config["seed"]}' in capsys.readouterr().out
        assert config['epochs'] == 1 and config['exp_root'] == str(exp) and config['world_size'] == 1


@pytest.mark.parametrize('program', sorted(PROGRAMS))
def test_load_weights_with_snapshots_to_resume_is_an_error(tmp_path, program):
    main, base = PROGRAMS[program]
    exp = tmp_path / 'exp'
    main(base + ['--epochs', '1', '--exp-root', str(exp)])
    weights = tmp_path / 'copy.pth'
    weights.write_bytes((exp / 'weights_epoch_1.pth').read_bytes())
    with pytest.raises(ValueError, match='already holds snapshots to resume from; pass --overwrite'):
        main(base + ['--epochs', '2', '--exp-root', str(exp), '--load-weights', str(weights)])
    main(base + ['--epochs', '1', '--exp-root', str(exp), '--load-weights', str(weights), '--overwrite'])
