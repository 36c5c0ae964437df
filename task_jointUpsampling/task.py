"""The joint upsampling task as :mod:`tools.experiment` runs it: datasets, model plumbing, loss, per-image measures.

``task_jointUpsampling.main`` is the program; this module holds what it trains and tests.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from task_jointUpsampling.datasets import AssembleJointUpsamplingInputs, NYUDepthV2, Sintel, center_crop
from task_jointUpsampling.models import (DJIF, PacJointUpsample, create_model, init_color_guide_, init_passthrough_,
                                         th_epe, th_rmse)
from task_jointUpsampling.synthetic import Synthetic
from task_jointUpsampling.visualize import save_sample_images
from tools import experiment


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


def build_dataset(args: argparse.Namespace, split: str, transform: Callable, training: bool, family: str = ''):
    """The dataset named by ``--dataset`` for ``split``, samples passed through ``transform``. Synthetic scenes
    are of ``family`` (default ``--synthetic-family``), their low-res input sampled from the sensor depth."""
    if args.dataset == 'NYUDepthV2':
        return NYUDepthV2(args.data_root, split=split, val_ratio=args.val_ratio, transform=transform,
                          cache_all=training, download=args.download, url=args.nyu_url or None)
    if args.dataset == 'Synthetic':
        num_train, num_test = args.synthetic_samples
        return Synthetic(split=split, num_samples=num_train if training else num_test, size=args.synthetic_size,
                         seed=args.synthetic_seed, transform=transform, family=family or args.synthetic_family,
                         sensor=True)
    image_pass = 'clean' if args.dataset == 'Sintel' else args.dataset.split('-', 1)[1]
    return Sintel(args.data_root, split=split, fields=(f'{image_pass}_1', 'flow'), transform=transform,
                  cache_all=training, download=args.download)


# ---------------------------------------------------------------------------------------------- model plumbing
def build_model(args: argparse.Namespace, channels: int) -> nn.Module:
    """The ``--model``; DJIF and PAC models start as upsamplers with ``--passthrough-init``, PAC models from the
    colour-guide init when ``--color-guide-init`` is set."""
    net = create_model(args.model, args.factor, channels=channels, guide_channels=3,
                       normalize_kernel=args.normalize_kernel)
    if args.passthrough_init and isinstance(net, (DJIF, PacJointUpsample)):
        init_passthrough_(net)
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
    if spec in weights.REGISTRY and getattr(net, 'normalize_kernel', False):
        raise ValueError(f'--load-weights {spec}: the released weights were trained without normalised kernels; '
                         f'drop --normalize-kernel')
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

    def test_set(self, split: str = '', family: str = ''):
        """The test set; ``split`` and ``family`` (Synthetic) replace ``--test-split`` and ``--synthetic-family``."""
        transform = AssembleJointUpsamplingInputs(self.args.factor, crop=None, flip=False, **self.inputs)
        dataset = build_dataset(self.args, split or self.args.test_split or self.info.test_split, transform, False,
                                family)
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
        for batch in tqdm(loader, desc=f'{desc} {self.label}', leave=False, dynamic_ncols=True):
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
        tqdm.write(f'{prefix}test {self.label}: loss {result["loss"]:.6f}, {values}')

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
