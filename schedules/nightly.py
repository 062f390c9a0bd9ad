"""The nightly sync at 02:00 UK time (GMT or BST, whichever is in force): every connected practice,
in batches of one PMS (`schedules.jobs.practice_sync_batch`), each practice its own run."""

from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, schedule

from assets.partitions import practices_partitions
from resources.store import StoreResource
from schedules.jobs import BATCH_OP, batch_size, batches, practice_sync_batch_job


@schedule(
    name="nightly_pms_sync",
    job=practice_sync_batch_job,
    cron_schedule="0 2 * * *",
    execution_timezone="Europe/London",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Sync every connected practice at 02:00 Europe/London, several of one PMS per run process.",
)
def nightly_pms_sync(context: ScheduleEvaluationContext, store: StoreResource):
    night = context.scheduled_execution_time.strftime("%Y-%m-%d")
    kinds = {p["practice_id"]: p["pms_kind"] for p in store.open().list_practices()}
    partitions = practices_partitions.get_partition_keys(dynamic_partitions_store=context.instance)
    for n, (kind, practice_ids) in enumerate(batches({p: kinds.get(p, "unknown") for p in partitions}, batch_size())):
        yield RunRequest(
            run_key=f"nightly:{kind}:{night}:{n}",
            run_config={"ops": {BATCH_OP: {"config": {"practices": practice_ids}}}},
            tags={"pms": kind, "trigger": "schedule", "nvc/practices": str(len(practice_ids))},
        )
