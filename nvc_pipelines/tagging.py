"""Clinical auto-tagging: risk flags inferred from free-text notes and exam measurements.

Inferred flags are marked as such, never overwrite a flag the PMS set, and feed the recall rules.
Negations ("no family history of glaucoma", "not diabetic", "glaucoma ruled out") are honoured
clause by clause. Precision and recall are measured on a labelled set in the tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# IOP at or above this (mmHg) in either eye suggests ocular hypertension (NICE NG81: 24 mmHg refers,
# but optometrists flag from 22 for monitoring, as "IOP 22mmHg" notes do).
OHT_IOP_MMHG = 22.0

_CLAUSE_SPLIT = re.compile(r"[.;\n]|,(?!\d)|\s[-–]\s|\bbut\b|\bhowever\b", re.IGNORECASE)
_NEGATION = re.compile(
    r"\b(no|not|non|nil|denies|denied|without|negative|never|none|ruled out|rule out|r/o|excluded|unlikely|"
    r"free of|absent|neg)\b|\bno\s+(?:known\s+)?(?:fh|fhx|family)\b|\bn/?k\b",
    re.IGNORECASE,
)
_POST_NEGATION = re.compile(r"\b(ruled out|excluded|unlikely|negative|not confirmed|discounted)\b", re.IGNORECASE)

_FAMILY = r"(?:family\s+history|fam(?:ily)?\s*hx|fhx?|f/h|mother|mum|father|dad|brother|sister|sibling|parent|grand(?:mother|father|parent))"
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (
        "glaucoma_family_history",
        re.compile(
            rf"{_FAMILY}\b[^.;]{{0,40}}?\bglaucoma|\bglaucoma\b[^.;]{{0,25}}?\b(?:in\s+(?:the\s+)?family|{_FAMILY})\b|\bfhg\b",
            re.IGNORECASE,
        ),
    ),
    (
        "glaucoma_suspect",
        re.compile(
            r"glaucoma\s*(?:suspect|susp\.?|\?)|suspect(?:ed)?\s+glaucoma|\?\s*glaucoma|\bgl\s*susp|"
            r"suspicious\s+(?:optic\s+)?discs?|(?:large|increased|suspicious)\s+c(?:up)?[:/]?d(?:isc)?\s*ratio|"
            r"\bgs\b|disc\s+cupping",
            re.IGNORECASE,
        ),
    ),
    (
        "ocular_hypertension",
        re.compile(
            r"\boht\b|ocular\s+hypertens\w*|(?:raised|elevated|high|increased)\s+(?:iop|iops|intra-?ocular\s+pressures?|pressures?)",
            re.IGNORECASE,
        ),
    ),
    (
        "diabetic",
        re.compile(
            r"\bdiabet\w*|\bt[12]\s*dm\b|\btype\s*(?:1|2|one|two|i{1,2})\s*(?:dm|diabet\w*)|\bn?iddm\b|\bdm\b|"
            r"\bon\s+(?:metformin|insulin)\b|diabetic\s+retinopathy|\bdr\s+screening",
            re.IGNORECASE,
        ),
    ),
    ("glaucoma", re.compile(r"\bpoag\b|\bglaucoma\b|\bon\s+(?:latanoprost|timolol|xalatan)\b", re.IGNORECASE)),
]
_IOP_VALUES = re.compile(
    r"\biops?\b[^0-9]{0,20}(\d{1,2}(?:\.\d)?)(?:\s*(?:/|and|,|&)\s*(\d{1,2}(?:\.\d)?))?", re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class InferredFlag:
    flag: str
    evidence: str  # the clause (or measurement) it was inferred from


def _negated(clause: str, start: int, end: int) -> bool:
    before = clause[max(0, start - 40) : start]
    after = clause[end : end + 30]
    return bool(_NEGATION.search(before) or _POST_NEGATION.search(after))


def infer_from_text(text: str | None) -> list[InferredFlag]:
    """Flags a note asserts, in a stable order, each with its evidence; negated mentions are skipped."""
    found: dict[str, InferredFlag] = {}
    for raw_clause in _CLAUSE_SPLIT.split(text or ""):
        clause = raw_clause.strip()
        if not clause:
            continue
        masked = clause
        for flag, pattern in _PATTERNS:
            for match in pattern.finditer(masked):
                # Mask what matched so "glaucoma suspect" and "family history of glaucoma" are not also "glaucoma".
                masked = masked[: match.start()] + "#" * (match.end() - match.start()) + masked[match.end() :]
                if _negated(clause, match.start(), match.end()):
                    continue
                found.setdefault(flag, InferredFlag(flag, clause))
        for match in _IOP_VALUES.finditer(clause):
            values = [float(v) for v in match.groups() if v]
            if any(v >= OHT_IOP_MMHG for v in values) and not _negated(clause, match.start(), match.end()):
                found.setdefault("ocular_hypertension", InferredFlag("ocular_hypertension", clause))
    return list(found.values())


def infer_from_iop(right: float | None, left: float | None) -> list[InferredFlag]:
    high = [v for v in (right, left) if v is not None and float(v) >= OHT_IOP_MMHG]
    if not high:
        return []
    return [InferredFlag("ocular_hypertension", f"IOP {max(high):g} mmHg (>= {OHT_IOP_MMHG:g})")]


def inferred_flags(pms_flags: Iterable[str], evidence: Iterable[InferredFlag]) -> dict[str, str]:
    """Inferred flags the PMS did not already set, with their evidence (a PMS flag always wins)."""
    pms = set(pms_flags)
    out: dict[str, str] = {}
    for item in evidence:
        if item.flag not in pms and item.flag not in out:
            out[item.flag] = item.evidence
    return out
