"""A real HTTPS server for tests: TLS on 127.0.0.1:0, scripted routes, recorded requests.

    ca = CertAuthority.create()                  # tests/support/testca.py
    server = HttpsServer(ca, ["mta-sts.example.test"]).start()
    server.route("/.well-known/mta-sts.txt", body=b"version: STSv1\\n...")
    ... the client trusts ca.root.cert_pem and connects to 127.0.0.1:server.port ...
    server.close()

It runs in its own threads (one accepting, one per connection), so it answers while a test's
event loop is awaiting. Every connection is HTTP/1.1 with `Connection: close`: one request,
one response. Routes are keyed by path and optionally by the Host header (without port);
an unknown path answers 404. A route can set the status, headers (e.g. a redirect's
Location), Content-Type (None: no such header), the body, chunked transfer encoding, no
Content-Length (the body ends at the close), a declared Content-Length other than the body's
length, and a delay before the response.

`requests` records (sni, host header, path) of every request received; `count()` filters
them. `set_certificate(names)` swaps the certificate for the next connections (e.g. one not
valid for the name the client expects). `errors` holds tracebacks of bugs hit while serving;
TLS handshakes the client aborts (it rejected our certificate) are not bugs.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.support.testca import CertAuthority

HOST = "127.0.0.1"
MAX_HEAD = 16 * 1024


def _remember_sni(sock: ssl.SSLSocket, name: str | None, _context: ssl.SSLContext) -> None:
    sock.sni = name  # type: ignore[attr-defined]  # read back in `_serve`


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    content_type: str | None = "text/plain"
    headers: Sequence[tuple[str, str]] = ()
    delay: float = 0.0
    chunked: bool = False
    content_length: int | None = None  # declared length; None: the body's own
    send_length: bool = True  # False: no Content-Length, the body ends at the close


@dataclass(frozen=True)
class Request:
    sni: str | None
    host: str
    path: str


_REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 404: "Not Found",
            500: "Internal Server Error"}


@dataclass
class HttpsServer:
    """See the module docstring. `start()`/`stop()`, or `with`."""

    ca: CertAuthority
    names: Sequence[str]
    requests: list[Request] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[tuple[str | None, str], Route] = {}
        self._context = self._make_context(self.names)
        self._stopping = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: list[threading.Thread] = []

    # -- configuration ---------------------------------------------------------------------

    def _make_context(self, names: Sequence[str], ca: CertAuthority | None = None,
                      **issue: Any) -> ssl.SSLContext:
        context = (ca or self.ca).issue(names[0], names=names, **issue).server_context()
        context.sni_callback = _remember_sni  # type: ignore[assignment]
        return context

    def set_certificate(self, names: Sequence[str], *, ca: CertAuthority | None = None,
                        **issue: Any) -> None:
        """Serve a certificate for `names` from the next connection on, issued by `ca` (default
        the server's); `issue` goes to `CertAuthority.issue` (e.g. expired=True)."""
        context = self._make_context(names, ca, **issue)
        with self._lock:
            self._context = context

    def route(self, path: str, body: bytes | str = b"", *, host: str | None = None,
              **options: object) -> None:
        """Answer GET `path` (for Host `host`, or any host) as `Route(**options)` says."""
        data = body.encode() if isinstance(body, str) else body
        with self._lock:
            self._routes[(host, path)] = Route(body=data, **options)  # type: ignore[arg-type]

    def count(self, path: str | None = None, host: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests
                       if (path is None or r.path == path) and (host is None or r.host == host))

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> HttpsServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        sock.listen(32)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name=f"https-{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and wait for connections in progress (delays are cut short).
        Stopping twice is fine; a stopped server refuses connections."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(timeout=5)
        self._thread = None
        for conn in list(self._conns):
            conn.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> HttpsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- serving (server threads) ----------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            while not self._stopping.is_set():
                if not selector.select(timeout=0.05):
                    continue
                try:
                    conn, _ = self._sock.accept()
                except OSError:
                    continue
                thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self._conns = [t for t in self._conns if t.is_alive()] + [thread]
                thread.start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        with self._lock:
            context = self._context
        try:
            conn = context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):  # the client refused our certificate, or went away
            raw.close()
            return
        try:
            self._answer(conn, getattr(conn, "sni", None))
        except (ssl.SSLError, OSError):
            pass  # the client hung up
        except Exception:  # a bug here must fail the test, not kill the thread silently
            self.errors.append(traceback.format_exc())
        finally:
            conn.close()

    def _answer(self, conn: ssl.SSLSocket, sni: str | None) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk or len(head) > MAX_HEAD:
                return
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        _method, path, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        host = headers.get("host", "").split(":", 1)[0]  # a name (tests use no IPv6 literal)
        with self._lock:
            self.requests.append(Request(sni, host, path))
            route = self._routes.get((host, path)) or self._routes.get((None, path))
        if route is None:
            route = Route(status=404, body=b"not found\n")
        if route.delay and self._stopping.wait(route.delay):
            return
        out = [f"HTTP/1.1 {route.status} {_REASONS.get(route.status, 'Status')}",
               "Connection: close"]
        if route.content_type is not None:
            out.append(f"Content-Type: {route.content_type}")
        out.extend(f"{name}: {value}" for name, value in route.headers)
        if route.chunked:
            out.append("Transfer-Encoding: chunked")
            body = b"".join(
                b"%x\r\n%s\r\n" % (len(piece), piece)
                for piece in (route.body[i : i + 1000] for i in range(0, len(route.body), 1000))
            ) + b"0\r\n\r\n"
        else:
            if route.send_length:
                length = len(route.body) if route.content_length is None else route.content_length
                out.append(f"Content-Length: {length}")
            body = route.body
        conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body)
        try:
            conn.unwrap()  # close_notify, so the body's end is unambiguous
        except (ssl.SSLError, OSError):
            pass
