"""The practice sync, per practice partition.

`patients`, `appointments` and `clinical_records` are read from the practice's PMS (incrementally
after the first sync, with a periodic full reconcile), `recalls` is computed from patients and
their clinical records, and `call_list` from recalls and booked appointments. Each asset records
what it did as materialisation metadata, which the UI plots over time.
"""

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any, TypeVar

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    RetryRequested,
    asset,
)

from assets.partitions import practices_partitions
from nvc_pipelines import goc, heap
from nvc_pipelines.calling import CallSettings, CallSettingsError
from nvc_pipelines.erasure import Suppressions, drop_erased, load_suppressions
from nvc_pipelines.model import Practice, ReadResult, RejectedRow, RowOrigins
from nvc_pipelines.recall import RecallConfigError, RecallRules, recall_with_clinical
from nvc_pipelines.retry import INTERACTIVE_ATTEMPTS, STEP_RETRIES, step_retries, step_wait
from nvc_pipelines.store import PracticeNotFound, Store
from nvc_pipelines.store.erasure import ErasedDuringRead
from nvc_pipelines.store.streams import APPOINTMENTS, CLINICAL_RECORDS, PATIENTS, StreamSpec, VolumeDropRefused
from nvc_pipelines.sync import full_every, max_drop_share, plan_sync, prefetch
from resources.gateway import PmsGateway, UnsupportedPms
from resources.goc import GocRegisterResource
from resources.protocol import (
    ClinicianSource,
    PmsClient,
    PmsError,
    appointment_pages,
    clinical_pages,
    pages_are_snapshot,
    patient_pages,
)
from resources.store import StoreResource

GROUP = "practice_sync"
T = TypeVar("T")
FULL_SYNC_TAG = "nvc/full_sync"
ALLOW_DROP_TAG = "nvc/allow_drop"
# A sync someone waits for at a shell (`nvc sync`, the demo): a PMS that does not answer fails it in
# seconds, named once, instead of minutes of step retries; scheduled runs keep their patient retries.
INTERACTIVE_TAG = "nvc/interactive"
VOLUME_CHECK = "volume_drop_within_limit"


@contextmanager
def pms_client(context: AssetExecutionContext, db: Store, practice: Practice, pms: PmsGateway) -> Iterator[PmsClient]:
    """The practice's PMS client for one step, closed after it. A PMS that fails while it is open
    fails the step with its reason; a scheduled run retries one briefly down or throttling with
    backoff (a wrong key fails at once), a sync someone waits for at a shell tries twice and stops."""
    interactive = context.run.tags.get(INTERACTIVE_TAG) == "true"
    try:
        client = pms.open(
            practice,
            db.practice_credentials(practice.practice_id),
            max_attempts=INTERACTIVE_ATTEMPTS if interactive else None,
        )
        try:
            yield client
        finally:
            client.close()
    except (PmsError, UnsupportedPms) as exc:
        problem = getattr(exc, "problem", "unsupported_pms")
        if not interactive and step_retries(problem, context.retry_number):
            wait = step_wait(context.retry_number)
            context.log.warning(f"{exc} - retrying in {wait:g} s ({context.retry_number + 1}/{STEP_RETRIES})")
            raise RetryRequested(max_retries=STEP_RETRIES, seconds_to_wait=wait) from exc
        raise Failure(
            description=str(exc),
            metadata={"pms": str(practice.pms_kind), "problem": problem, "attempts": context.retry_number + 1},
        ) from None


def _connected_practice(store: Store, practice_id: str) -> Practice:
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


def _reasons_md(rejected: Sequence[RejectedRow]) -> MetadataValue:
    reasons = Counter(mask_reason(r.reason) for r in rejected)
    return MetadataValue.md("\n".join(f"- {n} × {r}" for r, n in reasons.most_common(20)) or "none")


class PageStats:
    """What a paged read reports in its metadata, gathered page by page (nothing kept per row)."""

    def __init__(self) -> None:
        self.rows = 0
        self.suppressed = 0
        self.matched = 0
        self.reasons: Counter[str] = Counter()

    def add(self, records: Sequence[Any], rejected: Sequence[RejectedRow]) -> None:
        self.rows += len(records) + len(rejected)
        self.reasons.update(mask_reason(r.reason) for r in rejected)

    def metadata(self) -> dict[str, Any]:
        return {}


class PatientStats(PageStats):
    def __init__(self) -> None:
        super().__init__()
        self.patients = 0
        self.callable = 0
        self.for_review = 0
        self.unknown: Counter[str] = Counter()

    def add(self, records: Sequence[Any], rejected: Sequence[RejectedRow]) -> None:
        super().add(records, rejected)
        self.patients += len(records)
        self.callable += sum(1 for p in records if p.phones)
        self.for_review += sum(1 for p in records if p.name_review)
        self.unknown.update(v for p in records for v in p.unknown_risk_values)

    def metadata(self) -> dict[str, Any]:
        return {
            "callable_share": round(self.callable / self.patients, 4) if self.patients else 0.0,
            # Kept and callable, but a person should check the spelling (mixed-script look-alikes).
            "names_for_review": self.for_review,
            "unknown_risk_values": MetadataValue.json(dict(self.unknown.most_common(50))),
        }


# A read's pages: records, rejections, the source's reference, and where the records without a PMS
# id came from (`ReadResult.origins`; empty for the streams that have none).
Pages = Callable[[PmsClient, datetime | None], Iterator[tuple[list[Any], list[RejectedRow], str, RowOrigins]]]
# What a stream does to each page before it is written (records and rejections, changed in place);
# returns how many records it matched. One is made per read (`sync_stream`'s `prepare`).
Prepare = Callable[[list[Any], list[RejectedRow], RowOrigins], int]


@contextmanager
def _no_prepare(_db: Store, _practice_id: str) -> Iterator[Prepare | None]:
    yield None


def sync_stream(
    context: AssetExecutionContext,
    store: StoreResource,
    pms: PmsGateway,
    spec: StreamSpec,
    read: Pages,
    stats: Callable[[], PageStats] = PageStats,
    prepare: Callable[[Store, str], AbstractContextManager[Prepare | None]] | None = None,
    volume_check: bool = False,
) -> MaterializeResult:
    """Plan (full or incremental), read through the PMS resource page by page, merge into the store
    with the cursor in one transaction, and report what happened.

    Pages stream from the PMS (fetched and normalised a page or two ahead, in a bounded queue) into
    the store's staging `COPY`: erased people are left out and id-less rows matched per page, and
    nothing of the read is held beyond the page at hand but the identities it has passed on (to
    find a duplicate on a later page). A PMS failure mid-read rolls the whole read back, as it did
    when the read came first."""
    started = time.monotonic()
    heap.settle()  # the imported code out of the collector's walks: a quarter of a full sync's time
    practice_id = context.partition_key
    db = store.open()
    practice = _connected_practice(db, practice_id)
    tags = context.run.tags
    state = db.stream_state(practice_id, spec.name)
    plan = plan_sync(
        state.cursor_at,
        state.last_full_sync_at,
        datetime.now(UTC),
        force_full=tags.get(FULL_SYNC_TAG) == "true",
        full_every=full_every(practice.settings),
    )
    guard = None if tags.get(ALLOW_DROP_TAG) == "true" else max_drop_share(practice.settings)
    seen = stats()
    source_refs: list[str] = []
    erased: list[Suppressions] = []

    def pages(client: PmsClient) -> Iterator[tuple[list[Any], list[RejectedRow]]]:
        # Who is erased, looked up once the write holds its lock on erasures (its first page is
        # asked for inside its transaction; the look reads committed rows on a connection of its
        # own): no erasure of the practice can commit from then until the write does.
        suppressions = load_suppressions(db, practice_id)
        erased.append(suppressions)
        for records, rejected, source_ref, origins in read_ahead(client, read(client, plan.since)):
            if not source_refs:
                source_refs.append(source_ref)
            records, suppressed = drop_erased(
                db, practice_id, records, patients=spec is PATIENTS, rejected=rejected, suppressions=suppressions
            )
            seen.suppressed += suppressed
            if match:
                seen.matched += match(records, rejected, origins)
            seen.add(records, rejected)
            yield records, rejected

    try:
        with pms_client(context, db, practice, pms) as client, (prepare or _no_prepare)(db, practice_id) as match:
            counts = db.write_stream_pages(
                practice_id,
                spec,
                pages(client),
                source=str(practice.pms_kind),
                source_ref=lambda: source_refs[0] if source_refs else "",
                run_id=context.run_id,
                full=plan.full,
                max_drop_share=guard,
                snapshot=pages_are_snapshot(client),
                left_out=lambda: erased[0].hashes,
            )
    except ErasedDuringRead as exc:  # not expected: the read looks up the erased under the write's lock
        raise Failure(description=f"{exc}; run the sync again: it leaves them out") from None
    except VolumeDropRefused as exc:
        message = f"{practice.pms_kind} (practice {practice_id}): {exc}"
        if not volume_check:
            raise Failure(description=message) from None
        context.log.error(message)
        return MaterializeResult(
            metadata={"pms": str(practice.pms_kind), "mode": "full", "refused": True, "written": 0},
            check_results=[
                AssetCheckResult(
                    check_name=VOLUME_CHECK,
                    passed=False,
                    severity=AssetCheckSeverity.ERROR,
                    description=message,
                    metadata={"rows_read": seen.rows},
                )
            ],
        )
    rows_read = seen.rows + seen.suppressed
    context.log.info(
        f"{practice_id} ({practice.pms_kind}) {spec.name}, {plan.reason}: read {rows_read}, inserted {counts.inserted}, "
        f"updated {counts.updated}, unchanged {counts.unchanged}, rejected {counts.rejected}, "
        f"deactivated {counts.deactivated}"
    )
    return MaterializeResult(
        metadata={
            "pms": str(practice.pms_kind),
            "mode": "full" if plan.full else "incremental",
            "plan": plan.reason,
            "source": (source_refs[0] if source_refs else "") or str(practice.pms_kind),
            "rows_read": rows_read,
            "inserted": counts.inserted,
            "updated": counts.updated,
            "unchanged": counts.unchanged,
            "rejected": counts.rejected,
            "deactivated": counts.deactivated,
            "duration_seconds": round(time.monotonic() - started, 3),
            "matched_to_existing": seen.matched,
            "suppressed_erased": seen.suppressed,
            "rejection_reasons": MetadataValue.md(
                "\n".join(f"- {n} × {r}" for r, n in seen.reasons.most_common(20)) or "none"
            ),
            **seen.metadata(),
        },
        check_results=[
            AssetCheckResult(
                check_name=VOLUME_CHECK,
                passed=True,
                description=f"{counts.deactivated} record(s) deactivated, within the allowed share",
                metadata={"deactivated": counts.deactivated},
            )
        ]
        if volume_check
        else [],
    )


def read_ahead(client: PmsClient, pages: Iterator[T]) -> Iterator[T]:
    """The client's pages fetched and normalised in a background thread a page or two ahead of the
    writer (`prefetch`), which hides a PMS's network waits; a client that says it has none to hide
    (`pages_ahead = 0`: a local file) is read in the writer's thread, as its two threads would only
    contend for the interpreter lock."""
    depth = getattr(client, "pages_ahead", 2)
    return prefetch(pages, depth) if depth else pages


def _read_patients(client: PmsClient, since: datetime | None):
    for page in patient_pages(client, since, date.today()):
        yield page.patients, page.rejected, page.source_ref, page.origins


@contextmanager
def _patient_matcher(db: Store, practice_id: str) -> Iterator[Prepare]:
    """Rows without a PMS id take the identity of the stored patient they match (phone + name/DOB),
    a page at a time (`Store.derived_identities`)."""
    with db.derived_identities(practice_id) as remap:

        def match(records: list[Any], rejected: list[RejectedRow], origins: RowOrigins) -> int:
            result = ReadResult(records, rejected, origins=origins)
            matched = remap(result)
            records[:] = result.patients
            return matched

        yield match


def _read_appointments(client: PmsClient, since: datetime | None):
    for batch in appointment_pages(client, since):
        yield batch.records, batch.rejected, batch.source_ref, {}


def _read_clinical(client: PmsClient, since: datetime | None):
    for batch in clinical_pages(client, since):
        yield batch.records, batch.rejected, batch.source_ref, {}


@asset(
    partitions_def=practices_partitions,
    group_name=GROUP,
    kinds={"postgres"},
    description="The practice's patients, read from its PMS, normalised and merged into the store.",
    check_specs=[
        AssetCheckSpec(
            VOLUME_CHECK,
            asset="patients",
            blocking=True,
            description="A full read may not deactivate more than the practice's max_drop_share (default 20%) of "
            "its active patients; when it would, nothing is written and recalls and the call list are not rebuilt.",
        )
    ],
)
def patients(context: AssetExecutionContext, store: StoreResource, pms: PmsGateway) -> MaterializeResult:
    return sync_stream(context, store, pms, PATIENTS, _read_patients, PatientStats, _patient_matcher, volume_check=True)


@asset(
    partitions_def=practices_partitions,
    group_name=GROUP,
    kinds={"postgres"},
    description="The practice's diary from its PMS: past tests, cancellations, and bookings still to come.",
)
def appointments(context: AssetExecutionContext, store: StoreResource, pms: PmsGateway) -> MaterializeResult:
    return sync_stream(context, store, pms, APPOINTMENTS, _read_appointments)


@asset(
    partitions_def=practices_partitions,
    group_name=GROUP,
    kinds={"postgres"},
    description="Exams and clinical entries from the PMS: flags, notes and pressures.",
)
def clinical_records(context: AssetExecutionContext, store: StoreResource, pms: PmsGateway) -> MaterializeResult:
    return sync_stream(context, store, pms, CLINICAL_RECORDS, _read_clinical)


@asset(
    partitions_def=practices_partitions,
    group_name=GROUP,
    kinds={"postgres"},
    description="The practice's clinicians from its PMS with their GOC numbers, each checked against the GOC "
    "register (registered, suspended, erased, not on it, or an invalid or missing number); bookings are vetted "
    "against it.",
)
def clinicians(
    context: AssetExecutionContext, store: StoreResource, pms: PmsGateway, goc_register: GocRegisterResource
) -> MaterializeResult:
    started = time.monotonic()
    practice_id = context.partition_key
    db = store.open()
    practice = _connected_practice(db, practice_id)
    with pms_client(context, db, practice, pms) as client:
        listed = client.read_clinicians() if isinstance(client, ClinicianSource) else None
    if listed is None:
        return MaterializeResult(
            metadata={"pms": str(practice.pms_kind), "listed_by_pms": False, "clinicians": 0, "flagged": 0}
        )
    with goc_register.open() as register:
        if register.warning:
            context.log.warning(f"{practice_id}: {register.warning}")
        checks = [goc.check(c, register.lookup) for c in listed]
    goc.save(db, practice_id, checks)
    found = goc.summary(checks)
    for flag in found["flags"]:
        context.log.warning(f"{practice_id} clinician {flag['ref']}: {flag['state']} ({flag['reason']})")
    return MaterializeResult(
        metadata={
            "pms": str(practice.pms_kind),
            "listed_by_pms": True,
            "clinicians": found["clinicians"],
            "may_sight_test": found["may_sight_test"],
            "flagged": found["flagged"],
            "by_state": MetadataValue.json(found["by_state"]),
            "flags": MetadataValue.json(found["flags"][:50]),
            "goc_register": register.problem or "configured",
            "duration_seconds": round(time.monotonic() - started, 3),
        }
    )


@asset(
    partitions_def=practices_partitions,
    group_name=GROUP,
    deps=[patients, clinical_records],
    kinds={"postgres"},
    description="Each patient's next sight test: the PMS's recall date, or computed from UK intervals "
    "(flags from the PMS and inferred from clinical notes), with the reason.",
)
def recalls(context: AssetExecutionContext, store: StoreResource) -> MaterializeResult:
    started = time.monotonic()
    heap.settle()
    practice_id = context.partition_key
    db = store.open()
    practice = _connected_practice(db, practice_id)
    try:
        rules = RecallRules.from_settings(practice.settings)
    except RecallConfigError as exc:
        raise Failure(description=f"practice {practice_id}: {exc}") from None
    # A recall depends only on its patient's row, their clinical records and the rules: after an
    # incremental sync only patients whose data changed since their recall was computed are redone.
    state = db.recall_state(practice_id)
    fingerprint = rules.fingerprint()
    plan = plan_sync(
        state.computed_at,
        state.last_full_at if state.fingerprint == fingerprint else None,
        state.now,
        force_full=context.run.tags.get(FULL_SYNC_TAG) == "true",
        full_every=full_every(practice.settings),
    )
    if state.fingerprint not in (None, fingerprint):
        plan = replace(plan, reason="recall rules or logic changed")
    # A batch at a time (its patients and their clinical records read from the store, computed,
    # written with their marks in one transaction), so memory does not grow with the practice. A run
    # killed between batches leaves the rest marked stale; the rules' fingerprint (and a full run's
    # date) is recorded only after the last batch, so an interrupted full run is redone in full.
    recomputed = changed = 0
    analyze_at = 1  # statistics refreshed after the first batch that writes, then each time the total doubles
    for batch in db.recall_batches(practice_id, everyone=plan.full):
        computed = (recall_with_clinical(p, batch.clinical.get(p.pms_patient_id, []), rules) for p in batch.patients)
        found = [r for r in computed if r is not None]
        changed += db.write_recalls(
            practice_id, found, scope=batch.seen.keys(), seen=batch.seen, key_range=batch.key_range, analyze=False
        )
        recomputed += len(batch.patients)
        if changed >= max(analyze_at, 5000):  # a first computation fills the table: keep its plans right
            db.refresh_statistics("recalls")
            analyze_at = 2 * changed
    db.finish_recalls(practice_id, fingerprint=fingerprint, full=plan.full, changed=changed)
    summary = db.recall_summary(practice_id, date.today())
    context.log.info(
        f"recalls for {practice_id}: {recomputed} "
        + (f"patients recomputed, all ({plan.reason})" if plan.full else "patients with changed data recomputed")
    )
    return MaterializeResult(
        metadata={
            "mode": "full" if plan.full else "incremental",
            "patients": summary["active_patients"],
            "recomputed": recomputed,
            "recalls": summary["total"],
            "without_recall": summary["active_patients"] - summary["total"],
            "changed": changed,
            "due_now": summary["due_now"],
            "due_next_30_days": summary["due_30_days"],
            "from_pms": summary["from_pms"],
            "computed": summary["computed"],
            "with_inferred_flags": summary["with_inferred_flags"],
            "pms_later_than_guideline": summary["pms_later_than_guideline"],
            "by_rule": MetadataValue.json(summary["by_rule"]),
            "duration_seconds": round(time.monotonic() - started, 3),
        }
    )


CALLABLE_CHECK = "no_uncallable_patient_listed"
FRESH_CHECK = "call_list_is_fresh"


@asset(
    partitions_def=practices_partitions,
    group_name=GROUP,
    deps=[recalls, appointments],
    kinds={"postgres"},
    description="Who the AI caller phones: one entry per number (a household is one call), whom to ask for and "
    "when; every due patient not listed has a reason (deceased, gone away, do not call, asked not to be called, "
    "booked, snoozed, attempts exhausted, no callable number).",
    check_specs=[
        AssetCheckSpec(
            CALLABLE_CHECK,
            asset="call_list",
            description="No listed entry belongs to a patient who is deceased, gone away or inactive in the PMS, "
            "whom the practice may not phone, or who asked not to be called (checked in SQL, apart from the rules "
            "that build the list).",
        ),
        AssetCheckSpec(
            FRESH_CHECK,
            asset="call_list",
            description="The list reflects the PMS as of its last read: passes when a sync or an intraday refresh built "
            "it, fails (red) when the practice's intraday read failed and the list is stale until the next one works.",
        ),
    ],
)
def call_list(context: AssetExecutionContext, store: StoreResource) -> MaterializeResult:
    started = time.monotonic()
    practice_id = context.partition_key
    db = store.open()
    practice = _connected_practice(db, practice_id)
    try:
        settings = CallSettings.from_settings(practice.settings)
    except CallSettingsError as exc:
        raise Failure(description=f"practice {practice_id}: {exc}") from None
    counts = db.update_call_list(practice_id, settings=settings, full=context.run.tags.get(FULL_SYNC_TAG) == "true")
    bad = db.call_list_violations(practice_id)
    not_listed = counts["not_listed"]
    return MaterializeResult(
        metadata={
            "entries": counts["entries"],
            "people_listed": counts["people_listed"],
            "households": counts["households"],
            "due_or_overdue": counts["due"],
            "mode": counts["mode"],
            "placed_again": counts["placed_again"],
            **{f"not_listed_{code}": n for code, n in not_listed.items()},
            "not_listed": MetadataValue.json(not_listed),
            "duration_seconds": round(time.monotonic() - started, 3),
        },
        check_results=[
            AssetCheckResult(
                check_name=CALLABLE_CHECK,
                passed=not bad,
                severity=AssetCheckSeverity.ERROR,
                description="every listed patient may be called"
                if not bad
                else f"{len(bad)} listed patient(s) must not be called",
                metadata={"violations": MetadataValue.json([b["pms_patient_id"] for b in bad[:50]])},
            ),
            AssetCheckResult(check_name=FRESH_CHECK, passed=True, description="built by this sync"),
        ],
    )
