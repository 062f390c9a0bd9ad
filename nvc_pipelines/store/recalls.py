"""Recalls: the targets to recompute, their replacement in bulk, the computation's marks, the summaries."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, text

from nvc_pipelines.model import ClinicalRecord, Patient, Recall
from nvc_pipelines.store.base import StoreBase
from nvc_pipelines.store.db import copy_rows, driver, rows_differ


@dataclass(frozen=True, slots=True)
class RecallState:
    """The database clock now, and the last recall computation's watermark, full run and fingerprint."""

    now: datetime
    computed_at: datetime | None
    last_full_at: datetime | None
    fingerprint: str | None


@dataclass(frozen=True, slots=True)
class RecallBatch:
    """One batch of a recall computation: the patients to recompute, read in one statement with the
    stamp each was queued with (so a queued change newer than what was computed is never taken off
    the queue), the
    active ones with what a recall reads of them, and their active clinical records."""

    seen: dict[
        str, int
    ]  # PMS id -> `recall_due` stamp (0: not queued), every target (an inactive one's recall is removed)
    # The active targets, with what a recall reads of them (`RECALL_INPUT`) and nothing else.
    patients: list[Patient]
    # Their active clinical records by PMS id, oldest exam first, with what a recall reads of them
    # (`RECALL_CLINICAL_INPUT`): their unknown flags, clinician and PMS timestamp are left empty, so
    # these records are for computing recalls only, never to be written back.
    clinical: dict[str, list[ClinicalRecord]]
    # A batch of a full pass is every patient between its first and last PMS id (in the database's
    # order): `write_recalls` starts its joins there. A changed-only batch's range may hold many
    # patients that are not in it (scattered ids); given as bound values, the planner then looks
    # the batch's ids up one by one instead of scanning the range.
    key_range: tuple[str, str] | None = None


# What a recall reads of a clinical record (`recall.recall_with_clinical`), with the record's ids: not
# its unknown flags, clinician or PMS timestamp, which a recall pass then neither reads nor builds.
RECALL_CLINICAL_INPUT = (
    "pms_record_id, pms_patient_id, exam_date, record_type, flags, notes, iop_right_mmhg, iop_left_mmhg"
)


# What a recall is, besides its patient: a recomputation that changes none of them writes nothing.
_RECALL_COLUMNS = (
    "due_date",
    "recall_source",
    "rule",
    "interval_months",
    "reason",
    "flags",
    "inferred_flags",
    "based_on",
    "warnings",
    "guideline_due_date",
)
_STAGE_RECALL_COLUMNS = ("pms_patient_id", *_RECALL_COLUMNS)
# What a recall reads of a patient (`recall.recall_with_clinical`): a recall pass reads no names,
# phones or contact details, and builds no more of a `Patient` than this (at 200,000 patients the
# whole rows took 2.4-2.7 s longer to read and build, in a probe on a kept store).
RECALL_INPUT = "pms_patient_id, date_of_birth, last_eye_test_date, risk_flags, clinical_notes, pms_recall_due_date"
# Where a recall pass reads its patients, with the stamp each was queued with (`recall_due`,
# migration 0021): every patient (0 when not queued), or the queued ones. Both sides are held to the practice,
# as row-level security would, so each side is an index range (ADR 0002).
# Read on the driver's cursor (named parameters, `%(p)s`).
_EVERYONE = (
    "FROM patients p LEFT JOIN recall_due q ON q.practice_id = %(p)s AND q.pms_patient_id = p.pms_patient_id "
    "WHERE p.practice_id = %(p)s"
)
_QUEUED = (
    "FROM recall_due q JOIN patients p ON p.practice_id = %(p)s AND p.pms_patient_id = q.pms_patient_id "
    "WHERE q.practice_id = %(p)s"
)


def lock_recalls(conn: Connection, practice_id: str) -> None:
    """Hold the practice's recalls until this transaction ends: one recall write of a practice at a
    time (two runs of one practice may overlap). A write skips the recalls it read as unchanged, which
    must not change meanwhile; erasure takes it too, so a write that read a patient before they were
    erased commits before the erasure deletes their recall (the table checks no key, migration 0022)."""
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('nvc.recalls:' || :p))"), {"p": practice_id})


class RecallsMixin(StoreBase):
    """Recall computation's reads and writes, one practice at a time."""

    def recall_state(self, practice_id: str) -> RecallState:
        """What the practice's recalls were last computed with, and the database's clock now."""
        with self.begin(practice_id) as conn:
            row = conn.execute(
                text(
                    "SELECT now() AS now, c.cursor_at, c.last_full_sync_at, c.fingerprint FROM (SELECT 1) one "
                    "LEFT JOIN sync_cursors c ON c.practice_id = :p AND c.stream = 'recalls'"
                ),
                {"p": practice_id},
            ).one()
        return RecallState(row.now, row.cursor_at, row.last_full_sync_at, row.fingerprint)

    def recall_targets(self, practice_id: str, *, everyone: bool) -> dict[str, int]:
        """PMS id -> queued stamp (`recall_due.seq`, 0 if not queued) of the patients whose recall
        must be recomputed: every patient, or those queued since their recall was computed (active
        or not: an inactive one's recall is removed)."""
        with self.begin(practice_id) as conn, driver(conn).cursor() as cur:
            cur.execute(
                f"SELECT p.pms_patient_id, coalesce(q.seq, 0) {_EVERYONE if everyone else _QUEUED}", {"p": practice_id}
            )
            return dict(cur.fetchall())

    def recall_batches(self, practice_id: str, *, everyone: bool, size: int = 5000) -> Iterator[RecallBatch]:
        """The patients whose recall must be recomputed (everyone, or those queued in `recall_due`
        since their recall was computed), `size` at a time in PMS id order, each batch with its
        clinical records: two statements a batch on the driver's cursor, each in its own short
        transaction, so memory and locks do not grow with the practice and nothing is read twice.

        Keyset paging on the practice's unique key (no cursor held open across batches): a patient
        whose data changes while the batches run is computed from what its batch read, and stays
        queued (recomputed next time) when it changed after."""
        inputs = ", ".join(f"p.{c}" for c in ("active", *RECALL_INPUT.split(", ")))
        if everyone:
            columns, source, key = f"coalesce(q.seq, 0), {inputs}", _EVERYONE, "p.pms_patient_id"
        else:
            columns, source, key = f"q.seq, {inputs}", _QUEUED, "q.pms_patient_id"
        after: str | None = None  # the last key read: the next page starts after it
        while True:
            with self.begin(practice_id) as conn, driver(conn).cursor() as cur:
                page = "" if after is None else f" AND {key} > %(after)s"
                cur.execute(
                    f"SELECT {columns} {source}{page} ORDER BY {key} LIMIT %(n)s",
                    {"p": practice_id, "after": after, "n": size},
                )
                rows = cur.fetchall()
                if not rows:
                    return
                seen = {row[2]: row[0] for row in rows}
                patients = [
                    Patient(
                        practice_id=practice_id,
                        pms_patient_id=pms_id,
                        first_name="",
                        last_name="",
                        date_of_birth=dob,
                        last_eye_test_date=last_test,
                        risk_flags=flags,
                        clinical_notes=notes,
                        pms_recall_due_date=recall_due,
                    )
                    for _seq, active, pms_id, dob, last_test, flags, notes, recall_due in rows
                    if active
                ]
                first, after = rows[0][2], rows[-1][2]
                where = "pms_patient_id BETWEEN %s AND %s" if everyone else "pms_patient_id = ANY(%s)"
                # Everyone: the batch is a contiguous key range, one index range scan; else its ids.
                params: tuple[Any, ...] = (practice_id, first, after) if everyone else (practice_id, list(seen))
                cur.execute(
                    f"SELECT {RECALL_CLINICAL_INPUT} FROM clinical_records WHERE practice_id = %s AND active "
                    f"AND {where} ORDER BY exam_date, pms_record_id",  # ties in one order, whatever the plan
                    params,
                )
                clinical: dict[str, list[ClinicalRecord]] = {}
                for r in cur:
                    record_id, patient_id, exam_date, kind, flags, notes, right, left = r
                    clinical.setdefault(patient_id, []).append(
                        ClinicalRecord(
                            practice_id=practice_id,
                            pms_record_id=record_id,
                            pms_patient_id=patient_id,
                            exam_date=exam_date,
                            record_type=kind,
                            flags=flags,
                            notes=notes,
                            iop_right_mmhg=None if right is None else float(right),
                            iop_left_mmhg=None if left is None else float(left),
                        )
                    )
            yield RecallBatch(seen, patients, clinical, (first, after))
            if len(rows) < size:
                return

    def finish_recalls(self, practice_id: str, *, fingerprint: str, full: bool, changed: int = 0) -> None:
        """Record that the practice's recalls were computed (with these rules; all of them when
        `full`), after the last batch of `write_recalls`; refreshes the table's statistics after a
        bulk change. A run killed before this recomputes from where the batches' marks left off."""
        with self.begin(practice_id) as conn:
            self._mark_recalls_computed(conn, practice_id, fingerprint, full)
        self._analyze_after_bulk("recalls", changed)

    @staticmethod
    def _mark_recalls_computed(conn: Connection, practice_id: str, fingerprint: str, full: bool) -> None:
        conn.execute(
            text(
                "INSERT INTO sync_cursors (practice_id, stream, cursor_at, last_full_sync_at, fingerprint) "
                "VALUES (:p, 'recalls', now(), CASE WHEN :full THEN now() END, :fp) "
                "ON CONFLICT (practice_id, stream) DO UPDATE SET cursor_at = EXCLUDED.cursor_at, "
                "last_full_sync_at = COALESCE(EXCLUDED.last_full_sync_at, sync_cursors.last_full_sync_at), "
                "fingerprint = EXCLUDED.fingerprint, last_sync_at = now()"
            ),
            {"p": practice_id, "full": full, "fp": fingerprint},
        )

    def write_recalls(
        self,
        practice_id: str,
        recalls: Iterable[Recall],
        *,
        scope: Collection[str] | None = None,
        seen: Mapping[str, int] | None = None,
        key_range: tuple[str, str] | None = None,
        fingerprint: str | None = None,
        analyze: bool = True,
    ) -> int:
        """Replace the practice's recalls with `recalls` in one transaction (only those of the PMS ids in
        `scope` when given); returns how many were added, changed or removed. `seen` (PMS id ->
        `recall_due` stamp read before computing, 0 for one not queued) takes off the queue those
        patients still queued with that stamp, and `fingerprint` the rules used, in the same transaction. `key_range` (a batch's,
        `RecallBatch.key_range`): every id of `scope` lies between these two, in the database's
        order, and the joins start there."""
        rows = [
            (
                r.pms_patient_id,
                r.due_date,
                r.recall_source,
                r.rule,
                r.interval_months,
                r.reason,
                list(r.flags),
                list(r.inferred_flags),
                r.based_on,
                list(r.warnings),
                r.guideline_due_date,
            )
            for r in recalls
        ]
        with self.begin(practice_id) as conn:
            lock_recalls(conn, practice_id)
            with driver(conn).cursor() as cur:
                cur.execute(
                    "CREATE TEMP TABLE stage_recalls (pms_patient_id text NOT NULL, due_date date, recall_source text, "
                    "rule text, interval_months int, reason text, flags text[], inferred_flags text[], based_on date, "
                    "warnings text[], guideline_due_date date) "
                    "ON COMMIT DROP"
                )
                copy_rows(cur, "stage_recalls", _STAGE_RECALL_COLUMNS, rows)
                cur.execute("ANALYZE stage_recalls")  # temp tables have no statistics: the joins need them
            in_scope = in_range = seen_range = ""
            params: dict[str, Any] = {"p": practice_id}
            if key_range is not None and scope is None:
                raise ValueError("key_range bounds a batch: give the batch's scope with it")
            if scope is not None:
                in_scope = " AND pt.pms_patient_id = ANY(:scope)"
                params["scope"] = list(scope)
            if key_range is not None:
                # A batch's joins start at its key range, not at the practice's first patient (each
                # batch would scan all the batches before it). The bounds are the batch's first and
                # last id as the database ordered them (Python's order is not the column's collation),
                # bound as values: computed in the statement (min/max subqueries) the planner could not
                # see them, and a changed-only batch of scattered ids scanned the whole practice.
                in_range = " AND pt.pms_patient_id BETWEEN :lo AND :hi"
                seen_range = " AND q.pms_patient_id BETWEEN :lo AND :hi"
                params["lo"], params["hi"] = key_range
            # The recalls to remove belong to the batch's patients that are inactive or have no recall
            # in the stage: found first from those patients alone (usually none), then deleted by key.
            # One statement joining recalls let the planner drive from a recalls table whose
            # statistics lag a first computation's inserts (a nested loop per recall); an anti-join
            # from the practice's recalls read all of them in every batch. Never prepared: psycopg
            # prepares a statement once a connection has run it five times, and PostgreSQL may then
            # keep one plan for any batch (an earlier form's generic plan ran row by row: a
            # 200,000-row CSV re-sync spent 16 s in it).
            batch = "SELECT pt.patient_id FROM patients pt WHERE pt.practice_id = :p" + in_scope + in_range
            gone = text(
                f"{batch} AND NOT pt.active UNION ALL {batch} AND pt.active AND NOT EXISTS "
                "(SELECT 1 FROM stage_recalls s WHERE s.pms_patient_id = pt.pms_patient_id)"
            )
            with driver(conn).cursor() as cur:
                cur.execute(str(gone.compile(dialect=conn.dialect)), params, prepare=False)
                gone_ids = [row[0] for row in cur]
            removed = 0
            if gone_ids:
                removed = conn.execute(
                    text("DELETE FROM recalls WHERE practice_id = :p AND patient_id = ANY(:ids)"),
                    {"p": practice_id, "ids": gone_ids},
                ).rowcount
            # Only new or different recalls reach the INSERT: ON CONFLICT locks (writes) every row it
            # meets, even one its WHERE then leaves alone, so a recomputation that changes nothing
            # would still dirty every recall of the practice.
            columns = ", ".join(_RECALL_COLUMNS)
            changed = conn.execute(
                text(
                    f"INSERT INTO recalls (patient_id, practice_id, {columns}) "
                    f"SELECT pt.patient_id, :p, {', '.join(f's.{c}' for c in _RECALL_COLUMNS)} FROM stage_recalls s "
                    "JOIN patients pt ON pt.practice_id = :p AND pt.pms_patient_id = s.pms_patient_id AND pt.active"
                    + in_range
                    + " LEFT JOIN recalls r ON r.patient_id = pt.patient_id "
                    f"WHERE r.patient_id IS NULL OR {rows_differ(_RECALL_COLUMNS, 'r', 's')} "
                    f"ON CONFLICT (patient_id) DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in _RECALL_COLUMNS)}, "
                    f"computed_at = now() WHERE {rows_differ(_RECALL_COLUMNS, 'recalls', 'EXCLUDED')}"
                ),
                params,
            ).rowcount
            if seen:
                with driver(conn).cursor() as cur:
                    cur.execute("CREATE TEMP TABLE stage_seen (pms_patient_id text, seq bigint) ON COMMIT DROP")
                    copy_rows(cur, "stage_seen", ("pms_patient_id", "seq"), seen.items())
                    cur.execute("ANALYZE stage_seen")
                # Off the queue only as read: a change committed meanwhile stamped the row anew (holding
                # it until it committed), and the patient stays queued.
                conn.execute(
                    text(
                        "DELETE FROM recall_due q USING stage_seen s WHERE q.practice_id = :p "
                        "AND q.pms_patient_id = s.pms_patient_id AND q.seq = s.seq" + seen_range
                    ),
                    params,
                )
            if fingerprint is not None:
                self._mark_recalls_computed(conn, practice_id, fingerprint, scope is None)
            self.audit(
                conn,
                "pipeline",
                practice_id,
                "compute_recalls",
                detail={"changed": changed, "removed": removed, "scope": "all" if scope is None else len(scope)},
            )
        if analyze:
            self._analyze_after_bulk("recalls", changed + removed)
        return changed + removed

    def recall_summary(self, practice_id: str, today: date) -> dict[str, Any]:
        """The practice's recalls counted for the `recalls` asset's metadata, in one pass grouped by rule."""
        counted = (
            "total", "due_now", "due_30_days", "from_pms", "computed", "with_inferred_flags", "pms_later_than_guideline"
        )  # fmt: skip
        with self.begin(practice_id) as conn:
            rows = (
                conn.execute(
                    text(
                        "SELECT rule, count(*) AS total, count(*) FILTER (WHERE due_date <= :today) AS due_now, "
                        "count(*) FILTER (WHERE due_date > :today AND due_date <= :today + 30) AS due_30_days, "
                        "count(*) FILTER (WHERE recall_source = 'pms') AS from_pms, "
                        "count(*) FILTER (WHERE recall_source = 'computed') AS computed, "
                        "count(*) FILTER (WHERE inferred_flags <> '{}') AS with_inferred_flags, "
                        "count(*) FILTER (WHERE 'pms_later_than_guideline' = ANY(warnings)) AS pms_later_than_guideline "
                        "FROM recalls WHERE practice_id = :p GROUP BY rule ORDER BY rule"
                    ),
                    {"p": practice_id, "today": today},
                )
                .mappings()
                .all()
            )
            active = conn.execute(
                text("SELECT count(*) FROM patients WHERE practice_id = :p AND active"), {"p": practice_id}
            ).scalar_one()
        summary: dict[str, Any] = {name: sum(r[name] for r in rows) for name in counted}
        return {**summary, "active_patients": active, "by_rule": {r["rule"]: r["total"] for r in rows}}

    def recall_warnings(self, practice_id: str) -> list[dict[str, Any]]:
        """Patients whose PMS recall date (which wins) is later than the guideline's, for review."""
        self.get_practice(practice_id)
        with self.begin(practice_id) as conn:
            rows = conn.execute(
                text(
                    "SELECT pt.pms_patient_id, pt.first_name, pt.last_name, r.due_date AS pms_due_date, "
                    "r.guideline_due_date, r.flags, r.warnings FROM recalls r JOIN patients pt USING (patient_id) "
                    "WHERE r.practice_id = :p AND r.warnings <> '{}' ORDER BY r.due_date - r.guideline_due_date DESC, "
                    "pt.pms_patient_id"
                ),
                {"p": practice_id},
            ).mappings()
            return [dict(r) for r in rows]
