"""General Optical Council registration: which clinicians a booking may name.

Every clinician a PMS lists carries the GOC number the practice typed (`01-` optometrists, `02-`
dispensing opticians). NVC checks each against the GOC register (through `resources.goc`, a resource
like every other outside system) and keeps the answer per practice (`clinicians`, migration 0016):

- `missing_number`: the PMS holds no GOC number for them (not a GOC registrant, or never entered);
- `invalid_number`: what the PMS holds is not a GOC number (`01-12345` / `02-12345`);
- `not_on_register`: a well-formed number the register does not know;
- `registered`, `suspended`, `erased`: the register's status for the number;
- `unverified`: the register could not be asked (not configured, or not answering).

A booking that names a clinician goes to the PMS only if that clinician is `registered`, and, for a
sight test (`eye_test`), registered as an optometrist with an `01-` number; otherwise it fails before
reaching the PMS with `clinician_not_registered`, `clinician_cannot_sight_test` or
`clinician_unknown` and the reason (`vet_booking`). A booking may name the clinician by the PMS's
own reference for them (what `read_clinicians` lists) or by their GOC number; the PMS gets its own
reference. Until the practice's clinicians have been read, a booking naming one waits
(`clinicians_not_read`, retried). A register that is not answering fails it with
`register_unavailable`, which the outbox retries. The sync flags every clinician who is not
registered in its metadata (`flagged`). Core: no Dagster, no resource; the register is passed in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from nvc_pipelines.model import BookingRequest, Clinician

if TYPE_CHECKING:
    from nvc_pipelines.store import Store

GOC_NUMBER = re.compile(r"0[12]-\d{4,6}")
OPTOMETRIST_PREFIX = "01-"
SIGHT_TEST_TYPES = frozenset({"eye_test"})
CACHE_FOR = timedelta(days=1)
# The register's registrant types that may carry out a sight test.
SIGHT_TESTERS = frozenset({"optometrist"})
# Problems a refused booking ends with (not retried); `register_unavailable` is retried.
REFUSALS = frozenset({"clinician_not_registered", "clinician_cannot_sight_test", "clinician_unknown"})
REGISTER_UNAVAILABLE = "register_unavailable"
# A booking naming a clinician before the practice's clinicians were read; retried (a sync reads them).
CLINICIANS_NOT_READ = "clinicians_not_read"


class RegistrationState(StrEnum):
    REGISTERED = "registered"
    SUSPENDED = "suspended"
    ERASED = "erased"
    NOT_ON_REGISTER = "not_on_register"
    INVALID_NUMBER = "invalid_number"
    MISSING_NUMBER = "missing_number"
    UNVERIFIED = "unverified"


REGISTER_STATUSES = frozenset({RegistrationState.REGISTERED, RegistrationState.SUSPENDED, RegistrationState.ERASED})


@dataclass(frozen=True, slots=True)
class RegisterEntry:
    """The register's answer for one number."""

    number: str
    name: str
    registrant_type: str  # optometrist, dispensing_optician, student_optometrist, ...
    status: str  # registered, suspended, erased


class RegisterUnavailable(Exception):
    """The register could not be asked; the message says why (never a booking's fault)."""


# `lookup(number)`: the register's entry, None when the number is not on it; raises RegisterUnavailable.
Lookup = Callable[[str], RegisterEntry | None]


@dataclass(frozen=True, slots=True)
class ClinicianCheck:
    """A clinician with the register's answer: what `nvc clinicians` lists and bookings are vetted by."""

    pms_clinician_ref: str
    name: str
    role: str
    goc_number: str | None
    state: RegistrationState
    registrant_type: str | None = None
    register_name: str | None = None
    reason: str = ""
    checked_at: datetime | None = None

    @property
    def may_sight_test(self) -> bool:
        return (
            self.state == RegistrationState.REGISTERED
            and (self.registrant_type or "") in SIGHT_TESTERS
            and (self.goc_number or "").startswith(OPTOMETRIST_PREFIX)
        )

    @property
    def flagged(self) -> bool:
        return self.state != RegistrationState.REGISTERED


class ClinicianRefused(Exception):
    """A booking that may not name its clinician; `problem` and the message say why."""

    def __init__(self, problem: str, message: str):
        super().__init__(message)
        self.problem = problem


def normalise_goc_number(raw: str | None) -> str | None:
    """`01-12345` from what a PMS holds (spaces, `01 12345`, `0112345`); None when it is no GOC number."""
    compact = re.sub(r"\s+", "", str(raw or "")).replace("–", "-")
    if re.fullmatch(r"0[12]\d{4,6}", compact):
        compact = f"{compact[:2]}-{compact[2:]}"
    return compact if GOC_NUMBER.fullmatch(compact) else None


def check(clinician: Clinician, lookup: Lookup, now: datetime | None = None) -> ClinicianCheck:
    """One clinician against the register."""
    base: dict[str, Any] = {
        "pms_clinician_ref": clinician.pms_clinician_ref,
        "name": clinician.name,
        "role": clinician.role,
    }
    raw = (clinician.goc_number or "").strip()
    if not raw:
        return ClinicianCheck(
            **base, goc_number=None, state=RegistrationState.MISSING_NUMBER, reason="the PMS holds no GOC number"
        )
    number = normalise_goc_number(raw)
    if number is None:
        return ClinicianCheck(
            **base,
            goc_number=raw[:40],
            state=RegistrationState.INVALID_NUMBER,
            reason=f"{raw[:40]!r} is not a GOC number (01-12345 for an optometrist, 02-12345 for a dispensing optician)",
        )
    try:
        entry = lookup(number)
    except RegisterUnavailable as exc:
        return ClinicianCheck(**base, goc_number=number, state=RegistrationState.UNVERIFIED, reason=str(exc))
    stamp = now or datetime.now(UTC)
    if entry is None:
        return ClinicianCheck(
            **base,
            goc_number=number,
            state=RegistrationState.NOT_ON_REGISTER,
            reason=f"{number} is not on the GOC register",
            checked_at=stamp,
        )
    try:
        state = RegistrationState(entry.status)
    except ValueError:
        state = RegistrationState.UNVERIFIED
    if state not in REGISTER_STATUSES:
        state = RegistrationState.UNVERIFIED
    reasons = {
        RegistrationState.REGISTERED: "",
        RegistrationState.SUSPENDED: f"{number} ({entry.name}) is suspended from the GOC register",
        RegistrationState.ERASED: f"{number} ({entry.name}) has been erased from the GOC register",
        RegistrationState.UNVERIFIED: f"the register answered an unknown status {entry.status!r} for {number}",
    }
    reason = reasons[state]
    if state == RegistrationState.REGISTERED and entry.registrant_type.replace(" ", "_") not in SIGHT_TESTERS:
        reason = f"registered as {entry.registrant_type.replace('_', ' ')}, not an optometrist: no sight tests"
    return ClinicianCheck(
        **base,
        goc_number=number,
        state=state,
        registrant_type=entry.registrant_type,
        register_name=entry.name,
        reason=reason,
        checked_at=stamp,
    )


def summary(checks: Iterable[ClinicianCheck]) -> dict[str, Any]:
    """What the sync reports: counts by state, and every flagged clinician (ref, number, state, reason)."""
    rows = list(checks)
    by_state: dict[str, int] = {}
    for c in rows:
        by_state[str(c.state)] = by_state.get(str(c.state), 0) + 1
    return {
        "clinicians": len(rows),
        "may_sight_test": sum(1 for c in rows if c.may_sight_test),
        "flagged": sum(1 for c in rows if c.flagged),
        "by_state": by_state,
        "flags": [
            {"ref": c.pms_clinician_ref, "goc_number": c.goc_number, "state": str(c.state), "reason": c.reason}
            for c in rows
            if c.flagged
        ],
    }


# --- the store ---------------------------------------------------------------------------------------


def save(store: Store, practice_id: str, checks: Iterable[ClinicianCheck], *, full_list: bool = True) -> None:
    """Record the checks; with `full_list`, clinicians the PMS no longer lists are kept but marked unlisted."""
    store.save_clinicians(practice_id, (asdict(c) for c in checks), full_list=full_list)


def load(store: Store, practice_id: str, *, listed_only: bool = False) -> list[ClinicianCheck]:
    return [_from_row(r) for r in store.load_clinicians(practice_id, listed_only=listed_only)]


def _from_row(r: Any) -> ClinicianCheck:
    return ClinicianCheck(
        pms_clinician_ref=r["pms_clinician_ref"],
        name=r["name"],
        role=r["role"],
        goc_number=r["goc_number"],
        state=RegistrationState(r["state"]),
        registrant_type=r["registrant_type"],
        register_name=r["register_name"],
        reason=r["reason"],
        checked_at=r["checked_at"],
    )


# --- vetting a booking -------------------------------------------------------------------------------


def vet_booking(
    store: Store, practice_id: str, booking: BookingRequest, lookup: Lookup, now: datetime | None = None
) -> BookingRequest:
    """The booking as the PMS should get it, or `ClinicianRefused` unless the clinician it names may
    take it (a booking naming no clinician passes: the practice's diary decides). The clinician is
    one the PMS lists now (as NVC last read it), named by the PMS's own reference (a staff id, an
    Acuitas user code, Optisoft's GOC number) or by their GOC number, which becomes that reference.
    A cached register answer older than `CACHE_FOR` is asked again (and kept)."""
    ref = (booking.clinician_ref or "").strip()
    if not ref:
        return booking
    stamp = now or datetime.now(UTC)
    listed = load(store, practice_id, listed_only=True)
    current = next((c for c in listed if c.pms_clinician_ref == ref), None)
    number = normalise_goc_number(ref)
    if current is None and number is not None:
        current = next((c for c in listed if normalise_goc_number(c.goc_number) == number), None)
    if current is None and not listed:
        # The practice's clinicians have not been read yet (its first sync has not reached them, or
        # their step failed): wait for the sync rather than send a clinician no one has checked.
        raise ClinicianRefused(
            CLINICIANS_NOT_READ,
            f"the booking names clinician {ref[:40]!r}, but NVC has not read practice {practice_id}'s clinicians "
            "from its PMS yet; will retry after its next sync (`nvc clinicians PRACTICE --refresh` reads them now)",
        )
    if current is None:
        raise ClinicianRefused(
            "clinician_unknown",
            f"the booking names clinician {ref[:40]!r}, whom the practice's PMS does not list (as NVC last read "
            "it); sync the practice (`nvc clinicians PRACTICE` lists who may be named) or book without one",
        )
    ref = current.pms_clinician_ref
    stale = current.checked_at is None or stamp - current.checked_at > CACHE_FOR
    if current.goc_number and stale and current.state != RegistrationState.INVALID_NUMBER:
        fresh = check(Clinician(practice_id, ref, current.name, current.goc_number, current.role), lookup, stamp)
        if fresh.state != RegistrationState.UNVERIFIED:
            save(store, practice_id, [fresh], full_list=False)
        current = fresh
    who = f"{current.name or current.register_name or ref} ({current.goc_number or 'no GOC number'})"
    if current.state == RegistrationState.UNVERIFIED:
        raise ClinicianRefused(
            REGISTER_UNAVAILABLE, f"the GOC register could not confirm {who} ({current.reason}); will retry"
        )
    if current.state != RegistrationState.REGISTERED:
        raise ClinicianRefused(
            "clinician_not_registered", f"{who} may not be booked: {current.reason or current.state}"
        )
    if booking.appointment_type in SIGHT_TEST_TYPES and not current.may_sight_test:
        raise ClinicianRefused(
            "clinician_cannot_sight_test",
            f"{who} may not carry out a sight test: "
            f"{current.reason or 'a sight test needs a registered optometrist (01-)'}",
        )
    if booking.clinician_ref == ref:
        return booking
    return replace(booking, clinician_ref=ref)
