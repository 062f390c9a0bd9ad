"""Deterministic, UK-realistic patients shared by every sandbox.

The records are dialect-neutral (canonical flag names, UK national phone format); each sandbox
renders them in its own PMS's shape. Phones come from Ofcom's drama ranges while they last, so a
demo that dials a seeded patient rings nobody; beyond that volume (about 1,000 mobiles and 13,000
landlines) numbers are drawn from blocks `phonenumbers` accepts as UK mobiles or fixed lines, so the
normaliser treats them like real data.

Speed matters (a 200,000-patient practice is seeded at start-up), so Faker is called only to fill
small pools of names once; everything per patient is drawn from one `random.Random(seed)`.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from typing import TypeVar

import phonenumbers
from faker import Faker
from phonenumbers import PhoneNumberType

T = TypeVar("T")


@dataclass(slots=True)
class SeedPatient:
    """One seeded patient, as any PMS would hold it (phones in UK national format with spaces)."""

    index: int
    title: str
    first_name: str
    last_name: str
    date_of_birth: date | None
    mobile: str | None
    landline: str | None
    email: str | None
    address_line1: str
    town: str
    postcode: str
    last_eye_test: date | None
    recall_due: date | None
    flags: list[str]  # canonical names (model.RISK_FLAGS); each sandbox renders its own codes
    clinical_notes: str | None
    updated_at: datetime  # tz-aware UTC; when the PMS record last changed
    # Contact, in NVC's words; each sandbox renders its own vocabulary (see `contact_pass`).
    status: str = "active"  # active, deceased, gone_away, inactive
    status_date: date | None = None  # date of death, for the deceased
    phone_recall: bool = True  # False: the practice must not phone them about recalls
    no_recall: bool = False  # no recall by any channel
    sms_consent: bool | None = None  # None: the practice recorded nothing
    email_consent: bool | None = None
    guardian_name: str | None = None  # a child's parent or guardian, as the practice wrote it


# (town, postcode area, dialling code without the 0, drama block as the local number's first digits).
# The landline's area code matches the patient's town, as it would in a real practice's records.
_AREAS: tuple[tuple[str, str, str, str], ...] = (
    ("Leeds", "LS", "113", "4960"),
    ("Sheffield", "S", "114", "4960"),
    ("Nottingham", "NG", "115", "4960"),
    ("Leicester", "LE", "116", "4960"),
    ("Bristol", "BS", "117", "4960"),
    ("Reading", "RG", "118", "4960"),
    ("Birmingham", "B", "121", "4960"),
    ("Edinburgh", "EH", "131", "4960"),
    ("Glasgow", "G", "141", "4960"),
    ("Liverpool", "L", "151", "4960"),
    ("Manchester", "M", "161", "4960"),
    ("London", "SE", "20", "79460"),
    ("Newcastle upon Tyne", "NE", "191", "4980"),
)
_INWARD_LETTERS = "ABDEFGHJLNPQRSTUWXYZ"  # letters Royal Mail uses in the inward code
_STREET_SUFFIXES = (
    "Road", "Street", "Lane", "Avenue", "Close", "Drive", "Crescent", "Grove", "Way", "Gardens",
    "Terrace", "Place", "Court", "Mews", "Walk", "Rise", "Hill", "View",
)  # fmt: skip
_STREET_STEMS = (
    "Church", "Station", "Victoria", "Park", "Mill", "Queens", "Kings", "Manor", "Albert", "Green",
    "Highfield", "Chapel", "School", "Springfield", "York", "Windsor", "Grange", "Beech", "Oak", "Elm",
)  # fmt: skip
# Names that exercise normalisation: apostrophes, hyphens and accents practices really record.
_EXTRA_FIRST_FEMALE = ("Siân", "Zoë", "Niamh", "Aoife", "Chloé", "Saoirse")
_EXTRA_FIRST_MALE = ("Rhys", "Dafydd", "Seán", "Ciarán", "Ruairí", "Iolo")
_EXTRA_LAST = ("O'Neill", "O'Brien", "McAllister", "Smith-Jones", "Ap Rhys", "D'Souza", "MacLeod")
_EMAIL_DOMAINS = ("example.com", "example.org", "example.net")  # reserved: a demo can never email a person
_NOTES = (
    "Wears varifocals; prefers morning appointments.",
    "Contact lens wearer (monthly disposables).",
    "Daily disposable contact lenses; CL check due with sight test.",
    "Mild dry eye; advised warm compresses.",
    "Early cataract R>L; monitor.",
    "Blepharitis; lid hygiene advised.",
    "Hearing impaired; please speak clearly.",
    "Domiciliary visit required.",
    "Prefers to be called after 5pm.",
    "Drives for work; DVLA standard checked.",
    "Myopia control (MiSight) in progress.",
    "Amblyopia R eye, patched as a child.",
    "Posterior vitreous detachment L 2022; warned of RD symptoms.",
    "Dilated fundus exam at last visit.",
)
_FLAG_RATES = (
    ("diabetic", 0.08),
    ("glaucoma_suspect", 0.03),
    ("ocular_hypertension", 0.02),
    ("glaucoma_family_history", 0.04),
    ("glaucoma", 0.01),
)


@cache
def _name_pools(seed: int) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Female first names, male first names and surnames, drawn from Faker's en_GB lists once."""
    fake = Faker("en_GB")
    fake.seed_instance(seed)
    female = sorted({fake.first_name_female() for _ in range(800)}) + list(_EXTRA_FIRST_FEMALE)
    male = sorted({fake.first_name_male() for _ in range(800)}) + list(_EXTRA_FIRST_MALE)
    last = sorted({fake.last_name() for _ in range(2000)}) + list(_EXTRA_LAST)
    return tuple(female), tuple(male), tuple(last)


def _national(nsn: str) -> str:
    """Format a UK national significant number (no leading 0) the way people write it."""
    if nsn.startswith("7"):
        return f"0{nsn[:4]} {nsn[4:]}"
    if nsn.startswith("2"):
        return f"0{nsn[:2]} {nsn[2:6]} {nsn[6:]}"
    return f"0{nsn[:3]} {nsn[3:6]} {nsn[6:]}"


_MOBILE = (PhoneNumberType.MOBILE,)
_FIXED = (PhoneNumberType.FIXED_LINE, PhoneNumberType.FIXED_LINE_OR_MOBILE)


def _block_ok(prefix: str, suffix_len: int, kinds: tuple[int, ...]) -> bool:
    """Whether every number in `prefix` + `suffix_len` digits is a valid GB number of one of `kinds`.

    The GB metadata decides validity within the first five or six digits, so checking the lowest and
    highest number of a block is enough.
    """
    for suffix in ("0" * suffix_len, "9" * suffix_len):
        number = phonenumbers.parse("+44" + prefix + suffix)
        if not phonenumbers.is_valid_number(number) or phonenumbers.region_code_for_number(number) != "GB":
            return False
        if phonenumbers.number_type(number) not in kinds:
            return False
    return True


@cache
def _mobile_blocks() -> tuple[str, ...]:
    """Five-digit prefixes of valid GB mobiles: every 13th of 07400-07999, 100,000 numbers each.

    A sample of blocks keeps the `phonenumbers` checks to milliseconds and still leaves millions of
    numbers.
    """
    candidates = (str(n) for n in range(74000, 80000, 13))
    blocks = tuple(p for p in candidates if p != "77009" and _block_ok(p, 5, _MOBILE))
    if not blocks:
        raise RuntimeError("phonenumbers accepts no 07400-07999 mobile block; its metadata changed")
    return blocks


@cache
def _landline_blocks(code: str, drama: str) -> tuple[str, ...]:
    """Valid fixed-line prefixes (dialling code + three local digits) in one area, drama block excluded."""
    suffix_len = 10 - len(code) - 3
    candidates = (f"{code}{n:03d}" for n in range(200, 1000, 17))
    blocks = tuple(p for p in candidates if not (code + drama).startswith(p) and _block_ok(p, suffix_len, _FIXED))
    if not blocks:
        raise RuntimeError(f"phonenumbers accepts no fixed-line block for 0{code}; its metadata changed")
    return blocks


class _Phones:
    """Hands out distinct numbers: the drama ranges first (shuffled), then generated valid ones."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.mobiles = [f"7700900{k:03d}" for k in range(1000)]
        rng.shuffle(self.mobiles)
        self.landlines: dict[str, list[str]] = {}
        for _, _, code, drama in _AREAS:
            pool = [f"{code}{drama}{k:03d}" for k in range(1000)]
            rng.shuffle(pool)
            self.landlines[code] = pool
        self.issued: set[str] = set()

    def _fresh(self, blocks: tuple[str, ...]) -> str:
        while True:
            prefix = self.rng.choice(blocks)
            nsn = prefix + str(self.rng.randrange(10 ** (10 - len(prefix)))).zfill(10 - len(prefix))
            if nsn not in self.issued:
                self.issued.add(nsn)
                return nsn

    def mobile(self) -> str:
        return _national(self.mobiles.pop() if self.mobiles else self._fresh(_mobile_blocks()))

    def landline(self, code: str, drama: str) -> str:
        pool = self.landlines[code]
        return _national(pool.pop() if pool else self._fresh(_landline_blocks(code, drama)))


@cache
def _ascii(text: str) -> str:
    """A name folded to lower-case ASCII letters and digits, for an email local part."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def _add_years(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


def seed_patients(n: int, seed: int = 7, today: date | None = None) -> list[SeedPatient]:
    """`n` patients; the same `(n, seed, today)` always gives the same list.

    `today` anchors every date (ages, last tests, `updated_at` strictly before its midnight UTC), so
    tests can pin it; it defaults to the real date.
    """
    today = today or date.today()
    rng = random.Random(seed)
    rand = rng.random  # one bound method and int(rand() * k): several times faster than randrange/choice

    def pick(options: Sequence[T]) -> T:
        return options[int(rand() * len(options))]

    female, male, surnames = _name_pools(seed)
    phones = _Phones(rng)
    midnight = datetime.combine(today, time(0), UTC)
    four_years = 4 * 365
    patients: list[SeedPatient] = []
    household: SeedPatient | None = None  # the last patient with a landline, whom a relative may join
    for index in range(1, n + 1):
        is_female = rand() < 0.55  # more women than men attend for eye tests
        first = pick(female if is_female else male)
        age = int(rng.triangular(3, 95, 62))
        dob: date | None = today - timedelta(days=age * 365 + age // 4 + int(rand() * 365) + 1)
        title = _title(rand, is_female, age)

        # Phones: 48% mobile only, 32% both, 18% landline only, 2% neither.
        roll = rand()
        has_mobile, has_landline = roll < 0.80, 0.48 <= roll < 0.98
        relative = has_landline and household is not None and rand() < 0.04
        if relative and household is not None:
            last, landline = household.last_name, household.landline
            line1, town, postcode = household.address_line1, household.town, household.postcode
        else:
            town, area, code, drama = pick(_AREAS)
            last = pick(surnames)
            landline = phones.landline(code, drama) if has_landline else None
            line1 = f"{1 + int(rand() * 240)} {pick(_STREET_STEMS)} {pick(_STREET_SUFFIXES)}"
            if rand() < 0.12:
                line1 = f"Flat {1 + int(rand() * 30)}, {line1}"
            postcode = f"{area}{1 + int(rand() * 28)} {int(rand() * 10)}{pick(_INWARD_LETTERS)}{pick(_INWARD_LETTERS)}"
        mobile = phones.mobile() if has_mobile else None

        email = None
        if age >= 16 and rand() < 0.65:
            number = str(1 + int(rand() * 99)) if rand() < 0.4 else ""
            email = f"{_ascii(first)}.{_ascii(last)}{number}@{pick(_EMAIL_DOMAINS)}"

        last_test: date | None = today - timedelta(days=1 + int(rand() * four_years))
        if dob is not None and last_test is not None and last_test <= dob:
            last_test = dob + timedelta(days=1 + int(rand() * ((today - dob).days - 1)))
        if rand() < 0.03:
            last_test = None
        if rand() < 0.05:
            dob = None

        flags = [name for name, rate in _FLAG_RATES if rand() < rate]
        if "glaucoma" in flags and "glaucoma_suspect" in flags:
            flags.remove("glaucoma_suspect")

        recall_due = None
        if rand() < 0.30:
            years = 1 if flags or age < 16 or age >= 70 else 2
            recall_due = _add_years(last_test or today, years)

        notes = pick(_NOTES) if rand() < 0.2 else None
        # Last edited on or after the day of the last test (else any time in four years), before `today`.
        span = (today - last_test).days if last_test else four_years
        updated_at = midnight - timedelta(days=int(rand() * span), seconds=1 + int(rand() * 86399))

        patient = SeedPatient(
            index=index,
            title=title,
            first_name=first,
            last_name=last,
            date_of_birth=dob,
            mobile=mobile,
            landline=landline,
            email=email,
            address_line1=line1,
            town=town,
            postcode=postcode,
            last_eye_test=last_test,
            recall_due=recall_due,
            flags=flags,
            clinical_notes=notes,
            updated_at=updated_at,
        )
        patients.append(patient)
        if landline and not relative:
            household = patient
    contact_pass(patients, seed, today)
    return patients


# Shares of the contact states a practice's records carry (per patient, independently).
CONTACT_RATES = {"deceased": 0.01, "gone_away": 0.01, "inactive": 0.01, "no_phone_recall": 0.02, "no_recall": 0.01}
SHOWCASE_EVERY = 50  # each block of 50 patients has one of each case the call list must handle


def _adult_name(p: SeedPatient) -> str:
    return f"{p.title} {p.first_name} {p.last_name}"


def contact_pass(patients: list[SeedPatient], seed: int, today: date) -> None:
    """Status, contact preferences and guardians, drawn from their own RNG (the rest of the seed is
    unchanged by them).

    Children join a household: most are registered with a parent's landline and surname, the parent
    named as guardian, and half of those reached on the parent's mobile. Each block of
    `SHOWCASE_EVERY` patients also holds, due for a test, a parent and child on one number, a
    deceased patient, one who asked not to be phoned, one who moved away and one the practice
    archived, so even a 50-patient demo shows each.
    """
    rng = random.Random(seed * 43 + 1)
    adult: SeedPatient | None = None
    for p in patients:
        age = _age(p.date_of_birth, today)
        if age is not None and age < 16 and adult is not None and rng.random() < 0.8:
            _join_household(p, adult, share_mobile=rng.random() < 0.5)
        elif age is not None and age >= 25 and (p.landline or p.mobile):
            adult = p
        roll = rng.random()
        if roll < CONTACT_RATES["deceased"]:
            p.status, p.status_date = "deceased", _after(p.last_eye_test, today, rng)
        elif roll < CONTACT_RATES["deceased"] + CONTACT_RATES["gone_away"]:
            p.status = "gone_away"
        elif roll < CONTACT_RATES["deceased"] + CONTACT_RATES["gone_away"] + CONTACT_RATES["inactive"]:
            p.status = "inactive"
        p.phone_recall = rng.random() >= CONTACT_RATES["no_phone_recall"]
        p.no_recall = rng.random() < CONTACT_RATES["no_recall"]
        p.sms_consent = (rng.random() < 0.85) if p.mobile else None
        p.email_consent = (rng.random() < 0.75) if p.email else None
    _child_conditions(patients, random.Random(seed * 47 + 3), today)
    for start in range(0, len(patients) - SHOWCASE_EVERY + 1, SHOWCASE_EVERY):
        _showcase(patients[start : start + SHOWCASE_EVERY], today)


# The 2002 memorandum's child conditions, per child (age today): a binocular vision anomaly (squint,
# amblyopia) in any child, a corrected refractive error (in glasses) under 7, rapidly progressing
# myopia from 7 to 15.
CHILD_RATES = {"binocular_vision_anomaly": 0.08, "corrected_refractive_error": 0.3, "progressive_myopia": 0.1}


def _child_conditions(patients: list[SeedPatient], rng: random.Random, today: date) -> None:
    for p in patients:
        age = _age(p.date_of_birth, today)
        if age is None or age >= 16:
            continue
        wanted = ["binocular_vision_anomaly"]
        wanted.append("corrected_refractive_error" if age < 7 else "progressive_myopia")
        for flag in wanted:
            if rng.random() < CHILD_RATES[flag] and flag not in p.flags:
                p.flags.append(flag)


def _age(dob: date | None, today: date) -> int | None:
    if dob is None:
        return None
    return today.year - dob.year - ((today.month, today.day) < (dob.month, dob.day))


def _after(day: date | None, today: date, rng: random.Random) -> date:
    start = day or today - timedelta(days=730)
    return start + timedelta(days=int(rng.random() * max((today - start).days - 1, 1)))


def _join_household(child: SeedPatient, parent: SeedPatient, *, share_mobile: bool) -> None:
    child.last_name = parent.last_name
    child.address_line1, child.town, child.postcode = parent.address_line1, parent.town, parent.postcode
    child.landline = parent.landline
    if share_mobile or not (child.landline or child.mobile):
        child.mobile = parent.mobile
    child.guardian_name = _adult_name(parent)
    child.email = None


def _due(p: SeedPatient, today: date, months_ago: int) -> None:
    """Make `p` due: a last test `months_ago` months back and no PMS recall date."""
    p.last_eye_test = today - timedelta(days=months_ago * 31)
    p.recall_due = None


def _showcase(block: list[SeedPatient], today: date) -> None:
    parent, child, deceased, objector, moved, archived = (block[i] for i in (6, 7, 12, 18, 24, 30))
    parent.date_of_birth = today - timedelta(days=41 * 365 + 100)
    parent.title = "Mrs" if parent.title in ("Miss", "Master") else parent.title
    parent.status, parent.status_date, parent.phone_recall, parent.no_recall = "active", None, True, False
    parent.landline = parent.landline or child.landline
    if not (parent.mobile or parent.landline):
        parent.mobile = child.mobile
    _due(parent, today, 26)
    child.date_of_birth = today - timedelta(days=9 * 365 + 40)
    child.title = "Master" if child.title in ("Mr", "Dr", "Master") else "Miss"
    child.status, child.status_date, child.phone_recall, child.no_recall = "active", None, True, False
    child.mobile = None
    _join_household(child, parent, share_mobile=True)
    child.flags = ["binocular_vision_anomaly"]  # a squint: the memorandum's 6-month rule for 7-15
    _due(child, today, 26)  # overdue by either count, even where the PMS recalls every 2 years
    deceased.status, deceased.status_date = "deceased", today - timedelta(days=40)
    _due(deceased, today, 30)
    objector.status, objector.phone_recall, objector.no_recall = "active", False, False
    _due(objector, today, 28)
    moved.status, moved.status_date = "gone_away", None
    _due(moved, today, 27)
    archived.status, archived.status_date = "inactive", None
    _due(archived, today, 29)


def _title(rand: Callable[[], float], is_female: bool, age: int) -> str:
    if age < 16:
        return "Miss" if is_female else "Master"
    if rand() < 0.03:
        return "Dr"
    if not is_female:
        return "Mr"
    roll = rand()
    return "Mrs" if roll < 0.5 else "Ms" if roll < 0.8 or age >= 40 else "Miss"


# --- clinicians, appointments and clinical records --------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeedClinician:
    """An optometrist with a GOC registration number (01- optometrists, 02- dispensing opticians)."""

    code: str
    name: str
    goc_number: str


@dataclass(frozen=True, slots=True)
class SeedStaff:
    """Staff a PMS lists beside its seeded clinicians, for the GOC checks' odd cases: the GOC number
    as the practice typed it (None: the PMS holds none) and the register's status for it (None: the
    number is not on the register)."""

    code: str
    name: str
    role: str
    goc_number: str | None
    register_status: str | None


# The same in every practice of the PMS sandboxes that list them (Acuitas, Optisoft); the numbers lie
# outside the seeded clinicians' (10000-39999) and Optisoft's leaver's (40000-49999).
ODD_STAFF: tuple[SeedStaff, ...] = (
    SeedStaff("S91", "Hannah Price", "Optometrist", "01-52841", "suspended"),
    SeedStaff("S92", "Owen Lloyd", "Dispensing Optician", "02-53917", "erased"),
    SeedStaff("S93", "Ravi Shah", "Locum Optometrist", "01-61204", None),  # well formed, not on the register
    SeedStaff("S94", "Megan Hughes", "Optometrist", "O1-27735", None),  # typed with a letter O: invalid
    SeedStaff("S95", "Claire Dunn", "Optical Assistant", None, None),  # no GOC number held
)


@dataclass(slots=True)
class SeedAppointment:
    index: int
    patient_index: int
    starts_at: datetime  # UK wall-clock time, naive: practice diaries are kept in local time
    duration_minutes: int
    status: str  # canonical: booked, completed, cancelled, no_show
    appointment_type: str  # canonical: eye_test, contact_lens, follow_up, collection
    clinician: SeedClinician
    notes: str | None = None
    updated_at: datetime = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class SeedClinical:
    index: int
    patient_index: int
    exam_date: date
    flags: list[str]
    notes: str | None
    iop_right: float | None
    iop_left: float | None
    clinician: SeedClinician
    updated_at: datetime = datetime(2000, 1, 1, tzinfo=UTC)


def seed_clinicians(seed: int = 7, n: int = 4) -> list[SeedClinician]:
    rng = random.Random(seed * 31 + 5)
    fake = Faker("en_GB")
    fake.seed_instance(seed * 31 + 5)
    clinicians = []
    for i in range(n):
        prefix = "01" if i < n - 1 else "02"
        clinicians.append(SeedClinician(f"C{i + 1:02d}", fake.name(), f"{prefix}-{rng.randint(10000, 39999)}"))
    return clinicians


_APPOINTMENT_SLOTS = tuple(time(h, m) for h in range(9, 17) for m in (0, 30) if (h, m) != (13, 0))


def seed_appointments(
    patients: Sequence[SeedPatient], seed: int = 7, today: date | None = None
) -> list[SeedAppointment]:
    """Past eye tests on each patient's last test date (completed), a few cancellations and no-shows,
    and ~5% of patients with a future booking (which must keep them off the call list)."""
    today = today or date.today()
    rng = random.Random(seed * 17 + 3)
    clinicians = seed_clinicians(seed)
    optometrists = [c for c in clinicians if c.goc_number.startswith("01-")]
    out: list[SeedAppointment] = []

    def add(p: SeedPatient, day: date, status: str, kind: str, duration: int = 30) -> None:
        slot = _APPOINTMENT_SLOTS[rng.randrange(len(_APPOINTMENT_SLOTS))]
        out.append(
            SeedAppointment(
                index=len(out) + 1,
                patient_index=p.index,
                starts_at=datetime.combine(day, slot),
                duration_minutes=duration,
                status=status,
                appointment_type=kind,
                clinician=rng.choice(optometrists if kind == "eye_test" else clinicians),
                notes=None,
                updated_at=p.updated_at,
            )
        )

    for p in patients:
        if p.last_eye_test:
            add(p, p.last_eye_test, "completed", "eye_test")
        roll = rng.random()
        if roll < 0.05:
            add(p, today + timedelta(days=rng.randint(1, 60)), "booked", "eye_test")
        elif roll < 0.07:
            add(p, today - timedelta(days=rng.randint(1, 200)), "cancelled", "eye_test")
        elif roll < 0.08:
            add(p, today - timedelta(days=rng.randint(1, 200)), "no_show", "eye_test")
        elif roll < 0.12:
            add(p, today - timedelta(days=rng.randint(1, 300)), "completed", "contact_lens", 20)
    return out


_CLINICAL_NOTES = {
    "diabetic": ("Type 2 diabetes - annual review", "Diabetic, no retinopathy seen", "T1DM, fundus photos taken"),
    "glaucoma_suspect": ("Glaucoma suspect - discs cupped, fields to repeat", "Suspicious disc appearance"),
    "ocular_hypertension": ("OHT, under HES monitoring", "Raised IOP, referred for OHT assessment"),
    "glaucoma_family_history": ("Family history of glaucoma (mother)", "FH glaucoma - father"),
    "glaucoma": ("POAG on drops", "Glaucoma, under hospital care"),
}


def seed_clinical_records(
    patients: Sequence[SeedPatient], seed: int = 7, today: date | None = None
) -> list[SeedClinical]:
    """One exam record per tested patient, carrying the patient's flags, notes and IOPs."""
    rng = random.Random(seed * 13 + 11)
    optometrists = [c for c in seed_clinicians(seed) if c.goc_number.startswith("01-")]
    out: list[SeedClinical] = []
    for p in patients:
        if not p.last_eye_test:
            continue
        raised = "ocular_hypertension" in p.flags
        base = rng.uniform(22.5, 27.0) if raised else rng.uniform(11.0, 20.0)
        notes = "; ".join(rng.choice(_CLINICAL_NOTES[f]) for f in p.flags if f in _CLINICAL_NOTES) or p.clinical_notes
        out.append(
            SeedClinical(
                index=len(out) + 1,
                patient_index=p.index,
                exam_date=p.last_eye_test,
                flags=list(p.flags),
                notes=notes,
                iop_right=round(base + rng.uniform(-1, 1), 1) if rng.random() < 0.9 else None,
                iop_left=round(base + rng.uniform(-1, 1), 1) if rng.random() < 0.9 else None,
                clinician=rng.choice(optometrists),
                updated_at=p.updated_at,
            )
        )
    return out
