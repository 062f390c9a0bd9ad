"""Matching, duplicates and merges: a merge is reversible and nothing is deleted."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

from sqlalchemy import Connection, text

from nvc_pipelines.matching import DuplicatePair, find_duplicates, resolve_derived_identities
from nvc_pipelines.model import DERIVED_PREFIX, Patient, ReadResult, RejectedRow
from nvc_pipelines.store.base import PracticeNotFound, StoreBase
from nvc_pipelines.store.patients import PATIENT_COLUMNS, patient_from_tuple

# The practice's stored numbers, each with the patient (or merged-away record) on it: built once per
# read in the matcher's own transaction, so each page finds its candidates by number through an index
# instead of the read loading every stored patient.
_KNOWN_PHONES = [
    "CREATE TEMP TABLE known_phones ON COMMIT DROP AS SELECT ph AS phone, patient_id FROM patients "
    "CROSS JOIN LATERAL unnest(phones) ph WHERE practice_id = :p AND (active OR merged_into IS NOT NULL)",
    "CREATE INDEX ON known_phones (phone)",
    "ANALYZE known_phones",
]
_CANDIDATES = (
    f"SELECT {PATIENT_COLUMNS} FROM patients WHERE practice_id = :p "
    "AND patient_id IN (SELECT patient_id FROM known_phones WHERE phone = ANY(:phones))"
)


class MergesMixin(StoreBase):
    """Derived identities, duplicate pairs, merging and undoing a merge."""

    @contextmanager
    def derived_identities(self, practice_id: str) -> Iterator[Callable[[ReadResult], int]]:
        """For a read, page by page: `remap(page)` gives the page's id-less rows the identity of the
        stored patient each matches (phone plus name or date of birth; returns how many). Only the
        stored patients on a page's numbers are read, through a table of the practice's numbers made
        when the first id-less row comes. Two of the read's records that end on one identity (a row
        matched onto a patient the read also has under its own id, or two rows matched onto one) are
        a duplicate: the later is rejected, kept with its own row and naming the first's. One record
        read again on a later page (edited while the PMS paged) is not: its later copy counts, as the
        write's rule has it."""
        claimed: dict[str, str] = {}  # identity -> the id, before matching, of the record that has it
        first_rows: dict[str, str] = {}  # identity -> its record's row reference, for rows without a PMS id
        with ExitStack() as held:
            conn: Connection | None = None

            def remap(result: ReadResult) -> int:
                nonlocal conn
                derived = [p for p in result.patients if p.pms_patient_id.startswith(DERIVED_PREFIX)]
                mapping: dict[str, str] = {}
                if derived:
                    if conn is None:
                        conn = held.enter_context(self.begin(practice_id))
                        for statement in _KNOWN_PHONES:
                            conn.execute(text(statement), {"p": practice_id})
                    phones = sorted({phone.e164 for p in derived for phone in p.phones})
                    rows = conn.execute(text(_CANDIDATES), {"p": practice_id, "phones": phones})
                    mapping = resolve_derived_identities(derived, [patient_from_tuple(practice_id, r) for r in rows])
                kept: list[Patient] = []
                for p in result.patients:
                    own = p.pms_patient_id
                    p.pms_patient_id = mapping.get(own, own)
                    row_ref, raw = result.origins.get(own, (own, {}))
                    if claimed.setdefault(p.pms_patient_id, own) != own:
                        # No identity: the write would take a rejection naming the kept record's id
                        # for that record's later copy (`_settle_rejected_copies`) and unstage it.
                        first = first_rows.get(p.pms_patient_id, "another row")
                        result.rejected.append(RejectedRow(row_ref, f"duplicate of {first} (same patient)", raw))
                        continue
                    if own in result.origins:
                        first_rows.setdefault(p.pms_patient_id, row_ref)
                    kept.append(p)
                result.patients[:] = kept
                return len(mapping)

            yield remap

    def duplicates(self, practice_id: str) -> list[DuplicatePair]:
        return find_duplicates(self.load_patients(practice_id))

    def _patient_ids(self, conn: Connection, practice_id: str, refs: Sequence[str]) -> list[int]:
        rows: dict[str, int] = dict(
            conn.execute(
                text(
                    "SELECT pms_patient_id, patient_id FROM patients "
                    "WHERE practice_id = :p AND pms_patient_id = ANY(:refs) FOR UPDATE"
                ),
                {"p": practice_id, "refs": list(refs)},
            ).all()
        )
        missing = [r for r in refs if r not in rows]
        if missing:
            raise PracticeNotFound(f"practice {practice_id} has no patient {', '.join(missing)}")
        return [rows[r] for r in refs]

    def merge_patients(self, practice_id: str, keep: str, merged: str, actor: str) -> int:
        """Merge `merged` into `keep`: the merged record goes inactive and points at `keep`, which then
        carries its phones and appointments too; nothing is deleted, and `undo_merge` reverses it."""
        if keep == merged:
            raise ValueError("a patient cannot be merged into itself")
        with self.begin(practice_id) as conn:
            keep_id, merged_id = self._patient_ids(conn, practice_id, [keep, merged])
            state = conn.execute(
                text("SELECT patient_id, merged_into, active FROM patients WHERE patient_id = ANY(:ids)"),
                {"ids": [keep_id, merged_id]},
            ).all()
            if any(r.merged_into is not None for r in state):
                raise ValueError("one of these patients is already merged; undo that merge first")
            conn.execute(
                text(
                    "UPDATE patients SET merged_into = :k, active = false, updated_at = now(), "
                    "change_seq = change_seq + 1 WHERE patient_id = :m"
                ),
                {"k": keep_id, "m": merged_id},
            )
            conn.execute(
                text("UPDATE patients SET merged_into = :k WHERE merged_into = :m"), {"k": keep_id, "m": merged_id}
            )
            merge_id: int = conn.execute(
                text(
                    "INSERT INTO patient_merges (practice_id, keep_patient_id, merged_patient_id, merged_by) "
                    "VALUES (:p, :k, :m, :actor) RETURNING merge_id"
                ),
                {"p": practice_id, "k": keep_id, "m": merged_id, "actor": actor},
            ).scalar_one()
            self.audit(conn, actor, practice_id, "merge", [keep, merged], detail={"merge_id": merge_id})
        return merge_id

    def undo_merge(self, practice_id: str, merge_id: int, actor: str) -> None:
        with self.begin(practice_id) as conn:
            row = conn.execute(
                text(
                    "SELECT m.*, k.pms_patient_id AS keep_ref, o.pms_patient_id AS merged_ref FROM patient_merges m "
                    "JOIN patients k ON k.patient_id = m.keep_patient_id "
                    "JOIN patients o ON o.patient_id = m.merged_patient_id "
                    "WHERE m.merge_id = :id AND m.practice_id = :p FOR UPDATE OF m"
                ),
                {"id": merge_id, "p": practice_id},
            ).one_or_none()
            if row is None:
                raise PracticeNotFound(f"practice {practice_id} has no merge {merge_id}")
            if row.undone_at is not None:
                raise ValueError(f"merge {merge_id} was already undone")
            conn.execute(
                text(
                    "UPDATE patients SET merged_into = NULL, active = true, updated_at = now(), "
                    "change_seq = change_seq + 1 WHERE patient_id = :m"
                ),
                {"m": row.merged_patient_id},
            )
            # The kept patient changed too (it no longer carries the record's numbers, bookings and
            # calls): stamped, so the nightly's changed-only call list places it again.
            conn.execute(
                text("UPDATE patients SET updated_at = now() WHERE patient_id = :k"), {"k": row.keep_patient_id}
            )
            conn.execute(
                text("UPDATE patient_merges SET undone_at = now(), undone_by = :a WHERE merge_id = :id"),
                {"a": actor, "id": merge_id},
            )
            self.audit(
                conn, actor, practice_id, "unmerge", [row.keep_ref, row.merged_ref], detail={"merge_id": merge_id}
            )
