"""PASCAL VOC 2012 / SBD segmentation data, the VOC2011 split lists and the DeepLab-style transforms.

Layout under a data root (``--data-root data/voc``)::

    data/voc/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}   (VOC2012 tar)
    data/voc/benchmark_RELEASE/dataset/{img,cls,cls_png,train.txt,val.txt}              (SBD tgz)
    data/voc/voc11seg/{train,val,trainval,seg11valid}.txt                               (VOC2011 lists)

Everything is downloaded with ``--download`` (checksum-verified, resumable, safe extraction). The
VOC2012 test images are not publicly downloadable: get ``VOC2012test.tar`` from the evaluation server
and extract it into the data root.

Command line (download / prepare without training)::

    python -m task_semanticSegmentation.datasets data/voc --all
"""
import argparse
import hashlib
import json
import math
import numbers
import random
import re
import tarfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import Dataset

from tools.download import download_and_extract, download_url
from tools.runtime import atomic_open
from .palette import IGNORE_LABEL, NUM_VOC_CLASSES
from .prepare_sbd import sbd_annotation_to_png

__all__ = ['MEAN_RGB', 'VOC_URL', 'VOC_MD5', 'VOC_TEST_URL', 'VOC_TEST_MD5', 'SBD_URL', 'SBD_MD5',
           'SPLITS', 'PascalVOC', 'DeepLabInputs', 'DeepLabEvalInputs', 'split_ids', 'fetch_voc11_lists',
           'voc11_manifest', 'decode_id', 'encode_id', 'image_to_array', 'subset_ids', 'parse_rand_split']

MEAN_RGB = (122.675, 116.669, 104.008)  # ImageNet means of the caffe VGG models, RGB order
VOC_URL = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar'
VOC_MD5 = '6cd6e144f989b92b3379bac3b3de84fd'
VOC_TEST_URL = 'http://host.robots.ox.ac.uk:8080/eval/downloads/VOC2012test.tar'  # needs a login
VOC_TEST_MD5 = '9065beb292b6c291fad82b2725749fda'
SBD_URL = ('http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/'
           'benchmark.tgz')
SBD_MD5 = '82b4d87ceb2ed10f6038a1cba92111cb'
MANIFEST_PATH = Path(__file__).resolve().parents[1] / 'meta' / 'voc11seg_manifest.json'

VOC12_SPLITS = ('train', 'val', 'trainval', 'test')
VOC11_SPLITS = {'train11': 'train.txt', 'val11': 'val.txt', 'trainval11': 'trainval.txt',
                'val11_sbd': 'seg11valid.txt'}
SBD_SPLITS = ('train_aug', 'trainval_aug', 'train11_sbd')
SPLITS = VOC12_SPLITS + tuple(VOC11_SPLITS) + SBD_SPLITS
_RAND_SUFFIX = re.compile(r'^(?P<base>.+)_rand(?P<count>\d*)$')
Seed = Optional[Union[int, str]]  # anything random.Random accepts; None: fresh randomness


# --------------------------------------------------------------------------------------------------
# Split lists
# --------------------------------------------------------------------------------------------------
def read_ids(path: Union[str, Path]) -> List[str]:
    """Image ids of a list file, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'split list {path} does not exist (use --download, or see the '
                                f'data layout in task_semanticSegmentation/datasets.py)')
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def voc11_manifest() -> dict:
    """Sources and md5s of the VOC2011 split lists (``meta/voc11seg_manifest.json``)."""
    return json.loads(MANIFEST_PATH.read_text())


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _voc11_help(dest_dir: Path) -> str:
    manifest = voc11_manifest()
    files = ', '.join(f'{name} (md5 {entry["md5"]})' for name, entry in manifest['files'].items())
    return (f'Supply them by hand: put {files} into {dest_dir} (one image id per line, trailing newline). '
            f'train/val/trainval.txt are VOC2011/ImageSets/Segmentation/* of the VOC2011 release '
            f'({manifest["sources"]["voc2011_tar"]["url"]}); seg11valid.txt is data/pascal/seg11valid.txt '
            f'of the FCN repository ({manifest["sources"]["seg11valid"]["url"]}). Or point '
            f'`python -m task_semanticSegmentation.datasets <root> --voc11 --voc2011-tar PATH_OR_URL '
            f'--seg11valid-url URL` at other copies.')


def voc11_list(dest_dir: Union[str, Path], filename: str) -> List[str]:
    """Ids of a VOC2011 list in ``dest_dir``, after checking the file's md5 against the manifest."""
    dest_dir = Path(dest_dir)
    entry = voc11_manifest()['files'][filename]
    path = dest_dir / filename
    if not path.is_file():
        raise FileNotFoundError(f'VOC2011 split list {path} is missing; run with --download to fetch it. '
                                + _voc11_help(dest_dir))
    got = _md5(path.read_bytes())
    if got != entry['md5']:
        raise ValueError(f'VOC2011 split list {path} has md5 {got}, expected {entry["md5"]}. '
                         + _voc11_help(dest_dir))
    return read_ids(path)


def _read_tar_members(tar_path: Path, wanted: Dict[str, str]) -> Dict[str, bytes]:
    """Read the members whose path ends with a key of ``wanted`` ({suffix: name}); {name: bytes}."""
    found = {}
    with tarfile.open(tar_path, 'r|*') as tar:  # streaming: stops reading once everything is found
        for member in tar:
            for suffix, name in wanted.items():
                if member.isfile() and member.name.endswith(suffix) and name not in found:
                    found[name] = tar.extractfile(member).read()
            if len(found) == len(wanted):
                break
    return found


def fetch_voc11_lists(dest_dir: Union[str, Path], voc2011_tar: Optional[str] = None,
                      seg11valid_url: Optional[str] = None, download_root: Optional[Union[str, Path]] = None,
                      progress: bool = True) -> Dict[str, Path]:
    """Fetch the VOC2011 split lists from their public sources into ``dest_dir`` and check their md5s.

    Args:
        dest_dir: where train.txt, val.txt, trainval.txt and seg11valid.txt are written.
        voc2011_tar: URL or local path of the VOC2011 trainval tar (default: the manifest URL). The tar
            is large (about 1.7 GB): a URL is downloaded resumably into ``download_root``, a local file is
            read in place; the three lists are read from it as it streams.
        seg11valid_url: URL or local path of seg11valid.txt (default: the manifest URL).
        download_root: folder for the tar (default: ``dest_dir``).
        progress: show progress bars.

    Returns:
        {file name: path} of the four verified lists.

    Raises:
        ValueError: a list does not match its md5 (the message says how to supply it by hand).
    """
    dest_dir = Path(dest_dir)
    manifest = voc11_manifest()
    files = manifest['files']
    paths = {name: dest_dir / name for name in files}
    missing = [name for name, path in paths.items()
               if not path.is_file() or _md5(path.read_bytes()) != files[name]['md5']]
    from_tar = [name for name in missing if files[name]['source'] == 'voc2011_tar']
    contents: Dict[str, bytes] = {}
    if from_tar:
        source = manifest['sources']['voc2011_tar']
        downloaded = not (voc2011_tar and Path(voc2011_tar).is_file())
        if downloaded:  # no published checksum: download_url checks its length and that it is a whole tar
            tar_path = download_url(voc2011_tar or source['url'], download_root or dest_dir, progress=progress,
                                    file_format='tar')
        else:  # a local copy is read in place
            tar_path = Path(voc2011_tar)
        contents.update(_read_tar_members(tar_path, {source['member_dir'] + n: n for n in from_tar}))
        bad = [n for n in from_tar if n not in contents or _md5(contents[n]) != files[n]['md5']]
        if bad:
            if downloaded:  # a damaged or wrong download: do not reuse it next time
                tar_path.unlink()
            raise ValueError(f'{tar_path} is not the VOC2011 trainval tar: {", ".join(bad)} '
                             f'{"is" if len(bad) == 1 else "are"} missing from it or differ'
                             f'{" (the downloaded file was deleted; run again to download it again)" if downloaded else ""}. '
                             + _voc11_help(dest_dir))
    if 'seg11valid.txt' in missing:
        url = seg11valid_url or manifest['sources']['seg11valid']['url']
        # Downloaded under a temporary name so that a wrong file never sits at the final path.
        tmp = download_url(url, dest_dir, filename='seg11valid.txt.download', progress=progress)
        contents['seg11valid.txt'] = tmp.read_bytes()
        tmp.unlink()
    for name in missing:
        data = contents.get(name)
        if data is None:
            raise ValueError(f'{name} was not found in the VOC2011 tar. ' + _voc11_help(dest_dir))
        if _md5(data) != files[name]['md5']:
            raise ValueError(f'{name} from its source has md5 {_md5(data)}, expected {files[name]["md5"]}. '
                             + _voc11_help(dest_dir))
        with atomic_open(paths[name], 'wb') as handle:
            handle.write(data)
    return paths


def parse_rand_split(split: str) -> Tuple[str, Optional[int]]:
    """Split a ``<base>_rand<N>`` name into (base, N); N is 0 for an empty N, None without the suffix.

    Example:
        >>> parse_rand_split('train_aug_rand1500'), parse_rand_split('val')
        (('train_aug', 1500), ('val', None))
    """
    match = _RAND_SUFFIX.match(split)
    return (match.group('base'), int(match.group('count') or 0)) if match else (split, None)


def subset_ids(ids: Sequence, count: int, seed: Seed) -> List:
    """``count`` ids drawn without replacement (all ids shuffled when count is 0), from ``seed``."""
    rng = random.Random(seed)
    ids = list(ids)
    if count < 0 or count > len(ids):
        raise ValueError(f'_rand<N>: N must be in [0, {len(ids)}] for this split, got {count}')
    return rng.sample(ids, count or len(ids))


def split_ids(split: str, voc_root: Union[str, Path], sbd_root: Union[str, Path] = '',
              voc11_dir: Optional[Union[str, Path]] = None, seed: Seed = None) -> List[str]:
    """Sorted image ids of a split (see :data:`SPLITS`); ``<split>_rand<N>`` draws a seeded subset.

    Args:
        split: e.g. 'train', 'val11_sbd', 'train_aug', 'train_aug_rand1500'.
        voc_root: the VOCdevkit folder.
        sbd_root: the benchmark_RELEASE folder (for the *_aug / *_sbd splits).
        voc11_dir: folder of the VOC2011 lists (default: ``<voc_root>/../voc11seg``).
        seed: seed of the ``_rand<N>`` subset (None: fresh randomness).
    """
    base, count = parse_rand_split(split)
    if count is not None:
        return subset_ids(split_ids(base, voc_root, sbd_root, voc11_dir), count, seed)
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS} (optionally with a _rand<N> suffix), got {split!r}')
    voc_lists = Path(voc_root) / 'VOC2012' / 'ImageSets' / 'Segmentation'
    voc11_dir = Path(voc11_dir) if voc11_dir else Path(voc_root).parent / 'voc11seg'
    if split in VOC12_SPLITS:
        if split == 'test' and not (voc_lists / 'test.txt').is_file():
            raise FileNotFoundError(f'{voc_lists / "test.txt"} is missing: the VOC2012 test set is not '
                                    f'publicly downloadable; get VOC2012test.tar (md5 {VOC_TEST_MD5}) from '
                                    f'the evaluation server and extract it next to VOCdevkit')
        return sorted(read_ids(voc_lists / f'{split}.txt'))
    if split in VOC11_SPLITS:
        return sorted(voc11_list(voc11_dir, VOC11_SPLITS[split]))
    sbd_train, sbd_val = (set(read_ids(Path(sbd_root) / 'dataset' / f'{s}.txt')) for s in ('train', 'val'))
    if split == 'train11_sbd':
        return sorted(set(voc11_list(voc11_dir, 'train.txt')) | sbd_train)
    voc_val = set(read_ids(voc_lists / 'val.txt'))
    train_aug = (set(read_ids(voc_lists / 'train.txt')) | sbd_train | sbd_val) - voc_val
    return sorted(train_aug | voc_val if split == 'trainval_aug' else train_aug)


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------
def download_voc(voc_root: Union[str, Path], progress: bool = True) -> None:
    """Download and extract the VOC2012 trainval tar so that ``voc_root`` (…/VOCdevkit) exists."""
    voc_root = Path(voc_root)
    if voc_root.name != 'VOCdevkit':
        raise ValueError(f'voc_root must end in "VOCdevkit" (the tar extracts into its parent), got {voc_root}')
    if not (voc_root / 'VOC2012' / 'ImageSets' / 'Segmentation' / 'val.txt').is_file():
        download_and_extract(VOC_URL, voc_root.parent, md5=VOC_MD5, progress=progress)


def download_sbd(sbd_root: Union[str, Path], progress: bool = True) -> None:
    """Download and extract SBD into ``sbd_root`` (…/benchmark_RELEASE) and convert its labels to PNG."""
    sbd_root = Path(sbd_root)
    if sbd_root.name != 'benchmark_RELEASE':
        raise ValueError(f'sbd_root must end in "benchmark_RELEASE" (the tgz extracts into its parent), '
                         f'got {sbd_root}')
    if not (sbd_root / 'dataset' / 'val.txt').is_file():
        download_and_extract(SBD_URL, sbd_root.parent, md5=SBD_MD5, progress=progress)
    sbd_annotation_to_png(sbd_root, progress=progress)


class PascalVOC(Dataset):
    """PASCAL VOC 2012 segmentation, augmented with SBD for the *_aug / *_sbd splits.

    Args:
        root: the VOCdevkit folder (must end in 'VOCdevkit' when downloading).
        sbd_root: the SBD benchmark_RELEASE folder (only needed by train_aug, trainval_aug, train11_sbd).
        split: one of :data:`SPLITS`, optionally with a ``_rand<N>`` suffix (N random ids; all ids
            shuffled for N empty or 0).
        transform: called as ``transform(image, label, image_id)`` with PIL images (label None when
            the split has no labels); without it the tuple (image, label, image_id) is returned.
        download: fetch what the split needs (VOC2012, SBD, VOC2011 lists) when missing.
        voc11_dir: folder of the VOC2011 lists (default ``<root>/../voc11seg``).
        seed: seed of the ``_rand<N>`` subset.

    Example:
        >>> ds = PascalVOC('data/voc/VOCdevkit', split='val', transform=DeepLabInputs(513))  # doctest: +SKIP
        >>> image, label = ds[0]                                                           # doctest: +SKIP
    """
    num_classes = NUM_VOC_CLASSES

    def __init__(self, root: Union[str, Path], sbd_root: Union[str, Path] = '', split: str = 'train',
                 transform: Optional[Callable] = None, download: bool = False,
                 voc11_dir: Optional[Union[str, Path]] = None, seed: Seed = None):
        self.root = Path(root)
        self.sbd_root = Path(sbd_root) if sbd_root else None
        self.split = split
        self.transform = transform
        base, _ = parse_rand_split(split)
        if base not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS} (optionally with a _rand<N> suffix), got {split!r}')
        if base in SBD_SPLITS and self.sbd_root is None:
            raise ValueError(f'split {split!r} uses SBD: pass sbd_root (…/benchmark_RELEASE)')
        self.voc11_dir = Path(voc11_dir) if voc11_dir else self.root.parent / 'voc11seg'
        if download:
            self._download(base)
        self.ids = split_ids(split, self.root, self.sbd_root or '', self.voc11_dir, seed)

    def _download(self, base: str) -> None:
        download_voc(self.root)
        if base in SBD_SPLITS:
            download_sbd(self.sbd_root)
        if base in VOC11_SPLITS or base == 'train11_sbd':
            fetch_voc11_lists(self.voc11_dir)

    def __len__(self) -> int:
        return len(self.ids)

    def _paths(self, image_id: str) -> Tuple[Path, Optional[Path]]:
        voc = self.root / 'VOC2012'
        label = voc / 'SegmentationClass' / f'{image_id}.png'
        if label.is_file() or 'test' in self.split:
            return voc / 'JPEGImages' / f'{image_id}.jpg', (label if label.is_file() else None)
        if self.sbd_root is None:
            raise FileNotFoundError(f'label {label} does not exist and no SBD root was given')
        sbd = self.sbd_root / 'dataset'
        image, label = sbd / 'img' / f'{image_id}.jpg', sbd / 'cls_png' / f'{image_id}.png'
        if not image.is_file() or not label.is_file():
            raise FileNotFoundError(f'{image_id}: neither VOC2012 nor SBD ({image}, {label}) has it; '
                                    f'SBD labels are made by `python -m task_semanticSegmentation.prepare_sbd`')
        return image, label

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image_path, label_path = self._paths(image_id)
        image = Image.open(image_path).convert('RGB')
        label = Image.open(label_path) if label_path is not None else None
        if self.transform is None:
            return image, label, image_id
        return self.transform(image, label, image_id)


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------
def image_to_array(image: Image.Image, use_bgr: bool = True) -> np.ndarray:
    """RGB PIL image -> (3, H, W) float32, mean-subtracted (0-255 scale), BGR channel order by default."""
    array = np.asarray(image.convert('RGB'), dtype=np.float32) - np.asarray(MEAN_RGB, dtype=np.float32)
    array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array[::-1] if use_bgr else array)


def _crop_size(size: Optional[int]) -> Optional[int]:
    """The crop side of a transform: None (whole image) for None or <= 0."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral)):
        raise TypeError(f'size: expected an int (<= 0 or None: whole image), got {size!r}')
    return int(size) if size is not None and size > 0 else None


def _crop_offset(rng: random.Random, length: int, size: int) -> int:
    return rng.randint(0, max(0, length - size))


def _crop_pad(array: np.ndarray, top: int, left: int, size: int, fill: float) -> np.ndarray:
    """size x size window of the last two dims at (top, left), filling the part past the edges."""
    h, w = min(size, array.shape[-2] - top), min(size, array.shape[-1] - left)
    out = np.full(array.shape[:-2] + (size, size), fill, dtype=array.dtype)
    out[..., :h, :w] = array[..., top:top + h, left:left + w]
    return out


def _adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    hsv = np.array(image.convert('HSV'))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(shift * 255))) % 256
    return Image.fromarray(hsv, mode='HSV').convert('RGB')


def color_jitter(image: Image.Image, rng: random.Random, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Image.Image:
    """Random brightness / contrast / saturation / hue changes in random order (like ColorJitter)."""
    ops = []
    for amount, enhancer in ((brightness, ImageEnhance.Brightness), (contrast, ImageEnhance.Contrast),
                             (saturation, ImageEnhance.Color)):
        if amount > 0:
            factor = rng.uniform(max(0.0, 1 - amount), 1 + amount)
            ops.append(lambda im, e=enhancer, f=factor: e(im).enhance(f))
    if hue > 0:
        shift = rng.uniform(-hue, hue)
        ops.append(lambda im, s=shift: _adjust_hue(im, s))
    rng.shuffle(ops)
    for op in ops:
        image = op(image)
    return image


class _SeededTransform:
    """Holds a private ``random.Random`` (global ``random`` is never reseeded)."""

    def __init__(self, seed: Seed = None):
        self.rng = random.Random(seed)

    def reseed(self, seed: Seed) -> None:
        """Restart the transform's random stream (e.g. per DataLoader worker)."""
        self.rng.seed(seed)


class DeepLabInputs(_SeededTransform):
    """Training / testing transform: augment, mean-subtract, BGR, random crop with zero padding.

    Args:
        size: crop size; the image is padded with zeros (= the mean colour) at the bottom / right to
            size x size. None or <= 0 keeps the whole image.
        use_bgr: channel order BGR (the caffe models' order).
        pad_label: pad the label to size x size with ``ignore_label`` (otherwise it keeps only the
            valid region and can be smaller than the image).
        ignore_label: label of padding.
        seed: seed of this transform's private RNG (flip, scale, colour, crop offsets).
        aug_flip: random horizontal flip (p = 0.5).
        aug_scale: (low, high) random rescale factor range, or None.
        aug_color: (brightness, contrast, saturation, hue) jitter amounts, or None.

    Call:
        ``transform(image, label, image_id)`` with PIL images -> (image (3, S, S) float32,
        label (S, S) int64), S = size (label smaller without pad_label).

    Example:
        >>> t = DeepLabInputs(4, pad_label=True, seed=0)
        >>> img, lbl = t(Image.new('RGB', (3, 2)), Image.new('L', (3, 2)), 'x')
        >>> img.shape, lbl[-1].tolist()
        (torch.Size([3, 4, 4]), [255, 255, 255, 255])
    """

    def __init__(self, size: Optional[int] = None, use_bgr: bool = True, pad_label: bool = False,
                 ignore_label: int = IGNORE_LABEL, seed: Seed = None, aug_flip: bool = False,
                 aug_scale: Optional[Tuple[float, float]] = None,
                 aug_color: Optional[Tuple[float, float, float, float]] = None):
        super().__init__(seed)
        if aug_scale is not None and not (len(aug_scale) == 2 and 0 < aug_scale[0] <= aug_scale[1] < math.inf):
            raise ValueError(f'aug_scale must be (low, high) with 0 < low <= high, finite, got {aug_scale!r}')
        if aug_color is not None and (len(aug_color) != 4 or not all(math.isfinite(a) and a >= 0 for a in aug_color)):
            raise ValueError(f'aug_color must be (brightness, contrast, saturation, hue), finite and >= 0, '
                             f'got {aug_color!r}')
        self.size = _crop_size(size)
        self.use_bgr = use_bgr
        self.pad_label = pad_label
        self.ignore_label = ignore_label
        self.aug_flip = aug_flip
        self.aug_scale = aug_scale
        self.aug_color = aug_color

    def __call__(self, image: Image.Image, label: Optional[Image.Image], image_id: str = ''):
        if label is None:
            raise ValueError(f'DeepLabInputs needs a label (image {image_id!r} has none); use '
                             f'DeepLabEvalInputs for unlabelled images')
        if image.size != label.size:
            raise ValueError(f'image {image_id!r}: image size {image.size} != label size {label.size}')
        if self.aug_flip and self.rng.random() < 0.5:
            image, label = (im.transpose(Image.FLIP_LEFT_RIGHT) for im in (image, label))
        if self.aug_scale is not None:
            scale = self.rng.uniform(*self.aug_scale)
            size = (max(1, int(scale * image.width)), max(1, int(scale * image.height)))
            image, label = image.resize(size, Image.BILINEAR), label.resize(size, Image.NEAREST)
        if self.aug_color is not None:
            image = color_jitter(image, self.rng, *self.aug_color)
        image = image_to_array(image, self.use_bgr)
        label = np.asarray(label, dtype=np.int64)
        if self.size is not None:
            top, left = (_crop_offset(self.rng, n, self.size) for n in image.shape[1:])
            image = _crop_pad(image, top, left, self.size, 0.0)
            if self.pad_label:
                label = _crop_pad(label, top, left, self.size, self.ignore_label)
            else:
                label = label[top:top + self.size, left:left + self.size].copy()
        return torch.from_numpy(image), torch.from_numpy(label)


def encode_id(image_id: str, length: int = 32) -> torch.Tensor:
    """An image id as an int64 tensor of character codes, zero-padded to ``length`` (collatable)."""
    codes = [ord(c) for c in image_id]
    if len(codes) > length or 0 in codes:
        raise ValueError(f'image id must have at most {length} non-NUL characters, got {image_id!r}')
    return torch.tensor(codes + [0] * (length - len(codes)), dtype=torch.int64)


def decode_id(codes: torch.Tensor) -> str:
    """Inverse of :func:`encode_id`."""
    return ''.join(chr(c) for c in codes.tolist() if c != 0)


class DeepLabEvalInputs(_SeededTransform):
    """Prediction transform: like :class:`DeepLabInputs` (no augmentation) but keeps the id and size.

    Call:
        ``transform(image, label_or_None, image_id)`` -> (image (3, S, S) float32,
        encoded id (see :func:`decode_id`), original size tensor [H, W]).
    """

    def __init__(self, size: Optional[int] = None, use_bgr: bool = True, seed: Seed = None):
        super().__init__(seed)
        self.size = _crop_size(size)
        self.use_bgr = use_bgr

    def __call__(self, image: Image.Image, label: Optional[Image.Image] = None, image_id: str = ''):
        array = image_to_array(image, self.use_bgr)
        original_size = torch.tensor(array.shape[1:], dtype=torch.int64)
        if self.size is not None:
            top, left = (_crop_offset(self.rng, n, self.size) for n in array.shape[1:])
            array = _crop_pad(array, top, left, self.size, 0.0)
        return torch.from_numpy(array), encode_id(image_id), original_size


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def main(argv: Optional[Iterable[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='Download and prepare PASCAL VOC / SBD segmentation data',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('root', help='data root holding VOCdevkit, benchmark_RELEASE and voc11seg')
    parser.add_argument('--voc12seg', action='store_true', help='VOC2012 trainval tar')
    parser.add_argument('--sbd', action='store_true', help='SBD tgz and its PNG labels')
    parser.add_argument('--voc11', action='store_true', help='VOC2011 split lists')
    parser.add_argument('--all', action='store_true', help='all of the above')
    parser.add_argument('--voc2011-tar', default=None, help='URL or path of the VOC2011 trainval tar')
    parser.add_argument('--seg11valid-url', default=None, help='URL or path of seg11valid.txt')
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.voc12seg or args.all:
        download_voc(root / 'VOCdevkit')
    if args.sbd or args.all:
        download_sbd(root / 'benchmark_RELEASE')
    if args.voc11 or args.all:
        for name, path in fetch_voc11_lists(root / 'voc11seg', args.voc2011_tar, args.seg11valid_url).items():
            print(f'{path}: {len(read_ids(path))} ids, md5 ok')


if __name__ == '__main__':
    main()
