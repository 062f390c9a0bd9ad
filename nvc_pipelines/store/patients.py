"""What a sync writes and reads back: the streams (patients, appointments, clinical records), their
rejections and cursors, in one transaction per practice and stream."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text

from nvc_pipelines.model import (
    Channel,
    ClinicalRecord,
    ContactPreferences,
    Patient,
    PatientStatus,
    Phone,
    PhoneType,
    ReadResult,
    RejectedRow,
)
from nvc_pipelines.store import call_events
from nvc_pipelines.store.base import StoreBase, json_default
from nvc_pipelines.store.calls import lock_list
from nvc_pipelines.store.db import driver
from nvc_pipelines.store.erasure import ErasedDuringRead, lock_erasures, suppression_hashes
from nvc_pipelines.store.streams import PATIENTS, StreamSpec, merge_staged, stage_pages, stage_table
from nvc_pipelines.sync import next_cursor


@dataclass(frozen=True, slots=True)
class WriteCounts:
    """What a sync did to the store; rows read = inserted + updated + unchanged + rejected."""

    inserted: int
    updated: int
    unchanged: int
    rejected: int
    deactivated: int = 0


@dataclass(frozen=True, slots=True)
class StreamState:
    cursor_at: datetime | None
    last_full_sync_at: datetime | None


# The columns a `Patient` is read back from, in `patient_from_tuple`'s order (the practice is known).
PATIENT_COLUMNS = (
    "pms_patient_id, first_name, last_name, phones, phone_types, date_of_birth, email, address, "
    "last_eye_test_date, last_clinical_test_date, risk_flags, unknown_risk_values, clinical_notes, "
    "pms_recall_due_date, source_updated_at, pms_status, status_date, phone_recall, no_recall, contact_channels, "
    "guardian_name, name_review"
)
# Enum members by stored value: a dict lookup, not `Enum(value)` (a recall pass reads every patient).
_PHONE_TYPES = {t.value: t for t in PhoneType}
_STATUSES = {s.value: s for s in PatientStatus}
_CHANNELS = {c.value: c for c in Channel}


def patient_from_tuple(practice_id: str, row: Sequence[Any]) -> Patient:
    """A `Patient` from a driver row of `PATIENT_COLUMNS`."""
    (pms_id, first, last, phones, phone_types, dob, email, address, last_test, last_clinical, risk_flags, unknown,
     notes, recall_due, updated, status, status_date, phone_recall, no_recall, channels, guardian, review) = row  # fmt: skip
    return Patient(
        practice_id=practice_id,
        pms_patient_id=pms_id,
        first_name=first,
        last_name=last,
        phones=[Phone(e, _PHONE_TYPES[t]) for e, t in zip(phones, phone_types, strict=True)],
        date_of_birth=dob,
        email=email,
        address=address,
        last_eye_test_date=last_test,
        last_clinical_test_date=last_clinical,
        risk_flags=risk_flags,
        unknown_risk_values=unknown,
        clinical_notes=notes,
        pms_recall_due_date=recall_due,
        source_updated_at=updated,
        status=_STATUSES[status],
        status_date=status_date,
        contact=ContactPreferences(
            phone_recall, no_recall, None if channels is None else frozenset(_CHANNELS[c] for c in channels)
        ),
        guardian_name=guardian,
        name_review=review,
    )


def _settle_rejected_copies(cur: Any, spec: StreamSpec, kept: dict[str, tuple[int, RejectedRow]]) -> int:
    """A patient read twice in one paged read (edited in the PMS meanwhile), once valid and once
    rejected: the later copy is the one that counts. Drops the earlier staged row (returns how many)
    or the earlier rejection (from `kept`)."""
    if spec is not PATIENTS or not kept:
        return 0
    about: dict[str, int] = {}
    for page, row in kept.values():
        if row.identity is not None and row.identity.pms_patient_id:
            about[row.identity.pms_patient_id] = max(page, about.get(row.identity.pms_patient_id, -1))
    if not about:
        return 0
    stage = stage_table(spec)
    cur.execute(f"SELECT pms_patient_id, stage_page FROM {stage} WHERE pms_patient_id = ANY(%s)", (list(about),))
    dropped = 0
    for key, staged_page in cur.fetchall():
        if staged_page < about[key]:
            cur.execute(f"DELETE FROM {stage} WHERE pms_patient_id = %s", (key,))
            dropped += cur.rowcount
        elif staged_page > about[key]:
            for ref, (page, row) in list(kept.items()):
                if row.identity is not None and row.identity.pms_patient_id == key and page < staged_page:
                    del kept[ref]
    return dropped


class PatientsMixin(StoreBase):
    """Bulk, idempotent stream writes and the reads of what they wrote."""

    def write_patients(
        self,
        practice_id: str,
        source: str,
        result: ReadResult,
        run_id: str | None,
        *,
        full: bool = False,
        cursor_at: datetime | None = None,
        max_drop_share: float | None = None,
    ) -> WriteCounts:
        return self.write_stream(
            practice_id,
            PATIENTS,
            result.patients,
            result.rejected,
            source=source,
            source_ref=result.source_ref,
            run_id=run_id,
            full=full,
            cursor_at=cursor_at,
            max_drop_share=max_drop_share,
        )

    def write_stream(
        self,
        practice_id: str,
        spec: StreamSpec,
        records: Sequence[Any],
        rejected: Sequence[RejectedRow],
        *,
        source: str,
        source_ref: str = "",
        run_id: str | None,
        full: bool,
        cursor_at: datetime | None = None,
        max_drop_share: float | None = None,
        place_calls_at: datetime | None = None,
        left_out: Callable[[], Collection[tuple[str, str]]] | None = None,
    ) -> WriteCounts:
        """Merge one read of a stream, its rejections and its cursor in one transaction.

        With `place_calls_at` (an intraday read), the households of the patients read are placed on
        the call list again in the same transaction, so what the practice changed today (a booking,
        a death, an opt-out) is never written without its effect on the list.

        A full read replaces the stream's quarantine and reconciles (marks missing rows inactive);
        an incremental read replaces only the rejections of the rows it re-read. The cursor is
        committed with the data it covers, so a killed run re-reads from the old cursor.

        `left_out` gives the suppressions (kind, keyed hash) the caller left out of the read: if
        someone was erased since, `ErasedDuringRead` is raised and nothing is written.
        """
        refs = {r.pms_patient_id for r in records} if place_calls_at is not None else None
        return self._write_read(
            practice_id,
            spec,
            [(records, rejected)],
            source=source,
            source_ref=source_ref,
            run_id=run_id,
            full=full,
            cursor_at=cursor_at,
            max_drop_share=max_drop_share,
            place_calls=(refs, place_calls_at) if place_calls_at is not None else None,
            left_out=left_out,
        )

    def write_stream_pages(
        self,
        practice_id: str,
        spec: StreamSpec,
        pages: Iterable[tuple[Sequence[Any], Sequence[RejectedRow]]],
        *,
        source: str,
        source_ref: str | Callable[[], str] = "",
        run_id: str | None,
        full: bool,
        max_drop_share: float | None = None,
        snapshot: bool = False,
        left_out: Callable[[], Collection[tuple[str, str]]] | None = None,
        place_calls: tuple[set[str], datetime] | None = None,
    ) -> WriteCounts:
        """`write_stream` for a read that arrives page by page (`(records, rejected)` each): every page
        is `COPY`ed into the stage as it comes, so memory does not grow with the practice. One
        transaction still holds the whole read, its rejections and its cursor (the newest change
        stamp read), and a full read is judged by the volume check before anything is changed; a
        failure while paging (the PMS going away) rolls everything back.

        A record that comes back on a later page (edited in the PMS while the read paged through)
        counts once, as its later copy, whether that copy was valid or rejected; unless the read is a
        `snapshot` (a file): no record comes twice in it, so a repeat was rejected as a duplicate of
        its first row, which stands. `left_out` is called once the pages are read (a paged read can
        load the suppressions with its first page, inside this write's transaction); `place_calls`
        (PMS ids, now) places those patients' households on the call list in the same transaction."""
        return self._write_read(
            practice_id,
            spec,
            pages,
            source=source,
            source_ref=source_ref,
            run_id=run_id,
            full=full,
            cursor_at=None,
            max_drop_share=max_drop_share,
            stamp_cursor=True,
            snapshot=snapshot,
            left_out=left_out,
            place_calls=place_calls,
        )

    def _write_read(
        self,
        practice_id: str,
        spec: StreamSpec,
        pages: Iterable[tuple[Sequence[Any], Sequence[RejectedRow]]],
        *,
        source: str,
        source_ref: str | Callable[[], str],
        run_id: str | None,
        full: bool,
        cursor_at: datetime | None,
        max_drop_share: float | None,
        stamp_cursor: bool = False,
        place_calls: tuple[set[str] | None, datetime] | None = None,
        snapshot: bool = False,
        left_out: Callable[[], Collection[tuple[str, str]]] | None = None,
    ) -> WriteCounts:
        kept: dict[str, tuple[int, RejectedRow]] = {}  # by row_ref: a row re-read on a later page counts once
        newest: list[datetime] = []

        def records() -> Iterator[Sequence[Any]]:
            for page_no, (page_records, page_rejected) in enumerate(pages):
                for row in page_rejected:
                    kept.pop(row.row_ref, None)
                    kept[row.row_ref] = (page_no, row)
                if stamp_cursor:
                    stamp = next_cursor(getattr(r, "source_updated_at", None) for r in page_records)
                    if stamp is not None and (not newest or stamp > newest[0]):
                        newest[:] = [stamp]
                yield page_records

        with self.begin(practice_id) as conn:
            # No erasure of the practice until this commits; one already under way commits first.
            lock_erasures(conn, practice_id, shared=True)
            if place_calls is not None:
                # The call list's lock before any row, as erasure and every build take it: written
                # rows first, then the lock to place their households, could wait on an erasure that
                # holds the lock and waits for one of those rows.
                lock_list(conn, practice_id)
            with driver(conn).cursor() as cur:
                staged = stage_pages(cur, spec, records())
                if not snapshot:
                    staged -= _settle_rejected_copies(cur, spec, kept)
                if left_out is not None and frozenset(left_out()) != suppression_hashes(conn, practice_id):
                    raise ErasedDuringRead(
                        f"someone of practice {practice_id} was erased while its {spec.name} were being read; "
                        "nothing of the read was written"
                    )
                counts = merge_staged(cur, spec, practice_id, staged, full=full, max_drop_share=max_drop_share)
            rejected = [row for _page, row in kept.values()]
            if callable(source_ref):  # known once the pages have been read
                source_ref = source_ref()
            if stamp_cursor:
                cursor_at = newest[0] if newest else None
            stream_source = f"{source}:{spec.name}" if source else spec.name
            if full:
                conn.execute(
                    text("DELETE FROM rejected_rows WHERE practice_id = :p AND source = :s"),
                    {"p": practice_id, "s": stream_source},
                )
            elif rejected:
                conn.execute(
                    text("DELETE FROM rejected_rows WHERE practice_id = :p AND source = :s AND row_ref = ANY(:refs)"),
                    {"p": practice_id, "s": stream_source, "refs": [r.row_ref for r in rejected]},
                )
            if rejected:
                conn.execute(
                    text(
                        "INSERT INTO rejected_rows (practice_id, source, source_ref, row_ref, reason, raw, run_id) "
                        "VALUES (:p, :s, :ref, :row_ref, :reason, CAST(:raw AS jsonb), :run_id)"
                    ),
                    [
                        {
                            "p": practice_id,
                            "s": stream_source,
                            "ref": source_ref,
                            "row_ref": r.row_ref,
                            "reason": r.reason,
                            "raw": json.dumps(r.raw, default=json_default),
                            "run_id": run_id,
                        }
                        for r in rejected
                    ],
                )
            conn.execute(
                text(
                    "INSERT INTO sync_cursors (practice_id, stream, cursor_at, last_full_sync_at) "
                    "VALUES (:p, :stream, :cursor, CASE WHEN :full THEN now() END) "
                    "ON CONFLICT (practice_id, stream) DO UPDATE SET "
                    "cursor_at = COALESCE(EXCLUDED.cursor_at, sync_cursors.cursor_at), "
                    "last_full_sync_at = COALESCE(EXCLUDED.last_full_sync_at, sync_cursors.last_full_sync_at), "
                    "last_sync_at = now()"
                ),
                {"p": practice_id, "stream": spec.name, "cursor": cursor_at, "full": full},
            )
            conn.execute(text("UPDATE practices SET last_sync_at = now() WHERE practice_id = :p"), {"p": practice_id})
            if place_calls is not None:
                refs, place_calls_at = place_calls
                call_events.refresh_refs(conn, practice_id, refs or set(), place_calls_at)
            self.audit(
                conn,
                f"pipeline:{run_id}" if run_id else "pipeline",
                practice_id,
                f"sync_{spec.name}",
                run_id=run_id,
                detail={
                    "full": full,
                    "inserted": counts.inserted,
                    "updated": counts.updated,
                    "deactivated": counts.deactivated,
                    "rejected": len(rejected),
                },
            )
        self._analyze_after_bulk(spec.table, counts.inserted + counts.updated + counts.deactivated)
        return WriteCounts(counts.inserted, counts.updated, counts.unchanged, len(rejected), counts.deactivated)

    def stream_state(self, practice_id: str, stream: str) -> StreamState:
        with self.begin(practice_id) as conn:
            row = conn.execute(
                text("SELECT cursor_at, last_full_sync_at FROM sync_cursors WHERE practice_id = :p AND stream = :s"),
                {"p": practice_id, "s": stream},
            ).one_or_none()
        return StreamState(row.cursor_at, row.last_full_sync_at) if row else StreamState(None, None)

    def load_patients(self, practice_id: str) -> list[Patient]:
        """The practice's active patients, whole (for small practices, tests and one-off reads: a sync
        reads them a batch or a page at a time)."""
        with self.begin(practice_id) as conn, driver(conn).cursor() as cur:
            cur.execute(
                f"SELECT {PATIENT_COLUMNS} FROM patients WHERE practice_id = %(p)s AND active ORDER BY pms_patient_id",
                {"p": practice_id},
            )
            return [patient_from_tuple(practice_id, r) for r in cur]

    def load_clinical_records(
        self, practice_id: str, only: Collection[str] | None = None
    ) -> dict[str, list[ClinicalRecord]]:
        """Active clinical records by PMS patient id (only those patients' when `only` is given)."""
        out: dict[str, list[ClinicalRecord]] = {}
        where = ""
        params: dict[str, Any] = {"p": practice_id}
        if only is not None:
            where, params["only"] = " AND pms_patient_id = ANY(:only)", list(only)
        with self.begin(practice_id) as conn:
            rows = conn.execute(
                text(f"SELECT * FROM clinical_records WHERE practice_id = :p AND active{where} ORDER BY exam_date"),
                params,
            )
            for r in rows:
                out.setdefault(r.pms_patient_id, []).append(
                    ClinicalRecord(
                        practice_id=r.practice_id,
                        pms_record_id=r.pms_record_id,
                        pms_patient_id=r.pms_patient_id,
                        exam_date=r.exam_date,
                        record_type=r.record_type,
                        flags=list(r.flags),
                        unknown_flags=list(r.unknown_flags),
                        notes=r.notes,
                        iop_right_mmhg=float(r.iop_right_mmhg) if r.iop_right_mmhg is not None else None,
                        iop_left_mmhg=float(r.iop_left_mmhg) if r.iop_left_mmhg is not None else None,
                        clinician=r.clinician,
                        source_updated_at=r.source_updated_at,
                    )
                )
        return out

    def has_patient(self, practice_id: str, pms_patient_id: str) -> bool:
        """Whether the practice holds a patient (active or not) with this PMS id: one index look-up."""
        with self.begin(practice_id) as conn:
            return (
                conn.execute(
                    text("SELECT 1 FROM patients WHERE practice_id = :p AND pms_patient_id = :id"),
                    {"p": practice_id, "id": pms_patient_id},
                ).first()
                is not None
            )

    def last_successful_sync(self, practice_id: str, stream: str = "patients") -> datetime | None:
        with self.begin(practice_id) as conn:
            return conn.execute(
                text("SELECT last_sync_at FROM sync_cursors WHERE practice_id = :p AND stream = :s"),
                {"p": practice_id, "s": stream},
            ).scalar_one_or_none()
