"""Released PAC weights: a name registry, a verified download cache, and loading with a key report.

Every ``--load-weights`` style argument goes through :func:`resolve_weights`, which accepts a local
file, an ``http(s)://`` or ``file://`` URL, or one of the registry names below (downloaded once
into the cache; md5-verified where a checksum is published, otherwise checked for its announced
length and for being a complete file: one that ``torch.load`` reads, or for a ``.safetensors``
name, a safetensors file whose tensors end where the file does).

Two file formats load alike: ``torch.save`` files (``.pth``, the format of the released weights,
read with ``weights_only=True``) and ``.safetensors`` files (recognised by suffix or content; they
need the optional package ``safetensors``). :func:`save_state_dict` writes either, atomically.

Environment:
    PACNET_WEIGHTS_URL: base URL of a mirror of the weights (default: the authors' server).
    PACNET_CACHE: cache folder (default ``<torch hub dir>/checkpoints/pacnet``, i.e.
        ``$TORCH_HOME/hub/checkpoints/pacnet``, by default ``~/.cache/torch/hub/checkpoints/pacnet``).

Example:
    >>> import torch
    >>> from weights import load_state_dict, load_into
    >>> model = torch.nn.Linear(3, 2)
    >>> state = load_state_dict("depth_x8_pac")  # doctest: +SKIP
    >>> missing, unexpected = load_into(model, model.state_dict(), verbose=False)  # strict
    >>> missing, unexpected
    ([], [])
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, NamedTuple, Optional, Union
from urllib.parse import unquote, urlsplit

import torch

from tools.download import download_url
from tools.runtime import atomic_open

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["DEFAULT_BASE_URL", "REGISTRY", "WeightsEntry", "list_weights", "weights_url",
           "default_cache_dir", "resolve_weights", "load_state_dict", "load_into",
           "SAVE_FORMATS", "check_save_format", "state_dict_bytes", "save_state_dict"]

DEFAULT_BASE_URL = "http://maxwell.cs.umass.edu/pacnet-data/pretrained_weights/"


class WeightsEntry(NamedTuple):
    """One released file: its path below the base URL, its checksum and what it is for."""

    path: str
    md5: Optional[str]
    task: str
    model: str
    notes: str


def _build_registry() -> dict[str, WeightsEntry]:
    registry: dict[str, WeightsEntry] = {}
    model_names = {"pac": "PacJointUpsample", "paclite": "PacJointUpsampleLite", "djif": "DJIF"}
    for kind, folder, dataset, models in (
            ("depth", "depth_upsampling", "NYUDepthV2", ("pac", "paclite", "djif")),
            ("flow", "flow_upsampling", "Sintel", ("pac", "djif"))):
        for factor in (4, 8, 16):
            for short in models:
                registry[f"{kind}_x{factor}_{short}"] = WeightsEntry(
                    f"{folder}/x{factor}_{short}_weights_epoch_5000.pth", None,
                    "task_jointUpsampling", model_names[short],
                    f"--dataset {dataset} --factor {factor}")
    segmentation = {
        "fcn8s_from_caffe": ("fcn8s", "dbd9bbb3829a3184913bccc74373afbb", "--test-crop -1"),
        "fcn8s_paccrf_epoch_30": ("fcn8s_crfi5p4d5641p4d5161", None, "--test-crop -1"),
        "fcn8s_paccrf32_epoch_30": ("fcn8s_crfi5p4d5321", None, "--test-crop -1"),
        "fcn8s_pacfcn_epoch_20": ("fcn8spac", None, "--test-crop 512"),
        "fcn8s_pacfcncrf_epoch_20": ("fcn8spac_crfi5p4d5641p4d5161", None, "--test-crop 512"),
    }
    for name, (model, md5, notes) in segmentation.items():
        registry[name] = WeightsEntry(f"semantic_segmentation/{name}.pth", md5,
                                      "task_semanticSegmentation", model, notes)
    return registry


#: name -> :class:`WeightsEntry`. md5 is None where the authors published no checksum.
REGISTRY: dict[str, WeightsEntry] = _build_registry()


def list_weights() -> dict[str, WeightsEntry]:
    """The registry, e.g. for ``--help`` texts: ``", ".join(list_weights())``."""
    return dict(REGISTRY)


def weights_url(name: str) -> str:
    """Download URL of a registry name (honours ``PACNET_WEIGHTS_URL``)."""
    base = os.environ.get("PACNET_WEIGHTS_URL") or DEFAULT_BASE_URL
    return base.rstrip("/") + "/" + _entry(name).path


def default_cache_dir() -> Path:
    """The weights cache: ``$PACNET_CACHE``, else ``checkpoints/pacnet`` in torch hub's folder.

    The latter follows the torch hub convention (:func:`torch.hub.get_dir`: ``$TORCH_HOME/hub``,
    by default ``~/.cache/torch/hub``), so the files sit next to other hub checkpoints.
    """
    override = os.environ.get("PACNET_CACHE")
    return Path(override) if override else Path(torch.hub.get_dir()) / "checkpoints" / "pacnet"


def _unknown_name(name: str) -> ValueError:
    return ValueError(f"weights: unknown name {name!r}; known names: {', '.join(REGISTRY)} "
                      "(or pass a file path or URL)")


def _entry(name: str) -> WeightsEntry:
    if name not in REGISTRY:
        raise _unknown_name(name)
    return REGISTRY[name]


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or \
        PurePosixPath(spec).suffix in (".pth", ".pt", ".pkl", ".safetensors")


def _download_format(filename: str) -> str:
    """The format check for a downloaded weights file without a checksum, by its suffix."""
    return "safetensors" if PurePosixPath(filename).suffix == ".safetensors" else "torch"


def resolve_weights(spec: PathLike, cache_dir: Optional[PathLike] = None) -> Path:
    """Turn a weights spec into a local file, downloading it into the cache if needed.

    Args:
        spec: an existing file, an ``http(s)://`` / ``file://`` URL, or a registry name
            (see :func:`list_weights`).
        cache_dir: download folder; default :func:`default_cache_dir` (``$PACNET_CACHE`` or
            torch hub's ``checkpoints/pacnet``). Registry files keep their sub-folder
            (``depth_upsampling/...``), URLs go to ``urls/<hash of the URL>/<file name>``.

    Raises:
        ValueError: an unknown name (the message lists the known names).
        FileNotFoundError: a path that does not exist.
        tools.download.ChecksumError / DownloadError: failed download.
    """
    spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"weights: expected a file path, URL or registry name, got {spec!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if Path(spec).is_file():
        return Path(spec)
    scheme = urlsplit(spec).scheme
    if scheme in ("http", "https", "file"):
        folder = cache / "urls" / hashlib.sha256(spec.encode()).hexdigest()[:16]
        name = PurePosixPath(unquote(urlsplit(spec).path)).name or "weights.pth"
        return download_url(spec, folder, filename=name, file_format=_download_format(name))
    if spec in REGISTRY:
        entry = REGISTRY[spec]
        relative = PurePosixPath(entry.path)
        # without a published checksum, download_url checks the length and that torch can read it
        return download_url(weights_url(spec), cache.joinpath(*relative.parent.parts),
                            filename=relative.name, md5=entry.md5, file_format="torch")
    if _looks_like_path(spec):
        same_file = [n for n, e in REGISTRY.items()
                     if PurePosixPath(e.path).name == PurePosixPath(spec).name]
        if len(same_file) == 1:
            # The 2019 commands name released files by path (e.g. `fcn8s_from_caffe.pth`): fetch it.
            print(f"weights: {spec!r} does not exist; using the released file {same_file[0]!r}")
            return resolve_weights(same_file[0], cache_dir)
        hint = (f"the released files of that name are the registry names {' or '.join(same_file)}"
                if same_file else f"registry names: {', '.join(REGISTRY)}")
        raise FileNotFoundError(f"weights: file {spec!r} does not exist ({hint})")
    raise _unknown_name(spec)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise TypeError(f"{path}: expected a state_dict (a mapping of names to tensors, possibly "
                        f"inside a 'state_dict' or 'model' entry), got {type(obj).__name__}")
    return dict(obj)


def load_state_dict(spec: PathLike,
                    cache_dir: Optional[PathLike] = None) -> dict[str, torch.Tensor]:
    """Resolve ``spec`` (see :func:`resolve_weights`) and load its state_dict on the CPU.

    A ``.safetensors`` file (by suffix or content) is read with ``safetensors``; anything else with
    ``torch.load(weights_only=True)``, so a file that would run arbitrary code when unpickled is
    refused. ``{"state_dict": ...}`` and ``{"model": ...}`` containers are unwrapped.
    """
    path = resolve_weights(spec, cache_dir)
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: an empty file (0 bytes), not a weights file")
    if _is_safetensors(path):
        return _load_safetensors(path)
    with open(path, "rb") as handle:
        head = handle.read(1)
    if not zipfile.is_zipfile(path) and head != b"\x80":  # torch.save writes a zip, or (before 1.6) a pickle
        raise ValueError(f"{path}: not a readable PyTorch weights file (neither a torch zip nor a pickle; "
                         f"it starts with {head!r})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused to load: it is not a plain weights file "
                         f"(torch.load with weights_only=True failed: {_first_line(err)})") from err
    except Exception as err:  # noqa: BLE001 (a text or truncated file raises IndexError, EOFError, ...)
        raise ValueError(f"{path}: not a readable PyTorch weights file ({type(err).__name__}: "
                         f"{_first_line(err)})") from err
    return _unwrap(obj, path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no message"


# ---------------------------------------------------------------- safetensors
#: the formats of :func:`save_state_dict` and of the task programs' ``--save-format``.
SAVE_FORMATS = ("pth", "safetensors")


def _safetensors_torch(what: str) -> Any:
    """``safetensors.torch``, or an ImportError that says how to install the optional package."""
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError(f"{what}: .safetensors files need the optional package safetensors; install "
                          "it with `pip install safetensors` (or the extra `pacnet[safetensors]`)") from err
    return safetensors.torch


def _is_safetensors(path: Path) -> bool:
    """By suffix, or by content: an 8-byte little-endian header length, then a JSON header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    return (len(head) == 9 and head[8:] == b"{"
            and int.from_bytes(head[:8], "little") < path.stat().st_size)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    safetensors_torch = _safetensors_torch(f"{path}")
    try:
        return dict(safetensors_torch.load_file(os.fspath(path), device="cpu"))
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error type on bad files)
        raise ValueError(f"{path}: not a readable safetensors weights file ({type(err).__name__}: "
                         f"{_first_line(err)})") from err


def check_save_format(save_format: str) -> None:
    """Raise ValueError for an unknown format, ImportError when safetensors is needed but missing."""
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save_format: expected one of {SAVE_FORMATS}, got {save_format!r}")
    if save_format == "safetensors":
        _safetensors_torch("save_format 'safetensors'")


def state_dict_bytes(state_dict: Mapping[str, torch.Tensor], save_format: str = "pth") -> bytes:
    """The content of a weights file holding ``state_dict`` (moved to the CPU).

    ``save_format`` is ``'pth'`` (``torch.save``, the format of the released weights) or
    ``'safetensors'``. Both load with :func:`load_state_dict`.
    """
    check_save_format(save_format)
    if save_format == "safetensors":
        # private contiguous copies: safetensors refuses views and tensors that share memory
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
        return _safetensors_torch("save_format 'safetensors'").save(tensors)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
    return buffer.getvalue()


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: PathLike) -> Path:
    """Write ``state_dict`` (moved to the CPU) atomically; the suffix of ``path`` picks the format.

    ``.safetensors`` writes a safetensors file, any other suffix a ``torch.save`` file (see
    :func:`state_dict_bytes`). Both load with :func:`load_state_dict`.

    Example:
        >>> path = save_state_dict(torch.nn.Linear(3, 2).state_dict(), "exp/weights_epoch_1.pth")
        >>> sorted(load_state_dict(path))
        ['bias', 'weight']
    """
    path = Path(path)
    data = state_dict_bytes(state_dict, "safetensors" if path.suffix == ".safetensors" else "pth")
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return path


class _Mismatch(NamedTuple):
    missing: list[str]
    unexpected: list[str]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # key -> (checkpoint, model)


def _compare(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> _Mismatch:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state_dict.items()
              if k in expected and v.shape != expected[k].shape}
    return _Mismatch(missing, unexpected, shapes)


def _report(module: torch.nn.Module, loaded: int, mismatch: _Mismatch) -> str:
    total = len(module.state_dict())
    lines = [f"Loaded {loaded}/{total} tensors into {type(module).__name__}."]
    shapes = [f"{k}: checkpoint {ckpt} vs model {model}"
              for k, (ckpt, model) in mismatch.shapes.items()]
    for title, keys in (("missing keys (not in the checkpoint: left as they were)", mismatch.missing),
                        ("unexpected keys (ignored)", mismatch.unexpected),
                        ("shape mismatches (not loaded)", shapes)):
        if keys:
            lines.append(f"  {len(keys)} {title}:")
            lines += [f"    {k}" for k in keys]
    return "\n".join(lines)


def _summary(mismatch: _Mismatch) -> str:
    return (f"{len(mismatch.missing)} missing, {len(mismatch.unexpected)} unexpected, "
            f"{len(mismatch.shapes)} shape-mismatched keys")


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
              strict: bool = True, verbose: bool = True) -> tuple[list[str], list[str]]:
    """Load ``state_dict`` into ``module`` and report what did not match.

    Args:
        module: the model (or a sub-module such as ``model.backbone``).
        state_dict: tensors by key, e.g. from :func:`load_state_dict`.
        strict: raise ValueError, before changing anything, when any key is missing or
            unexpected or any shape differs. With ``strict=False`` the matching tensors are
            loaded and the rest is reported; when no tensor matches, ValueError all the same.
        verbose: print the report (always printed when something mismatches).

    Returns:
        ``(missing, unexpected)`` key lists; keys whose shape differs count as missing.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    mismatch = _compare(module, state_dict)
    skipped = set(mismatch.unexpected) | set(mismatch.shapes)
    usable = {k: v for k, v in state_dict.items() if k not in skipped}
    anything_wrong = any(mismatch)
    if strict and anything_wrong:
        raise ValueError(f"strict weight loading failed ({_summary(mismatch)}), nothing was "
                         f"loaded.\n" + _report(module, 0, mismatch))
    if not usable and module.state_dict():
        raise ValueError(f"none of the {len(state_dict)} tensors fits {type(module).__name__} "
                         f"({_summary(mismatch)}): weights of another model or task?\n"
                         + _report(module, 0, mismatch))
    module.load_state_dict(usable, strict=False)
    if verbose or anything_wrong:
        print(_report(module, len(usable), mismatch))
    return mismatch.missing + list(mismatch.shapes), mismatch.unexpected
