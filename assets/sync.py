"""The practice sync: `patients` from the practice's PMS into the store, then `recalls` from them."""

import re
import time
from collections import Counter
from datetime import date

from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from assets.partitions import practices_partitions
from nvc_pipelines.recall import RecallConfigError, RecallRules, compute_recall
from nvc_pipelines.store import PracticeNotFound, Store
from resources.gateway import PmsGateway, UnsupportedPms
from resources.protocol import PmsError
from resources.store import StoreResource

GROUP = "practice_sync"


def _connected_practice(store: Store, practice_id: str):
    try:
        practice = store.get_practice(practice_id)
    except PracticeNotFound as exc:
        raise Failure(description=str(exc)) from None
    if practice.status != "connected":
        raise Failure(description=f"practice {practice_id} is {practice.status}; reconnect it to sync")
    return practice


def mask_reason(reason: str) -> str:
    """A rejection reason with the offending values blanked, fit for the event log (no personal data)."""
    return re.sub(r"'[^']*'", "'…'", reason)


@asset(
    partitions_def=practices_partitions,
    group_name=GROUP,
    kinds={"postgres"},
    description="The practice's patients, read from its PMS, normalised and merged into the store.",
)
def patients(context: AssetExecutionContext, store: StoreResource, pms: PmsGateway) -> MaterializeResult:
    started = time.monotonic()
    practice_id = context.partition_key
    db = store.open()
    practice = _connected_practice(db, practice_id)
    try:
        client = pms.open(practice, db.practice_credentials(practice_id))
        try:
            result = client.read_patients(since=None, today=date.today())
        finally:
            client.close()
    except (PmsError, UnsupportedPms) as exc:
        raise Failure(
            description=str(exc),
            metadata={"pms": str(practice.pms_kind), "problem": getattr(exc, "problem", "unsupported_pms")},
        ) from None
    counts = db.write_patients(practice_id, str(practice.pms_kind), result, context.run_id)
    reasons = Counter(mask_reason(r.reason) for r in result.rejected)
    unknown_risk = Counter(v for p in result.patients for v in p.unknown_risk_values)
    callable_share = sum(1 for p in result.patients if p.phones) / len(result.patients) if result.patients else 0.0
    context.log.info(
        f"{practice_id} ({practice.pms_kind}): read {result.rows_read}, inserted {counts.inserted}, "
        f"updated {counts.updated}, unchanged {counts.unchanged}, rejected {counts.rejected}"
    )
    return MaterializeResult(
        metadata={
            "pms": str(practice.pms_kind),
            "source": result.source_ref or str(practice.pms_kind),
            "rows_read": result.rows_read,
            "inserted": counts.inserted,
            "updated": counts.updated,
            "unchanged": counts.unchanged,
            "rejected": counts.rejected,
            "callable_share": round(callable_share, 4),
            "duration_seconds": round(time.monotonic() - started, 3),
            "unknown_risk_values": MetadataValue.json(dict(unknown_risk.most_common(50))),
            "rejection_reasons": MetadataValue.md(
                "\n".join(f"- {n} × {r}" for r, n in reasons.most_common(20)) or "none"
            ),
        }
    )


@asset(
    partitions_def=practices_partitions,
    group_name=GROUP,
    deps=[patients],
    kinds={"postgres"},
    description="Each patient's next sight test: the PMS's recall date, or computed from UK intervals.",
)
def recalls(context: AssetExecutionContext, store: StoreResource) -> MaterializeResult:
    started = time.monotonic()
    practice_id = context.partition_key
    db = store.open()
    practice = _connected_practice(db, practice_id)
    try:
        rules = RecallRules.from_settings(practice.settings)
    except RecallConfigError as exc:
        raise Failure(description=f"practice {practice_id}: {exc}") from None
    today = date.today()
    patient_rows = db.load_patients(practice_id)
    computed = [compute_recall(p, rules) for p in patient_rows]
    recalls_ = [r for r in computed if r is not None]
    changed = db.write_recalls(practice_id, recalls_)
    summary = db.recall_summary(practice_id, today)
    by_rule = Counter(r.rule for r in recalls_)
    return MaterializeResult(
        metadata={
            "patients": len(patient_rows),
            "recalls": summary["total"],
            "without_recall": len(patient_rows) - len(recalls_),
            "changed": changed,
            "due_now": summary["due_now"],
            "due_next_30_days": summary["due_30_days"],
            "from_pms": summary["from_pms"],
            "computed": summary["computed"],
            "by_rule": MetadataValue.json(dict(sorted(by_rule.items()))),
            "duration_seconds": round(time.monotonic() - started, 3),
        }
    )
