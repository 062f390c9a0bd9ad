"""The practice sync jobs.

`practice_sync`: every asset of the sync group, for one practice partition. It runs in process: a
sync is a short chain of steps, and a subprocess per step would cost more than the work itself.

`practice_sync_batch`: several practices of one PMS in one run process. A run process costs seconds
(start, code location load, Great Expectations import) where a small practice's nightly is a second
or two of work, so the nightly schedule hands each process a batch. Each practice is still its own
`practice_sync` run of its partition, executed in this process one after the other: its
materialisations, checks and failure are its partition's, its run is its sync log (`nvc sync-log`),
the failure sensor alerts on it as before, and a practice whose PMS is down fails its own run only:
its batch-mates go on. The batch run carries the PMS's `pms` tag, so the coordinator's per-PMS
limit counts batches (each reads one practice at a time); the practices' runs carry `nvc/pms`
instead, so they are not counted twice.
"""

import os
from functools import cache

from dagster import (
    AssetSelection,
    Config,
    Definitions,
    JobDefinition,
    OpExecutionContext,
    define_asset_job,
    job,
    op,
)

import assets.definitions as sync_domain
from assets.partitions import practices_partitions
from assets.sync import GROUP
from resources.batch import BATCH_TAG
from resources.deployment import shared_resources
from resources.executor import run_executor

practice_sync_job = define_asset_job(
    "practice_sync",
    selection=AssetSelection.groups(GROUP),
    partitions_def=practices_partitions,
    executor_def=run_executor,
    description="Sync one practice: patients from its PMS, then recalls.",
)

BATCH_OP = "sync_practices"
DEFAULT_BATCH_SIZE = 25


def batch_size() -> int:
    """`NVC_SYNC_BATCH_SIZE` (default 25): practices per nightly run process; 1 gives a run each."""
    return max(1, int(os.environ.get("NVC_SYNC_BATCH_SIZE", DEFAULT_BATCH_SIZE)))


class BatchConfig(Config):
    practices: list[str]


@cache
def practice_sync_with_resources() -> JobDefinition:
    """`practice_sync` resolved against the sync assets and the deployment's resources, as the code
    location resolves it (`context.repository_def` is not there under `execute_in_process`)."""
    return Definitions.merge(
        sync_domain.defs,
        Definitions(jobs=[practice_sync_job], resources=shared_resources(), executor=run_executor),
    ).resolve_job_def(practice_sync_job.name)


@op(name=BATCH_OP, description="Sync each practice of the batch as its own practice_sync run, one after the other.")
def sync_practices(context: OpExecutionContext, config: BatchConfig) -> None:
    practice_job = practice_sync_with_resources()
    carried = {k: v for k, v in context.run.tags.items() if k in ("trigger", "nvc/full_sync", "nvc/allow_drop")}
    failed: list[str] = []
    for practice_id in config.practices:
        tags = {
            **carried,
            "practice": practice_id,
            "nvc/pms": context.run.tags.get("pms", "unknown"),
            BATCH_TAG: context.run_id,
        }
        try:
            result = practice_job.execute_in_process(
                partition_key=practice_id, instance=context.instance, tags=tags, raise_on_error=False
            )
        except Exception as exc:  # noqa: BLE001 - e.g. a practice disconnected since the batch was made
            failed.append(f"{practice_id}: {exc}")
            context.log.error(f"{practice_id} could not start its sync: {exc}")
            continue
        if result.success:
            context.log.info(f"{practice_id} synced (run {result.run_id})")
        else:
            failed.append(f"{practice_id} (run {result.run_id})")
            context.log.error(f"{practice_id} failed (run {result.run_id}); its batch-mates go on")
    context.log.info(
        f"batch done: {len(config.practices) - len(failed)} of {len(config.practices)} practice(s) synced"
        + (f"; failed, each in its own run and alerted: {'; '.join(failed)}" if failed else "")
    )


@job(
    name="practice_sync_batch",
    executor_def=run_executor,
    description="Sync several practices of one PMS in one run process, each as its own practice_sync run.",
)
def practice_sync_batch_job() -> None:
    sync_practices()


def batches(practices: dict[str, str], size: int) -> list[tuple[str, list[str]]]:
    """(PMS kind, practice ids) runs: the practices of each kind, sorted, `size` at a time."""
    by_kind: dict[str, list[str]] = {}
    for practice_id in sorted(practices):
        by_kind.setdefault(practices[practice_id], []).append(practice_id)
    return [(kind, ids[i : i + size]) for kind, ids in sorted(by_kind.items()) for i in range(0, len(ids), size)]
