import os
import random

import numpy as np
import pytest
import torch

from tools.runtime import (CsvLog, atomic_open, atomic_save, atomic_savefig, find_snapshots,
                           format_table, read_csv_log, resolve_device, seed_everything)

FORMATS = ["{:.6f}", "{:g}", "{:.6f}"]
COLUMNS = ["epoch", "lr", "loss"]


# ---------------------------------------------------------------- devices and seeds
def test_resolve_device_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_errors():
    with pytest.raises(ValueError, match="not a valid device"):
        resolve_device("gpu0")
    with pytest.raises(TypeError, match="must be a str"):
        resolve_device(0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_seed_everything_repeats_python_numpy_torch():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    seed_everything(124)
    assert draw() != first


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (2**32, ValueError), ("1", TypeError),
                                        (1.0, TypeError)])
def test_seed_everything_rejects_bad_seeds(bad, error):
    with pytest.raises(error, match="seed"):
        seed_everything(bad)


# ---------------------------------------------------------------- atomic writes and snapshots
def test_atomic_save_roundtrip_and_no_temp_left(tmp_path):
    path = tmp_path / "sub" / "weights_epoch_3.pth"
    atomic_save({"w": torch.arange(4.0)}, path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(4.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["weights_epoch_3.pth"]


def test_atomic_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"v": torch.ones(2)}, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_atomic_open_uses_rename(tmp_path, monkeypatch):
    calls = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append((a, b)), real_replace(a, b)))
    with atomic_open(tmp_path / "out.txt", "w") as handle:
        handle.write("hello")
        assert not (tmp_path / "out.txt").exists()  # nothing visible until the rename
    assert (tmp_path / "out.txt").read_text() == "hello"
    assert len(calls) == 1 and os.path.dirname(calls[0][0]) == str(tmp_path)


def test_atomic_savefig_format_by_suffix_and_failure_leaves_nothing(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1, 1))
    FigureCanvasAgg(figure)
    figure.add_subplot().plot([0, 1], [1, 0])
    png = atomic_savefig(figure, tmp_path / "sub" / "plot.png", dpi=20)
    assert png == tmp_path / "sub" / "plot.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert atomic_savefig(figure, tmp_path / "plot.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError, match="not supported"):
        atomic_savefig(figure, tmp_path / "plot.nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.svg", "sub"]


def test_find_snapshots(tmp_path):
    for name in ["weights_epoch_10.pth", "weights_epoch_2.pth", "adam_epoch_2.pth",
                 "weights_epoch_x.pth", "weights_epoch_3.pth.tmp"]:
        (tmp_path / name).write_bytes(b"")
    assert find_snapshots(tmp_path) == {2: tmp_path / "weights_epoch_2.pth",
                                        10: tmp_path / "weights_epoch_10.pth"}
    assert list(find_snapshots(tmp_path)) == [2, 10]
    assert find_snapshots(tmp_path, prefix="adam_epoch_") == {2: tmp_path / "adam_epoch_2.pth"}
    assert find_snapshots(tmp_path / "missing") == {}


# ---------------------------------------------------------------- CSV logs
def _write_rows(path, epochs):
    with CsvLog(path, COLUMNS) as log:
        for epoch in epochs:
            log.write([epoch, 1e-4, epoch / 10], FORMATS)


def test_csvlog_fresh_format_and_flush(tmp_path):
    path = tmp_path / "train.log"
    log = CsvLog(path, COLUMNS)
    log.write([0.5, 1e-4, 0.25], FORMATS)
    # flushed: visible before close
    assert path.read_text() == "epoch,lr,loss\n0.500000,0.0001,0.250000\n"
    log.write([1, 1e-5, None], FORMATS)
    log.write([np.float32(1.5), torch.tensor(1e-6), np.float32("nan")], FORMATS)
    log.close()
    assert path.read_text().splitlines()[-2:] == ["1.000000,1e-05,", "1.500000,1e-06,"]
    data = read_csv_log(path)
    assert data["epoch"] == [0.5, 1.0, 1.5] and data["lr"] == [1e-4, 1e-5, 1e-6]
    assert data["loss"][0] == 0.25 and np.isnan(data["loss"][1]) and np.isnan(data["loss"][2])


def test_csvlog_fresh_replaces_old_log(tmp_path):
    path = tmp_path / "train.log"
    _write_rows(path, [1, 2])
    CsvLog(path, COLUMNS).close()
    assert path.read_text() == "epoch,lr,loss\n"


@pytest.mark.parametrize("epochs, resume, kept", [
    ([], 5, []),                      # header-only file (the 2019 code crashed on 0 and 1 rows)
    ([1], 5, [1.0]),
    ([1], 0, []),
    ([1, 2, 3, 4], 2, [1.0, 2.0]),
    ([0.5, 1, 1.5, 2, 2.5], 2, [0.5, 1.0, 1.5, 2.0]),
])
def test_csvlog_resume_keeps_rows_up_to_epoch(tmp_path, epochs, resume, kept):
    path = tmp_path / "test.log"
    _write_rows(path, epochs)
    with CsvLog(path, COLUMNS, resume_epoch=resume) as log:
        log.write([9, 1e-4, 0.9], FORMATS)
    assert read_csv_log(path)["epoch"] == kept + [9.0]
    assert path.read_text().startswith("epoch,lr,loss\n")


def test_csvlog_resume_missing_file_starts_fresh(tmp_path):
    path = tmp_path / "new.log"
    CsvLog(path, COLUMNS, resume_epoch=3).close()
    assert path.read_text() == "epoch,lr,loss\n"


def test_csvlog_errors(tmp_path):
    path = tmp_path / "train.log"
    _write_rows(path, [1])
    with pytest.raises(ValueError, match="header"):
        CsvLog(path, ["epoch", "loss"], resume_epoch=1)
    log = CsvLog(path, COLUMNS)
    with pytest.raises(ValueError, match="expected 3 entries"):
        log.write([1, 2], FORMATS)
    with pytest.raises(ValueError, match="formats"):
        log.write([1, 2, 3], ["{:g}"])
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.write([1, 2, 3], FORMATS)
    with pytest.raises(ValueError, match="columns"):
        CsvLog(path, ["a,b"])


def test_read_csv_log_header_only_and_bad_rows(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\n")
    assert read_csv_log(path) == {"epoch": [], "loss": []}
    path.write_text("epoch,loss\n1,2,3\n")
    with pytest.raises(ValueError, match=r"log.csv:2: expected 2 fields"):
        read_csv_log(path)


# ---------------------------------------------------------------- tables
def test_format_table_alignment_and_formats():
    rows = [{"model": "Bilinear", "x4": 5.43, "x8": 8.3612},
            {"model": "PacJointUpsample", "x4": 2.39}]
    text = format_table(rows, ["model", "x4", "x8"], formats={"x4": "{:.2f}"})
    assert text.splitlines() == [
        "model               x4      x8",
        "----------------  ----  ------",
        "Bilinear          5.43  8.3612",
        "PacJointUpsample  2.39       -",
    ]
