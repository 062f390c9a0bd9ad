"""Bulk, idempotent merging of one stream (patients, appointments, clinical records) into the store.

Rows are `COPY`ed into a temporary staging table shaped like the target, then merged with one
`INSERT ... ON CONFLICT DO UPDATE ... WHERE content changed`, so unchanged rows are not touched
and the counts say exactly what a sync did. "Changed" is the staged row's columns compared with the
stored row's in the database (`IS DISTINCT FROM`, null-safe, instants as instants), not a hash
Python computes per row. A full read also reconciles: rows the source no longer
has are marked inactive (never deleted), unless that would drop more than the allowed share of the
practice's active rows, which is refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from nvc_pipelines.model import Appointment, ClinicalRecord, Patient
from nvc_pipelines.store.db import copy_rows, rows_differ


class VolumeDropRefused(RuntimeError):
    """A full read would deactivate too many rows: most likely a broken extract, not real deletions."""


@dataclass(frozen=True, slots=True)
class StreamSpec:
    name: str
    table: str
    key: str
    columns: tuple[str, ...]  # practice_id and key first
    values: Callable[[Any], tuple[Any, ...]]
    # What `active` becomes when the source sends a row again (a merged patient stays merged).
    reactivate: str = "true"
    # Extra `SET` for a row that changes or is deactivated (patients bump their recall input).
    on_change: str = ""
    # A stream that feeds recalls by patient (clinical records): the merge queues the changed rows'
    # patients in `recall_due`, so their recalls are recomputed.
    patient_ref: str | None = None
    # Trailing columns derived from the others (not compared: adding one does not rewrite every row).
    derived: int = 0

    @property
    def compared(self) -> tuple[str, ...]:
        """The columns whose change makes a row changed (the key and practice are the join)."""
        return self.columns[2 : len(self.columns) - self.derived]


@dataclass(frozen=True, slots=True)
class MergeCounts:
    inserted: int
    updated: int
    unchanged: int
    deactivated: int


def _patient_values(p: Patient) -> tuple[Any, ...]:
    return (
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
        str(p.status),
        p.status_date,
        p.contact.phone_recall,
        p.contact.no_recall,
        None if p.contact.channels is None else sorted(str(c) for c in p.contact.channels),
        p.guardian_name,
        p.name_review,
    )


def _appointment_values(a: Appointment) -> tuple[Any, ...]:
    return (
        a.practice_id,
        a.pms_appointment_id,
        a.pms_patient_id,
        a.starts_at,
        a.ends_at,
        str(a.status),
        a.appointment_type,
        a.clinician,
        a.notes,
        a.nvc_reference,
        a.source_updated_at,
    )


def _numeric(value: float | Decimal | int | None) -> Decimal | None:
    """A number as the decimal it prints as: the binary `COPY` writes a numeric column from a Decimal
    (the text `COPY` sent `repr(value)` for a float, which this keeps)."""
    if value is None:
        return None
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def _clinical_values(c: ClinicalRecord) -> tuple[Any, ...]:
    return (
        c.practice_id,
        c.pms_record_id,
        c.pms_patient_id,
        c.exam_date,
        c.record_type,
        sorted(c.flags),
        list(c.unknown_flags),
        c.notes,
        _numeric(c.iop_right_mmhg),
        _numeric(c.iop_left_mmhg),
        c.clinician,
        c.source_updated_at,
    )


PATIENTS = StreamSpec(
    "patients",
    "patients",
    "pms_patient_id",
    (
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
        "pms_status",
        "status_date",
        "phone_recall",
        "no_recall",
        "contact_channels",
        "guardian_name",
        "name_review",
    ),
    _patient_values,
    reactivate="patients.merged_into IS NULL",
    derived=1,  # name_review follows from the names
    on_change="change_seq = patients.change_seq + 1",
)
APPOINTMENTS = StreamSpec(
    "appointments",
    "appointments",
    "pms_appointment_id",
    (
        "practice_id",
        "pms_appointment_id",
        "pms_patient_id",
        "starts_at",
        "ends_at",
        "status",
        "appointment_type",
        "clinician",
        "notes",
        "nvc_reference",
        "source_updated_at",
    ),
    _appointment_values,
)
CLINICAL_RECORDS = StreamSpec(
    "clinical_records",
    "clinical_records",
    "pms_record_id",
    (
        "practice_id",
        "pms_record_id",
        "pms_patient_id",
        "exam_date",
        "record_type",
        "flags",
        "unknown_flags",
        "notes",
        "iop_right_mmhg",
        "iop_left_mmhg",
        "clinician",
        "source_updated_at",
    ),
    _clinical_values,
    patient_ref="pms_patient_id",
)


def merge_stream(
    cur: Any,  # a psycopg 3 cursor inside the caller's transaction
    spec: StreamSpec,
    practice_id: str,
    records: Iterable[Any],
    *,
    full: bool,
    max_drop_share: float | None,
) -> MergeCounts:
    """Stage `records` (one read, whole) and merge them: `stage_pages` then `merge_staged`."""
    staged = stage_pages(cur, spec, [records])
    return merge_staged(cur, spec, practice_id, staged, full=full, max_drop_share=max_drop_share)


def stage_table(spec: StreamSpec) -> str:
    return f"stage_{spec.table}"


def stage_pages(cur: Any, spec: StreamSpec, pages: Iterable[Iterable[Any]]) -> int:
    """`COPY` a read into a temporary staging table page by page, as the pages arrive (one `COPY`
    for the whole read, so nothing but the page at hand is held in memory); returns the rows staged.

    Each row carries its page number: a record edited in the PMS while the read pages through comes
    back on a later page, newer, and the later copy replaces the earlier one (`stage_page`). The
    stage is indexed and analysed before anything reads it."""
    cols = ", ".join(spec.columns)
    stage = stage_table(spec)
    cur.execute(f"CREATE TEMP TABLE {stage} ON COMMIT DROP AS SELECT {cols} FROM {spec.table} WITH NO DATA")
    cur.execute(f"ALTER TABLE {stage} ADD COLUMN stage_page integer NOT NULL")
    values_of = spec.values
    staged = copy_rows(
        cur,
        stage,
        (*spec.columns, "stage_page"),
        ((*values_of(record), page_no) for page_no, page in enumerate(pages) for record in page),
    )
    # A temp table has no index and no statistics: without them the anti-joins below run as nested
    # loops over the stage, once per stored row (a 200,000-row re-sync took minutes, not seconds).
    cur.execute(f"CREATE INDEX ON {stage} ({spec.key}, stage_page)")
    cur.execute(f"ANALYZE {stage}")
    # The same record on two pages: the later page's copy wins.
    cur.execute(
        f"DELETE FROM {stage} s USING {stage} s2 WHERE s2.{spec.key} = s.{spec.key} "
        f"AND (s2.stage_page, s2.ctid) > (s.stage_page, s.ctid)"
    )
    return staged - int(cur.rowcount)


def merge_staged(
    cur: Any,
    spec: StreamSpec,
    practice_id: str,
    staged: int,
    *,
    full: bool,
    max_drop_share: float | None,
) -> MergeCounts:
    """Merge the staged read (`stage_pages`) into the stream's table.

    Only rows whose compared columns or `active` differ from the stored row's are sent to the
    `INSERT ... ON CONFLICT` (compared in one join before it), so an unchanged row is neither
    updated nor locked. A full read first refuses a drop above `max_drop_share`, then marks the
    rows it no longer has inactive."""
    columns = spec.columns
    cols = ", ".join(columns)
    stage = stage_table(spec)

    deactivated = 0
    if full:
        cur.execute(
            f"SELECT count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.{spec.key} = t.{spec.key})), "
            f"count(*) FROM {spec.table} t WHERE t.practice_id = %s AND t.active",
            (practice_id,),
        )
        gone, active = cur.fetchone()
        if max_drop_share is not None and active and gone > max_drop_share * active:
            raise VolumeDropRefused(
                f"the full read of {spec.name} has {staged} rows but the store has {active} active: "
                f"{gone} ({gone / active:.0%}) would be marked inactive, above the {max_drop_share:.0%} allowed. "
                "Nothing was changed. Check the PMS export/API; if the practice really removed them, "
                "re-run with the tag nvc/allow_drop=true"
            )

    def counted(change: str, params: tuple[Any, ...], *, moved: bool = False) -> tuple[int, int]:
        """Run `change` (a data-modifying statement returning `inserted` and `ref`) and count its rows
        in the database: (inserted, all). With `patient_ref`, the changed rows' patients are queued
        for a recall recomputation (`recall_due`, migration 0021) in the same statement, and with
        `moved` the patients a changed row is taken from too (a record the practice moved to another
        patient changes both recalls; the statement's snapshot still holds the old owner, and an
        inactive stored copy fed no recall). The refs never come back to Python (a first sync's would
        be every patient, held only to be sent back)."""
        queue = ""
        if spec.patient_ref:
            refs = "SELECT ref FROM changed WHERE ref IS NOT NULL"
            if moved:  # the changed rows' stored copies, as the statement's snapshot still holds them
                refs += (
                    f" UNION ALL SELECT t.{spec.patient_ref} FROM changed c JOIN {spec.table} t "
                    f"ON t.practice_id = %s AND t.{spec.key} = c.key "
                    f"WHERE t.active AND t.{spec.patient_ref} IS DISTINCT FROM c.ref"
                )
            queue = (
                ", queued AS (INSERT INTO recall_due (practice_id, pms_patient_id, seq) "
                "SELECT p.practice_id, p.pms_patient_id, nextval('recall_due_seq') FROM patients p "
                f"WHERE p.practice_id = %s AND p.pms_patient_id IN ({refs}) "
                "ON CONFLICT (practice_id, pms_patient_id) DO UPDATE SET seq = EXCLUDED.seq)"
            )
            params = (*params, practice_id, practice_id) if moved else (*params, practice_id)
        cur.execute(
            f"WITH changed AS ({change}){queue} SELECT count(*) FILTER (WHERE inserted), count(*) FROM changed",
            params,
        )
        counts = cur.fetchone()
        return int(counts[0]), int(counts[1])

    ref = f"t.{spec.patient_ref}" if spec.patient_ref else "NULL"
    bump = f", {spec.on_change.replace(f'{spec.table}.', 't.')}" if spec.on_change else ""
    if full:
        _, deactivated = counted(
            f"UPDATE {spec.table} t SET active = false, updated_at = now(){bump} WHERE t.practice_id = %s "
            f"AND t.active AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.{spec.key} = t.{spec.key}) "
            f"RETURNING false AS inserted, {ref} AS ref",
            (practice_id,),
        )

    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns[2:])
    returned_ref = f"{spec.table}.{spec.patient_ref}" if spec.patient_ref else "NULL"
    selected = ", ".join(f"s.{c}" for c in columns)

    # The stored row, compared before the insert: plain equality on the key (indexable under RLS).
    stored_active = spec.reactivate.replace(f"{spec.table}.", "t.")
    inserted, merged = counted(
        f"INSERT INTO {spec.table} ({cols}) SELECT {selected} FROM {stage} s "
        f"LEFT JOIN {spec.table} t ON t.practice_id = %s AND t.{spec.key} = s.{spec.key} "
        f"WHERE t.{spec.key} IS NULL OR {rows_differ(spec.compared, 't', 's')} "
        f"OR t.active IS DISTINCT FROM ({stored_active}) "
        f"ON CONFLICT (practice_id, {spec.key}) DO UPDATE SET {updates}, active = {spec.reactivate}, "
        f"updated_at = now(){', ' + spec.on_change if spec.on_change else ''} "
        f"WHERE {rows_differ(spec.compared, spec.table, 'EXCLUDED')} "
        f"OR {spec.table}.active IS DISTINCT FROM ({spec.reactivate}) "
        f"RETURNING (xmax = 0) AS inserted, {returned_ref} AS ref, {spec.table}.{spec.key} AS key",
        (practice_id,),
        moved=bool(spec.patient_ref),
    )
    return MergeCounts(inserted, merged - inserted, staged - merged, deactivated)
