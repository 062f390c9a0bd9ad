"""Asset checks on each practice partition, evaluated with Great Expectations (`nvc_pipelines.quality`).

They show on each asset's Checks tab in the UI with counts and masked example rows. The volume
check is emitted by the `patients` asset itself (it must judge the read before anything is
written); it is blocking, so a broken extract never reaches `recalls` and `call_list`.
"""

from datetime import UTC, date, datetime

from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, MetadataValue, asset_check

from assets.partitions import practices_partitions
from assets.sync import appointments, patients, recalls
from nvc_pipelines import quality
from nvc_pipelines.recall import RecallRules
from resources.store import StoreResource


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


@asset_check(
    asset=patients,
    partitions_def=practices_partitions,
    description="Unique identity, valid UK phones (E.164), plausible birth and test dates, known flags, "
    "and enough callable patients (setting min_callable_share, default 0.9).",
)
def patients_are_valid(context: AssetCheckExecutionContext, store: StoreResource) -> AssetCheckResult:
    db = store.open()
    practice = db.get_practice(context.partition_key)
    share = float(practice.settings.get("min_callable_share", quality.DEFAULT_MIN_CALLABLE_SHARE))
    return _result(quality.patients_report(db.quality_rows(practice.practice_id, "patients"), date.today(), share))


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
    practice_id = context.partition_key
    patient_ids = {r["pms_patient_id"] for r in db.quality_rows(practice_id, "patients")}
    with db.begin(practice_id) as conn:  # merged-away and inactive patients are still known patients
        from sqlalchemy import text

        patient_ids |= set(
            conn.execute(
                text("SELECT pms_patient_id FROM patients WHERE practice_id = :p"), {"p": practice_id}
            ).scalars()
        )
    return _result(quality.appointments_report(db.quality_rows(practice_id, "appointments"), patient_ids))


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
    return _result(quality.recalls_report(db.quality_rows(practice.practice_id, "recalls"), rules))
