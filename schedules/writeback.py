"""The writeback job and the sensor that launches it within seconds of a new outbox row.

The sensor daemon ticks every few seconds at best, whatever the interval; the job runs in process
(a subprocess per step would add seconds per booking). Run keys are a fingerprint of the due rows
(ids and attempt counts), so the same due rows never launch two runs; a row that is backing off
launches again only when it is due. A dismissal launches one run too, so the practice's
`no_writeback_needs_action` check turns green at once; the cursor is the newest dismissal seen.

The daily digest (`writeback_digest_schedule`, 08:00 UK time, before practices open) sends what
still waits for action through the alert channels; the tick is skipped when nothing waits.
"""

import hashlib
from datetime import UTC, datetime

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    OpExecutionContext,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SkipReason,
    define_asset_job,
    job,
    op,
    schedule,
    sensor,
)

from assets.partitions import practices_partitions
from nvc_pipelines import writeback
from resources.executor import run_executor
from resources.store import StoreResource

booking_writeback_job = define_asset_job(
    "booking_writeback",
    selection=AssetSelection.groups("writeback"),
    partitions_def=practices_partitions,
    executor_def=run_executor,
    description="Deliver one practice's outbox to its PMS.",
)

# The queued run coordinator starts the highest `dagster/priority` first (default 0).
PRIORITY_TAG = "dagster/priority"
WRITEBACK_PRIORITY = "10"


@sensor(
    name="booking_writeback_sensor",
    job=booking_writeback_job,
    minimum_interval_seconds=1,
    default_status=DefaultSensorStatus.RUNNING,
    description="Launches booking_writebacks for each practice with outbox rows due.",
)
def booking_writeback_sensor(context: SensorEvaluationContext, store: StoreResource):
    db = store.open()
    due = writeback.due_practices(db)
    connected = set(practices_partitions.get_partition_keys(dynamic_partitions_store=context.instance))
    run_keys = {
        practice_id: f"writeback:{practice_id}:{hashlib.sha1(fingerprint.encode()).hexdigest()[:16]}"
        for practice_id, fingerprint in due.items()
    }
    since = datetime.fromisoformat(context.cursor) if context.cursor else None
    dismissed = writeback.dismissed_since(db, since)
    for practice_id, latest in dismissed.items():
        run_keys.setdefault(practice_id, f"writeback:{practice_id}:dismissed:{latest.timestamp():.6f}")
    if dismissed:
        context.update_cursor(max(dismissed.values()).astimezone(UTC).isoformat())
    requests = [
        RunRequest(
            run_key=run_key,
            partition_key=practice_id,
            # Ahead of queued syncs (the nightly queues hundreds of batches): a booking lands in 60 s.
            tags={"practice": practice_id, "trigger": "writeback", PRIORITY_TAG: WRITEBACK_PRIORITY},
        )
        for practice_id, run_key in sorted(run_keys.items())
        if practice_id in connected
    ]
    return requests or SkipReason("no outbox rows due")


@op(description="Send the digest of writebacks still waiting for action, per practice, through the alert channels.")
def send_writeback_digest(context: OpExecutionContext, store: StoreResource) -> None:
    day = datetime.fromisoformat(context.run.tags.get("digest_day") or datetime.now(UTC).date().isoformat()).date()
    outcome = writeback.send_digest(store.open(), day)
    context.log.info(
        f"digest {day}: {outcome['waiting']} waiting in {outcome['practices']} practice(s), "
        f"sent to {', '.join(outcome['delivered_to']) or 'no channel (none configured)'}"
    )


@job(
    name="writeback_digest",
    executor_def=run_executor,
    description="The daily digest of bookings and notes that still need action.",
)
def writeback_digest_job() -> None:
    send_writeback_digest()


@schedule(
    name="writeback_digest_schedule",
    job=writeback_digest_job,
    cron_schedule="0 8 * * *",
    execution_timezone="Europe/London",
    default_status=DefaultScheduleStatus.RUNNING,
    description="At 08:00 Europe/London, before practices open: what still waits for action, per practice; "
    "skipped when nothing waits.",
)
def writeback_digest_schedule(context: ScheduleEvaluationContext, store: StoreResource):
    waiting = writeback.waiting(store.open())
    if not waiting:
        return SkipReason("no writeback needs action")
    day = context.scheduled_execution_time.date().isoformat()
    return RunRequest(run_key=f"digest:{day}", tags={"digest_day": day, "trigger": "schedule"})
