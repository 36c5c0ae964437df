"""Train / evaluate segmentation models on PASCAL VOC (or the generated Synthetic set).

Examples (the README commands of the PAC paper)::

    # test the converted caffe FCN-8s on the VOC2011 "seg11valid" split
    python -m task_semanticSegmentation.main --data-root data/voc --exp-root exp/voc --download \\
        --load-weights fcn8s_from_caffe.pth --model fcn8s --test-split val11_sbd --test-crop -1

    # run on a CPU without any download
    python -m task_semanticSegmentation.main --dataset Synthetic --model tinyfcn --epochs 2 --device cpu

Outputs in ``--exp-root``: ``train.log`` / ``test.log`` (CSV), ``weights_epoch_<e>.pth`` (``.safetensors``
with ``--save-format safetensors``) and ``<optimizer>_epoch_<e>.pth`` snapshots (training resumes from them), and
with ``--eval pred|raw`` ``outputs_<split>_<eval>/<id>.png|.npy``.
"""
import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from tools.cli import DEBUG_ENV, ArgumentParser, run_cli
from tools.runtime import (CheckpointError, CsvLog, atomic_open, find_snapshots, load_checkpoint_state,
                           remove_stale_temp_files, resolve_device, save_checkpoint, seed_everything)
from weights import check_save_format, load_into, load_state_dict
from .datasets import DeepLabEvalInputs, DeepLabInputs, PascalVOC, decode_id
from .metrics import MEASURES, ConfusionMeter, make_loss, seg_measures
from .models import GRAMMAR, create_model, parse_model_name, trainable_parameters
from .palette import VOC_CLASSES, save_label_png
from .synthetic import Synthetic

TRAIN_COLUMNS = ['epoch', 'lr', 'time', 'time-data', 'loss', 'loss-avg'] + \
    [name for m in MEASURES for name in (m, f'{m}-avg')]
TRAIN_FORMATS = ['{:.6f}', '{:g}', '{:.3f}', '{:.3f}', '{:.6f}', '{:.6f}'] + ['{:.6f}'] * 2 * len(MEASURES)
TEST_COLUMNS = ['epoch', 'lr', 'time', 'time-data', 'loss'] + list(MEASURES)
TEST_FORMATS = ['{:.6f}', '{:g}', '{:.3f}', '{:.3f}', '{:.6f}'] + ['{:.6f}'] * len(MEASURES)
COLOR_JITTER = (0.1, 0.1, 0.1, 0.01)
DATASETS = ('VOC2012', 'Synthetic')  # both have the 21 VOC classes
NUM_CLASSES = 21


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows the defaults, and the grammar epilog with its line breaks."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='python -m task_semanticSegmentation.main', description='Semantic segmentation',
                       formatter_class=_HelpFormatter, epilog=GRAMMAR)
    p.add_argument('--data-root', type=str, default='data',
                   help="VOC root is <data-root>/VOCdevkit, SBD root <data-root>/benchmark_RELEASE; "
                        "or give 'voc_root,sbd_root'")
    p.add_argument('--exp-root', type=str, default='exp', help='folder of logs, snapshots and outputs')
    p.add_argument('--download', action='store_true', help='download missing data (checksum-verified)')
    p.add_argument('--load-weights', type=str, default='',
                   help='whole-model weights: path, URL or registry name (e.g. fcn8s_from_caffe)')
    p.add_argument('--load-weights-backbone', type=str, default='',
                   help='weights for model.backbone (models with a CRF): path, URL or registry name')
    p.add_argument('--model', type=str, default='fcn8s', help='model name, see the grammar below')
    p.add_argument('--dataset', type=str, default='VOC2012', choices=DATASETS,
                   help='Synthetic: generated scenes, no download, for CPU demos and tests')
    p.add_argument('--num-data-worker', type=int, default=4, help='DataLoader worker processes')
    p.add_argument('--device', type=str, default='auto', help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument('--gpu', type=int, default=None, help='GPU index (same as --device cuda:<gpu>)')
    p.add_argument('--num-threads', type=int, default=0,
                   help='CPU threads of torch (0: torch default); 1 is much faster on a busy machine')
    p.add_argument('--val-ratio', type=float, default=0.0, help='accepted for compatibility; unused')
    p.add_argument('--train-split', type=str, default='', help="'' = train_aug (VOC2012) / train (Synthetic)")
    p.add_argument('--test-split', type=str, default='', help="'' = val")
    p.add_argument('--eval', type=str, default='', choices=['', 'pred', 'raw'],
                   help='write predictions (palette PNG) or raw logits (.npy) instead of scoring; test only')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--test-batch-size', type=int, default=1)
    p.add_argument('--train-crop', type=int, default=449, help='square training crop (zero padded)')
    p.add_argument('--test-crop', type=int, default=513, help='square test crop; <= 0: whole images')
    p.add_argument('--train-aug-scale', type=float, default=0.0, help='> 0: random scale in (1-a, 1+a)')
    p.add_argument('--train-aug-color', action='store_true', help='colour jitter (0.1, 0.1, 0.1, 0.01)')
    p.add_argument('--epochs', type=int, default=0, help='0: test only')
    p.add_argument('--optimizer', type=str, default='Adam', choices=['Adam', 'SGD'])
    p.add_argument('--loss', type=str, default='ce', help="'ce' or 'fce_<t>' (forgiving CE)")
    p.add_argument('--lr', type=float, default=0.001)
    p.add_argument('--lr-steps', type=int, nargs='+', default=None, help='epochs at which lr *= 0.1')
    p.add_argument('--weight-decay', type=float, default=0.0)
    p.add_argument('--momentum', type=float, default=0.5, help='SGD momentum')
    p.add_argument('--seed', type=int, default=-1, help='-1: a random seed (printed)')
    p.add_argument('--overwrite', action='store_true', help='train afresh: ignore existing snapshots, restart the logs (refused when '
                        '--load-weights names a snapshot of --exp-root; a test-only run ignores it)')
    p.add_argument('--print-interval', type=int, default=10, help='batches between progress messages')
    p.add_argument('--log-interval', type=int, default=10, help='batches between train.log rows')
    p.add_argument('--test-interval', type=int, default=1, help='epochs between tests')
    p.add_argument('--snapshot-interval', type=int, default=1, help='epochs between snapshots')
    p.add_argument('--non-strict', action='store_true',
                   help='--load-weights(-backbone): load the tensors that fit and list the rest '
                        '(default: any mismatch is an error)')
    p.add_argument('--debug', action='store_true',
                   help=f'show the traceback of an error (or set {DEBUG_ENV}=1); without it an error is a short message')
    p.add_argument('--save-format', type=str, default='pth', choices=['pth', 'safetensors'],
                   help='format of the weights_epoch_<e> snapshots (pth: torch.save, as in 2019; safetensors '
                        'needs the safetensors package); both load with --load-weights and resume')
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject inconsistent arguments early, with the flag named."""
    for flag in ('batch_size', 'test_batch_size', 'print_interval', 'log_interval', 'test_interval'):
        if getattr(args, flag) < 1:
            raise ValueError(f'--{flag.replace("_", "-")} must be >= 1, got {getattr(args, flag)}')
    for flag in ('epochs', 'num_data_worker', 'num_threads'):
        if getattr(args, flag) < 0:
            raise ValueError(f'--{flag.replace("_", "-")} must be >= 0, got {getattr(args, flag)}')
    if args.test_crop <= 0 and args.test_batch_size > 1:
        raise ValueError('--test-crop <= 0 (whole images of different sizes) needs --test-batch-size 1, '
                         f'got {args.test_batch_size}')
    if args.train_crop <= 0 and args.batch_size > 1 and args.epochs > 0:
        raise ValueError(f'--train-crop <= 0 needs --batch-size 1, got {args.batch_size}')
    if args.train_aug_scale < 0 or args.train_aug_scale >= 1:
        raise ValueError(f'--train-aug-scale must be in [0, 1), got {args.train_aug_scale}')
    if args.seed < -1 or args.seed >= 2 ** 32:
        raise ValueError(f'--seed must be -1 (random) or in [0, 2**32), got {args.seed}')
    for flag in ('snapshot_interval',):
        if getattr(args, flag) < 0:
            raise ValueError(f'--{flag.replace("_", "-")} must be >= 0, got {getattr(args, flag)}')
    for flag, strict in (('lr', True), ('weight_decay', False), ('momentum', False)):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            raise ValueError(f'--{flag.replace("_", "-")} must be a finite number {">" if strict else ">="} 0, '
                             f'got {value}')
    if any(step < 1 for step in args.lr_steps or ()):
        raise ValueError(f'--lr-steps must be epochs >= 1, got {args.lr_steps}')
    if args.gpu is not None and args.gpu < 0:
        raise ValueError(f'--gpu must be a GPU index >= 0, got {args.gpu}')
    make_loss(args.loss)  # validates --loss
    spec = parse_model_name(args.model)  # validates --model, showing the grammar
    if args.load_weights_backbone and spec.crf is None:
        raise ValueError(f'--load-weights-backbone is for models with a CRF; {args.model!r} has none '
                         '(use --load-weights)')
    try:
        check_save_format(args.save_format)
    except ImportError as err:
        raise ValueError(f'--save-format: {err}') from None


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def data_roots(data_root: str) -> Tuple[Path, Path]:
    """(VOCdevkit, benchmark_RELEASE) from --data-root ('root' or 'voc_root,sbd_root')."""
    if ',' in data_root:
        voc_root, sbd_root = data_root.split(',', 1)
        return Path(voc_root), Path(sbd_root)
    return Path(data_root) / 'VOCdevkit', Path(data_root) / 'benchmark_RELEASE'


def make_dataset(args: argparse.Namespace, split: str, transform: Callable,
                 subset_seed: Optional[str] = None) -> Dataset:
    """The --dataset split (VOC2012 under --data-root, downloaded with --download; or Synthetic)."""
    if args.dataset == 'Synthetic':
        return Synthetic(split, transform, subset_seed=subset_seed)
    voc_root, sbd_root = data_roots(args.data_root)
    return PascalVOC(voc_root, sbd_root, split, transform, download=args.download, seed=subset_seed)


def _reseed_worker_transform(worker_id: int) -> None:
    """Give every DataLoader worker its own augmentation stream, derived from the run's torch seed."""
    info = get_worker_info()
    transform = getattr(info.dataset, 'transform', None)
    if hasattr(transform, 'reseed'):
        transform.reseed(info.seed % 2 ** 32)


def make_loader(dataset, batch_size: int, shuffle: bool, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=device.type == 'cuda', worker_init_fn=_reseed_worker_transform,
                      drop_last=False)


# --------------------------------------------------------------------------------------------------
# Weights, snapshots
# --------------------------------------------------------------------------------------------------
def load_weights(module: nn.Module, spec: str, what: str, strict: bool = True,
                 fill_backbone: bool = False) -> None:
    """Load ``spec`` (path, URL or registry name) into ``module``, strictly unless ``strict=False``.

    A mismatch is a ValueError naming the file and listing the keys; ``strict=False`` (--non-strict) loads what
    fits and lists the rest (nothing fitting is still an error). A module with ``adapt_state_dict`` (e.g. a
    loose CRF loading a non-loose one) converts the dict first. ``fill_backbone``: the backbone was loaded from
    --load-weights-backbone, so a file without ``backbone.*`` keys (a frozen-backbone snapshot) takes them from
    the module as it is.
    """
    state_dict = load_state_dict(spec)
    adapt = getattr(module, 'adapt_state_dict', None)
    if adapt is not None:
        state_dict = adapt(state_dict)
    if fill_backbone and not any(k.startswith('backbone.') for k in state_dict):
        state_dict = {**{k: v for k, v in module.state_dict().items() if k.startswith('backbone.')}, **state_dict}
        print(f'{what}: {spec} has no backbone.* keys: the backbone stays as --load-weights-backbone loaded it')
    try:
        load_into(module, state_dict, strict=strict, verbose=not strict)
    except ValueError as err:
        hint = ''
        if any(k.startswith('backbone.') for k in module.state_dict()) and \
                not any(k.startswith('backbone.') for k in state_dict):
            hint = (' (it holds no backbone.* keys: a snapshot of a frozen backbone needs the backbone it was '
                    'trained on, via --load-weights-backbone)')
        raise ValueError(f'{what} {spec}{hint}: {err}') from None
    print(f'{what}: loaded {spec} ({len(state_dict)} tensors, {"strict" if strict else "non-strict"})')


def save_snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, exp_root: Path, epoch: int,
                  optimizer_name: str, frozen_backbone: bool, save_format: str = 'pth') -> None:
    """Write <opt>_epoch_<e>.pth (the optimizer state) and then weights_epoch_<e>.<save_format> (without backbone.*
    for a frozen backbone): the weights file commits the snapshot (tools.runtime.save_checkpoint)."""
    state = {k: v for k, v in _unwrap(model).state_dict().items()
             if not (frozen_backbone and k.startswith('backbone'))}
    save_checkpoint(state, {'epoch': epoch, 'optimizer': optimizer.state_dict()},
                    exp_root / f'weights_epoch_{epoch}.{save_format}',
                    exp_root / f'{optimizer_name.lower()}_epoch_{epoch}.pth')


def load_optimizer_state(exp_root: Path, epoch: int, optimizer_name: str, device: torch.device) -> dict:
    """The optimizer state saved with snapshot ``epoch`` (a 2019-style file holds the optimizer state itself)."""
    path = exp_root / f'{optimizer_name.lower()}_epoch_{epoch}.pth'
    try:
        state = load_checkpoint_state(find_snapshots(exp_root)[epoch], path, map_location=device)
    except CheckpointError as err:
        raise ValueError(f'cannot resume: {err} (was it trained with another --optimizer?). Test it with --epochs '
                         f'{epoch}, or start afresh with --overwrite') from None
    return state['optimizer'] if 'optimizer' in state else state


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.DataParallel) else model


def make_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    params = trainable_parameters(model)
    if not params:
        raise ValueError(f'model {args.model!r} has no trainable parameters; it can only be tested (--epochs 0)')
    if args.optimizer == 'Adam':
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def advance_scheduler(scheduler, epochs: int) -> None:
    with warnings.catch_warnings():  # stepping without optimizer.step() is intended here
        warnings.simplefilter('ignore', UserWarning)
        for _ in range(epochs):
            scheduler.step()


# --------------------------------------------------------------------------------------------------
# Train / test / predict
# --------------------------------------------------------------------------------------------------
def _format_measures(values: Dict[str, float]) -> str:
    return ' '.join(f'{name} {100 * value:.2f}' for name, value in values.items())


def train_epoch(model: nn.Module, loader: DataLoader, loss_fn, optimizer, device: torch.device, epoch: int,
                num_classes: int, log: CsvLog, args: argparse.Namespace) -> None:
    model.train()
    meter = ConfusionMeter(num_classes)
    loss_sum, samples, time_total, time_data = 0.0, 0, 0.0, 0.0
    lr = optimizer.param_groups[0]['lr']
    end = time.time()
    bar = tqdm(loader, desc=f'train epoch {epoch}', leave=False)
    for step, (image, target) in enumerate(bar, start=1):
        image, target = image.to(device), target.to(device)
        time_data += time.time() - end
        output = model(image, target.shape[-2:])
        loss = loss_fn(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        batch_values, _ = seg_measures(meter.add(output.detach().argmax(1), target))
        loss_sum += loss.item() * image.shape[0]
        samples += image.shape[0]
        time_total += time.time() - end
        running, _ = meter.measures()
        if step % args.log_interval == 0 or step == len(loader):
            row = [epoch - 1 + step / len(loader), lr, time_total / samples, time_data / samples,
                   loss.item(), loss_sum / samples]
            row += [v for m in MEASURES for v in (batch_values[m], running[m])]
            log.write(row, TRAIN_FORMATS)
        if step % args.print_interval == 0:
            bar.set_postfix(loss=f'{loss_sum / samples:.4f}', miou=f'{100 * running["miou"]:.2f}')
        end = time.time()
    running, _ = meter.measures()
    print(f'epoch {epoch} train: lr {lr:g} loss {loss_sum / max(samples, 1):.6f} {_format_measures(running)}')


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn, device: torch.device, num_classes: int
             ) -> Tuple[float, Dict[str, float], List[int], float, float]:
    """Dataset-level (loss, measures, excluded classes, seconds per sample, data seconds per sample)."""
    model.eval()
    meter = ConfusionMeter(num_classes)
    loss_sum, samples, time_total, time_data = 0.0, 0, 0.0, 0.0
    end = time.time()
    for image, target in tqdm(loader, desc='test', leave=False):
        image, target = image.to(device), target.to(device)
        time_data += time.time() - end
        output = model(image, target.shape[-2:])
        loss_sum += loss_fn(output, target).item() * image.shape[0]
        samples += image.shape[0]
        meter.add(output.argmax(1), target)
        time_total += time.time() - end
        end = time.time()
    values, excluded = meter.measures()
    samples = max(samples, 1)
    return loss_sum / samples, values, excluded, time_total / samples, time_data / samples


def report_test(epoch: int, loss: float, values: Dict[str, float], excluded: List[int], class_names) -> None:
    print(f'epoch {epoch} test: loss {loss:.6f} {_format_measures(values)}')
    if excluded:
        names = ', '.join(f'{c} ({class_names[c]})' if c < len(class_names) else str(c) for c in excluded)
        print(f'  classes absent from ground truth and prediction, excluded from the means: {names}')


@torch.no_grad()
def write_predictions(model: nn.Module, loader: DataLoader, out_dir: Path, kind: str,
                      device: torch.device) -> int:
    """--eval pred: argmax as VOC-palette PNG; --eval raw: float32 logits (C, H, W) as .npy."""
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for image, codes, sizes in tqdm(loader, desc=f'predict ({kind})'):
        output = model(image.to(device)).float().cpu()
        for logits, code, (height, width) in zip(output, codes, sizes.tolist()):
            if logits.shape[-2] >= height and logits.shape[-1] >= width:
                logits = logits[:, :height, :width]
            image_id = decode_id(code)
            if kind == 'pred':
                save_label_png(logits.argmax(0).numpy(), out_dir / f'{image_id}.png')
            else:
                with atomic_open(out_dir / f'{image_id}.npy', 'wb') as handle:
                    np.save(handle, logits.numpy().astype(np.float32))
            written += 1
    return written


# --------------------------------------------------------------------------------------------------
# Program
# --------------------------------------------------------------------------------------------------
def resolve_run_device(args: argparse.Namespace) -> torch.device:
    if args.gpu is not None:
        return resolve_device(f'cuda:{args.gpu}')
    return resolve_device(args.device)


def find_resume_epoch(args: argparse.Namespace, exp_root: Path) -> int:
    """The snapshot epoch to resume from (0: none). Test-only runs (--epochs 0) never resume
    when --load-weights is given; otherwise they test the latest snapshot. A training run in a folder with
    snapshots beyond --epochs (and none at --epochs) is an error: it would truncate their logs."""
    # --overwrite starts training afresh; a test-only run deletes nothing, so it still sees the snapshots
    snapshots = {} if args.overwrite and args.epochs > 0 else find_snapshots(exp_root)
    if not snapshots:
        return 0
    if args.epochs == 0:
        return 0 if args.load_weights else max(snapshots)
    later = [e for e in snapshots if e > args.epochs]
    if later and args.epochs not in snapshots:
        raise ValueError(f'--epochs {args.epochs}: {exp_root} holds snapshots of later epochs '
                         f'({", ".join(map(str, later))}) and none of epoch {args.epochs}; continuing would truncate '
                         f'their logs. Test one with --epochs 0 (the latest) or --epochs {max(later)}, or start afresh '
                         'with --overwrite')
    usable = [e for e in snapshots if e <= args.epochs]
    return max(usable) if usable else 0


def check_overwrite_keeps_weights(args: argparse.Namespace, exp_root: Path) -> None:
    """--overwrite rewrites the snapshots in --exp-root: refuse when --load-weights names one of them."""
    if not (args.overwrite and args.epochs > 0 and args.load_weights and os.path.isfile(args.load_weights)):
        return
    owned = [p for p in exp_root.glob('*_epoch_*') if p.suffix in ('.pth', '.safetensors') and p.is_file()] \
        if exp_root.is_dir() else []
    if any(os.path.samefile(args.load_weights, path) for path in owned):
        raise ValueError(f'--overwrite would replace {args.load_weights}, the file --load-weights names; copy it '
                         f'out of {exp_root} first (or use another --exp-root)')


def check_weights_intended(args: argparse.Namespace, spec, last_epoch: int) -> None:
    """A model never runs with weights nobody asked for: a frozen backbone must come from a file."""
    if spec.frozen and not args.load_weights_backbone and not (args.load_weights and last_epoch == 0):
        raise ValueError(f'{args.model!r} has a frozen backbone, but no --load-weights-backbone: it would '
                         'test or train a CRF on a random backbone (snapshots of frozen backbones omit it)')


def prepare_model(args: argparse.Namespace, spec, exp_root: Path, device: torch.device) -> Tuple[nn.Module, int]:
    """Build the model, load backbone / model weights or the snapshot to resume; (model, last_epoch)."""
    check_overwrite_keeps_weights(args, exp_root)
    last_epoch = find_resume_epoch(args, exp_root)
    check_weights_intended(args, spec, last_epoch)
    if 0 < last_epoch < args.epochs:
        load_optimizer_state(exp_root, last_epoch, args.optimizer, torch.device('cpu'))  # fail before any work
    model = create_model(args.model, NUM_CLASSES)
    strict = not args.non_strict
    if args.load_weights_backbone:
        load_weights(model.backbone, args.load_weights_backbone, 'backbone', strict=strict)
    fill = bool(args.load_weights_backbone)
    if last_epoch > 0:
        snapshot = find_snapshots(exp_root)[last_epoch]
        if args.load_weights:
            print(f'Warning: resuming from {snapshot}; --load-weights is ignored')
        load_weights(model, str(snapshot), f'snapshot {last_epoch}', fill_backbone=fill)
    elif args.load_weights:
        load_weights(model, args.load_weights, 'model', strict=strict, fill_backbone=fill)
    elif args.epochs == 0:
        raise ValueError(f'nothing to test: no snapshot in {exp_root} and no --load-weights (train with --epochs N, '
                         'or pass --load-weights)')
    model.to(device)
    if device.type == 'cuda' and args.gpu is None and torch.cuda.device_count() > 1:
        model = nn.DataParallel(model)
    trainable = sum(p.numel() for p in trainable_parameters(model))
    print(f'model {args.model}: {trainable:,} trainable parameters')
    return model, last_epoch


def predict(args: argparse.Namespace, model: nn.Module, test_split: str, seed: int, exp_root: Path,
            device: torch.device) -> None:
    """--eval pred|raw: write one output file per image of the test split."""
    dataset = make_dataset(args, test_split, DeepLabEvalInputs(args.test_crop, seed=seed), f'{seed}-test')
    loader = make_loader(dataset, args.test_batch_size, False, args.num_data_worker, device)
    out_dir = exp_root / f'outputs_{test_split}_{args.eval}'
    count = write_predictions(_unwrap(model), loader, out_dir, args.eval, device)
    print(f'{count} outputs written to {out_dir}')


def train(args: argparse.Namespace, model: nn.Module, spec, last_epoch: int, train_split: str,
          test_loader: DataLoader, seed: int, exp_root: Path, device: torch.device) -> Dict[str, float]:
    """Epochs last_epoch + 1 .. args.epochs with logs, tests and snapshots; returns the last test."""
    for stale in remove_stale_temp_files(exp_root):  # a training run owns its folder (a test-only run may not)
        print(f'removed {stale}, left by an interrupted write')
    loss_fn = make_loss(args.loss)
    test_model = _unwrap(model) if args.test_batch_size == 1 else model
    optimizer = make_optimizer(args, model)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_steps or [], gamma=0.1)
    advance_scheduler(scheduler, last_epoch)
    if last_epoch > 0:
        optimizer.load_state_dict(load_optimizer_state(exp_root, last_epoch, args.optimizer, device))
        print(f'optimizer state loaded from {exp_root / f"{args.optimizer.lower()}_epoch_{last_epoch}.pth"}')
    resume = last_epoch if last_epoch > 0 else None
    aug_scale = (1 - args.train_aug_scale, 1 + args.train_aug_scale) if args.train_aug_scale > 0 else None
    train_transform = DeepLabInputs(args.train_crop, pad_label=True, seed=seed, aug_flip=True, aug_scale=aug_scale,
                                    aug_color=COLOR_JITTER if args.train_aug_color else None)
    with CsvLog(exp_root / 'train.log', TRAIN_COLUMNS, resume_epoch=resume) as train_log, \
            CsvLog(exp_root / 'test.log', TEST_COLUMNS, resume_epoch=resume) as test_log:

        def run_test(epoch: int, log_it: bool) -> Dict[str, float]:
            loss, values, excluded, t_total, t_data = evaluate(test_model, test_loader, loss_fn, device,
                                                               NUM_CLASSES)
            report_test(epoch, loss, values, excluded, VOC_CLASSES)
            if log_it:
                test_log.write([epoch, optimizer.param_groups[0]['lr'], t_total, t_data, loss]
                               + [values[m] for m in MEASURES], TEST_FORMATS)
            return values

        values = run_test(last_epoch, log_it=resume is None)  # a resumed log already has this row
        train_loader = None
        for epoch in range(last_epoch + 1, args.epochs + 1):
            advance_scheduler(scheduler, 1)
            if train_loader is None or '_rand' in train_split:  # _rand<N>: a fresh subset every epoch
                train_transform.reseed(f'{seed}-transform-{epoch}')
                dataset = make_dataset(args, train_split, train_transform, subset_seed=f'{seed}-subset-{epoch}')
                train_loader = make_loader(dataset, args.batch_size, True, args.num_data_worker, device)
            train_epoch(model, train_loader, loss_fn, optimizer, device, epoch, NUM_CLASSES, train_log, args)
            if epoch % args.test_interval == 0 or epoch == args.epochs:
                values = run_test(epoch, log_it=True)
            if (args.snapshot_interval > 0 and epoch % args.snapshot_interval == 0) or epoch == args.epochs:
                save_snapshot(model, optimizer, exp_root, epoch, args.optimizer, spec.frozen, args.save_format)
    return values


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Run the program; returns the last test's measures ({} for --eval runs)."""
    args = build_parser().parse_args(argv)
    check_args(args)
    device = resolve_run_device(args)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    seed = args.seed if args.seed >= 0 else os.urandom(1)[0]
    seed_everything(seed)
    print(f'seed {seed}, device {device}')
    exp_root = Path(args.exp_root)
    exp_root.mkdir(parents=True, exist_ok=True)
    spec = parse_model_name(args.model)
    train_split = args.train_split or ('train' if args.dataset == 'Synthetic' else 'train_aug')
    test_split = args.test_split or 'val'

    model, last_epoch = prepare_model(args, spec, exp_root, device)
    test_only = args.epochs <= last_epoch
    if args.eval:
        if not test_only:
            raise ValueError(f'--eval {args.eval} writes predictions and needs a test-only run '
                             f'(--epochs 0 or <= the last snapshot), got --epochs {args.epochs}')
        predict(args, model, test_split, seed, exp_root, device)
        return {}

    test_transform = DeepLabInputs(args.test_crop, pad_label=args.test_batch_size > 1, seed=seed + 1)
    test_set = make_dataset(args, test_split, test_transform, f'{seed}-test')
    test_loader = make_loader(test_set, args.test_batch_size, False, args.num_data_worker, device)
    if not test_only:
        return train(args, model, spec, last_epoch, train_split, test_loader, seed, exp_root, device)
    loss, values, excluded, _, _ = evaluate(_unwrap(model), test_loader, make_loss(args.loss), device, NUM_CLASSES)
    report_test(last_epoch, loss, values, excluded, VOC_CLASSES)
    return values


if __name__ == '__main__':
    sys.exit(run_cli(main, 'task_semanticSegmentation.main'))
