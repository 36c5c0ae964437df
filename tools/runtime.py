"""Small runtime helpers shared by the task programs.

Devices, seeding, atomic checkpoint writes, snapshot discovery, CSV training logs and plain-text
result tables. Nothing here knows about a particular task.

Example:
    >>> device = resolve_device("auto")
    >>> seed_everything(1)
    >>> log = CsvLog("exp/train.log", ["epoch", "lr", "loss"], resume_epoch=None)
    >>> log.write([0.5, 1e-4, 0.123], ["{:.6f}", "{:g}", "{:.6f}"])
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import math
import os
import random
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Sequence, Union

import numpy as np
import torch

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "resolve_device",
    "seed_everything",
    "atomic_open",
    "atomic_save",
    "atomic_savefig",
    "write_bytes_atomic",
    "remove_stale_temp_files",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint_state",
    "find_snapshots",
    "CsvLog",
    "read_csv_log",
    "format_table",
]


# --------------------------------------------------------------------------------------------------
# Devices and seeding
# --------------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """Turn a device name into a ``torch.device`` that exists on this machine.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU) or any torch device string such as
            ``"cpu"``, ``"cuda"``, ``"cuda:1"``.

    Raises:
        ValueError: the name is not a device string, or names a device this machine lacks.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if not isinstance(name, str):
        raise TypeError(f"device name must be a str, got {type(name).__name__}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device: {name!r} is not a valid device string; expected 'auto', "
                         "'cpu', 'cuda' or 'cuda:<index>'") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device: {name!r} was requested but CUDA is not available on this "
                             "machine; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device: {name!r} was requested but only {count} CUDA device(s) "
                             f"exist (indices 0..{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {name!r} was requested but MPS is not available; "
                         "use 'cpu' or 'auto'")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, NumPy and torch (CPU and every CUDA device).

    Args:
        seed: an integer in ``[0, 2**32 - 1]`` (NumPy's range).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32 - 1], got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------------------------------
# Atomic writes and snapshots
# --------------------------------------------------------------------------------------------------
def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):  # Linux: read it without changing it (thread-safe)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    Readers never see a half-written file: they see the old content or the new one. If the
    ``with`` body raises, the temporary file is removed and ``path`` is left untouched. The file
    gets the permissions of a plain ``open`` (0666 minus the umask), not mkstemp's 0600. A failed
    write (full disk, read-only folder) raises OSError naming ``path``.

    Example:
        >>> with atomic_open("results.txt", "w") as f:
        ...     _ = f.write("done\\n")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(err, OSError) and not isinstance(err, _WriteError):
            raise _write_error(path, err) from None
        raise


class _WriteError(OSError):
    """An OSError whose message already names the file."""


def _write_error(path: Path, err: OSError) -> OSError:
    reason = err.strerror or str(err)
    hint = " (the disk is full)" if err.errno == errno.ENOSPC else ""
    return _WriteError(err.errno, f"cannot write {path}: {reason}{hint}")


def remove_stale_temp_files(folder: PathLike) -> list[Path]:
    """Delete the temporary files that an interrupted :func:`atomic_open` left in ``folder``.

    Call it only where no other process writes at the same time (e.g. at the start of a run in
    its own experiment folder). Returns the deleted paths.
    """
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a truncated checkpoint behind (temp file + fsync + rename).

    The object is serialised in memory first, so a full disk is a plain OSError naming ``path``.

    Example:
        >>> atomic_save(torch.nn.Linear(3, 2).state_dict(), "exp/weights_epoch_10.pth")
    """
    write_bytes_atomic(_serialize(obj), path)


def _serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_bytes_atomic(data: bytes, path: PathLike) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


# --------------------------------------------------------------------------------------------------
# Checkpoints: weights + training state as one unit
# --------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A snapshot's weights have no matching training state (an interrupted or foreign write)."""


def save_checkpoint(weights: Mapping[str, torch.Tensor], state: Mapping[str, Any],
                    weights_path: PathLike, state_path: PathLike) -> None:
    """Save a snapshot as one unit: the training state first, the weights file last.

    The weights file (a plain state_dict: ``torch.save``, the released-weights format, or
    safetensors when ``weights_path`` ends in ``.safetensors``; see
    :func:`weights.state_dict_bytes`) is the commit marker: it appears only after its state is on
    disk, and the state records the sha256 of the weights bytes, so :func:`load_checkpoint_state`
    accepts only the state written with these weights. A kill between the two writes leaves a
    state without weights, which no resume picks up.
    """
    from weights import state_dict_bytes  # imported here: the weights package imports this module

    save_format = "safetensors" if Path(weights_path).suffix == ".safetensors" else "pth"
    data = state_dict_bytes(weights, save_format)
    state = {**state, "weights_sha256": hashlib.sha256(data).hexdigest()}
    atomic_save(state, state_path)
    write_bytes_atomic(data, weights_path)


def load_checkpoint_state(weights_path: PathLike, state_path: PathLike,
                          map_location: Any = "cpu") -> dict[str, Any]:
    """The training state saved with ``weights_path`` by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the state file is missing, unreadable, or was written with other weights.
    """
    weights_path, state_path = Path(weights_path), Path(state_path)
    if not state_path.is_file():
        raise CheckpointError(f"{weights_path} has no training state {state_path.name} beside it, "
                              "so it cannot be resumed exactly")
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 (a damaged file raises many types)
        raise CheckpointError(f"{state_path} is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_path} is not a training state (a {type(state).__name__})")
    recorded = state.get("weights_sha256")
    if recorded is not None:
        with open(weights_path, "rb") as handle:
            actual = hashlib.sha256(handle.read()).hexdigest()
        if actual != recorded:
            raise CheckpointError(f"{state_path} was written with other weights than {weights_path} "
                                  "(an interrupted or mixed snapshot)")
    return state


def atomic_savefig(figure: Any, path: PathLike, **savefig_kwargs: Any) -> Path:
    """``figure.savefig(path)`` for a matplotlib figure, written atomically (temp file + rename).

    The format comes from the suffix of ``path`` (PNG when there is none).

    Example:
        >>> from matplotlib.figure import Figure
        >>> figure = Figure()
        >>> _ = figure.add_subplot().plot([1, 2, 3])
        >>> atomic_savefig(figure, "exp/curves.png", dpi=100)
        PosixPath('exp/curves.png')
    """
    path = Path(path)
    buffer = io.BytesIO()  # rendered in memory: a full disk is then a plain OSError naming the file
    figure.savefig(buffer, format=path.suffix[1:].lower() or "png", **savefig_kwargs)
    write_bytes_atomic(buffer.getvalue(), path)
    return path


def find_snapshots(exp_root: PathLike, prefix: str = "weights_epoch_") -> dict[int, Path]:
    """Find ``<prefix><epoch>.pth`` and ``<prefix><epoch>.safetensors`` files in ``exp_root``.

    Returns:
        ``{epoch: path}`` sorted by epoch; empty when the folder does not exist. When an epoch
        has both formats, the more recently written file is returned.

    Example:
        >>> atomic_save({}, "exp/nyu/weights_epoch_100.pth")
        >>> find_snapshots("exp/nyu")
        {100: PosixPath('exp/nyu/weights_epoch_100.pth')}
    """
    exp_root = Path(exp_root)
    if not exp_root.is_dir():
        return {}
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(?:pth|safetensors)")
    found: dict[int, Path] = {}
    for entry in exp_root.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file():
            epoch = int(match.group(1))
            if epoch not in found or entry.stat().st_mtime_ns > found[epoch].stat().st_mtime_ns:
                found[epoch] = entry
    return dict(sorted(found.items()))


# --------------------------------------------------------------------------------------------------
# CSV logs
# --------------------------------------------------------------------------------------------------
def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _parse_float(text: str) -> float:
    text = text.strip()
    return float(text) if text else math.nan


class CsvLog:
    """An append-only CSV log (``train.log`` / ``test.log``) that can resume an interrupted run.

    Args:
        path: the log file.
        columns: the header names; the first column is the x axis (epoch).
        resume_epoch: ``None`` starts a fresh log (header only, any old file replaced). A number
            keeps the existing header and the data rows whose first column is ``<= resume_epoch``
            and drops later rows (they belong to epochs that will be recomputed).
        formats: default per-column formats used when :meth:`write` is called without formats.

    Raises:
        ValueError: when resuming a log whose header differs from ``columns``.

    Example:
        >>> log = CsvLog("exp/test.log", ["epoch", "lr", "loss", "rmse"])
        >>> log.write([10, 1e-4, 0.01, 2.5], ["{:.6f}", "{:g}", "{:.6f}", "{:.6f}"])
        >>> log.close()
    """

    def __init__(self, path: PathLike, columns: Sequence[str],
                 resume_epoch: float | None = None, formats: Sequence[str] | None = None) -> None:
        self._handle: IO[str] | None = None
        columns = list(columns)
        if not columns or not all(isinstance(c, str) and c and "," not in c for c in columns):
            raise ValueError(f"columns must be non-empty names without commas, got {columns!r}")
        self.path = Path(path)
        self.columns = columns
        self.formats = self._check_formats(formats) if formats is not None else None
        header = ",".join(columns)
        kept: list[str] = []
        if resume_epoch is not None and not math.isfinite(resume_epoch):
            raise ValueError(f"resume_epoch must be a finite number or None, got {resume_epoch!r}")
        if resume_epoch is not None and self.path.is_file():
            kept = self._rows_to_keep(header, float(resume_epoch))
        with atomic_open(self.path, "w") as handle:
            handle.write("".join(line + "\n" for line in [header, *kept]))
        self._handle = open(self.path, "a", encoding="utf-8")

    def _rows_to_keep(self, header: str, resume_epoch: float) -> list[str]:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        if not lines:  # an empty file: treat as fresh
            return []
        if lines[0].strip() != header:
            raise ValueError(f"{self.path}: cannot resume, its header {lines[0].strip()!r} differs "
                             f"from the expected {header!r}; start a fresh log (e.g. --overwrite)")
        return [line for line in lines[1:]
                if line.strip() and _parse_float(line.split(",", 1)[0]) <= resume_epoch]

    def _check_formats(self, formats: Sequence[str]) -> list[str]:
        formats = list(formats)
        if len(formats) != len(self.columns):
            raise ValueError(f"formats: expected {len(self.columns)} entries (one per column "
                             f"{self.columns}), got {len(formats)}")
        return formats

    def write(self, values: Sequence[Any], formats: Sequence[str] | None = None) -> None:
        """Append one row and flush. ``None`` (or NaN) values are written as an empty field."""
        if self._handle is None:
            raise ValueError(f"{self.path}: the log is closed")
        if len(values) != len(self.columns):
            raise ValueError(f"values: expected {len(self.columns)} entries (one per column "
                             f"{self.columns}), got {len(values)}")
        formats = self._check_formats(formats) if formats is not None else self.formats
        if formats is None:
            formats = ["{:g}"] * len(self.columns)
        fields = ["" if _is_missing(v) else fmt.format(v) for v, fmt in zip(values, formats)]
        try:
            self._handle.write(",".join(fields) + "\n")
            self._handle.flush()
        except OSError as err:
            raise _write_error(self.path, err) from None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "CsvLog":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_handle"):
            self.close()


def read_csv_log(path: PathLike) -> dict[str, list[float]]:
    """Read a CSV log written by :class:`CsvLog` into ``{column: values}`` (empty field -> NaN).

    Works for header-only files (every list empty).
    """
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty log file, expected a CSV header line")
    columns = [c.strip() for c in lines[0].split(",")]
    data: dict[str, list[float]] = {c: [] for c in columns}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split(",")
        if len(fields) != len(columns):
            raise ValueError(f"{path}:{number}: expected {len(columns)} fields, got {len(fields)}")
        try:
            for column, field in zip(columns, fields):
                data[column].append(_parse_float(field))
        except ValueError:
            raise ValueError(f"{path}:{number}: non-numeric field in {line!r}") from None
    return data


# --------------------------------------------------------------------------------------------------
# Result tables
# --------------------------------------------------------------------------------------------------
def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                 formats: Mapping[str, str] | None = None, float_format: str = "{:.4f}") -> str:
    """Format rows as a fixed-width plain-text table (numbers right-aligned, text left-aligned).

    Args:
        rows: one mapping per row; a missing or ``None`` value prints as ``-``.
        columns: the column names, in order.
        formats: optional per-column format strings, e.g. ``{"rmse": "{:.2f}"}``.
        float_format: the format of other float values.

    Example:
        >>> print(format_table([{"model": "PAC", "x8": 4.59}], ["model", "x8"]))
        model      x8
        -----  ------
        PAC    4.5900
    """
    formats = dict(formats or {})

    def cell(row: Mapping[str, Any], column: str) -> tuple[str, bool]:
        value = row.get(column)
        if value is None:
            return "-", True
        numeric = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        if column in formats:
            return formats[column].format(value), numeric
        if isinstance(value, (float, np.floating)):
            return float_format.format(value), True
        return str(value), numeric

    columns = list(columns)
    cells = [[cell(row, c) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i][0]) for r in cells]) for i, c in enumerate(columns)]
    right = [any(r[i][1] for r in cells) for i in range(len(columns))]

    def line(texts: Sequence[str]) -> str:
        parts = [t.rjust(w) if r else t.ljust(w) for t, w, r in zip(texts, widths, right)]
        return "  ".join(parts).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out += [line([text for text, _ in r]) for r in cells]
    return "\n".join(out)
