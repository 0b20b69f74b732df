"""One threaded HTTP reverse proxy for tests. Every request it receives goes to `decide`, which
says what happens to it: forwarded to the upstream (its answer held back a while, if asked),
answered here, or its connection dropped (before or after the upstream saw it). Subclasses put
their fault scripts in `decide`: tests/test_openai_engine.py's FaultProxy in front of an
OpenAI-compatible server, tests/s3_faults.py's S3FaultProxy in front of the local S3 server."""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# hop-by-hop headers (RFC 9110 7.6.1) and the ones the proxy sets itself
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                        "te", "trailer", "upgrade", "expect", "content-length"})


@dataclass(frozen=True)
class ProxyRequest:
    index: int  # 0 for the first request the proxy received
    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Forward:
    """Send it to the upstream; hold its answer `delay_s` (the upstream has acted on it)."""

    delay_s: float = 0.0


@dataclass(frozen=True)
class Answer:
    """Answer here, after `delay_s`, without the upstream seeing the request."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass(frozen=True)
class Drop:
    """Reset the connection (TCP RST) without answering; `forward_first`: after the upstream
    acted on the request, so only its answer is lost."""

    forward_first: bool = False
    delay_s: float = 0.0


Action = Forward | Answer | Drop


@dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of parallel connections (Ray workers) must not be refused


class ReverseProxy:
    """Listens on 127.0.0.1 (a free port); `upstream` is e.g. http://127.0.0.1:8000, or None
    when `decide` answers everything itself."""

    upstream_timeout_s = 120.0

    def __init__(self, upstream: str | None = None,
                 hook: Callable[[ProxyRequest], Action] | None = None) -> None:
        self.upstream = upstream
        self.hook = hook
        self.requests: list[ProxyRequest] = []
        self.forwarded = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- what subclasses change ----------------------------------------------------------------

    def decide(self, request: ProxyRequest) -> Action:
        return self.hook(request) if self.hook is not None else Forward()

    def replied(self, request: ProxyRequest) -> None:
        """Called after the answer to `request` went out."""

    # ---- the server --------------------------------------------------------------------------

    def start(self) -> ReverseProxy:
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def port(self) -> int:
        assert self._server is not None, "the proxy is not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one_request(self) -> None:
                with contextlib.suppress(ConnectionError, TimeoutError):
                    super().handle_one_request()

            def __getattr__(self, name: str) -> Callable[[], None]:
                if name.startswith("do_"):  # every method: GET, PUT, POST, HEAD, DELETE, ...
                    return lambda: proxy._serve(self)
                raise AttributeError(name)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        body = read_body(handler)
        with self._lock:
            request = ProxyRequest(len(self.requests), handler.command, handler.path,
                                   dict(handler.headers), body)
            self.requests.append(request)
        action = self.decide(request)
        if isinstance(action, Drop):
            if action.forward_first:
                self.forward(request)
            time.sleep(action.delay_s)
            reset(handler)
            return
        if isinstance(action, Answer):
            reply = Reply(action.status, list(action.headers.items()), action.body)
        else:
            reply = self.forward(request)
        time.sleep(action.delay_s)
        send(handler, reply, head=request.method == "HEAD")
        self.replied(request)

    def forward(self, request: ProxyRequest) -> Reply:
        assert self.upstream is not None, "this proxy has no upstream"
        target = urlsplit(self.upstream)
        connection = http.client.HTTPConnection(target.hostname, target.port,
                                                timeout=self.upstream_timeout_s)
        try:
            # the client's Host header goes as it is: S3 signatures cover it
            connection.putrequest(request.method, request.path, skip_host=True,
                                  skip_accept_encoding=True)
            for name, value in request.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    connection.putheader(name, value)
            if request.body or request.method in ("PUT", "POST"):
                connection.putheader("Content-Length", str(len(request.body)))
            connection.endheaders(request.body or None)
            response = connection.getresponse()
            body = response.read()
            headers = [(name, value) for name, value in response.getheaders()
                       if name.lower() not in HOP_BY_HOP
                       or (name.lower() == "content-length" and request.method == "HEAD")]
        finally:
            connection.close()
        with self._lock:
            self.forwarded += 1
        return Reply(response.status, headers, body)


def read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def send(handler: BaseHTTPRequestHandler, reply: Reply, head: bool) -> None:
    """Write `reply`; a HEAD answer keeps the upstream's Content-Length and has no body."""
    try:
        handler.send_response(reply.status)
        for name, value in reply.headers:
            handler.send_header(name, value)
        if not any(name.lower() == "content-length" for name, _ in reply.headers):
            handler.send_header("Content-Length", str(0 if head else len(reply.body)))
        handler.end_headers()
        if not head:
            handler.wfile.write(reply.body)
        handler.wfile.flush()
    except (ConnectionError, TimeoutError):  # the client gave up (e.g. timed out a delay)
        handler.close_connection = True


def reset(handler: BaseHTTPRequestHandler) -> None:
    """Close the client's connection with a TCP RST (SO_LINGER 0), as a crashed server would."""
    handler.close_connection = True
    with contextlib.suppress(OSError):
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.connection.close()


@contextlib.contextmanager
def running(proxy: ReverseProxy) -> Iterator[ReverseProxy]:
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
