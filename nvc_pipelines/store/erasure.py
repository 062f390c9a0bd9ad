"""Erasure: a patient's rows deleted in one transaction, and the keyed hashes that keep them out.

Which hashes identify an erased person (and the key) is `nvc_pipelines.erasure`'s; the store only
keeps them (`suppressions`: no personal data) and deletes what it holds about the patient.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, text

from nvc_pipelines.store.base import PracticeNotFound, StoreBase
from nvc_pipelines.store.calls import lock_list
from nvc_pipelines.store.recalls import lock_recalls

# Every table that names a patient, and how (by NVC's patient id or by the PMS's).
_PATIENT_ROWS = (
    ("call_list", "patient_id = :id"),
    ("recalls", "patient_id = :id"),
    ("appointments", "pms_patient_id = :ref"),
    ("clinical_records", "pms_patient_id = :ref"),
    ("outbox", "pms_patient_id = :ref"),
    ("contact_suppressions", "pms_patient_id = :ref"),
    ("call_events", "pms_patient_id = :ref"),
    ("patient_merges", "keep_patient_id = :id OR merged_patient_id = :id"),
    # After the clinical records: a clinical merge that changed one of theirs queues them without
    # touching the patient row, so it does not wait for this erasure's lock on it; deleting their
    # records waits for that merge to commit, and this delete, later, then sees its queued row.
    ("recall_due", "pms_patient_id = :ref"),
)


class ErasedDuringRead(RuntimeError):
    """Someone of the practice was erased between a read's look at who is erased and its write:
    nothing of the read was written (it may hold them). Leave them out with the suppressions as they
    are now and write again."""


class PatientErased(LookupError):
    """A write about a patient erased from the practice: refused, nothing of theirs recorded."""


def lock_erasures(
    conn: Connection, practice_id: str, *, shared: bool, on_wait: Callable[[], None] | None = None
) -> None:
    """Until this transaction ends: shared, no erasure of the practice starts (a stream write holds
    it, from before it reads who is erased until it commits); exclusive, no stream write is under
    way (erasure holds it, before any other lock). So a sync that read an erased person before their
    erasure commits first and its rows are deleted with the rest, and one that starts after it sees
    their suppression: it can never write them back after the erasure. `on_wait` is called once
    when the lock is held elsewhere, before waiting for it."""
    lock = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    # Two keys (this lock's name, the practice), as `lock_list`: apart from single-key locks.
    keys, params = "hashtext('nvc.erasure'), hashtext(:p)", {"p": practice_id}
    if on_wait is not None:
        attempt = lock.replace("pg_advisory_xact_lock", "pg_try_advisory_xact_lock")
        if conn.execute(text(f"SELECT {attempt}({keys})"), params).scalar_one():
            return
        on_wait()
    conn.execute(text(f"SELECT {lock}({keys})"), params)


def suppression_hashes(conn: Connection, practice_id: str) -> frozenset[tuple[str, str]]:
    """(kind, keyed hash) of everyone erased from the practice, as this transaction sees them."""
    rows = conn.execute(text("SELECT kind, value_hash FROM suppressions WHERE practice_id = :p"), {"p": practice_id})
    return frozenset((r.kind, r.value_hash) for r in rows)


class ErasureMixin(StoreBase):
    """Suppressions (the erased) and erasing a patient."""

    def suppression_hashes(self, practice_id: str) -> list[tuple[str, str]]:
        """(kind, keyed hash) of everyone erased from the practice."""
        with self.begin(practice_id) as conn:
            return sorted(suppression_hashes(conn, practice_id))

    def erase_patient_rows(
        self,
        practice_id: str,
        patient_ref: str,
        actor: str,
        hashes: Callable[[str, str | None, str | None, list[str]], list[tuple[str, str]]],
        on_wait: Callable[[], None] | None = None,
    ) -> dict[str, int]:
        """Delete one patient (PMS id or NVC patient id) and every row naming them, and record
        `hashes(pms_patient_id, first_name, last_name, phones)` (kind, hash; the PMS id's first, its
        prefix is the audit's reference) as suppressions, in one transaction; returns the rows removed
        by table. `on_wait` is called if a sync of the practice is writing: the erasure waits for it."""
        with self.begin(practice_id) as conn:
            # No stream write of the practice under way, and none starts until this commits: one
            # that read her before now commits first (its rows of her are deleted below), one after
            # reads her suppression (`lock_erasures`). Before every other lock, as writes take it.
            lock_erasures(conn, practice_id, shared=False, on_wait=on_wait)
            # The recalls' and the call list's locks next, as their writers take them: a write that
            # read this patient before commits first, then their rows are deleted below (neither
            # table checks a key, migration 0022); locking the patient first could deadlock with a
            # list build. The recalls' lock before the list's: a sync holding queued patients'
            # `recall_due` rows takes the list's lock to place calls, and a recall write holding the
            # recalls' lock waits on those rows, so taken the other way round the three could wait
            # on each other. Nothing that holds the list's lock waits for the recalls'.
            lock_recalls(conn, practice_id)
            lock_list(conn, practice_id)
            row = conn.execute(
                text(
                    "SELECT patient_id, pms_patient_id, phones, first_name, last_name FROM patients "
                    "WHERE practice_id = :p AND (pms_patient_id = :ref OR patient_id::text = :ref) FOR UPDATE"
                ),
                {"p": practice_id, "ref": patient_ref},
            ).one_or_none()
            if row is None:
                raise PracticeNotFound(f"practice {practice_id} has no patient {patient_ref!r}")
            pid, ref, phones = row.patient_id, row.pms_patient_id, list(row.phones)
            scope = {"p": practice_id, "ref": ref, "id": pid}
            removed: dict[str, int] = {}
            for table, where in _PATIENT_ROWS:
                removed[table] = conn.execute(
                    text(f"DELETE FROM {table} WHERE practice_id = :p AND ({where})"), scope
                ).rowcount
            # A quarantined row holds a number as its source typed it ("07700 900123", "(07700) 900-123",
            # "+44 7700 900123", a non-breaking space): compared by its national number, which every way
            # of writing it contains, in the raw values with everything but digits taken out, as
            # `normalise.normalise_phone` reads a number. Quotes and commas stay, so digits of two
            # different values never run together.
            removed["rejected_rows"] = conn.execute(
                text(
                    "DELETE FROM rejected_rows WHERE practice_id = :p AND (row_ref LIKE '%' || :ref || '%' "
                    "OR EXISTS (SELECT 1 FROM unnest(CAST(:needles AS text[])) n "
                    "WHERE regexp_replace(raw::text, '[^0-9\",]', '', 'g') LIKE '%' || n || '%'))"
                ),
                {**scope, "needles": [p.removeprefix("+44") for p in phones]},
            ).rowcount
            conn.execute(text("UPDATE patients SET merged_into = NULL WHERE merged_into = :id"), scope)
            removed["patients"] = conn.execute(text("DELETE FROM patients WHERE patient_id = :id"), scope).rowcount
            digests = hashes(ref, row.first_name, row.last_name, phones)
            for kind, digest in digests:
                conn.execute(
                    text(
                        "INSERT INTO suppressions (practice_id, kind, value_hash) VALUES (:p, :k, :h) "
                        "ON CONFLICT DO NOTHING"
                    ),
                    {"p": practice_id, "k": kind, "h": digest},
                )
            self.audit(conn, actor, practice_id, "erase", [digests[0][1][:16]], detail=removed)
        return removed
