"""Faults and bad input: each test names the fault it provokes (the README's "Faults and bad input" table).

Downloads run against the local HTTP server of conftest.py (127.0.0.1); interrupted writes and full disks are
simulated by monkeypatching; the CLI tests run the task programs as subprocesses.
"""
import errno
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import tools.runtime as runtime
import weights
from task_jointUpsampling import main as joint_main
from task_semanticSegmentation import main as seg_main
from task_semanticSegmentation.models import create_model as create_seg_model
from tools.cli import error_lines, run_cli
from tools.download import FormatError, check_format, download_url
from tools.runtime import (CheckpointError, atomic_open, atomic_save, load_checkpoint_state, read_csv_log,
                           save_checkpoint)

REPO = Path(__file__).resolve().parent.parent
JOINT = ['--dataset', 'Synthetic', '--factor', '4', '--model', 'PacJointUpsampleLite', '--synthetic-size', '24',
         '--synthetic-samples', '4', '2', '--train-crop', '16', '--batch-size', '2', '--test-batch-size', '2',
         '--num-data-worker', '0', '--log-interval', '2', '--test-interval', '1', '--lr', '1e-3', '--device', 'cpu']
SEG = ['--dataset', 'Synthetic', '--device', 'cpu', '--num-data-worker', '0', '--num-threads', '1',
       '--train-crop', '24', '--test-crop', '-1', '--batch-size', '2', '--seed', '0', '--train-split', 'train_rand2',
       '--test-split', 'val_rand2']

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # seg main --num-threads changes the process-wide setting
    yield
    torch.set_num_threads(threads)


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def tar_bytes(files: dict, mode: str = 'w') -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


WEIGHTS = torch_bytes({'w': torch.arange(5000.0)})  # about 21 kB, a zip-format torch file


# ------------------------------------------------------------------------------------------------ downloads
def test_half_a_body_without_content_length_is_not_cached(http_server, tmp_path):
    (http_server.root / 'w.pth').write_bytes(WEIGHTS)
    http_server.omit_length('w.pth')
    http_server.fail_after('w.pth', len(WEIGHTS) // 2)
    with pytest.raises(FormatError, match='not a valid file'):
        download_url(http_server.url('w.pth'), tmp_path / 'dl', progress=False)
    assert list((tmp_path / 'dl').iterdir()) == []  # nothing under the final name, no .part either
    path = download_url(http_server.url('w.pth'), tmp_path / 'dl', progress=False)
    assert path.read_bytes() == WEIGHTS


def test_an_html_page_is_not_cached_as_weights(http_server, tmp_path):
    (http_server.root / 'w.pth').write_bytes(b'<html><body>Quota exceeded</body></html>')
    with pytest.raises(FormatError, match='torch.load fails'):  # status 200, octet-stream: the format check decides
        download_url(http_server.url('w.pth'), tmp_path / 'dl', progress=False)
    http_server.content_type('w.pth', 'text/html; charset=utf-8')
    with pytest.raises(OSError, match='HTML page'):
        download_url(http_server.url('w.pth'), tmp_path / 'dl', progress=False)
    assert not (tmp_path / 'dl' / 'w.pth').exists()


def test_a_truncated_mirror_file_is_refused(http_server, tmp_path):
    archive = tar_bytes({'a/b.txt': b'x' * 5000, 'a/c.txt': b'y' * 5000})
    (http_server.root / 'data.tar').write_bytes(archive[:7000])  # the server's length matches its short file
    with pytest.raises(FormatError, match='tar archive'):
        download_url(http_server.url('data.tar'), tmp_path / 'dl', progress=False)
    assert not (tmp_path / 'dl' / 'data.tar').exists()



def test_a_truncated_safetensors_download_is_refused(http_server, tmp_path):
    safetensors_torch = pytest.importorskip('safetensors.torch')
    data = safetensors_torch.save({'w': torch.arange(5000.0)})
    (http_server.root / 'w.safetensors').write_bytes(data[:-100])  # the server's length matches its short file
    cache = tmp_path / 'cache'
    with pytest.raises(FormatError, match='truncated safetensors file'):
        weights.resolve_weights(http_server.url('w.safetensors'), cache)
    assert not [p for p in cache.rglob('*') if p.is_file()]  # nothing cached, no .part either
    (http_server.root / 'w.safetensors').write_bytes(data)
    assert torch.equal(weights.load_state_dict(http_server.url('w.safetensors'), cache)['w'], torch.arange(5000.0))

def test_a_bad_cached_file_is_named_and_downloaded_again(http_server, tmp_path, capsys):
    (http_server.root / 'w.pth').write_bytes(WEIGHTS)
    cached = tmp_path / 'dl' / 'w.pth'
    cached.parent.mkdir()
    cached.write_bytes(WEIGHTS[:1000])  # e.g. cached by an earlier version from a broken transfer
    assert download_url(http_server.url('w.pth'), tmp_path / 'dl', progress=False).read_bytes() == WEIGHTS
    assert f'{cached} exists but is damaged' in capsys.readouterr().out
    assert len(http_server.requests) == 1
    download_url(http_server.url('w.pth'), tmp_path / 'dl', progress=False)  # now verified: no new request
    assert len(http_server.requests) == 1


def test_registry_weights_without_checksum_are_verified_and_no_hash_is_offered(http_server, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.setenv('PACNET_WEIGHTS_URL', http_server.url(''))
    monkeypatch.setenv('PACNET_CACHE', str(tmp_path / 'cache'))
    served = http_server.root / 'depth_upsampling' / 'x8_pac_weights_epoch_5000.pth'
    served.parent.mkdir()
    served.write_bytes(WEIGHTS[:len(WEIGHTS) - 100])
    with pytest.raises(FormatError):
        weights.resolve_weights('depth_x8_pac')
    served.write_bytes(WEIGHTS)
    assert weights.load_state_dict('depth_x8_pac')['w'].shape == (5000,)
    assert 'sha256' not in capsys.readouterr().out


@pytest.mark.parametrize('mode', ['w', 'w:gz', 'w:bz2', 'w:xz'])
def test_check_format_finds_cut_archives(tmp_path, mode):
    data = tar_bytes({'a.bin': np.random.default_rng(0).bytes(20000)}, mode)
    path = tmp_path / 'a.tar'
    path.write_bytes(data)
    check_format(path, 'tar')
    path.write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(FormatError):
        check_format(path, 'tar')


def test_check_format_other_kinds(tmp_path):
    path = tmp_path / 'f'
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as zf:
        zf.writestr('x.txt', 'hello' * 100)
    path.write_bytes(buffer.getvalue()[:-30])  # the central directory is at the end
    with pytest.raises(FormatError, match='zip'):
        check_format(path, 'zip')
    path.write_bytes(b'')
    with pytest.raises(FormatError, match='empty'):
        check_format(path, 'torch')
    path.write_bytes(b'<html>not found</html>')
    with pytest.raises(FormatError, match='MATLAB'):
        check_format(path, 'mat')
    legacy = tmp_path / 'legacy.pth'
    torch.save({'w': torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    check_format(legacy, 'torch')
    legacy.write_bytes(legacy.read_bytes()[:-8])
    with pytest.raises(FormatError, match='torch.load fails'):
        check_format(legacy, 'torch')
    with pytest.raises(ValueError, match='kind'):
        check_format(legacy, 'png')



def test_check_format_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip('safetensors.torch')
    data = safetensors_torch.save({'a': torch.ones(3, 4), 'b': torch.arange(7)}, metadata={'note': 'x'})
    path = tmp_path / 'w.safetensors'
    path.write_bytes(data)
    check_format(path)  # the kind comes from the suffix
    for bad, message in ((data[:-1], 'truncated'), (data + b'\0', 'truncated'), (data[:20], 'header'),
                         (b'<html>not found</html>', 'header'), (b'\x04\0\0\0\0\0\0\0[1] ', 'JSON object'),
                         (b'\x02\0\0\0\0\0\0\0{]', 'not JSON')):
        path.write_bytes(bad)
        with pytest.raises(FormatError, match=message):
            check_format(path, 'safetensors')

def test_a_wrong_voc2011_tar_is_named_and_deleted(http_server, tmp_path, monkeypatch):
    import json

    from task_semanticSegmentation import datasets
    (http_server.root / 'voc2011.tar').write_bytes(tar_bytes({'other/file.txt': b'not the lists'}))
    manifest = datasets.voc11_manifest()
    manifest['sources']['voc2011_tar']['url'] = http_server.url('voc2011.tar')
    manifest_path = tmp_path / 'manifest.json'
    manifest_path.write_text(json.dumps(manifest))
    monkeypatch.setattr(datasets, 'MANIFEST_PATH', manifest_path)
    with pytest.raises(ValueError, match=r'voc2011.tar is not the VOC2011 trainval tar.*deleted'):
        datasets.fetch_voc11_lists(tmp_path / 'lists', progress=False)
    assert not (tmp_path / 'lists' / 'voc2011.tar').exists()


# ------------------------------------------------------------------------------------------------ weights
def test_text_and_empty_files_as_weights_get_clear_messages(tmp_path):
    text = tmp_path / 'notes.pth'
    text.write_text('these are not weights\n')
    with pytest.raises(ValueError, match=f'{text}: not a readable PyTorch weights file'):
        weights.load_state_dict(str(text))
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(ValueError, match=f'{empty}: an empty file'):
        weights.load_state_dict(str(empty))



def test_a_damaged_safetensors_file_gets_a_clear_message(tmp_path):
    safetensors_torch = pytest.importorskip('safetensors.torch')
    path = tmp_path / 'w.safetensors'
    path.write_bytes(safetensors_torch.save({'w': torch.ones(100)})[:-10])
    with pytest.raises(ValueError, match=f'{path}: not a readable safetensors weights file'):
        weights.load_state_dict(str(path))
    path.write_bytes(b'')
    with pytest.raises(ValueError, match=f'{path}: an empty file'):
        weights.load_state_dict(str(path))

def test_weights_of_the_wrong_task_are_an_error_even_non_strict(tmp_path):
    seg_file = tmp_path / 'seg.pth'
    torch.save(create_seg_model('tinyfcn', 21).state_dict(), seg_file)
    for extra in ([], ['--non-strict']):
        with pytest.raises(ValueError, match='--load-weights .*(strict weight loading failed|none of the)'):
            joint_main.main(JOINT + ['--exp-root', str(tmp_path / 'j'), '--load-weights', str(seg_file), *extra])
    joint_file = tmp_path / 'joint.pth'
    torch.save(joint_main.create_model('PacJointUpsampleLite', 4).state_dict(), joint_file)
    for extra in ([], ['--non-strict']):
        with pytest.raises(ValueError, match='(strict weight loading failed|none of the)'):
            seg_main.main(SEG + ['--model', 'tinyfcn', '--exp-root', str(tmp_path / 's'),
                                 '--load-weights', str(joint_file), *extra])


def test_non_strict_loads_what_fits_only_when_asked(tmp_path, capsys):
    partial = create_seg_model('tinyfcn', 21).state_dict()
    partial.pop(next(iter(partial)))
    path = tmp_path / 'partial.pth'
    torch.save(partial, path)
    args = SEG + ['--model', 'tinyfcn', '--exp-root', str(tmp_path / 's'), '--load-weights', str(path)]
    with pytest.raises(ValueError, match='1 missing'):
        seg_main.main(args)
    seg_main.main(args + ['--non-strict'])
    assert '1 missing keys' in capsys.readouterr().out


@pytest.fixture(scope='module')
def frozen_snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp('frozen')
    backbone = root / 'backbone.pth'
    torch.manual_seed(0)
    torch.save(create_seg_model('tinyfcn', 21).state_dict(), backbone)
    seg_main.main(SEG + ['--model', 'tinyfcnfrozen_crfi2p4d311', '--load-weights-backbone', str(backbone),
                         '--epochs', '1', '--exp-root', str(root / 'exp')])
    return root


def test_a_frozen_backbone_snapshot_without_its_backbone_is_an_error(frozen_snapshot):
    exp = frozen_snapshot / 'exp'
    for epochs in ('0', '2'):  # test it, or resume it
        with pytest.raises(ValueError, match='frozen backbone, but no --load-weights-backbone'):
            seg_main.main(SEG + ['--model', 'tinyfcnfrozen_crfi2p4d311', '--epochs', epochs, '--exp-root', str(exp)])
    with pytest.raises(ValueError, match='no backbone.* keys: a snapshot of a frozen backbone'):
        seg_main.main(SEG + ['--model', 'tinyfcn_crfi2p4d311', '--exp-root', str(frozen_snapshot / 'other'),
                             '--load-weights', str(exp / 'weights_epoch_1.pth')])
    assert sorted(p.name for p in exp.glob('*.pth')) == ['adam_epoch_1.pth', 'weights_epoch_1.pth']


# ------------------------------------------------------------------------------------------------ reruns
def test_overwrite_refuses_to_delete_the_load_weights_file(tmp_path):
    exp = tmp_path / 'exp'
    joint_main.main(JOINT + ['--epochs', '1', '--exp-root', str(exp)])
    snapshot = exp / 'weights_epoch_1.pth'
    with pytest.raises(ValueError, match='--overwrite would delete'):
        joint_main.main(JOINT + ['--epochs', '1', '--exp-root', str(exp), '--overwrite', '--load-weights',
                                 str(snapshot)])
    assert snapshot.is_file()
    seg_exp = tmp_path / 'seg'
    seg_main.main(SEG + ['--model', 'tinyfcn', '--epochs', '1', '--exp-root', str(seg_exp)])
    with pytest.raises(ValueError, match='--overwrite would delete'):
        seg_main.main(SEG + ['--model', 'tinyfcn', '--epochs', '1', '--exp-root', str(seg_exp), '--overwrite',
                             '--load-weights', str(seg_exp / 'weights_epoch_1.pth')])


def _only_snapshot_at_epoch_3(exp: Path, prefixes) -> None:
    """Rename the epoch-1 snapshot files to epoch 3 (a folder whose only snapshot is of a later epoch)."""
    for prefix in prefixes:
        (exp / f'{prefix}1.pth').rename(exp / f'{prefix}3.pth')


def test_a_rerun_with_fewer_epochs_never_truncates_later_logs(tmp_path):
    exp = tmp_path / 'joint'
    joint_main.main(JOINT + ['--epochs', '1', '--exp-root', str(exp)])
    _only_snapshot_at_epoch_3(exp, ('weights_epoch_', 'state_epoch_'))
    logs = {name: (exp / name).read_text() for name in ('train.log', 'test.log')}
    with pytest.raises(ValueError, match='snapshots of later epochs'):
        joint_main.main(JOINT + ['--epochs', '2', '--exp-root', str(exp)])
    assert {name: (exp / name).read_text() for name in logs} == logs
    seg_exp = tmp_path / 'seg'
    seg_main.main(SEG + ['--model', 'tinyfcn', '--epochs', '1', '--exp-root', str(seg_exp)])
    _only_snapshot_at_epoch_3(seg_exp, ('weights_epoch_', 'adam_epoch_'))
    logs = {name: (seg_exp / name).read_text() for name in ('train.log', 'test.log')}
    with pytest.raises(ValueError, match='snapshots of later epochs'):
        seg_main.main(SEG + ['--model', 'tinyfcn', '--epochs', '2', '--exp-root', str(seg_exp)])
    assert {name: (seg_exp / name).read_text() for name in logs} == logs


def test_test_only_compare_writes_next_to_the_training_results(tmp_path, capsys):
    demo = ['--demo', *JOINT, '--exp-root', str(tmp_path), '--compare', 'Bilinear', 'DJIF']
    with pytest.raises(ValueError, match='DJIF: nothing to test'):  # --demo --epochs 0 before any training
        joint_main.main(demo + ['--epochs', '0'])
    assert not (tmp_path / 'results.txt').exists() and not (tmp_path / 'results_test.txt').exists()
    trained = {row['model']: row['rmse'] for row in joint_main.main(demo + ['--epochs', '1'])}
    results, figure = (tmp_path / 'results.txt').read_bytes(), (tmp_path / 'compare.png').read_bytes()
    capsys.readouterr()
    tested = {row['model']: row['rmse'] for row in joint_main.main(demo + ['--epochs', '0'])}
    assert tested == pytest.approx(trained, rel=1e-6)  # the snapshot, not random weights
    assert 'no snapshot' not in capsys.readouterr().out
    joint_main.main(['--demo', *JOINT, '--exp-root', str(tmp_path), '--compare', 'JBU_5_30_0.3', '--epochs', '0'])
    assert (tmp_path / 'results.txt').read_bytes() == results and (tmp_path / 'compare.png').read_bytes() == figure
    assert 'JBU_5_30_0.3' in (tmp_path / 'results_test.txt').read_text()
    assert (tmp_path / 'compare_test.png').is_file()


# ------------------------------------------------------------------------------------------------ checkpoints
def _kill_before_weights(monkeypatch, epoch: int, left_temp: bool = True):
    """Simulate a kill right after the state of ``epoch`` is written (and before its weights file)."""
    real = runtime.write_bytes_atomic

    def write(data, path):
        if Path(path).name == f'weights_epoch_{epoch}.pth':
            if left_temp:  # what a kill inside atomic_open leaves: a temp file beside the target
                (Path(path).parent / f'.{Path(path).name}.abc123.tmp').write_bytes(data[:100])
            raise KeyboardInterrupt
        return real(data, path)

    monkeypatch.setattr(runtime, 'write_bytes_atomic', write)


def test_a_kill_between_the_checkpoint_writes_resumes_exactly(tmp_path, monkeypatch, capsys):
    straight = joint_main.main(JOINT + ['--epochs', '2', '--snapshot-interval', '1', '--exp-root',
                                        str(tmp_path / 'straight')])
    exp = tmp_path / 'killed'
    with monkeypatch.context() as patch:
        _kill_before_weights(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            joint_main.main(JOINT + ['--epochs', '2', '--snapshot-interval', '1', '--exp-root', str(exp)])
    assert (exp / 'state_epoch_2.pth').is_file() and not (exp / 'weights_epoch_2.pth').exists()
    resumed = joint_main.main(JOINT + ['--epochs', '2', '--snapshot-interval', '1', '--exp-root', str(exp)])
    out = capsys.readouterr().out
    assert 'resuming after epoch 1' in out and 'left by an interrupted write' in out
    assert resumed['rmse'] == straight['rmse']
    assert not list(exp.glob('.*.tmp'))
    a, b = (torch.load(root / 'weights_epoch_2.pth', weights_only=True) for root in (tmp_path / 'straight', exp))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_snapshot_without_its_own_state_is_not_resumed(tmp_path):
    exp = tmp_path / 'exp'
    joint_main.main(JOINT + ['--epochs', '1', '--exp-root', str(exp)])
    joint_main.main(JOINT + ['--epochs', '2', '--exp-root', str(tmp_path / 'other')])
    (tmp_path / 'other' / 'state_epoch_2.pth').replace(exp / 'state_epoch_1.pth')  # another run's state
    with pytest.raises(ValueError, match='written with other weights'):
        joint_main.main(JOINT + ['--epochs', '2', '--exp-root', str(exp)])
    (exp / 'state_epoch_1.pth').unlink()
    with pytest.raises(ValueError, match='has no training state'):
        joint_main.main(JOINT + ['--epochs', '2', '--exp-root', str(exp)])
    seg_exp = tmp_path / 'seg'
    seg_main.main(SEG + ['--model', 'tinyfcn', '--epochs', '1', '--exp-root', str(seg_exp)])
    with pytest.raises(ValueError, match='has no training state sgd_epoch_1.pth'):
        seg_main.main(SEG + ['--model', 'tinyfcn', '--epochs', '2', '--optimizer', 'SGD', '--exp-root', str(seg_exp)])


def test_save_checkpoint_writes_the_state_first_and_checks_the_pair(tmp_path):
    weights_path, state_path = tmp_path / 'weights_epoch_1.pth', tmp_path / 'state_epoch_1.pth'
    save_checkpoint({'w': torch.ones(2)}, {'epoch': 1}, weights_path, state_path)
    assert load_checkpoint_state(weights_path, state_path)['epoch'] == 1
    assert torch.load(weights_path, weights_only=True).keys() == {'w'}  # the released-weights format
    atomic_save({'w': torch.zeros(2)}, weights_path)
    with pytest.raises(CheckpointError, match='other weights'):
        load_checkpoint_state(weights_path, state_path)



def test_save_checkpoint_hashes_the_safetensors_bytes_it_writes(tmp_path):
    safetensors_torch = pytest.importorskip('safetensors.torch')
    weights_path, state_path = tmp_path / 'weights_epoch_1.safetensors', tmp_path / 'state_epoch_1.pth'
    save_checkpoint({'w': torch.ones(2)}, {'epoch': 1}, weights_path, state_path)
    assert torch.equal(safetensors_torch.load_file(str(weights_path))['w'], torch.ones(2))  # really safetensors
    assert load_checkpoint_state(weights_path, state_path)['epoch'] == 1
    weights.save_state_dict({'w': torch.zeros(2)}, weights_path)
    with pytest.raises(CheckpointError, match='other weights'):
        load_checkpoint_state(weights_path, state_path)


def test_a_safetensors_snapshot_is_resumed_only_with_its_own_state(tmp_path, capsys):
    pytest.importorskip('safetensors')
    st = ['--save-format', 'safetensors']
    exp, other = tmp_path / 'exp', tmp_path / 'other'
    joint_main.main(JOINT + st + ['--epochs', '1', '--exp-root', str(exp)])
    joint_main.main(JOINT + st + ['--epochs', '1', '--seed', '2', '--exp-root', str(other)])
    own = (exp / 'weights_epoch_1.safetensors').read_bytes()
    (other / 'weights_epoch_1.safetensors').replace(exp / 'weights_epoch_1.safetensors')  # another run's weights
    with pytest.raises(ValueError, match='written with other weights'):
        joint_main.main(JOINT + st + ['--epochs', '2', '--exp-root', str(exp)])
    (exp / 'weights_epoch_1.safetensors').write_bytes(own)
    joint_main.main(JOINT + st + ['--epochs', '2', '--exp-root', str(exp)])
    assert 'resuming after epoch 1' in capsys.readouterr().out

    seg_exp = tmp_path / 'seg'
    seg_main.main(SEG + st + ['--model', 'tinyfcn', '--epochs', '1', '--exp-root', str(seg_exp)])
    seg_main.main(SEG + st + ['--model', 'tinyfcn', '--epochs', '2', '--exp-root', str(seg_exp)])
    assert 'optimizer state loaded' in capsys.readouterr().out
    assert sorted(p.name for p in seg_exp.glob('*_epoch_*')) == [
        'adam_epoch_1.pth', 'adam_epoch_2.pth', 'weights_epoch_1.safetensors', 'weights_epoch_2.safetensors']
    (seg_exp / 'weights_epoch_1.safetensors').replace(seg_exp / 'weights_epoch_2.safetensors')
    with pytest.raises(ValueError, match='cannot resume: .*written with other weights'):
        seg_main.main(SEG + st + ['--model', 'tinyfcn', '--epochs', '3', '--exp-root', str(seg_exp)])

# ------------------------------------------------------------------------------------------------ files
def test_atomic_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_save({'w': torch.ones(1)}, tmp_path / 'a.pth')
        os.umask(0o077)
        with atomic_open(tmp_path / 'b.txt', 'w') as handle:
            handle.write('x')
    finally:
        os.umask(previous)
    assert (tmp_path / 'a.pth').stat().st_mode & 0o777 == 0o644
    assert (tmp_path / 'b.txt').stat().st_mode & 0o777 == 0o600


def test_a_full_disk_is_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / 'weights_epoch_1.pth'
    atomic_save({'w': torch.ones(1)}, target)
    before = target.read_bytes()
    real_fdopen = os.fdopen

    class FullDisk(io.RawIOBase):
        def __init__(self, fd):
            self.fd = fd

        def writable(self):
            return True

        def write(self, data):
            raise OSError(errno.ENOSPC, 'No space left on device')

        def fileno(self):
            return self.fd

        def close(self):
            os.close(self.fd)
            super().close()

    monkeypatch.setattr(runtime.os, 'fdopen', lambda fd, mode: FullDisk(fd))
    with pytest.raises(OSError, match=f'cannot write {target}: No space left on device \\(the disk is full\\)'):
        atomic_save({'w': torch.zeros(1000)}, target)
    monkeypatch.setattr(runtime.os, 'fdopen', real_fdopen)
    assert target.read_bytes() == before and not list(tmp_path.glob('.*.tmp'))


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_an_unwritable_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / 'ro'
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OSError, match=f'cannot write {folder / "x.pth"}'):
            atomic_save({'w': torch.ones(1)}, folder / 'x.pth')
    finally:
        folder.chmod(0o755)


def test_an_exp_root_that_is_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / 'exp'
    blocker.write_text('a file where a folder should be')
    with pytest.raises(OSError, match=f'cannot write {blocker}'):
        atomic_save({'w': torch.ones(1)}, blocker / 'weights_epoch_1.pth')


# ------------------------------------------------------------------------------------------------ early checks
@pytest.mark.parametrize('extra, message', [
    (['--compare', 'DJIF', 'Foo'], "model 'Foo' is unknown"),
    (['--train-crop', '256', '--synthetic-size', '128'], '--train-crop 256 is larger than the Synthetic images'),
    (['--train-crop', '18'], 'multiple of --factor'),
    (['--lr', 'nan'], '--lr must be a finite number'),
    (['--lr', '0'], '--lr must be a finite number > 0'),
    (['--weight-decay', 'inf'], '--weight-decay'),
    (['--val-ratio', '1'], '--val-ratio'),
    (['--synthetic-size', '0'], '--synthetic-size'),
    (['--synthetic-samples', '0', '2'], '--synthetic-samples'),
    (['--snapshot-interval', '-1'], '--snapshot-interval'),
    (['--lr-steps', '0'], '--lr-steps'),
    (['--seed', '-2'], '--seed'),
    (['--compare', 'JBU_4_30_0.3'], 'kernel_size must be odd'),
    (['--compare', 'JBU_5_nan_0.3'], 'scale_color must be a finite number'),
    (['--compare', 'DJIF', 'DJIF'], 'twice'),
])
def test_joint_arguments_are_checked_before_any_work(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        joint_main.main(JOINT + ['--epochs', '1', '--exp-root', str(tmp_path / 'exp'), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 2
    assert not (tmp_path / 'exp').exists()


@pytest.mark.parametrize('extra, message', [
    (['--lr', 'nan'], '--lr must be a finite number'),
    (['--momentum', '-1'], '--momentum'),
    (['--snapshot-interval', '-1'], '--snapshot-interval'),
    (['--lr-steps', '0'], '--lr-steps'),
    (['--load-weights-backbone', 'x.pth'], '--load-weights-backbone is for models with a CRF'),
])
def test_seg_arguments_are_checked_before_any_work(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        seg_main.main(SEG + ['--model', 'tinyfcn', '--epochs', '1', '--exp-root', str(tmp_path / 'exp'), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 2
    assert not (tmp_path / 'exp').exists()


def test_models_reject_bad_values():
    from task_jointUpsampling.models import DJIF, Bilinear, JointBilateral, PacJointUpsample
    from task_semanticSegmentation import fcn8s
    from task_semanticSegmentation.models import ModelWithCrf, TinyFCN
    cases = [(lambda: Bilinear(0), ValueError, 'factor'), (lambda: Bilinear(2.5), TypeError, 'factor'),
             (lambda: DJIF(4, channels=0), ValueError, 'channels'), (lambda: DJIF(True), TypeError, 'factor'),
             (lambda: PacJointUpsample(4, k_ch=0), ValueError, 'k_ch'),
             (lambda: PacJointUpsample(4, n_t_filters=(8, 0, 8)), ValueError, 'n_t_filters'),
             (lambda: JointBilateral(4, 1, 5, scale_space=float('inf'), scale_color=1), ValueError, 'scale_space'),
             (lambda: JointBilateral(4, 1, 5, scale_space=1, scale_color=-1), ValueError, 'scale_color'),
             (lambda: TinyFCN(0), ValueError, 'num_classes'), (lambda: TinyFCN(21, width=0), ValueError, 'width'),
             (lambda: fcn8s.FCN8s(0), ValueError, 'n_class'),
             (lambda: ModelWithCrf(torch.nn.Conv2d(3, 21, 1)), TypeError, 'num_classes attribute'),
             (lambda: ModelWithCrf(TinyFCN(21), num_steps=0), ValueError, 'num_steps')]
    for build, error, name in cases:
        with pytest.raises(error, match=name):
            build()


def test_datasets_and_helpers_reject_bad_values(tmp_path):
    from task_jointUpsampling.datasets import AssembleJointUpsamplingInputs
    from task_jointUpsampling.models import th_epe
    from task_jointUpsampling.synthetic import Synthetic as DepthScenes
    from task_semanticSegmentation.datasets import DeepLabInputs
    from task_semanticSegmentation.metrics import ConfusionMeter
    from task_semanticSegmentation.synthetic import Synthetic as VocScenes
    from tools.runtime import CsvLog
    nan, inf = float('nan'), float('inf')
    cases = [(lambda: DepthScenes(size=nan), 'size'), (lambda: DepthScenes(seed=-1), 'seed'),
             (lambda: DepthScenes(seed=1.5), 'seed'), (lambda: AssembleJointUpsamplingInputs(0), 'factor'),
             (lambda: AssembleJointUpsamplingInputs(2.5), 'factor'), (lambda: VocScenes(size_range=(8, inf)), 'size_range'),
             (lambda: VocScenes(seed=nan), 'seed'), (lambda: DeepLabInputs(8, aug_scale=(0.5, inf)), 'aug_scale'),
             (lambda: DeepLabInputs(8, aug_color=(nan, 0, 0, 0)), 'aug_color'), (lambda: ConfusionMeter(0), 'num_classes'),
             (lambda: th_epe(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), small_flow=nan), 'small_flow'),
             (lambda: CsvLog(tmp_path / 'a.log', ['epoch'], resume_epoch=nan), 'resume_epoch')]
    for build, name in cases:
        with pytest.raises(ValueError, match=name):
            build()


# ------------------------------------------------------------------------------------------------ CLI
def test_run_cli_turns_errors_into_two_lines(capsys, monkeypatch):
    def fails(argv):
        raise ValueError('first line\nsecond line\nthird line')

    monkeypatch.delenv('PACNET_DEBUG', raising=False)
    assert run_cli(fails, 'prog', []) == 1
    assert capsys.readouterr().err.splitlines() == ['prog: error: first line',
                                                    '  second line (+1 more lines) (--debug or PACNET_DEBUG=1 shows '
                                                    'the traceback)']

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_cli(interrupted, 'prog', []) == 130
    with pytest.raises(ValueError):
        run_cli(fails, 'prog', ['--debug'])
    monkeypatch.setenv('PACNET_DEBUG', '1')
    with pytest.raises(ValueError):
        run_cli(fails, 'prog', [])
    assert error_lines(EOFError()) == ['EOFError']
    assert error_lines(IndexError('pop from empty list')) == ['IndexError: pop from empty list']


def _run_program(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, 'OMP_NUM_THREADS': '1'}
    environ.pop('PACNET_DEBUG', None)
    environ.update(env or {})
    return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True, text=True,
                          env=environ, timeout=300)


def test_task_programs_fail_with_short_messages(tmp_path):
    text = tmp_path / 'weights.pth'
    text.write_text('not weights\n')
    joint = _run_program('task_jointUpsampling.main', *JOINT, '--exp-root', str(tmp_path / 'j'),
                         '--load-weights', str(text))
    assert joint.returncode == 1 and 'Traceback' not in joint.stderr
    lines = joint.stderr.strip().splitlines()
    assert len(lines) == 2 and f'{text}: not a readable PyTorch weights file' in lines[0]


@pytest.mark.slow  # another program start (about 10 s on a busy 2-core machine)
def test_the_debug_switch_shows_the_traceback(tmp_path):
    text = tmp_path / 'weights.pth'
    text.write_text('not weights\n')
    seg = _run_program('task_semanticSegmentation.main', *SEG, '--model', 'tinyfcn', '--exp-root',
                       str(tmp_path / 's'), '--load-weights', str(text), env={'PACNET_DEBUG': '1'})
    assert seg.returncode == 1 and 'Traceback' in seg.stderr and 'not a readable PyTorch weights file' in seg.stderr
