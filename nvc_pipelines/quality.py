"""Data-quality expectations on what the store holds, evaluated with Great Expectations.

Each report validates the DataFrame in hand with an ephemeral GX context (no GX project folder to
maintain) and returns counts plus up to 20 failing rows with names and phone numbers masked, fit
for Dagster's event log. Great Expectations is imported here lazily: it costs seconds to import,
and nothing that does not validate should pay for it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import cache
from types import ModuleType
from typing import Any

from nvc_pipelines import heap
from nvc_pipelines.model import RISK_FLAGS, AppointmentStatus
from nvc_pipelines.recall import RecallRules, add_months

MAX_EXAMPLES = 20
UK_E164 = r"^\+44[1-9]\d{8,9}$"
DEFAULT_MIN_CALLABLE_SHARE = 0.9
FRESHNESS_HOURS = 26


@dataclass(slots=True)
class Report:
    """The outcome of one check: passed, what each expectation found, and masked example rows."""

    passed: bool
    counts: dict[str, int | float | str] = field(default_factory=dict)  # and the rows they cover ("scope")
    failures: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""


def mask_name(name: Any) -> str:
    text = str(name or "")
    return text[:1] + "•" * max(len(text) - 1, 0)


def mask_phone(phone: Any) -> str:
    text = str(phone or "")
    return text[:4] + "•" * max(len(text) - 7, 0) + text[-3:] if len(text) > 7 else "•" * len(text)


def _masked(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("first_name", "last_name"):
            out[key] = mask_name(value)
        elif key in ("phone", "phones"):
            out[key] = [mask_phone(v) for v in value] if isinstance(value, list | tuple) else mask_phone(value)
        elif isinstance(value, date | datetime):
            out[key] = value.isoformat()
        else:
            out[key] = value
    return out


# A validated chunk this big is collected at once (`heap.release`); a nightly's few changed rows are not
# worth a collection.
RELEASE_ROWS = 10_000


class _OnFirstUse(ModuleType):
    """Stands in for a module that was not imported: the first attribute read imports it for real."""

    def __getattr__(self, attr: str) -> Any:
        if sys.modules.get(self.__name__) is self:  # read while still standing in: make way first
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


@contextmanager
def _imported_on_first_use(names: Iterable[str]) -> Iterator[None]:
    """While inside, `import name` (for each of `names` not yet imported) gives an `_OnFirstUse`
    stand-in. The stand-ins leave `sys.modules` on the way out, so what imported one keeps it and
    every later import is an ordinary one."""
    placed = []
    for name in names:
        if name not in sys.modules:
            stand_in = _OnFirstUse(name)
            stand_in.__spec__ = None  # the import system reads it; None means "already loaded, as is"
            sys.modules[name] = stand_in
            placed.append((name, stand_in))
    try:
        yield
    finally:
        for name, stand_in in placed:
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]


# Three of Great Expectations' distribution expectations import `scipy.stats` when GX is imported (one
# of them `altair` too, to draw itself) and use them only when they run: about 80 MB and 0.8 s of
# every run process that validates (measured here), for expectations NVC never runs. Imported on
# first use instead.
DEFERRED_FOR_GX = ("scipy.stats", "altair")


@cache
def _gx() -> tuple[ModuleType, Any]:
    """Great Expectations and the batch definition of one ephemeral GX context per process (its
    progress bars kept out of the logs)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    with _imported_on_first_use(DEFERRED_FOR_GX):
        import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("nvc").add_dataframe_asset("frame").add_batch_definition_whole_dataframe("all")
    )
    return gx, batch


def warm_up() -> None:
    """Import Great Expectations and make its context now (what the first check of a process pays),
    then freeze its ~500,000 objects out of the collector's walks (see `heap`): called before a
    check reads its rows, so no chunk of them is frozen with it."""
    _warm()


@cache
def _warm() -> None:
    _gx()
    heap.freeze()


def validate(frame: Any, expectations: Sequence[tuple[str, Any]]) -> dict[str, list[int]]:
    """Run named expectations on a pandas DataFrame; returns the failing row indexes per name.

    They run as one suite on a frame cut down to the columns they name: GX fingerprints the whole
    frame for every batch it makes, and a column of lists or dates makes it pickle every row.
    """
    gx, batch_definition = _gx()
    if len(frame) == 0:
        return {name: [] for name, _ in expectations}
    built = []
    for name, build in expectations:
        expectation = build(gx.expectations)
        expectation.meta = {"nvc_check": name}  # results come back keyed by this, not by position
        built.append(expectation)
    columns = list(dict.fromkeys(expectation.column for expectation in built))
    suite = gx.ExpectationSuite(name="nvc", expectations=built)
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame[columns]})
    result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    failing: dict[str, list[int]] = {}
    for outcome in result.results:
        name = outcome.expectation_config.meta["nvc_check"]
        if outcome.exception_info and outcome.exception_info.get("raised_exception"):
            raise RuntimeError(f"expectation {name} could not run: {outcome.exception_info.get('exception_message')}")
        failing[name] = [] if outcome.success else list(outcome.result.get("unexpected_index_list") or [0])
    missing = [name for name, _ in expectations if name not in failing]
    del batch, result
    if len(frame) >= RELEASE_ROWS:
        heap.release()  # GX's batch and result hold the chunk's frame in reference cycles
    if missing:
        raise RuntimeError(f"Great Expectations returned no result for {missing}")
    return failing


def _report(frame: Any, failing: dict[str, list[int]], columns: Iterable[str], **counts: Any) -> Report:
    failures = {name: len(rows) for name, rows in failing.items() if rows}
    examples: list[dict[str, Any]] = []
    for name, rows in failing.items():
        for index in rows[: MAX_EXAMPLES - len(examples)]:
            if index in frame.index:
                record = {c: frame.at[index, c] for c in columns if c in frame.columns}
                examples.append({"check": name, **_masked(record)})
    passed = not failures
    summary = "all expectations met" if passed else "; ".join(f"{n}: {c} row(s)" for n, c in failures.items())
    return Report(passed, {"rows": len(frame), **counts}, failures, examples, summary)


# The columns of each check's rows, in the order `Store.quality_rows` gives their values (a row may
# also be a dictionary of them).
ROW_COLUMNS: dict[str, tuple[str, ...]] = {
    "patients": (
        "pms_patient_id",
        "first_name",
        "last_name",
        "phones",
        "date_of_birth",
        "last_eye_test_date",
        "risk_flags",
    ),
    "appointments": ("pms_appointment_id", "pms_patient_id", "starts_at", "ends_at", "status"),
    "recalls": ("pms_patient_id", "due_date", "recall_source", "rule", "interval_months", "based_on"),
}
Rows = Sequence[Sequence[Any]] | Sequence[dict[str, Any]]


def _frame(rows: Rows, kind: str) -> Any:
    """The rows as a DataFrame of Python objects: nothing converted (a timestamp column made into
    pandas' own took about 1 s of a full check of 200,000 appointments, for values read back as
    they were)."""
    import pandas as pd

    columns = list(ROW_COLUMNS[kind])
    if rows and isinstance(rows[0], dict):
        rows = [[row.get(c) for c in columns] for row in rows]  # type: ignore[union-attr]
    return pd.DataFrame(rows, columns=columns, dtype=object)


def patients_report(rows: Rows, today: date) -> Report:
    """Phones valid UK E.164; birth in the past and age under 120; last test not in the future nor
    before birth; flags known. Row by row only: what needs the whole practice (enough patients
    callable; an identity unique, which the store's key already guarantees) is the SQL invariants'
    (`Store.quality_invariants`), as a chunk alone cannot tell."""
    frame = _frame(rows, "patients")
    frame["dob_days_ago"] = [(today - d).days if d else None for d in frame["date_of_birth"]]
    frame["test_days_ago"] = [(today - d).days if d else None for d in frame["last_eye_test_date"]]
    frame["test_after_birth_days"] = [
        (t - d).days if (t and d) else None
        for t, d in zip(frame["last_eye_test_date"], frame["date_of_birth"], strict=True)
    ]
    phones = frame[["pms_patient_id", "phones"]].explode("phones").dropna().rename(columns={"phones": "phone"})
    flags = (
        frame[["pms_patient_id", "risk_flags"]].explode("risk_flags").dropna().rename(columns={"risk_flags": "flag"})
    )
    failing = validate(
        frame,
        [
            (
                "birth_in_past_and_age_under_120",
                lambda e: e.ExpectColumnValuesToBeBetween(
                    column="dob_days_ago", min_value=0, max_value=int(120 * 365.25)
                ),
            ),
            ("last_test_not_in_future", lambda e: e.ExpectColumnValuesToBeBetween(column="test_days_ago", min_value=0)),
            (
                "last_test_not_before_birth",
                lambda e: e.ExpectColumnValuesToBeBetween(column="test_after_birth_days", min_value=0),
            ),
        ],
    )
    # Phones and flags are lists: validate them exploded, then point failures back at their patient rows.
    phone_rows = phones.reset_index()
    phone_patient = phone_rows["index"].astype(int)  # the patient row of each phone row
    phone_fail = validate(
        phone_rows, [("valid", lambda e: e.ExpectColumnValuesToMatchRegex(column="phone", regex=UK_E164))]
    )
    failing["phones_valid_uk_e164"] = sorted({int(phone_patient[i]) for i in phone_fail["valid"]})
    flag_rows = flags.reset_index()
    flag_patient = flag_rows["index"].astype(int)
    flag_fail = validate(
        flag_rows, [("known", lambda e: e.ExpectColumnValuesToBeInSet(column="flag", value_set=sorted(RISK_FLAGS)))]
    )
    failing["risk_flags_known"] = sorted({int(flag_patient[i]) for i in flag_fail["known"]})
    return _report(frame, failing, ROW_COLUMNS["patients"])


def appointments_report(rows: Rows) -> Report:
    """Start before end and a known status. Whether the patient exists is the SQL invariant's: it
    needs the practice's patients, and merged-away or inactive ones are known patients too."""
    frame = _frame(rows, "appointments")
    frame["minutes"] = [(e - s).total_seconds() / 60 for s, e in zip(frame["starts_at"], frame["ends_at"], strict=True)]
    failing = validate(
        frame,
        [
            ("starts_before_it_ends", lambda e: e.ExpectColumnValuesToBeBetween(column="minutes", min_value=1)),
            (
                "status_known",
                lambda e: e.ExpectColumnValuesToBeInSet(column="status", value_set=[str(s) for s in AppointmentStatus]),
            ),
        ],
    )
    return _report(frame, failing, ROW_COLUMNS["appointments"])


def recalls_report(rows: Rows, rules: RecallRules) -> Report:
    """Due after the test it counts from; the interval is the rule's (and the date follows from it).
    That no inactive or erased patient has a recall is the SQL invariant's, over the whole practice."""
    frame = _frame(rows, "recalls")
    frame["days_after_test"] = [
        (d - b).days if b else None for d, b in zip(frame["due_date"], frame["based_on"], strict=True)
    ]

    def interval_matches(source: str, rule: str, months: Any, based_on: date, due: date) -> bool:
        if source == "pms":
            return True
        return rules.intervals.get(rule) == int(months) and add_months(based_on, int(months)) == due

    frame["interval_matches_rule"] = [
        interval_matches(*values)
        for values in zip(
            frame["recall_source"],
            frame["rule"],
            frame["interval_months"],
            frame["based_on"],
            frame["due_date"],
            strict=True,
        )
    ]
    failing = validate(
        frame,
        [
            ("due_after_last_test", lambda e: e.ExpectColumnValuesToBeBetween(column="days_after_test", min_value=1)),
            (
                "interval_matches_rule",
                lambda e: e.ExpectColumnValuesToBeInSet(column="interval_matches_rule", value_set=[True]),
            ),
        ],
    )
    return _report(frame, failing, ROW_COLUMNS["recalls"])


def freshness_report(last_success: datetime | None, now: datetime, max_age_hours: float = FRESHNESS_HOURS) -> Report:
    """A practice whose last successful sync is older than 26 hours (or never) is stale."""
    if last_success is None:
        return Report(False, {}, {"never_synced": 1}, [], "the practice has never synced successfully")
    age = now - last_success
    hours = round(age.total_seconds() / 3600, 2)
    passed = age <= timedelta(hours=max_age_hours)
    text = f"last successful sync {hours} h ago" + ("" if passed else f", over the {max_age_hours} h allowed")
    return Report(passed, {"hours_since_sync": hours, "max_age_hours": max_age_hours}, {}, [], text)


# --- each check: Great Expectations row by row (in chunks), whole-practice invariants in SQL ------------

# Bump when an expectation changes: every row is then validated again once. 2: the row-level suites
# lost the expectations a chunk could never fail (identity, callable share, patient exists or active).
SUITE_VERSION = "2"


def combine(reports: Iterable[Report]) -> Report | None:
    """One suite outcome from the outcomes of its chunks (None for no chunk): failing rows add up,
    examples are kept up to `MAX_EXAMPLES`, row counts add up."""
    combined: Report | None = None
    for report in reports:
        if combined is None:
            combined = Report(report.passed, dict(report.counts), dict(report.failures), list(report.examples))
            continue
        combined.passed = combined.passed and report.passed
        rows = int(combined.counts.get("rows", 0)) + int(report.counts.get("rows", 0))
        combined.counts = {**report.counts, "rows": rows}
        for name, count in report.failures.items():
            combined.failures[name] = combined.failures.get(name, 0) + count
        combined.examples += report.examples[: MAX_EXAMPLES - len(combined.examples)]
    return combined


def changed_report(
    changed: Report | None,
    invariants: dict[str, int],
    examples: dict[str, list[dict[str, Any]]],
    **counts: Any,
) -> Report:
    """One check's nightly outcome: the row-level suite run on the rows written since the check last
    passed (`changed`, None when there were none) and the whole practice's invariants counted in SQL
    (`invariants`: rows breaking each, with a few of them in `examples`). A row that breaks a rule
    counts once per rule, whichever side saw it."""
    failures = dict(changed.failures) if changed else {}
    shown = list(changed.examples) if changed else []
    for name, broken in invariants.items():
        if not broken:
            continue
        failures[name] = max(failures.get(name, 0), broken)
        if not any(e["check"] == name for e in shown):
            shown += [{"check": name, **_masked(r)} for r in examples.get(name, [])][: MAX_EXAMPLES - len(shown)]
    passed = not failures
    summary = "all expectations met" if passed else "; ".join(f"{n}: {c} row(s)" for n, c in failures.items())
    return Report(passed, {**(changed.counts if changed else {"rows": 0}), **counts}, failures, shown, summary)
