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
the task (data, models, loss, measures) is ``task_jointUpsampling.task``; this file holds the flags, ``--compare``
and ``--demo``.

Units: NYU and Synthetic depths are in metres; their RMSE is reported (printed and logged) in centimetres.
Sintel flow and its EPE are in pixels of the full-resolution frame.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import default_collate

from task_jointUpsampling.datasets import LOWRES_MODES, NYU_URL_ENV
from task_jointUpsampling.models import MODEL_NAMES, create_model
from task_jointUpsampling.synthetic import FAMILIES
# apply_model, build_model and load_weights are re-exported: part of the program's API (tests, bench)
from task_jointUpsampling.task import (DATASETS, DatasetInfo, JointUpsamplingTask, apply_model,  # noqa: F401
                                       build_model, compute_measures, denormalize, format_measures, load_weights,
                                       measure_label)
from task_jointUpsampling.visualize import save_comparison
from tools import experiment
from tools.cli import ArgumentParser, add_common_arguments, check_common_args, parse_checked, run_cli
from tools.runtime import format_table, resolve_device, write_bytes_atomic


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
# for 5 epochs then 1e-4 (epochs 6 and 7), trained on the measure itself (per-image RMSE), and starts as an
# upsampler of its input (--passthrough-init; PacJointUpsample's upsampling layers are normalised and its kernels
# start as colour kernels, --normalize-kernel --color-guide-init 5: it starts as two stages of joint bilateral
# upsampling). They train on scene family A and are tested on A's test scenes and on the held-out family B. The
# settings were chosen on family A's validation scenes.
DEMO_PRESET = dict(dataset='Synthetic', factor=4, compare=['Bilinear', 'JBU', 'DJIF', 'PacJointUpsample'], epochs=7,
                   lr=1e-3, lr_steps=[6], loss='rmse', passthrough_init=True, normalize_kernel=True,
                   color_guide_init=5.0, batch_size=4,
                   train_crop=64, test_batch_size=10, num_data_worker=0, exp_root=os.path.join('exp', 'demo'),
                   synthetic_samples=[300, 50], synthetic_heldout='B', test_interval=7, log_interval=25,
                   print_interval=1000, overwrite=True)

# `--compare JBU`: the hand-set joint bilateral upsampler of this grid with the lowest error on the validation
# scenes of the training family (never the test scenes); kernel size 4 * factor + 1
JBU_GRID = dict(scale_color=(10.0, 20.0, 40.0), scale_space=(0.15, 0.3, 0.6))


def jbu_grid(factor: int) -> list[str]:
    """The model names of ``JBU_GRID`` at ``factor``."""
    return [f'JBU_{4 * factor + 1}_{color:g}_{space:g}' for color in JBU_GRID['scale_color']
            for space in JBU_GRID['scale_space']]


def evaluate_model(args: argparse.Namespace, net: nn.Module, split: str = '', family: str = '') -> dict:
    """``net``'s loss and measures on the test set, or on ``split`` / Synthetic ``family`` instead."""
    task = JointUpsamplingTask(args)
    place, device = experiment.Distributed(), resolve_device(args.device)
    task.place, task.device = place, device
    loader = experiment.make_loader(task, task.test_set(split, family), args.test_batch_size, False, place, device,
                                    args.seed)
    return experiment.evaluate(task, net.to(device), loader, place, device, desc=f'test {family or split}')


def select_jbu(args: argparse.Namespace) -> str:
    """The name of the JBU of :func:`jbu_grid` with the lowest first measure on the 'val' scenes."""
    measure = args.measures[0]
    scores = {}
    for name in jbu_grid(args.factor):
        model_args = copy.copy(args)
        model_args.model = name
        scores[name] = evaluate_model(model_args, create_model(name, args.factor), split='val')[measure]
    best = min(scores, key=scores.get)
    grid = ', '.join(f'{name} {score:.2f}' for name, score in scores.items())
    print(f'JBU grid on the validation scenes ({measure_label(measure, DATASETS[args.dataset])}): {grid}\n'
          f'selected {best}')
    return best


def compare_model_args(args: argparse.Namespace) -> list[argparse.Namespace]:
    """The flags of each model of ``--compare``: the same, with --model and --exp-root <exp-root>/<model>; a
    hand-set JBU is only tested (--epochs 0): it is the hand-set baseline."""
    runs = []
    for name in args.compare:
        model_args = copy.copy(args)
        model_args.model, model_args.exp_root = name, str(Path(args.exp_root) / name)
        if name.startswith('JBU'):
            model_args.epochs = 0
        runs.append(model_args)
    return runs


def run_compare(args: argparse.Namespace) -> list[dict]:
    """Run every model of ``--compare`` (each in ``<exp-root>/<model>``), print a results table and draw the
    models' predictions side by side in ``<exp-root>/compare.png``. When no model trains (a test-only run) they
    are ``results_test.txt`` and ``compare_test.png`` instead, so that a training run's files stay. ``JBU`` in the
    list is the best of :func:`jbu_grid` on the validation scenes; with ``--synthetic-heldout`` every model is also
    tested on the held-out family (columns ``<measure> heldout``)."""
    start = time.perf_counter()
    info = DATASETS[args.dataset]
    runs = compare_model_args(args)
    plans = [plan_run(model_args) if model_args.model != 'JBU' else None for model_args in runs]  # before any work
    if 'JBU' in args.compare:
        index = args.compare.index('JBU')
        args = copy.copy(args)
        args.compare = [select_jbu(args) if name == 'JBU' else name for name in args.compare]
        runs[index] = compare_model_args(args)[index]
        plans[index] = plan_run(runs[index])
    measures = tuple(args.measures or info.measures)
    rows, nets = [], {}
    for model_args, plan in zip(runs, plans):
        print(f'\n=== {model_args.model} ===')
        net, result = train_and_test(model_args, plan)
        nets[model_args.model] = net
        learned = 0 if getattr(net, 'hand_set', False) else sum(p.numel() for p in net.parameters())
        row = {'model': model_args.model, 'params': learned, **result}
        if args.synthetic_heldout:
            heldout = evaluate_model(model_args, net, family=args.synthetic_heldout)
            row.update({f'{m} heldout': heldout[m] for m in measures})
            values = format_measures(measures, [heldout[m] for m in measures], info)
            print(f'test {model_args.model} on the held-out family {args.synthetic_heldout}: {values}')
        rows.append(row)
    headers = {m: measure_label(m, info) for m in measures}
    if args.dataset == 'Synthetic':
        headers = {m: f'{label} {args.synthetic_family}' for m, label in headers.items()}
        if args.synthetic_heldout:
            headers.update({f'{m} heldout': f'{measure_label(m, info)} {args.synthetic_heldout} (held out)'
                            for m in measures})
    table = format_table([{headers.get(k, k): v for k, v in row.items()} for row in rows],
                         ['model', 'params', *headers.values(), 'train_seconds'],
                         formats={'train_seconds': '{:.0f}', 'params': '{:,}'})
    if not experiment.is_writer():  # under torchrun, rank 0 prints and writes the results
        return rows
    print(f'\nx{args.factor} joint upsampling on {args.dataset} ({args.test_split or info.test_split} split, '
          f'{args.epochs} epochs):\n{table}')
    suffix = '' if any(row['trained'] for row in rows) else '_test'
    results = Path(args.exp_root) / f'results{suffix}.txt'
    write_bytes_atomic((table + '\n').encode(), results)
    print(f'wrote {results}')
    print(f'wrote {save_compare_figure(args, info, nets, Path(args.exp_root) / f"compare{suffix}.png")}')
    print(f'--compare took {time.perf_counter() - start:.0f} s')
    return rows


@torch.no_grad()
def save_compare_figure(args: argparse.Namespace, info: DatasetInfo, nets: dict[str, nn.Module], path: Path,
                        count: int = 3) -> Path:
    """The first ``count`` test samples (with --synthetic-heldout: two of the test family, two held out) with
    every model's prediction and its per-sample error, as one PNG."""
    task = JointUpsamplingTask(args)
    task.device = resolve_device(args.device)
    if args.dataset == 'Synthetic' and args.synthetic_heldout:
        sets = [(args.synthetic_family, task.test_set()), (args.synthetic_heldout,
                                                            task.test_set(family=args.synthetic_heldout))]
        samples = [sample for _, dataset in sets for sample in (dataset[i] for i in range(min(2, len(dataset))))]
        labels = [f'family {family}' for family, dataset in sets for _ in range(min(2, len(dataset)))]
    else:
        dataset = task.test_set()
        samples = [dataset[i] for i in range(min(count, len(dataset)))]
        labels = None
    batch = default_collate(samples)
    measure = tuple(args.measures or info.measures)[0]
    preds, captions = {}, {}
    for name, net in nets.items():
        net.eval()
        _, preds[name], target, raw_range = task.forward(net, batch)
        captions[name] = [format_measures([measure], compute_measures([measure], preds[name][i:i + 1],
                                                                        target[i:i + 1], info), info)
                          for i in range(target.shape[0])]
    low_raw = denormalize(batch[0].to(raw_range.device), raw_range)
    return save_comparison(path, info.kind, batch[1], low_raw, preds, target, captions, row_labels=labels)


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
             'compare.png (results_test.txt and compare_test.png when no model trains); JBU (Synthetic) = the best '
             'of the JBU grid on the validation scenes: ' + ' '.join(jbu_grid(4)) + ' at x4')
    add('--synthetic-size', type=int, default=128, help='Synthetic: scene size in pixels')
    add('--synthetic-samples', type=int, nargs=2, default=[400, 50], metavar=('TRAIN', 'TEST'),
        help='Synthetic: number of train and test scenes')
    add('--synthetic-seed', type=int, default=0, help='Synthetic: seed of the scenes (independent of --seed)')
    add('--synthetic-family', type=str, default='A', choices=tuple(FAMILIES),
        help='Synthetic: the scene family to train and test on (synthetic.FAMILIES)')
    add('--synthetic-heldout', type=str, default='', choices=('',) + tuple(FAMILIES),
        help='Synthetic, --compare: also test every model on this held-out family')
    add('--color-guide-init', type=float, default=0.0, metavar='SCALE',
        help='PAC models trained from scratch: start every adaptive kernel as a colour kernel of this scale '
             '(models.init_color_guide_; 10 suits guides in [0, 1]); 0 = PyTorch default init, as in 2019')
    add('--normalize-kernel', action='store_true', default=False,
        help='PAC models: normalise the adaptive kernels of the upsampling layers (PacConvTranspose2d '
             'normalize_kernel=True): each output is a kernel-weighted average; default off, as in 2019 and the '
             'released weights; weights trained with it need it to be tested')
    add('--passthrough-init', action='store_true', default=False,
        help='DJIF and PAC models trained from scratch start as upsamplers of their input (DJIF: bilinear; PAC with '
             '--color-guide-init: colour-guided), models.init_passthrough_; default: PyTorch init, as in 2019')
    add('--demo', action='store_true', default=False,
        help='train and compare Bilinear, the best hand-set JBU, DJIF and PacJointUpsample on Synthetic, tested '
             'on the training family and a held-out one (a few CPU minutes); '
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
    if 'JBU' in names and args.dataset != 'Synthetic':
        raise ValueError(f'--compare JBU selects on Synthetic validation scenes; name one (JBU_<ks>_<scale_color>_'
                         f'<scale_space>) for --dataset {args.dataset}')
    if args.synthetic_heldout and not (args.dataset == 'Synthetic' and args.compare):
        raise ValueError('--synthetic-heldout needs --dataset Synthetic and --compare')
    with torch.random.fork_rng(devices=[]):  # builds each model (cheap): a bad name fails now, not after training
        for name in (n for n in names if n != 'JBU'):
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
