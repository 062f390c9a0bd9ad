"""Matching, duplicates and merges: a merge is reversible and nothing is deleted."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, text

from nvc_pipelines.matching import DERIVED_PREFIX, DuplicatePair, find_duplicates, resolve_derived_identities
from nvc_pipelines.model import Patient, ReadResult, RejectedRow
from nvc_pipelines.store.base import PracticeNotFound, StoreBase


class MergesMixin(StoreBase):
    """Derived identities, duplicate pairs, merging and undoing a merge."""

    def remap_derived_identities(self, practice_id: str, result: ReadResult) -> int:
        """Give id-less incoming rows the identity of the stored patient they match (phone plus name
        or date of birth); a row that then repeats an identity is rejected as a duplicate."""
        if not any(p.pms_patient_id.startswith(DERIVED_PREFIX) for p in result.patients):
            return 0
        mapping = resolve_derived_identities(result.patients, self.load_patients(practice_id, include_merged=True))
        if not mapping:
            return 0
        kept: list[Patient] = []
        seen: set[str] = set()
        for p in result.patients:
            p.pms_patient_id = mapping.get(p.pms_patient_id, p.pms_patient_id)
            if p.pms_patient_id in seen:
                result.rejected.append(RejectedRow(p.pms_patient_id, "duplicate of another row (same patient)", {}))
                continue
            seen.add(p.pms_patient_id)
            kept.append(p)
        result.patients[:] = kept
        return len(mapping)

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
            conn.execute(
                text("UPDATE patient_merges SET undone_at = now(), undone_by = :a WHERE merge_id = :id"),
                {"a": actor, "id": merge_id},
            )
            self.audit(
                conn, actor, practice_id, "unmerge", [row.keep_ref, row.merged_ref], detail={"merge_id": merge_id}
            )
