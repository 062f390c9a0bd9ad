"""The nightly sync at 02:00 UK time (GMT or BST, whichever is in force), one run per practice."""

from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, schedule

from assets.partitions import practices_partitions
from resources.store import StoreResource
from schedules.jobs import practice_sync_job


@schedule(
    name="nightly_pms_sync",
    job=practice_sync_job,
    cron_schedule="0 2 * * *",
    execution_timezone="Europe/London",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Sync every connected practice at 02:00 Europe/London.",
)
def nightly_pms_sync(context: ScheduleEvaluationContext, store: StoreResource):
    night = context.scheduled_execution_time.strftime("%Y-%m-%d")
    kinds = {p["practice_id"]: p["pms_kind"] for p in store.open().list_practices()}
    for practice_id in practices_partitions.get_partition_keys(dynamic_partitions_store=context.instance):
        yield RunRequest(
            run_key=f"nightly:{practice_id}:{night}",
            partition_key=practice_id,
            tags={"practice": practice_id, "pms": kinds.get(practice_id, "unknown"), "trigger": "schedule"},
        )
