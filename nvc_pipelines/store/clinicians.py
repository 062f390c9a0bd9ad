"""Clinicians a practice's PMS lists, with the GOC register's answer for each (`clinicians`, migration 0016).

What a check means and when it is asked again is `nvc_pipelines.goc`'s; here it is kept per practice.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import text

from nvc_pipelines.store.base import StoreBase

_COLUMNS = (
    "pms_clinician_ref, name, role, goc_number, state, registrant_type, register_name, reason, checked_at, listed"
)


class CliniciansMixin(StoreBase):
    """Saving and loading the clinicians' registration checks."""

    def save_clinicians(self, practice_id: str, checks: Iterable[dict[str, Any]], *, full_list: bool = True) -> None:
        """Record the checks (rows of `goc.ClinicianCheck`'s fields); with `full_list`, clinicians the
        PMS no longer lists are kept but marked unlisted."""
        rows = list(checks)
        with self.begin(practice_id) as conn:
            if full_list:
                conn.execute(
                    text("UPDATE clinicians SET listed = false, updated_at = now() WHERE practice_id = :p"),
                    {"p": practice_id},
                )
            for c in rows:
                conn.execute(
                    text(
                        f"INSERT INTO clinicians (practice_id, {_COLUMNS}) VALUES (:p, :ref, :name, :role, :goc, "
                        ":state, :rtype, :rname, :reason, :checked, true) "
                        "ON CONFLICT (practice_id, pms_clinician_ref) DO UPDATE "
                        "SET name = EXCLUDED.name, role = EXCLUDED.role, goc_number = EXCLUDED.goc_number, "
                        "state = EXCLUDED.state, registrant_type = EXCLUDED.registrant_type, "
                        "register_name = EXCLUDED.register_name, reason = EXCLUDED.reason, "
                        "checked_at = COALESCE(EXCLUDED.checked_at, clinicians.checked_at), "
                        "listed = clinicians.listed OR EXCLUDED.listed, updated_at = now()"
                    ),
                    {
                        "p": practice_id,
                        "ref": c["pms_clinician_ref"],
                        "name": c["name"],
                        "role": c["role"],
                        "goc": c["goc_number"],
                        "state": str(c["state"]),
                        "rtype": c["registrant_type"],
                        "rname": c["register_name"],
                        "reason": c["reason"],
                        "checked": c["checked_at"],
                    },
                )

    def load_clinicians(self, practice_id: str, *, listed_only: bool = False) -> list[dict[str, Any]]:
        """The practice's clinicians' rows (only those the PMS still lists, when asked), by reference."""
        with self.begin(practice_id) as conn:
            rows = conn.execute(
                text(
                    f"SELECT {_COLUMNS} FROM clinicians WHERE practice_id = :p "
                    + ("AND listed " if listed_only else "")
                    + "ORDER BY pms_clinician_ref"
                ),
                {"p": practice_id},
            ).mappings()
            return [dict(r) for r in rows]
