"""The call list as it is read: by the AI caller (`entries`), by an operator (`why`), by the asset
check (`violations`), and by the dial check (`entry_for`, with the record of the list's freshness in
`call_list_state` that it reads and keeps). Runs inside the caller's practice-scoped transaction.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, text

from nvc_pipelines.calling import REASON_CODES, ReadMoment, entry_ask_for


def as_read(row: Any, moment: ReadMoment) -> dict[str, Any]:
    """A call-list row as read at `moment`: a listed row's `earliest_call_at` through
    `ReadMoment.callable_from`."""
    out = dict(row)
    if out.get("listed") and out.get("earliest_call_at") is not None:
        out["earliest_call_at"] = moment.callable_from(out["earliest_call_at"])
    return out


def mark_refreshed(conn: Connection, practice_id: str, at: datetime, *, ok: bool, error: str | None = None) -> None:
    conn.execute(
        text(
            "INSERT INTO call_list_state (practice_id, refreshed_at, attempted_at, ok, error) "
            "VALUES (:p, CASE WHEN :ok THEN CAST(:at AS timestamptz) END, :at, :ok, :error) "
            "ON CONFLICT (practice_id) DO UPDATE SET attempted_at = EXCLUDED.attempted_at, ok = EXCLUDED.ok, "
            "error = EXCLUDED.error, refreshed_at = COALESCE(EXCLUDED.refreshed_at, call_list_state.refreshed_at)"
        ),
        {"p": practice_id, "at": at, "ok": ok, "error": error},
    )


def claim(conn: Connection, practice_id: str, at: datetime) -> None:
    conn.execute(
        text(
            "INSERT INTO call_list_state (practice_id, attempted_at) VALUES (:p, :at) "
            "ON CONFLICT (practice_id) DO UPDATE SET attempted_at = EXCLUDED.attempted_at"
        ),
        {"p": practice_id, "at": at},
    )


def state(conn: Connection, practice_id: str) -> dict[str, Any]:
    row = (
        conn.execute(text("SELECT * FROM call_list_state WHERE practice_id = :p"), {"p": practice_id})
        .mappings()
        .one_or_none()
    )
    built = conn.execute(
        text("SELECT max(listed_at) FROM call_list WHERE practice_id = :p"), {"p": practice_id}
    ).scalar_one()
    out = dict(row) if row else {"refreshed_at": None, "attempted_at": None, "ok": True, "error": None,
                                 "checks": 0, "check_misses": 0}  # fmt: skip
    out["built_at"] = built
    return out


def count_check(conn: Connection, practice_id: str, *, miss: bool) -> None:
    conn.execute(
        text(
            "INSERT INTO call_list_state (practice_id, checks, check_misses) VALUES (:p, 1, :m) "
            "ON CONFLICT (practice_id) DO UPDATE SET checks = call_list_state.checks + 1, "
            "check_misses = call_list_state.check_misses + EXCLUDED.check_misses"
        ),
        {"p": practice_id, "m": int(miss)},
    )


def entry_for(conn: Connection, practice_id: str, phone: str, moment: ReadMoment) -> dict[str, Any]:
    """The entry on this number, if any, and everyone due on this number who is not listed
    (as read at `moment`)."""
    rows = conn.execute(
        text(
            "SELECT c.*, pt.pms_patient_id, pt.first_name, pt.last_name FROM call_list c JOIN patients pt "
            "USING (patient_id) WHERE c.practice_id = :p AND (c.phone = :phone OR (NOT c.listed "
            "AND :phone = ANY(pt.phones))) ORDER BY pt.pms_patient_id"
        ),
        {"p": practice_id, "phone": phone},
    ).mappings()
    listed: list[dict[str, Any]] = []
    off: list[dict[str, Any]] = []
    for r in rows:
        (listed if r["listed"] else off).append(as_read(r, moment))
    return {"listed": listed, "not_listed": off}


def entries(conn: Connection, practice_id: str, moment: ReadMoment) -> dict[str, list[dict[str, Any]]]:
    """The list as the caller dials it: one entry per number (most overdue first), and every due
    patient not listed with the reason (as read at `moment`)."""
    rows = conn.execute(
        text(
            "SELECT c.*, pt.pms_patient_id, pt.first_name, pt.last_name FROM call_list c JOIN patients pt "
            "USING (patient_id) WHERE c.practice_id = :p ORDER BY c.due_date, pt.pms_patient_id"
        ),
        {"p": practice_id},
    ).mappings()
    by_phone: dict[str, list[dict[str, Any]]] = {}
    not_listed: list[dict[str, Any]] = []
    for r in rows:
        if r["listed"]:
            by_phone.setdefault(r["phone"], []).append(as_read(r, moment))
        else:
            not_listed.append(
                {
                    "pms_patient_id": r["pms_patient_id"],
                    "first_name": r["first_name"],
                    "last_name": r["last_name"],
                    "due_date": r["due_date"],
                    "reason_code": r["reason_code"],
                    "detail": r["detail"],
                }
            )
    out = [
        {
            "phone": phone,
            "ask_for": entry_ask_for(people),
            "earliest_call_at": max(p["earliest_call_at"] for p in people),
            "people": [
                {
                    "pms_patient_id": p["pms_patient_id"],
                    "first_name": p["first_name"],
                    "last_name": p["last_name"],
                    "due_date": p["due_date"],
                    "reason": p["reason"],
                }
                for p in people
            ],
        }
        for phone, people in by_phone.items()
    ]
    out.sort(key=lambda e: (min(p["due_date"] for p in e["people"]), e["phone"]))
    not_listed.sort(key=lambda n: (REASON_CODES.index(n["reason_code"]), n["pms_patient_id"]))
    return {"entries": out, "not_listed": not_listed}


def why(
    conn: Connection, practice_id: str, pms_patient_id: str, today: date, moment: ReadMoment
) -> dict[str, Any] | None:
    """Why one patient is or is not on the list (None: the practice has no such patient;
    as read at `moment`)."""
    row = conn.execute(
        text(
            "SELECT pt.patient_id, pt.pms_patient_id, pt.first_name, pt.last_name, pt.active, pt.phones, "
            "k.pms_patient_id AS merged_into, r.due_date, r.reason AS recall_reason, c.listed, c.phone, c.ask_for, "
            "c.earliest_call_at, c.reason_code, c.detail FROM patients pt "
            "LEFT JOIN patients k ON k.patient_id = pt.merged_into "
            "LEFT JOIN recalls r ON r.patient_id = pt.patient_id "
            "LEFT JOIN call_list c ON c.patient_id = pt.patient_id "
            "WHERE pt.practice_id = :p AND pt.pms_patient_id = :ref"
        ),
        {"p": practice_id, "ref": pms_patient_id},
    ).one_or_none()
    if row is None:
        return None
    out: dict[str, Any] = {
        "pms_patient_id": row.pms_patient_id,
        "first_name": row.first_name,
        "last_name": row.last_name,
        "due_date": row.due_date,
        "recall_reason": row.recall_reason,
    }
    if row.merged_into:
        return out | {
            "listed": False,
            "reason_code": "inactive",
            "detail": f"merged into {row.merged_into}: look that patient up",
        }
    if not row.active:
        return out | {"listed": False, "reason_code": "inactive", "detail": "no longer in the PMS's records"}
    if row.listed is None:
        if row.due_date is None:
            detail = "no recall: no last eye test on record"
        elif row.due_date > today:
            detail = f"not due until {row.due_date.isoformat()}"
        else:
            detail = "due, but the call list has not been rebuilt since (next sync)"
        return out | {"listed": False, "reason_code": "not_due", "detail": detail}
    if row.listed:
        household = conn.execute(
            text(
                "SELECT pt.pms_patient_id, c.ask_for, c.earliest_call_at FROM call_list c JOIN patients pt "
                "USING (patient_id) WHERE c.practice_id = :p AND c.listed AND c.phone = :phone "
                "ORDER BY pt.pms_patient_id"
            ),
            {"p": practice_id, "phone": row.phone},
        ).mappings()
        people = [as_read(dict(h) | {"listed": True}, moment) for h in household]
        return out | {
            "listed": True,
            "phone": row.phone,
            "ask_for": entry_ask_for(people),
            "earliest_call_at": max(p["earliest_call_at"] for p in people),
            "same_call": [p["pms_patient_id"] for p in people if p["pms_patient_id"] != row.pms_patient_id],
        }
    return out | {"listed": False, "reason_code": row.reason_code, "detail": row.detail}


def violations(conn: Connection, practice_id: str) -> list[dict[str, Any]]:
    """Listed people whom nobody may call: deceased, gone away, inactive, no phone recall, or an open
    suppression on them or a record merged into them. Written apart from the placing rules, in SQL,
    so the asset check holds those rules to account. The open suppressions are grouped by patient
    once and joined (a hash join), and only the offending rows leave the database."""
    rows = conn.execute(
        text(
            "WITH suppressed AS (SELECT x.patient_id, string_agg(DISTINCT s.reason, ',') AS reasons "
            " FROM contact_suppressions s JOIN patients r "
            " ON r.practice_id = s.practice_id AND r.pms_patient_id = s.pms_patient_id "
            " CROSS JOIN LATERAL (VALUES (r.patient_id), (r.merged_into)) AS x(patient_id) "
            " WHERE s.practice_id = :p AND s.lifted_at IS NULL AND x.patient_id IS NOT NULL "
            " GROUP BY x.patient_id) "
            "SELECT pt.pms_patient_id, pt.pms_status, pt.phone_recall, pt.no_recall, s.reasons AS suppressed "
            "FROM call_list c JOIN patients pt USING (patient_id) LEFT JOIN suppressed s USING (patient_id) "
            "WHERE c.practice_id = :p AND c.listed AND c.patient_id IN ("
            # the few who may not be called, found first (one filtered scan), then their list rows
            " SELECT patient_id FROM patients WHERE practice_id = :p AND (pms_status IS DISTINCT FROM 'active' "
            " OR phone_recall IS NOT TRUE OR no_recall IS TRUE) UNION SELECT patient_id FROM suppressed)"
        ),
        {"p": practice_id},
    ).mappings()
    return [dict(r) for r in rows]
