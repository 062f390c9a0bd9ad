"""Sync health between runs: each practice's read side (`patients_are_fresh`) and write side
(`writebacks_not_waiting`) go red in the UI when the nightly stopped reaching it or its outbox
stopped delivering, which a check that only runs with a sync or a delivery could never notice.

The sensor judges every practice every 5 minutes; only a change launches a (tiny) `sync_health`
run, whose op records the new states as the partitions' check results (as the intraday refresh
records `call_list_is_fresh`), so the event log holds changes, each with its run."""

import hashlib
import json
import os
from dataclasses import asdict
from datetime import UTC, datetime

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetKey,
    Config,
    DefaultSensorStatus,
    OpExecutionContext,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    job,
    op,
    sensor,
)

from assets.writeback import WAITING_CHECK
from nvc_pipelines import health
from resources.executor import run_executor
from resources.store import StoreResource

READ_CHECK = "patients_are_fresh"
# Every 5 minutes; NVC_HEALTH_EVERY_SECONDS shortens it (the browser tests, which cannot wait 5 minutes).
EVERY_SECONDS = int(os.environ.get("NVC_HEALTH_EVERY_SECONDS", "300"))


def practice_check_evaluation(asset: str, check: str, practice_id: str, ok: bool, detail: str) -> AssetCheckEvaluation:
    """One practice partition's check result, recorded by a run between the asset's own runs."""
    return AssetCheckEvaluation(
        asset_key=AssetKey(asset),
        check_name=check,
        passed=ok,
        severity=AssetCheckSeverity.ERROR,
        partition=practice_id,
        description=detail,
    )


def health_events(states: list[health.PracticeHealth], cursor: str | None) -> tuple[list[AssetCheckEvaluation], str]:
    """The check evaluations for practices whose health changed since `cursor` (each practice's
    last reported state), and the new cursor: the event log records changes, not every tick."""
    previous = json.loads(cursor) if cursor else {}
    current: dict[str, str] = {}
    events: list[AssetCheckEvaluation] = []
    for s in states:
        state = f"{'ok' if s.read_ok else 'stale'}/{'ok' if s.write_ok else 'waiting'}"
        current[s.practice_id] = state
        if previous.get(s.practice_id) == state:
            continue
        events.append(practice_check_evaluation("patients", READ_CHECK, s.practice_id, s.read_ok, s.read_detail))
        events.append(
            practice_check_evaluation("booking_writebacks", WAITING_CHECK, s.practice_id, s.write_ok, s.write_detail)
        )
    return events, json.dumps(current, sort_keys=True)


class PracticeState(Config):
    practice_id: str
    read_ok: bool
    read_detail: str
    write_ok: bool
    write_detail: str
    needs_action: int = 0


class HealthConfig(Config):
    """The practices whose health changed, as the sensor saw them."""

    states: list[PracticeState]


@op(description="Record each changed practice's read and write health as its partition's check results.")
def report_sync_health(context: OpExecutionContext, config: HealthConfig) -> None:
    states = [health.PracticeHealth(**s.model_dump()) for s in config.states]
    for event in health_events(states, None)[0]:
        context.log_event(event)  # type: ignore[arg-type]  # Dagster logs check evaluations; its UserEvent type leaves them out


@job(
    name="sync_health",
    executor_def=run_executor,
    description="Turn practices' sync health checks red or green (launched by sync_health_sensor on a change).",
)
def sync_health_job() -> None:
    report_sync_health()


@sensor(
    name="sync_health_sensor",
    job=sync_health_job,
    minimum_interval_seconds=EVERY_SECONDS,
    default_status=DefaultSensorStatus.RUNNING,
    description="Every 5 minutes: each practice's read side (last successful sync within 26 h) and write side "
    "(no writeback waiting over 15 min); a change launches a `sync_health` run that records it in the "
    "practice's checks.",
)
def sync_health_sensor(context: SensorEvaluationContext, store: StoreResource) -> RunRequest | SkipReason:
    states = health.fleet_health(store.open(), datetime.now(UTC))
    events, cursor = health_events(states, context.cursor)
    if not events:
        return SkipReason(f"health unchanged for {len(states)} practice(s)")
    changed = {e.partition for e in events}
    context.update_cursor(cursor)
    return RunRequest(
        run_key=hashlib.sha256(cursor.encode()).hexdigest()[:16],
        run_config={
            "ops": {
                "report_sync_health": {"config": {"states": [asdict(s) for s in states if s.practice_id in changed]}}
            }
        },  # fmt: skip
        tags={"trigger": "sync_health"},
    )
