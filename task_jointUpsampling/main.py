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

The training loop, resume policy, logs and torchrun support are the shared harness of ``tools.experiment``;
this file holds the task: data, models, loss, measures, and ``--compare`` / ``--demo``.

Units: NYU and Synthetic depths are in metres; their RMSE is reported (printed and logged) in centimetres.
Sintel flow and its EPE are in pixels of the full-resolution frame.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import default_collate

from task_jointUpsampling.datasets import (LOWRES_MODES, NYU_URL_ENV, AssembleJointUpsamplingInputs, NYUDepthV2,
                                           Sintel, center_crop)
from task_jointUpsampling.models import (MODEL_NAMES, PacJointUpsample, create_model, init_color_guide_, th_epe,
                                         th_rmse)
from task_jointUpsampling.synthetic import Synthetic
from task_jointUpsampling.visualize import save_comparison, save_sample_images
from tools import experiment
from tools.cli import ArgumentParser, add_common_arguments, check_common_args, parse_checked, run_cli
from tools.runtime import format_table, resolve_device, write_bytes_atomic


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


def measure_label(name: str, info: DatasetInfo) -> str:
    return f'{name} ({info.unit})' if name == 'rmse' else f'{name} (px)'


def format_measures(names: Sequence[str], values: Sequence[float], info: DatasetInfo) -> str:
    return ', '.join(f'{measure_label(n, info)} {v:.4f}' for n, v in zip(names, values))


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


# ---------------------------------------------------------------------------------------------- the task
class JointUpsamplingTask(experiment.Task):
    """Joint upsampling for :mod:`tools.experiment`: per-image errors summed over the test set."""
    drop_last = True
    state_prefixes = ('state_epoch_',)  # state_epoch_<n>.pth: optimizer, scheduler and RNG states for resuming

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.info = DATASETS[args.dataset]
        self.measures = tuple(args.measures)
        self.train_columns = self.test_columns = ['epoch', 'lr', 'loss', *self.measures]
        self.train_formats = self.test_formats = ['{:.6f}', '{:g}', '{:.6f}'] + ['{:.6f}'] * len(self.measures)
        border = self.info.eval_border if args.eval_border < 0 else args.eval_border
        self.inputs = dict(normalize_target=True, output_crop=border, lowres_mode=args.lowres_mode or
                           self.info.lowres_mode, zero_guidance=args.zero_guidance)
        self.label = f'{args.model} x{args.factor} {args.dataset}'
        self._train_set = None
        self.image_dir = None

    def build_model(self) -> nn.Module:
        return build_model(self.args, 1 if self.info.kind == 'depth' else 2)

    def has_initial_weights(self, model: nn.Module) -> bool:
        return getattr(model, 'hand_set', False)  # e.g. JBU: its initial weights are the model

    def load_weights(self, model: nn.Module, spec: str, strict: bool) -> None:
        load_weights(model, spec, self.info, strict=strict)

    def train_set(self, epoch: int):
        if self._train_set is None:
            crop = self.args.train_crop if self.args.train_crop > 0 else None
            transform = AssembleJointUpsamplingInputs(self.args.factor, crop=crop, flip=True, **self.inputs)
            self._train_set = build_dataset(self.args, self.args.train_split or 'train', transform, True)
        return self._train_set

    def test_set(self):
        transform = AssembleJointUpsamplingInputs(self.args.factor, crop=None, flip=False, **self.inputs)
        dataset = build_dataset(self.args, self.args.test_split or self.info.test_split, transform, False)
        self.test_size = len(dataset)
        return dataset

    def forward(self, model, batch):
        lres, guide, target, raw_range = (t.to(self.device, non_blocking=True) for t in batch)
        output = center_crop(apply_model(model, lres, guide, self.args.factor), target.shape[-2:])
        return output, denormalize(output, raw_range), target, raw_range

    def train_step(self, model, batch):
        output, pred_raw, target, raw_range = self.forward(model, batch)
        return compute_loss(self.args.loss, output, pred_raw, target, raw_range), (pred_raw.detach(), target)

    def train_meter(self, epoch: int, lr: float, batches: int) -> experiment.TrainMeter:
        return WindowMeter(self, lr)

    def test_sums(self, model, loader, desc, save_images):
        loss, errors, count = 0.0, np.zeros(len(self.measures)), 0
        for batch in experiment.tqdm(loader, desc=f'{desc} {self.label}', leave=False, dynamic_ncols=True):
            output, pred_raw, target, raw_range = self.forward(model, batch)
            n = target.shape[0]  # batch means times n: the sums of the per-image losses and errors
            loss += compute_loss(self.args.loss, output, pred_raw, target, raw_range).item() * n
            errors += np.asarray(compute_measures(self.measures, pred_raw, target, self.info)) * n
            if count < save_images:
                keep = min(n, save_images - count)
                low_raw = denormalize(batch[0][:keep].to(pred_raw.device), raw_range[:keep])
                save_sample_images(self.image_dir, count, self.info.kind, batch[1][:keep], low_raw, pred_raw[:keep],
                                   target[:keep])
            count += n
        return {'loss': loss, 'errors': torch.as_tensor(errors, dtype=torch.float64), 'count': count}

    def test_result(self, sums):
        count = float(sums['count'])
        values = (torch.as_tensor(sums['errors'], dtype=torch.float64) / count).tolist()
        return {'loss': float(sums['loss']) / count, **dict(zip(self.measures, values))}

    def test_row(self, epoch, lr, result):
        return [epoch, lr, result['loss'], *(result[m] for m in self.measures)]

    def report(self, epoch, result):
        values = format_measures(self.measures, [result[m] for m in self.measures], self.info)
        prefix = f'epoch {epoch} ' if epoch is not None else ''
        experiment.tqdm.write(f'{prefix}test {self.label}: loss {result["loss"]:.6f}, {values}')

    def num_images(self, test_only: bool) -> int:
        self.image_dir = Path(self.args.exp_root) / ('images_test' if test_only else 'images')  # keeps training's
        return self.test_size if self.args.save_images < 0 else self.args.save_images


class WindowMeter(experiment.TrainMeter):
    """train.log rows: the mean loss and measures of the batches since the last row."""

    def __init__(self, task: JointUpsamplingTask, lr: float):
        self.task, self.lr = task, lr
        self.loss, self.values, self.count = 0.0, np.zeros(len(task.measures)), 0

    def update(self, loss, output, batch, seconds, data_seconds):
        pred_raw, target = output
        self.loss += loss.item()
        self.values += compute_measures(self.task.measures, pred_raw, target, self.task.info)
        self.count += 1

    def row(self, progress):
        row = [progress, self.lr, self.loss / self.count, *(self.values / self.count)]
        self.loss, self.values, self.count = 0.0, np.zeros(len(self.task.measures)), 0
        return row


def plan_run(args: argparse.Namespace) -> experiment.Plan:
    """The run's plan (see :func:`tools.experiment.plan_run`), checked before any work."""
    task = JointUpsamplingTask(args)
    with torch.random.fork_rng(devices=[]):
        return experiment.plan_run(args, task, task.build_model())


def train_and_test(args: argparse.Namespace, plan: experiment.Plan | None = None) -> tuple[nn.Module, dict]:
    """Train and/or test one model as the flags say; (model, final test loss and measures)."""
    place, device, seed = experiment.prepare(args)
    task = JointUpsamplingTask(args)
    run = experiment.run(task, place, device, seed, plan)
    return run.model, {**run.result, 'epoch': run.epoch, 'train_seconds': run.train_seconds, 'trained': run.trained}


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
    task = JointUpsamplingTask(args)
    task.device = resolve_device(args.device)
    dataset = task.test_set()
    batch = default_collate([dataset[i] for i in range(min(count, len(dataset)))])
    measure = tuple(args.measures or info.measures)[0]
    preds, captions = {}, {}
    for name, net in nets.items():
        net.eval()
        _, preds[name], target, raw_range = task.forward(net, batch)
        captions[name] = [format_measures([measure], compute_measures([measure], preds[name][i:i + 1],
                                                                        target[i:i + 1], info), info)
                          for i in range(target.shape[0])]
    low_raw = denormalize(batch[0].to(raw_range.device), raw_range)
    return save_comparison(path, info.kind, batch[1], low_raw, preds, target, captions)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog='python -m task_jointUpsampling.main', description='Joint upsampling',
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add_common_arguments(parser, dict(
        data_root='data', exp_root='exp', load_weights='', model='PacJointUpsample', dataset='NYUDepthV2',
        dataset_choices=sorted(DATASETS), num_data_worker=4, device='auto', num_threads=0, val_ratio=0.0,
        train_split='', test_split='', batch_size=1, test_batch_size=1, train_crop=256, epochs=0, optimizer='Adam',
        loss='l2', loss_choices=('l2', 'rmse', 'epe'), lr=1e-4, weight_decay=0.0, momentum=0.5, seed=1,
        print_interval=100, log_interval=100, test_interval=10, snapshot_interval=100, save_format='pth'), help=dict(
        load_weights='state_dict to start from, loaded strictly: a path, URL or registry name (x8_pac = depth_x8_pac '
                     'or flow_x8_pac); an error when --exp-root holds snapshots to resume (add --overwrite)',
        model=f'one of {", ".join(MODEL_NAMES)}', dataset='dataset (Sintel = clean pass)',
        val_ratio='NYU: fraction of the first 1000 images held out as val', train_split="'' = train",
        test_split="'' = test (NYU, Synthetic) / val (Sintel)", train_crop='training crop size; <= 0: no crop'))
    # additions to the 2019 flags of both tasks

    add('--factor', type=int, default=8, help='upsampling factor')
    add('--lowres-mode', type=str, default='', choices=('',) + LOWRES_MODES,
        help="low-res sampling; '' = center (depth) / bilinear (Sintel)")
    add('--zero-guidance', action='store_true', default=False, help='zero the guide (ablation)')
    add('--measures', type=str, nargs='+', default=None, choices=('rmse', 'epe'),
        help='None = rmse (depth, in cm) / epe (Sintel, in px)')
    add('--eval-border', type=int, default=-1, help='border excluded from loss and measures; < 0 = 6 (depth) / 0')
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
    args = parse_checked(parser, argv, check_args)
    args.measures = tuple(args.measures or DATASETS[args.dataset].measures)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag for any bad value or combination."""
    check_common_args(args)
    for name in ('factor', 'synthetic_size'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if not (np.isfinite(args.color_guide_init) and args.color_guide_init >= 0):
        raise ValueError(f'--color-guide-init must be a finite number >= 0, got {args.color_guide_init}')
    if not 0 <= args.synthetic_seed < 2 ** 32:
        raise ValueError(f'--synthetic-seed must be in [0, 2**32), got {args.synthetic_seed}')
    if min(args.synthetic_samples) < 1:
        raise ValueError(f'--synthetic-samples needs >= 1 train and test scenes, got {args.synthetic_samples}')
    if args.save_images < -1:
        raise ValueError(f'--save-images must be >= 0 (or given without a number: all), got {args.save_images}')
    if DATASETS[args.dataset].kind == 'depth' and ('epe' in (args.measures or ()) or args.loss == 'epe'):
        raise ValueError(f'epe (end-point error) needs a flow dataset (Sintel*), got --dataset {args.dataset}')
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
    return train_and_test(args)[1]


if __name__ == '__main__':
    sys.exit(run_cli(main, 'task_jointUpsampling.main'))
