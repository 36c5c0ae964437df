"""Segmentation metrics from a dataset-wide confusion matrix (label 255 ignored) and the losses."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .palette import IGNORE_LABEL

__all__ = ['fast_conf', 'seg_measures', 'ConfusionMeter', 'MEASURES', 'make_loss']

MEASURES = ('miou', 'acc', 'macc')


def fast_conf(pred: torch.Tensor, gt: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confusion matrix (rows: ground truth, columns: prediction) of the pixels with 0 <= gt < n.

    Args:
        pred: predicted labels, any shape.
        gt: ground-truth labels, same shape; values outside [0, n) (e.g. 255) are ignored.
        num_classes: n.

    Shape:
        Output: (n, n) int64.

    Example:
        >>> fast_conf(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 255]), 2)
        tensor([[1, 0],
                [0, 1]])
    """
    if pred.shape != gt.shape:
        raise ValueError(f'pred and gt must have the same shape, got {tuple(pred.shape)} and {tuple(gt.shape)}')
    pred, gt = pred.reshape(-1).long(), gt.reshape(-1).long()
    valid = (gt >= 0) & (gt < num_classes)
    if bool(((pred[valid] < 0) | (pred[valid] >= num_classes)).any()):
        raise ValueError(f'pred holds labels outside [0, {num_classes})')
    index = gt[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes).cpu()


def seg_measures(conf: torch.Tensor, measures: Sequence[str] = MEASURES) -> Tuple[Dict[str, float], List[int]]:
    """mIoU, pixel accuracy and mean class accuracy of a confusion matrix.

    Classes absent from both the ground truth and the prediction (empty union) have no defined IoU:
    they are left out of the means (the 2019 code returned NaN instead) and returned as a list.

    Args:
        conf: (n, n) confusion matrix, rows = ground truth.
        measures: any of 'miou', 'acc', 'macc'.

    Returns:
        ({measure: value}, sorted list of the excluded classes). Values are NaN for an empty matrix.

    Example:
        >>> values, excluded = seg_measures(torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
        >>> round(values['miou'], 4), round(values['acc'], 4), excluded
        (0.7083, 0.8333, [2])
    """
    unknown = set(measures) - set(MEASURES)
    if unknown:
        raise ValueError(f'measures must be among {MEASURES}, got {sorted(unknown)}')
    conf = conf.double()
    tp, gt_count, pred_count = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt_count + pred_count - tp
    present = union > 0
    in_gt = gt_count > 0
    nan = float('nan')
    values = {
        'miou': (tp[present] / union[present]).mean().item() if present.any() else nan,
        'acc': (tp.sum() / conf.sum()).item() if conf.sum() > 0 else nan,
        # class accuracy is defined for classes that occur in the ground truth
        'macc': (tp[in_gt] / gt_count[in_gt]).mean().item() if in_gt.any() else nan,
    }
    excluded = [int(c) for c in torch.nonzero(~present).flatten()]
    return {m: values[m] for m in measures}, excluded


class ConfusionMeter:
    """Accumulates confusion matrices over batches; ``measures()`` gives the dataset-level values."""

    def __init__(self, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')
        self.num_classes = num_classes
        self.total = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def add(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns the batch's own confusion matrix."""
        conf = fast_conf(pred, gt, self.num_classes)
        self.total += conf
        return conf

    def measures(self, measures: Sequence[str] = MEASURES) -> Tuple[Dict[str, float], List[int]]:
        return seg_measures(self.total, measures)


def make_loss(name: str):
    """Loss function ``loss(logits (B, C, H, W), target (B, H, W))`` for ``--loss``.

    - ``'ce'``: cross-entropy, label 255 ignored.
    - ``'fce_<t>'``: "forgiving" cross-entropy: pixels whose CE is below -ln(t) (predicted probability of
      the true class above t) contribute 0; the mean runs over all pixels, ignored ones counting 0.
    """
    if name == 'ce':
        return lambda logits, target: F.cross_entropy(logits, target, ignore_index=IGNORE_LABEL)
    if name.startswith('fce_'):
        try:
            threshold = float(name[len('fce_'):])
        except ValueError:
            threshold = -1.0
        if not 0 < threshold <= 1:
            raise ValueError(f"--loss 'fce_<t>' needs a probability 0 < t <= 1, got {name!r}")
        floor = -torch.log(torch.tensor(threshold)).item()

        def forgiving_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            pixel_loss = F.cross_entropy(logits, target, ignore_index=IGNORE_LABEL, reduction='none')
            return torch.where(pixel_loss < floor, torch.zeros_like(pixel_loss), pixel_loss).mean()
        return forgiving_ce
    raise ValueError(f"--loss must be 'ce' or 'fce_<t>' (e.g. fce_0.9), got {name!r}")
