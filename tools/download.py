"""Checksum-verified, resumable, atomic downloads and safe archive extraction.

``download_url`` writes to ``<file>.part``, resumes an interrupted ``.part`` with an HTTP Range
request, verifies it and only then renames the file into place, so a file that exists under its
final name is always complete. Verified means: the md5/sha256 when one is given; otherwise the
announced length (Content-Length / Content-Range) and a format check (a torch or safetensors file,
tar, zip or .mat that opens, see :func:`check_format`). A cached file is checked the same way
before it is used, and downloaded again when it fails. ``extract_archive`` refuses archives with
members that would land outside the target folder.

Example (an ``http(s)://`` URL works the same way as this local archive):
    >>> import tarfile
    >>> with tarfile.open("notes.tgz", "w:gz") as tar:
    ...     tar.add(__file__, arcname="notes/download.py")
    >>> url, md5 = Path("notes.tgz").resolve().as_uri(), file_digest("notes.tgz")
    >>> path = download_url(url, "data", md5=md5, progress=False)
    >>> sorted(p.name for p in extract_archive(path, "data", progress=False).iterdir())
    ['notes', 'notes.tgz']
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Optional, Union
from urllib.parse import unquote, urlsplit

from tqdm.auto import tqdm

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "ChecksumError",
    "FormatError",
    "DownloadError",
    "file_digest",
    "check_integrity",
    "check_format",
    "file_format_of",
    "download_url",
    "extract_archive",
    "download_and_extract",
]

_CHUNK = 1 << 20
_USER_AGENT = "pacnet-download/1.0"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class ChecksumError(ValueError):
    """A downloaded file's digest differs from the expected one."""

    def __init__(self, path: PathLike, algorithm: str, expected: str, got: str) -> None:
        super().__init__(f"{algorithm} mismatch for {path}: expected {expected}, got {got}; "
                         "the partial file was deleted, download it again")
        self.path, self.algorithm, self.expected, self.got = Path(path), algorithm, expected, got


class DownloadError(OSError):
    """The server answered with an error status or the transfer broke off."""


class FormatError(ValueError):
    """A file without a known checksum is not a complete file of its format."""


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------
def file_digest(path: PathLike, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 1 MiB chunks. ``algorithm`` is any ``hashlib`` name."""
    try:
        digest = hashlib.new(algorithm)
    except ValueError:
        raise ValueError(f"algorithm: unknown hash {algorithm!r}, expected e.g. 'md5' or "
                         "'sha256'") from None
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_digests(md5: Optional[str], sha256: Optional[str]) -> dict[str, str]:
    return {name: value.lower() for name, value in (("md5", md5), ("sha256", sha256)) if value}


def _first_mismatch(path: Path, md5: Optional[str],
                    sha256: Optional[str]) -> Optional[tuple[str, str, str]]:
    for algorithm, expected in _expected_digests(md5, sha256).items():
        got = file_digest(path, algorithm)
        if got != expected:
            return algorithm, expected, got
    return None


def check_integrity(path: PathLike, md5: Optional[str] = None,
                    sha256: Optional[str] = None) -> bool:
    """True when ``path`` is a file matching every given digest (just existing if none is given)."""
    path = Path(path)
    return path.is_file() and _first_mismatch(path, md5, sha256) is None


# --------------------------------------------------------------------------------------------------
# Format checks (for files without a published checksum)
# --------------------------------------------------------------------------------------------------
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_TORCH_SUFFIXES = (".pth", ".pt", ".pkl", ".ckpt")


def file_format_of(filename: str) -> Optional[str]:
    """The format a file name announces: 'torch', 'safetensors', 'tar', 'zip', 'mat' or None."""
    name = filename.lower()
    if name.endswith(_TORCH_SUFFIXES):
        return "torch"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(".mat"):
        return "mat"
    return None


def _check_torch(path: Path) -> None:
    if zipfile.is_zipfile(path):  # torch >= 1.6 format: the central directory is at the very end
        with zipfile.ZipFile(path) as zf:
            if not any(n.endswith("data.pkl") for n in zf.namelist()):
                raise FormatError("a zip archive without data.pkl, not a torch.save file")
        return
    import torch  # the legacy (pickle) format has no index: only a full load shows it is complete

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises many types on garbage)
        text = str(err).strip().splitlines()
        raise FormatError(f"torch.load fails ({type(err).__name__}"
                          f"{': ' + text[0][:120] if text else ''})") from None


def _check_safetensors(path: Path) -> None:
    # layout: 8-byte little-endian header length, a JSON header, then the tensor data; the header's
    # data_offsets say where the data ends, so a cut file shows without the safetensors package
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        if size < 8 or 8 + header_length > size:
            raise FormatError(f"not a complete safetensors file (a {header_length}-byte header "
                              f"announced, the file has {size} bytes)")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, ValueError) as err:
            raise FormatError(f"not a safetensors file (its header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise FormatError("not a safetensors file (its header is not a JSON object)")
    try:
        end = max((int(entry["data_offsets"][1]) for key, entry in header.items()
                   if key != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise FormatError("not a safetensors file (a header entry without data_offsets)") from None
    if 8 + header_length + end != size:
        raise FormatError(f"truncated safetensors file: its tensors need {8 + header_length + end} "
                          f"bytes, the file has {size}")


def _check_tar(path: Path) -> None:
    with open(path, "rb") as handle:
        compressed = handle.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            if compressed:  # a cut compressed stream raises EOFError once read to its end
                while tar.fileobj.read(_CHUNK):
                    pass
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as err:
        raise FormatError(f"not a complete tar archive ({err})") from None
    if not members:
        raise FormatError("an empty tar archive")
    # tarfile stops silently at a missing header: check that every member's data is in the file
    end = max(m.offset_data + m.size for m in members)
    if not compressed and end > path.stat().st_size:
        raise FormatError(f"truncated tar archive: its members need {end} bytes, the file has "
                          f"{path.stat().st_size}")


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            zf.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise FormatError(f"not a complete zip archive ({err})") from None


def _check_mat(path: Path) -> None:
    with open(path, "rb") as handle:
        header = handle.read(128)
    if not header.startswith(b"MATLAB"):
        raise FormatError("not a MATLAB .mat file (no 'MATLAB' header)")
    if b"MATLAB 7.3" in header:  # an HDF5 file: HDF5 compares its stored end of file on open
        import h5py

        try:
            h5py.File(path, "r").close()
        except OSError as err:
            raise FormatError(f"not a complete MATLAB 7.3 (HDF5) file ({err})") from None


_CHECKS = {"torch": _check_torch, "safetensors": _check_safetensors, "tar": _check_tar,
           "zip": _check_zip, "mat": _check_mat}


def check_format(path: PathLike, kind: Optional[str] = None) -> None:
    """Raise :class:`FormatError` unless ``path`` is a complete, readable file of its format.

    Args:
        path: the file.
        kind: 'torch' (a ``torch.save`` file: zip index present, or a legacy pickle that
            ``torch.load(weights_only=True)`` reads), 'safetensors' (a JSON header whose tensors
            end exactly at the end of the file), 'tar' (every member's data is present,
            compressed streams end properly), 'zip' (the central directory opens), 'mat' (a MATLAB
            header; HDF5-based 7.3 files open); None: from the file name (unknown suffixes pass).
    """
    path = Path(path)
    kind = kind or file_format_of(path.name)
    if kind is None:
        return
    if kind not in _CHECKS:
        raise ValueError(f"kind: unknown file format {kind!r}, expected one of {sorted(_CHECKS)}")
    if path.stat().st_size == 0:
        raise FormatError("an empty file (0 bytes)")
    _CHECKS[kind](path)


# --------------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------------
def _local_source(url: str) -> Optional[Path]:
    """The local path behind a ``file://`` URL or a plain path; None for network URLs."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme in ("http", "https"):
        return None
    if parts.scheme and len(parts.scheme) > 1:  # (one letter: a Windows drive)
        raise ValueError(f"url: unsupported scheme {parts.scheme!r} in {url!r}, expected http, "
                         "https, file or a local path")
    return Path(url)


def _copy_stream(source: BinaryIO, target: BinaryIO, bar: tqdm) -> int:
    copied = 0
    for chunk in iter(lambda: source.read(_CHUNK), b""):
        target.write(chunk)
        copied += len(chunk)
        bar.update(len(chunk))
    return copied


def _copy_local(source: Path, part: Path, progress: bool) -> None:
    if not source.is_file():
        raise FileNotFoundError(f"download source {source} does not exist")
    with open(source, "rb") as src, open(part, "wb") as dst, tqdm(
            total=source.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name[:-len(".part")], disable=not progress) as bar:
        _copy_stream(src, dst, bar)


def _fetch_http(url: str, part: Path, progress: bool, timeout: float) -> Optional[int]:
    """Download ``url`` into ``part``, resuming from its current size when the server allows it.

    Returns the file's full length as the server announced it (None when it did not)."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left after our offset
            if err.headers.get("Content-Range", "") == f"bytes */{offset}":
                return offset  # the .part is already complete (the checks still decide)
            part.unlink()  # the .part is longer than the file: it is not ours, start over
            return _fetch_http(url, part, progress, timeout)
        raise DownloadError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"download of {url} failed: {reason}") from None

    with response:
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("text/html") and not part.name.lower().endswith(
                (".html.part", ".htm.part")):
            raise DownloadError(f"download of {url} failed: the server sent an HTML page (an error "
                                "or login page?) instead of the file")
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise DownloadError(f"download of {url} failed: the server answered the range "
                                    f"request with Content-Range "
                                    f"{response.headers.get('Content-Range')!r}")
            mode = "ab"
        else:  # 200: the server ignored Range (or there was none): write from the start
            offset, mode = 0, "wb"
        total = offset + remaining if remaining is not None else None
        with open(part, mode) as target, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name[:-len(".part")], disable=not progress) as bar:
            try:
                received = _copy_stream(response, target, bar)
            except (HTTPException, OSError) as err:
                raise DownloadError(f"download of {url} broke off ({err}); the partial file "
                                    f"{part} is kept, run again to resume") from None
    if remaining is not None and received < remaining:
        raise DownloadError(f"download of {url} broke off after {offset + received} of "
                            f"{total} bytes; the partial file {part} is kept, run again to resume")
    if response.status == 206:
        announced = match.group(3)
        return int(announced) if announced != "*" else None
    return total


def _verify(path: Path, name: str, md5: Optional[str], sha256: Optional[str],
            file_format: Optional[str], length: Optional[int] = None) -> None:
    """Raise unless ``path`` (to become ``name``) is the expected file.

    With a checksum the checksum decides (ChecksumError); without one, the announced length and
    the format do (FormatError).
    """
    mismatch = _first_mismatch(path, md5, sha256)
    if mismatch is not None:
        raise ChecksumError(path, *mismatch)
    if md5 or sha256:
        return
    size = path.stat().st_size
    if length is not None and size != length:
        raise FormatError(f"{size} bytes, the server announced {length}")
    check_format(path, file_format or file_format_of(name))


def _reason(err: Exception) -> str:
    if isinstance(err, ChecksumError):
        return f"{err.algorithm} {err.got}, expected {err.expected}"
    return str(err)


def download_url(url: str, root: PathLike, filename: Optional[str] = None,
                 md5: Optional[str] = None, sha256: Optional[str] = None,
                 progress: bool = True, timeout: float = 60.0,
                 file_format: Optional[str] = None) -> Path:
    """Download ``url`` to ``root/filename``: verified, resumable and atomic.

    The data goes to ``<file>.part`` (resumed with an HTTP Range request when a ``.part`` exists;
    a server that ignores Range gets a full download), is verified, and only then renamed into
    place. Verified means: the md5/sha256 when given; otherwise the length the server announced
    and :func:`check_format` (a torch or safetensors file, tar, zip or .mat that opens
    completely). An existing file is checked the same way (checksum, or format) and downloaded
    again, with a message naming it, when it fails. ``file://`` URLs and plain local paths are copied the same way.

    Args:
        url: ``http(s)://`` or ``file://`` URL, or a local path.
        root: the folder to download into (created if needed).
        filename: the file name; default: the last part of the URL path.
        md5, sha256: expected hex digests (either, both or none).
        progress: show a tqdm progress bar.
        timeout: socket timeout in seconds.
        file_format: the format to check without a checksum ('torch', 'safetensors', 'tar', 'zip',
            'mat');
            default: from the file name's suffix (an unknown suffix is checked by length only).

    Returns:
        The path of the verified file.

    Raises:
        ChecksumError: the digest differs (the ``.part`` file is deleted).
        FormatError: no checksum, and the file is incomplete or not of its format (deleted).
        DownloadError: HTTP error status or broken transfer (the ``.part`` file is kept).
        FileNotFoundError: a local source does not exist.
    """
    if not filename:
        filename = PurePosixPath(unquote(urlsplit(url).path)).name
        if not filename:
            raise ValueError(f"filename: cannot derive a file name from url {url!r}; pass one")
    if PurePosixPath(filename).name != filename or filename in (".", ".."):
        raise ValueError(f"filename: expected a bare file name, got {filename!r}")
    if file_format is not None and file_format not in _CHECKS:
        raise ValueError(f"file_format: expected one of {sorted(_CHECKS)} or None, "
                         f"got {file_format!r}")
    root = Path(root)
    target = root / filename
    if target.is_file():
        try:
            _verify(target, filename, md5, sha256, file_format)
            return target
        except (ChecksumError, FormatError) as err:
            print(f"{target} exists but is damaged ({_reason(err)}): downloading it again")
            target.unlink()
    root.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")

    source = _local_source(url)
    if source is not None:
        _copy_local(source, part, progress)
        length = source.stat().st_size
    else:
        length = _fetch_http(url, part, progress, timeout)

    try:
        _verify(part, filename, md5, sha256, file_format, length)
    except ChecksumError as err:
        part.unlink()
        raise ChecksumError(target, err.algorithm, err.expected, err.got) from None
    except FormatError as err:
        part.unlink()
        raise FormatError(f"download of {url} is not a valid file ({err}); nothing was kept as "
                          f"{target}, run again to retry") from None
    os.replace(part, target)
    return target


# --------------------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------------------
def _inside(dest: Path, candidate: Path) -> bool:
    resolved = candidate.resolve()
    return resolved == dest or dest in resolved.parents


def _check_member_path(dest: Path, name: str, archive: Path) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name) or not _inside(dest, dest / path):
        raise ValueError(f"{archive}: refusing to extract member {name!r}: its path leaves "
                         f"the destination {dest}")


def _check_tar_members(tar: tarfile.TarFile, dest: Path, archive: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for member in members:
        _check_member_path(dest, member.name, archive)
        if member.issym():
            link_target = (dest / member.name).parent / member.linkname
            if os.path.isabs(member.linkname) or not _inside(dest, link_target):
                raise ValueError(f"{archive}: refusing to extract member {member.name!r}: it is a "
                                 f"symlink to {member.linkname!r} outside {dest}")
        elif member.islnk():
            if os.path.isabs(member.linkname) or not _inside(dest, dest / member.linkname):
                raise ValueError(f"{archive}: refusing to extract member {member.name!r}: it is a "
                                 f"hard link to {member.linkname!r} outside {dest}")
        elif not (member.isfile() or member.isdir()):
            raise ValueError(f"{archive}: refusing to extract member {member.name!r}: special "
                             "files (devices, fifos) are not allowed")
    return members


def _archive_kind(archive: Path) -> str:
    name = archive.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")):
        return "tar"
    raise ValueError(f"archive: unsupported archive type {archive.name!r}, expected .tar, "
                     ".tar.gz/.tgz, .tar.bz2, .tar.xz or .zip")


def extract_archive(archive: PathLike, dest: PathLike, progress: bool = True) -> Path:
    """Extract a .tar(.gz/.bz2/.xz), .tgz or .zip archive into ``dest`` and return ``dest``.

    Every member is checked before anything is written: absolute paths, ``..`` components, and
    symlinks or hard links pointing outside ``dest`` raise ValueError naming the member. Tar
    extraction additionally uses tarfile's ``filter="data"``.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    kind = _archive_kind(archive)
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    bar_options = dict(unit="file", desc=f"extract {archive.name}", disable=not progress)
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for member in members:
                _check_member_path(dest, member.filename, archive)
            for member in tqdm(members, **bar_options):
                zf.extract(member, dest)
    else:
        with tarfile.open(archive, "r:*") as tar:
            members = _check_tar_members(tar, dest, archive)
            filter_kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=tqdm(members, **bar_options), **filter_kwargs)
    return dest


def download_and_extract(url: str, download_root: PathLike,
                         extract_root: Optional[PathLike] = None, filename: Optional[str] = None,
                         md5: Optional[str] = None, sha256: Optional[str] = None,
                         progress: bool = True) -> Path:
    """:func:`download_url` then :func:`extract_archive` (into ``download_root`` by default).

    Returns:
        The extraction folder.
    """
    archive = download_url(url, download_root, filename=filename, md5=md5, sha256=sha256,
                           progress=progress)
    return extract_archive(archive, extract_root if extract_root is not None else download_root,
                           progress=progress)
