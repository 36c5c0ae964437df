"""The segmentation task as :mod:`tools.experiment` runs it: data, weights loading, loss, the confusion matrix.

``task_semanticSegmentation.main`` is the program; this module holds what it trains and tests.
"""
import argparse
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from tools import experiment
from tools.runtime import atomic_open
from weights import load_into, load_state_dict
from .datasets import DeepLabInputs, PascalVOC, decode_id
from .metrics import MEASURES, ConfusionMeter, make_loss, seg_measures
from .models import create_model, parse_model_name, trainable_parameters
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


def reseed_worker_transform(worker_id: int) -> None:
    """Give every DataLoader worker its own augmentation stream, derived from the run's torch seed."""
    info = get_worker_info()
    transform = getattr(info.dataset, 'transform', None)
    if hasattr(transform, 'reseed'):
        transform.reseed(info.seed % 2 ** 32)


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



# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------
class SegmentationTask(experiment.Task):
    """Semantic segmentation for :mod:`tools.experiment`: test sums are the loss and the confusion matrix."""
    train_columns, train_formats, test_columns, test_formats = TRAIN_COLUMNS, TRAIN_FORMATS, TEST_COLUMNS, TEST_FORMATS
    measures = MEASURES
    state_prefixes = ('adam_epoch_', 'sgd_epoch_')  # <optimizer>_epoch_<n>.pth, as the 2019 optimizer files

    def __init__(self, args: argparse.Namespace, seed: int):
        super().__init__(args)
        self.seed, self.spec, self.loss_fn = seed, parse_model_name(args.model), make_loss(args.loss)
        self.train_split = args.train_split or ('train' if args.dataset == 'Synthetic' else 'train_aug')
        self.test_split = args.test_split or 'val'
        self.worker_init_fn = reseed_worker_transform
        aug_scale = (1 - args.train_aug_scale, 1 + args.train_aug_scale) if args.train_aug_scale > 0 else None
        self.train_transform = DeepLabInputs(args.train_crop, pad_label=True, seed=seed, aug_flip=True,
                                             aug_scale=aug_scale,
                                             aug_color=COLOR_JITTER if args.train_aug_color else None)
        self._train_set = None

    def state_prefix(self) -> str:
        return f'{self.args.optimizer.lower()}_epoch_'

    def build_model(self) -> nn.Module:
        model = create_model(self.args.model, NUM_CLASSES)
        if self.args.load_weights_backbone:
            load_weights(model.backbone, self.args.load_weights_backbone, 'backbone', strict=not self.args.non_strict)
        return model

    def parameters(self, model):
        return trainable_parameters(model)

    def check_plan(self, plan: experiment.Plan) -> None:
        """A model never runs with weights nobody asked for: a frozen backbone must come from a file."""
        starts_from_file = self.args.load_weights and plan.resume_from is None
        if self.spec.frozen and not self.args.load_weights_backbone and not starts_from_file:
            raise ValueError(f'{self.args.model!r} has a frozen backbone, but no --load-weights-backbone: it would '
                             'test or train a CRF on a random backbone (snapshots of frozen backbones omit it)')
        if self.args.eval and not plan.test_only:
            raise ValueError(f'--eval {self.args.eval} writes predictions and needs a test-only run '
                             f'(--epochs 0 or <= the last snapshot), got --epochs {self.args.epochs}')

    def load_weights(self, model, spec, strict):
        load_weights(model, spec, 'model', strict=strict, fill_backbone=bool(self.args.load_weights_backbone))

    def load_snapshot(self, model, path, epoch):
        load_weights(model, str(path), f'snapshot {epoch}', fill_backbone=bool(self.args.load_weights_backbone))

    def snapshot_weights(self, model):
        return {k: v for k, v in model.state_dict().items() if not (self.spec.frozen and k.startswith('backbone'))}

    def train_set(self, epoch: int) -> Dataset:
        if self._train_set is None or '_rand' in self.train_split:  # _rand<N>: a fresh subset every epoch
            rank = f'-rank{self.place.rank}' if self.place.enabled else ''  # each rank its own augmentation
            self.train_transform.reseed(f'{self.seed}-transform-{epoch}{rank}')
            self._train_set = make_dataset(self.args, self.train_split, self.train_transform,
                                           subset_seed=f'{self.seed}-subset-{epoch}')
        return self._train_set

    def test_set(self) -> Dataset:
        transform = DeepLabInputs(self.args.test_crop, pad_label=self.args.test_batch_size > 1, seed=self.seed + 1)
        return make_dataset(self.args, self.test_split, transform, f'{self.seed}-test')

    def train_step(self, model, batch):
        image, target = (t.to(self.device) for t in batch)
        output = model(image, target.shape[-2:])
        return self.loss_fn(output, target), (output.detach(), target)

    def train_meter(self, epoch, lr, batches):
        return ConfusionTrainMeter(epoch, lr)

    def test_sums(self, model, loader, desc, save_images):
        meter = ConfusionMeter(NUM_CLASSES)
        loss_sum, samples, time_total, time_data = 0.0, 0, 0.0, 0.0
        end = time.time()
        for image, target in tqdm(loader, desc=desc, leave=False, disable=not self.place.is_writer or None):
            image, target = image.to(self.device), target.to(self.device)
            time_data += time.time() - end
            output = model(image, target.shape[-2:])
            loss_sum += self.loss_fn(output, target).item() * image.shape[0]
            samples += image.shape[0]
            meter.add(output.argmax(1), target)
            time_total += time.time() - end
            end = time.time()
        return {'loss': loss_sum, 'confusion': meter.total, 'samples': samples, 'time': time_total,
                'time-data': time_data}

    def test_result(self, sums):
        values, excluded = seg_measures(torch.as_tensor(sums['confusion']).round().long())
        samples = max(float(sums['samples']), 1.0)
        return {'loss': float(sums['loss']) / samples, **values, 'excluded': excluded,
                'time': float(sums['time']) / samples, 'time-data': float(sums['time-data']) / samples}

    def test_row(self, epoch, lr, result):
        return [epoch, lr, result['time'], result['time-data'], result['loss']] + [result[m] for m in MEASURES]

    def report(self, epoch, result):
        report_test(epoch, result['loss'], {m: result[m] for m in MEASURES}, result['excluded'], VOC_CLASSES)


class ConfusionTrainMeter(experiment.TrainMeter):
    """train.log rows: per-sample times, the batch's and the running loss and measures."""

    def __init__(self, epoch: int, lr: float):
        self.epoch, self.lr, self.meter = epoch, lr, ConfusionMeter(NUM_CLASSES)
        self.loss_sum, self.samples, self.time_total, self.time_data = 0.0, 0, 0.0, 0.0

    def update(self, loss, output, batch, seconds, data_seconds):
        logits, target = output
        self.batch_values, _ = seg_measures(self.meter.add(logits.argmax(1), target))
        self.loss = loss.item()
        self.loss_sum += self.loss * target.shape[0]
        self.samples += target.shape[0]
        self.time_total += seconds
        self.time_data += data_seconds

    def row(self, progress):
        running, _ = self.meter.measures()
        return [progress, self.lr, self.time_total / self.samples, self.time_data / self.samples, self.loss,
                self.loss_sum / self.samples] + [v for m in MEASURES for v in (self.batch_values[m], running[m])]

    def summary(self):
        running, _ = self.meter.measures()
        return (f'epoch {self.epoch} train: lr {self.lr:g} loss {self.loss_sum / max(self.samples, 1):.6f} '
                f'{_format_measures(running)}')


def _format_measures(values: Dict[str, float]) -> str:
    return ' '.join(f'{name} {100 * value:.2f}' for name, value in values.items())


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
