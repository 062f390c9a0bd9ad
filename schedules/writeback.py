"""The writeback job and the sensor that launches it within seconds of a new outbox row.

The sensor daemon ticks every few seconds at best, whatever the interval; the job runs in process
(a subprocess per step would add seconds per booking). Run keys are a fingerprint of the due rows
(ids and attempt counts), so the same due rows never launch two runs; a row that is backing off
launches again only when it is due.
"""

import hashlib

from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    define_asset_job,
    in_process_executor,
    sensor,
)

from assets.partitions import practices_partitions
from nvc_pipelines import writeback
from resources.store import StoreResource

booking_writeback_job = define_asset_job(
    "booking_writeback",
    selection=AssetSelection.groups("writeback"),
    partitions_def=practices_partitions,
    executor_def=in_process_executor,
    description="Deliver one practice's outbox to its PMS.",
)


@sensor(
    name="booking_writeback_sensor",
    job=booking_writeback_job,
    minimum_interval_seconds=1,
    default_status=DefaultSensorStatus.RUNNING,
    description="Launches booking_writebacks for each practice with outbox rows due.",
)
def booking_writeback_sensor(context: SensorEvaluationContext, store: StoreResource):
    due = writeback.due_practices(store.open())
    connected = set(practices_partitions.get_partition_keys(dynamic_partitions_store=context.instance))
    requests = [
        RunRequest(
            run_key=f"writeback:{practice_id}:{hashlib.sha1(fingerprint.encode()).hexdigest()[:16]}",
            partition_key=practice_id,
            tags={"practice": practice_id, "trigger": "writeback"},
        )
        for practice_id, fingerprint in sorted(due.items())
        if practice_id in connected
    ]
    return requests or SkipReason("no outbox rows due")
