"""Shared pytest fixtures.

``http_server``: a local HTTP file server on 127.0.0.1 (never the internet) that supports Range
requests, records what it was asked, and can simulate broken or non-resumable servers.

``device``: runs a test on the CPU, and again on CUDA when a GPU is present (skipped otherwise).

Example:
    def test_download(http_server, tmp_path):
        (http_server.root / "a.bin").write_bytes(b"payload")
        path = download_url(http_server.url("a.bin"), tmp_path)
        assert http_server.requests == [("/a.bin", None)]
"""
from __future__ import annotations

import re
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # so `import pac`, `import tools.runtime` work from tests

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class LocalHttpServer:
    """Serves the files under ``root``; see the module docstring.

    Attributes:
        root: folder whose files are served (sub-folders too).
        requests: ``(path, range header or None)`` of every GET received, in order.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self._cut: dict[str, int] = {}
        self._no_range: set[str] = set()
        self._status: dict[str, int] = {}
        self._no_length: set[str] = set()
        self._content_type: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._make_handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{quote(name)}"

    def fail_after(self, name: str, nbytes: int) -> None:
        """Cut the NEXT response for ``name`` after ``nbytes`` body bytes.

        The Content-Length header still announces the full size, as a dropped connection would.
        """
        self._cut[name] = nbytes

    def ignore_range(self, name: str) -> None:
        """Answer every request for ``name`` with 200 and the whole file, ignoring Range."""
        self._no_range.add(name)

    def omit_length(self, name: str) -> None:
        """Send ``name`` without a Content-Length header (the body ends when the connection closes)."""
        self._no_length.add(name)

    def content_type(self, name: str, value: str) -> None:
        """Announce ``name`` with this Content-Type (default application/octet-stream)."""
        self._content_type[name] = value

    def respond_with(self, name: str, status: int) -> None:
        """Answer every request for ``name`` with the given HTTP error status."""
        self._status[name] = status

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _make_handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                name = unquote(urlsplit(self.path).path).lstrip("/")
                range_header = self.headers.get("Range")
                with server._lock:
                    server.requests.append(("/" + name, range_header))
                    cut = server._cut.pop(name, None)
                if name in server._status:
                    return self._error(server._status[name])
                path = (server.root / name).resolve()
                if server.root.resolve() not in path.parents or not path.is_file():
                    return self._error(HTTPStatus.NOT_FOUND)
                data = path.read_bytes()
                start, end = 0, len(data) - 1
                match = _RANGE.fullmatch(range_header or "")
                if match and name not in server._no_range:
                    start = int(match.group(1))
                    end = min(int(match.group(2)), end) if match.group(2) else end
                    if start >= len(data):
                        self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(HTTPStatus.PARTIAL_CONTENT)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(HTTPStatus.OK)
                body = data[start:end + 1]
                if name in server._no_length:
                    cut = len(body) if cut is None else cut
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type",
                                 server._content_type.get(name, "application/octet-stream"))
                if cut is not None:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body if cut is None else body[:cut])
                self.wfile.flush()

            def _error(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler


@pytest.fixture
def http_server(tmp_path: Path):
    """A fresh :class:`LocalHttpServer` serving ``tmp_path / "served"``."""
    root = tmp_path / "served"
    root.mkdir()
    server = LocalHttpServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def device(request) -> torch.device:
    """``torch.device('cpu')``, then ``torch.device('cuda')`` when a GPU is present."""
    return torch.device(request.param)


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids OpenMP oversubscription when the machine is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["compiled", "torch"])
def cpu_loops(request, monkeypatch) -> str:
    """The 'taps' engine's band primitives on the CPU: pac_cpu's compiled loops, then the same steps as torch
    operations (``PAC_CPU_KERNELS=0``, what runs without a C compiler)."""
    if request.param == "torch":
        monkeypatch.setenv("PAC_CPU_KERNELS", "0")
    return request.param


@pytest.fixture(params=["unfold", "taps", "taps-torch-loops"])
def impl(request, monkeypatch) -> str:
    """Each PAC implementation in turn: 'unfold' (plain autograd) and 'taps' (the registered ops), the latter
    with its CPU band loops compiled and as torch operations (see ``cpu_loops``)."""
    if request.param == "taps-torch-loops":
        monkeypatch.setenv("PAC_CPU_KERNELS", "0")
        return "taps"
    return request.param
