"""Both task programs under torchrun: two CPU processes (gloo) train on Synthetic data. Checked: the run finishes,
rank 0 writes each log row once, every rank ends with the same weights (the harness compares their digests and
prints it; here it is checked against the saved snapshot), the test measures of the sharded test set equal a
one-process test of the saved weights, and a second torchrun resumes."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from task_jointUpsampling import main as joint_main
from task_semanticSegmentation import main as seg_main
from tools.experiment import weights_digest
from tools.runtime import read_csv_log

REPO = Path(__file__).resolve().parent.parent
# 3 test samples: rank 0 tests two, rank 1 one (a padded sampler would count one twice)
JOINT = ['--dataset', 'Synthetic', '--factor', '4', '--model', 'PacJointUpsampleLite', '--synthetic-size', '24',
         '--synthetic-samples', '8', '3', '--train-crop', '16', '--batch-size', '2', '--test-batch-size', '2',
         '--num-data-worker', '0', '--log-interval', '1', '--test-interval', '1', '--lr', '1e-3', '--device', 'cpu',
         '--snapshot-interval', '1']
SEG = ['--dataset', 'Synthetic', '--model', 'tinyfcn', '--device', 'cpu', '--num-data-worker', '0', '--num-threads',
       '1', '--train-crop', '24', '--test-crop', '-1', '--batch-size', '2', '--seed', '0', '--train-split',
       'train_rand6', '--test-split', 'val_rand3', '--log-interval', '1']

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def torchrun(module: str, *args: str) -> str:
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    env.pop('PACNET_DEBUG', None)
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr', '127.0.0.1',
               '--master_port', str(free_port()), '-m', module, '--debug', *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def check_weights_and_logs(out: str, exp: Path, epochs: int) -> None:
    digests = re.findall(r'all 2 ranks hold the same weights \(sha256 ([0-9a-f]{64})\)', out)
    assert len(digests) == 1  # printed once, by rank 0
    weights = torch.load(exp / f'weights_epoch_{epochs}.pth', weights_only=True)
    assert digests[0] == weights_digest(weights)
    test_log = read_csv_log(exp / 'test.log')
    assert test_log['epoch'] == list(range(epochs + 1))  # each row once: only rank 0 writes
    train_epochs = read_csv_log(exp / 'train.log')['epoch']
    assert train_epochs == sorted(set(train_epochs)) and train_epochs[-1] == epochs


def test_joint_upsampling_under_torchrun(tmp_path):
    exp = tmp_path / 'exp'
    torchrun('task_jointUpsampling.main', *JOINT, '--epochs', '1', '--exp-root', str(exp))
    out = torchrun('task_jointUpsampling.main', *JOINT, '--epochs', '2', '--exp-root', str(exp))
    assert out.count('resuming after epoch 1') == 1
    check_weights_and_logs(out, exp, 2)
    logged = read_csv_log(exp / 'test.log')
    one_process = joint_main.main(JOINT + ['--epochs', '0', '--exp-root', str(exp)])  # tests weights_epoch_2
    assert logged['rmse'][-1] == pytest.approx(one_process['rmse'], rel=1e-6, abs=2e-6)
    assert logged['loss'][-1] == pytest.approx(one_process['loss'], rel=1e-6, abs=2e-6)


def test_segmentation_under_torchrun(tmp_path):
    exp = tmp_path / 'exp'
    out = torchrun('task_semanticSegmentation.main', *SEG, '--epochs', '2', '--exp-root', str(exp))
    check_weights_and_logs(out, exp, 2)
    logged = read_csv_log(exp / 'test.log')
    threads = torch.get_num_threads()
    try:
        one_process = seg_main.main(SEG + ['--epochs', '0', '--exp-root', str(exp)])
    finally:
        torch.set_num_threads(threads)
    for measure in ('miou', 'acc', 'macc'):
        assert logged[measure][-1] == pytest.approx(one_process[measure], abs=2e-6)
