"""HTTP plumbing of the local Hub: request parsing (JSON, form, NDJSON, chunked bodies), strict parameter checks,
responses, and the threaded server with fault injection and a request log."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from .store import HubError, Unsupported, User


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    body: bytes
    user: Optional[User] = None

    def params(self, allowed: set[str]) -> dict[str, str]:
        """Query parameters (last value wins); any parameter outside `allowed` is answered 501."""
        unknown = set(self.query) - allowed
        if unknown:
            raise Unsupported(f"query parameter(s) {sorted(unknown)} on {self.method} {self.path}")
        return {k: v[-1] for k, v in self.query.items()}

    def json(self, allowed: set[str], required: set[str] = frozenset()) -> dict:
        try:
            data = json.loads(self.body or b"{}")
        except ValueError as exc:
            raise HubError(400, f"invalid JSON body: {exc}") from None
        check_keys(data, allowed, required, f"{self.method} {self.path}")
        return data

    def form(self, allowed: set[str]) -> dict[str, list[str]]:
        data = parse_qs(self.body.decode(), keep_blank_values=True)
        check_keys(data, allowed, set(), f"form of {self.method} {self.path}")
        return data


def check_keys(data: Any, allowed: set[str], required: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise HubError(400, f"{where}: expected a JSON object")
    unknown = set(data) - allowed
    if unknown:
        raise Unsupported(f"payload key(s) {sorted(unknown)} in {where}")
    missing = required - set(data)
    if missing:
        raise HubError(400, f"{where}: missing {sorted(missing)}")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    head_length: Optional[int] = None  # Content-Length announced to HEAD requests (the GET body's length)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: Optional[dict] = None) -> Response:
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass
class Fault:
    """Lets `after` requests matching `method` and `path_regex` through, then makes the next `count` fail with
    `action`: an HTTP status, `"drop"` (connection closed without answer) or `"truncate"` (body cut in half)."""

    method: str
    path_regex: str
    action: Any = 500
    count: int = 1
    after: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.count > 0 and method == self.method and re.search(self.path_regex, path) is not None


@dataclass
class LoggedRequest:
    method: str
    path: str
    status: int
    bytes_in: int
    bytes_out: int


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr access log
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        body = self._read_body()
        request = Request(self.command, split.path, parse_qs(split.query, keep_blank_values=True), self.headers, body)
        fault = hub.take_fault(self.command, split.path)
        if fault == "drop":
            self.close_connection = True
            hub.log(LoggedRequest(self.command, split.path, 0, len(body), 0))
            return
        response = Response(fault, b"injected failure") if isinstance(fault, int) else hub.dispatch(request)
        out = response.body if self.command != "HEAD" else b""
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        length = response.head_length if self.command == "HEAD" and response.head_length is not None else len(out)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if fault == "truncate":
            out = out[: len(out) // 2]
            self.close_connection = True
        # Logged before the body goes out, so a client that has its response always finds its request in the log.
        hub.log(LoggedRequest(self.command, split.path, response.status, len(body), len(out)))
        self.wfile.write(out)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: Any


class HttpHub:
    """Base of the local Hub: serves `dispatch` on a free loopback port in a daemon thread."""

    def __init__(self):
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self.port = self._httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # The Hub redirects LFS downloads to a CDN host; "localhost" reaches this server under another host name,
        # so the client treats it as off-Hub (drops the Authorization header) like it does for the real CDN.
        self.cdn_endpoint = f"http://localhost:{self.port}"
        self.requests: list[LoggedRequest] = []
        self.unsupported: list[str] = []
        self.faults: list[Fault] = []
        self._log_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> HttpHub:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def log(self, entry: LoggedRequest) -> None:
        with self._log_lock:
            self.requests.append(entry)

    def inject_fault(self, method: str, path_regex: str, action: Any = 500, count: int = 1, after: int = 0) -> Fault:
        fault = Fault(method, path_regex, action, count, after)
        with self._log_lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, method: str, path: str) -> Any:
        with self._log_lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    if fault.after > 0:
                        fault.after -= 1
                        continue
                    fault.count -= 1
                    return fault.action
        return None

    def count(self, method: str, path_regex: str, status: Optional[int] = None) -> int:
        """Number of logged requests matching `method`, `path_regex` (and `status`)."""
        with self._log_lock:
            return sum(
                1 for r in self.requests
                if r.method == method and re.search(path_regex, r.path) and (status is None or r.status == status)
            )

    def dispatch(self, request: Request) -> Response:
        try:
            return self.route(request)
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            return Response.json({"error": err.message}, err.status, headers)
        except Unsupported as exc:
            message = f"local Hub does not implement {exc}"
            with self._log_lock:
                self.unsupported.append(message)
            return Response.json({"error": message}, 501)

    route: Callable[[Request], Response]
