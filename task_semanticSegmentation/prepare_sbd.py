"""Convert the SBD class annotations (``dataset/cls/<id>.mat``) to VOC-palette PNGs.

SBD stores each label map as the ``Segmentation`` field of a MATLAB struct ``GTcls``. This writes
``dataset/cls_png/<id>.png`` ('P' mode, VOC palette) for every id of SBD's train and val lists, so that
SBD images can be read like VOC ones. Existing PNGs are kept, so an interrupted run resumes.

Usage::

    python -m task_semanticSegmentation.prepare_sbd data/voc/benchmark_RELEASE [--out DIR]
"""
import argparse
from pathlib import Path
from typing import Iterable, List, Optional, Union

import numpy as np
import scipy.io
from tqdm import tqdm

from .palette import save_label_png

__all__ = ['sbd_ids', 'load_sbd_label', 'sbd_annotation_to_png']


def sbd_ids(sbd_dir: Union[str, Path]) -> List[str]:
    """Sorted union of the ids in ``dataset/train.txt`` and ``dataset/val.txt`` of SBD."""
    dataset = Path(sbd_dir) / 'dataset'
    ids = set()
    for name in ('train.txt', 'val.txt'):
        path = dataset / name
        if not path.is_file():
            raise FileNotFoundError(f'{path} does not exist: sbd_dir must be the benchmark_RELEASE folder')
        ids.update(line.strip() for line in path.read_text().splitlines() if line.strip())
    return sorted(ids)


def load_sbd_label(mat_path: Union[str, Path]) -> np.ndarray:
    """The (H, W) uint8 class map ``GTcls.Segmentation`` of an SBD ``.mat`` file."""
    mat = scipy.io.loadmat(str(mat_path), squeeze_me=True, struct_as_record=False)
    if 'GTcls' not in mat:
        raise ValueError(f'{mat_path}: expected a struct named GTcls, found {sorted(k for k in mat if not k.startswith("__"))}')
    return np.asarray(mat['GTcls'].Segmentation, dtype=np.uint8)


def sbd_annotation_to_png(sbd_dir: Union[str, Path], target_dir: Optional[Union[str, Path]] = None,
                          progress: bool = True, overwrite: bool = False) -> int:
    """Write ``<target_dir>/<id>.png`` for every SBD train/val id; returns how many were written.

    Args:
        sbd_dir: the benchmark_RELEASE folder.
        target_dir: output folder (default ``<sbd_dir>/dataset/cls_png``).
        progress: show a tqdm bar.
        overwrite: rewrite PNGs that already exist.
    """
    sbd_dir = Path(sbd_dir)
    target_dir = Path(target_dir) if target_dir else sbd_dir / 'dataset' / 'cls_png'
    target_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for image_id in tqdm(sbd_ids(sbd_dir), desc='SBD .mat -> png', disable=not progress):
        png = target_dir / f'{image_id}.png'
        if png.is_file() and not overwrite:
            continue
        save_label_png(load_sbd_label(sbd_dir / 'dataset' / 'cls' / f'{image_id}.mat'), png)
        written += 1
    return written


def main(argv: Optional[Iterable[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='Convert SBD .mat class labels to VOC-palette PNGs')
    parser.add_argument('sbd_dir', help='the benchmark_RELEASE folder')
    parser.add_argument('--out', default=None, help='output folder (default: <sbd_dir>/dataset/cls_png)')
    args = parser.parse_args(argv)
    print(f'{sbd_annotation_to_png(args.sbd_dir, args.out)} label PNGs written')


if __name__ == '__main__':
    main()
