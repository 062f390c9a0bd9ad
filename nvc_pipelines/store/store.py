"""The store: practice registry, patients, recalls and quarantined rows in PostgreSQL.

Writes are bulk and idempotent: rows are `COPY`ed into a temporary staging table and merged with
`INSERT ... ON CONFLICT`, only touching rows whose content changed, all in one transaction per
practice and asset, so a killed run leaves the previous state and a re-run converges.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from nvc_pipelines.crypto import decrypt_credentials, encrypt_credentials
from nvc_pipelines.model import Patient, Phone, PhoneType, PmsKind, Practice, ReadResult, Recall
from nvc_pipelines.store.db import StoreUnavailable, engine_for, ensure_database, store_url

_MIGRATED: set[str] = set()  # URLs already migrated by this process


class PracticeNotFound(LookupError):
    pass


class PracticeExists(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class WriteCounts:
    """What a sync did to the store."""

    inserted: int
    updated: int
    unchanged: int
    rejected: int


_PATIENT_COLUMNS = (
    "practice_id",
    "pms_patient_id",
    "first_name",
    "last_name",
    "date_of_birth",
    "email",
    "address",
    "phones",
    "phone_types",
    "last_eye_test_date",
    "last_clinical_test_date",
    "risk_flags",
    "unknown_risk_values",
    "clinical_notes",
    "pms_recall_due_date",
    "source_updated_at",
    "content_hash",
)
_PATIENT_STAGE_DDL = """
CREATE TEMP TABLE stage_patients (
    practice_id text, pms_patient_id text, first_name text, last_name text, date_of_birth date,
    email text, address text, phones text[], phone_types text[], last_eye_test_date date,
    last_clinical_test_date date, risk_flags text[], unknown_risk_values text[], clinical_notes text,
    pms_recall_due_date date, source_updated_at timestamptz, content_hash text
) ON COMMIT DROP
"""


def _json_default(value: Any) -> str:
    if isinstance(value, date | datetime):
        return value.isoformat()
    raise TypeError(type(value))


def patient_row(p: Patient) -> tuple[Any, ...]:
    """The staging row for a patient; the hash covers everything the source said about them."""
    body = (
        p.practice_id,
        p.pms_patient_id,
        p.first_name,
        p.last_name,
        p.date_of_birth,
        p.email,
        p.address,
        [ph.e164 for ph in p.phones],
        [str(ph.type) for ph in p.phones],
        p.last_eye_test_date,
        p.last_clinical_test_date,
        sorted(p.risk_flags),
        list(p.unknown_risk_values),
        p.clinical_notes,
        p.pms_recall_due_date,
        p.source_updated_at,
    )
    digest = hashlib.sha256(json.dumps(body, default=_json_default).encode()).hexdigest()
    return (*body, digest)


def _patient_from_row(row: Any) -> Patient:
    return Patient(
        practice_id=row.practice_id,
        pms_patient_id=row.pms_patient_id,
        first_name=row.first_name,
        last_name=row.last_name,
        phones=[Phone(e, PhoneType(t)) for e, t in zip(row.phones, row.phone_types, strict=True)],
        date_of_birth=row.date_of_birth,
        email=row.email,
        address=row.address,
        last_eye_test_date=row.last_eye_test_date,
        last_clinical_test_date=row.last_clinical_test_date,
        risk_flags=list(row.risk_flags),
        unknown_risk_values=list(row.unknown_risk_values),
        clinical_notes=row.clinical_notes,
        pms_recall_due_date=row.pms_recall_due_date,
        source_updated_at=row.source_updated_at,
    )


class Store:
    """Plain-Python access to the store; the Dagster `StoreResource` and the CLI both go through it."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def open(cls, url: URL | str | None = None, *, migrate: bool = True) -> Store:
        """Open the store at `url` (default: `NVC_DATABASE_URL` or the embedded server), creating and
        migrating its database when needed."""
        target = store_url() if url is None else make_url(url).set(drivername="postgresql+psycopg")
        ensure_database(target)
        url_text = target.render_as_string(hide_password=False)
        store = cls(engine_for(url_text))
        if migrate and url_text not in _MIGRATED:
            store.migrate()
            _MIGRATED.add(url_text)
        return store

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            raise StoreUnavailable(
                f"The store's PostgreSQL failed: {str(exc.orig).strip()}. Check the server and NVC_DATABASE_URL; "
                "nothing was written."
            ) from None

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent, serialised by an advisory lock)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(resources.files("nvc_pipelines.store") / "migrations"))
        with self.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(4242001)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    # --- practice registry -------------------------------------------------------------------------

    def add_practice(
        self,
        practice_id: str,
        display_name: str,
        pms_kind: PmsKind,
        settings: dict[str, str],
        credentials: dict[str, str],
        *,
        replace: bool = False,
    ) -> Practice:
        """Register a practice (or re-connect a disconnected one); `replace` updates a connected one."""
        blob = encrypt_credentials(practice_id, credentials) if credentials else None
        try:
            with self.begin() as conn:
                existing = conn.execute(
                    text("SELECT pms_kind, status FROM practices WHERE practice_id = :id FOR UPDATE"),
                    {"id": practice_id},
                ).one_or_none()
                if existing is not None and existing.status == "connected" and not replace:
                    raise PracticeExists(
                        f"practice {practice_id!r} is already connected ({existing.pms_kind}); "
                        "pass --update to change its settings"
                    )
                conn.execute(
                    text(
                        "INSERT INTO practices (practice_id, display_name, pms_kind, settings, credentials) "
                        "VALUES (:id, :name, :kind, CAST(:settings AS jsonb), :creds) "
                        "ON CONFLICT (practice_id) DO UPDATE SET display_name = EXCLUDED.display_name, "
                        "pms_kind = EXCLUDED.pms_kind, settings = EXCLUDED.settings, "
                        "credentials = EXCLUDED.credentials, status = 'connected'"
                    ),
                    {
                        "id": practice_id,
                        "name": display_name,
                        "kind": str(pms_kind),
                        "settings": json.dumps(settings),
                        "creds": blob,
                    },
                )
        except IntegrityError:
            raise ValueError(
                f"practice id {practice_id!r} is not allowed: use 1-63 lower-case letters, digits, '-' or '_'"
            ) from None
        return self.get_practice(practice_id)

    def get_practice(self, practice_id: str) -> Practice:
        with self.begin() as conn:
            row = conn.execute(
                text("SELECT * FROM practices WHERE practice_id = :id"), {"id": practice_id}
            ).one_or_none()
        if row is None:
            raise PracticeNotFound(f"no practice {practice_id!r} is registered (see `nvc practice list`)")
        return Practice(
            row.practice_id,
            row.display_name,
            PmsKind(row.pms_kind),
            row.settings,
            row.status,
            row.connected_at,
        )

    def practice_credentials(self, practice_id: str) -> dict[str, str]:
        """Decrypted secrets, for a resource about to talk to the PMS; never log or return them further."""
        with self.begin() as conn:
            blob = conn.execute(
                text("SELECT credentials FROM practices WHERE practice_id = :id"), {"id": practice_id}
            ).scalar_one_or_none()
        return decrypt_credentials(practice_id, blob)

    def list_practices(self) -> list[dict[str, Any]]:
        """The registry with per-practice counts; secrets are never selected."""
        with self.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT p.practice_id, p.display_name, p.pms_kind, p.status, p.connected_at, p.last_sync_at, "
                    "(SELECT count(*) FROM patients pt WHERE pt.practice_id = p.practice_id AND pt.active) AS patients "
                    "FROM practices p ORDER BY p.practice_id"
                )
            ).mappings()
            return [dict(r) for r in rows]

    def set_status(self, practice_id: str, status: str) -> None:
        with self.begin() as conn:
            n = conn.execute(
                text("UPDATE practices SET status = :s WHERE practice_id = :id"),
                {"s": status, "id": practice_id},
            ).rowcount
        if not n:
            raise PracticeNotFound(f"no practice {practice_id!r} is registered")

    # --- patients ----------------------------------------------------------------------------------

    def write_patients(self, practice_id: str, source: str, result: ReadResult, run_id: str | None) -> WriteCounts:
        """Merge a source read into the store in one transaction; the practice's quarantine for this
        source is replaced by this read's rejections (re-importing a file changes nothing)."""
        rows = [patient_row(p) for p in result.patients]
        with self.begin() as conn:
            raw = conn.connection.driver_connection
            with raw.cursor() as cur:
                cur.execute(_PATIENT_STAGE_DDL)
                with cur.copy(f"COPY stage_patients ({', '.join(_PATIENT_COLUMNS)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _PATIENT_COLUMNS[2:])
                cur.execute(
                    f"INSERT INTO patients ({', '.join(_PATIENT_COLUMNS)}) "
                    f"SELECT {', '.join(_PATIENT_COLUMNS)} FROM stage_patients "
                    "ON CONFLICT (practice_id, pms_patient_id) DO UPDATE SET "
                    f"{updates}, active = true, updated_at = now() "
                    "WHERE patients.content_hash IS DISTINCT FROM EXCLUDED.content_hash OR NOT patients.active "
                    "RETURNING (xmax = 0)"
                )
                flags = [r[0] for r in cur.fetchall()]
            conn.execute(
                text("DELETE FROM rejected_rows WHERE practice_id = :p AND source = :s"),
                {"p": practice_id, "s": source},
            )
            if result.rejected:
                conn.execute(
                    text(
                        "INSERT INTO rejected_rows (practice_id, source, source_ref, row_ref, reason, raw, run_id) "
                        "VALUES (:p, :s, :ref, :row_ref, :reason, CAST(:raw AS jsonb), :run_id)"
                    ),
                    [
                        {
                            "p": practice_id,
                            "s": source,
                            "ref": result.source_ref,
                            "row_ref": r.row_ref,
                            "reason": r.reason,
                            "raw": json.dumps(r.raw, default=_json_default),
                            "run_id": run_id,
                        }
                        for r in result.rejected
                    ],
                )
            conn.execute(text("UPDATE practices SET last_sync_at = now() WHERE practice_id = :p"), {"p": practice_id})
        inserted = sum(flags)
        return WriteCounts(inserted, len(flags) - inserted, len(rows) - len(flags), len(result.rejected))

    def load_patients(self, practice_id: str) -> list[Patient]:
        with self.begin() as conn:
            rows = conn.execute(
                text("SELECT * FROM patients WHERE practice_id = :p AND active ORDER BY pms_patient_id"),
                {"p": practice_id},
            )
            return [_patient_from_row(r) for r in rows]

    def write_recalls(self, practice_id: str, recalls: Iterable[Recall]) -> int:
        """Replace the practice's recalls with `recalls` in one transaction; returns how many were added, changed or removed."""
        payload = [
            {
                "pid": r.pms_patient_id,
                "due": r.due_date,
                "src": r.recall_source,
                "rule": r.rule,
                "m": r.interval_months,
            }
            for r in recalls
        ]
        with self.begin() as conn:
            conn.execute(
                text(
                    "CREATE TEMP TABLE stage_recalls (pms_patient_id text, due_date date, recall_source text, "
                    "rule text, interval_months int) ON COMMIT DROP"
                )
            )
            if payload:
                conn.execute(
                    text("INSERT INTO stage_recalls VALUES (:pid, :due, :src, :rule, :m)"),
                    payload,
                )
            removed = conn.execute(
                text(
                    "DELETE FROM recalls r WHERE r.practice_id = :p AND NOT EXISTS ("
                    " SELECT 1 FROM stage_recalls s JOIN patients pt ON pt.practice_id = :p "
                    " AND pt.pms_patient_id = s.pms_patient_id WHERE pt.patient_id = r.patient_id)"
                ),
                {"p": practice_id},
            ).rowcount
            changed = conn.execute(
                text(
                    "INSERT INTO recalls (patient_id, practice_id, due_date, recall_source, rule, interval_months) "
                    "SELECT pt.patient_id, :p, s.due_date, s.recall_source, s.rule, s.interval_months "
                    "FROM stage_recalls s JOIN patients pt ON pt.practice_id = :p AND pt.pms_patient_id = s.pms_patient_id "
                    "ON CONFLICT (patient_id) DO UPDATE SET due_date = EXCLUDED.due_date, "
                    "recall_source = EXCLUDED.recall_source, rule = EXCLUDED.rule, "
                    "interval_months = EXCLUDED.interval_months, computed_at = now() "
                    "WHERE (recalls.due_date, recalls.recall_source, recalls.rule, recalls.interval_months) "
                    "IS DISTINCT FROM (EXCLUDED.due_date, EXCLUDED.recall_source, EXCLUDED.rule, EXCLUDED.interval_months)"
                ),
                {"p": practice_id},
            ).rowcount
        return changed + removed

    def recall_summary(self, practice_id: str, today: date) -> dict[str, int]:
        with self.begin() as conn:
            row = (
                conn.execute(
                    text(
                        "SELECT count(*) AS total, count(*) FILTER (WHERE due_date <= :today) AS due_now, "
                        "count(*) FILTER (WHERE due_date > :today AND due_date <= :today + 30) AS due_30_days, "
                        "count(*) FILTER (WHERE recall_source = 'pms') AS from_pms, "
                        "count(*) FILTER (WHERE recall_source = 'computed') AS computed "
                        "FROM recalls WHERE practice_id = :p"
                    ),
                    {"p": practice_id, "today": today},
                )
                .mappings()
                .one()
            )
            return dict(row)

    # --- export ------------------------------------------------------------------------------------

    def export_practice(self, practice_id: str) -> dict[str, Any]:
        """Everything held about one practice's patients, in the documented export shape."""
        self.get_practice(practice_id)
        with self.begin() as conn:
            patients = (
                conn.execute(
                    text(
                        "SELECT pt.*, r.due_date AS recall_due_date, r.recall_source, r.rule AS recall_rule "
                        "FROM patients pt LEFT JOIN recalls r ON r.patient_id = pt.patient_id "
                        "WHERE pt.practice_id = :p ORDER BY pt.pms_patient_id"
                    ),
                    {"p": practice_id},
                )
                .mappings()
                .all()
            )
            rejected = (
                conn.execute(
                    text(
                        "SELECT source, source_ref, row_ref, reason, raw, rejected_at FROM rejected_rows "
                        "WHERE practice_id = :p ORDER BY rejected_id"
                    ),
                    {"p": practice_id},
                )
                .mappings()
                .all()
            )

        def iso(value: Any) -> Any:
            return value.isoformat() if isinstance(value, date | datetime) else value

        return {
            "practice_id": practice_id,
            "patients": [
                {
                    "pms_patient_id": p["pms_patient_id"],
                    "first_name": p["first_name"],
                    "last_name": p["last_name"],
                    "date_of_birth": iso(p["date_of_birth"]),
                    "email": p["email"],
                    "address": p["address"],
                    "phones": list(p["phones"]),
                    "last_eye_test_date": iso(p["last_eye_test_date"]),
                    "last_clinical_test_date": iso(p["last_clinical_test_date"]),
                    "risk_flags": list(p["risk_flags"]),
                    "unknown_risk_values": list(p["unknown_risk_values"]),
                    "clinical_notes": p["clinical_notes"],
                    "recall_due_date": iso(p["recall_due_date"]),
                    "recall_source": p["recall_source"],
                    "recall_rule": p["recall_rule"],
                    "active": p["active"],
                }
                for p in patients
            ],
            "rejected_rows": [{k: iso(v) for k, v in r.items()} for r in rejected],
        }
