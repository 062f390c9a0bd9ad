"""A small threaded JSON HTTP server shared by the sandboxes: routing, rate limits, injected faults
and a log of every request (so tests can prove, for example, that no DELETE ever arrived).

What every dialect does alike lives here too, each sandbox supplying only its own words: errors in
its envelope (`problem`, `stock_errors`), `Authorization` credentials, paging numbers, seeding a
practice once on first use, and which patients `touch` edits and how.
"""

from __future__ import annotations

import json
import math
import random
import re
import select
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:  # seed pulls in Faker; the relay needs none of it
    from sandboxes.seed import SeedPatient

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _never() -> bool:
    return False


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    params: dict[str, str] = field(default_factory=dict)
    peer_gone: Callable[[], bool] = _never  # whether the caller has hung up (a long poll must know)


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


def plain_problem(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> HttpProblem:
    """The base server's own error envelope; each dialect has its own (`SandboxServer.problem`)."""
    return HttpProblem(status, {"error": code, "message": message}, headers)


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
    # An error in the dialect's envelope: `problem(status, code, message, headers=None)`.
    problem: Callable[..., HttpProblem] = staticmethod(plain_problem)
    # The errors the server answers itself (no route, throttled, failing, down): status -> (code, message).
    # The 404 message may name `{method}` and `{path}`.
    stock_errors: dict[int, tuple[str, str]] = {
        404: ("not_found", "No route for {method} {path}."),
        429: ("rate_limited", "Too many requests."),
        500: ("internal_error", "An unexpected error occurred."),
        503: ("service_unavailable", "The service is restarting."),
    }

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, seed: int = 7, rate_limit_per_second: float = 0):
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.faults = Faults()
        self.rng = random.Random(seed)
        self.rate_limit_per_second = rate_limit_per_second
        self._bucket_tokens = rate_limit_per_second
        self._bucket_at = time.monotonic()
        self.lock = threading.RLock()
        self._once_lock = threading.RLock()  # seeding only: a slow seed must not hold up other requests
        self.request_log: list[tuple[str, str]] = []
        self.throttled = 0  # 429s sent (token bucket or injected), so tests can prove a retry happened
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

    # --- what every dialect does alike ------------------------------------------------------------

    def once(self, cache: dict[K, V], key: K, make: Callable[[], V]) -> V:
        """`cache[key]`, made by `make()` on first use: once, even when requests race for it (a
        200,000-patient practice takes seconds to seed, so it is seeded when first asked for)."""
        value = cache.get(key)
        if value is None:
            with self._once_lock:
                value = cache.get(key)
                if value is None:
                    value = cache[key] = make()
        return value

    @staticmethod
    def touch_sample(
        ids: list[K], count: float | int, seed: object, stamp: datetime, key: Callable[[K], Any] | None = None
    ) -> list[K]:
        """The patients `touch` edits: a fraction (float) or a count (int) of `ids`, drawn from
        `(seed, stamp)` so the same call picks the same patients; sorted (by `key`)."""
        wanted = round(len(ids) * count) if isinstance(count, float) else count
        rng = random.Random(f"{seed}:{stamp.isoformat()}")
        return sorted(rng.sample(ids, max(0, min(wanted, len(ids)))), key=key)

    @staticmethod
    def touch_change(patient: SeedPatient, k: int, day: date) -> dict[str, Any]:
        """The edit `touch` makes to its k-th patient: a new mobile, or else an eye test on `day`
        (which answers the recall), so an incremental sync sees both kinds of change."""
        if k % 2 == 0:
            return {"mobile": f"07700 900{(patient.index * 7 + k) % 1000:03d}"}
        return {"last_eye_test": day, "recall_due": None}

    @staticmethod
    def credential(request: Request, scheme: str) -> str:
        """The credential of an `Authorization: <scheme> <credential>` header; "" when there is none
        or it is of another scheme (compared case-insensitively, as HTTP does)."""
        given, _, value = request.headers.get("authorization", "").partition(" ")
        return value.strip() if given.lower() == scheme.lower() else ""

    def bad_parameter(self, name: str, message: str) -> HttpProblem:
        """A query parameter out of range, in the dialect's words (status and code)."""
        return self.problem(400, f"invalid_{name}", message)

    def int_query(self, request: Request, name: str, default: int, low: int, high: int) -> int:
        """A whole-number query parameter (a page, offset or limit) from `low` to `high`; `default`
        when absent; anything else is refused with `bad_parameter`, never clamped."""
        raw = request.query.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise self.bad_parameter(name, f"{name} must be a whole number from {low} to {high}.")
        return value

    # --- routing -----------------------------------------------------------------------------------

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """`pattern` uses `{name}` placeholders for one path segment each."""
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
        self._routes.append((method, regex, handler))

    def reset(self) -> None:
        """No faults, an empty request log and a full token bucket: what one test leaves never throttles the next."""
        with self.lock:
            self.faults = Faults()
            self.request_log.clear()
            self.throttled = 0
            self._bucket_tokens = self.rate_limit_per_second
            self._bucket_at = time.monotonic()

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

    def stock_response(self, status: int, headers: dict[str, str] | None = None, **names: str) -> Response:
        """One of `stock_errors` in the dialect's envelope."""
        code, message = self.stock_errors[status]
        return self.problem(status, code, message.format(**names), headers).response

    def rate_limit_response(self, retry_after: float) -> Response:
        """A 429 in the dialect's envelope, with `Retry-After`, counted in `throttled`."""
        with self.lock:
            self.throttled += 1
        return self.stock_response(429, {"Retry-After": str(max(1, math.ceil(retry_after)))})

    def server_error_response(self) -> Response:
        return self.stock_response(500)

    def unavailable_response(self) -> Response:
        """503 while `faults.down` is set (a server being restarted)."""
        return self.stock_response(503, {"Retry-After": "1"})

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
        return self.stock_response(404, method=request.method, path=request.path)

    # --- HTTP: hooks a server may change -----------------------------------------------------------

    def faults_apply(self, path: str) -> bool:
        """Whether injected faults and rate limits apply to a request for `path` (all, by default)."""
        return True

    def loses_response(self, request: Request, response: Response, roll: float) -> bool:
        """Whether to drop the connection instead of answering: a write that was applied, at
        `faults.lost_response_after_write_rate` (`roll` is this request's draw)."""
        rate = self.faults.lost_response_after_write_rate
        return request.method in ("POST", "PUT", "PATCH") and bool(rate) and roll < rate and response.status < 400

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go separately: avoid Nagle + delayed-ACK stalls

            def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read request_log
                return

            def _peer_gone(self) -> bool:
                try:
                    readable, _, _ = select.select([self.connection], [], [], 0)
                    return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

            def _handle(self) -> None:
                faults = server.faults
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                faulty = server.faults_apply(parts.path)
                roll = lost_roll = 1.0
                if faulty:
                    if faults.latency_seconds:
                        time.sleep(faults.latency_seconds)
                    with server.lock:
                        roll = server.rng.random()
                        lost_roll = server.rng.random()
                    if faults.drop_rate and roll < faults.drop_rate:
                        self.close_connection = True
                        self.connection.close()
                        return
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
                    peer_gone=self._peer_gone,
                )
                if faulty and faults.down:
                    response = server.unavailable_response()
                elif faulty and (wait := server._rate_limited()) is not None:
                    response = server.rate_limit_response(wait)
                elif faulty and faults.rate_429 and roll < faults.drop_rate + faults.rate_429:
                    response = server.rate_limit_response(1)
                elif faulty and faults.rate_500 and roll < faults.drop_rate + faults.rate_429 + faults.rate_500:
                    response = server.server_error_response()
                else:
                    response = server.dispatch(request)
                    if faulty and server.loses_response(request, response, lost_roll):
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
