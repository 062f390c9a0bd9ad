"""The scheduling domain's definitions."""

from dagster import Definitions

from schedules.jobs import practice_sync_job
from schedules.nightly import nightly_pms_sync

defs = Definitions(jobs=[practice_sync_job], schedules=[nightly_pms_sync])
