import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.plot_log import default_labels, main, plot_logs, smooth_curve
from tools.runtime import CsvLog

REPO_ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["{:.6f}", "{:g}", "{:.6f}", "{:.6f}"]


def _log(path, rows, columns=("epoch", "lr", "loss", "rmse")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with CsvLog(path, list(columns)) as log:
        for row in rows:
            log.write(row, FORMATS[:len(columns)])
    return path


@pytest.fixture
def two_runs(tmp_path):
    epochs = np.arange(1, 101)
    paths = []
    for run, scale in (("pac", 1.0), ("djif", 2.0)):
        rows = [[e, 1e-4, scale / e, scale * 3 / np.sqrt(e)] for e in epochs]
        paths.append(_log(tmp_path / "exp" / run / "test.log", rows))
    return paths


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size, np.asarray(image.convert("L")).std()


def test_plot_logs_writes_png(two_runs, tmp_path):
    out = plot_logs(two_runs, tmp_path / "plots" / "curves.png", plots=["loss", "rmse"],
                    subplot_size=3)
    assert out == tmp_path / "plots" / "curves.png"
    size, spread = _png_size(out)
    assert size == (600, 300)  # 2 panels side by side, 3 inches at 100 dpi
    assert spread > 10  # not a blank image


def test_plot_logs_options(two_runs, tmp_path):
    out = plot_logs(two_runs, tmp_path / "o.png", plots=["loss", "-", "rmse"], num_col=1,
                    labels=["PAC", "DJIF"], reorder=["DJIF", "PAC"], legend="upper_right",
                    xlim=[10, 50], smooth=0, subplot_size=2)
    assert _png_size(out)[0] == (200, 600)  # 3 panels in one column
    # default plots: every column but the first -> lr, loss, rmse in a 2 x 2 grid
    out = plot_logs(two_runs, tmp_path / "d.png", reorder=["str"], legend="off", subplot_size=2)
    assert _png_size(out)[0] == (400, 400)


def test_plot_logs_average_and_header_only(tmp_path):
    rows = [[e, 1e-3, 1.0, 1.0] for e in range(1, 5)]
    paths = [_log(tmp_path / f"trial{i}.log", rows) for i in range(4)]
    out = plot_logs(paths, tmp_path / "avg.png", average=2, labels=["a", "b"], subplot_size=3)
    assert out.is_file()
    empty = _log(tmp_path / "empty.log", [])
    assert plot_logs([empty], tmp_path / "empty.png", plots=["loss"], labels=["run"],
                     subplot_size=2).is_file()


def test_plot_logs_errors(two_runs, tmp_path):
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match="must be unique"):
        plot_logs(two_runs, out, labels=["a", "a"])
    with pytest.raises(ValueError, match="one per curve"):
        plot_logs(two_runs, out, labels=["a"])
    with pytest.raises(ValueError, match="no log has the column"):
        plot_logs(two_runs, out, plots=["miou"])
    with pytest.raises(ValueError, match="average"):
        plot_logs(two_runs, out, average=3)
    with pytest.raises(ValueError, match="reorder"):
        plot_logs(two_runs, out, reorder=["nope"])
    with pytest.raises(ValueError, match="xlim"):
        plot_logs(two_runs, out, xlim=[1, 2, 3])
    assert not out.exists()


def test_default_labels_strip_common_prefix_and_suffix():
    assert default_labels(["exp/nyu_pac/test.log", "exp/nyu_djif/test.log"]) == ["pac", "djif"]
    assert default_labels(["exp/a.log"]) == ["exp/a.log"]
    # stripping would leave an empty label: keep the full paths
    assert default_labels(["run1.log", "run11.log"]) == ["run1.log", "run11.log"]


def test_smooth_curve_rule():
    x = np.arange(100.0)
    y = np.arange(100.0) ** 2
    sx, sy = smooth_curve(x, y, 5.0)  # window 5, applied since 100 > 60
    assert len(sy) == 96 and sx[0] == 2 and sy[0] == pytest.approx(np.mean(y[:5]))
    short_x, short_y = smooth_curve(x[:50], y[:50], 5.0)  # 50 <= 60: unchanged
    assert np.array_equal(short_x, x[:50]) and np.array_equal(short_y, y[:50])
    assert smooth_curve(x, y, 0)[1] is y


def test_cli_writes_png(two_runs, tmp_path, capsys):
    out = tmp_path / "cli.png"
    main([str(p) for p in two_runs] + ["--output", str(out), "--plots", "rmse",
                                       "--subplot-size", "2"])
    assert _png_size(out)[0] == (200, 200)
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(two_runs[0]), "--output", str(out), "--plots", "nope"])
    assert "no log has the column" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing torch and matplotlib takes seconds
def test_cli_module_entry_point(two_runs, tmp_path):
    out = tmp_path / "module.png"
    subprocess.run([sys.executable, "-m", "tools.plot_log", *map(str, two_runs), "--output",
                    str(out), "--smooth", "10"], cwd=REPO_ROOT, check=True, capture_output=True)
    assert out.is_file()
