"""The practice sync job: every asset of the sync group, for one practice partition.

It runs in process: a sync is a short chain of steps, and a subprocess per step would cost more
than the work itself.
"""

from dagster import AssetSelection, define_asset_job, in_process_executor

from assets.partitions import practices_partitions
from assets.sync import GROUP

practice_sync_job = define_asset_job(
    "practice_sync",
    selection=AssetSelection.groups(GROUP),
    partitions_def=practices_partitions,
    executor_def=in_process_executor,
    description="Sync one practice: patients from its PMS, then recalls.",
)
