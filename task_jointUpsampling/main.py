"""Train and evaluate joint upsampling models: ``python -m task_jointUpsampling.main``.

The flags, defaults and log files are those of the 2019 program, plus ``--device``, ``--nyu-url``,
``--save-images``, ``--compare``, ``--demo`` and the Synthetic dataset options. Examples::

    # the demo: train PacJointUpsample and DJIF on procedural scenes, compare with Bilinear (a few minutes, CPU)
    python -m task_jointUpsampling.main --demo

    # test released weights on NYU Depth V2 (RMSE in centimetres)
    python -m task_jointUpsampling.main --load-weights weights_depth/x8_pac_weights_epoch_5000.pth --download \\
        --factor 8 --model PacJointUpsample --dataset NYUDepthV2 --data-root data/nyu

    # train on NYU Depth V2
    python -m task_jointUpsampling.main --factor 8 --data-root data/nyu --exp-root exp/nyu --download \\
        --dataset NYUDepthV2 --epochs 5000 --lr-steps 3500 4500

Units: NYU and Synthetic depths are in metres; their RMSE is reported (printed and logged) in centimetres.
Sintel flow and its EPE are in pixels of the full-resolution frame.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from task_jointUpsampling.datasets import (LOWRES_MODES, NYU_URL_ENV, AssembleJointUpsamplingInputs, NYUDepthV2,
                                           Sintel, center_crop)
from task_jointUpsampling.models import (MODEL_NAMES, PacJointUpsample, create_model, init_color_guide_, th_epe,
                                         th_rmse)
from task_jointUpsampling.synthetic import Synthetic
from task_jointUpsampling.visualize import save_comparison, save_sample_images
from tools.cli import DEBUG_ENV, ArgumentParser, run_cli
from tools.runtime import (CheckpointError, CsvLog, find_snapshots, format_table, load_checkpoint_state,
                           remove_stale_temp_files, resolve_device, save_checkpoint, seed_everything, write_bytes_atomic)

SNAPSHOT_PREFIX = 'weights_epoch_'  # weights_epoch_<n>.pth: a plain state_dict, like the released weights
STATE_PREFIX = 'state_epoch_'  # state_epoch_<n>.pth: optimizer, scheduler and RNG states for resuming


# ---------------------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DatasetInfo:
    """Per-dataset defaults and conventions."""
    kind: str  # 'depth' or 'flow'
    measures: tuple[str, ...]
    lowres_mode: str
    eval_border: int
    test_split: str
    rmse_scale: float  # measure unit conversion: metres -> centimetres for depth
    unit: str


_DEPTH = DatasetInfo('depth', ('rmse',), 'center', 6, 'test', 100.0, 'cm')
_FLOW = DatasetInfo('flow', ('epe',), 'bilinear', 0, 'val', 1.0, 'px')
DATASETS = {'NYUDepthV2': _DEPTH, 'Synthetic': _DEPTH, 'Sintel': _FLOW, 'Sintel-clean': _FLOW,
            'Sintel-final': _FLOW, 'Sintel-albedo': _FLOW}


def build_dataset(args: argparse.Namespace, split: str, transform: Callable, training: bool):
    """The dataset named by ``--dataset`` for ``split``, samples passed through ``transform``."""
    if args.dataset == 'NYUDepthV2':
        return NYUDepthV2(args.data_root, split=split, val_ratio=args.val_ratio, transform=transform,
                          cache_all=training, download=args.download, url=args.nyu_url or None)
    if args.dataset == 'Synthetic':
        num_train, num_test = args.synthetic_samples
        return Synthetic(split=split, num_samples=num_train if training else num_test, size=args.synthetic_size,
                         seed=args.synthetic_seed, transform=transform)
    image_pass = 'clean' if args.dataset == 'Sintel' else args.dataset.split('-', 1)[1]
    return Sintel(args.data_root, split=split, fields=(f'{image_pass}_1', 'flow'), transform=transform,
                  cache_all=training, download=args.download)


def build_loaders(args: argparse.Namespace, info: DatasetInfo, device: torch.device, need_train: bool):
    lowres_mode = args.lowres_mode or info.lowres_mode
    border = info.eval_border if args.eval_border < 0 else args.eval_border
    common = dict(normalize_target=True, output_crop=border, lowres_mode=lowres_mode, zero_guidance=args.zero_guidance)
    loader_options = dict(num_workers=args.num_data_worker, pin_memory=device.type == 'cuda',
                          persistent_workers=args.num_data_worker > 0)
    train_loader = None
    if need_train:
        crop = args.train_crop if args.train_crop > 0 else None
        train_set = build_dataset(args, args.train_split or 'train',
                                  AssembleJointUpsamplingInputs(args.factor, crop=crop, flip=True, **common), True)
        train_loader = DataLoader(train_set, args.batch_size, shuffle=True, drop_last=len(train_set) > args.batch_size,
                                  **loader_options)
    test_set = build_dataset(args, args.test_split or info.test_split,
                             AssembleJointUpsamplingInputs(args.factor, crop=None, flip=False, **common), False)
    test_loader = DataLoader(test_set, args.test_batch_size, shuffle=False, **loader_options)
    return train_loader, test_loader


# ---------------------------------------------------------------------------------------------- model plumbing
def build_model(args: argparse.Namespace, channels: int) -> nn.Module:
    """The ``--model``; PAC models start from the colour-guide init when ``--color-guide-init`` is set."""
    net = create_model(args.model, args.factor, channels=channels, guide_channels=3)
    if args.color_guide_init > 0 and isinstance(net, PacJointUpsample):
        init_color_guide_(net, args.color_guide_init)
    return net


def apply_model(net: nn.Module, lres: torch.Tensor, guide: torch.Tensor, factor: int) -> torch.Tensor:
    """Run ``net``; when the guide is not exactly ``factor`` x the low-res size (e.g. Sintel 436 rows at x8), the
    guide is resized to that size first and the output resized back to the guide's size (bilinear)."""
    size = tuple(guide.shape[-2:])
    net_size = (lres.shape[-2] * factor, lres.shape[-1] * factor)
    if size == net_size:
        return net(lres, guide)
    guide = F.interpolate(guide, size=net_size, mode='bilinear', align_corners=False)
    return F.interpolate(net(lres, guide), size=size, mode='bilinear', align_corners=False)


def denormalize(x: torch.Tensor, raw_range: torch.Tensor) -> torch.Tensor:
    """Map normalised values back to raw units with the per-image, per-channel (min, max) in ``raw_range``."""
    low, high = raw_range[..., 0, None, None], raw_range[..., 1, None, None]
    return x * (high - low) + low


def normalize(x: torch.Tensor, raw_range: torch.Tensor) -> torch.Tensor:
    low, high = raw_range[..., 0, None, None], raw_range[..., 1, None, None]
    return (x - low) / (high - low)


def compute_loss(name: str, output: torch.Tensor, pred_raw: torch.Tensor, target: torch.Tensor,
                 raw_range: torch.Tensor) -> torch.Tensor:
    if name == 'l2':
        return F.mse_loss(output, normalize(target, raw_range))
    if name == 'rmse':
        return th_rmse(pred_raw, target)
    if name == 'epe':
        return th_epe(pred_raw, target)
    raise ValueError(f"--loss: {name!r} is not supported; expected 'l2', 'rmse' or 'epe'")


def compute_measures(names: Sequence[str], pred_raw: torch.Tensor, target: torch.Tensor,
                     info: DatasetInfo) -> list[float]:
    """Each measure on raw-unit predictions; RMSE of depth is converted to centimetres (data in metres)."""
    values = []
    for name in names:
        if name == 'rmse':
            values.append(th_rmse(pred_raw, target).item() * info.rmse_scale)
        else:
            values.append(th_epe(pred_raw, target).item())
    return values


def forward_batch(net, batch, args, info, device):
    lres, guide, target, raw_range = (t.to(device, non_blocking=True) for t in batch)
    output = center_crop(apply_model(net, lres, guide, args.factor), target.shape[-2:])
    pred_raw = denormalize(output, raw_range)
    return output, pred_raw, target, raw_range


def measure_label(name: str, info: DatasetInfo) -> str:
    return f'{name} ({info.unit})' if name == 'rmse' else f'{name} (px)'


def format_measures(names: Sequence[str], values: Sequence[float], info: DatasetInfo) -> str:
    return ', '.join(f'{measure_label(n, info)} {v:.4f}' for n, v in zip(names, values))


# ---------------------------------------------------------------------------------------------- train / test
def train_epoch(net, loader, optimizer, epoch, args, info, device, log: CsvLog) -> None:
    net.train()
    lr = optimizer.param_groups[0]['lr']
    window_loss, window_measures, window_count = 0.0, np.zeros(len(args.measures)), 0
    bar = tqdm(loader, desc=f'epoch {epoch}/{args.epochs} train', leave=False, dynamic_ncols=True)
    for i, batch in enumerate(bar, start=1):
        output, pred_raw, target, raw_range = forward_batch(net, batch, args, info, device)
        loss = compute_loss(args.loss, output, pred_raw, target, raw_range)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window_loss += loss.item()
        window_measures += compute_measures(args.measures, pred_raw.detach(), target, info)
        window_count += 1
        bar.set_postfix(loss=f'{loss.item():.4g}')
        if i % args.print_interval == 0:
            tqdm.write(f'epoch {epoch} [{i}/{len(loader)}] loss {loss.item():.6f}')
        if i % args.log_interval == 0 or i == len(loader):
            progress = epoch - 1 + i / len(loader)
            write_row(log, progress, lr, window_loss / window_count, window_measures / window_count)
            window_loss, window_measures, window_count = 0.0, np.zeros(len(args.measures)), 0


@torch.no_grad()
def evaluate(net, loader, args, info, device, desc: str = 'test', save_images: int = 0,
             image_dir: Path | None = None) -> tuple[float, list[float]]:
    """Loss and measures over the whole test set (batch means weighted by batch size).

    Runs on a fork of the torch RNG, so testing never changes the random stream of training (a resumed run,
    which starts with a test, then repeats an uninterrupted one exactly).
    """
    cuda_devices = [device] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=cuda_devices):
        return _evaluate(net, loader, args, info, device, desc, save_images, image_dir)


def _evaluate(net, loader, args, info, device, desc, save_images, image_dir) -> tuple[float, list[float]]:
    net.eval()
    total_loss, total_measures, count = 0.0, np.zeros(len(args.measures)), 0
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        output, pred_raw, target, raw_range = forward_batch(net, batch, args, info, device)
        n = target.shape[0]
        total_loss += compute_loss(args.loss, output, pred_raw, target, raw_range).item() * n
        total_measures += np.asarray(compute_measures(args.measures, pred_raw, target, info)) * n
        if count < save_images:
            keep = min(n, save_images - count)
            low_raw = denormalize(batch[0][:keep].to(device), raw_range[:keep])
            save_sample_images(image_dir, count, info.kind, batch[1][:keep], low_raw, pred_raw[:keep],
                               target[:keep])
        count += n
    return total_loss / count, list(total_measures / count)


def write_row(log: CsvLog, epoch: float, lr: float, loss: float, measures: Sequence[float]) -> None:
    log.write([epoch, lr, loss, *measures], ['{:.6f}', '{:g}', '{:.6f}'] + ['{:.6f}'] * len(measures))


# ---------------------------------------------------------------------------------------------- checkpoints
def rng_states() -> dict:
    """Python, NumPy and torch RNG states as types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'python': random.getstate(), 'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    random.setstate(states['python'])
    kind, keys, pos, has_gauss, gauss = states['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states['torch'])
    if states.get('cuda') and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])


def save_snapshot(exp_root: Path, epoch: int, net: nn.Module, optimizer, scheduler, save_format: str = 'pth') -> None:
    """Write state_epoch_<n>.pth (optimizer, scheduler, RNG states) and then weights_epoch_<n>.<save_format> (a plain
    CPU state_dict): the weights file commits the snapshot (tools.runtime.save_checkpoint)."""
    state = {'epoch': epoch, 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
             'rng': rng_states()}
    save_checkpoint(net.state_dict(), state,
                    exp_root / f'{SNAPSHOT_PREFIX}{epoch}.{save_format}', exp_root / f'{STATE_PREFIX}{epoch}.pth')


def snapshot_files(exp_root: Path) -> list[Path]:
    """The weights and state files of every snapshot in ``exp_root`` (weights in either --save-format)."""
    found = [*find_snapshots(exp_root, SNAPSHOT_PREFIX).values(), *find_snapshots(exp_root, STATE_PREFIX).values()]
    return [same_epoch for path in found for same_epoch in (path.with_suffix('.pth'), path.with_suffix('.safetensors'))
            if same_epoch.is_file()]


def remove_snapshots(exp_root: Path) -> None:
    for path in snapshot_files(exp_root):
        path.unlink()


def check_overwrite_keeps_weights(args: argparse.Namespace, exp_root: Path) -> None:
    """--overwrite deletes the snapshots in --exp-root: refuse when --load-weights names one of them."""
    if not (args.overwrite and args.load_weights and os.path.isfile(args.load_weights)):
        return
    if any(os.path.samefile(args.load_weights, path) for path in snapshot_files(exp_root)):
        raise ValueError(f'--overwrite would delete {args.load_weights}, the file --load-weights names; copy it out '
                         f'of {exp_root} first (or use another --exp-root)')


def load_weights(net: nn.Module, spec: str, info: DatasetInfo, strict: bool = True) -> None:
    """Load ``--load-weights`` (a path, URL or registry name; a short name like ``x8_pac`` gets the dataset's
    ``depth_``/``flow_`` prefix) strictly; missing or unexpected keys raise an error that lists them. With
    ``strict=False`` (--non-strict) the matching tensors are loaded, the rest listed; none matching is an error."""
    import weights
    if not os.path.exists(spec):
        # `x8_pac`, or the 2019 file name `weights_depth/x8_pac_weights_epoch_5000.pth`: the dataset's release.
        released = re.fullmatch(r'(x\d+_[A-Za-z0-9]+)(_weights_epoch_5000\.pth)?', os.path.basename(spec))
        if released and (released.group(2) or spec == released.group(1)):
            spec = f'{info.kind}_{released.group(1)}'
    state_dict = weights.load_state_dict(spec)
    try:
        weights.load_into(net, state_dict, strict=strict)
    except ValueError as err:
        raise ValueError(f'--load-weights {spec}: {err}') from None
    print(f'loaded weights {spec}{"" if strict else " (non-strict)"}')


# ---------------------------------------------------------------------------------------------- one run
def make_scheduler(optimizer, lr_steps: Sequence[int] | None):
    # scheduler.step() runs after each epoch; the 2019 program stepped it before, so that epoch e trains with
    # lr * 0.1 ** (number of lr_steps <= e). Shifting the milestones by one gives the same schedule.
    milestones = sorted(m - 1 for m in (lr_steps or []))
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def make_optimizer(args: argparse.Namespace, params):
    if args.optimizer == 'Adam':
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == 'SGD':
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    raise ValueError(f"--optimizer: {args.optimizer!r} is not supported; expected 'Adam' or 'SGD'")


def run(args: argparse.Namespace) -> dict:
    """Train and/or test one model as the flags say. Returns the final test loss and measures."""
    return train_and_test(args)[1]


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, decided (and checked) before any work starts."""
    epochs: int  # the epochs to reach (0 for a model without trainable parameters)
    last_epoch: int  # the epoch the run starts from
    resume_from: int | None  # the snapshot to load, if any

    @property
    def test_only(self) -> bool:
        return self.epochs <= self.last_epoch


def plan_run(args: argparse.Namespace, net: nn.Module | None = None) -> RunPlan:
    """Check what the flags ask of ``--exp-root`` before any work: which snapshot to resume or test, that its
    training state matches, that --overwrite spares --load-weights, and that there are weights to test."""
    exp_root = Path(args.exp_root)
    if net is None:
        with torch.random.fork_rng(devices=[]):
            net = build_model(args, 1 if DATASETS[args.dataset].kind == 'depth' else 2)
    trainable = any(p.requires_grad for p in net.parameters())
    epochs = args.epochs if trainable else 0
    if epochs > 0:
        check_overwrite_keeps_weights(args, exp_root)
    last_epoch, resume_from = _starting_point(args, exp_root, epochs)
    if resume_from is not None and epochs > last_epoch:
        _load_state(exp_root, resume_from)  # fails now, not after the first test, when the state is missing
    hand_set = getattr(net, 'hand_set', False)  # e.g. JBU: its initial weights are the model
    if epochs == 0 and trainable and not hand_set and resume_from is None and not args.load_weights:
        raise ValueError(f'{args.model}: nothing to test: no snapshot in {exp_root} and no --load-weights '
                         '(train with --epochs N, or pass --load-weights)')
    return RunPlan(epochs, last_epoch, resume_from)


def train_and_test(args: argparse.Namespace, plan: RunPlan | None = None) -> tuple[nn.Module, dict]:
    """:func:`run`, also returning the model; ``plan`` from :func:`plan_run` (made here when None)."""
    info = DATASETS[args.dataset]
    args.measures = tuple(args.measures or info.measures)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    exp_root = Path(args.exp_root)
    channels = 1 if info.kind == 'depth' else 2
    net = build_model(args, channels).to(device)
    trainable = [p for p in net.parameters() if p.requires_grad]
    plan = plan or plan_run(args, net)
    if args.epochs > 0 and not trainable:
        print(f'{args.model} has no trainable parameters: testing only')
    epochs, last_epoch, resume_from = plan.epochs, plan.last_epoch, plan.resume_from

    if resume_from is not None:
        path = find_snapshots(exp_root, SNAPSHOT_PREFIX)[resume_from]  # .pth or .safetensors (--save-format)
        import weights
        weights.load_into(net, weights.load_state_dict(str(path)), strict=True, verbose=False)
        print(f'loaded snapshot {path}')
    elif args.load_weights:
        load_weights(net, args.load_weights, info, strict=not args.non_strict)
    test_only = plan.test_only

    train_loader, test_loader = build_loaders(args, info, device, need_train=not test_only)
    label = f'{args.model} x{args.factor} {args.dataset}'
    image_dir = exp_root / ('images_test' if test_only else 'images')  # a test-only run keeps training's images
    if test_only:
        loss, measures = evaluate(net, test_loader, args, info, device, desc=f'test {label}',
                                  save_images=_num_images(args, test_loader), image_dir=image_dir)
        print(f'test {label}: loss {loss:.6f}, {format_measures(args.measures, measures, info)}')
        epoch = resume_from if resume_from is not None else last_epoch
        return net, {'loss': loss, **dict(zip(args.measures, measures)), 'epoch': epoch, 'train_seconds': 0.0,
                     'trained': False}

    exp_root.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temp_files(exp_root):  # a training run owns its folder (a test-only run may not)
        print(f'removed {stale}, left by an interrupted write')
    if args.overwrite:
        remove_snapshots(exp_root)
    optimizer = make_optimizer(args, trainable)
    scheduler = make_scheduler(optimizer, args.lr_steps)
    if resume_from is not None:
        _resume_state(exp_root, resume_from, optimizer, scheduler)
    columns = ['epoch', 'lr', 'loss', *args.measures]
    resume_epoch = last_epoch if resume_from is not None else None
    train_log = CsvLog(exp_root / 'train.log', columns, resume_epoch=resume_epoch)
    test_log = CsvLog(exp_root / 'test.log', columns, resume_epoch=resume_epoch)

    loss, measures = evaluate(net, test_loader, args, info, device, desc=f'test epoch {last_epoch}')
    print(f'epoch {last_epoch} test {label}: loss {loss:.6f}, {format_measures(args.measures, measures, info)}')
    if resume_from is None:
        write_row(test_log, last_epoch, optimizer.param_groups[0]['lr'], loss, measures)
    start = time.perf_counter()
    for epoch in tqdm(range(last_epoch + 1, epochs + 1), desc=f'train {label}', initial=last_epoch, total=epochs,
                      dynamic_ncols=True):
        train_epoch(net, train_loader, optimizer, epoch, args, info, device, train_log)
        scheduler.step()
        if epoch % args.test_interval == 0 or epoch == epochs:
            final = epoch == epochs
            loss, measures = evaluate(net, test_loader, args, info, device, desc=f'test epoch {epoch}',
                                      save_images=_num_images(args, test_loader) if final else 0, image_dir=image_dir)
            write_row(test_log, epoch, optimizer.param_groups[0]['lr'], loss, measures)
            tqdm.write(f'epoch {epoch} test {label}: loss {loss:.6f}, {format_measures(args.measures, measures, info)}')
        if (args.snapshot_interval > 0 and epoch % args.snapshot_interval == 0) or epoch == epochs:
            save_snapshot(exp_root, epoch, net, optimizer, scheduler, args.save_format)
    train_seconds = time.perf_counter() - start
    train_log.close()
    test_log.close()
    _plot(exp_root, args.measures)
    return net, {'loss': loss, **dict(zip(args.measures, measures)), 'epoch': epochs, 'train_seconds': train_seconds,
                 'trained': True}


def _starting_point(args: argparse.Namespace, exp_root: Path, epochs: int) -> tuple[int, int | None]:
    """(last finished epoch, snapshot epoch to load or None). Training resumes from the latest snapshot not
    beyond ``epochs``; a test-only run (epochs 0) tests the latest snapshot unless --load-weights is given.
    A snapshot beyond ``epochs`` (and none at ``epochs``) is an error: the run would overwrite that later
    training's logs with an earlier one."""
    # --overwrite starts training afresh; a test-only run deletes nothing, so it still sees the snapshots
    snapshots = {} if args.overwrite and epochs > 0 else find_snapshots(exp_root, SNAPSHOT_PREFIX)
    if epochs == 0:
        return 0, (max(snapshots) if snapshots and not args.load_weights else None)
    later = [e for e in snapshots if e > epochs]
    if later and epochs not in snapshots:
        raise ValueError(f'--epochs {epochs}: {exp_root} holds snapshots of later epochs ({", ".join(map(str, later))}) '
                         f'and none of epoch {epochs}; continuing would truncate their logs. Test one with --epochs 0 '
                         f'(the latest) or --epochs {max(later)}, or start afresh with --overwrite')
    done = [e for e in snapshots if e <= epochs]
    if not done:
        return 0, None
    if args.load_weights:
        raise ValueError(f'--load-weights {args.load_weights!r}: {exp_root} already holds snapshots to resume '
                         'from; pass --overwrite to start a fresh run from these weights')
    return max(done), max(done)


def _num_images(args: argparse.Namespace, loader: DataLoader) -> int:
    return len(loader.dataset) if args.save_images < 0 else args.save_images


def _load_state(exp_root: Path, epoch: int) -> dict:
    try:
        return load_checkpoint_state(find_snapshots(exp_root, SNAPSHOT_PREFIX)[epoch],
                                     exp_root / f'{STATE_PREFIX}{epoch}.pth')
    except CheckpointError as err:
        raise ValueError(f'cannot resume: {err}. Test it with --epochs {epoch}, start from it with --load-weights '
                         f'<a copy> --overwrite, or start afresh with --overwrite') from None


def _resume_state(exp_root: Path, epoch: int, optimizer, scheduler) -> None:
    state = _load_state(exp_root, epoch)
    optimizer.load_state_dict(state['optimizer'])
    scheduler.load_state_dict(state['scheduler'])
    set_rng_states(state['rng'])
    print(f'resuming after epoch {epoch} (optimizer, scheduler and random states from '
          f'{exp_root / f"{STATE_PREFIX}{epoch}.pth"})')


def _plot(exp_root: Path, measures: Sequence[str]) -> None:
    from tools.plot_log import plot_logs
    output = exp_root / 'log.png'
    plot_logs([exp_root / 'train.log', exp_root / 'test.log'], output, plots=['loss', *measures],
              labels=['train', 'test'])
    print(f'wrote {output}')


# ---------------------------------------------------------------------------------------------- compare / demo
# Every trained model gets the same budget: 7 epochs of 75 batches of 4 crops of 64x64 (x4: 16x16 inputs), lr 1e-3
# then 1e-4 for the last epoch, trained on the measure itself (per-image RMSE). PacJointUpsample starts from the
# colour-guide init: from PyTorch's default init it learns to ignore the guide within such a short run.
DEMO_PRESET = dict(dataset='Synthetic', factor=4, compare=['Bilinear', 'DJIF', 'PacJointUpsample'], epochs=7,
                   lr=1e-3, lr_steps=[6], loss='rmse', color_guide_init=10.0, batch_size=4, train_crop=64,
                   test_batch_size=10, num_data_worker=0, exp_root=os.path.join('exp', 'demo'),
                   synthetic_samples=[300, 50], test_interval=7, log_interval=25, print_interval=1000, overwrite=True)


def compare_model_args(args: argparse.Namespace) -> list[argparse.Namespace]:
    """The flags of each model of ``--compare``: the same, with --model and --exp-root <exp-root>/<model>."""
    runs = []
    for name in args.compare:
        model_args = copy.copy(args)
        model_args.model, model_args.exp_root = name, str(Path(args.exp_root) / name)
        runs.append(model_args)
    return runs


def run_compare(args: argparse.Namespace) -> list[dict]:
    """Run every model of ``--compare`` (each in ``<exp-root>/<model>``), print a results table and draw the
    models' predictions side by side in ``<exp-root>/compare.png``. When no model trains (a test-only run) they
    are ``results_test.txt`` and ``compare_test.png`` instead, so that a training run's files stay."""
    info = DATASETS[args.dataset]
    runs = compare_model_args(args)
    plans = [plan_run(model_args) for model_args in runs]  # every model's problems before any work
    rows, nets = [], {}
    for model_args, plan in zip(runs, plans):
        print(f'\n=== {model_args.model} ===')
        net, result = train_and_test(model_args, plan)
        nets[model_args.model] = net
        rows.append({'model': model_args.model, 'params': sum(p.numel() for p in net.parameters()), **result})
    measures = tuple(args.measures or info.measures)
    headers = {m: measure_label(m, info) for m in measures}
    table = format_table([{headers.get(k, k): v for k, v in row.items()} for row in rows],
                         ['model', 'params', *(headers[m] for m in measures), 'train_seconds'],
                         formats={'train_seconds': '{:.0f}', 'params': '{:,}'})
    print(f'\nx{args.factor} joint upsampling on {args.dataset} ({args.test_split or info.test_split} split, '
          f'{args.epochs} epochs):\n{table}')
    suffix = '' if any(row['trained'] for row in rows) else '_test'
    results = Path(args.exp_root) / f'results{suffix}.txt'
    write_bytes_atomic((table + '\n').encode(), results)
    print(f'wrote {results}')
    print(f'wrote {save_compare_figure(args, info, nets, Path(args.exp_root) / f"compare{suffix}.png")}')
    return rows


@torch.no_grad()
def save_compare_figure(args: argparse.Namespace, info: DatasetInfo, nets: dict[str, nn.Module], path: Path,
                        count: int = 3) -> Path:
    """The first ``count`` test samples with every model's prediction and its per-sample error, as one PNG."""
    device = resolve_device(args.device)
    _, loader = build_loaders(args, info, device, need_train=False)
    batch = default_collate([loader.dataset[i] for i in range(min(count, len(loader.dataset)))])
    measure = tuple(args.measures or info.measures)[0]
    preds, captions = {}, {}
    for name, net in nets.items():
        net.eval()
        _, preds[name], target, raw_range = forward_batch(net, batch, args, info, device)
        captions[name] = [format_measures([measure], compute_measures([measure], preds[name][i:i + 1],
                                                                        target[i:i + 1], info), info)
                          for i in range(target.shape[0])]
    low_raw = denormalize(batch[0].to(device), raw_range)
    return save_comparison(path, info.kind, batch[1], low_raw, preds, target, captions)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog='python -m task_jointUpsampling.main', description='Joint upsampling',
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add('--factor', type=int, default=8, help='upsampling factor')
    add('--data-root', type=str, default='data', help='where data is found or downloaded')
    add('--exp-root', type=str, default='exp', help='output folder (snapshots, logs, images)')
    add('--download', action='store_true', default=False, help='download the dataset if it is missing')
    add('--load-weights', type=str, default='',
        help='state_dict to load strictly: a path, URL or registry name (x8_pac = depth_x8_pac or flow_x8_pac)')
    add('--model', type=str, default='PacJointUpsample', help=f'one of {", ".join(MODEL_NAMES)}')
    add('--dataset', type=str, default='NYUDepthV2', choices=sorted(DATASETS), help='dataset (Sintel = clean pass)')
    add('--lowres-mode', type=str, default='', choices=('',) + LOWRES_MODES,
        help="low-res sampling; '' = center (depth) / bilinear (Sintel)")
    add('--zero-guidance', action='store_true', default=False, help='zero the guide (ablation)')
    add('--loss', type=str, default='l2', choices=('l2', 'rmse', 'epe'), help='training loss')
    add('--measures', type=str, nargs='+', default=None, choices=('rmse', 'epe'),
        help='None = rmse (depth, in cm) / epe (Sintel, in px)')
    add('--num-data-worker', type=int, default=4, help='DataLoader workers')
    add('--val-ratio', type=float, default=0.0, help='NYU: fraction of the first 1000 images held out as val')
    add('--train-split', type=str, default='', help="'' = train")
    add('--test-split', type=str, default='', help="'' = test (NYU, Synthetic) / val (Sintel)")
    add('--batch-size', type=int, default=1)
    add('--test-batch-size', type=int, default=1)
    add('--train-crop', type=int, default=256, help='training crop size; <= 0: no crop')
    add('--eval-border', type=int, default=-1, help='border excluded from loss and measures; < 0 = 6 (depth) / 0')
    add('--epochs', type=int, default=0, help='0 = test only')
    add('--optimizer', type=str, default='Adam', choices=('Adam', 'SGD'))
    add('--lr', type=float, default=1e-4)
    add('--lr-steps', type=int, nargs='+', default=None, help='epochs at which lr is multiplied by 0.1')
    add('--overwrite', action='store_true', default=False, help='train afresh: delete existing snapshots, restart the logs (refused when --load-weights names one '
        'of those snapshots; a test-only run deletes nothing)')
    add('--weight-decay', type=float, default=0.0)
    add('--momentum', type=float, default=0.5, help='SGD only')
    add('--seed', type=int, default=1, help='seeds Python, NumPy and torch')
    add('--print-interval', type=int, default=100, help='batches between printed lines')
    add('--log-interval', type=int, default=100, help='batches between train.log rows')
    add('--test-interval', type=int, default=10, help='epochs between tests')
    add('--snapshot-interval', type=int, default=100, help='epochs between snapshots (the last epoch always)')
    # additions to the 2019 flags
    add('--device', type=str, default='auto', help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")
    add('--nyu-url', type=str, default='',
        help=f'NYU .mat source (URL or local file) for --download; default ${NYU_URL_ENV}, else the original URL')
    add('--save-images', type=int, nargs='?', const=-1, default=0, metavar='N',
        help='write guide / input / prediction / ground-truth PNGs of the first N test samples (no N: all) to '
             'images/ (images_test/ for a test-only run)')
    add('--compare', type=str, nargs='+', default=None, metavar='MODEL',
        help='train/test each model in <exp-root>/<model>; print a results table and write results.txt and '
             'compare.png (results_test.txt and compare_test.png when no model trains)')
    add('--synthetic-size', type=int, default=128, help='Synthetic: scene size in pixels')
    add('--synthetic-samples', type=int, nargs=2, default=[400, 50], metavar=('TRAIN', 'TEST'),
        help='Synthetic: number of train and test scenes')
    add('--synthetic-seed', type=int, default=0, help='Synthetic: seed of the scenes (independent of --seed)')
    add('--color-guide-init', type=float, default=0.0, metavar='SCALE',
        help='PAC models trained from scratch: start every adaptive kernel as a colour kernel of this scale '
             '(models.init_color_guide_; 10 suits guides in [0, 1]); 0 = PyTorch default init, as in 2019')
    add('--non-strict', action='store_true', default=False,
        help='--load-weights: load the tensors that fit and list the rest (default: any mismatch is an error)')
    add('--debug', action='store_true', default=False,
        help=f'show the traceback of an error (or set {DEBUG_ENV}=1); without it an error is a short message')
    add('--save-format', type=str, default='pth', choices=('pth', 'safetensors'),
        help='format of the weights_epoch_<n> snapshots (pth: torch.save, as in 2019; safetensors needs '
             'the safetensors package); both load with --load-weights and resume')
    add('--demo', action='store_true', default=False,
        help='train and compare Bilinear, DJIF and PacJointUpsample on Synthetic (a few CPU minutes); '
             'explicit flags override the preset: ' + ' '.join(f'{k}={v}' for k, v in DEMO_PRESET.items()))
    return parser


# image sizes (H, W) of the datasets: the training crop must fit (Synthetic: --synthetic-size)
_IMAGE_SIZES = {'NYUDepthV2': (480, 640), 'Sintel': (436, 1024)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags: every combination that can be checked before work starts is checked here."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if '--demo' in argv:
        parser.set_defaults(**DEMO_PRESET)  # the preset replaces defaults only: explicit flags still win
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag for any bad value or combination."""
    for name in ('factor', 'batch_size', 'test_batch_size', 'print_interval', 'log_interval', 'test_interval',
                 'synthetic_size'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    for name in ('epochs', 'num_data_worker', 'snapshot_interval'):
        if getattr(args, name) < 0:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 0, got {getattr(args, name)}')
    for name, low, strict in (('lr', 0.0, True), ('weight_decay', 0.0, False), ('momentum', 0.0, False),
                              ('color_guide_init', 0.0, False)):
        value = getattr(args, name)
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise ValueError(f'--{name.replace("_", "-")} must be a finite number {">" if strict else ">="} {low:g}, '
                             f'got {value}')
    if not (math.isfinite(args.val_ratio) and 0 <= args.val_ratio < 1):
        raise ValueError(f'--val-ratio must be in [0, 1), got {args.val_ratio}')
    for name in ('seed', 'synthetic_seed'):
        if not 0 <= getattr(args, name) < 2 ** 32:
            raise ValueError(f'--{name.replace("_", "-")} must be in [0, 2**32), got {getattr(args, name)}')
    if any(step < 1 for step in args.lr_steps or ()):
        raise ValueError(f'--lr-steps must be epochs >= 1, got {args.lr_steps}')
    if min(args.synthetic_samples) < 1:
        raise ValueError(f'--synthetic-samples needs >= 1 train and test scenes, got {args.synthetic_samples}')
    if args.save_images < -1:
        raise ValueError(f'--save-images must be >= 0 (or given without a number: all), got {args.save_images}')
    if DATASETS[args.dataset].kind == 'depth' and ('epe' in (args.measures or ()) or args.loss == 'epe'):
        raise ValueError(f'epe (end-point error) needs a flow dataset (Sintel*), got --dataset {args.dataset}')
    try:
        import weights
        weights.check_save_format(args.save_format)
    except ImportError as err:
        raise ValueError(f'--save-format: {err}') from None
    names = args.compare or [args.model]
    if len(set(names)) != len(names):
        raise ValueError(f'--compare lists a model twice: {" ".join(names)}')
    if args.compare and args.load_weights and len(names) > 1:
        raise ValueError('--load-weights loads one model; it cannot go with --compare of several models')
    with torch.random.fork_rng(devices=[]):  # builds each model (cheap): a bad name fails now, not after training
        for name in names:
            create_model(name, args.factor, channels=1 if DATASETS[args.dataset].kind == 'depth' else 2)
    if args.epochs > 0 and args.train_crop > 0:
        if args.train_crop % args.factor:
            raise ValueError(f'--train-crop must be a multiple of --factor {args.factor}, got {args.train_crop}')
        size = (args.synthetic_size,) * 2 if args.dataset == 'Synthetic' else \
            _IMAGE_SIZES['Sintel' if args.dataset.startswith('Sintel') else args.dataset]
        if args.train_crop > min(size):
            hint = ' (or a larger --synthetic-size)' if args.dataset == 'Synthetic' else ''
            raise ValueError(f'--train-crop {args.train_crop} is larger than the {args.dataset} images ({size[0]}x'
                             f'{size[1]}); pass --train-crop <= {min(size)}{hint}, or <= 0 for whole images')


def main(argv: Sequence[str] | None = None):
    args = parse_args(argv)
    if args.compare:
        return run_compare(args)
    return run(args)


if __name__ == '__main__':
    sys.exit(run_cli(main, 'task_jointUpsampling.main'))
