"""Right to erasure: remove a patient's personal data from the store and keep them out.

Erasure deletes the patient's rows from NVC's store (patient, recalls, call list, appointments,
clinical records, outbox, rejected rows naming them) and records a suppression: keyed hashes
(HMAC-SHA256) of their PMS id and of their name with each phone number, no personal data, so the
next sync, full or incremental, does not import them again. A phone alone is never enough: family
members sharing a landline keep being imported. Nothing is ever deleted in the PMS. The key comes from
`NVC_SUPPRESSION_KEY` (base64), or is generated once into `$NVC_HOME/suppression.key`; it is kept
apart from `NVC_SECRET_KEY` so rotating that key does not forget who was erased.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from nvc_pipelines.config import nvc_home
from nvc_pipelines.model import Patient

if TYPE_CHECKING:
    from nvc_pipelines.store import Store


def suppression_key() -> bytes:
    env = os.environ.get("NVC_SUPPRESSION_KEY")
    if env:
        return base64.b64decode(env)
    path = nvc_home() / "suppression.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    return base64.b64decode(path.read_text().strip())


def value_hash(practice_id: str, kind: str, value: str, key: bytes | None = None) -> str:
    return hmac.new(key or suppression_key(), f"{practice_id}|{kind}|{value}".encode(), hashlib.sha256).hexdigest()


class Suppressions:
    """The erased identities of one practice, for filtering a sync's rows."""

    def __init__(self, practice_id: str, hashes: Iterable[tuple[str, str]]):
        self.practice_id = practice_id
        self.key = suppression_key()
        self.hashes = frozenset(hashes)  # (kind, hash): what a write compares with the store's at commit
        self.ids = {h for kind, h in self.hashes if kind == "pms_patient_id"}
        self.name_phones = {h for kind, h in self.hashes if kind == "name_phone"}

    def __bool__(self) -> bool:
        return bool(self.ids or self.name_phones)

    def erased_id(self, pms_patient_id: str) -> bool:
        return value_hash(self.practice_id, "pms_patient_id", pms_patient_id, self.key) in self.ids

    def erased_patient(self, patient: Patient) -> bool:
        name = _name(patient.first_name, patient.last_name)
        return self.erased_id(patient.pms_patient_id) or any(
            value_hash(self.practice_id, "name_phone", f"{name}|{p.e164}", self.key) in self.name_phones
            for p in patient.phones
        )


_WORD = re.compile(r"[^\W\d_][\w'’-]*")
_NUMBER = re.compile(r"\+?\d[\d ()-]{8,}\d")


def _erased_raw(suppressions: Suppressions, raw: Any) -> bool:
    """A row nothing could be read from (broken quoting, too many cells): any UK number in it with
    any two neighbouring words as a name, against the erased name+phone hashes."""
    from nvc_pipelines.normalise import InvalidValue, normalise_phone

    cells: list[str] = []
    for value in raw.values() if isinstance(raw, dict) else [raw]:
        cells.extend(str(v) for v in (value if isinstance(value, list | tuple) else [value]))
    text = " ".join(cells)
    phones = set()
    for candidate in [*cells, *_NUMBER.findall(text)]:
        try:
            phones.add(normalise_phone(candidate).e164)
        except InvalidValue:
            continue
    if not phones:
        return False
    words = _WORD.findall(text)
    names = {_name(a, b) for a, b in zip(words, words[1:], strict=False)}
    return any(
        value_hash(suppressions.practice_id, "name_phone", f"{name}|{p}", suppressions.key) in suppressions.name_phones
        for name in names
        for p in phones
    )


def _erased_row(suppressions: Suppressions, identity: Any, raw: Any = None) -> bool:
    if identity is None:
        return _erased_raw(suppressions, raw)
    if identity.pms_patient_id and suppressions.erased_id(identity.pms_patient_id):
        return True
    name = _name(identity.first_name, identity.last_name)
    return any(
        value_hash(suppressions.practice_id, "name_phone", f"{name}|{p}", suppressions.key) in suppressions.name_phones
        for p in identity.phones
    )


def _name(first: str | None, last: str | None) -> str:
    return " ".join(f"{first or ''} {last or ''}".casefold().split())


def load_suppressions(store: Store, practice_id: str) -> Suppressions:
    return Suppressions(practice_id, store.suppression_hashes(practice_id))


def drop_erased(
    store: Store,
    practice_id: str,
    records: list[Any],
    *,
    patients: bool,
    rejected: list[Any] | None = None,
    suppressions: Suppressions | None = None,
) -> tuple[list[Any], int]:
    """Leave out everyone erased under GDPR (patients by keyed hashes of id and name+phone, other
    records by their patient's id), before anything of them is validated or kept; returns what is
    kept and how many were left out. Rejected rows (in `rejected`, changed in place) that read as
    an erased person are left out too, so a newer invalid row of hers keeps no personal data.
    A read in pages loads `suppressions` once (`load_suppressions`) and passes them for each page."""
    if suppressions is None:
        suppressions = load_suppressions(store, practice_id)
    if not suppressions:
        return records, 0
    if patients:
        kept = [r for r in records if not suppressions.erased_patient(r)]
    else:
        kept = [r for r in records if not suppressions.erased_id(r.pms_patient_id)]
    dropped = len(records) - len(kept)
    if rejected is not None:
        before = len(rejected)
        rejected[:] = [r for r in rejected if not _erased_row(suppressions, r.identity, r.raw)]
        dropped += before - len(rejected)
    return kept, dropped


def erase_patient(
    store: Store, practice_id: str, patient_ref: str, actor: str, on_wait: Callable[[], None] | None = None
) -> dict[str, int]:
    """Erase one patient (PMS id or NVC patient id) in one transaction; returns what was removed.
    A sync of the practice that is writing is waited for (`on_wait` is told first)."""
    store.get_practice(practice_id)
    key = suppression_key()

    def hashes(ref: str, first: str | None, last: str | None, phones: list[str]) -> list[tuple[str, str]]:
        """What keeps them out: their PMS id, and their name with each phone (the PMS id's first)."""
        name = _name(first, last)
        out = [("pms_patient_id", value_hash(practice_id, "pms_patient_id", ref, key))]
        return out + [("name_phone", value_hash(practice_id, "name_phone", f"{name}|{p}", key)) for p in phones]

    return store.erase_patient_rows(practice_id, patient_ref, actor, hashes, on_wait)
