"""The audit log: appended inside the transaction of the access it records, so both commit or neither."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, text

from nvc_pipelines.store.base import StoreBase, json_default


class AuditMixin(StoreBase):
    """Writing and reading the audit log."""

    @staticmethod
    def audit(
        conn: Connection,
        actor: str,
        practice_id: str,
        action: str,
        record_refs: Sequence[str] = (),
        run_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append to the audit log inside the caller's transaction (so it commits with the access)."""
        conn.execute(
            text(
                "INSERT INTO audit_log (actor, practice_id, action, record_refs, run_id, detail) "
                "VALUES (:actor, :p, :action, :refs, :run, CAST(:detail AS jsonb))"
            ),
            {
                "actor": actor,
                "p": practice_id,
                "action": action,
                "refs": list(record_refs),
                "run": run_id,
                "detail": json.dumps(detail or {}, default=json_default),
            },
        )

    def record_access(
        self,
        practice_id: str,
        actor: str,
        action: str,
        record_refs: Sequence[str] = (),
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Record, in a transaction of its own, an access made through other methods (an export)."""
        with self.begin(practice_id) as conn:
            self.audit(conn, actor, practice_id, action, record_refs, detail=detail)

    def audit_entries(self, practice_id: str, limit: int = 200) -> list[dict[str, Any]]:
        with self.begin(practice_id) as conn:
            rows = conn.execute(
                text("SELECT * FROM audit_log WHERE practice_id = :p ORDER BY audit_id DESC LIMIT :n"),
                {"p": practice_id, "n": limit},
            ).mappings()
            return [dict(r) for r in rows]
