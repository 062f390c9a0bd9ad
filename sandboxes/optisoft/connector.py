"""The Optisoft Connector: the small service on the practice's own server that links Optisoft's
database to the outside world without opening a port at the practice.

It only ever dials OUT: it long-polls the relay (`GET /relay/v1/connector/{practiceCode}/next`)
for the next request, runs it against the practice database (a named, parameterised operation,
after checking the database login that came with it), and posts the answer back
(`POST .../result`). It never listens on a socket. When it stops it says goodbye, so the relay
reports it offline at once; if it crashes, the relay notices the dropped poll.

Run it as its own process:

    python -m sandboxes.optisoft connector --relay URL --practice-code CODE --db PATH

The relay token comes from the environment (`OPTISOFT_CONNECTOR_TOKEN`), never the command line.
With `--console`, stdin/stdout carry the sandbox's practice-desk console (one JSON request per
line; see `StaffDesk`), and the connector exits when stdin closes (its parent has gone).
Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from sandboxes.optisoft.practice_db import Logins, PracticeDb, SqlLog, StaffDesk, install, run_operation

CONNECTOR_VERSION = "3.2.0"
API = "/relay/v1"
TOKEN_ENV = "OPTISOFT_CONNECTOR_TOKEN"
log = logging.getLogger("optisoft.connector")


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT to leave a blocking long poll at once."""


class RelayLink:
    """The connector's outbound HTTP(S) connection to the relay (keep-alive, reconnects on failure)."""

    def __init__(self, relay_url: str, practice_code: str, token: str, poll_wait: float):
        parts = urlsplit(relay_url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--relay {relay_url!r} is not an http(s) URL")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        prefix = parts.path.rstrip("/")
        prefix = prefix[: -len(API)] if prefix.endswith(API) else prefix
        self.base = f"{prefix}{API}/connector/{quote(practice_code, safe='')}"
        self.poll_wait = poll_wait
        self.headers = {
            "Authorization": f"Connector {token}",
            "X-Connector-Version": CONNECTOR_VERSION,
            "X-Connector-Host": socket.gethostname(),
            "Content-Type": "application/json",
        }
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=timeout, context=ssl.create_default_context()
                )
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            self._conn.connect()
            self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def call(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
        payload = None if body is None else json.dumps(body, default=str).encode()
        try:
            conn = self._connection(timeout)
            conn.request(method, self.base + path, body=payload, headers=self.headers)
            response = conn.getresponse()
            raw = response.read()
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, (json.loads(raw) if raw else None)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Connector:
    def __init__(self, link: RelayLink, db: PracticeDb):
        self.link = link
        self.db = db
        self.logins = Logins(db)
        self.stopping = False
        self.busy = False

    def run(self) -> None:
        backoff = 0.2
        while not self.stopping:
            try:
                status, job = self.link.call(
                    "GET", f"/next?wait={self.link.poll_wait:g}", timeout=self.link.poll_wait + 15
                )
            except (OSError, http.client.HTTPException, ValueError) as exc:
                log.warning("relay unreachable (%s); retrying in %.1fs", type(exc).__name__, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.2
            if status == 204:
                continue
            if status != 200 or not isinstance(job, dict):
                code = job.get("code") if isinstance(job, dict) else ""
                log.error("relay refused the poll: HTTP %s %s; retrying in 5s", status, code)
                time.sleep(5)
                continue
            self.busy = True
            try:
                self.answer(job)
            finally:
                self.busy = False

    def answer(self, job: dict[str, Any]) -> None:
        started = time.perf_counter()
        result = run_operation(self.db, self.logins, job)
        outcome = "ok" if result["ok"] else result["error"]["code"]
        log.info("%s %s in %.0f ms", job.get("operation"), outcome, (time.perf_counter() - started) * 1000)
        for attempt in range(3):
            try:
                self.link.call("POST", "/result", {"jobId": job.get("jobId"), **result})
                return
            except (OSError, http.client.HTTPException, ValueError):
                time.sleep(0.2 * (attempt + 1))
        log.error("could not deliver the answer to %s", job.get("operation"))

    def goodbye(self) -> None:
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            self.link.call("POST", "/goodbye", {}, timeout=2.0)
        self.link.close()


def _console(desk: StaffDesk) -> None:
    """The practice desk on stdin/stdout: `{"id", "op", "args"}` -> `{"id", "ok", "result"|"error"}`."""
    for line in sys.stdin:
        request_id = None
        try:
            request = json.loads(line)
            request_id = request.get("id")
            reply = {"id": request_id, "ok": True, "result": desk.handle(request["op"], request.get("args", {}))}
        except Exception as exc:  # a bad console request is reported, never fatal
            reply = {"id": request_id, "ok": False, "error": repr(exc)}
        sys.stdout.write(json.dumps(reply, default=str) + "\n")
        sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGTERM)  # stdin closed: the parent has gone, so stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optisoft connector", description="Run the Optisoft Connector.")
    parser.add_argument("--relay", required=True, help="the relay's address (https://...)")
    parser.add_argument("--practice-code", required=True)
    parser.add_argument("--db", required=True, type=Path, help="the practice database file")
    parser.add_argument("--install", type=Path, help="JSON install spec, used only when --db does not exist yet")
    parser.add_argument("--sql-log", type=Path, help="append every SQL statement run here (JSON lines)")
    parser.add_argument("--wait", type=float, default=20.0, help="long-poll wait in seconds")
    parser.add_argument("--console", action="store_true", help="serve the practice-desk console on stdin/stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s connector %(message)s")

    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        log.error("%s is not set", TOKEN_ENV)
        return 2
    sql_log = SqlLog(args.sql_log)
    fresh = not args.db.exists()
    if fresh and args.install is None:
        log.error("no practice database at %s", args.db)
        return 2
    if fresh:  # a new practice: Optisoft's installer creates the database and years of records
        installer = PracticeDb(args.db, SqlLog(None), by="install")
        install(installer, json.loads(args.install.read_text()))
        installer.close()
        sql_log.write("install", f"-- practice database installed from {args.install.name}")
    db = PracticeDb(args.db, sql_log, by="connector")
    connector = Connector(RelayLink(args.relay, args.practice_code, token, args.wait), db)

    def stop(signum: int, frame: Any) -> None:
        connector.stopping = True
        if not connector.busy:  # idle in a long poll: leave it now; a running job finishes first
            raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.console:
        staff = PracticeDb(args.db, sql_log, by="practice")
        threading.Thread(target=_console, args=(StaffDesk(staff),), name="practice-desk", daemon=True).start()
    log.info("connector %s for practice %s started (pid %s)", CONNECTOR_VERSION, args.practice_code, os.getpid())
    try:
        connector.run()
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        connector.goodbye()
        db.close()
        log.info("connector stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
