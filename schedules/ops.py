"""Operations sensors: a practice's first sync right after it connects, and failure alerts."""

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from assets.partitions import practices_partitions
from nvc_pipelines import alerts
from resources.store import StoreResource
from schedules import runs
from schedules.jobs import practice_sync_job
from schedules.writeback import booking_writeback_job


@sensor(
    name="dead_run_sensor",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Ends as failed, with the reason, any run whose process died (killed or crashed) on this host.",
)
def dead_run_sensor(context: SensorEvaluationContext):
    reaped = runs.reap_dead_runs(context.instance)
    return SkipReason(
        f"reported {len(reaped)} dead run(s) as failed: {', '.join(reaped)}" if reaped else "no dead runs"
    )


@sensor(
    name="initial_sync_sensor",
    job=practice_sync_job,
    minimum_interval_seconds=15,
    default_status=DefaultSensorStatus.RUNNING,
    description="Launches the first full sync of every practice that connected and has never synced.",
)
def initial_sync_sensor(context: SensorEvaluationContext, store: StoreResource):
    partitions = set(practices_partitions.get_partition_keys(dynamic_partitions_store=context.instance))
    requests = [
        RunRequest(
            run_key=f"initial:{p['practice_id']}:{p['connected_at'].isoformat()}",
            partition_key=p["practice_id"],
            tags={"practice": p["practice_id"], "pms": p["pms_kind"], "trigger": "initial"},
        )
        for p in store.open().list_practices()
        if p["status"] == "connected" and p["last_sync_at"] is None and p["practice_id"] in partitions
    ]
    return requests or SkipReason("every connected practice has synced at least once")


def _consecutive_failures(context: RunFailureSensorContext, partition: str) -> int:
    """This failure plus the failures of the practice's runs just before it.

    Counted back from this run, never from the newest run: the sensor can see a run's failure event
    before the run's stored status says FAILURE, and a newer run may already be under way.
    """
    runs = context.instance.get_runs(
        filters=RunsFilter(job_name=context.dagster_run.job_name, tags={"dagster/partition": partition}), limit=20
    )
    ids = [run.run_id for run in runs]  # newest first
    older = runs[ids.index(context.dagster_run.run_id) + 1 :] if context.dagster_run.run_id in ids else []
    count = 1
    for run in older:
        if run.status != DagsterRunStatus.FAILURE:
            break
        count += 1
    return count


@run_failure_sensor(
    name="run_failure_alert_sensor",
    monitored_jobs=[practice_sync_job, booking_writeback_job],
    minimum_interval_seconds=5,
    default_status=DefaultSensorStatus.RUNNING,
    description="Records an alert for every failed sync or writeback (critical at three in a row) and sends it "
    "to the webhook or email address configured.",
)
def run_failure_alert_sensor(context: RunFailureSensorContext, store: StoreResource):
    run = context.dagster_run
    partition = run.tags.get("dagster/partition") or run.tags.get("practice")
    if not partition:
        return
    reasons = []
    for event in context.get_step_failure_events():
        data = event.step_failure_data
        description = data.user_failure_data.description if data.user_failure_data else None
        cause = description or (data.error.message.strip() if data.error else None)
        if cause:
            reasons.append(cause)
    message = "; ".join(reasons) or context.failure_event.message or "run failed"
    outcome = alerts.record_failure(
        store.open(), partition, run.run_id, run.job_name, message, _consecutive_failures(context, partition)
    )
    context.log.info(outcome["headline"])
