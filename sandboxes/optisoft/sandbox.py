"""An Optisoft practice end to end on one machine: the relay in this process, and per practice a
database file plus an Optisoft Connector running as its own OS process.

    with OptisoftSandbox(practices={"OS-1001": 60}) as optisoft:
        optisoft.url                 # the server_address NVC is given
        optisoft.db_users            # {username: (password, can_write)} for db_username/db_password
        optisoft.stop_connector("OS-1001")   # "the connector service is not running"
        optisoft.start_connector("OS-1001")

Only the connector process opens a practice database. The inspection hooks (`patient_count`,
`touch`, `nvc_appointments`, `nvc_notes`, `update_contact`, ...) are sent to that process's
practice-desk console over its stdin/stdout, so this process never touches the database either.
`seed_records` re-derives the canonical patients the database was seeded from (plus the contact
changes made through `update_contact`) without opening it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sandboxes.optisoft.connector import TOKEN_ENV
from sandboxes.optisoft.practice_db import CONTACT_FIELDS, PATIENT_ID_BASE, hash_password
from sandboxes.optisoft.relay import OptisoftRelay

if TYPE_CHECKING:  # seed pulls in Faker; only `seed_records` needs it
    from sandboxes.seed import SeedPatient

UK = ZoneInfo("Europe/London")
DEFAULT_PRACTICE = "OS-1001"
DEFAULT_DB_USERS: dict[str, tuple[str, bool]] = {"NVC_LINK": ("optisoft-demo-password", True)}


class ConnectorGone(RuntimeError):
    """The connector process is not running, so its practice desk cannot answer."""


class OptisoftConnector:
    """One practice's Optisoft Connector, run as a real separate process (`python -m
    sandboxes.optisoft connector ...`). It dials out to the relay and opens no port."""

    def __init__(
        self,
        relay_url: str,
        practice_code: str,
        token: str,
        directory: Path,
        *,
        install: dict[str, Any] | None = None,
        poll_wait_seconds: float = 20.0,
    ):
        self.relay_url = relay_url
        self.practice_code = practice_code
        self.directory = Path(directory)
        self.db_path = self.directory / "optisoft.db"
        self.sql_log_path = self.directory / "sql.log"
        self.log_path = self.directory / "connector.log"
        self.poll_wait_seconds = poll_wait_seconds
        self._token = token
        self._install = install
        self._process: subprocess.Popen[str] | None = None
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._console_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stderr: IO[str] | None = None

    def __repr__(self) -> str:
        return f"OptisoftConnector(practice_code={self.practice_code!r}, pid={self.pid}, running={self.running})"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 60.0) -> OptisoftConnector:
        if self.running:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "sandboxes.optisoft",
            "connector",
            "--relay",
            self.relay_url,
            "--practice-code",
            self.practice_code,
            "--db",
            str(self.db_path),
            "--sql-log",
            str(self.sql_log_path),
            "--wait",
            f"{self.poll_wait_seconds:g}",
            "--console",
        ]
        if self._install is not None:
            spec = self.directory / "install.json"
            spec.write_text(json.dumps(self._install))
            command += ["--install", str(spec)]
        self._stderr = self.log_path.open("a", encoding="utf-8")
        self._replies = queue.Queue()
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            env={**os.environ, TOKEN_ENV: self._token},
            cwd=self.directory,
        )
        threading.Thread(target=self._read_replies, args=(self._process.stdout,), daemon=True).start()
        self.console("ping", timeout=timeout)  # answers once the database is installed and open
        return self

    def _read_replies(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                self._replies.put(json.loads(line))
            except ValueError:
                continue
        self._replies.put(None)

    def console(self, op: str, timeout: float = 30.0, **args: Any) -> Any:
        """Ask the practice desk inside the connector process to do `op` (see `StaffDesk`)."""
        with self._console_lock:
            if not self.running or self._process is None or self._process.stdin is None:
                raise ConnectorGone(f"the Optisoft Connector for {self.practice_code} is not running")
            request_id = next(self._ids)
            try:
                self._process.stdin.write(json.dumps({"id": request_id, "op": op, "args": args}, default=str) + "\n")
                self._process.stdin.flush()
            except (BrokenPipeError, OSError):
                raise ConnectorGone(f"the Optisoft Connector for {self.practice_code} has exited") from None
            while True:
                try:
                    reply = self._replies.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"the connector's practice desk did not answer {op!r}") from None
                if reply is None:
                    raise ConnectorGone(f"the Optisoft Connector for {self.practice_code} exited (see {self.log_path})")
                if reply.get("id") == request_id:
                    break
        if not reply.get("ok"):
            raise RuntimeError(f"practice desk {op!r} failed: {reply.get('error')}")
        return reply.get("result")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the service as Windows would (SIGTERM): it finishes a running job and says goodbye."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Crash it (SIGKILL): no goodbye; the relay has to notice on its own."""
        self._end(signal.SIGKILL, 10.0)

    def _end(self, how: signal.Signals, timeout: float) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(how)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self._install = None  # the database exists now; a restart reuses it

    @property
    def sql_log(self) -> list[dict[str, Any]]:
        """Every statement the connector process ran: `{"at", "pid", "by", "sql"[, "rows"]}`."""
        if not self.sql_log_path.exists():
            return []
        entries = []
        for line in self.sql_log_path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:  # a line being written right now
                continue
        return entries


def uk_local_to_utc(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UK).astimezone(UTC) if value.tzinfo is None else value.astimezone(UTC)


class OptisoftSandbox(OptisoftRelay):
    """The relay plus, per practice code, a seeded practice database and its connector process.

    `practices` maps practice codes to patient counts; `db_users` maps database logins to
    `(password, can_write)` and is installed in every practice's `DbUsers`. Files live under
    `directory` (a temporary one, removed on stop, when not given).
    """

    name = "optisoft"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        practices: dict[str, int] | None = None,
        db_users: dict[str, tuple[str, bool]] | None = None,
        directory: str | Path | None = None,
        seed: int = 7,
        today: date | None = None,
        offline_after_seconds: float = 5.0,
        answer_timeout_seconds: float = 20.0,
        poll_wait_seconds: float = 10.0,
        start_connectors: bool = True,
        rate_limit_per_second: float = 0.0,
    ):
        super().__init__(
            host,
            port,
            offline_after_seconds=offline_after_seconds,
            answer_timeout_seconds=answer_timeout_seconds,
            seed=seed,
            rate_limit_per_second=rate_limit_per_second,
        )
        self.practices = dict(practices if practices is not None else {DEFAULT_PRACTICE: 50})
        self.db_users = dict(db_users if db_users is not None else DEFAULT_DB_USERS)
        self.seed = seed
        self.today = today
        self.poll_wait_seconds = poll_wait_seconds
        self.start_connectors = start_connectors
        self._own_directory = directory is None
        self.directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="optisoft-"))
        self.connectors: dict[str, OptisoftConnector] = {}
        self._installs: dict[str, dict[str, Any]] = {}  # what each practice database was seeded from
        self._seeded: dict[str, list[SeedPatient]] = {}
        self._contact_edits: dict[str, dict[str, dict[str, Any]]] = {}  # practice -> patient id -> changes
        users = [
            {"username": name, "passwordHash": hash_password(password), "canWrite": can_write}
            for name, (password, can_write) in self.db_users.items()
        ]
        for n, (code, patients) in enumerate(self.practices.items()):
            token = self.register_practice(code)
            install = {
                "patients": patients,
                "seed": seed + n,
                "today": (today or date.today()).isoformat(),
                "users": users,
            }
            self._installs[code] = {k: v for k, v in install.items() if k != "users"}
            self._contact_edits[code] = {}
            self.connectors[code] = OptisoftConnector(
                self.url, code, token, self.directory / code, install=install, poll_wait_seconds=poll_wait_seconds
            )

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> OptisoftSandbox:
        super().start()
        if self.start_connectors:
            for code in self.connectors:
                self.start_connector(code)
        return self

    def start_connector(self, practice_code: str, timeout: float = 60.0) -> OptisoftConnector:
        connector = self.connectors[practice_code].start(timeout)
        if not self.wait_for_connector(practice_code, timeout):
            raise TimeoutError(f"the Optisoft Connector for {practice_code} did not reach the relay")
        return connector

    def stop_connector(self, practice_code: str, *, crash: bool = False) -> None:
        connector = self.connectors[practice_code]
        if crash:
            connector.kill()
        else:
            connector.stop()

    def connector(self, practice_code: str) -> OptisoftConnector:
        return self.connectors[practice_code]

    def stop(self) -> None:
        for connector in self.connectors.values():
            connector.stop()
        super().stop()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> OptisoftSandbox:
        return self.start()

    # --- inspection hooks (the same for every PMS sandbox) ---------------------------------------

    def db_path(self, practice_ref: str) -> Path:
        return self.connectors[practice_ref].db_path

    def patient_count(self, practice_ref: str) -> int:
        return int(self.connectors[practice_ref].console("patient_count"))

    def touch(self, practice_ref: str, count: int, now: datetime | None = None) -> list[str]:
        """Receptionists edit `count` patients now (a new mobile, or an exam today); returns their ids."""
        stamp = (now or datetime.now(UTC)).astimezone(UTC).isoformat()
        return list(self.connectors[practice_ref].console("touch", count=count, now=stamp))

    def update_patient(self, practice_ref: str, patient_id: str, now: datetime | None = None, **changes: Any) -> None:
        """Change one patient as a receptionist would, bumping its ModifiedDate: `Patients` columns by
        name (`Mobile="07700 900998"`), and the contact fields in NVC's words (`status`, `status_date`,
        `phone_recall`, `no_recall`, `sms_consent`, `email_consent`, `guardian_name`), rendered into
        Optisoft's ticks, so an incremental read sees a patient marked deceased or opted out mid-day.
        `seed_records` follows the contact fields."""
        contact = {k: v for k, v in changes.items() if k in CONTACT_FIELDS}
        if "status" in contact:
            contact["status"] = contact["status"] or "active"
        if isinstance(contact.get("status_date"), str):
            contact["status_date"] = date.fromisoformat(contact["status_date"])
        stamp = (now or datetime.now(UTC)).astimezone(UTC).isoformat()
        self.connectors[practice_ref].console(
            "update_patient", patient_id=patient_id, changes={**changes, **contact}, now=stamp
        )
        if contact.get("status", "deceased") != "deceased":
            contact["status_date"] = None  # Optisoft keeps only a date of death
        if contact:
            self._contact_edits[practice_ref].setdefault(str(patient_id), {}).update(contact)

    def update_contact(self, practice_ref: str, patient_id: str, now: datetime | None = None, **changes: Any) -> None:
        """`update_patient` with the contact fields only (anything else is refused)."""
        unknown = set(changes) - set(CONTACT_FIELDS)
        if unknown:
            raise ValueError(f"not contact fields: {sorted(unknown)} (known: {', '.join(CONTACT_FIELDS)})")
        self.update_patient(practice_ref, patient_id, now, **changes)

    def set_recall(self, practice_ref: str, patient_id: str, due: date, now: datetime | None = None) -> None:
        stamp = (now or datetime.now(UTC)).astimezone(UTC).isoformat()
        self.connectors[practice_ref].console("set_recall", patient_id=patient_id, due=due.isoformat(), now=stamp)

    def suppress_recall(
        self, practice_ref: str, patient_id: str, suppressed: bool = True, now: datetime | None = None
    ) -> None:
        """Tick (or clear) "Suppressed by Appointment" on the patient's Spectacles recall."""
        stamp = (now or datetime.now(UTC)).astimezone(UTC).isoformat()
        self.connectors[practice_ref].console(
            "suppress_recall", patient_id=patient_id, suppressed=suppressed, now=stamp
        )

    def seed_records(self, practice_ref: str) -> dict[str, SeedPatient]:
        """PatientID (as the client reports it) -> the canonical patient the database renders: the
        seeded patients, with the changes made through `update_contact` applied."""
        from sandboxes.seed import seed_patients

        spec = self._installs[practice_ref]
        if practice_ref not in self._seeded:
            self._seeded[practice_ref] = seed_patients(
                int(spec["patients"]), seed=int(spec["seed"]), today=date.fromisoformat(spec["today"])
            )
        edits = self._contact_edits[practice_ref]
        out = {}
        for patient in self._seeded[practice_ref]:
            pid = str(PATIENT_ID_BASE + patient.index)
            out[pid] = replace(patient, **edits[pid]) if pid in edits else replace(patient)
        return out

    def nvc_appointments(self, practice_ref: str) -> list[dict[str, Any]]:
        rows = self.connectors[practice_ref].console("nvc_appointments")
        return [{**row, "starts_at": uk_local_to_utc(row["starts_at"])} for row in rows]

    def nvc_notes(self, practice_ref: str) -> list[dict[str, Any]]:
        return list(self.connectors[practice_ref].console("nvc_notes"))

    def select(self, practice_ref: str, sql: str, *params: Any) -> list[dict[str, Any]]:
        """A read-only report on the practice database, run at the practice (SELECT only)."""
        result = self.connectors[practice_ref].console("select", sql=sql, params=list(params))
        return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]

    @property
    def sql_log(self) -> list[tuple[str, str]]:
        """`(by, statement)` for every SQL statement run on any practice database, oldest first;
        `by` is "connector" (NVC's requests), "practice" (the desk/inspection hooks) or "install"."""
        entries = [e for c in self.connectors.values() for e in c.sql_log]
        entries.sort(key=lambda e: e["at"])
        return [(e["by"], e["sql"]) for e in entries]
