"""A small threaded JSON HTTP server shared by the sandboxes: routing, rate limits, injected faults
and a log of every request (so tests can prove, for example, that no DELETE ever arrived)."""

from __future__ import annotations

import json
import random
import re
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    params: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class HttpProblem(Exception):
    """Raised by a route to answer with an error status in the sandbox's own error dialect."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.response = Response(status, body, headers or {})


@dataclass(slots=True)
class Faults:
    """Faults injected on demand. Rates are probabilities per request, drawn from a seeded RNG."""

    latency_seconds: float = 0.0
    rate_429: float = 0.0
    rate_500: float = 0.0
    drop_rate: float = 0.0  # close the connection without answering
    lost_response_after_write_rate: float = 0.0  # apply a write, then drop the connection
    down: bool = False  # refuse everything with 503, as a server being restarted


Handler = Callable[[Request], Response]


class SandboxServer:
    """Base class: subclasses call `route()` in `__init__` and implement the dialect.

    Every PMS sandbox also answers the same inspection hooks, so tests are written once for all
    dialects (`tests/pms_contract.py`): `patient_count(ref)`, `touch(ref, count)` (change some
    patients now; returns their PMS ids), `nvc_appointments(ref)` and `nvc_notes(ref)` (what NVC
    wrote: dicts with `pms_patient_id`, `starts_at`/`kind` and `nvc_reference`), plus `faults`
    and `request_log`.
    """

    name = "sandbox"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, seed: int = 7, rate_limit_per_second: float = 0):
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.faults = Faults()
        self.rng = random.Random(seed)
        self.rate_limit_per_second = rate_limit_per_second
        self._bucket_tokens = rate_limit_per_second
        self._bucket_at = time.monotonic()
        self.lock = threading.RLock()
        self.request_log: list[tuple[str, str]] = []
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._httpd.handle_error = self._handle_error  # type: ignore[method-assign]
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> SandboxServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name=f"{self.name}-sandbox", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- inspection hooks for tests (every PMS sandbox implements them) ---------------------------

    def patient_count(self, practice_ref: str) -> int:
        raise NotImplementedError

    def touch(self, practice_ref: str, count: int, now: Any = None) -> list[str]:
        raise NotImplementedError

    def nvc_appointments(self, practice_ref: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def nvc_notes(self, practice_ref: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    # --- routing -----------------------------------------------------------------------------------

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """`pattern` uses `{name}` placeholders for one path segment each."""
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
        self._routes.append((method, regex, handler))

    def _rate_limited(self) -> float | None:
        """Token bucket; returns seconds to wait when empty."""
        if self.rate_limit_per_second <= 0:
            return None
        with self.lock:
            now = time.monotonic()
            self._bucket_tokens = min(
                self.rate_limit_per_second, self._bucket_tokens + (now - self._bucket_at) * self.rate_limit_per_second
            )
            self._bucket_at = now
            if self._bucket_tokens >= 1:
                self._bucket_tokens -= 1
                return None
            return (1 - self._bucket_tokens) / self.rate_limit_per_second

    def rate_limit_response(self, retry_after: float) -> Response:
        """Subclasses answer a 429 in their own dialect."""
        return Response(429, {"error": "rate_limited"}, {"Retry-After": str(max(1, round(retry_after)))})

    def server_error_response(self) -> Response:
        return Response(500, {"error": "internal_error"})

    def unavailable_response(self) -> Response:
        """503 while `faults.down` is set (a server being restarted)."""
        return Response(503, {"error": "service_unavailable"}, {"Retry-After": "1"})

    def _handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a timeout test, a cancelled sync) is normal, not a traceback on stderr."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        socketserver.BaseServer.handle_error(self._httpd, request, client_address)

    def dispatch(self, request: Request) -> Response:
        with self.lock:
            self.request_log.append((request.method, request.path))
        for method, regex, handler in self._routes:
            match = regex.match(request.path)
            if match and method == request.method:
                request.params = match.groupdict()
                try:
                    return handler(request)
                except HttpProblem as problem:
                    return problem.response
        return Response(404, {"error": "not_found", "path": request.path})

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go separately: avoid Nagle + delayed-ACK stalls

            def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read request_log
                return

            def _handle(self) -> None:
                faults = server.faults
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if faults.latency_seconds:
                    time.sleep(faults.latency_seconds)
                with server.lock:
                    roll = server.rng.random()
                    lost_roll = server.rng.random()
                if faults.drop_rate and roll < faults.drop_rate:
                    self.close_connection = True
                    self.connection.close()
                    return
                parts = urlsplit(self.path)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                request = Request(
                    self.command,
                    parts.path,
                    {k: v[-1] for k, v in parse_qs(parts.query).items()},
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                if faults.down:
                    response = server.unavailable_response()
                elif (wait := server._rate_limited()) is not None:
                    response = server.rate_limit_response(wait)
                elif faults.rate_429 and roll < faults.drop_rate + faults.rate_429:
                    response = server.rate_limit_response(1)
                elif faults.rate_500 and roll < faults.drop_rate + faults.rate_429 + faults.rate_500:
                    response = server.server_error_response()
                else:
                    response = server.dispatch(request)
                    if (
                        self.command in ("POST", "PUT", "PATCH")
                        and faults.lost_response_after_write_rate
                        and lost_roll < faults.lost_response_after_write_rate
                        and response.status < 400
                    ):
                        self.close_connection = True
                        self.connection.close()
                        return
                payload = b"" if response.body is None else json.dumps(response.body, default=str).encode()
                self.send_response(response.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in response.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return _Handler
