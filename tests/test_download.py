import hashlib
import io
import os
import tarfile
import zipfile

import pytest

from tools.download import (ChecksumError, DownloadError, check_integrity, download_and_extract,
                            download_url, extract_archive, file_digest)

PAYLOAD = bytes(range(256)) * 1000  # 256 000 bytes
MD5 = hashlib.md5(PAYLOAD).hexdigest()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def served(http_server):
    (http_server.root / "data.bin").write_bytes(PAYLOAD)
    return http_server


# ---------------------------------------------------------------- checksums
def test_file_digest_and_check_integrity(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    assert file_digest(path) == MD5
    assert file_digest(path, "sha256") == SHA256
    assert check_integrity(path) and check_integrity(path, md5=MD5.upper(), sha256=SHA256)
    assert not check_integrity(path, md5="0" * 32)
    assert not check_integrity(path, md5=MD5, sha256="0" * 64)
    assert not check_integrity(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="unknown hash"):
        file_digest(path, "nohash")


# ---------------------------------------------------------------- downloads
def test_download_verifies_and_skips_existing(served, tmp_path):
    dest = tmp_path / "dl"
    path = download_url(served.url("data.bin"), dest, md5=MD5, sha256=SHA256, progress=False)
    assert path == dest / "data.bin" and path.read_bytes() == PAYLOAD
    assert not (dest / "data.bin.part").exists()
    assert download_url(served.url("data.bin"), dest, md5=MD5, progress=False) == path
    assert served.requests == [("/data.bin", None)]  # second call did not hit the server


def test_download_resumes_with_range(served, tmp_path):
    dest = tmp_path / "dl"
    served.fail_after("data.bin", 100_000)
    with pytest.raises(DownloadError, match="broke off after 100000 of 256000 bytes"):
        download_url(served.url("data.bin"), dest, md5=MD5, progress=False)
    part = dest / "data.bin.part"
    assert part.stat().st_size == 100_000 and not (dest / "data.bin").exists()

    path = download_url(served.url("data.bin"), dest, md5=MD5, progress=False)
    assert served.requests == [("/data.bin", None), ("/data.bin", "bytes=100000-")]
    assert path.read_bytes() == PAYLOAD and not part.exists()


def test_download_restarts_when_server_ignores_range(served, tmp_path):
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "data.bin.part").write_bytes(b"garbage-prefix")
    served.ignore_range("data.bin")
    path = download_url(served.url("data.bin"), dest, md5=MD5, progress=False)
    assert served.requests == [("/data.bin", "bytes=14-")]
    assert path.read_bytes() == PAYLOAD


def test_download_restarts_when_part_is_too_long(served, tmp_path):
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "data.bin.part").write_bytes(b"x" * (len(PAYLOAD) + 10))
    path = download_url(served.url("data.bin"), dest, sha256=SHA256, progress=False)
    assert served.requests == [("/data.bin", f"bytes={len(PAYLOAD) + 10}-"), ("/data.bin", None)]
    assert path.read_bytes() == PAYLOAD


def test_download_complete_part_is_not_fetched_again(served, tmp_path):
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "data.bin.part").write_bytes(PAYLOAD)  # e.g. interrupted just before the rename
    path = download_url(served.url("data.bin"), dest, md5=MD5, progress=False)
    assert served.requests == [("/data.bin", f"bytes={len(PAYLOAD)}-")]
    assert path.read_bytes() == PAYLOAD


def test_download_checksum_failure_removes_part(served, tmp_path):
    dest = tmp_path / "dl"
    with pytest.raises(ChecksumError) as info:
        download_url(served.url("data.bin"), dest, md5="0" * 32, progress=False)
    message = str(info.value)
    assert "data.bin" in message and "0" * 32 in message and MD5 in message
    assert isinstance(info.value, ValueError)
    assert list(dest.iterdir()) == []


def test_download_redownloads_corrupt_existing_file(served, tmp_path):
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "data.bin").write_bytes(b"corrupt")
    path = download_url(served.url("data.bin"), dest, md5=MD5, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_download_is_atomic(served, tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((os.fspath(src), os.fspath(dst), os.path.getsize(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    path = download_url(served.url("data.bin"), tmp_path / "dl", progress=False)
    assert renames == [(str(path) + ".part", str(path), len(PAYLOAD))]


def test_download_http_error_names_url_and_status(served, tmp_path):
    url = served.url("missing.bin")
    with pytest.raises(DownloadError, match=f"{url} failed: HTTP 404"):
        download_url(url, tmp_path / "dl", progress=False)
    served.respond_with("data.bin", 503)
    with pytest.raises(DownloadError, match="HTTP 503"):
        download_url(served.url("data.bin"), tmp_path / "dl", progress=False)


def test_download_file_url_and_local_path(tmp_path):
    source = tmp_path / "src" / "my file.bin"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    one = download_url(source.as_uri(), tmp_path / "a", md5=MD5, progress=False)
    two = download_url(str(source), tmp_path / "b", sha256=SHA256, progress=False)
    assert one.name == "my file.bin" and one.read_bytes() == PAYLOAD
    assert two.read_bytes() == PAYLOAD
    with pytest.raises(ChecksumError):
        download_url(str(source), tmp_path / "c", md5="1" * 32, progress=False)
    assert not (tmp_path / "c" / "my file.bin").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        download_url(str(tmp_path / "nope.bin"), tmp_path / "d", progress=False)


def test_download_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="filename"):
        download_url("http://127.0.0.1:1/", tmp_path)
    with pytest.raises(ValueError, match="filename"):
        download_url("http://127.0.0.1:1/a.bin", tmp_path, filename="../a.bin")
    with pytest.raises(ValueError, match="unsupported scheme"):
        download_url("gopher://host/a.bin", tmp_path)


# ---------------------------------------------------------------- archives
def _tar(path, members, mode="w"):
    """members: list of (TarInfo kwargs, bytes or None)."""
    with tarfile.open(path, mode) as tar:
        for fields, data in members:
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize("suffix, mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz")])
def test_extract_tar(tmp_path, suffix, mode):
    archive = _tar(tmp_path / f"ok{suffix}", [
        ({"name": "top/a.txt"}, b"alpha"),
        ({"name": "top/sub", "type": tarfile.DIRTYPE}, None),
        ({"name": "top/sub/link", "type": tarfile.SYMTYPE, "linkname": "../a.txt"}, None),
        ({"name": "top/hard", "type": tarfile.LNKTYPE, "linkname": "top/a.txt"}, None),
    ], mode)
    dest = extract_archive(archive, tmp_path / "out", progress=False)
    assert (dest / "top/a.txt").read_bytes() == b"alpha"
    assert (dest / "top/sub/link").read_bytes() == b"alpha"
    assert (dest / "top/hard").read_bytes() == b"alpha"


def test_extract_zip(tmp_path):
    archive = tmp_path / "ok.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("d/x.txt", "x")
        zf.writestr("y.txt", "y")
    dest = extract_archive(archive, tmp_path / "out", progress=False)
    assert (dest / "d/x.txt").read_text() == "x" and (dest / "y.txt").read_text() == "y"


HOSTILE_TAR = {
    "dotdot": {"name": "../evil", "type": tarfile.REGTYPE},
    "nested-dotdot": {"name": "ok/../../evil", "type": tarfile.REGTYPE},
    "absolute": {"name": "ABS", "type": tarfile.REGTYPE},
    "symlink-out": {"name": "link", "type": tarfile.SYMTYPE, "linkname": "../outside"},
    "symlink-abs": {"name": "link", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"},
    "hardlink-out": {"name": "hard", "type": tarfile.LNKTYPE, "linkname": "../outside/victim"},
    "device": {"name": "dev", "type": tarfile.CHRTYPE},
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TAR))
def test_extract_rejects_hostile_tar(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"original")
    fields = dict(HOSTILE_TAR[case])
    if fields["name"] == "ABS":
        fields["name"] = str(outside / "evil")
    data = b"payload" if fields["type"] == tarfile.REGTYPE else None
    # a harmless first member: it must not be written either (all members are checked first)
    archive = _tar(tmp_path / "bad.tar", [({"name": "first.txt"}, b"first"), (fields, data)])
    dest = tmp_path / "dest" / "inner"
    with pytest.raises(ValueError, match="refusing to extract member"):
        extract_archive(archive, dest, progress=False)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"original"
    assert not (tmp_path / "dest" / "evil").exists() and not (tmp_path / "evil").exists()
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "{tmp_path}/evil_zip_abs.txt",
                                  "C:/evil.txt", "..\\evil.txt"])
def test_extract_rejects_hostile_zip(tmp_path, name):
    name = name.format(tmp_path=tmp_path.as_posix())  # an absolute member name
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("first.txt", "first")
        zf.writestr(zipfile.ZipInfo(name), "evil")
    dest = tmp_path / "dest" / "inner"
    with pytest.raises(ValueError, match="refusing to extract member"):
        extract_archive(archive, dest, progress=False)
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "dest"]


def test_extract_unsupported_type(tmp_path):
    (tmp_path / "a.rar").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported archive type"):
        extract_archive(tmp_path / "a.rar", tmp_path / "out")


def test_download_and_extract(http_server, tmp_path):
    archive = _tar(http_server.root / "pack.tar.gz", [({"name": "d/f.txt"}, b"hello")], "w:gz")
    md5 = file_digest(archive)
    out = download_and_extract(http_server.url("pack.tar.gz"), tmp_path / "dl", md5=md5,
                               progress=False)
    assert out == (tmp_path / "dl").resolve()
    assert (out / "d/f.txt").read_bytes() == b"hello" and (out / "pack.tar.gz").is_file()
    other = download_and_extract(http_server.url("pack.tar.gz"), tmp_path / "dl",
                                 extract_root=tmp_path / "ex", progress=False)
    assert (other / "d/f.txt").read_bytes() == b"hello"
