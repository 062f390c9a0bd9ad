"""A small General Optical Council register on loopback, for checking clinicians' registrations.

The real register (the GOC's public "search the registers") is not reachable from here and publishes
no API, so everything about this one is **modelled**: `GET /api/registrants/{number}/` answers
`{"registration_number", "name", "registrant_type", "status"}` for a number on the register
(`registrant_type`: `optometrist`, `dispensing_optician`, `student_optometrist`,
`student_dispensing_optician`; `status`: `registered`, `suspended`, `erased`), 404
`{"error": "not_found"}` for one that is not, and 400 `{"error": "invalid_number"}` for anything
that is not a GOC number (`01-12345`, `02-12345`). The register is public: no login.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from sandboxes.base import Request, Response, SandboxServer, plain_problem
from sandboxes.seed import SeedClinician, SeedStaff

BASE = "/api/registrants"
STATUSES = frozenset({"registered", "suspended", "erased"})
TYPES = frozenset({"optometrist", "dispensing_optician", "student_optometrist", "student_dispensing_optician"})
_NUMBER = re.compile(r"0[12]-\d{4,6}")


@dataclass(frozen=True, slots=True)
class Registrant:
    number: str
    name: str
    registrant_type: str
    status: str = "registered"


def registrants_for(clinicians: Iterable[SeedClinician], **status: str) -> dict[str, Registrant]:
    """Register entries for seeded clinicians (their type from the number's prefix); `status` maps a
    GOC number to a status other than registered (e.g. `{"01-23456": "suspended"}`)."""
    out = {}
    for c in clinicians:
        kind = "optometrist" if c.goc_number.startswith("01-") else "dispensing_optician"
        out[c.goc_number] = Registrant(c.goc_number, c.name, kind, status.get(c.goc_number, "registered"))
    return out


def registrants_for_staff(staff: Iterable[SeedStaff]) -> dict[str, Registrant]:
    """Register entries for seeded staff whose number the register holds (`SeedStaff.register_status`);
    a number it does not hold, an invalid one and a missing one get none."""
    out = {}
    for s in staff:
        if s.goc_number and s.register_status and _NUMBER.fullmatch(s.goc_number):
            kind = "optometrist" if s.goc_number.startswith("01-") else "dispensing_optician"
            out[s.goc_number] = Registrant(s.goc_number, s.name, kind, s.register_status)
    return out


class GocSandbox(SandboxServer):
    """The register: `registrants` maps GOC numbers to entries; tests change them with `set_status`."""

    name = "goc"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        registrants: dict[str, Registrant] | None = None,
        seed: int = 7,
        rate_limit_per_second: float = 0,
    ):
        super().__init__(host, port, seed=seed, rate_limit_per_second=rate_limit_per_second)
        self.registrants: dict[str, Registrant] = dict(registrants or {})
        self.route("GET", BASE + "/{number}/", self._get)

    def add(self, *entries: Registrant) -> None:
        with self.lock:
            for entry in entries:
                self.registrants[entry.number] = entry

    def set_status(self, number: str, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}")
        with self.lock:
            entry = self.registrants[number]
            self.registrants[number] = Registrant(entry.number, entry.name, entry.registrant_type, status)

    def lookups(self) -> int:
        """How many numbers were asked for (tests prove the cache)."""
        with self.lock:
            return sum(1 for method, path in self.request_log if method == "GET" and path.startswith(BASE))

    def _get(self, request: Request) -> Response:
        number = request.params["number"]
        if not _NUMBER.fullmatch(number):
            raise plain_problem(400, "invalid_number", f"{number!r} is not a GOC registration number.")
        with self.lock:
            entry = self.registrants.get(number)
        if entry is None:
            raise plain_problem(404, "not_found", f"No registrant {number}.")
        body = {
            "registration_number": entry.number,
            "name": entry.name,
            "registrant_type": entry.registrant_type,
            "status": entry.status,
        }
        return Response(200, body)
