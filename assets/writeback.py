"""`booking_writebacks`: deliver a practice's outbox (bookings, call outcomes, call attempts) to its PMS.

Launched by `booking_writeback_sensor` within seconds of a new outbox row; the business rules
(exactly once, backoff, dead letters, time-outs, the worklist) live in `nvc_pipelines.writeback`.
Two checks: `writebacks_delivered` judges what this run handled; `no_writeback_needs_action` stays
red while anything of the practice waits for an operator (retry or dismiss), whichever run failed it.
"""

import statistics
from collections import Counter
from datetime import UTC, datetime

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from assets.partitions import practices_partitions
from nvc_pipelines import goc, health, writeback
from resources.gateway import PmsGateway, UnsupportedPms
from resources.goc import GocRegisterResource
from resources.protocol import PmsError
from resources.store import StoreResource

DELIVERED_CHECK = "writebacks_delivered"
NEEDS_ACTION_CHECK = "no_writeback_needs_action"
WAITING_CHECK = "writebacks_not_waiting"


@asset(
    partitions_def=practices_partitions,
    group_name="writeback",
    kinds={"postgres"},
    description="Bookings and call notes from AI calls, written into the practice's PMS exactly once.",
    check_specs=[
        AssetCheckSpec(
            DELIVERED_CHECK,
            asset="booking_writebacks",
            description="Every outbox row this run handled reached the PMS or is waiting to retry; a failure "
            "(slot taken, patient gone, practice disconnected, a clinician not GOC-registered or not an optometrist, "
            "retries exhausted) needs ops.",
        )
    ],
)
def booking_writebacks(
    context: AssetExecutionContext, store: StoreResource, pms: PmsGateway, goc_register: GocRegisterResource
) -> MaterializeResult:
    db = store.open()
    practice_id = context.partition_key
    practice = db.get_practice(practice_id)
    if practice.status != "connected":
        failed = writeback.fail_all(
            db, practice_id, "practice_disconnected", f"practice {practice_id} was disconnected before delivery"
        )
        report = writeback.DeliveryReport(failed=failed)
    else:
        try:
            client = pms.open(practice, db.practice_credentials(practice_id))
        except (PmsError, UnsupportedPms) as exc:
            raise Failure(description=str(exc)) from None
        register = goc_register.open()
        try:
            report = writeback.deliver(
                db,
                practice_id,
                client,
                error_types=(PmsError,),
                log=context.log.info,
                vet=lambda booking: goc.vet_booking(db, practice_id, booking, register.lookup),
            )
        finally:
            client.close()
            register.close()
    latencies = report.latencies_seconds
    problems = sorted({f["problem"] for f in report.failures}) or (["practice_disconnected"] if report.failed else [])
    ok = report.failed == 0 and report.dead_lettered == 0 and report.timed_out == 0
    return MaterializeResult(
        metadata={
            "pms": str(practice.pms_kind),
            "confirmed": report.confirmed,
            "already_in_pms": report.already_there,
            "retry_later": report.retry_later,
            "failed": report.failed,
            "dead_lettered": report.dead_lettered,
            "timed_out": report.timed_out,
            "latency_p50_seconds": round(statistics.median(latencies), 3) if latencies else 0.0,
            "latency_max_seconds": round(max(latencies), 3) if latencies else 0.0,
            "failures": MetadataValue.json(report.failures[:20]),
        },
        check_results=[
            AssetCheckResult(
                check_name=DELIVERED_CHECK,
                passed=ok,
                severity=AssetCheckSeverity.ERROR,
                description="all delivered or retrying"
                if ok
                else f"{report.failed} failed, {report.dead_lettered} dead-lettered, {report.timed_out} timed out "
                f"({', '.join(problems)}); see `nvc outbox {practice_id} --needs-action`",
            )
        ],
    )


@asset_check(
    asset=booking_writebacks,
    name=NEEDS_ACTION_CHECK,
    partitions_def=practices_partitions,
    description="No booking or note of the practice is failed, dead-lettered or timed out without an operator "
    "having retried or dismissed it (`nvc outbox PRACTICE --needs-action`).",
)
def no_writeback_needs_action(context: AssetCheckExecutionContext, store: StoreResource) -> AssetCheckResult:
    practice_id = context.partition_key
    rows = writeback.outbox_rows(store.open(), practice_id, needs_action=True)
    by_status = Counter(r["status"] for r in rows)
    # Ids, kinds and problem codes only: the UI is no place for patient ids or the PMS's error text.
    items = [
        {"outbox_id": r["outbox_id"], "kind": r["kind"], "status": r["status"], "problem": r["problem"]} for r in rows
    ]
    counts = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
    return AssetCheckResult(
        passed=not rows,
        severity=AssetCheckSeverity.ERROR,
        description="nothing waits for action"
        if not rows
        else f"{len(rows)} writeback(s) need action ({counts}); see `nvc outbox {practice_id} --needs-action`",
        metadata={
            "needs_action": len(rows),
            **{status: by_status.get(status, 0) for status in writeback.NEEDS_ACTION},
            "outbox_ids": MetadataValue.json([r["outbox_id"] for r in rows][:100]),
            "items": MetadataValue.json(items[:20]),
        },
    )


@asset_check(
    asset=booking_writebacks,
    name=WAITING_CHECK,
    partitions_def=practices_partitions,
    description="The practice's write side is healthy: no booking or note has waited more than 15 minutes to reach "
    "the PMS. Also judged every 5 minutes between runs by `sync_health_sensor`.",
)
def writebacks_not_waiting(context: AssetCheckExecutionContext, store: StoreResource) -> AssetCheckResult:
    db = store.open()
    ok, detail = health.write_health(
        db.oldest_waiting_writeback(context.partition_key), context.partition_key, datetime.now(UTC)
    )
    return AssetCheckResult(passed=ok, severity=AssetCheckSeverity.ERROR, description=detail)
