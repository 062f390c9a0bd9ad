"""The scheduling domain's definitions."""

from dagster import Definitions

from schedules.health import sync_health_job, sync_health_sensor
from schedules.intraday import intraday_refresh_job, intraday_sync_sensor
from schedules.jobs import practice_sync_batch_job, practice_sync_job
from schedules.nightly import nightly_pms_sync
from schedules.ops import dead_run_sensor, initial_sync_sensor, run_failure_alert_sensor
from schedules.writeback import (
    booking_writeback_job,
    booking_writeback_sensor,
    writeback_digest_job,
    writeback_digest_schedule,
)

defs = Definitions(
    jobs=[
        practice_sync_job,
        practice_sync_batch_job,
        booking_writeback_job,
        intraday_refresh_job,
        writeback_digest_job,
        sync_health_job,
    ],
    schedules=[nightly_pms_sync, writeback_digest_schedule],
    sensors=[
        booking_writeback_sensor,
        initial_sync_sensor,
        run_failure_alert_sensor,
        intraday_sync_sensor,
        dead_run_sensor,
        sync_health_sensor,
    ],
)
