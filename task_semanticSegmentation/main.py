"""Train / evaluate segmentation models on PASCAL VOC (or the generated Synthetic set).

Examples (the README commands of the PAC paper)::

    # test the converted caffe FCN-8s on the VOC2011 "seg11valid" split
    python -m task_semanticSegmentation.main --data-root data/voc --exp-root exp/voc --download \\
        --load-weights fcn8s_from_caffe.pth --model fcn8s --test-split val11_sbd --test-crop -1

    # run on a CPU without any download
    python -m task_semanticSegmentation.main --dataset Synthetic --model tinyfcn --epochs 2 --device cpu

Outputs in ``--exp-root``: ``train.log`` / ``test.log`` (CSV), ``weights_epoch_<e>.pth`` (``.safetensors``
with ``--save-format safetensors``) and ``<optimizer>_epoch_<e>.pth`` snapshots (training resumes from them), and
with ``--eval pred|raw`` ``outputs_<split>_<eval>/<id>.png|.npy``. The training loop, resume policy, logs and
torchrun support are the shared harness of ``tools.experiment``; the task is ``task_semanticSegmentation.task``.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from tools import experiment
from tools.cli import ArgumentParser, add_common_arguments, check_common_args, parse_checked, run_cli
from .datasets import DeepLabEvalInputs
from .metrics import MEASURES, make_loss
from .models import GRAMMAR, parse_model_name
# the log columns and load_weights are re-exported: part of the program's API (tests)
from .task import (DATASETS, TEST_COLUMNS, TRAIN_COLUMNS, SegmentationTask, reseed_worker_transform,  # noqa: F401
                   load_weights, make_dataset, write_predictions)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows the defaults, and the grammar epilog with its line breaks."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='python -m task_semanticSegmentation.main', description='Semantic segmentation',
                       formatter_class=_HelpFormatter, epilog=GRAMMAR)
    add_common_arguments(p, dict(
        data_root='data', exp_root='exp', load_weights='', model='fcn8s', dataset='VOC2012', dataset_choices=DATASETS,
        num_data_worker=4, device='auto', num_threads=0, val_ratio=0.0, train_split='', test_split='', batch_size=1,
        test_batch_size=1, train_crop=449, epochs=0, optimizer='Adam', loss='ce', lr=0.001, weight_decay=0.0,
        momentum=0.5, seed=-1, print_interval=10, log_interval=10, test_interval=1, snapshot_interval=1,
        save_format='pth'), help=dict(
        data_root="VOC root is <data-root>/VOCdevkit, SBD root <data-root>/benchmark_RELEASE; or give "
                  "'voc_root,sbd_root'",
        load_weights='whole-model weights: path, URL or registry name (e.g. fcn8s_from_caffe); an error when '
                     '--exp-root holds snapshots to resume (add --overwrite)',
        model='model name, see the grammar below',
        dataset='Synthetic: generated scenes, no download, for CPU demos and tests',
        val_ratio='accepted for compatibility; unused', train_split="'' = train_aug (VOC2012) / train (Synthetic)",
        test_split="'' = val", train_crop='square training crop (zero padded)', loss="'ce' or 'fce_<t>' (forgiving CE)",
        non_strict='--load-weights(-backbone): load the tensors that fit and list the rest (default: any mismatch is '
                   'an error)'))
    p.add_argument('--load-weights-backbone', type=str, default='',
                   help='weights for model.backbone (models with a CRF): path, URL or registry name')
    p.add_argument('--gpu', type=int, default=None, help='GPU index (same as --device cuda:<gpu>)')
    p.add_argument('--eval', type=str, default='', choices=['', 'pred', 'raw'],
                   help='write predictions (palette PNG) or raw logits (.npy) instead of scoring; test only')
    p.add_argument('--test-crop', type=int, default=513, help='square test crop; <= 0: whole images')
    p.add_argument('--train-aug-scale', type=float, default=0.0, help='> 0: random scale in (1-a, 1+a)')
    p.add_argument('--train-aug-color', action='store_true', help='colour jitter (0.1, 0.1, 0.1, 0.01)')
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject inconsistent arguments early, with the flag named."""
    check_common_args(args)
    if args.test_crop <= 0 and args.test_batch_size > 1:
        raise ValueError('--test-crop <= 0 (whole images of different sizes) needs --test-batch-size 1, '
                         f'got {args.test_batch_size}')
    if args.train_crop <= 0 and args.batch_size > 1 and args.epochs > 0:
        raise ValueError(f'--train-crop <= 0 needs --batch-size 1, got {args.batch_size}')
    if args.train_aug_scale < 0 or args.train_aug_scale >= 1:
        raise ValueError(f'--train-aug-scale must be in [0, 1), got {args.train_aug_scale}')
    if args.gpu is not None and args.gpu < 0:
        raise ValueError(f'--gpu must be a GPU index >= 0, got {args.gpu}')
    make_loss(args.loss)  # validates --loss
    spec = parse_model_name(args.model)  # validates --model, showing the grammar
    if args.load_weights_backbone and spec.crf is None:
        raise ValueError(f'--load-weights-backbone is for models with a CRF; {args.model!r} has none '
                         '(use --load-weights)')


# --------------------------------------------------------------------------------------------------
# Program
# --------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> Dict[str, float]:
    """Run the checked flags; returns the last test's measures ({} for --eval runs)."""
    if args.gpu is not None:
        args.device = f'cuda:{args.gpu}'
    place, device, seed = experiment.prepare(args)
    if place.is_writer:
        print(f'seed {seed}, device {device}')
    task = SegmentationTask(args, seed)
    task.place, task.device = place, device  # experiment.run sets them too; the model is built first here
    model = task.build_model()
    plan = experiment.plan_run(args, task, model)
    if args.eval:
        if place.is_writer:  # under torchrun, rank 0 writes every prediction
            predict(args, task, model, plan, device)
        return {}
    result = experiment.run(task, place, device, seed, plan, model).result
    return {m: result[m] for m in MEASURES}


def predict(args: argparse.Namespace, task: SegmentationTask, model: nn.Module, plan: experiment.Plan,
            device: torch.device) -> None:
    """--eval pred|raw: write one output file per image of the test split."""
    if plan.resume_from is not None:
        task.load_snapshot(model, experiment.find_snapshots(args.exp_root)[plan.resume_from], plan.resume_from)
    else:
        task.load_weights(model, args.load_weights, strict=not args.non_strict)
    dataset = make_dataset(args, task.test_split, DeepLabEvalInputs(args.test_crop, seed=task.seed), f'{task.seed}-test')
    loader = DataLoader(dataset, args.test_batch_size, num_workers=args.num_data_worker,
                        worker_init_fn=reseed_worker_transform)
    out_dir = Path(args.exp_root) / f'outputs_{task.test_split}_{args.eval}'
    count = write_predictions(model.to(device), loader, out_dir, args.eval, device)
    print(f'{count} outputs written to {out_dir}')


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Run the program; returns the last test's measures ({} for --eval runs)."""
    return run(parse_checked(build_parser(), argv, check_args))


if __name__ == '__main__':
    sys.exit(run_cli(main, 'task_semanticSegmentation.main'))
