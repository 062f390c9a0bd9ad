"""Fresh before every call: the intraday sensor and the job that brings call lists up to date.

Every minute the sensor finds the practices inside their calling hours whose list was last brought
up to date longer ago than their `intraday_every_minutes` (default 15), claims them, and launches
one run per PMS kind for all of them (a run process costs seconds; the per-PMS run limits of the
queued coordinator still apply through the `pms` tag). The run reads what changed since each
practice's cursors (never a full read) and records a `call_list` materialisation per practice, so
the UI shows when each practice's list was last refreshed. A practice whose PMS cannot be read is
marked stale (the pre-dial check then says so) and fails the run by name; the others still refresh.
"""

from collections import defaultdict
from datetime import UTC, datetime

from dagster import (
    AssetCheckEvaluation,
    AssetMaterialization,
    AssetObservation,
    Config,
    DefaultSensorStatus,
    Failure,
    OpExecutionContext,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    job,
    op,
    sensor,
)

from assets.sync import FRESH_CHECK
from nvc_pipelines import intraday
from nvc_pipelines.store import StoreUnavailable
from resources.executor import run_executor
from resources.gateway import PmsGateway, UnsupportedPms
from resources.protocol import PmsError
from resources.store import StoreResource
from schedules.health import practice_check_evaluation

OP_NAME = "refresh_call_lists"


def _now() -> datetime:
    return datetime.now(UTC)


class IntradayConfig(Config):
    practices: list[str]


@op(name=OP_NAME, description="Read what changed today in each practice's PMS and update its call list.")
def refresh_call_lists(
    context: OpExecutionContext, config: IntradayConfig, store: StoreResource, pms: PmsGateway
) -> None:
    db = store.open()
    failed: list[str] = []
    for practice_id in config.practices:
        practice = db.get_practice(practice_id)
        now = datetime.now(UTC)
        try:
            client = pms.open(practice, db.practice_credentials(practice_id))
            try:
                done = intraday.refresh(db, practice, client, now=now, run_id=context.run_id)
            finally:
                client.close()
        except (PmsError, UnsupportedPms, intraday.NotYetSynced, StoreUnavailable) as exc:
            db.mark_call_list_refreshed(practice_id, now, ok=False, error=str(exc))
            failed.append(f"{practice_id}: {exc}")
            context.log_event(
                AssetObservation(
                    asset_key="call_list",
                    partition=practice_id,
                    metadata={"trigger": "intraday", "stale": True, "error": str(exc)},
                )
            )
            context.log_event(_freshness(practice_id, False, f"stale: the intraday read failed: {exc}"))  # type: ignore[arg-type]  # Dagster logs check evaluations; its UserEvent type leaves them out
            continue
        context.log_event(
            AssetMaterialization(
                asset_key="call_list",
                partition=practice_id,
                description="brought up to date with what changed in the PMS today",
                metadata={
                    "trigger": "intraday",
                    "patients_read": done.read.get("patients", 0),
                    "appointments_read": done.read.get("appointments", 0),
                    "changed": sum(done.changed.values()),
                },
            )
        )
        context.log_event(_freshness(practice_id, True, "brought up to date with the PMS just now"))  # type: ignore[arg-type]  # Dagster logs check evaluations; its UserEvent type leaves them out
    if failed:
        raise Failure(
            description=f"intraday read failed for {len(failed)} of {len(config.practices)} practice(s); "
            "their call lists are marked stale: " + "; ".join(failed)
        )


def _freshness(practice_id: str, passed: bool, description: str) -> AssetCheckEvaluation:
    """The practice's `call_list_is_fresh` check: red in the UI while its list is stale."""
    return practice_check_evaluation("call_list", FRESH_CHECK, practice_id, passed, description)


@job(
    name="intraday_refresh",
    executor_def=run_executor,
    description="Bring practices' call lists up to date with what changed in their PMS today.",
)
def intraday_refresh_job() -> None:
    refresh_call_lists()


@sensor(
    name="intraday_sync_sensor",
    job=intraday_refresh_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="During calling hours, refreshes each practice's call list every intraday_every_minutes (15).",
)
def intraday_sync_sensor(context: SensorEvaluationContext, store: StoreResource):
    now = _now()
    db = store.open()
    by_kind: dict[str, list[str]] = defaultdict(list)
    for practice in db.connected_practices():
        try:
            if intraday.due(practice, db.call_list_state(practice.practice_id), now):
                by_kind[str(practice.pms_kind)].append(practice.practice_id)
        except ValueError as exc:  # a bad calling setting: say so, keep the others going
            context.log.warning(f"{practice.practice_id}: {exc}")
    if not by_kind:
        return SkipReason("no practice is inside its calling hours and due a refresh")
    requests = []
    for kind, practice_ids in sorted(by_kind.items()):
        for practice_id in practice_ids:
            db.claim_call_list_refresh(practice_id, now)
        requests.append(
            RunRequest(
                run_key=f"intraday:{kind}:{now:%Y%m%dT%H%M}",
                run_config={"ops": {OP_NAME: {"config": {"practices": practice_ids}}}},
                tags={"pms": kind, "trigger": "intraday"},
            )
        )
    return requests
