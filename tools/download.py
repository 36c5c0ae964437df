"""Checksum-verified, resumable, atomic downloads and safe archive extraction.

``download_url`` writes to ``<file>.part``, resumes an interrupted ``.part`` with an HTTP Range
request, verifies md5/sha256 and only then renames the file into place, so a file that exists under
its final name is always complete. ``extract_archive`` refuses archives with members that would
land outside the target folder.

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
import os
import re
import tarfile
import urllib.error
import urllib.request
import zipfile
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Optional, Union
from urllib.parse import unquote, urlsplit

from tqdm.auto import tqdm

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "ChecksumError",
    "DownloadError",
    "file_digest",
    "check_integrity",
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


def _fetch_http(url: str, part: Path, progress: bool, timeout: float) -> None:
    """Download ``url`` into ``part``, resuming from its current size when the server allows it."""
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
                return None  # the .part is already complete (the checksum still decides)
            part.unlink()  # the .part is longer than the file: it is not ours, start over
            return _fetch_http(url, part, progress, timeout)
        raise DownloadError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"download of {url} failed: {reason}") from None

    with response:
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


def download_url(url: str, root: PathLike, filename: Optional[str] = None,
                 md5: Optional[str] = None, sha256: Optional[str] = None,
                 progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``root/filename``: verified, resumable and atomic.

    An existing file that verifies is not downloaded again (without checksums, existing is
    enough). Otherwise the data goes to ``<file>.part`` (resumed with an HTTP Range request when a
    ``.part`` exists; a server that ignores Range gets a full download), is verified, and is then
    renamed into place. ``file://`` URLs and plain local paths are copied the same way.

    Args:
        url: ``http(s)://`` or ``file://`` URL, or a local path.
        root: the folder to download into (created if needed).
        filename: the file name; default: the last part of the URL path.
        md5, sha256: expected hex digests (either, both or none).
        progress: show a tqdm progress bar.
        timeout: socket timeout in seconds.

    Returns:
        The path of the verified file.

    Raises:
        ChecksumError: the digest differs (the ``.part`` file is deleted).
        DownloadError: HTTP error status or broken transfer (the ``.part`` file is kept).
        FileNotFoundError: a local source does not exist.
    """
    if not filename:
        filename = PurePosixPath(unquote(urlsplit(url).path)).name
        if not filename:
            raise ValueError(f"filename: cannot derive a file name from url {url!r}; pass one")
    if PurePosixPath(filename).name != filename or filename in (".", ".."):
        raise ValueError(f"filename: expected a bare file name, got {filename!r}")
    root = Path(root)
    target = root / filename
    if target.is_file():
        if _first_mismatch(target, md5, sha256) is None:
            return target
        print(f"{target} exists but fails its checksum: downloading it again")
    root.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")

    source = _local_source(url)
    if source is not None:
        _copy_local(source, part, progress)
    else:
        _fetch_http(url, part, progress, timeout)

    mismatch = _first_mismatch(part, md5, sha256)
    if mismatch is not None:
        part.unlink()
        raise ChecksumError(target, *mismatch)
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
