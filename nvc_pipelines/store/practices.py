"""The practice registry: practices, their settings, encrypted credentials and status, and groups."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from nvc_pipelines.crypto import decrypt_credentials, encrypt_credentials
from nvc_pipelines.model import PmsKind, Practice
from nvc_pipelines.store.base import PracticeExists, PracticeNotFound, StoreBase


class PracticesMixin(StoreBase):
    """Registering, reading and grouping practices (writes go through the owner's login)."""

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
            with self.begin_owner() as conn:
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
        with self.begin(practice_id) as conn:
            row = conn.execute(
                text("SELECT * FROM practices WHERE practice_id = :id"), {"id": practice_id}
            ).one_or_none()
        if row is None:
            raise PracticeNotFound.unregistered(practice_id)
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
        with self.begin(practice_id) as conn:
            blob = conn.execute(
                text("SELECT credentials FROM practices WHERE practice_id = :id"), {"id": practice_id}
            ).scalar_one_or_none()
        return decrypt_credentials(practice_id, blob)

    def list_practices(self) -> list[dict[str, Any]]:
        """The registry with per-practice counts, through the view made for the application's reads
        across practices (no settings, no credentials)."""
        with self.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT practice_id, display_name, pms_kind, status, group_id, connected_at, last_sync_at, patients "
                    "FROM practice_registry ORDER BY practice_id"
                )
            ).mappings()
            return [dict(r) for r in rows]

    def practice_states(self) -> list[dict[str, Any]]:
        """Each practice's id, status and last successful sync, without the patient counts of
        `list_practices` (which count every practice's patients): for the health sensor's ticks."""
        with self.begin() as conn:
            rows = conn.execute(
                text("SELECT practice_id, status, last_sync_at FROM practice_registry ORDER BY practice_id")
            ).mappings()
            return [dict(r) for r in rows]

    def set_status(self, practice_id: str, status: str) -> None:
        with self.begin_owner() as conn:
            n = conn.execute(
                text("UPDATE practices SET status = :s WHERE practice_id = :id"),
                {"s": status, "id": practice_id},
            ).rowcount
        if not n:
            raise PracticeNotFound.unregistered(practice_id)

    def connected_practices(self) -> list[Practice]:
        return [self.get_practice(r["practice_id"]) for r in self.list_practices() if r["status"] == "connected"]

    def add_group(self, group_id: str, display_name: str) -> None:
        try:
            with self.begin_owner() as conn:
                conn.execute(
                    text(
                        "INSERT INTO practice_groups (group_id, display_name) VALUES (:g, :n) "
                        "ON CONFLICT (group_id) DO UPDATE SET display_name = EXCLUDED.display_name"
                    ),
                    {"g": group_id, "n": display_name},
                )
        except IntegrityError:
            raise ValueError(
                f"group id {group_id!r} is not allowed: use 1-63 lower-case letters, digits, '-' or '_'"
            ) from None

    def set_group(self, practice_id: str, group_id: str | None) -> None:
        with self.begin_owner() as conn:
            if (
                group_id is not None
                and not conn.execute(text("SELECT 1 FROM practice_groups WHERE group_id = :g"), {"g": group_id}).first()
            ):
                raise PracticeNotFound(f"no group {group_id!r}: create it with `nvc group create`")
            if not conn.execute(
                text("UPDATE practices SET group_id = :g WHERE practice_id = :p"), {"g": group_id, "p": practice_id}
            ).rowcount:
                raise PracticeNotFound.unregistered(practice_id)

    def groups(self) -> list[dict[str, Any]]:
        with self.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT g.group_id, g.display_name, coalesce(array_agg(p.practice_id ORDER BY p.practice_id) "
                    "FILTER (WHERE p.practice_id IS NOT NULL), '{}') AS practices FROM practice_groups g "
                    "LEFT JOIN practice_registry p ON p.group_id = g.group_id GROUP BY g.group_id ORDER BY g.group_id"
                )
            ).mappings()
            return [dict(r) for r in rows]

    def group_practices(self, group_id: str) -> list[str]:
        for group in self.groups():
            if group["group_id"] == group_id:
                return list(group["practices"])
        raise PracticeNotFound(f"no group {group_id!r} (see `nvc group list`)")

    # --- credentials at rest (rotation of the key that seals them) ----------------------------------

    def stored_credentials(self) -> list[tuple[str, bytes]]:
        """Every practice's sealed credentials, read as the owner (key rotation's checks)."""
        with self.begin_owner() as conn:
            return _sealed_blobs(conn, lock=False)

    def reseal_credentials(
        self,
        reseal: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]],
        *,
        actor: str,
        detail: dict[str, Any],
    ) -> int:
        """Replace every practice's sealed credentials with `reseal(blobs)` in ONE owner transaction,
        with the practices table locked against connects and updates until it commits, and one
        `rotate_key` audit entry (`detail`, never key material) per practice resealed. `reseal` may
        raise: then nothing is written. Returns how many practices were resealed."""
        with self.begin_owner() as conn:
            # Blocks connects/updates until the commit; they reseal after it under the same ring.
            conn.execute(text("LOCK TABLE practices IN SHARE ROW EXCLUSIVE MODE"))
            rotated = reseal(_sealed_blobs(conn, lock=True))
            if rotated:
                conn.execute(
                    text("UPDATE practices SET credentials = :blob WHERE practice_id = :id"),
                    [{"id": pid, "blob": blob} for pid, blob in rotated],
                )
                conn.execute(
                    text(
                        "INSERT INTO audit_log (actor, practice_id, action, detail) "
                        "VALUES (:actor, :p, 'rotate_key', CAST(:detail AS jsonb))"
                    ),
                    [{"actor": actor, "p": pid, "detail": json.dumps(detail)} for pid, _ in rotated],
                )
        return len(rotated)


def _sealed_blobs(conn: Connection, *, lock: bool) -> list[tuple[str, bytes]]:
    sql = "SELECT practice_id, credentials FROM practices WHERE credentials IS NOT NULL ORDER BY practice_id"
    return [(r.practice_id, bytes(r.credentials)) for r in conn.execute(text(sql + (" FOR UPDATE" if lock else "")))]
