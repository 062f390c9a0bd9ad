"""Asset checks on each practice partition (`nvc_pipelines.quality`).

They show on each asset's Checks tab in the UI with counts and masked example rows. The volume
check is emitted by the `patients` asset itself (it must judge the read before anything is
written); it is blocking, so a broken extract never reaches `recalls` and `call_list`.

A nightly validates what changed: Great Expectations runs its row-level suite on the rows written
since the check last passed (their `updated_at`, less `CHANGE_MARGIN` for transactions still open
then), and the whole practice's invariants (the callable share, every appointment's patient known,
no recall of an inactive patient, ages the calendar pushes past 120) are counted in SQL over every
row, every time (identity needs no count: the store's key keeps it unique). Every row is validated
by the suite again after a full read of the practice's patients, a forced full sync, a new suite or
new recall rules, and until a failing check passes (its mark only moves on a pass, so a broken row
stays reported until it is fixed). Rows are validated 10,000 at a time: checking a whole practice
holds one chunk in memory, never the practice.
"""

from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, MetadataValue, asset_check

from assets.partitions import practices_partitions
from assets.sync import FULL_SYNC_TAG, appointments, patients, recalls
from nvc_pipelines import quality
from nvc_pipelines.recall import RecallRules
from nvc_pipelines.store import Store
from nvc_pipelines.store.call_updates import CHANGE_MARGIN
from resources.store import StoreResource

# Rows validated at a time. Measured on a 200,000-patient practice (the three checks, every row): 50,000
# a chunk held 118 MB at the peak, 10,000 held 29 MB and took 0.7 s longer (8.7 s against 9.4 s).
CHUNK_ROWS = 10_000


def _result(report: quality.Report, severity: AssetCheckSeverity = AssetCheckSeverity.ERROR) -> AssetCheckResult:
    return AssetCheckResult(
        passed=report.passed,
        severity=severity,
        description=report.description,
        metadata={
            **report.counts,
            "failures": MetadataValue.json(report.failures),
            "examples": MetadataValue.json(report.examples),
        },
    )


def _since(
    context: AssetCheckExecutionContext, db: Store, name: str, fingerprint: str
) -> tuple[datetime | None, datetime]:
    """(rows written after this are the ones to validate, None for every row; the mark to set on a pass)."""
    mark, marked_with, last_full_read, now = db.check_mark(context.partition_key, name)
    forced = context.op_execution_context.run.tags.get(FULL_SYNC_TAG) == "true"
    if forced or mark is None or marked_with != fingerprint or (last_full_read is not None and last_full_read > mark):
        return None, now
    return mark - CHANGE_MARGIN, now


def _run(
    context: AssetCheckExecutionContext,
    db: Store,
    name: str,
    kind: str,
    fingerprint: str,
    suite: Callable[[quality.Rows], quality.Report],
    verdict: Callable[[quality.Report | None, dict[str, int], int, dict[str, list[dict[str, Any]]]], quality.Report],
) -> AssetCheckResult:
    """Run the row-level `suite` on the rows to validate (every row, or those changed since the last
    pass) a chunk at a time, count the whole practice's invariants in SQL, and let `verdict(suite's
    outcome, invariants, rows covered, examples)` weigh both. Memory holds one chunk, never a practice."""
    practice_id = context.partition_key
    since, now = _since(context, db, name, fingerprint)

    def validated(rows: quality.Rows) -> quality.Report:
        quality.warm_up()  # Great Expectations imported and frozen before this chunk's frame exists
        return suite(rows)

    checked = quality.combine(
        validated(rows) for rows in db.quality_rows(practice_id, kind, since, size=CHUNK_ROWS) if rows
    )
    invariants, total, examples = db.quality_invariants(practice_id, kind, date.today(), every_row=since is None)
    report = verdict(checked, invariants, total, examples)
    report.counts["scope"] = "every row" if since is None else "changed rows; whole-practice invariants in SQL"
    report.counts["practice_rows"] = total
    if report.passed:
        db.advance_check_mark(practice_id, name, now, fingerprint)
    return _result(report)


@asset_check(
    asset=patients,
    partitions_def=practices_partitions,
    description="Valid UK phones (E.164), plausible birth and test dates, known flags, and enough callable "
    "patients (setting min_callable_share, default 0.9); the store's key keeps each PMS id unique.",
)
def patients_are_valid(context: AssetCheckExecutionContext, store: StoreResource) -> AssetCheckResult:
    db = store.open()
    practice = db.get_practice(context.partition_key)
    share = float(practice.settings.get("min_callable_share", quality.DEFAULT_MIN_CALLABLE_SHARE))
    today = date.today()

    def verdict(suite, invariants, total, examples):
        # The callable share is the whole practice's, counted in SQL: a chunk alone says nothing about it.
        uncallable = invariants.pop("uncallable")
        callable_share = (total - uncallable) / total if total else 1.0
        invariants["callable_share"] = uncallable if callable_share < share else 0
        examples["callable_share"] = examples.pop("uncallable", [])
        return quality.changed_report(
            suite, invariants, examples, callable_share=round(callable_share, 4), min_callable_share=share
        )

    return _run(
        context,
        db,
        "patients_are_valid",
        "patients",
        quality.SUITE_VERSION,
        lambda rows: quality.patients_report(rows, today),
        verdict,
    )


@asset_check(
    asset=patients,
    partitions_def=practices_partitions,
    description="The practice synced successfully within the last 26 hours.",
)
def patients_are_fresh(context: AssetCheckExecutionContext, store: StoreResource) -> AssetCheckResult:
    db = store.open()
    report = quality.freshness_report(db.last_successful_sync(context.partition_key), datetime.now(UTC))
    return _result(report, AssetCheckSeverity.WARN)


@asset_check(
    asset=appointments,
    partitions_def=practices_partitions,
    description="Every appointment starts before it ends, has a known status, and belongs to a known patient.",
)
def appointments_are_valid(context: AssetCheckExecutionContext, store: StoreResource) -> AssetCheckResult:
    db = store.open()

    return _run(
        context,
        db,
        "appointments_are_valid",
        "appointments",
        quality.SUITE_VERSION,
        quality.appointments_report,
        lambda suite, invariants, total, examples: quality.changed_report(suite, invariants, examples),
    )


@asset_check(
    asset=recalls,
    partitions_def=practices_partitions,
    description="Each due date is after the test it counts from, follows the rule's interval, and belongs to "
    "an active patient.",
)
def recalls_are_valid(context: AssetCheckExecutionContext, store: StoreResource) -> AssetCheckResult:
    db = store.open()
    practice = db.get_practice(context.partition_key)
    rules = RecallRules.from_settings(practice.settings)

    return _run(
        context,
        db,
        "recalls_are_valid",
        "recalls",
        f"{quality.SUITE_VERSION}:{rules.fingerprint()}",
        lambda rows: quality.recalls_report(rows, rules),
        lambda suite, invariants, total, examples: quality.changed_report(suite, invariants, examples),
    )
