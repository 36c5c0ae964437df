"""Plot the CSV training logs (``train.log`` / ``test.log``) of the task programs.

The x axis is each file's first column (the epoch); every other requested column gets a panel.

Example:
    python -m tools.plot_log exp/nyu/train.log exp/nyu/test.log --plots loss rmse \\
        --output exp/nyu/curves.png

    >>> from tools.runtime import CsvLog
    >>> for run, rmse in (("a", 5.0), ("b", 4.0)):
    ...     with CsvLog(f"exp/{run}/test.log", ["epoch", "rmse"], resume_epoch=None) as log:
    ...         for epoch in range(1, 4):
    ...             log.write([epoch, rmse / epoch], ["{:d}", "{:.3f}"])
    >>> plot_logs(["exp/a/test.log", "exp/b/test.log"], "compare.png", plots=["rmse"])
    PosixPath('compare.png')
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from tools.runtime import atomic_savefig, read_csv_log

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["plot_logs", "default_labels", "smooth_curve", "main"]

EMPTY_PANEL = "-"


def default_labels(paths: Sequence[PathLike]) -> list[str]:
    """The paths with their common prefix and common suffix removed (the whole path if one)."""
    texts = [str(p) for p in paths]
    if len(texts) < 2:
        return texts
    prefix = len(os.path.commonprefix(texts))
    suffix = len(os.path.commonprefix([t[::-1] for t in texts]))
    shortest = min(len(t) for t in texts)
    suffix = min(suffix, shortest - prefix)  # the prefix and the suffix must not overlap
    labels = [t[prefix:len(t) - suffix] for t in texts]
    return labels if all(labels) else texts


def smooth_curve(x: np.ndarray, y: np.ndarray, smooth: float) -> tuple[np.ndarray, np.ndarray]:
    """Centred moving average over ``len * smooth // 100`` points.

    Applied only when there are more than ``3 * 100 / smooth`` points (and smooth > 0), so short
    curves are left as they are.
    """
    n = len(y)
    if smooth <= 0 or n <= 3 * 100 / smooth:
        return x, y
    window = int(n * smooth // 100)
    if window < 2:
        return x, y
    y_smooth = np.convolve(y, np.ones(window) / window, mode="valid")
    start = (window - 1) // 2
    return x[start:start + len(y_smooth)], y_smooth


def _load_curve(paths: Sequence[Path]) -> dict[str, np.ndarray]:
    """Read one or more logs of the same run; several are averaged ("trials")."""
    logs = [read_csv_log(p) for p in paths]
    columns = [c for c in logs[0] if all(c in log for log in logs)]
    length = min(len(log[columns[0]]) for log in logs)
    return {c: np.mean([np.asarray(log[c][:length], np.float64) for log in logs], axis=0)
            for c in columns}


def _order(labels: list[str], reorder: Optional[Sequence[str]]) -> list[int]:
    if not reorder:
        return list(range(len(labels)))
    if list(reorder) == ["str"]:
        return sorted(range(len(labels)), key=lambda i: labels[i])
    unknown = [r for r in reorder if r not in labels]
    if unknown:
        raise ValueError(f"reorder: unknown labels {unknown}, the labels are {labels}")
    return [labels.index(r) for r in reorder]


def plot_logs(paths: Sequence[PathLike], output: Optional[PathLike],
              plots: Optional[Sequence[str]] = None,
              labels: Optional[Sequence[str]] = None, average: int = 1,
              reorder: Optional[Sequence[str]] = None, smooth: float = 5.0, num_col: int = 0,
              subplot_size: float = 5.0, legend: str = "best",
              xlim: Optional[Sequence[float]] = None) -> Optional[Path]:
    """Plot CSV logs, one curve per log (or per group of ``average`` logs), one panel per column.

    Args:
        paths: CSV log files.
        output: the image to write (PNG by suffix, Agg backend). ``None`` or ``""`` shows the
            figure in a window instead.
        plots: column names to plot, one panel each; ``"-"`` leaves a panel empty. Default: every
            column except the first.
        labels: one label per curve; default: the paths without their common prefix/suffix.
        average: number of consecutive files averaged into one curve (repeated trials).
        reorder: labels in the order to draw them, or ``["str"]`` for sorted order.
        smooth: moving-average window in percent of the curve length (see :func:`smooth_curve`).
        num_col: panels per row; 0 = ceil(sqrt(number of panels)).
        subplot_size: panel size in inches.
        legend: legend location (``_`` stands for a space, e.g. ``upper_right``); ``"off"``
            hides it.
        xlim: ``[xmin]`` or ``[xmin, xmax]``.

    Returns:
        The written image path, or None when the figure was shown.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("paths: expected at least one log file, got none")
    if average < 1 or len(paths) % average:
        raise ValueError(f"average: must be >= 1 and divide the number of files ({len(paths)}), "
                         f"got {average}")
    groups = [paths[i:i + average] for i in range(0, len(paths), average)]
    curves = [_load_curve(group) for group in groups]
    labels = list(labels) if labels else default_labels([group[0] for group in groups])
    if len(labels) != len(curves):
        raise ValueError(f"labels: expected {len(curves)} (one per curve), got {len(labels)}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels: must be unique, got {labels}")
    order = _order(labels, reorder)
    if plots is None:
        plots = list(dict.fromkeys(c for curve in curves for c in list(curve)[1:]))
    missing = [p for p in plots if p != EMPTY_PANEL and not any(p in c for c in curves)]
    if missing:
        raise ValueError(f"plots: no log has the column(s) {missing}; available: "
                         f"{sorted({c for curve in curves for c in curve})}")
    if xlim is not None and len(xlim) not in (1, 2):
        raise ValueError(f"xlim: expected [xmin] or [xmin, xmax], got {list(xlim)}")

    if num_col <= 0:
        num_col = max(1, math.ceil(math.sqrt(len(plots))))
    num_row = max(1, math.ceil(len(plots) / num_col))
    figsize = (num_col * subplot_size, num_row * subplot_size)
    if output:  # draw off-screen with Agg, whatever the default backend is
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=figsize, layout="constrained")
        FigureCanvasAgg(figure)
    else:
        import matplotlib.pyplot as plt

        figure = plt.figure(figsize=figsize, layout="constrained")
    for index, column in enumerate(plots):
        axes = figure.add_subplot(num_row, num_col, index + 1)
        if column == EMPTY_PANEL:
            axes.axis("off")
        else:
            _draw_panel(axes, column, curves, labels, order, smooth, legend, xlim)
    if not output:
        plt.show()
        return None
    return atomic_savefig(figure, output, dpi=100)


def _draw_panel(axes, column, curves, labels, order, smooth, legend, xlim) -> None:
    for i in order:
        curve = curves[i]
        if column in curve:
            x_name = next(iter(curve))
            x, y = smooth_curve(curve[x_name], curve[column], smooth)
            axes.plot(x, y, label=labels[i])
            axes.set_xlabel(x_name)
    axes.set_title(column)
    if column == "lr" and axes.has_data():
        axes.set_yscale("log")  # learning-rate steps are factors of 10
    axes.grid(True, alpha=0.3)
    if xlim is not None:
        axes.set_xlim(*xlim)
    if legend != "off":
        axes.legend(loc=legend.replace("_", " "))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description="Plot CSV training logs (x axis = first column)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("paths", nargs="+", help="CSV log files")
    parser.add_argument("--output", default="", help="image file to write; empty shows a window")
    parser.add_argument("--plots", nargs="+", default=None,
                        help="columns to plot, one panel each; '-' leaves a panel empty "
                             "(default: every column but the first)")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per curve")
    parser.add_argument("--average", type=int, default=1,
                        help="number of consecutive files averaged into one curve")
    parser.add_argument("--reorder", nargs="+", default=None,
                        help="labels in drawing order, or 'str' for sorted")
    parser.add_argument("--smooth", type=float, default=5.0,
                        help="moving-average window in percent of the curve length")
    parser.add_argument("--num-col", type=int, default=0, help="panels per row, 0 = auto")
    parser.add_argument("--subplot-size", type=float, default=5, help="panel size in inches")
    parser.add_argument("--legend", default="best",
                        help="legend location ('_' = space, e.g. upper_right), 'off' hides it")
    parser.add_argument("--xlim", type=float, nargs="+", default=None, help="xmin [xmax]")
    args = parser.parse_args(argv)
    if not args.output:
        import matplotlib

        if not os.environ.get("DISPLAY") and matplotlib.get_backend().lower() == "agg":
            parser.error("no display to show the figure on: pass --output FILE.png")
    try:
        written = plot_logs(args.paths, args.output, plots=args.plots, labels=args.labels,
                            average=args.average, reorder=args.reorder, smooth=args.smooth,
                            num_col=args.num_col, subplot_size=args.subplot_size,
                            legend=args.legend, xlim=args.xlim)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if written is not None:
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
