"""CPU demo: a PacCRF refines the output of a small segmentation network on Synthetic scenes.

It runs the two-stage recipe of the paper with ``main`` on generated data (no download, no GPU):

1. train the demo backbone ``tinyfcn`` (output stride 8, so object boundaries come out blurry);
2. freeze it and train a PacCRF on top (``tinyfcnfrozen_crfi5p4d531p4d5121``: two 4d kernels, 5x5
   with dilation 3 and 12, sized for the ~80-pixel scenes), with ``--load-weights-backbone``;

then prints the validation mIoU of the unaries (stage 1), of the CRF at its initialisation and of
the trained CRF, and writes ``examples.png`` (image, ground truth, unaries, PacCRF).

Usage::

    python -m task_semanticSegmentation.demo --exp-root exp/synthetic_demo
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from tools.runtime import atomic_savefig, format_table, read_csv_log
from tools.cli import run_cli

from . import main as seg_main
from .palette import colorize
from .synthetic import Synthetic


def run_task(**flags) -> Dict[str, float]:
    """``main.run`` with the program's defaults, the demo's common settings and ``flags`` (checked as the CLI's)."""
    args = seg_main.build_parser().parse_args([])
    vars(args).update(flags)
    seg_main.check_args(args)
    return seg_main.run(args)


def save_examples(figure_path: Path, split: str, columns: Dict[str, Path], count: int = 4) -> None:
    """A PNG grid: image, ground truth and one predicted label map per entry of ``columns``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    dataset = Synthetic(split)
    titles = ['image', 'ground truth'] + list(columns)
    fig, axes = plt.subplots(count, len(titles), figsize=(2.2 * len(titles), 2.2 * count), squeeze=False)
    for row in range(count):
        image, label, image_id = dataset[row]
        panels = [np.asarray(image), colorize(np.asarray(label))]
        panels += [colorize(np.asarray(Image.open(folder / f'{image_id}.png')))
                   for folder in columns.values()]
        for col, panel in enumerate(panels):
            axes[row, col].imshow(panel, interpolation='nearest')
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(titles[col], fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, figure_path, dpi=100)
    plt.close(fig)


def run_demo(exp_root: str = 'exp/synthetic_demo', backbone_epochs: int = 10, crf_epochs: int = 4,
             crf: str = 'crfi5p4d531p4d5121', crf_images_per_epoch: int = 48, seed: int = 0, threads: int = 1
             ) -> List[Dict[str, object]]:
    """Run both stages (resuming finished ones) and return the result rows."""
    start = time.time()
    root = Path(exp_root)
    common = dict(dataset='Synthetic', device='cpu', num_data_worker=0, test_crop=-1, seed=seed, num_threads=threads,
                  print_interval=20, log_interval=20)
    backbone_dir, crf_name = root / 'tinyfcn', f'tinyfcnfrozen_{crf}'
    crf_dir = root / crf_name
    backbone_model = dict(model='tinyfcn', exp_root=str(backbone_dir))
    unary = run_task(**common, **backbone_model, epochs=backbone_epochs, batch_size=8, train_crop=64, lr=0.003,
                     lr_steps=[max(1, backbone_epochs - 2)])
    backbone_weights = str(backbone_dir / f'weights_epoch_{backbone_epochs}.pth')
    crf_model = dict(model=crf_name, exp_root=str(crf_dir), load_weights_backbone=backbone_weights)
    refined = run_task(**common, **crf_model, epochs=crf_epochs, batch_size=4, train_crop=64, lr=0.001,
                       train_split=f'train_rand{crf_images_per_epoch}')
    initial = read_csv_log(crf_dir / 'test.log')
    first = initial['epoch'].index(0.0)
    crf_init = {m: initial[m][first] for m in ('miou', 'acc', 'macc')}
    for model_args in (backbone_model, crf_model):
        run_task(**common, **model_args, eval='pred')
    save_examples(root / 'examples.png', 'val', {'TinyFCN (unaries)': backbone_dir / 'outputs_val_pred',
                                                 'TinyFCN + PacCRF': crf_dir / 'outputs_val_pred'})
    rows = [dict(model='tinyfcn (unaries)', epochs=backbone_epochs, **unary),
            dict(model=f'{crf_name} at init', epochs=0, **crf_init),
            dict(model=f'{crf_name} trained', epochs=crf_epochs, **refined)]
    for row in rows:
        for m in ('miou', 'acc', 'macc'):
            row[m] = 100 * row[m]
    print(format_table(rows, ['model', 'epochs', 'miou', 'acc', 'macc'], float_format='{:.2f}'))
    print(f'Synthetic val (100 images), measured in {time.time() - start:.0f} s; figure: {root / "examples.png"}')
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='PacCRF on Synthetic scenes, on a CPU',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--exp-root', default='exp/synthetic_demo')
    parser.add_argument('--backbone-epochs', type=int, default=10)
    parser.add_argument('--crf-epochs', type=int, default=4)
    parser.add_argument('--crf', default='crfi5p4d531p4d5121',
                        help='CRF part of the model name (kernels sized for ~80-pixel scenes)')
    parser.add_argument('--crf-images-per-epoch', type=int, default=48)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--debug', action='store_true', help='show the traceback of an error')
    args = parser.parse_args(argv)
    run_demo(args.exp_root, args.backbone_epochs, args.crf_epochs, args.crf, args.crf_images_per_epoch,
             args.seed, args.threads)


if __name__ == '__main__':
    sys.exit(run_cli(main, 'task_semanticSegmentation.demo'))
