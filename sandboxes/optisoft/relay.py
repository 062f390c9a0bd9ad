"""The Optisoft relay: the only thing NVC talks to. It holds no patient data and never connects
into a practice; it matches NVC's requests with the practice's connector, which polls it from inside
the practice.

NVC's side (Optisoft's dialect: one query endpoint, named operations, errors as `{"code", "message"}`
with upper-case codes):

    POST /relay/v1/practices/{practiceCode}/query
         {"operation": "patients.list", "params": {...}, "credentials": {"username", "password"}}
      -> 200 {"requestId", "operation", "data": {...}}

The relay queues the request for that practice's connector and waits (bounded) for the answer:
404 PRACTICE_CODE_UNKNOWN; 503 CONNECTOR_OFFLINE when the connector has not polled for
`offline_after_seconds` (or does not collect the request within that time); 504 CONNECTOR_TIMEOUT
when it collected the request but did not answer in `answer_timeout_seconds`; the connector's own
refusals (DB_LOGIN_FAILED, SLOT_TAKEN, ...) with the status in `CONNECTOR_ERROR_STATUS`.

The connector's side (`Authorization: Connector <token>`): `GET /relay/v1/connector/{code}/next?wait=S`
(200 with a job, 204 when the wait ran out), `POST .../result`, `POST .../goodbye`.

Injected faults (`faults`) model the NVC <-> relay leg only; the connector's leg is exercised by
stopping or killing the connector. `lost_response_after_write_rate` drops NVC's connection after a
write the connector reports as applied.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sandboxes.base import HttpProblem, Request, Response, SandboxServer

API = "/relay/v1"
CONNECTOR_PREFIX = API + "/connector/"
CONNECTOR_ERROR_STATUS: dict[str, int] = {
    "DB_LOGIN_FAILED": 401,
    "DB_PERMISSION_DENIED": 403,
    "UNKNOWN_OPERATION": 400,
    "INVALID_PARAMS": 400,
    "PATIENT_NOT_FOUND": 422,
    "CLINICIAN_NOT_FOUND": 422,
    "CLINICIAN_INACTIVE": 422,
    "CLINICIAN_NOT_OPTOMETRIST": 422,
    "SLOT_TAKEN": 409,
    "DB_ERROR": 502,
}


@dataclass(slots=True)
class RelayResponse(Response):
    """A response that may carry a write the connector applied (for the lost-response fault)."""

    write_applied: bool = False


def relay_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> HttpProblem:
    return HttpProblem(status, {"code": code, "message": message}, headers)


@dataclass(slots=True, eq=False)
class _Job:
    job_id: str
    operation: str
    params: dict[str, Any]
    credentials: dict[str, Any]
    picked: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None


@dataclass(slots=True, eq=False)
class _Link:
    """One practice as the relay knows it: its connector token, queue and connector's presence."""

    code: str
    token: str
    queue: deque[_Job] = field(default_factory=deque)
    inflight: dict[str, _Job] = field(default_factory=dict)
    polls: int = 0
    last_seen: float | None = None
    connector: dict[str, str] = field(default_factory=dict)


class OptisoftRelay(SandboxServer):
    """The relay, served for real on loopback. Practices are registered with their connector token."""

    name = "optisoft-relay"
    problem = staticmethod(relay_error)
    stock_errors = {
        404: ("NOT_FOUND", "No relay endpoint {method} {path}."),
        429: ("RATE_LIMITED", "Too many requests for this practice."),
        500: ("RELAY_ERROR", "The relay hit an unexpected error."),
        503: ("RELAY_MAINTENANCE", "The relay is being updated."),
    }

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        offline_after_seconds: float = 10.0,
        answer_timeout_seconds: float = 20.0,
        max_poll_wait_seconds: float = 30.0,
        seed: int = 7,
        rate_limit_per_second: float = 0.0,
    ):
        super().__init__(host, port, seed=seed, rate_limit_per_second=rate_limit_per_second)
        self.offline_after_seconds = offline_after_seconds
        self.answer_timeout_seconds = answer_timeout_seconds
        self.max_poll_wait_seconds = max_poll_wait_seconds
        self.job_log: list[tuple[str, str]] = []  # (practice code, operation) of every NVC query
        self._links: dict[str, _Link] = {}
        self._cond = threading.Condition()
        self.route("POST", API + "/practices/{code}/query", self._query)
        self.route("GET", API + "/connector/{code}/next", self._next)
        self.route("POST", API + "/connector/{code}/result", self._result)
        self.route("POST", API + "/connector/{code}/goodbye", self._goodbye)

    # --- practices and connectors -------------------------------------------------------------------

    def register_practice(self, practice_code: str, connector_token: str | None = None) -> str:
        """Enrol a practice (as Optisoft does when the connector is installed); returns its token."""
        token = connector_token or secrets.token_urlsafe(24)
        with self._cond:
            self._links[practice_code] = _Link(practice_code, token)
        return token

    def _online(self, link: _Link) -> bool:
        if link.polls > 0:
            return True
        return link.last_seen is not None and time.monotonic() - link.last_seen < self.offline_after_seconds

    def connector_online(self, practice_code: str) -> bool:
        with self._cond:
            link = self._links.get(practice_code)
            return link is not None and self._online(link)

    def wait_for_connector(self, practice_code: str, timeout: float = 30.0, *, online: bool = True) -> bool:
        """Wait until the practice's connector is polling (or, with `online=False`, has gone)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                link = self._links.get(practice_code)
                state = link is not None and (link.polls > 0 if online else not self._online(link))
                if state or time.monotonic() >= deadline:
                    return state
                self._cond.wait(0.05)

    def _link(self, request: Request) -> _Link:
        code = request.params["code"]
        link = self._links.get(code)
        if link is None:
            raise relay_error(404, "PRACTICE_CODE_UNKNOWN", f"No practice is registered with code {code}.")
        return link

    def _connector_link(self, request: Request) -> _Link:
        link = self._link(request)
        token = self.credential(request, "Connector")
        if not token or not secrets.compare_digest(token, link.token):
            raise relay_error(401, "CONNECTOR_UNAUTHORISED", "The connector token is missing or wrong.")
        return link

    # --- NVC's side -------------------------------------------------------------------------------

    def _query(self, request: Request) -> Response:
        body = request.body if isinstance(request.body, dict) else None
        if (
            body is None
            or not isinstance(body.get("operation"), str)
            or not isinstance(body.get("params", {}), dict)
            or not isinstance(body.get("credentials"), dict)
        ):
            raise relay_error(400, "INVALID_REQUEST", "Send {operation, params, credentials} as a JSON object.")
        with self._cond:
            link = self._link(request)
            self.job_log.append((link.code, body["operation"]))
            if not self._online(link):
                raise self._offline(link)
            job = _Job(uuid.uuid4().hex, body["operation"], body.get("params") or {}, body["credentials"])
            link.queue.append(job)
            self._cond.notify_all()
            deadline = time.monotonic() + self.offline_after_seconds
            while not job.picked:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._online(link):
                    link.queue.remove(job)
                    raise self._offline(link, waited=remaining <= 0)
                self._cond.wait(min(remaining, 0.1))
        if not job.done.wait(self.answer_timeout_seconds):
            with self._cond:
                link.inflight.pop(job.job_id, None)
            raise relay_error(
                504,
                "CONNECTOR_TIMEOUT",
                f"The practice's connector took the request but did not answer within "
                f"{self.answer_timeout_seconds:g} s.",
            )
        result = job.result or {}
        if result.get("ok"):
            return RelayResponse(
                200,
                {"requestId": job.job_id, "operation": job.operation, "data": result.get("data")},
                write_applied=bool(result.get("write")),
            )
        error = result.get("error") if isinstance(result.get("error"), dict) else {}
        code = str(error.get("code") or "CONNECTOR_ERROR")
        body = {"code": code, "message": str(error.get("message") or ""), "requestId": job.job_id}
        return Response(CONNECTOR_ERROR_STATUS.get(code, 502), body)

    def _offline(self, link: _Link, waited: bool = False) -> HttpProblem:
        why = (
            f"did not collect the request within {self.offline_after_seconds:g} s"
            if waited
            else "is not connected"
            if link.last_seen is None
            else f"has not polled for {time.monotonic() - link.last_seen:.0f} s"
        )
        return relay_error(503, "CONNECTOR_OFFLINE", f"The Optisoft Connector for practice {link.code} {why}.")

    # --- the connector's side -----------------------------------------------------------------------

    def _next(self, request: Request) -> Response:
        link = self._connector_link(request)
        try:
            wait = min(max(float(request.query.get("wait", "20")), 0.0), self.max_poll_wait_seconds)
        except ValueError:
            wait = 20.0
        deadline = time.monotonic() + wait
        hung_up = False
        with self._cond:
            link.polls += 1
            link.last_seen = time.monotonic()
            link.connector = {
                "version": request.headers.get("x-connector-version", ""),
                "host": request.headers.get("x-connector-host", ""),
            }
            self._cond.notify_all()
            try:
                while True:
                    if request.peer_gone():  # stopped or crashed mid-poll: never hand it a job
                        hung_up = True
                        return Response(204)
                    if link.queue:
                        job = link.queue.popleft()
                        job.picked = True
                        link.inflight[job.job_id] = job
                        self._cond.notify_all()
                        body = {
                            "jobId": job.job_id,
                            "operation": job.operation,
                            "params": job.params,
                            "credentials": job.credentials,
                        }
                        return Response(200, body)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return Response(204)
                    self._cond.wait(min(remaining, 0.1))
            finally:
                link.polls -= 1
                if not hung_up:  # a poll that ended normally counts as a sign of life; a hang-up does not
                    link.last_seen = time.monotonic()
                self._cond.notify_all()

    def _result(self, request: Request) -> Response:
        link = self._connector_link(request)
        body = request.body if isinstance(request.body, dict) else {}
        with self._cond:
            link.last_seen = time.monotonic()
            job = link.inflight.pop(str(body.get("jobId")), None)
            if job is None:
                raise relay_error(410, "JOB_EXPIRED", "No request is waiting for this answer (it timed out).")
            job.result = body
            job.done.set()
        return Response(200, {"received": True})

    def _goodbye(self, request: Request) -> Response:
        link = self._connector_link(request)
        with self._cond:
            link.last_seen = None
            self._cond.notify_all()
        return Response(200, {"goodbye": True})

    # --- HTTP: faults model the NVC <-> relay leg only ----------------------------------------------

    def faults_apply(self, path: str) -> bool:
        return not path.startswith(CONNECTOR_PREFIX)

    def loses_response(self, request: Request, response: Response, roll: float) -> bool:
        """Only a write the connector reports as applied is lost (the question is whether NVC finds it)."""
        applied = isinstance(response, RelayResponse) and response.write_applied
        return applied and roll < self.faults.lost_response_after_write_rate
