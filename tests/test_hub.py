"""hubconf.py through torch.hub.load(source='local'), with released weights served from 127.0.0.1."""
import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

import weights
from tools.download import ChecksumError

REPO_ROOT = Path(__file__).resolve().parents[1]

JOINT = ("pac_joint_upsample", "pac_joint_upsample_lite", "djif")
SEGMENTATION = {"fcn8s": "fcn8s_from_caffe", "pac_crf": "fcn8s_paccrf_epoch_30",
                "pac_crf32": "fcn8s_paccrf32_epoch_30", "pac_fcn": "fcn8s_pacfcn_epoch_20",
                "pac_fcn_crf": "fcn8s_pacfcncrf_epoch_20"}

pytestmark = pytest.mark.usefixtures("one_thread")


def hub_load(name, **kwargs):
    return torch.hub.load(str(REPO_ROOT), name, source="local", **kwargs)


@pytest.fixture
def mirror(http_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PACNET_WEIGHTS_URL", http_server.url(""))
    monkeypatch.setenv("PACNET_CACHE", str(tmp_path / "cache"))
    return http_server


def serve(mirror, registry_name, state_dict):
    path = mirror.root / weights.REGISTRY[registry_name].path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    return path


def assert_same_state(model, state_dict):
    loaded = model.state_dict()
    assert list(loaded) == list(state_dict)
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)


def test_entry_points_and_dependencies():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    public = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")}
    assert public == set(JOINT) | set(SEGMENTATION)  # what torch.hub.list shows
    assert all(importlib.util.find_spec(d) for d in hubconf.dependencies)
    # every released family has its entry point
    assert {e.model for e in weights.REGISTRY.values() if e.task == "task_jointUpsampling"} == {
        "PacJointUpsample", "PacJointUpsampleLite", "DJIF"}
    assert set(SEGMENTATION.values()) == {n for n, e in weights.REGISTRY.items()
                                          if e.task == "task_semanticSegmentation"}


@pytest.mark.parametrize("entry, factor, dataset, registry_name, channels", [
    ("pac_joint_upsample", 8, "nyu", "depth_x8_pac", 1),
    ("pac_joint_upsample_lite", 4, "nyu", "depth_x4_paclite", 1),
    ("djif", 16, "sintel", "flow_x16_djif", 2),
])
def test_joint_pretrained_loads_the_released_file(mirror, tmp_path, entry, factor, dataset, registry_name,
                                                  channels):
    torch.manual_seed(123)
    released = hub_load(entry, factor=factor, dataset=dataset, pretrained=False).state_dict()
    fresh = hub_load(entry, factor=factor, dataset=dataset, pretrained=False).state_dict()
    assert any(not torch.equal(released[k], fresh[k]) for k in released)  # so loading is visible
    serve(mirror, registry_name, released)
    model = hub_load(entry, factor=factor, dataset=dataset)
    assert_same_state(model, released)
    relative = weights.REGISTRY[registry_name].path
    assert mirror.requests == [("/" + relative, None)]
    assert (tmp_path / "cache" / relative).is_file()
    low, guide = torch.rand(1, channels, 4, 4), torch.rand(1, 3, 4 * factor, 4 * factor)
    assert model.eval()(low, guide).shape == (1, channels, 4 * factor, 4 * factor)
    hub_load(entry, factor=factor, dataset=dataset)  # a second load uses the cache
    assert len(mirror.requests) == 1


def test_joint_pretrained_false_builds_without_downloading(mirror):
    default = hub_load("pac_joint_upsample", factor=4, dataset="sintel", pretrained=False).state_dict()
    model = hub_load("pac_joint_upsample", factor=4, dataset="sintel", pretrained=False, k_ch=8)
    assert type(model).__name__ == "PacJointUpsample"
    assert any(v.shape != default[k].shape for k, v in model.state_dict().items())  # k_ch=8 was used
    assert model(torch.rand(1, 2, 5, 5), torch.rand(1, 3, 20, 20)).shape == (1, 2, 20, 20)
    assert mirror.requests == []


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dataset="kitti"), ValueError, r"dataset: expected one of \('nyu', 'sintel'\), got 'kitti'"),
    (dict(factor=2), ValueError, r"factor: expected one of \(4, 8, 16\), got 2"),
    (dict(k_ch=8), TypeError, r"\['k_ch'\] would change the released architecture"),
])
def test_joint_bad_arguments(mirror, kwargs, error, message):
    with pytest.raises(error, match=message):
        hub_load("pac_joint_upsample", **kwargs)
    assert mirror.requests == []


def test_lite_has_no_sintel_weights(mirror):
    with pytest.raises(ValueError, match="no released weights for dataset='sintel'"):
        hub_load("pac_joint_upsample_lite", dataset="sintel")
    assert hub_load("pac_joint_upsample_lite", dataset="sintel", pretrained=False) is not None


@pytest.fixture
def tiny_segmentation_registry(monkeypatch):
    """The released FCN-8s files are 0.5 GB: the same entry points, on the tiny backbone."""
    for name in SEGMENTATION.values():
        entry = weights.REGISTRY[name]
        monkeypatch.setitem(weights.REGISTRY, name,
                            entry._replace(model=entry.model.replace("fcn8spac", "tinyfcn")
                                           .replace("fcn8s", "tinyfcn")))


@pytest.mark.parametrize("entry", ["pac_crf", "pac_fcn_crf", "pac_crf32"])
def test_segmentation_pretrained_loads_the_released_file(mirror, tiny_segmentation_registry, entry):
    torch.manual_seed(7)
    released = hub_load(entry, pretrained=False).state_dict()
    assert any(k.startswith("crf.") for k in released) and any(k.startswith("backbone.") for k in released)
    serve(mirror, SEGMENTATION[entry], released)
    model = hub_load(entry)
    assert_same_state(model, released)
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 21, 32, 32)


def test_segmentation_checksum_and_class_count(mirror, tiny_segmentation_registry, monkeypatch):
    torch.manual_seed(3)
    released = hub_load("fcn8s", pretrained=False).state_dict()
    served = serve(mirror, "fcn8s_from_caffe", released)
    with pytest.raises(ChecksumError, match=weights.REGISTRY["fcn8s_from_caffe"].md5):  # the published md5
        hub_load("fcn8s")
    md5 = hashlib.md5(served.read_bytes()).hexdigest()
    monkeypatch.setitem(weights.REGISTRY, "fcn8s_from_caffe",
                        weights.REGISTRY["fcn8s_from_caffe"]._replace(md5=md5))
    assert_same_state(hub_load("fcn8s"), released)
    with pytest.raises(ValueError, match="21 .PASCAL VOC. classes, got 5"):
        hub_load("fcn8s", num_classes=5)
    assert hub_load("fcn8s", pretrained=False, num_classes=5).state_dict()["score.weight"].shape[0] == 5


@pytest.mark.slow
@pytest.mark.parametrize("entry", sorted(SEGMENTATION))
def test_segmentation_entry_points_build_the_released_architectures(entry):
    from task_semanticSegmentation.models import create_model
    model = hub_load(entry, pretrained=False)
    expected = create_model(weights.REGISTRY[SEGMENTATION[entry]].model, 21)
    assert type(model) is type(expected)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in expected.state_dict().items()}
