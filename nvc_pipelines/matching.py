"""Who is the same person. Within a PMS, the PMS's patient id decides. Across sources and re-imports
without ids, a shared phone number (E.164) is necessary but not enough: the name, or the date of
birth with the first name, must agree too, so family members sharing a landline stay separate."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from nvc_pipelines.model import DERIVED_PREFIX, Patient


def _fold(text: str | None) -> str:
    return " ".join((text or "").casefold().replace("-", " ").replace("'", "").split())


def match_reason(a: Patient, b: Patient) -> str | None:
    """Why `a` and `b` are the same person, or None when they are not (or not clearly)."""
    shared = {p.e164 for p in a.phones} & {p.e164 for p in b.phones}
    same_first = _fold(a.first_name) == _fold(b.first_name) and bool(_fold(a.first_name))
    same_name = same_first and _fold(a.last_name) == _fold(b.last_name)
    same_dob = a.date_of_birth is not None and a.date_of_birth == b.date_of_birth
    if shared and same_name:
        return "same phone and name"
    if shared and same_dob and same_first:
        return "same phone, first name and date of birth"
    if same_name and same_dob:
        return "same name and date of birth"
    return None


@dataclass(frozen=True, slots=True)
class DuplicatePair:
    keep: str  # pms_patient_id suggested to keep (the one with more history / older)
    other: str
    reason: str


def find_duplicates(patients: Sequence[Patient]) -> list[DuplicatePair]:
    """Pairs of distinct records that look like one person, found through phone and name indexes
    (never all pairs: a 200,000-patient practice must stay fast)."""
    buckets: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, p in enumerate(patients):
        for phone in p.phones:
            buckets[("phone", phone.e164)].append(i)
        buckets[("name", _fold(p.first_name), _fold(p.last_name))].append(i)
    seen: set[tuple[int, int]] = set()
    pairs: list[DuplicatePair] = []
    for members in buckets.values():
        if len(members) < 2 or len(members) > 50:  # a switchboard number shared by 50 people is no evidence
            continue
        for i, j in combinations(sorted(set(members)), 2):
            if (i, j) in seen:
                continue
            seen.add((i, j))
            reason = match_reason(patients[i], patients[j])
            if reason:
                a, b = patients[i], patients[j]
                keep, other = (a, b) if (a.last_eye_test_date or a.date_of_birth) else (b, a)
                pairs.append(DuplicatePair(keep.pms_patient_id, other.pms_patient_id, reason))
    return sorted(pairs, key=lambda d: (d.keep, d.other))


def resolve_derived_identities(incoming: Sequence[Patient], existing: Sequence[Patient]) -> dict[str, str]:
    """For incoming rows that carry a made-up identity, the existing patient they are (old -> new id).

    This is what makes a re-import with a reordered or extra phone number update the same patient
    instead of creating a second one."""
    by_phone: dict[str, list[Patient]] = defaultdict(list)
    for p in existing:
        for phone in p.phones:
            by_phone[phone.e164].append(p)
    mapping: dict[str, str] = {}
    for p in incoming:
        if not p.pms_patient_id.startswith(DERIVED_PREFIX):
            continue
        candidates = {c.pms_patient_id: c for phone in p.phones for c in by_phone.get(phone.e164, [])}
        matches = [c for c in candidates.values() if match_reason(p, c)]
        if len(matches) == 1 and matches[0].pms_patient_id != p.pms_patient_id:
            mapping[p.pms_patient_id] = matches[0].pms_patient_id
    return mapping
