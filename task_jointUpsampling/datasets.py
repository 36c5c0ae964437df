"""Data for joint upsampling: NYU Depth V2 (depth), MPI Sintel (optical flow), the input transform and the
low-resolution sampling.

Datasets return raw samples ``(guide uint8 (3, H, W), target float32 (C, H, W) or (H, W))``;
:class:`AssembleJointUpsamplingInputs` turns one into network inputs ``(low_res, guide, target, raw_range)``.

Units: NYU depth is in metres; Sintel flow in pixels of the full-resolution frame.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import Dataset

from tools.download import check_integrity, download_and_extract, download_url

__all__ = ['NYU_URL', 'NYU_MD5', 'NYU_URL_ENV', 'SINTEL_URL', 'SINTEL_MD5', 'SINTEL_SPLIT_FILE', 'LOWRES_MODES',
           'get_lowres', 'resize', 'center_crop', 'AssembleJointUpsamplingInputs', 'NYUDepthV2', 'Sintel']

NYU_URL = 'http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat'
NYU_MD5 = 'a3a66613390119e6d46827a7aaa3c132'
NYU_URL_ENV = 'NYU_DEPTH_V2_URL'  # the original host is down: point this (or --nyu-url) at a mirror or a local copy
SINTEL_URL = 'http://files.is.tue.mpg.de/sintel/MPI-Sintel-complete.zip'
SINTEL_MD5 = '2d2836c2c6b4fb6c9d2d2d58189eb014'
SINTEL_SPLIT_FILE = Path(__file__).resolve().parents[1] / 'meta' / 'Sintel_train_val.txt'

LOWRES_MODES = ('center', 'last', 'nearest', 'bilinear', 'bicubic')
_RESIZE_ORDERS = {'nearest': 0, 'bilinear': 1, 'bicubic': 3}


# ---------------------------------------------------------------------------------------------- low-res sampling
def resize(image: np.ndarray, output_hw: Sequence[int], order: int) -> np.ndarray:
    """Anti-aliased resize of an (H, W, C) array to ``output_hw`` (spline ``order`` 0, 1 or 3).

    The algorithm of ``skimage.transform.resize(order, mode='reflect', anti_aliasing=True, preserve_range=True)``,
    which the 2019 code used, written with scipy.ndimage: when shrinking, a Gaussian prefilter with
    sigma = (scale - 1) / 2 per axis, then a spline zoom on the pixel-area grid with mirrored borders, then the
    result is clipped to the input's value range.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3:
        raise ValueError(f'image must be (H, W, C), got shape {image.shape}')
    out_shape = (int(output_hw[0]), int(output_hw[1]), image.shape[2])
    if min(out_shape) <= 0:
        raise ValueError(f'output_hw must be positive, got {tuple(output_hw)}')
    scales = np.divide(image.shape, out_shape)
    low, high = image.min(), image.max()
    sigma = np.maximum(0, (scales - 1) / 2)
    filtered = ndimage.gaussian_filter(image, sigma, mode='mirror') if np.any(sigma > 0) else image
    out = ndimage.zoom(filtered, 1 / scales, order=order, mode='mirror', grid_mode=True)
    return np.clip(out, low, high)


def get_lowres(im: np.ndarray, factor: int, mode: str = 'center') -> np.ndarray:
    """Make the low-resolution version of a target, ``factor`` times smaller per axis.

    A size that is not a multiple of ``factor`` is first resized (bilinear) up to the next multiple.

    Args:
        im: (C, H, W) or (H, W) array.
        factor: downsampling factor.
        mode: 'center' (every factor-th pixel from offset (factor-1)//2, the NYU protocol), 'last' (offset
            factor-1), or 'nearest' / 'bilinear' / 'bicubic': anti-aliased resizes (:func:`resize`), so even
            'nearest' is not pure subsampling.

    Returns:
        array of the same rank, (C, ceil(H/f), ceil(W/f)) or (ceil(H/f), ceil(W/f)).
    """
    if mode not in LOWRES_MODES:
        raise ValueError(f'mode must be one of {LOWRES_MODES}, got {mode!r}')
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f'factor must be a positive int, got {factor!r}')
    im = np.asarray(im)
    if im.ndim not in (2, 3):
        raise ValueError(f'im must be (C, H, W) or (H, W), got shape {im.shape}')
    hwc = im[..., None] if im.ndim == 2 else im.transpose(1, 2, 0)
    h, w = hwc.shape[:2]
    lh, lw = -(-h // factor), -(-w // factor)
    if (h, w) != (lh * factor, lw * factor):
        hwc = resize(hwc, (lh * factor, lw * factor), order=1)
    if mode in ('center', 'last'):
        offset = (factor - 1) // 2 if mode == 'center' else factor - 1
        low = hwc[offset::factor, offset::factor]
    else:
        low = resize(hwc, (lh, lw), order=_RESIZE_ORDERS[mode])
    low = np.ascontiguousarray(low, dtype=im.dtype if np.issubdtype(im.dtype, np.floating) else np.float32)
    return low[..., 0] if im.ndim == 2 else low.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------- transform
def center_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The centre ``size`` (h, w) of ``x`` (..., H, W), offset (H - h) // 2: cuts the evaluation border."""
    top, left = (x.shape[-2] - size[0]) // 2, (x.shape[-1] - size[1]) // 2
    return x[..., top:top + size[0], left:left + size[1]]


class AssembleJointUpsamplingInputs:
    """Turn a raw ``(guidance, target)`` sample into network inputs.

    Steps: random crop (same window for both), random horizontal flip, low-res sampling (:func:`get_lowres`),
    optional border crop of the full-res target, per-image per-channel min/max normalisation of the low-res
    input (a flat channel gets the range [v - 0.5, v + 0.5]), guide / 255, optional zeroed guide.

    Randomness comes from ``rng`` (a ``random.Random``) or, by default, Python's global ``random`` module,
    which :func:`tools.runtime.seed_everything` seeds and DataLoader workers reseed per worker.

    Args:
        factor: upsampling factor.
        crop: crop size (int or (h, w), multiples of ``factor``); None keeps the full image.
        flip: flip horizontally with probability 0.5.
        normalize_target: normalise the low-res input and return ``raw_range``.
        output_crop: pixels removed from each border of the returned full-res target (the evaluation border).
        lowres_mode: see :func:`get_lowres`.
        zero_guidance: multiply the guide by 0 (ablation).
        rng: random source; None uses the ``random`` module.

    Returns (from ``__call__``):
        ``low_res`` (C, h, w), ``guidance`` (3, H, W) in [0, 1], ``target`` (C, H - 2b, W - 2b) in raw units and,
        if ``normalize_target``, ``raw_range`` (C, 2) holding each channel's [min, max]; all float32 tensors.

    Example:
        >>> t = AssembleJointUpsamplingInputs(8, crop=256, output_crop=6)
        >>> low, guide, target, raw_range = t(np.zeros((3, 480, 640), np.uint8), np.ones((480, 640), np.float32))
        >>> tuple(low.shape), tuple(guide.shape), tuple(target.shape), tuple(raw_range.shape)
        ((1, 32, 32), (3, 256, 256), (1, 244, 244), (1, 2))
    """

    def __init__(self, factor: int, crop: int | Sequence[int] | None = None, flip: bool = True,
                 normalize_target: bool = True, output_crop: int = 0, lowres_mode: str = 'center',
                 zero_guidance: bool = False, rng: random.Random | None = None):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f'factor must be a positive int, got {factor!r}')
        if isinstance(crop, int):
            crop = (crop, crop)
        if crop is not None:
            crop = tuple(int(c) for c in crop)
            if len(crop) != 2 or any(c <= 0 or c % factor for c in crop):
                raise ValueError(f'crop must be positive multiples of factor={factor}, got {crop}')
        if lowres_mode not in LOWRES_MODES:
            raise ValueError(f'lowres_mode must be one of {LOWRES_MODES}, got {lowres_mode!r}')
        if output_crop < 0:
            raise ValueError(f'output_crop must be >= 0, got {output_crop}')
        self.factor, self.crop, self.flip = factor, crop, flip
        self.normalize_target, self.output_crop = normalize_target, output_crop
        self.lowres_mode, self.zero_guidance = lowres_mode, zero_guidance
        self.rng = rng if rng is not None else random

    def __call__(self, guidance: np.ndarray, target: np.ndarray, source: np.ndarray | None = None):
        """``source`` (shaped like ``target``), when given, is what the low-res input is sampled from instead of
        the target: e.g. a noisy sensor depth whose holes were filled, while the target is the clean depth."""
        guidance, target = np.asarray(guidance), np.asarray(target, dtype=np.float32)
        if target.ndim == 2:
            target = target[None]
        if guidance.ndim != 3 or target.ndim != 3 or guidance.shape[1:] != target.shape[1:]:
            raise ValueError(f'guidance (C, H, W) and target (C, H, W) or (H, W) must share H and W, '
                             f'got {guidance.shape} and {target.shape}')
        source = target if source is None else np.asarray(source, dtype=np.float32)
        source = source[None] if source.ndim == 2 else source
        if source.shape != target.shape:
            raise ValueError(f'source must have the shape of target {target.shape}, got {source.shape}')
        if self.crop is not None:
            guidance, target, source = self._random_crop(guidance, target, source)
        if self.flip and self.rng.random() < 0.5:
            guidance, target, source = guidance[:, :, ::-1], target[:, :, ::-1], source[:, :, ::-1]
        low_res = get_lowres(source, self.factor, self.lowres_mode)
        b = self.output_crop
        if b > 0:
            target = target[:, b:-b, b:-b]
        outputs = [low_res, guidance.astype(np.float32) / 255.0, target]
        if self.normalize_target:
            raw_range = np.stack((low_res.min(axis=(1, 2)), low_res.max(axis=(1, 2))), axis=1).astype(np.float32)
            flat = raw_range[:, 0] == raw_range[:, 1]
            raw_range[flat] += np.array([-0.5, 0.5], dtype=np.float32)  # avoid dividing by a zero range
            outputs[0] = (low_res - raw_range[:, :1, None]) / (raw_range[:, 1:, None] - raw_range[:, :1, None])
            outputs.append(raw_range)
        if self.zero_guidance:
            outputs[1] = outputs[1] * 0
        return tuple(torch.from_numpy(np.ascontiguousarray(o, dtype=np.float32)) for o in outputs)

    def _random_crop(self, guidance: np.ndarray, *targets: np.ndarray):
        (ch, cw), (h, w) = self.crop, guidance.shape[1:]
        if ch > h or cw > w:
            raise ValueError(f'crop {self.crop} is larger than the image ({h}, {w})')
        top, left = self.rng.randint(0, h - ch), self.rng.randint(0, w - cw)
        return tuple(a[:, top:top + ch, left:left + cw] for a in (guidance, *targets))


# ---------------------------------------------------------------------------------------------- NYU Depth V2
class NYUDepthV2(Dataset):
    """NYU Depth V2, labelled subset (1449 RGB-D images, 480 x 640, depth in metres), from the MATLAB v7.3 file
    ``<root>/nyu_depth_v2_labeled.mat`` read with h5py.

    Splits are fixed by index (the DJF protocol): 'train' = the first int(1000 * (1 - val_ratio)) images,
    'val' = the last int(1000 * val_ratio) of the first 1000, 'test' = images 1000 to 1448.

    The original host is down. With ``download=True`` the file is fetched from ``url``, else from the
    environment variable ``NYU_DEPTH_V2_URL``, else from the original URL; a local path works as a URL. The md5
    is always verified.

    Args:
        root: folder holding (or receiving) the .mat file.
        split: 'train', 'val' or 'test'.
        fields: what a sample holds, among 'images' and 'depths'.
        val_ratio: fraction of the first 1000 images held out as 'val'.
        transform: called as ``transform(*sample)``.
        cache_all: load the whole split into memory at construction.
        cache_loaded: keep each sample in memory once read.
        download: fetch the file if it is missing.
        url: download source (see above).

    A sample is ``(image uint8 (3, 480, 640), depth float32 (480, 640))``, before ``transform``.
    """

    filename = 'nyu_depth_v2_labeled.mat'
    url = NYU_URL
    md5 = NYU_MD5
    num_train_val, num_total = 1000, 1449

    def __init__(self, root: str | os.PathLike, split: str = 'train', fields: Sequence[str] = ('images', 'depths'),
                 val_ratio: float = 0.0, transform: Callable | None = None, cache_all: bool = False,
                 cache_loaded: bool = True, download: bool = False, url: str | None = None):
        if split not in ('train', 'val', 'test'):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if not 0.0 <= val_ratio < 1.0:
            raise ValueError(f'val_ratio must be in [0, 1), got {val_ratio}')
        bad = [f for f in fields if f not in ('images', 'depths')]
        if bad or not fields:
            raise ValueError(f"fields must be a non-empty subset of ('images', 'depths'), got {tuple(fields)}")
        self.root, self.split, self.fields = Path(root), split, tuple(fields)
        self.transform, self.cache_loaded = transform, cache_loaded
        self.path = self.root / self.filename
        if download:
            self.download(url)
        if not self.path.is_file():
            raise RuntimeError(f'Dataset not found at {self.path}. Use download=True (--download) with a source '
                               f'URL or file (url=..., --nyu-url or ${NYU_URL_ENV}); md5 {self.md5}')
        n_train = int(self.num_train_val * (1 - val_ratio))
        self.indices = {'train': range(0, n_train), 'val': range(n_train, self.num_train_val),
                        'test': range(self.num_train_val, self.num_total)}[split]
        if len(self.indices) == 0:
            raise ValueError(f'split {split!r} is empty with val_ratio={val_ratio}')
        with self._open() as f:
            missing = [name for name in self.fields if name not in f]
            if missing:
                raise RuntimeError(f'{self.path} lacks the datasets {missing}; is it the labelled NYU .mat file?')
            if f[self.fields[0]].shape[0] < self.indices[-1] + 1:
                raise RuntimeError(f'{self.path} holds {f[self.fields[0]].shape[0]} images, the {split} split '
                                   f'needs {self.indices[-1] + 1}')
        self._file = None
        self._cache: dict[int, tuple] = {}
        if cache_all:
            with self._open() as f:
                self._cache = {i: self._read(f, i) for i in range(len(self))}

    def download(self, url: str | None = None) -> None:
        """Fetch the .mat file (resumable, md5-checked, atomic) unless a valid copy is present."""
        if self.path.is_file() and check_integrity(self.path, self.md5):
            return
        source = url or os.environ.get(NYU_URL_ENV) or self.url
        download_url(source, self.root, filename=self.filename, md5=self.md5)

    def _open(self):
        import h5py  # imported here so that the other datasets work without it
        return h5py.File(self.path, 'r')

    def _read(self, f, i: int) -> tuple:
        # the file stores MATLAB's column-major layout: (N, 3, W, H) and (N, W, H); swap to (3, H, W) / (H, W)
        index = self.indices[i]
        return tuple(np.ascontiguousarray(np.swapaxes(f[name][index], -1, -2)) for name in self.fields)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f'index {i} out of range for {len(self)} samples')
        sample = self._cache.get(i)
        if sample is None:
            if self._file is None:  # opened lazily so each DataLoader worker gets its own handle
                self._file = self._open()
            sample = self._read(self._file, i)
            if self.cache_loaded:
                self._cache[i] = sample
        return self.transform(*sample) if self.transform is not None else sample

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_file'] = None  # h5py handles cannot be pickled to worker processes
        return state


# ---------------------------------------------------------------------------------------------- Sintel
class Sintel(Dataset):
    """MPI Sintel (complete release), training/ and test/ folders with the clean, final and albedo passes and
    the optical flow.

    Fields: ``'<pass>_1'`` = the first frame of each pair (every frame but a sequence's last), ``'<pass>_2'`` =
    the second (every frame but the first), ``'flow'`` = the flow from the first to the second frame; a bare
    pass name gives all frames. Splits: 'train' (908 pairs) and 'val' (133) of the fixed list
    ``meta/Sintel_train_val.txt``, 'trainval' (all 1041), 'test' (test/ folder, no flow).

    With ``download=True`` the zip is downloaded into ``dirname(root)`` and extracted into ``root``.

    A sample holds one array per field, images as uint8 (3, H, W), flow as float32 (2, H, W) (u, v in pixels),
    before ``transform``.
    """

    url = SINTEL_URL
    md5 = SINTEL_MD5
    filename = 'MPI-Sintel-complete.zip'
    passes = ('clean', 'final', 'albedo')

    def __init__(self, root: str | os.PathLike, split: str = 'train', fields: Sequence[str] = ('final_1', 'flow'),
                 transform: Callable | None = None, cache_all: bool = False, download: bool = False,
                 split_file: str | os.PathLike = SINTEL_SPLIT_FILE):
        if split not in ('train', 'val', 'trainval', 'test'):
            raise ValueError(f"split must be 'train', 'val', 'trainval' or 'test', got {split!r}")
        self.root, self.split, self.fields, self.transform = Path(root), split, tuple(fields), transform
        for field in self.fields:
            self._parse_field(field)
        if download:
            self.download()
        folder = self.root / ('test' if split == 'test' else 'training')
        if not folder.is_dir():
            raise RuntimeError(f'Dataset not found at {folder}. You can use download=True (--download) to get it')
        files = {field: self._list_files(folder, field) for field in self.fields}
        lengths = {field: len(paths) for field, paths in files.items()}
        if len(set(lengths.values())) != 1:
            raise RuntimeError(f'Sintel fields have different lengths: {lengths}')
        if split in ('train', 'val'):
            codes = np.loadtxt(split_file, dtype=np.int64).reshape(-1)
            n = next(iter(lengths.values()))
            if len(codes) != n:
                raise RuntimeError(f'{split_file} lists {len(codes)} pairs but {folder} holds {n}')
            keep = np.flatnonzero(codes == (1 if split == 'train' else 2))
            files = {field: [paths[i] for i in keep] for field, paths in files.items()}
        self.files = files
        self._cache = [self._load(i) for i in range(len(self))] if cache_all else None

    def download(self) -> None:
        """Download (resumable, md5-checked, atomic) and safely extract the complete zip, unless extracted."""
        if (self.root / 'training').is_dir():
            return
        download_and_extract(self.url, self.root.parent, extract_root=self.root, filename=self.filename,
                             md5=self.md5)

    def _parse_field(self, field: str) -> tuple[str, str]:
        name, _, frame = field.partition('_')
        if field == 'flow' or (name in self.passes and frame in ('', '1', '2')):
            return name, frame
        raise ValueError(f"field {field!r} is invalid: expected 'flow' or '<pass>[_1|_2]' with pass in {self.passes}")

    def _list_files(self, folder: Path, field: str) -> list[Path]:
        name, frame = self._parse_field(field)
        if not (folder / name).is_dir():
            raise RuntimeError(f'{folder / name} is missing (field {field!r}; the test split has no flow)')
        files = []
        for sequence in sorted(p for p in (folder / name).iterdir() if p.is_dir()):
            frames = sorted(p for p in sequence.iterdir() if p.suffix in ('.png', '.flo'))
            files += frames[:-1] if frame == '1' else frames[1:] if frame == '2' else frames
        return files

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        if path.suffix == '.flo':
            from tools.flowlib import read_flow
            return np.ascontiguousarray(read_flow(path).transpose(2, 0, 1), dtype=np.float32)
        with Image.open(path) as im:
            return np.ascontiguousarray(np.asarray(im.convert('RGB')).transpose(2, 0, 1))

    def _load(self, i: int) -> tuple:
        return tuple(self._read(self.files[field][i]) for field in self.fields)

    def __len__(self) -> int:
        return len(self.files[self.fields[0]])

    def __getitem__(self, i: int):
        sample = self._cache[i] if self._cache is not None else self._load(i)
        return self.transform(*sample) if self.transform is not None else sample
