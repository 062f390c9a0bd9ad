"""Normalisation shared by every source: UK phones to E.164, UK dates, names and risk flags.

Each function either returns a clean value or raises `InvalidValue` with a reason fit to show a
practice manager; callers turn that into a rejected row rather than dropping anything.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import phonenumbers
from phonenumbers import PhoneMetadata, PhoneNumberType

from nvc_pipelines.model import (
    APPOINTMENT_TYPES,
    DERIVED_PREFIX,
    RISK_FLAGS,
    Appointment,
    AppointmentStatus,
    Channel,
    ClinicalRecord,
    ContactPreferences,
    Patient,
    PatientStatus,
    Phone,
    PhoneType,
    ReadResult,
    RecordBatch,
    RejectedRow,
    RowIdentity,
)
from nvc_pipelines.phone_types import TypeTable


class InvalidValue(ValueError):
    """A value that cannot be normalised; the message is the reason recorded for the row."""


# Ofcom's numbers reserved for TV/radio drama and testing. `phonenumbers` calls most of them invalid,
# but they are the numbers seed files and demos use, so they count as UK phones here.
# Patterns match the national significant number (no leading 0).
_OFCOM_DRAMA = re.compile(
    r"^(?:"
    r"7700900\d{3}"  # 07700 900000-900999 (mobile)
    r"|1632960\d{3}"  # 01632 960000-960999 (no area)
    r"|(?:113|114|115|116|117|118|121|131|141|151|161)4960\d{3}"  # 0113 496 0xxx etc.
    r"|1914980\d{3}"  # 0191 498 0xxx
    r"|2079460\d{3}"  # 020 7946 0xxx
    r"|2896496\d{3}"  # 028 9649 6xxx
    r"|2920180\d{3}"  # 029 2018 0xxx
    r"|8081570\d{3}"  # 0808 157 0xxx (freephone)
    r"|9098790\d{3}"  # 0909 879 0xxx (premium)
    r"|3069990\d{3}"  # 03069 990xxx
    r")$"
)
_NOT_DIGITS = re.compile(r"[^\d+]")
_SCIENTIFIC = re.compile(r"^\d+(?:\.\d+)?[eE][+-]?\d+$")
_PHONE_SPLIT = re.compile(r"\s*(?:[;/|,]|\bor\b)\s*", re.IGNORECASE)


def is_ofcom_drama_number(national_number: str) -> bool:
    return bool(_OFCOM_DRAMA.match(national_number))


def normalise_phone(raw: str) -> Phone:
    """Parse one UK phone number written any common way and return it in E.164.

    `07700 900123`, `+44 7700 900123`, `447700900123` and `7700900123` (a spreadsheet that dropped the
    leading zero) are the same number. Scientific notation (`7.7009E+09`) lost digits and is refused.
    """
    text = raw.strip()
    if not text:
        raise InvalidValue("phone number is blank")
    if ("e" in text or "E" in text) and _SCIENTIFIC.match(text.replace(",", "")):
        raise InvalidValue(f"phone number {text!r} was mangled by a spreadsheet (scientific notation); digits lost")
    digits = _NOT_DIGITS.sub("", text)
    if digits.startswith("00"):
        digits = "+" + digits[2:]
    if not digits.startswith("+"):
        if digits.startswith("44") and len(digits) == 12:
            digits = "+" + digits
        elif not digits.startswith("0") and len(digits) == 10:
            digits = "0" + digits  # leading zero lost by a spreadsheet
    plain = _PLAIN_UK.match(digits)
    if plain:  # the common shapes: what `parse(digits, "GB")` would return, without its generic scan
        national = significant = str(int(plain.group(1)))  # ASCII digits whatever digits were typed
        parsed = None
    else:
        try:
            parsed = phonenumbers.parse(digits, "GB")
        except phonenumbers.NumberParseException as exc:
            raise InvalidValue(f"phone number {text!r} is not a phone number ({exc})") from None
        if parsed.country_code != 44:
            raise InvalidValue(f"phone number {text!r} is not a UK number")
        national = str(parsed.national_number)
        # With a zero kept in front ("+44 (0)020 ..." read as Italian-style), the library types the
        # number with it: so does this, without the table (which types numbers as digits alone).
        significant = phonenumbers.national_significant_number(parsed)
    if is_ofcom_drama_number(national):
        kind = PhoneType.MOBILE if national.startswith("7") else PhoneType.LANDLINE
    else:
        # `number_type` is UNKNOWN exactly when `is_valid_number` is False (both match the number
        # against the region's patterns), so one call does both: phones are most of a sync's CPU.
        found = _UK_TYPES.kind_of(national) if significant == national else uk_number_type(significant, parsed)
        valid_kind = _phone_type(found)
        if valid_kind is None:
            raise InvalidValue(f"phone number {text!r} is not a valid UK number")
        kind = valid_kind
    return Phone(e164=f"+44{national}", type=kind)


_PLAIN_UK = re.compile(r"^(?:\+44|0)([1-9]\d{9})$")

# Keep every compiled metadata pattern (a few hundred, fixed): matching a number's type runs a dozen
# of them, and `re`'s own cache is looked up through three calls each time.
phonenumbers.enable_pattern_cache()


def _gb_metadata() -> PhoneMetadata:
    metadata = PhoneMetadata.metadata_for_region("GB")
    if metadata is None:
        raise RuntimeError("phonenumbers has no metadata for GB")
    return metadata


_GB = _gb_metadata()
# The library's own step of `number_type` (private: see `uk_number_type`); None in a version without it.
_TYPE_HELPER: Callable[[str, PhoneMetadata], int] | None = getattr(
    phonenumbers.phonenumberutil, "_number_type_helper", None
)


def uk_number_type(national: str, parsed: phonenumbers.PhoneNumber | None = None) -> int:
    """`phonenumbers.number_type` of a +44 number (its national significant number; `parsed`, the
    number it was read from, when that carries leading zeros), matched once instead of twice where
    it can be.

    `number_type` first finds the number's region among +44's (GB, then Guernsey, the Isle of Man,
    Jersey) by matching the number's type against GB's patterns, and takes GB when that type is
    known; it then matches the type again. So GB's type, when known, is `number_type`'s answer; any
    other number goes to `number_type` itself. `_number_type_helper` is the library's own step
    (private; the version is pinned, a test compares this with `number_type` across every
    four-digit UK prefix, and without the helper every number goes to `number_type`)."""
    if _TYPE_HELPER is not None:
        kind = _TYPE_HELPER(national, _GB)
        if kind != PhoneNumberType.UNKNOWN:
            return kind
    return phonenumbers.number_type(parsed or phonenumbers.PhoneNumber(country_code=44, national_number=int(national)))


# Types remembered by the leading digits that decide them (exact: see `phone_types`).
_UK_TYPES = TypeTable(uk_number_type)


def _phone_type(kind: int) -> PhoneType | None:
    """NVC's phone type for a `phonenumbers` type; None for an invalid number."""
    if kind == PhoneNumberType.UNKNOWN:
        return None
    if kind == PhoneNumberType.MOBILE:
        return PhoneType.MOBILE
    if kind in (PhoneNumberType.FIXED_LINE, PhoneNumberType.FIXED_LINE_OR_MOBILE):
        return PhoneType.LANDLINE
    return PhoneType.OTHER


def normalise_phones(values: Iterable[str | None]) -> tuple[list[Phone], list[str]]:
    """Normalise every number found in `values` (a field may hold several, split by ; / , or "or").

    Returns the distinct valid phones, mobiles first (the AI caller rings the first), and the reasons
    for the numbers that were refused.
    """
    phones: list[Phone] = []
    problems: list[str] = []
    seen: set[str] = set()
    for value in values:
        if value is None:
            continue
        text = str(value)
        # Digits and spaces (most fields) hold one number: no separator to split on.
        parts = (text,) if text.replace(" ", "").lstrip("+").isdigit() else _PHONE_SPLIT.split(text)
        for part in parts:
            if not part.strip():
                continue
            try:
                phone = normalise_phone(part)
            except InvalidValue as exc:
                problems.append(str(exc))
                continue
            if phone.e164 not in seen:
                seen.add(phone.e164)
                phones.append(phone)
    if len(phones) > 1:
        phones.sort(key=lambda p: p.type != PhoneType.MOBILE)  # stable: keeps source order otherwise
    return phones, problems


_DATE_FORMATS = ("%d/%m/%Y", "%Y-%m-%d", "%d-%m-%Y", "%d.%m.%Y", "%d %b %Y", "%d %B %Y", "%Y/%m/%d")


def parse_uk_date(raw: str | None, field_name: str) -> date | None:
    """Parse a UK day-first or ISO date; blank gives None. `31/02/2024` is refused, not guessed."""
    if raw is None:
        return None
    text = str(raw).strip()
    if not text:
        return None
    if "T" in text:  # ISO timestamp: keep the date part
        text = text.split("T", 1)[0]
    if len(text) == 10 and text[4] == "-" and text[7] == "-":  # ISO, what every API sends: no strptime scan
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass  # not a real date: the formats below refuse it with the same message
    for fmt in _DATE_FORMATS:
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise InvalidValue(f"{field_name} {raw!r} is not a date (expected DD/MM/YYYY or YYYY-MM-DD)")


def require_past_date(value: date | None, field_name: str, today: date) -> date:
    if value is None:
        raise InvalidValue(f"{field_name} is missing")
    if value > today:
        raise InvalidValue(f"{field_name} {value.isoformat()} is in the future")
    return value


def clean_name(raw: str | None) -> str:
    """Collapse whitespace; keep the practice's own spelling and accents (Siân, Zoë, O'Neill)."""
    return " ".join(str(raw or "").split())


# Text a wrong encoding leaves behind: UTF-8 read as Windows-1252/Latin-1 ("Ã©", "â€™"), a UTF-16
# byte-order mark read as Latin-1 ("ÿþ"), and the replacement character of undecodable bytes.
_MOJIBAKE = re.compile(r"Ã[\u0080-\u00bf]|â€|ÿþ|þÿ|ï»¿|\ufffd")


_BIDI_OVERRIDES = frozenset("\u202d\u202e")  # LEFT-TO-RIGHT and RIGHT-TO-LEFT OVERRIDE


def person_name(raw: str | None, field_name: str) -> str:
    """A name fit to say on a call: invisible formatting characters (bidi marks, zero-width joiners)
    are removed, and a name that holds control characters, bytes a wrong encoding garbled, a
    text-direction override, or nothing visible is refused with the reason."""
    text = str(raw or "")
    if text.isascii() and text.isprintable():  # most names: no control, invisible or garbled characters
        visible = clean_name(text)
        if visible and not any(ch.isalpha() for ch in visible):
            raise InvalidValue(f"{field_name} has no letters (only marks, digits or invisible characters)")
        return visible
    if any(unicodedata.category(ch) == "Cc" and ch not in "\t\n\r" for ch in text):
        raise InvalidValue(f"{field_name} contains control characters (a broken export or wrong encoding?)")
    if _MOJIBAKE.search(text):
        raise InvalidValue(f"{field_name} {text!r} looks garbled by a wrong text encoding (re-export as UTF-8)")
    visible = clean_name("".join(ch for ch in text if unicodedata.category(ch) != "Cf"))
    if text.strip() and not any(ch.isalpha() for ch in visible):
        raise InvalidValue(f"{field_name} has no letters (only marks, digits or invisible characters)")
    if any(ch in _BIDI_OVERRIDES for ch in text):
        # An override reverses the letters as displayed: the PMS shows "Lee" for what is stored as
        # "eeL". Removing it would have the caller say the reversed name; only a person can tell.
        raise InvalidValue(f"{field_name} holds a text-direction override: the PMS shows it reordered (retype it)")
    return visible


_NAME_WORDS = re.compile(r"[\s\-'’]+")


def name_review(first_name: str, last_name: str) -> str | None:
    """Why a kept name needs a person's look before the caller says it, or None.

    A word mixing scripts with look-alike letters ("Аnna" with a Cyrillic А, "Αlex" with a Greek Α)
    is a typing accident or a spoof; the caller's voice may mispronounce it and matching cannot see
    through it. The row is kept and callable (the person is real), only flagged."""
    if first_name.isascii() and last_name.isascii():  # plain ASCII is one script: most names end here
        return None
    words = [
        (label, word)
        for label, name in (("first_name", first_name), ("last_name", last_name))
        for word in _NAME_WORDS.split(name)
        if word and not word.isascii()
    ]
    if not words:
        return None
    from confusable_homoglyphs import categories, confusables  # ~0.1 s, only for non-ASCII names

    mixed = [(label, word) for label, word in words if confusables.is_dangerous(word)]
    if not mixed:
        return None
    label, word = mixed[0]
    scripts = sorted(categories.unique_aliases(word) - {"COMMON", "INHERITED"})
    return f"{label} mixes {' and '.join(s.title() for s in scripts)} letters that look alike (check the spelling)"


# Free-text risk categories as practices write them, mapped onto the recall rules' flags.
_RISK_ALIASES: dict[str, str | None] = {
    "diabetic": "diabetic",
    "diabetes": "diabetic",
    "diabetes type 1": "diabetic",
    "diabetes type 2": "diabetic",
    "type 1 diabetes": "diabetic",
    "type 2 diabetes": "diabetic",
    "dm": "diabetic",
    "glaucoma": "glaucoma",
    "glaucoma suspect": "glaucoma_suspect",
    "suspect glaucoma": "glaucoma_suspect",
    "gs": "glaucoma_suspect",
    "ocular hypertension": "ocular_hypertension",
    "oht": "ocular_hypertension",
    "glaucoma family history": "glaucoma_family_history",
    "family history glaucoma": "glaucoma_family_history",
    "family history of glaucoma": "glaucoma_family_history",
    "fh glaucoma": "glaucoma_family_history",
    "fhg": "glaucoma_family_history",
    # The memorandum's child conditions (they shorten a child's interval; see recall.py).
    "binocular vision anomaly": "binocular_vision_anomaly",
    "bv anomaly": "binocular_vision_anomaly",
    "squint": "binocular_vision_anomaly",
    "strabismus": "binocular_vision_anomaly",
    "amblyopia": "binocular_vision_anomaly",
    "lazy eye": "binocular_vision_anomaly",
    "corrected refractive error": "corrected_refractive_error",
    "rapidly progressing myopia": "progressive_myopia",
    "progressive myopia": "progressive_myopia",
    "progressing myopia": "progressive_myopia",
    # Values that mean "no special risk".
    "standard": None,
    "routine": None,
    "low": None,
    "none": None,
    "normal": None,
    "n/a": None,
    "na": None,
    "-": None,
}


def map_risk_categories(raw: str | None) -> tuple[list[str], list[str]]:
    """Map a risk_category cell (possibly several values) to known flags; unknown values come back raw."""
    flags: list[str] = []
    unknown: list[str] = []
    if not raw:
        return flags, unknown
    for part in re.split(r"[;,|+]", str(raw)):
        key = " ".join(part.replace("_", " ").replace("-", " ").lower().split())
        if not key:
            continue
        if key in _RISK_ALIASES or part.strip() in _RISK_ALIASES:
            flag = _RISK_ALIASES.get(key, _RISK_ALIASES.get(part.strip()))
            if flag and flag not in flags:
                flags.append(flag)
        else:
            unknown.append(part.strip())
    return flags, unknown


@dataclass(slots=True)
class PatientDraft:
    """A patient as a source wrote it (strings as found), before normalisation.

    Every dialect fills one of these; `build_patient` applies the same rules to all of them.
    """

    pms_patient_id: str | None
    first_name: str | None
    last_name: str | None
    phones: list[str | None] = field(default_factory=list)
    date_of_birth: str | None = None
    email: str | None = None
    address: str | None = None
    last_eye_test_date: str | None = None
    last_clinical_test_date: str | None = None
    risk_flags: list[str] = field(default_factory=list)
    risk_category: str | None = None
    clinical_notes: str | None = None
    recall_due_date: str | None = None
    updated_at: datetime | None = None
    # Contact, already in NVC's words (each dialect maps its own vocabulary): a `PatientStatus`
    # value (None: active), phone recall allowed (None: not recorded, so allowed), a no-recall flag,
    # consented channels where the PMS records consent (None: it records none), and a guardian.
    status: str | None = None
    status_date: str | None = None
    phone_recall: bool | None = None
    no_recall: bool = False
    channels: Iterable[str] | None = None
    guardian_name: str | None = None
    # Cells typed by people (CSV columns, free-typed PMS fields): `deceased` is yes/no or a date of
    # death, `do_not_call` yes/no.
    deceased: str | None = None
    do_not_call: str | None = None


_YES = frozenset({"yes", "y", "true", "t", "1"})
_NO = frozenset({"no", "n", "false", "f", "0", ""})


def parse_yes_no(raw: Any, field_name: str) -> bool:
    """A yes/no cell: yes/no, y/n, true/false, 1/0 in any case; blank is no."""
    if isinstance(raw, bool):
        return raw
    text = str(raw if raw is not None else "").strip().lower()
    if text in _YES:
        return True
    if text in _NO:
        return False
    raise InvalidValue(f"{field_name} {str(raw).strip()!r} is not yes or no (use yes/no, y/n, true/false or 1/0)")


def parse_deceased(raw: Any) -> tuple[bool, date | None]:
    """A `deceased` cell: yes/no as `parse_yes_no`, or the date of death (which means yes)."""
    try:
        return parse_yes_no(raw, "deceased"), None
    except InvalidValue:
        pass
    try:
        day = parse_uk_date(str(raw), "deceased")
    except InvalidValue:
        raise InvalidValue(
            f"deceased {str(raw).strip()!r} is neither yes/no nor a date (DD/MM/YYYY or YYYY-MM-DD)"
        ) from None
    return True, day


def _contact(draft: PatientDraft, reasons: list[str]) -> ContactPreferences:
    channels: frozenset[Channel] | None = None
    if draft.channels is not None:
        known: set[Channel] = set()
        for value in draft.channels:
            try:
                known.add(Channel(str(value).strip().lower()))
            except ValueError:
                reasons.append(f"contact channel {value!r} is not known (phone, sms or email)")
        channels = frozenset(known)
    return ContactPreferences(
        phone_recall=True if draft.phone_recall is None else bool(draft.phone_recall),
        no_recall=bool(draft.no_recall),
        channels=channels,
    )


def derived_patient_key(first_name: str, last_name: str, phone_e164: str) -> str:
    """A stable identity for rows that carry no PMS id (CSV): name plus primary phone."""
    basis = f"{first_name.casefold()}|{last_name.casefold()}|{phone_e164}"
    return DERIVED_PREFIX + hashlib.sha256(basis.encode()).hexdigest()[:20]


def build_patient(practice_id: str, draft: PatientDraft, today: date, *, strict: bool) -> Patient:
    """Normalise a draft into a `Patient`, or raise `InvalidValue` with every reason the row fails.

    `strict` (CSV imports, which exist only to feed the call list) also requires a valid UK phone and a
    past last eye test; a PMS patient without them is still kept, just not callable or recallable.
    """
    reasons: list[str] = []
    first = last = ""
    for label, raw in (("first_name", draft.first_name), ("last_name", draft.last_name)):
        try:
            value = person_name(raw, label)
        except InvalidValue as exc:
            reasons.append(str(exc))
            value = ""
        first, last = (value, last) if label == "first_name" else (first, value)
    if not first and not last and not reasons:
        reasons.append("name is missing")
    guardian = None
    if draft.guardian_name is not None and draft.guardian_name.strip():
        try:  # the caller asks for them by this name: the same rules as the patient's own
            guardian = person_name(draft.guardian_name, "guardian_name")
        except InvalidValue as exc:
            reasons.append(str(exc))
    phones, phone_problems = normalise_phones(draft.phones)
    if strict and not phones:
        reasons.append("; ".join(phone_problems) if phone_problems else "phone number is missing")

    def date_field(raw: str | None, name: str, required: bool) -> date | None:
        try:
            value = parse_uk_date(raw, name)
            if required:
                return require_past_date(value, name, today)
            if value is not None and value > today:
                raise InvalidValue(f"{name} {value.isoformat()} is in the future")
            return value
        except InvalidValue as exc:
            reasons.append(str(exc))
            return None

    dob = date_field(draft.date_of_birth, "date_of_birth", False)
    last_test = date_field(draft.last_eye_test_date, "last_eye_test_date", strict)
    clinical = date_field(draft.last_clinical_test_date, "last_clinical_test_date", False)
    try:
        recall_due = parse_uk_date(draft.recall_due_date, "recall_due_date")
    except InvalidValue as exc:
        reasons.append(str(exc))
        recall_due = None
    if dob and last_test and last_test < dob:
        reasons.append(f"last_eye_test_date {last_test.isoformat()} is before date_of_birth {dob.isoformat()}")
    status = PatientStatus.ACTIVE
    try:
        status = PatientStatus((draft.status or "active").strip().lower())
    except ValueError:
        reasons.append(f"patient status {draft.status!r} is not known")
    if status == PatientStatus.DECEASED:
        # A PMS that marks someone deceased is believed even when its date is unreadable or in the
        # future: rejecting the row would leave the stored copy, alive and callable, in place.
        try:
            status_date = parse_uk_date(draft.status_date, "date of death")
        except InvalidValue:
            status_date = None
        if status_date is not None and status_date > today:
            status_date = None
    else:
        status_date = date_field(draft.status_date, "status date", False)
    if draft.deceased is not None:
        try:
            died_now, died_on = parse_deceased(draft.deceased)
        except InvalidValue as exc:
            reasons.append(str(exc))
        else:
            if died_now:
                status, status_date = (
                    PatientStatus.DECEASED,
                    status_date or date_field(died_on.isoformat() if died_on else None, "date of death", False),
                )
    contact = _contact(draft, reasons)
    if draft.do_not_call is not None:
        try:
            if parse_yes_no(draft.do_not_call, "do_not_call"):
                contact = ContactPreferences(False, contact.no_recall, contact.channels)
        except InvalidValue as exc:
            reasons.append(str(exc))
    if reasons:
        raise InvalidValue("; ".join(reasons))

    flags, unknown = map_risk_categories(draft.risk_category)
    for flag in draft.risk_flags:
        if flag in RISK_FLAGS:
            if flag not in flags:
                flags.append(flag)
        elif flag not in unknown:
            unknown.append(flag)
    pms_id = (draft.pms_patient_id or "").strip() or derived_patient_key(first, last, phones[0].e164 if phones else "")
    return Patient(
        practice_id=practice_id,
        pms_patient_id=pms_id,
        first_name=first,
        last_name=last,
        phones=phones,
        date_of_birth=dob,
        email=(draft.email or "").strip() or None,
        address=clean_name(draft.address) or None,
        last_eye_test_date=last_test,
        last_clinical_test_date=clinical,
        risk_flags=sorted(flags),
        unknown_risk_values=unknown,
        clinical_notes=(draft.clinical_notes or "").strip() or None,
        pms_recall_due_date=recall_due,
        source_updated_at=draft.updated_at,
        status=status,
        status_date=status_date,
        contact=contact,
        name_review=name_review(first, last),
        guardian_name=guardian or None,
    )


def draft_identity(draft: PatientDraft) -> RowIdentity:
    """Whom an invalid patient row is about, as far as it reads (for erasure: never stored)."""
    phones, _ = normalise_phones(draft.phones)
    first, last = clean_name(draft.first_name), clean_name(draft.last_name)
    pms_id = (draft.pms_patient_id or "").strip() or None
    if pms_id is None and phones and (first or last):
        pms_id = derived_patient_key(first, last, phones[0].e164)
    return RowIdentity(pms_id, first, last, tuple(p.e164 for p in phones))


def collect(
    practice_id: str,
    rows: Iterable[tuple[str, dict[str, Any], PatientDraft]],
    today: date,
    *,
    strict: bool,
    source_ref: str = "",
) -> ReadResult:
    """Normalise a source's rows into a `ReadResult`: each row ends as a patient or a rejection.

    A second row with the same identity in one read is rejected as a duplicate (naming the first),
    so one read never writes the same patient twice.
    """
    (result,) = collect_pages(practice_id, rows, today, strict=strict, source_ref=source_ref)
    return result


def collect_pages(
    practice_id: str,
    rows: Iterable[tuple[str, dict[str, Any], PatientDraft]],
    today: date,
    *,
    strict: bool,
    source_ref: str = "",
    page_rows: int | None = None,
) -> Iterator[ReadResult]:
    """`collect`, a page of `page_rows` rows at a time (None: the whole read as one page), so a long
    file is normalised and written without being held whole. A duplicate is found across pages: one
    read remembers each identity's first row (an id and a row reference a patient, not the patient)."""
    page = ReadResult(source_ref=source_ref)
    seen: dict[str, str] = {}
    for row_ref, raw, draft in rows:
        try:
            patient = build_patient(practice_id, draft, today, strict=strict)
        except InvalidValue as exc:
            page.rejected.append(RejectedRow(row_ref, str(exc), raw, draft_identity(draft)))
        else:
            first_ref = seen.setdefault(patient.pms_patient_id, row_ref)
            if first_ref != row_ref:
                identity = RowIdentity(
                    patient.pms_patient_id, patient.first_name, patient.last_name, tuple(p.e164 for p in patient.phones)
                )
                page.rejected.append(RejectedRow(row_ref, f"duplicate of {first_ref} (same patient)", raw, identity))
            else:
                page.patients.append(patient)
                if patient.pms_patient_id.startswith(DERIVED_PREFIX):
                    page.origins[patient.pms_patient_id] = (row_ref, raw)
        if page_rows is not None and page.rows_read >= page_rows:
            yield page
            page = ReadResult(source_ref=source_ref)
    if page.rows_read or page_rows is None:
        yield page


UK_TZ = ZoneInfo("Europe/London")
_DATETIME_FORMATS = ("%d/%m/%Y %H:%M", "%d/%m/%Y %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%d-%m-%Y %H:%M")


def parse_pms_datetime(raw: str | datetime | None, field_name: str) -> datetime:
    """A PMS timestamp as an aware UTC datetime. ISO with an offset keeps it; a time without one is
    UK wall-clock time (GMT or BST on that date), which is how practice diaries are kept."""
    if isinstance(raw, datetime):
        value = raw
    else:
        text = str(raw or "").strip()
        if not text:
            raise InvalidValue(f"{field_name} is missing")
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            for fmt in _DATETIME_FORMATS:
                try:
                    value = datetime.strptime(text, fmt)
                    break
                except ValueError:
                    continue
            else:
                raise InvalidValue(f"{field_name} {text!r} is not a date and time") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UK_TZ)
    return value.astimezone(UTC)


@dataclass(slots=True)
class AppointmentDraft:
    """An appointment as a dialect wrote it, before normalisation."""

    pms_appointment_id: str | None
    pms_patient_id: str | None
    starts_at: str | datetime | None
    ends_at: str | datetime | None = None
    duration_minutes: int | None = None
    status: str | None = None  # already mapped to an AppointmentStatus value by the dialect
    appointment_type: str | None = None
    clinician: str | None = None
    notes: str | None = None
    nvc_reference: str | None = None
    updated_at: datetime | None = None


def build_appointment(practice_id: str, draft: AppointmentDraft) -> Appointment:
    reasons: list[str] = []
    if not (draft.pms_appointment_id or "").strip():
        reasons.append("appointment id is missing")
    if not (draft.pms_patient_id or "").strip():
        reasons.append("patient id is missing")
    try:
        starts = parse_pms_datetime(draft.starts_at, "start")
    except InvalidValue as exc:
        reasons.append(str(exc))
        starts = None
    ends = None
    if draft.ends_at is not None:
        try:
            ends = parse_pms_datetime(draft.ends_at, "end")
        except InvalidValue as exc:
            reasons.append(str(exc))
    elif starts is not None:
        ends = starts + timedelta(minutes=draft.duration_minutes or 30)
    if starts and ends and ends <= starts:
        reasons.append(f"appointment ends ({ends.isoformat()}) before it starts ({starts.isoformat()})")
    try:
        status = AppointmentStatus(draft.status or "booked")
    except ValueError:
        reasons.append(f"appointment status {draft.status!r} is not known")
        status = AppointmentStatus.BOOKED
    if reasons or starts is None or ends is None:  # no start or end without a reason saying why
        raise InvalidValue("; ".join(reasons))
    kind = draft.appointment_type if draft.appointment_type in APPOINTMENT_TYPES else "other"
    return Appointment(
        practice_id=practice_id,
        pms_appointment_id=str(draft.pms_appointment_id).strip(),
        pms_patient_id=str(draft.pms_patient_id).strip(),
        starts_at=starts,
        ends_at=ends,
        status=status,
        appointment_type=kind,
        clinician=clean_name(draft.clinician) or None,
        notes=(draft.notes or "").strip() or None,
        nvc_reference=(draft.nvc_reference or "").strip() or None,
        source_updated_at=draft.updated_at,
    )


@dataclass(slots=True)
class ClinicalDraft:
    """A clinical record as a dialect wrote it; `flags` are already mapped to canonical names where known."""

    pms_record_id: str | None
    pms_patient_id: str | None
    exam_date: str | date | None
    record_type: str | None = None
    flags: list[str] = field(default_factory=list)
    notes: str | None = None
    iop_right_mmhg: float | str | None = None
    iop_left_mmhg: float | str | None = None
    clinician: str | None = None
    updated_at: datetime | None = None


def _pressure(raw: float | str | None, side: str, reasons: list[str]) -> float | None:
    if raw is None or str(raw).strip() == "":
        return None
    try:
        value = float(str(raw).lower().replace("mmhg", "").strip())
    except ValueError:
        reasons.append(f"IOP {side} {raw!r} is not a number")
        return None
    if not 0 < value < 80:
        reasons.append(f"IOP {side} {value} mmHg is outside 0-80")
        return None
    return value


def build_clinical(practice_id: str, draft: ClinicalDraft, today: date) -> ClinicalRecord:
    reasons: list[str] = []
    if not (draft.pms_record_id or "").strip():
        reasons.append("clinical record id is missing")
    if not (draft.pms_patient_id or "").strip():
        reasons.append("patient id is missing")
    exam: date | None = None
    try:
        exam = draft.exam_date if isinstance(draft.exam_date, date) else parse_uk_date(draft.exam_date, "exam_date")
        exam = require_past_date(exam, "exam_date", today)
    except InvalidValue as exc:
        reasons.append(str(exc))
    right = _pressure(draft.iop_right_mmhg, "right", reasons)
    left = _pressure(draft.iop_left_mmhg, "left", reasons)
    if reasons or exam is None:  # no exam date without a reason saying why
        raise InvalidValue("; ".join(reasons))
    known = [f for f in dict.fromkeys(draft.flags) if f in RISK_FLAGS]
    unknown = [f for f in dict.fromkeys(draft.flags) if f not in RISK_FLAGS]
    return ClinicalRecord(
        practice_id=practice_id,
        pms_record_id=str(draft.pms_record_id).strip(),
        pms_patient_id=str(draft.pms_patient_id).strip(),
        exam_date=exam,
        record_type=(draft.record_type or "sight_test").strip(),
        flags=sorted(known),
        unknown_flags=unknown,
        notes=(draft.notes or "").strip() or None,
        iop_right_mmhg=right,
        iop_left_mmhg=left,
        clinician=clean_name(draft.clinician) or None,
        source_updated_at=draft.updated_at,
    )


Built = TypeVar("Built")  # what `collect_records` builds from each row


def collect_records(
    rows: Iterable[tuple[str, dict[str, Any], Any]],
    build: Callable[[Any], Built],
    identity: Callable[[Built], str],
    *,
    source_ref: str = "",
) -> RecordBatch[Built]:
    """Build each row with `build`; failures and repeated identities become rejected rows."""
    batch: RecordBatch[Built] = RecordBatch(source_ref=source_ref)
    seen: dict[str, str] = {}
    for row_ref, raw, draft in rows:
        try:
            record = build(draft)
        except InvalidValue as exc:
            about = (getattr(draft, "pms_patient_id", None) or "").strip() or None
            batch.rejected.append(RejectedRow(row_ref, str(exc), raw, RowIdentity(about)))
            continue
        first_ref = seen.setdefault(identity(record), row_ref)
        if first_ref != row_ref:
            # Whose record it repeats, so an erased patient's repeated row is left out like the first.
            about = getattr(record, "pms_patient_id", None)
            batch.rejected.append(RejectedRow(row_ref, f"duplicate of {first_ref}", raw, RowIdentity(about)))
            continue
        batch.records.append(record)
    return batch


_NVC_MARKER = re.compile(r"\[NVC:([A-Za-z0-9_.:-]{1,80})\]")


def nvc_marker(idempotency_key: str) -> str:
    """The tag written into a PMS record's reference or notes field so NVC can find its own writes."""
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,80}", idempotency_key):
        raise InvalidValue(f"idempotency key {idempotency_key!r} must be 1-80 letters, digits, '_.:-'")
    return f"[NVC:{idempotency_key}]"


def find_nvc_reference(*texts: str | None) -> str | None:
    """The idempotency key in the first text that carries an NVC marker, if any."""
    for text in texts:
        match = _NVC_MARKER.search(text or "")
        if match:
            return match.group(1)
    return None
