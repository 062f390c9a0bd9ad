"""The practice's own Optisoft database: Optisoft-shaped tables in a real SQL database (SQLite here,
SQL Server on a real practice server), the seeding that stands in for years of use, and every SQL
statement that is ever run against it.

Only the Optisoft Connector process opens this database. Two kinds of code in that process use it:

- `run_operation`: the fixed, named, parameterised queries and writes the connector performs for
  NVC. NVC never sends SQL; it names an operation (`patients.list`, `diary.book`, ...) and the
  connector runs its own statement after checking the database login NVC supplied against
  `DbUsers`. There is no operation that deletes anything.
- `StaffDesk`: what people at the practice do in Optisoft itself (edit a patient, record an exam),
  used by the sandbox's inspection hooks.

Conventions, as in Optisoft: ids are integers; dates are ISO `YYYY-MM-DD`; every timestamp
(`ModifiedDate`, `Diary.StartDateTime`, `ContactLog.ContactDate`) is UK wall-clock time
(Europe/London, GMT or BST) with no offset, because that is how the practice server's clock and
diary run. Every statement executed is appended to a JSON-lines SQL log (statement text with its
`?` placeholders, never the bound values: no patient data or login names in the log).

The patient's record and Recall tab, as Optisoft.NET keeps them:

- Status ticks on `Patients`: `Deceased` (with `DeceasedDate`, the date of death), `GoneAway`
  (post came back: the practice has lost them) and `Inactive` (archived / left the practice).
- Contact ticks: `EmailConsent` and `SMSConsent` (the Recall tab's "agreed to receive Email / SMS"
  boxes), `NoTelephoneRecall` (this sandbox's design for "do not phone about recalls": a patient
  tick, because send methods belong to a recall category that many patients share) and `NoRecall`
  (no recall by any method). `ParentGuardian` is the parent or guardian named on a child's record.
- Up to three recall categories per patient, one per recall type (`Recalls.RecallType`: `ST`
  Spectacles, `CL` Contact Lenses, `SC` Schemes), each with a `StartDate` (normally the last exam),
  the date the category falls due (`DueDate`: start date + band 1's months), the band whose letter
  goes next and when (`NextBand`, `NextLetterDate`) and the "Suppressed by Appointment" tick
  (`SuppressedByAppt`: staff booking a future appointment chose to hold the next recall letter).
- `RecallCategories` and their `RecallBands`: up to 7 bands per category, each a number of months
  from the category's start date (not from the previous band), a letter template and a send method
  (Letter, Email, SMS or Telephone).

`patients.list` / `patients.get` serve all of it on the patient row: the ticks as columns, the
Recall tab as one JSON column (`RecallTab`, as SQL Server's `FOR JSON` would build it) and the tab's
"Next Appointment" (`NextAppointment`: the first booked diary entry from today on).

Standard library only (the seed data is imported when a database is first installed), so the
connector process starts quickly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import secrets
import sqlite3
import threading
import time
from calendar import monthrange
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

UK = ZoneInfo("Europe/London")
PATIENT_ID_BASE = 10_000  # Optisoft patient numbers: seeded patient n is PatientID 10000 + n
OPTISOFT_VERSION = "9.4.2 (sandbox)"
PAGE_LIMIT_MAX = 1000
GOC_NUMBER = re.compile(r"^0[12]-\d{5}$")
NVC_MARKER = re.compile(r"\[NVC:([A-Za-z0-9_.:-]{1,80})\]")
_STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}( \d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?$")
_MINUTE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}$")

# Canonical values <-> Optisoft's codes and labels.
STATUS_LABELS = {"booked": "Booked", "completed": "Completed", "cancelled": "Cancelled", "no_show": "DNA"}
APPT_TYPE_CODES = {"eye_test": "ST", "contact_lens": "CLA", "follow_up": "FU", "collection": "COL", "other": "OTH"}
ALERT_LABELS = {
    "diabetic": "Diabetic",
    "glaucoma": "Glaucoma",
    "glaucoma_suspect": "Glaucoma suspect",
    "ocular_hypertension": "OHT",
    "glaucoma_family_history": "FH glaucoma",
    "binocular_vision_anomaly": "Squint",
    "corrected_refractive_error": "Corrected refractive error",
    "progressive_myopia": "Progressive myopia",
}
RECALL_SIGHT_TEST = "ST"  # the Spectacles recall category: the eye test
RECALL_CONTACT_LENS = "CL"
RECALL_SCHEMES = "SC"  # eyecare plans and other schemes
# The practice's recall categories: (CategoryID, recall type, description, bands). A band is
# (months from the start date, letter template, send method); Optisoft allows up to 7 per category.
RECALL_CATEGORIES: tuple[tuple[int, str, str, tuple[tuple[int, str, str], ...]], ...] = (
    (1, "ST", "Spectacles 2 yearly", (
        (24, "Recall 1", "Letter"), (25, "Recall reminder", "SMS"), (26, "Recall 2", "Email"),
        (27, "Recall 2", "Letter"), (28, "Recall phone list", "Telephone"), (30, "Final reminder", "Letter"),
        (36, "Lapsed patient", "Letter"),
    )),
    (2, "ST", "Spectacles annual", (
        (12, "Recall 1", "Letter"), (13, "Recall reminder", "SMS"), (15, "Recall 2", "Letter"),
        (18, "Recall phone list", "Telephone"),
    )),
    (3, "ST", "Child annual", ((12, "Child recall", "Letter"), (13, "Recall reminder", "SMS"), (14, "Recall 2", "Letter"))),
    (4, "CL", "Contact lens aftercare", ((12, "CL aftercare", "Letter"), (13, "CL reminder", "SMS"))),
    (5, "CL", "Myopia control review", ((6, "Myopia control review", "Letter"), (7, "CL reminder", "SMS"))),
    (6, "SC", "Eyecare plan annual", ((12, "Eyecare plan review", "Email"), (13, "Eyecare plan review", "Letter"))),
)  # fmt: skip
CATEGORY_TWO_YEARLY, CATEGORY_ANNUAL, CATEGORY_CHILD, CATEGORY_CL, CATEGORY_MYOPIA, CATEGORY_PLAN = 1, 2, 3, 4, 5, 6
# The canonical contact fields (seed.SeedPatient's names) the practice desk can change.
CONTACT_FIELDS = ("status", "status_date", "phone_recall", "no_recall", "sms_consent", "email_consent", "guardian_name")
STATUSES = ("active", "deceased", "gone_away", "inactive")

SCHEMA = """
CREATE TABLE PracticeDetails (
    PracticeName TEXT NOT NULL, Branch TEXT, OptisoftVersion TEXT NOT NULL
);
CREATE TABLE Clinicians (
    ClinicianID INTEGER PRIMARY KEY, Name TEXT NOT NULL, GOCNumber TEXT UNIQUE, Role TEXT NOT NULL,
    Active INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE Patients (
    PatientID INTEGER PRIMARY KEY, Title TEXT, Forename TEXT, Surname TEXT, DOB TEXT,
    Mobile TEXT, HomePhone TEXT, Email TEXT, Address1 TEXT, Town TEXT, Postcode TEXT,
    LastExamDate TEXT, Notes TEXT, Alerts TEXT,
    Deceased INTEGER NOT NULL DEFAULT 0, DeceasedDate TEXT, GoneAway INTEGER NOT NULL DEFAULT 0,
    Inactive INTEGER NOT NULL DEFAULT 0, NoRecall INTEGER NOT NULL DEFAULT 0,
    NoTelephoneRecall INTEGER NOT NULL DEFAULT 0, EmailConsent INTEGER NOT NULL DEFAULT 0,
    SMSConsent INTEGER NOT NULL DEFAULT 0, ParentGuardian TEXT,
    CreatedDate TEXT, ModifiedDate TEXT NOT NULL
);
CREATE INDEX IX_Patients_Modified ON Patients (ModifiedDate, PatientID);
CREATE TABLE RecallCategories (
    CategoryID INTEGER PRIMARY KEY, RecallType TEXT NOT NULL CHECK (RecallType IN ('ST', 'CL', 'SC')),
    Description TEXT NOT NULL, Active INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE RecallBands (
    CategoryID INTEGER NOT NULL REFERENCES RecallCategories (CategoryID),
    Band INTEGER NOT NULL CHECK (Band BETWEEN 1 AND 7), Months INTEGER NOT NULL CHECK (Months > 0),
    Letter TEXT NOT NULL, SendMethod TEXT NOT NULL CHECK (SendMethod IN ('Letter', 'Email', 'SMS', 'Telephone')),
    PRIMARY KEY (CategoryID, Band)
);
CREATE TABLE Recalls (
    RecallID INTEGER PRIMARY KEY, PatientID INTEGER NOT NULL REFERENCES Patients (PatientID),
    RecallType TEXT NOT NULL CHECK (RecallType IN ('ST', 'CL', 'SC')),
    CategoryID INTEGER REFERENCES RecallCategories (CategoryID), StartDate TEXT, DueDate TEXT NOT NULL,
    NextBand INTEGER NOT NULL DEFAULT 1, NextLetterDate TEXT, SuppressedByAppt INTEGER NOT NULL DEFAULT 0,
    ModifiedDate TEXT NOT NULL
);
CREATE UNIQUE INDEX IX_Recalls_Patient ON Recalls (PatientID, RecallType);
CREATE INDEX IX_Recalls_Modified ON Recalls (ModifiedDate);
CREATE TABLE Diary (
    DiaryID INTEGER PRIMARY KEY, PatientID INTEGER NOT NULL REFERENCES Patients (PatientID),
    StartDateTime TEXT NOT NULL, Duration INTEGER NOT NULL, ApptType TEXT NOT NULL, Status TEXT NOT NULL,
    ClinicianID INTEGER REFERENCES Clinicians (ClinicianID), Comment TEXT, CreatedBy TEXT,
    ModifiedDate TEXT NOT NULL
);
CREATE INDEX IX_Diary_Modified ON Diary (ModifiedDate, DiaryID);
CREATE INDEX IX_Diary_Clinician_Start ON Diary (ClinicianID, StartDateTime);
CREATE INDEX IX_Diary_Patient_Start ON Diary (PatientID, StartDateTime);
CREATE TABLE Exams (
    ExamID INTEGER PRIMARY KEY, PatientID INTEGER NOT NULL REFERENCES Patients (PatientID),
    ExamDate TEXT NOT NULL, IOPR REAL, IOPL REAL, Alerts TEXT, Notes TEXT,
    ClinicianID INTEGER REFERENCES Clinicians (ClinicianID), ModifiedDate TEXT NOT NULL
);
CREATE INDEX IX_Exams_Modified ON Exams (ModifiedDate, ExamID);
CREATE TABLE ContactLog (
    LogID INTEGER PRIMARY KEY, PatientID INTEGER NOT NULL REFERENCES Patients (PatientID),
    ContactDate TEXT NOT NULL, Method TEXT NOT NULL, Category TEXT, Outcome TEXT, Notes TEXT, CreatedBy TEXT
);
CREATE INDEX IX_ContactLog_Patient ON ContactLog (PatientID);
CREATE TABLE DbUsers (
    Username TEXT PRIMARY KEY, PasswordHash TEXT NOT NULL, CanWrite INTEGER NOT NULL DEFAULT 0
);
"""


# --- time and passwords ----------------------------------------------------------------------------


def uk_stamp(value: datetime) -> str:
    """An aware instant as Optisoft stores it: UK wall-clock time to the millisecond, no offset."""
    local = value.astimezone(UK)
    return local.strftime("%Y-%m-%d %H:%M:%S.") + f"{local.microsecond // 1000:03d}"


def uk_minute(value: datetime) -> str:
    return value.astimezone(UK).strftime("%Y-%m-%d %H:%M")


def hash_password(password: str, *, iterations: int = 20_000, salt: str | None = None) -> str:
    salt = salt or secrets.token_hex(8)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations).hex()
    return f"pbkdf2_sha256${iterations}${salt}${digest}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), int(iterations)).hex()
    except ValueError:
        return False
    return hmac.compare_digest(got, digest)


def add_months(day: date, months: int) -> date:
    """Calendar months, clamped to the month's end (31 Jan + 1 month = 28/29 Feb), as Optisoft counts bands."""
    total = day.year * 12 + day.month - 1 + months
    year, month = divmod(total, 12)
    return date(year, month + 1, min(day.day, monthrange(year, month + 1)[1]))


def _iso(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value.isoformat() if isinstance(value, date) else date.fromisoformat(str(value)[:10]).isoformat()


def contact_columns(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical contact fields (`CONTACT_FIELDS`, seed.SeedPatient's names) as Optisoft's `Patients` columns.

    Optisoft keeps a status as ticks (only one set), and only a date of death: `status_date` of any
    other status has nowhere to go. Unrecorded consent (None) is an unticked box.
    """
    unknown = set(changes) - set(CONTACT_FIELDS)
    if unknown:
        raise ValueError(f"not contact fields: {sorted(unknown)}")
    out: dict[str, Any] = {}
    status = changes.get("status")
    if "status" in changes:
        status = status or "active"
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        out |= {"Deceased": int(status == "deceased"), "GoneAway": int(status == "gone_away")}
        out["Inactive"] = int(status == "inactive")
        if status != "deceased":
            out["DeceasedDate"] = None
    if "status_date" in changes and status in (None, "deceased"):
        out["DeceasedDate"] = _iso(changes["status_date"])
    if "phone_recall" in changes:
        out["NoTelephoneRecall"] = int(changes["phone_recall"] is False)
    if "no_recall" in changes:
        out["NoRecall"] = int(bool(changes["no_recall"]))
    if "sms_consent" in changes:
        out["SMSConsent"] = int(bool(changes["sms_consent"]))
    if "email_consent" in changes:
        out["EmailConsent"] = int(bool(changes["email_consent"]))
    if "guardian_name" in changes:
        out["ParentGuardian"] = changes["guardian_name"] or None
    return out


# --- the logged connection -----------------------------------------------------------------------


class SqlLog:
    """Appends one JSON line per statement: `{"at", "pid", "by", "sql"[, "rows"]}` (never the values)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()

    def write(self, by: str, sql: str, rows: int | None = None) -> None:
        if self.path is None:
            return
        entry: dict[str, Any] = {"at": time.time(), "pid": os.getpid(), "by": by, "sql": " ".join(sql.split())}
        if rows is not None:
            entry["rows"] = rows
        with self._lock, self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")


class PracticeDb:
    """One connection to the practice database; every statement goes through `execute` and is logged.

    Autocommit mode (`isolation_level=None`): transactions are explicit `BEGIN IMMEDIATE` ... `COMMIT`,
    so the log holds exactly what the database ran.
    """

    def __init__(self, path: Path, log: SqlLog, by: str):
        self.path = path
        self.log = log
        self.by = by
        self.conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        self.lock = threading.RLock()
        self.execute("PRAGMA journal_mode=WAL")
        self.execute("PRAGMA foreign_keys=ON")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self.lock:
            self.log.write(self.by, sql)
            return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.lock:
            self.log.write(self.by, sql, rows=len(rows))
            self.conn.executemany(sql, rows)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[str], list[list[Any]]]:
        with self.lock:
            cursor = self.execute(sql, params)
            columns = [d[0] for d in cursor.description or ()]
            return columns, [list(r) for r in cursor.fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self.lock:
            return self.execute(sql, params).fetchone()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.lock:
            self.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.execute("ROLLBACK")
                raise
            self.execute("COMMIT")

    def close(self) -> None:
        with self.lock:
            self.conn.close()


# --- installing a practice -------------------------------------------------------------------------


def install(db: PracticeDb, spec: dict[str, Any]) -> None:
    """Create the schema and fill it as years of use would: `spec` has `patients`, `seed`, `today`
    (ISO, optional), `practiceName` (optional) and `users` (`username`, `passwordHash`, `canWrite`)."""
    from sandboxes.seed import (
        ODD_STAFF,
        SeedClinician,
        seed_appointments,
        seed_clinical_records,
        seed_clinicians,
        seed_patients,
    )

    seed = int(spec.get("seed", 7))
    today = date.fromisoformat(spec["today"]) if spec.get("today") else date.today()
    patients = seed_patients(int(spec.get("patients", 50)), seed=seed, today=today)
    clinicians = seed_clinicians(seed)
    rng = random.Random(seed * 7919 + 1)
    # A locum optometrist who has left the practice: still on file (old exams name them), not bookable.
    leaver = SeedClinician("C99", "Locum Optometrist (left)", f"01-{rng.randint(40000, 49999)}")
    clinician_ids = {c.code: n for n, c in enumerate([*clinicians, leaver], 1)}
    name = spec.get("practiceName") or f"{rng.choice(patients).last_name if patients else 'High Street'} Opticians"
    appointments = seed_appointments(patients, seed=seed, today=today)
    booked_ahead = {a.patient_index for a in appointments if a.status == "booked" and a.starts_at.date() >= today}
    recall_rng = random.Random(seed * 7919 + 2)  # the Recall tab's own draws: the rest of the seed is unchanged

    with db.lock:
        for statement in (s.strip() for s in SCHEMA.split(";")):
            if statement:
                db.execute(statement)
        with db.transaction():
            db.execute(
                "INSERT INTO PracticeDetails (PracticeName, Branch, OptisoftVersion) VALUES (?, ?, ?)",
                (name, "Main", OPTISOFT_VERSION),
            )
            db.executemany(
                "INSERT INTO Clinicians (ClinicianID, Name, GOCNumber, Role, Active) VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        clinician_ids[c.code],
                        c.name,
                        c.goc_number,
                        "Optometrist" if c.goc_number.startswith("01-") else "Dispensing Optician",
                        0 if c is leaver else 1,
                    )
                    for c in [*clinicians, leaver]
                ]
                # Staff beside them for the GOC checks' odd cases (suspended, erased, not on the
                # register, a mistyped number, none): active, after the leaver.
                + [(len(clinician_ids) + n, s.name, s.goc_number, s.role, 1) for n, s in enumerate(ODD_STAFF, 1)],
            )
            db.executemany(
                "INSERT INTO DbUsers (Username, PasswordHash, CanWrite) VALUES (?, ?, ?)",
                [(u["username"], u["passwordHash"], 1 if u.get("canWrite") else 0) for u in spec.get("users", [])],
            )
            db.executemany(
                "INSERT INTO RecallCategories (CategoryID, RecallType, Description) VALUES (?, ?, ?)",
                [(cid, kind, description) for cid, kind, description, _ in RECALL_CATEGORIES],
            )
            db.executemany(
                "INSERT INTO RecallBands (CategoryID, Band, Months, Letter, SendMethod) VALUES (?, ?, ?, ?, ?)",
                [
                    (cid, band, months, letter, method)
                    for cid, _, _, bands in RECALL_CATEGORIES
                    for band, (months, letter, method) in enumerate(bands, 1)
                ],
            )
            patient_rows, recall_rows, contact_rows = [], [], []
            for p in patients:
                pid = PATIENT_ID_BASE + p.index
                modified = uk_stamp(p.updated_at)
                alerts = [ALERT_LABELS.get(f, f) for f in p.flags]
                wears_lenses = bool(p.clinical_notes and ("contact lens" in p.clinical_notes.lower()))
                if wears_lenses:
                    alerts.append("CL wearer")  # an alert Optisoft practices use that is no recall risk
                contact = contact_columns({f: getattr(p, f) for f in CONTACT_FIELDS})
                patient_rows.append(
                    (
                        pid,
                        p.title,
                        p.first_name,
                        p.last_name,
                        p.date_of_birth.isoformat() if p.date_of_birth else None,
                        p.mobile,
                        p.landline,
                        p.email,
                        p.address_line1,
                        p.town,
                        p.postcode,
                        p.last_eye_test.isoformat() if p.last_eye_test else None,
                        p.clinical_notes,
                        "; ".join(alerts) or None,
                        *(contact[c] for c in _CONTACT_COLUMNS),
                        modified,
                        modified,
                    )
                )
                first_letter_sent = bool(p.recall_due and p.recall_due < today and rng.random() < 0.5)
                if first_letter_sent:
                    contact_rows.append((pid, f"{p.recall_due.isoformat()} 10:00:00.000", "Letter", "Recall 1", "Sent"))
                recall_rows += _seed_recall_tab(
                    p, pid, modified, today, wears_lenses, first_letter_sent, p.index in booked_ahead, recall_rng
                )
            db.executemany(
                "INSERT INTO Patients (PatientID, Title, Forename, Surname, DOB, Mobile, HomePhone, Email, Address1,"
                f" Town, Postcode, LastExamDate, Notes, Alerts, {', '.join(_CONTACT_COLUMNS)}, CreatedDate,"
                f" ModifiedDate) VALUES ({', '.join('?' * (16 + len(_CONTACT_COLUMNS)))})",
                patient_rows,
            )
            db.executemany(
                "INSERT INTO Recalls (PatientID, RecallType, CategoryID, StartDate, DueDate, NextBand, NextLetterDate,"
                " SuppressedByAppt, ModifiedDate) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                recall_rows,
            )
            db.executemany(
                "INSERT INTO ContactLog (PatientID, ContactDate, Method, Category, Outcome, CreatedBy)"
                " VALUES (?, ?, ?, ?, ?, 'OPTISOFT')",
                contact_rows,
            )
            db.executemany(
                "INSERT INTO Diary (PatientID, StartDateTime, Duration, ApptType, Status, ClinicianID, Comment,"
                " CreatedBy, ModifiedDate) VALUES (?, ?, ?, ?, ?, ?, ?, 'RECEPTION', ?)",
                [
                    (
                        PATIENT_ID_BASE + a.patient_index,
                        a.starts_at.strftime("%Y-%m-%d %H:%M"),
                        a.duration_minutes,
                        APPT_TYPE_CODES.get(a.appointment_type, "OTH"),
                        STATUS_LABELS[a.status],
                        clinician_ids[a.clinician.code],
                        a.notes,
                        uk_stamp(a.updated_at),
                    )
                    for a in appointments
                ],
            )
            db.executemany(
                "INSERT INTO Exams (PatientID, ExamDate, IOPR, IOPL, Alerts, Notes, ClinicianID, ModifiedDate)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        PATIENT_ID_BASE + r.patient_index,
                        r.exam_date.isoformat(),
                        r.iop_right,
                        r.iop_left,
                        "; ".join(ALERT_LABELS.get(f, f) for f in r.flags) or None,
                        r.notes,
                        clinician_ids[r.clinician.code],
                        uk_stamp(r.updated_at),
                    )
                    for r in seed_clinical_records(patients, seed=seed, today=today)
                ],
            )


_CONTACT_COLUMNS = (
    "Deceased", "DeceasedDate", "GoneAway", "Inactive", "NoRecall", "NoTelephoneRecall", "EmailConsent", "SMSConsent",
    "ParentGuardian",
)  # fmt: skip
_BANDS = {cid: bands for cid, _, _, bands in RECALL_CATEGORIES}


def _seed_recall_tab(
    p: Any,
    pid: int,
    modified: str,
    today: date,
    wears_lenses: bool,
    first_letter_sent: bool,
    booked_ahead: bool,
    rng: random.Random,
) -> list[tuple[Any, ...]]:
    """A seeded patient's Recall tab rows: (PatientID, RecallType, CategoryID, StartDate, DueDate,
    NextBand, NextLetterDate, SuppressedByAppt, ModifiedDate).

    Spectacles: the seed's recall date is start date + band 1 of an annual (child, or flagged/70+)
    or 2-yearly category, so the date the category falls due is the seed's recall date exactly.
    Contact lens wearers get an aftercare category, myopia-control children a 6-monthly one, and a
    few adults an eyecare plan (Schemes). Staff booking a future appointment tick "Suppressed by
    Appointment" on most Spectacles recalls.
    """
    rows: list[tuple[Any, ...]] = []
    age = None
    if p.date_of_birth:
        age = (
            today.year
            - p.date_of_birth.year
            - ((today.month, today.day) < (p.date_of_birth.month, p.date_of_birth.day))
        )
    start = p.last_eye_test or today
    if p.recall_due:
        months = (p.recall_due.year - start.year) * 12 + p.recall_due.month - start.month
        cid = (
            CATEGORY_TWO_YEARLY if months >= 24 else CATEGORY_CHILD if age is not None and age < 16 else CATEGORY_ANNUAL
        )
        bands = _BANDS[cid]
        if add_months(start, bands[0][0]) != p.recall_due:  # not from the last test: count back from the date
            start = add_months(p.recall_due, -bands[0][0])
        next_band, next_letter = 1, p.recall_due
        if first_letter_sent and len(bands) > 1:  # printed on the due date; band 2 counts on from there
            next_band, next_letter = 2, add_months(p.recall_due, bands[1][0] - bands[0][0])
        suppressed = int(booked_ahead and rng.random() < 0.6)
        rows.append(
            (pid, RECALL_SIGHT_TEST, cid, start.isoformat(), p.recall_due.isoformat(), next_band,
             next_letter.isoformat(), suppressed, modified)
        )  # fmt: skip
    lens_category = None
    if wears_lenses:
        lens_category = CATEGORY_CL
    elif p.clinical_notes and "misight" in p.clinical_notes.lower():
        lens_category = CATEGORY_MYOPIA
    base = p.last_eye_test or today
    if lens_category is not None:  # contact lens aftercare: a different recall, not the eye test
        due = add_months(base, _BANDS[lens_category][0][0]).isoformat()
        rows.append((pid, RECALL_CONTACT_LENS, lens_category, base.isoformat(), due, 1, due, 0, modified))
    if age is not None and age >= 18 and p.last_eye_test and rng.random() < 0.08:
        due = add_months(p.last_eye_test, _BANDS[CATEGORY_PLAN][0][0]).isoformat()
        rows.append((pid, RECALL_SCHEMES, CATEGORY_PLAN, p.last_eye_test.isoformat(), due, 1, due, 0, modified))
    return rows


# --- the connector's operations ------------------------------------------------------------------


class OperationError(Exception):
    """A refusal the connector reports to the relay as `{"code", "message"}` (codes are Optisoft's)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# The Recall tab as one JSON column: each recall category the patient has, with its bands.
_RECALL_TAB = (
    "(SELECT json_group_array(json_object('recallType', r.RecallType, 'category', c.Description,"
    " 'startDate', r.StartDate, 'dueDate', r.DueDate, 'nextBand', r.NextBand, 'nextLetterDate', r.NextLetterDate,"
    " 'suppressedByAppointment', r.SuppressedByAppt, 'bands', json((SELECT json_group_array(json_object("
    "'band', b.Band, 'months', b.Months, 'letter', b.Letter, 'sendMethod', b.SendMethod))"
    " FROM RecallBands b WHERE b.CategoryID = r.CategoryID)))) FROM Recalls r"
    " LEFT JOIN RecallCategories c ON c.CategoryID = r.CategoryID WHERE r.PatientID = p.PatientID) AS RecallTab"
)
_PATIENT_SELECT = (
    "SELECT p.PatientID, p.Title, p.Forename, p.Surname, p.DOB, p.Mobile, p.HomePhone, p.Email, p.Address1,"
    " p.Town, p.Postcode, p.LastExamDate, p.Notes, p.Alerts,"
    " (SELECT MIN(r.DueDate) FROM Recalls r WHERE r.PatientID = p.PatientID AND r.RecallType = 'ST') AS RecallDue,"
    " p.Deceased, p.DeceasedDate, p.GoneAway, p.Inactive, p.NoRecall, p.NoTelephoneRecall, p.EmailConsent,"
    f" p.SMSConsent, p.ParentGuardian, {_RECALL_TAB},"
    " (SELECT MIN(d.StartDateTime) FROM Diary d WHERE d.PatientID = p.PatientID AND d.Status = 'Booked'"
    " AND d.StartDateTime >= date('now')) AS NextAppointment,"
    " p.ModifiedDate FROM Patients p"
)
_DIARY_SELECT = (
    "SELECT d.DiaryID, d.PatientID, d.StartDateTime, d.Duration, d.ApptType, d.Status, d.ClinicianID,"
    " c.Name AS ClinicianName, c.GOCNumber, d.Comment, d.ModifiedDate"
    " FROM Diary d LEFT JOIN Clinicians c ON c.ClinicianID = d.ClinicianID"
)
_EXAM_SELECT = (
    "SELECT e.ExamID, e.PatientID, e.ExamDate, e.IOPR, e.IOPL, e.Alerts, e.Notes, e.ClinicianID,"
    " c.Name AS ClinicianName, c.GOCNumber, e.ModifiedDate"
    " FROM Exams e LEFT JOIN Clinicians c ON c.ClinicianID = e.ClinicianID"
)


def _stamp_param(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not _STAMP.match(value):
        raise OperationError("INVALID_PARAMS", f"{name} must be a 'YYYY-MM-DD HH:MM:SS.fff' UK local time.")
    return value


def _int_param(params: dict[str, Any], name: str) -> int:
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise OperationError("INVALID_PARAMS", f"{name} must be an integer.")
    try:
        return int(value)
    except ValueError:
        raise OperationError("INVALID_PARAMS", f"{name} must be an integer.") from None


def _keyset_page(db: PracticeDb, select: str, stamp_col: str, id_col: str, params: dict[str, Any]) -> dict[str, Any]:
    """One page in `(ModifiedDate, id)` order: `modifiedSince` (inclusive), `after` = [stamp, id], `limit`."""
    limit = _int_param({"limit": params.get("limit", 500)}, "limit")
    if not 1 <= limit <= PAGE_LIMIT_MAX:
        raise OperationError("INVALID_PARAMS", f"limit must be between 1 and {PAGE_LIMIT_MAX}.")
    where: list[str] = []
    args: list[Any] = []
    since = _stamp_param(params, "modifiedSince")
    if since is not None:
        where.append(f"{stamp_col} >= ?")
        args.append(since)
    after = params.get("after")
    if after is not None:
        if not (isinstance(after, list) and len(after) == 2 and isinstance(after[0], str)):
            raise OperationError("INVALID_PARAMS", "after must be [ModifiedDate, id] from the last row of a page.")
        where.append(f"({stamp_col}, {id_col}) > (?, ?)")
        args += [_stamp_param({"after": after[0]}, "after"), _int_param({"after": after[1]}, "after")]
    sql = select + (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY {stamp_col}, {id_col} LIMIT ?"
    columns, rows = db.rows(sql, [*args, limit + 1])
    return {"columns": columns, "rows": rows[:limit], "more": len(rows) > limit}


def _patient_exists(db: PracticeDb, raw: Any) -> int:
    try:
        pid = int(str(raw).strip())
    except ValueError:
        pid = None
    if pid is None or db.one("SELECT 1 FROM Patients WHERE PatientID = ?", (pid,)) is None:
        raise OperationError("PATIENT_NOT_FOUND", f"No patient with PatientID {str(raw)[:40]!r}.")
    return pid


def _marker(params: dict[str, Any]) -> str:
    marker = params.get("marker")
    if not isinstance(marker, str) or not NVC_MARKER.fullmatch(marker):
        raise OperationError("INVALID_PARAMS", "marker must be an [NVC:...] reference.")
    return marker


def _op_practice_info(db: PracticeDb, params: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    row = db.one("SELECT PracticeName, Branch, OptisoftVersion FROM PracticeDetails")
    name, branch, version = row if row else (None, None, None)
    return {"practiceName": name, "branch": branch, "optisoftVersion": version, "canWrite": user["canWrite"]}


def _op_patients_list(db: PracticeDb, params: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    return _keyset_page(db, _PATIENT_SELECT, "p.ModifiedDate", "p.PatientID", params)


def _op_patients_get(db: PracticeDb, params: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    ids = params.get("patientIds")
    if not isinstance(ids, list) or not 1 <= len(ids) <= PAGE_LIMIT_MAX:
        raise OperationError("INVALID_PARAMS", f"patientIds must list 1 to {PAGE_LIMIT_MAX} ids.")
    wanted = [_int_param({"patientIds": i}, "patientIds") for i in ids]
    sql = f"{_PATIENT_SELECT} WHERE p.PatientID IN ({', '.join('?' * len(wanted))}) ORDER BY p.PatientID"
    columns, rows = db.rows(sql, wanted)
    return {"columns": columns, "rows": rows, "more": False}


def _op_recalls_changed(db: PracticeDb, params: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    since = _stamp_param(params, "modifiedSince")
    if since is None:
        raise OperationError("INVALID_PARAMS", "modifiedSince is required.")
    columns, rows = db.rows(
        "SELECT DISTINCT PatientID FROM Recalls WHERE ModifiedDate >= ? ORDER BY PatientID",
        (since,),
    )
    return {"columns": columns, "rows": rows, "more": False}


def _op_appointments_list(db: PracticeDb, params: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    return _keyset_page(db, _DIARY_SELECT, "d.ModifiedDate", "d.DiaryID", params)


def _op_exams_list(db: PracticeDb, params: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    return _keyset_page(db, _EXAM_SELECT, "e.ModifiedDate", "e.ExamID", params)


def _op_clinicians_get(db: PracticeDb, params: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    goc = params.get("gocNumber")
    if not isinstance(goc, str):
        raise OperationError("INVALID_PARAMS", "gocNumber is required.")
    columns, rows = db.rows(
        "SELECT ClinicianID, Name, GOCNumber, Role, Active FROM Clinicians WHERE GOCNumber = ?", (goc.strip(),)
    )
    return {"columns": columns, "rows": rows, "more": False}


def _op_clinicians_list(db: PracticeDb, params: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """Admin > Clinicians: every clinician on file (a practice has a handful), active or not."""
    columns, rows = db.rows("SELECT ClinicianID, Name, GOCNumber, Role, Active FROM Clinicians ORDER BY ClinicianID")
    return {"columns": columns, "rows": rows, "more": False}


def _op_diary_find(db: PracticeDb, params: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    columns, rows = db.rows(
        "SELECT DiaryID, PatientID, StartDateTime, Status FROM Diary WHERE instr(Comment, ?) > 0 ORDER BY DiaryID",
        (_marker(params),),
    )
    return {"columns": columns, "rows": rows, "more": False}


def _op_contactlog_find(db: PracticeDb, params: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    columns, rows = db.rows(
        "SELECT LogID, PatientID, ContactDate, Category FROM ContactLog WHERE instr(Notes, ?) > 0 ORDER BY LogID",
        (_marker(params),),
    )
    return {"columns": columns, "rows": rows, "more": False}


def _require_write(user: dict[str, Any], table: str) -> None:
    if not user["canWrite"]:
        raise OperationError("DB_PERMISSION_DENIED", f"The INSERT permission was denied on the object '{table}'.")


def _op_diary_book(db: PracticeDb, params: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """Book one appointment, atomically: the marker, the patient, the clinician and the slot are
    checked inside the same transaction as the insert, so two attempts can never both book."""
    _require_write(user, "Diary")
    marker = _marker(params)
    start_text = params.get("start")
    if not isinstance(start_text, str) or not _MINUTE.match(start_text):
        raise OperationError("INVALID_PARAMS", "start must be 'YYYY-MM-DD HH:MM' UK local time.")
    start = datetime.strptime(start_text, "%Y-%m-%d %H:%M")
    duration = _int_param(params, "duration")
    if not 5 <= duration <= 480:
        raise OperationError("INVALID_PARAMS", "duration must be 5 to 480 minutes.")
    appt_type = params.get("apptType")
    if appt_type not in APPT_TYPE_CODES.values():
        raise OperationError("INVALID_PARAMS", f"apptType must be one of {sorted(APPT_TYPE_CODES.values())}.")
    comment = str(params.get("comment") or "")
    if marker not in comment:
        raise OperationError("INVALID_PARAMS", "comment must carry the marker.")
    goc = str(params.get("gocNumber") or "").strip()
    with db.transaction():
        existing = db.one("SELECT DiaryID FROM Diary WHERE instr(Comment, ?) > 0 ORDER BY DiaryID", (marker,))
        if existing:
            return {"DiaryID": existing[0], "created": False}
        pid = _patient_exists(db, params.get("patientId"))
        clinician = db.one("SELECT ClinicianID, Name, GOCNumber, Active FROM Clinicians WHERE GOCNumber = ?", (goc,))
        if clinician is None:
            raise OperationError("CLINICIAN_NOT_FOUND", f"No clinician with GOC number {goc!r}.")
        clinician_id, clinician_name, _, active = clinician
        if not active:
            raise OperationError("CLINICIAN_INACTIVE", f"{clinician_name} ({goc}) is not an active clinician.")
        if appt_type == "ST" and not goc.startswith("01-"):
            raise OperationError("CLINICIAN_NOT_OPTOMETRIST", "A sight test (ST) needs an optometrist (GOC 01-).")
        end = start + timedelta(minutes=duration)
        day = start.strftime("%Y-%m-%d")
        for diary_id, other_start, other_duration in db.execute(
            "SELECT DiaryID, StartDateTime, Duration FROM Diary WHERE ClinicianID = ? AND StartDateTime >= ?"
            " AND StartDateTime < ? AND Status <> 'Cancelled'",
            (clinician_id, (start - timedelta(hours=8)).strftime("%Y-%m-%d %H:%M"), end.strftime("%Y-%m-%d %H:%M")),
        ).fetchall():
            other = datetime.strptime(other_start, "%Y-%m-%d %H:%M")
            if other < end and start < other + timedelta(minutes=other_duration):
                raise OperationError(
                    "SLOT_TAKEN",
                    f"{clinician_name} already has an appointment at {other_start} on {day} (DiaryID {diary_id}).",
                )
        cursor = db.execute(
            "INSERT INTO Diary (PatientID, StartDateTime, Duration, ApptType, Status, ClinicianID, Comment, CreatedBy,"
            " ModifiedDate) VALUES (?, ?, ?, ?, 'Booked', ?, ?, ?, ?)",
            (
                pid,
                start_text,
                duration,
                appt_type,
                clinician_id,
                comment,
                user["username"],
                uk_stamp(datetime.now(UTC)),
            ),
        )
        return {"DiaryID": cursor.lastrowid, "created": True}


def _op_contactlog_add(db: PracticeDb, params: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    _require_write(user, "ContactLog")
    marker = _marker(params)
    notes = str(params.get("notes") or "")
    if marker not in notes:
        raise OperationError("INVALID_PARAMS", "notes must carry the marker.")
    contact_date = _stamp_param(params, "contactDate")
    if contact_date is None:
        raise OperationError("INVALID_PARAMS", "contactDate is required.")
    with db.transaction():
        existing = db.one("SELECT LogID FROM ContactLog WHERE instr(Notes, ?) > 0 ORDER BY LogID", (marker,))
        if existing:
            return {"LogID": existing[0], "created": False}
        pid = _patient_exists(db, params.get("patientId"))
        cursor = db.execute(
            "INSERT INTO ContactLog (PatientID, ContactDate, Method, Category, Outcome, Notes, CreatedBy)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                pid,
                contact_date,
                str(params.get("method") or "Telephone")[:40],
                str(params.get("category") or "")[:40] or None,
                str(params.get("outcome") or "")[:40] or None,
                notes,
                user["username"],
            ),
        )
        return {"LogID": cursor.lastrowid, "created": True}


Operation = Callable[[PracticeDb, dict[str, Any], dict[str, Any]], dict[str, Any]]
READ_OPERATIONS: dict[str, Operation] = {
    "practice.info": _op_practice_info,
    "patients.list": _op_patients_list,
    "patients.get": _op_patients_get,
    "recalls.changed": _op_recalls_changed,
    "appointments.list": _op_appointments_list,
    "exams.list": _op_exams_list,
    "clinicians.get": _op_clinicians_get,
    "clinicians.list": _op_clinicians_list,
    "diary.find": _op_diary_find,
    "contactlog.find": _op_contactlog_find,
}
WRITE_OPERATIONS: dict[str, Operation] = {"diary.book": _op_diary_book, "contactlog.add": _op_contactlog_add}


class Logins:
    """Checks a database login against `DbUsers`, remembering a good one for a minute (as a pooled
    SQL connection would) so paging through a big practice does not re-derive the hash per page."""

    def __init__(self, db: PracticeDb, ttl_seconds: float = 60.0):
        self.db = db
        self.ttl = ttl_seconds
        self._good: dict[bytes, tuple[float, dict[str, Any]]] = {}

    def check(self, credentials: Any) -> dict[str, Any]:
        given = credentials if isinstance(credentials, dict) else {}
        username, password = str(given.get("username") or ""), str(given.get("password") or "")
        key = hashlib.sha256(f"{username}\0{password}".encode()).digest()
        cached = self._good.get(key)
        if cached and time.monotonic() - cached[0] < self.ttl:
            return cached[1]
        row = self.db.one("SELECT Username, PasswordHash, CanWrite FROM DbUsers WHERE Username = ?", (username,))
        if not username or row is None or not verify_password(password, row[1]):
            raise OperationError("DB_LOGIN_FAILED", f"Login failed for user '{username}'.")
        user = {"username": row[0], "canWrite": bool(row[2])}
        self._good[key] = (time.monotonic(), user)
        return user


def run_operation(db: PracticeDb, logins: Logins, job: dict[str, Any]) -> dict[str, Any]:
    """Run one job from the relay: `{"operation", "params", "credentials"}` -> the connector's answer."""
    operation = job.get("operation")
    params = job.get("params") if isinstance(job.get("params"), dict) else {}
    handler = READ_OPERATIONS.get(operation) or WRITE_OPERATIONS.get(operation)  # type: ignore[arg-type]
    try:
        if handler is None:
            raise OperationError("UNKNOWN_OPERATION", f"The connector has no operation {str(operation)[:60]!r}.")
        user = logins.check(job.get("credentials"))
        data = handler(db, params, user)
    except OperationError as exc:
        return {"ok": False, "error": {"code": exc.code, "message": exc.message}}
    except sqlite3.Error as exc:
        return {"ok": False, "error": {"code": "DB_ERROR", "message": f"{type(exc).__name__}: {exc}"}}
    return {"ok": True, "write": operation in WRITE_OPERATIONS, "data": data}


# --- the practice's own staff (the sandbox's inspection hooks) ------------------------------------


class StaffDesk:
    """What happens at the practice in Optisoft itself, on its own connection: receptionists edit
    patients, optometrists record exams. The sandbox's inspection hooks call these."""

    def __init__(self, db: PracticeDb):
        self.db = db

    def ping(self) -> str:
        return "ok"

    def patient_count(self) -> int:
        return int(self.db.one("SELECT COUNT(*) FROM Patients")[0])

    def touch(self, count: int, now: str) -> list[str]:
        """Edit `count` patients at `now` (ISO instant): a new mobile, or an exam today (which also
        moves the eye-test recall on). Returns their PatientIDs."""
        moment = datetime.fromisoformat(now)
        stamp = uk_stamp(moment)
        today = moment.astimezone(UK).date()
        ids = [r[0] for r in self.db.execute("SELECT PatientID FROM Patients ORDER BY PatientID").fetchall()]
        chosen = sorted(random.Random(now).sample(ids, max(0, min(int(count), len(ids)))))
        with self.db.transaction():
            for k, pid in enumerate(chosen):
                if k % 2 == 0:
                    self.db.execute(
                        "UPDATE Patients SET Mobile = ?, ModifiedDate = ? WHERE PatientID = ?",
                        (f"07700 900{(pid * 7 + k) % 1000:03d}", stamp, pid),
                    )
                    continue
                self.db.execute(
                    "UPDATE Patients SET LastExamDate = ?, ModifiedDate = ? WHERE PatientID = ?",
                    (today.isoformat(), stamp, pid),
                )
                self._restart_spectacles(pid, today, stamp)
        return [str(pid) for pid in chosen]

    def _spectacles_band_one(self, pid: int) -> int | None:
        row = self.db.one(
            "SELECT b.Months FROM Recalls r JOIN RecallBands b ON b.CategoryID = r.CategoryID"
            " WHERE r.PatientID = ? AND r.RecallType = 'ST' ORDER BY b.Band LIMIT 1",
            (pid,),
        )
        return int(row[0]) if row else None

    def _restart_spectacles(self, pid: int, start: date, stamp: str) -> None:
        """An exam on `start`: the Spectacles category starts again from it (2-yearly when it had none),
        band 1 is next, and any "Suppressed by Appointment" tick is cleared (the appointment happened)."""
        months = self._spectacles_band_one(pid)
        if months is None:
            months = _BANDS[CATEGORY_TWO_YEARLY][0][0]
            self.db.execute(
                "INSERT INTO Recalls (PatientID, RecallType, CategoryID, StartDate, DueDate, NextBand, NextLetterDate,"
                " SuppressedByAppt, ModifiedDate) VALUES (?, 'ST', ?, ?, ?, 1, ?, 0, ?)",
                (pid, CATEGORY_TWO_YEARLY, start.isoformat(), *[add_months(start, months).isoformat()] * 2, stamp),
            )
            return
        due = add_months(start, months).isoformat()
        self.db.execute(
            "UPDATE Recalls SET StartDate = ?, DueDate = ?, NextBand = 1, NextLetterDate = ?, SuppressedByAppt = 0,"
            " ModifiedDate = ? WHERE PatientID = ? AND RecallType = 'ST'",
            (start.isoformat(), due, due, stamp, pid),
        )

    def update_patient(self, patient_id: str, changes: dict[str, Any], now: str) -> None:
        """Receptionists edit a patient: `Patients` columns by name, and the contact fields in NVC's
        words (`CONTACT_FIELDS`, rendered by `contact_columns`). The patient's ModifiedDate moves on."""
        contact = {k: v for k, v in changes.items() if k in CONTACT_FIELDS}
        changes = {**{k: v for k, v in changes.items() if k not in CONTACT_FIELDS}, **contact_columns(contact)}
        allowed = {"Title", "Forename", "Surname", "DOB", "Mobile", "HomePhone", "Email", "Address1", "Town"}
        allowed |= {"Postcode", "LastExamDate", "Notes", "Alerts", *_CONTACT_COLUMNS}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"not Patients columns or contact fields: {sorted(unknown)}")
        assignments = "".join(f"{column} = ?, " for column in changes)
        with self.db.transaction():
            self.db.execute(
                f"UPDATE Patients SET {assignments}ModifiedDate = ? WHERE PatientID = ?",
                [*changes.values(), uk_stamp(datetime.fromisoformat(now)), int(patient_id)],
            )

    def set_recall(self, patient_id: str, due: str, now: str) -> None:
        """Move a patient's Spectacles recall to fall due on `due` (Optisoft's recall screen): its start
        date moves with it and band 1 is next. The patient row is untouched."""
        pid, day = int(patient_id), date.fromisoformat(due)
        months = self._spectacles_band_one(pid) or 0
        with self.db.transaction():
            self.db.execute(
                "UPDATE Recalls SET StartDate = ?, DueDate = ?, NextBand = 1, NextLetterDate = ?, ModifiedDate = ?"
                " WHERE PatientID = ? AND RecallType = 'ST'",
                (add_months(day, -months).isoformat(), due, due, uk_stamp(datetime.fromisoformat(now)), pid),
            )

    def suppress_recall(self, patient_id: str, suppressed: bool, now: str) -> None:
        """Tick (or clear) "Suppressed by Appointment" on the patient's Spectacles recall, as staff do
        when booking a future appointment. The patient row is untouched."""
        with self.db.transaction():
            updated = self.db.execute(
                "UPDATE Recalls SET SuppressedByAppt = ?, ModifiedDate = ? WHERE PatientID = ? AND RecallType = 'ST'",
                (int(bool(suppressed)), uk_stamp(datetime.fromisoformat(now)), int(patient_id)),
            )
            if updated.rowcount == 0:
                raise ValueError(f"patient {patient_id} has no Spectacles recall")

    def nvc_appointments(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT PatientID, StartDateTime, Comment FROM Diary WHERE instr(Comment, '[NVC:') > 0 ORDER BY DiaryID"
        ).fetchall()
        return [
            {"pms_patient_id": str(pid), "starts_at": start, "nvc_reference": m.group(1)}
            for pid, start, comment in rows
            if (m := NVC_MARKER.search(comment or ""))
        ]

    def nvc_notes(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT PatientID, Category, Notes FROM ContactLog WHERE instr(Notes, '[NVC:') > 0 ORDER BY LogID"
        ).fetchall()
        kinds = {"Call attempt": "call_attempt", "Call outcome": "call_outcome"}
        return [
            {"pms_patient_id": str(pid), "kind": kinds.get(category, category), "nvc_reference": m.group(1)}
            for pid, category, notes in rows
            if (m := NVC_MARKER.search(notes or ""))
        ]

    def select(self, sql: str, params: list[Any] | None = None) -> dict[str, Any]:
        """A read-only report, as Optisoft's report writer would run (SELECT only)."""
        if not sql.lstrip().upper().startswith("SELECT") or ";" in sql.strip().rstrip(";"):
            raise ValueError("only a single SELECT statement is allowed")
        columns, rows = self.db.rows(sql, params or [])
        return {"columns": columns, "rows": rows}

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        if op.startswith("_") or op == "handle" or not callable(getattr(self, op, None)):
            raise ValueError(f"unknown staff operation {op!r}")
        return getattr(self, op)(**args)
