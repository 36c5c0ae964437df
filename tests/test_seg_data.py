"""Data of task_semanticSegmentation: palette, transforms, metrics, splits, SBD conversion, downloads."""
import hashlib
import io
import json
import random
import tarfile

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch
from PIL import Image

from task_semanticSegmentation import datasets, prepare_sbd
from task_semanticSegmentation.datasets import DeepLabEvalInputs, DeepLabInputs, PascalVOC
from task_semanticSegmentation.metrics import ConfusionMeter, fast_conf, make_loss, seg_measures
from task_semanticSegmentation.palette import colorize, label_to_image, voc_palette
from task_semanticSegmentation.synthetic import SCENE_CLASSES, Synthetic

MEAN = np.array([122.675, 116.669, 104.008], dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Palette and metrics
# ----------------------------------------------------------------------------------------------
def test_voc_palette():
    palette = np.array(voc_palette()).reshape(256, 3)
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]          # aeroplane
    assert palette[15].tolist() == [192, 128, 128]     # person
    assert palette[20].tolist() == [0, 64, 128]        # tvmonitor
    assert (palette[21:] == 255).all()                 # everything else, incl. 255, is white
    label = np.array([[0, 1], [15, 255]], dtype=np.uint8)
    image = label_to_image(label)
    assert image.mode == 'P' and np.array_equal(np.asarray(image), label)
    assert colorize(label)[1, 0].tolist() == [192, 128, 128]


def test_fast_conf_counts_rows_gt_columns_pred_and_ignores_255():
    gt = torch.tensor([[0, 0, 1], [2, 255, 1]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    assert fast_conf(pred, gt, 3).tolist() == [[1, 1, 0], [1, 1, 0], [0, 1, 0]]
    with pytest.raises(ValueError, match='same shape'):
        fast_conf(pred, gt[0], 3)


def test_seg_measures_on_hand_made_confusions():
    conf = torch.tensor([[3, 1, 0, 0],
                         [0, 2, 0, 0],
                         [0, 0, 0, 0],     # class 2: never in gt nor predicted -> excluded
                         [1, 0, 0, 0]])    # class 3: in gt, never predicted -> IoU 0
    values, excluded = seg_measures(conf)
    iou = [3 / (4 + 4 - 3), 2 / (2 + 3 - 2), 0.0]
    assert values['miou'] == pytest.approx(np.mean(iou))
    assert values['acc'] == pytest.approx(5 / 7)
    assert values['macc'] == pytest.approx(np.mean([3 / 4, 2 / 2, 0 / 1]))
    assert excluded == [2]
    values, excluded = seg_measures(torch.zeros(3, 3, dtype=torch.int64))
    assert all(np.isnan(v) for v in values.values()) and excluded == [0, 1, 2]
    with pytest.raises(ValueError, match='measures'):
        seg_measures(conf, ['rmse'])


def test_confusion_meter_is_dataset_level_not_a_mean_of_images():
    meter = ConfusionMeter(2)
    meter.add(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))   # image IoU: 3/4, 0
    meter.add(torch.tensor([1]), torch.tensor([1]))                     # image IoU: -, 1
    values, _ = meter.measures(['miou'])
    assert values['miou'] == pytest.approx((3 / 4 + 1 / 2) / 2)


def test_losses():
    logits = torch.tensor([[[[2.0]], [[0.0]]], [[[0.0]], [[0.0]]]])  # (2, 2, 1, 1)
    target = torch.tensor([[[0]], [[255]]])
    ce = make_loss('ce')(logits, target)
    assert ce.item() == pytest.approx(np.log(1 + np.exp(-2.0)))  # the ignored pixel does not count
    p_true = 1 / (1 + np.exp(-2.0))  # 0.88
    assert make_loss('fce_0.8')(logits, target).item() == 0.0   # p > 0.8: forgiven
    assert make_loss('fce_0.9')(logits, target).item() == pytest.approx(-np.log(p_true) / 2)  # mean over 2 px
    for bad in ('mse', 'fce_x', 'fce_2'):
        with pytest.raises(ValueError, match='--loss'):
            make_loss(bad)


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------
def rgb_image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_deeplab_inputs_bgr_mean_subtraction_and_padding_by_hand():
    image = Image.fromarray(np.array([[[200, 100, 50], [0, 0, 0]]], dtype=np.uint8))  # 1 x 2
    label = Image.fromarray(np.array([[3, 255]], dtype=np.uint8))
    img, lbl = DeepLabInputs(3, pad_label=True, seed=0)(image, label, 'a')
    assert img.dtype == torch.float32 and img.shape == (3, 3, 3)
    np.testing.assert_allclose(img[:, 0, 0].numpy(), [50 - 104.008, 100 - 116.669, 200 - 122.675], rtol=1e-6)
    np.testing.assert_allclose(img[:, 0, 1].numpy(), -MEAN[::-1], rtol=1e-6)
    assert (img[:, 1:] == 0).all() and (img[:, :, 2] == 0).all()   # zero (= mean colour) padding
    assert lbl.dtype == torch.int64 and lbl.tolist() == [[3, 255, 255], [255] * 3, [255] * 3]
    img, lbl = DeepLabInputs(3, pad_label=False, seed=0)(image, label, 'a')
    assert img.shape == (3, 3, 3) and lbl.tolist() == [[3, 255]]   # only the valid region
    img, lbl = DeepLabInputs(None, use_bgr=False)(image, label, 'a')
    np.testing.assert_allclose(img[:, 0, 0].numpy(), [200 - 122.675, 100 - 116.669, 50 - 104.008], rtol=1e-6)


def test_deeplab_inputs_crop_is_a_window_of_the_image():
    image = rgb_image(20, 30)
    label = Image.fromarray(np.arange(600, dtype=np.int64).reshape(20, 30).astype(np.uint8) % 21)
    full, full_lbl = DeepLabInputs(None)(image, label, 'a')
    offsets = set()
    transform = DeepLabInputs(8, pad_label=True, seed=3)
    for _ in range(10):
        img, lbl = transform(image, label, 'a')
        matches = [(t, l) for t in range(13) for l in range(23) if torch.equal(full[:, t:t + 8, l:l + 8], img)]
        assert len(matches) == 1
        top, left = matches[0]
        assert torch.equal(full_lbl[top:top + 8, left:left + 8], lbl)
        offsets.add(matches[0])
    assert len(offsets) > 1  # random offsets


def test_deeplab_inputs_augmentation_is_seeded_and_leaves_global_random_alone():
    image, label = rgb_image(16, 16), Image.fromarray(np.tile(np.arange(16, dtype=np.uint8), (16, 1)))
    state = random.getstate()
    make = lambda seed: DeepLabInputs(12, pad_label=True, seed=seed, aug_flip=True, aug_scale=(0.5, 1.5),  # noqa
                                      aug_color=(0.1, 0.1, 0.1, 0.01))
    first, second, other = make(5), make(5), make(6)
    runs = [[t(image, label, 'a') for _ in range(6)] for t in (first, second, other)]
    assert random.getstate() == state
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(runs[0], runs[2]))
    flipped = [lbl for _, lbl in runs[0] if lbl[0, 0] > lbl[0, 1]]   # a flipped ramp decreases
    assert 0 < len(flipped) < 6
    second.reseed(5)
    assert torch.equal(second(image, label, 'a')[0], runs[0][0][0])


def test_scale_augmentation_resizes_label_with_nearest_neighbour():
    image, label = rgb_image(10, 20), Image.fromarray(np.full((10, 20), 7, dtype=np.uint8))
    img, lbl = DeepLabInputs(None, aug_scale=(2.0, 2.0))(image, label, 'a')
    assert img.shape == (3, 20, 40) and set(lbl.unique().tolist()) == {7}


def test_color_jitter_with_zero_amounts_is_identity_and_hue_shift_keeps_grey():
    image = rgb_image(6, 7)
    assert np.array_equal(np.asarray(datasets.color_jitter(image, random.Random(0), 0, 0, 0, 0)),
                          np.asarray(image))
    grey = Image.new('RGB', (4, 4), (90, 90, 90))
    assert np.asarray(datasets.color_jitter(grey, random.Random(0), 0, 0, 0, 0.2)).tolist() == \
        np.asarray(grey).tolist()


def test_transform_errors():
    with pytest.raises(ValueError, match='needs a label'):
        DeepLabInputs(4)(rgb_image(3, 3), None, 'x')
    with pytest.raises(ValueError, match='size'):
        DeepLabInputs(4)(rgb_image(3, 3), Image.new('L', (4, 3)), 'x')
    with pytest.raises(ValueError, match='aug_scale'):
        DeepLabInputs(4, aug_scale=(1.5, 0.5))
    for transform in (DeepLabInputs, DeepLabEvalInputs):
        with pytest.raises(TypeError, match="size: expected an int .* got '512'"):
            transform('512')
        assert transform(-1).size is None and transform(None).size is None and transform(np.int64(8)).size == 8


def test_eval_inputs_keep_id_and_original_size():
    img, code, size = DeepLabEvalInputs(8)(rgb_image(5, 6), None, '2008_000123')
    assert img.shape == (3, 8, 8) and size.tolist() == [5, 6]
    assert datasets.decode_id(code) == '2008_000123'
    batch = torch.utils.data.default_collate([(img, code, size)] * 2)
    assert [datasets.decode_id(c) for c in batch[1]] == ['2008_000123'] * 2


# ----------------------------------------------------------------------------------------------
# Synthetic
# ----------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_voc_like_and_subsettable():
    a, b = Synthetic('val'), Synthetic('val')
    image, label, image_id = a[3]
    assert image.mode == 'RGB' and label.mode == 'P' and image_id == 'val_00003'
    assert np.array_equal(np.asarray(image), np.asarray(b[3][0]))
    assert not np.array_equal(np.asarray(image), np.asarray(Synthetic('val', seed=1)[3][0]))
    labels = np.unique(np.concatenate([np.unique(np.asarray(a[i][1])) for i in range(10)]))
    assert set(labels.tolist()) <= {0, *SCENE_CLASSES} and len(labels) > 3
    assert label.getpalette()[:6] == voc_palette()[:6]
    subset = Synthetic('train_rand5', subset_seed=1)
    assert len(subset) == 5 and subset.ids == Synthetic('train_rand5', subset_seed=1).ids
    assert subset.ids != Synthetic('train_rand5', subset_seed=2).ids
    assert sorted(Synthetic('test_rand').ids) == Synthetic('test').ids
    with pytest.raises(ValueError, match='split'):
        Synthetic('train_aug')


@pytest.mark.parametrize('split, expected', [('train_aug_rand1500', ('train_aug', 1500)), ('val_rand', ('val', 0)),
                                             ('val_rand0', ('val', 0)), ('val', ('val', None)),
                                             ('val_random3', ('val_random3', None))])
def test_parse_rand_split(split, expected):
    assert datasets.parse_rand_split(split) == expected


# ----------------------------------------------------------------------------------------------
# A fake VOC / SBD / VOC2011 tree, as tar files served over HTTP
# ----------------------------------------------------------------------------------------------
VOC_TRAIN, VOC_VAL = ['2007_000001', '2007_000002'], ['2007_000003']
SBD_TRAIN, SBD_VAL = ['2007_000002', '2008_000010', '2008_000011'], ['2007_000003', '2008_000012']
VOC11 = {'train.txt': ['2007_000001', '2008_000010'], 'val.txt': ['2007_000003'],
         'trainval.txt': ['2007_000001', '2007_000003', '2008_000010'], 'seg11valid.txt': ['2007_000003']}


def _ids_bytes(ids):
    return ''.join(f'{i}\n' for i in ids).encode()


def _png_bytes(array, mode=None):
    buffer = io.BytesIO()
    (label_to_image(array) if mode == 'P' else Image.fromarray(array)).save(buffer, format='PNG' if mode else 'JPEG')
    return buffer.getvalue()


def _sbd_mat_bytes(label):
    """A .mat file with the real SBD layout: struct GTcls {Boundaries (cell of sparse), Segmentation,
    CategoriesPresent}."""
    boundaries = np.empty((20, 1), dtype=object)
    for c in range(20):
        boundaries[c, 0] = scipy.sparse.csc_matrix((label == c + 1).astype(np.uint8))
    gtcls = {'Boundaries': boundaries, 'Segmentation': label.astype(np.uint8),
             'CategoriesPresent': np.unique(label[label > 0]).astype(np.uint8)}
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {'GTcls': gtcls})
    return buffer.getvalue()


def _tar(path, files):
    with tarfile.open(path, 'w:gz' if str(path).endswith('gz') else 'w') as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _label(seed):
    return np.random.default_rng(seed).integers(0, 21, (6, 8)).astype(np.uint8)


@pytest.fixture
def served_voc(http_server, monkeypatch, tmp_path):
    root = http_server.root
    jpeg = _png_bytes(np.zeros((6, 8, 3), np.uint8), None)
    voc = {'VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt': _ids_bytes(VOC_TRAIN),
           'VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt': _ids_bytes(VOC_VAL),
           'VOCdevkit/VOC2012/ImageSets/Segmentation/trainval.txt': _ids_bytes(VOC_TRAIN + VOC_VAL)}
    for n, i in enumerate(VOC_TRAIN + VOC_VAL):
        voc[f'VOCdevkit/VOC2012/JPEGImages/{i}.jpg'] = jpeg
        voc[f'VOCdevkit/VOC2012/SegmentationClass/{i}.png'] = _png_bytes(_label(n), 'P')
    sbd = {'benchmark_RELEASE/dataset/train.txt': _ids_bytes(SBD_TRAIN),
           'benchmark_RELEASE/dataset/val.txt': _ids_bytes(SBD_VAL)}
    for n, i in enumerate(SBD_TRAIN + SBD_VAL):
        sbd[f'benchmark_RELEASE/dataset/img/{i}.jpg'] = jpeg
        sbd[f'benchmark_RELEASE/dataset/cls/{i}.mat'] = _sbd_mat_bytes(_label(100 + n))
    voc11 = {f'TrainVal/VOCdevkit/VOC2011/ImageSets/Segmentation/{name}': _ids_bytes(ids)
             for name, ids in VOC11.items() if name != 'seg11valid.txt'}
    _tar(root / 'voc.tar', voc)
    _tar(root / 'sbd.tgz', sbd)
    _tar(root / 'voc2011.tar', voc11)
    (root / 'seg11valid.txt').write_bytes(_ids_bytes(VOC11['seg11valid.txt']))
    md5 = lambda p: hashlib.md5(p.read_bytes()).hexdigest()  # noqa: E731
    monkeypatch.setattr(datasets, 'VOC_URL', http_server.url('voc.tar'))
    monkeypatch.setattr(datasets, 'VOC_MD5', md5(root / 'voc.tar'))
    monkeypatch.setattr(datasets, 'SBD_URL', http_server.url('sbd.tgz'))
    monkeypatch.setattr(datasets, 'SBD_MD5', md5(root / 'sbd.tgz'))
    manifest = datasets.voc11_manifest()
    manifest['sources']['voc2011_tar']['url'] = http_server.url('voc2011.tar')
    manifest['sources']['seg11valid']['url'] = http_server.url('seg11valid.txt')
    for name, ids in VOC11.items():
        manifest['files'][name]['md5'] = hashlib.md5(_ids_bytes(ids)).hexdigest()
    manifest_path = tmp_path / 'manifest.json'
    manifest_path.write_text(json.dumps(manifest))
    monkeypatch.setattr(datasets, 'MANIFEST_PATH', manifest_path)
    return http_server


def test_download_prepare_and_read_every_kind_of_split(served_voc, tmp_path):
    data = tmp_path / 'data'
    voc_root, sbd_root = data / 'VOCdevkit', data / 'benchmark_RELEASE'
    ds = PascalVOC(voc_root, sbd_root, 'train11_sbd', download=True)
    assert ds.ids == sorted(set(VOC11['train.txt']) | set(SBD_TRAIN))
    # SBD labels were converted from .mat to palette PNGs
    png = Image.open(sbd_root / 'dataset' / 'cls_png' / '2008_000012.png')
    assert png.mode == 'P' and np.array_equal(np.asarray(png), _label(100 + 4))
    image, label, image_id = ds[ds.ids.index('2008_000010')]
    assert image.size == (8, 6) and np.array_equal(np.asarray(label), _label(101))
    assert image_id == '2008_000010'
    image, label, _ = ds[ds.ids.index('2007_000001')]   # a VOC2012 label wins over SBD
    assert np.array_equal(np.asarray(label), _label(0))

    split = lambda name, seed=None: datasets.split_ids(name, voc_root, sbd_root, seed=seed)  # noqa: E731
    assert split('train') == VOC_TRAIN and split('val') == VOC_VAL
    assert split('train_aug') == sorted((set(VOC_TRAIN) | set(SBD_TRAIN) | set(SBD_VAL)) - set(VOC_VAL))
    assert split('trainval_aug') == sorted(set(split('train_aug')) | set(VOC_VAL))
    for name, filename in datasets.VOC11_SPLITS.items():
        assert split(name) == sorted(VOC11[filename])
    assert split('train_aug_rand2', seed=1) == split('train_aug_rand2', seed=1)
    assert len(split('train_aug_rand2', seed=1)) == 2
    assert sorted(split('train_aug_rand', seed=4)) == split('train_aug')
    with pytest.raises(ValueError, match='_rand<N>'):
        split('train_rand5')
    with pytest.raises(FileNotFoundError, match='VOC2012test.tar'):
        split('test')
    with pytest.raises(ValueError, match='split must be one of'):
        split('train12')

    # transforms plug in; a second construction downloads nothing
    requests = len(served_voc.requests)
    ds = PascalVOC(voc_root, sbd_root, 'train_aug', transform=DeepLabInputs(8, pad_label=True, seed=0),
                   download=True)
    img, lbl = ds[0]
    assert img.shape == (3, 8, 8) and lbl.shape == (8, 8)
    assert len(served_voc.requests) == requests


def test_voc11_lists_are_md5_checked_and_explain_how_to_supply_them(served_voc, tmp_path):
    lists = tmp_path / 'voc11seg'
    paths = datasets.fetch_voc11_lists(lists, progress=False)
    assert sorted(paths) == sorted(VOC11)
    assert datasets.voc11_list(lists, 'seg11valid.txt') == VOC11['seg11valid.txt']
    (lists / 'val.txt').write_text('2007_999999\n')
    with pytest.raises(ValueError, match=r'md5.*Supply them by hand'):
        datasets.voc11_list(lists, 'val.txt')
    datasets.fetch_voc11_lists(lists, progress=False)   # repairs the bad file
    assert datasets.voc11_list(lists, 'val.txt') == VOC11['val.txt']
    local = tmp_path / 'local'   # a VOC2011 tar already on disk is read in place
    datasets.fetch_voc11_lists(local, voc2011_tar=str(lists / 'voc2011.tar'), progress=False)
    assert datasets.voc11_list(local, 'trainval.txt') == VOC11['trainval.txt'] and not (local / 'voc2011.tar').exists()
    with pytest.raises(FileNotFoundError, match='--download'):
        datasets.voc11_list(tmp_path / 'nowhere', 'train.txt')
    bad = tmp_path / 'other'
    bad.mkdir()
    (bad / 'seg11valid.txt').write_text('wrong\n')
    with pytest.raises(ValueError, match='seg11valid.txt from its source has md5'):
        datasets.fetch_voc11_lists(tmp_path / 'fresh', seg11valid_url=str(bad / 'seg11valid.txt'), progress=False)
    assert not (tmp_path / 'fresh' / 'seg11valid.txt').exists()


def test_real_manifest_holds_the_spec_md5s():
    files = datasets.voc11_manifest()['files']
    assert {k: v['md5'] for k, v in files.items()} == {
        'train.txt': '7bffa37899addada3fc1613edc51fe62', 'val.txt': '3d62bde92504e8db3ffd92cebdbb4c8c',
        'trainval.txt': 'b8ac931f7f8f2fa32a1bc39a102488a1', 'seg11valid.txt': '7984b6ce736bd3666d8b7ee70b5401da'}


def test_wrong_roots_and_sbd_without_root_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match='VOCdevkit'):
        PascalVOC(tmp_path / 'voc', split='train', download=True)
    with pytest.raises(ValueError, match='sbd_root'):
        PascalVOC(tmp_path / 'VOCdevkit', split='train_aug')
    with pytest.raises(FileNotFoundError, match='split list'):
        PascalVOC(tmp_path / 'VOCdevkit', split='train')


def test_prepare_sbd_cli_converts_and_resumes(tmp_path):
    dataset = tmp_path / 'benchmark_RELEASE' / 'dataset'
    (dataset / 'cls').mkdir(parents=True)
    (dataset / 'train.txt').write_text('b\na\n')
    (dataset / 'val.txt').write_text('a\n')
    for n, i in enumerate('ab'):
        (dataset / 'cls' / f'{i}.mat').write_bytes(_sbd_mat_bytes(_label(n)))
    out = tmp_path / 'pngs'
    prepare_sbd.main([str(tmp_path / 'benchmark_RELEASE'), '--out', str(out)])
    assert np.array_equal(np.asarray(Image.open(out / 'b.png')), _label(1))
    assert prepare_sbd.sbd_annotation_to_png(tmp_path / 'benchmark_RELEASE', out, progress=False) == 0
