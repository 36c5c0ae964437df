"""task_jointUpsampling data: low-res sampling, the input transform, the Sintel split list, the Synthetic scenes,
and NYU / Sintel downloads (resume, checksum, hostile archives) against the local http_server."""
import hashlib
import io
import random
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from task_jointUpsampling.datasets import (NYU_URL_ENV, SINTEL_SPLIT_FILE, AssembleJointUpsamplingInputs, NYUDepthV2,
                                           Sintel, get_lowres)
from meta.make_sintel_split import SEQUENCES, split_text
from task_jointUpsampling.synthetic import Synthetic
from tools.download import ChecksumError, DownloadError
from tools.flowlib import write_flow


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# ---------------------------------------------------------------------------------------------- get_lowres
def test_center_and_last_sampling_offsets():
    im = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)  # value = 12 * row + col
    center = get_lowres(im, 4, 'center')  # offset (4 - 1) // 2 = 1: pixels (1, 1), (1, 5), (1, 9), (5, 1), ...
    np.testing.assert_array_equal(center, [[13, 17, 21], [61, 65, 69]])
    last = get_lowres(im[None], 4, 'last')  # offset 3, CHW in, CHW out
    np.testing.assert_array_equal(last, [[[39, 43, 47], [87, 91, 95]]])
    im16 = np.arange(16 * 16, dtype=np.float32).reshape(16, 16)
    np.testing.assert_array_equal(get_lowres(im16, 8, 'center'), [[51, 59], [179, 187]])  # offset 3: 16 * 3 + 3


def test_lowres_non_multiple_sizes_and_resize_modes():
    rng = np.random.default_rng(0)
    im = rng.random((2, 30, 44)).astype(np.float32)
    for mode in ('center', 'last', 'nearest', 'bilinear', 'bicubic'):
        assert get_lowres(im, 8, mode).shape == (2, 4, 6)  # ceil(30 / 8), ceil(44 / 8)
    flat = np.full((1, 16, 16), 2.5, np.float32)
    for mode in ('nearest', 'bilinear', 'bicubic'):
        np.testing.assert_allclose(get_lowres(flat, 4, mode), 2.5, rtol=1e-6)
    # anti-aliased: a one-pixel checkerboard averages out instead of aliasing to 0 or 1
    checker = (np.indices((16, 16)).sum(0) % 2).astype(np.float32)
    assert np.abs(get_lowres(checker, 4, 'bilinear') - 0.5).max() < 0.1
    with pytest.raises(ValueError, match='mode'):
        get_lowres(im, 4, 'area')


def test_lowres_matches_scikit_image_when_installed():
    skimage_transform = pytest.importorskip('skimage.transform')
    rng = np.random.default_rng(1)
    im = rng.standard_normal((3, 37, 50)).astype(np.float32)
    hwc = skimage_transform.resize(im.transpose(1, 2, 0), (40, 56), order=1, mode='reflect', anti_aliasing=True,
                                   preserve_range=True)
    for mode, order in (('nearest', 0), ('bilinear', 1), ('bicubic', 3)):
        expected = skimage_transform.resize(hwc, (5, 7), order=order, mode='reflect', anti_aliasing=True,
                                            preserve_range=True).transpose(2, 0, 1)
        np.testing.assert_allclose(get_lowres(im, 8, mode), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- transform
def test_transform_shapes_nyu_protocol():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 480, 640), dtype=np.uint8)
    depth = rng.uniform(1, 5, (480, 640)).astype(np.float32)
    train = AssembleJointUpsamplingInputs(8, crop=256, output_crop=6, rng=random.Random(0))
    shapes = [tuple(t.shape) for t in train(image, depth)]
    assert shapes == [(1, 32, 32), (3, 256, 256), (1, 244, 244), (1, 2)]
    test = AssembleJointUpsamplingInputs(8, flip=False, output_crop=6)
    low, guide, target, raw_range = test(image, depth)
    assert [tuple(t.shape) for t in (low, guide, target)] == [(1, 60, 80), (3, 480, 640), (1, 468, 628)]
    torch.testing.assert_close(guide, torch.from_numpy(image).float() / 255)
    torch.testing.assert_close(target, torch.from_numpy(depth[6:-6, 6:-6])[None])  # raw units, border cut
    centre = depth[3::8, 3::8]
    torch.testing.assert_close(raw_range, torch.tensor([[centre.min(), centre.max()]]))
    torch.testing.assert_close(low[0], torch.from_numpy((centre - centre.min()) / (centre.max() - centre.min())))


def test_transform_flat_range_rule_and_zero_guidance():
    image = np.full((3, 16, 16), 200, np.uint8)
    flow = np.stack([np.full((16, 16), 7.0), np.arange(256.0).reshape(16, 16)]).astype(np.float32)
    low, guide, target, raw_range = AssembleJointUpsamplingInputs(4, flip=False, zero_guidance=True)(image, flow)
    torch.testing.assert_close(raw_range[0], torch.tensor([6.5, 7.5]))  # flat channel: [v - 0.5, v + 0.5]
    torch.testing.assert_close(low[0], torch.full((4, 4), 0.5))
    assert low[1].min() == 0 and low[1].max() == 1
    assert guide.abs().max() == 0
    torch.testing.assert_close(target, torch.from_numpy(flow))


def test_transform_crop_and_flip_keep_guide_and_target_aligned():
    yy, xx = np.mgrid[0:64, 0:64]
    image = np.stack([yy, xx, np.zeros_like(yy)]).astype(np.uint8)
    target = (yy * 64 + xx).astype(np.float32)
    transform = AssembleJointUpsamplingInputs(4, crop=32, rng=random.Random(3))
    flips = set()
    for _ in range(8):
        _, guide, out, _ = transform(image, target)
        pixels = torch.round(guide * 255)
        torch.testing.assert_close(out[0], pixels[0] * 64 + pixels[1])
        flips.add(bool(pixels[1, 0, 0] > pixels[1, 0, -1]))
    assert flips == {True, False}  # both flipped and unflipped crops occurred
    a = AssembleJointUpsamplingInputs(4, crop=32, rng=random.Random(5))(image, target)
    b = AssembleJointUpsamplingInputs(4, crop=32, rng=random.Random(5))(image, target)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # seeded: reproducible


def test_transform_bad_arguments():
    with pytest.raises(ValueError, match='multiples of factor'):
        AssembleJointUpsamplingInputs(8, crop=100)
    with pytest.raises(ValueError, match='larger than the image'):
        AssembleJointUpsamplingInputs(4, crop=32)(np.zeros((3, 16, 16), np.uint8), np.zeros((16, 16), np.float32))
    with pytest.raises(ValueError, match='share H and W'):
        AssembleJointUpsamplingInputs(4)(np.zeros((3, 16, 16), np.uint8), np.zeros((16, 12), np.float32))


# ---------------------------------------------------------------------------------------------- Sintel split
def test_sintel_split_file_md5_and_rule():
    data = SINTEL_SPLIT_FILE.read_bytes()
    assert hashlib.md5(data).hexdigest() == 'd0896f0d8fd3f6a1fedfb25497acf3fa'
    assert data.decode() == split_text()  # the committed file is what the generator writes
    codes = np.array(data.decode().split(), dtype=int)
    assert len(codes) == 1041 and (codes == 1).sum() == 908 and (codes == 2).sum() == 133
    val = np.flatnonzero(codes == 2)
    expected = np.r_[199:218, 340:365, 536:561, 659:698, 967:992]  # spec 3.2, 0-based
    np.testing.assert_array_equal(val, expected)


# ---------------------------------------------------------------------------------------------- Synthetic
def test_synthetic_is_reproducible_per_seed_split_and_family():
    a, b = (Synthetic(split='train', num_samples=3, size=48, seed=7) for _ in range(2))
    image, depth = a[2]
    assert image.shape == (3, 48, 48) and image.dtype == np.uint8 and depth.shape == (48, 48)
    assert np.array_equal(image, b[2][0]) and np.array_equal(depth, b[2][1])
    for other in (Synthetic(split='test', num_samples=3, size=48, seed=7),
                  Synthetic(split='train', num_samples=3, size=48, seed=8),
                  Synthetic(split='train', num_samples=3, size=48, seed=7, family='B')):
        assert not np.array_equal(depth, other[2][1])
    assert 0.5 <= depth.min() and depth.max() <= 10
    with pytest.raises(ValueError, match='split'):
        Synthetic(split='extra')
    with pytest.raises(ValueError, match='family'):
        Synthetic(family='C')


def _edges(image, depth):
    """Horizontal neighbours: depth jumps (> 0.3 m), smooth depth (< 0.05 m) and the colour step (sum over RGB)."""
    step = np.abs(np.diff(depth, axis=1))
    return step > 0.3, step < 0.05, np.abs(np.diff(image.astype(int), axis=2)).sum(0)


@pytest.mark.parametrize('family', ['A', 'B'])
def test_synthetic_has_texture_traps_and_camouflaged_depth_edges(family):
    texture_traps = camouflaged = jumps_total = 0
    for image, depth in Synthetic(split='train', num_samples=8, size=64, seed=3, family=family):
        jumps, smooth, colour_step = _edges(image, depth)
        texture_traps += int(((colour_step > 60) & smooth).sum())  # strong colour edges on smooth depth
        camouflaged += int(((colour_step < 40) & jumps).sum())  # depth edges with no more than noise in colour
        jumps_total += int(jumps.sum())
    assert texture_traps > 300
    assert 0.05 * jumps_total < camouflaged < 0.5 * jumps_total  # some depth edges are weak, most are not


def test_synthetic_surfaces_are_curved_and_slanted():
    curved = slanted = 0
    for _, depth in Synthetic(split='train', num_samples=6, size=64, seed=5):
        d = depth.astype(np.float64)
        gx, gxx = np.diff(d, axis=1)[:, :-1], np.diff(d, n=2, axis=1)
        smooth = np.abs(gx) < 0.05
        slanted += int((np.abs(gx[smooth]) > 1e-3).sum())
        curved += int((np.abs(gxx[smooth]) > 1e-3).sum())
    assert slanted > 1000 and curved > 500


def test_synthetic_families_differ():
    """The held-out family has other statistics: noisier images and sensor, more holes, other colours."""
    def statistics(family):
        noise, holes, saturation = [], [], []
        for image, depth, sensor in Synthetic(split='val', num_samples=8, size=64, seed=1, family=family,
                                              sensor=True):
            error = (sensor - depth) / depth ** 2
            holes.append(np.mean(np.abs(error) > 0.05))  # filled holes: far from the measured value
            noise.append(np.median(np.abs(error)))
            rgb = image.astype(float)
            saturation.append(np.mean(rgb.max(0) - rgb.min(0)))
        return np.mean(noise), np.mean(holes), np.mean(saturation)
    (noise_a, holes_a, sat_a), (noise_b, holes_b, sat_b) = statistics('A'), statistics('B')
    assert noise_b > 1.5 * noise_a and holes_b > holes_a and sat_b < sat_a


def test_synthetic_sensor_depth_is_noisy_with_filled_holes_and_feeds_the_input_only():
    image, depth, sensor = Synthetic(split='test', num_samples=1, size=64, seed=2, sensor=True)[0]
    assert sensor.shape == depth.shape and sensor.dtype == np.float32 and np.isfinite(sensor).all()
    assert 0.5 <= sensor.min() and sensor.max() <= 10
    assert np.abs(sensor - depth).mean() > 0.005  # noise and filled holes
    assert np.array_equal(Synthetic(split='test', num_samples=1, size=64, seed=2)[0][1], depth)  # same scene
    # the transform samples the low-res input from the sensor depth; the target (loss, measures) is the clean depth
    low, guide, target, raw_range = AssembleJointUpsamplingInputs(4, flip=False, normalize_target=True)(
        image, depth, sensor)
    torch.testing.assert_close(target[0], torch.from_numpy(depth))
    low_raw = low[0] * (raw_range[0, 1] - raw_range[0, 0]) + raw_range[0, 0]
    torch.testing.assert_close(low_raw, torch.from_numpy(get_lowres(sensor, 4)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='source'):
        AssembleJointUpsamplingInputs(4)(image, depth, sensor[:32])


def test_synthetic_sample_picture(tmp_path):
    from task_jointUpsampling.synthetic import save_scene_samples
    path = save_scene_samples(str(tmp_path / 'scenes.png'), count=1, size=32)
    with Image.open(path) as picture:
        assert picture.format == 'PNG'


# ---------------------------------------------------------------------------------------------- NYU download
NYU_SHAPE = (6, 8)  # (H, W) of the tiny stand-in


def write_tiny_nyu(path, count=1449):
    """An HDF5 file with the real dataset names and MATLAB axis order: images (N, 3, W, H), depths (N, W, H)."""
    h5py = pytest.importorskip('h5py')
    h, w = NYU_SHAPE
    n = np.arange(count)[:, None, None]
    xs, ys = np.meshgrid(np.arange(w), np.arange(h), indexing='ij')  # (W, H) axes as stored
    depths = (n + 0.01 * (10 * ys + xs)[None]).astype(np.float32)  # depth[n, y, x] = n + 0.1 y + 0.01 x
    images = np.stack([(n + c + ys[None] * 10 + xs[None]) % 256 for c in range(3)], axis=1).astype(np.uint8)
    with h5py.File(path, 'w') as f:
        f.create_dataset('images', data=images)
        f.create_dataset('depths', data=depths)
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_nyu(http_server, monkeypatch):
    md5 = write_tiny_nyu(http_server.root / 'nyu.mat')
    monkeypatch.setattr(NYUDepthV2, 'md5', md5)
    return http_server


def test_nyu_download_splits_and_axis_order(tiny_nyu, tmp_path):
    root = tmp_path / 'nyu'
    train = NYUDepthV2(root, split='train', download=True, url=tiny_nyu.url('nyu.mat'))
    assert (root / 'nyu_depth_v2_labeled.mat').is_file() and not list(root.glob('*.part'))
    assert len(train) == 1000 and len(NYUDepthV2(root, split='test')) == 449
    assert len(NYUDepthV2(root, 'train', val_ratio=0.1)) == 900 and len(NYUDepthV2(root, 'val', val_ratio=0.1)) == 100
    image, depth = NYUDepthV2(root, split='test', cache_all=True)[3]  # global index 1003
    h, w = NYU_SHAPE
    assert image.shape == (3, h, w) and image.dtype == np.uint8 and depth.shape == (h, w)
    assert depth[2, 5] == pytest.approx(1003 + 0.01 * 25)  # row 2, column 5: axes swapped back to (H, W)
    assert image[1, 2, 5] == (1003 + 1 + 20 + 5) % 256
    assert len(tiny_nyu.requests) == 1  # later constructions do not download again


def test_nyu_download_resumes_and_uses_env_url(tiny_nyu, tmp_path, monkeypatch):
    monkeypatch.setenv(NYU_URL_ENV, tiny_nyu.url('nyu.mat'))
    tiny_nyu.fail_after('nyu.mat', 5000)
    root = tmp_path / 'nyu'
    with pytest.raises(DownloadError):
        NYUDepthV2(root, download=True)
    assert (root / 'nyu_depth_v2_labeled.mat.part').stat().st_size == 5000
    assert not (root / 'nyu_depth_v2_labeled.mat').exists()
    assert len(NYUDepthV2(root, split='test', download=True)) == 449
    assert tiny_nyu.requests[-1] == ('/nyu.mat', 'bytes=5000-')


def test_nyu_checksum_failure_and_missing_file(tiny_nyu, tmp_path, monkeypatch):
    monkeypatch.setattr(NYUDepthV2, 'md5', '0' * 32)
    root = tmp_path / 'nyu'
    with pytest.raises(ChecksumError):
        NYUDepthV2(root, download=True, url=tiny_nyu.url('nyu.mat'))
    assert not list(root.iterdir())  # neither the file nor a .part is left
    with pytest.raises(RuntimeError, match='download=True'):
        NYUDepthV2(root)
    with pytest.raises(ValueError, match='split'):
        NYUDepthV2(root, split='training')


# ---------------------------------------------------------------------------------------------- Sintel download
def png_bytes(value, shape=(4, 6)):
    buffer = io.BytesIO()
    Image.fromarray(np.full((*shape, 3), value, np.uint8)).save(buffer, format='PNG')
    return buffer.getvalue()


def make_tiny_sintel_zip(path, tmp_path, hostile=False):
    """The real layout (training/{clean,flow}/<seq>/frame_XXXX, test/clean) with 4 x 6 frames; pixel value =
    frame number, flow u = global pair index."""
    flo = tmp_path / 'tmp.flo'
    pair = 0
    with zipfile.ZipFile(path, 'w') as zf:
        for name, count in SEQUENCES:
            for frame in range(1, count + 2):
                zf.writestr(f'training/clean/{name}/frame_{frame:04d}.png', png_bytes(frame))
            for frame in range(1, count + 1):
                write_flow(np.stack([np.full((4, 6), pair), np.full((4, 6), -1.0)], -1), flo)
                zf.writestr(f'training/flow/{name}/frame_{frame:04d}.flo', flo.read_bytes())
                pair += 1
        for frame in range(1, 4):
            zf.writestr(f'test/clean/wall/frame_{frame:04d}.png', png_bytes(frame))
        if hostile:
            zf.writestr('../escaped.txt', b'outside')
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def tiny_sintel_zip(tmp_path_factory):
    folder = tmp_path_factory.mktemp('sintel_zip')
    md5 = make_tiny_sintel_zip(folder / 'MPI-Sintel-complete.zip', folder)
    return folder / 'MPI-Sintel-complete.zip', md5


def serve_sintel(http_server, monkeypatch, zip_path, md5):
    (http_server.root / 'sintel.zip').write_bytes(zip_path.read_bytes())
    monkeypatch.setattr(Sintel, 'url', http_server.url('sintel.zip'))
    monkeypatch.setattr(Sintel, 'md5', md5)


def test_sintel_download_layout_and_splits(http_server, monkeypatch, tmp_path, tiny_sintel_zip):
    serve_sintel(http_server, monkeypatch, *tiny_sintel_zip)
    http_server.fail_after('sintel.zip', 20000)  # the first transfer breaks off: the second one resumes
    root = tmp_path / 'data' / 'sintel'
    with pytest.raises(DownloadError):
        Sintel(root, fields=('clean_1', 'flow'), download=True)
    train = Sintel(root, split='train', fields=('clean_1', 'clean_2', 'flow'), download=True, cache_all=True)
    assert http_server.requests[-1] == ('/sintel.zip', 'bytes=20000-')
    assert (tmp_path / 'data' / 'MPI-Sintel-complete.zip').is_file()  # downloaded beside root, extracted into it
    assert len(train) == 908
    first, second, flow = train[0]
    assert first.shape == (3, 4, 6) and first.dtype == np.uint8 and flow.shape == (2, 4, 6)
    assert (first[0, 0, 0], second[0, 0, 0], flow[0, 0, 0], flow[1, 0, 0]) == (1, 2, 0, -1)
    val = Sintel(root, split='val', fields=('clean_1', 'flow'))
    assert len(val) == 133
    image, flow = val[0]  # the first val pair is global pair 199: ambush_6 frame 1
    assert flow[0, 0, 0] == 199 and image[0, 0, 0] == 1
    assert len(Sintel(root, split='trainval', fields=('flow',))) == 1041
    assert len(Sintel(root, split='test', fields=('clean_1',))) == 2
    with pytest.raises(RuntimeError, match='no flow'):
        Sintel(root, split='test', fields=('clean_1', 'flow'))
    with pytest.raises(ValueError, match='field'):
        Sintel(root, fields=('final_3',))


def test_sintel_checksum_failure_and_hostile_archive(http_server, monkeypatch, tmp_path, tiny_sintel_zip):
    zip_path, md5 = tiny_sintel_zip
    serve_sintel(http_server, monkeypatch, zip_path, '0' * 32)
    with pytest.raises(ChecksumError):
        Sintel(tmp_path / 'a' / 'sintel', download=True)
    assert not (tmp_path / 'a' / 'sintel').exists()

    hostile = tmp_path / 'hostile' / 'MPI-Sintel-complete.zip'
    hostile.parent.mkdir()
    (http_server.root / 'sintel.zip').write_bytes(b'')
    hostile_md5 = make_tiny_sintel_zip(hostile, hostile.parent, hostile=True)
    serve_sintel(http_server, monkeypatch, hostile, hostile_md5)
    with pytest.raises(ValueError, match='escaped.txt'):
        Sintel(tmp_path / 'b' / 'sintel', download=True)
    assert not (tmp_path / 'b' / 'escaped.txt').exists() and not (tmp_path / 'b' / 'sintel' / 'training').exists()
