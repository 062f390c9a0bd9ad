"""Operations shared by the CLI and the demo: connect, disconnect, sync, export.

This is the application layer above the core: it may use Dagster and the PMS resources (the core
may not). The CLI only parses arguments and prints what these return.
"""

from __future__ import annotations

import csv
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import IO, Any

from nvc_pipelines.application.instance import get_instance
from nvc_pipelines.calling import SETTING_NAMES as CALL_SETTING_NAMES
from nvc_pipelines.calling import CallSettings, CallSettingsError
from nvc_pipelines.model import PmsKind, Practice
from nvc_pipelines.recall import SETTING_PREFIX, RecallRules
from nvc_pipelines.retry import INTERACTIVE_ATTEMPTS
from nvc_pipelines.store import PracticeNotFound, Store
from resources.protocol import ConnectionInfo

PARTITIONS = "practices"


class SettingsError(ValueError):
    """Settings or secrets given for a practice do not fit its PMS."""


def _gateway():
    from resources.deployment import pms_gateway

    return pms_gateway()


def open_store() -> Store:
    return Store.open()


def pms_requirements(kind: PmsKind) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(required settings, optional settings, required secrets) of a PMS kind."""
    resource = _gateway().resource_for(kind)
    return resource.required_settings(), resource.optional_settings(), resource.required_secrets()


# Settings every practice may have, whatever its PMS: name -> (min, max).
SYNC_SETTINGS: dict[str, tuple[float, float]] = {
    "full_sync_every_days": (1, 90),
    "max_drop_share": (0, 1),
    "min_callable_share": (0, 1),
    "intraday_every_minutes": (5, 240),
    "check_max_age_minutes": (1, 60),
}


def check_settings(kind: PmsKind, settings: dict[str, str], secrets: dict[str, str]) -> None:
    required, optional, needed_secrets = pms_requirements(kind)
    missing = [k for k in required if not settings.get(k)]
    if missing:
        raise SettingsError(f"{kind} needs the setting(s) {', '.join(missing)} (--setting KEY=VALUE)")
    unknown = [
        k
        for k in settings
        if k not in required + optional
        and k not in SYNC_SETTINGS
        and k not in CALL_SETTING_NAMES
        and not k.startswith(SETTING_PREFIX)
    ]
    if unknown:
        allowed = ", ".join((*required, *optional, *SYNC_SETTINGS, *CALL_SETTING_NAMES, SETTING_PREFIX + "<rule>"))
        raise SettingsError(f"unknown setting(s) {', '.join(unknown)} for {kind}; allowed: {allowed}")
    for key, (low, high) in SYNC_SETTINGS.items():
        if key in settings:
            try:
                value = float(settings[key])
            except ValueError:
                raise SettingsError(f"setting {key} must be a number, got {settings[key]!r}") from None
            if not low <= value <= high:
                raise SettingsError(f"setting {key} must be between {low:g} and {high:g}, got {value:g}")
    RecallRules.from_settings(settings)  # refuse a bad override now, not at 2am
    try:
        CallSettings.from_settings(settings)
    except CallSettingsError as exc:
        raise SettingsError(str(exc)) from None
    missing_secrets = [k for k in needed_secrets if not secrets.get(k)]
    if missing_secrets:
        raise SettingsError(f"{kind} needs the secret(s) {', '.join(missing_secrets)}")


def connect_practice(
    practice_id: str,
    kind: PmsKind,
    name: str | None,
    settings: dict[str, str],
    secrets: dict[str, str],
    *,
    replace: bool = False,
) -> tuple[Practice, ConnectionInfo]:
    """Test the connection first; only a working connection is saved and gets its partition.

    With `replace`, an existing practice keeps every setting and secret not given again (so a new
    API token is all an expired one needs), and `name` None keeps its display name.
    """
    if replace:
        try:
            existing = open_store().get_practice(practice_id)
        except PracticeNotFound:
            existing = None
        if existing is not None and existing.pms_kind == kind:
            settings = {**existing.settings, **settings}
            secrets = {**open_store().practice_credentials(practice_id), **secrets}
            name = name or existing.display_name
    name = name or practice_id
    check_settings(kind, settings, secrets)
    candidate = Practice(practice_id, name, kind, settings, "connected")
    client = _gateway().open(candidate, secrets, max_attempts=INTERACTIVE_ATTEMPTS)  # someone waits for the answer
    try:
        info = client.test_connection()
    finally:
        client.close()
    store = open_store()
    practice = store.add_practice(practice_id, name, kind, settings, secrets, replace=replace)
    instance = get_instance()
    if not instance.has_dynamic_partition(PARTITIONS, practice_id):
        instance.add_dynamic_partitions(PARTITIONS, [practice_id])
    return practice, info


def disconnect_practice(practice_id: str) -> int:
    """Stop syncing a practice: its partition goes, its data and run history stay. Bookings and notes
    not yet delivered end as failed (returns how many) so ops can act on them."""
    from nvc_pipelines.writeback import fail_all

    store = open_store()
    store.set_status(practice_id, "disconnected")
    failed = fail_all(store, practice_id, "practice_disconnected", f"practice {practice_id} was disconnected")
    instance = get_instance()
    if instance.has_dynamic_partition(PARTITIONS, practice_id):
        instance.delete_dynamic_partition(PARTITIONS, practice_id)
    return failed


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    run_id: str
    success: bool
    metadata: dict[str, dict[str, Any]]
    error: str | None


def actor() -> str:
    """Who is acting, for the audit log: the operator's login for CLI calls."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "cli:unknown"


def export_document(
    practice_id: str | None,
    group_id: str | None = None,
    patient_ref: str | None = None,
    sections: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One practice's export (or one patient's), or a group's (each location's export under
    `practices`, their patients and rejected rows again at the top), as a document whose lists are
    read from the store as they are written (`write_json`, `write_csv`), in order: an export holds a
    batch of rows, not the practice. A practice's sections are read in one transaction; a group's
    top-level lists are read again after its practices. `sections` (default: all) limits what is
    read. Every export is in the audit log, recorded before it is read."""
    from nvc_pipelines.store.export import EXPORT_SECTIONS

    # In the store's order whatever the caller's: a practice's lists are cut from one stream in that
    # order (unknown names kept, for `Store.export_rows` to refuse).
    wanted = (
        EXPORT_SECTIONS
        if sections is None
        else tuple(s for s in EXPORT_SECTIONS if s in sections) + tuple(s for s in sections if s not in EXPORT_SECTIONS)
    )
    store = open_store()
    if group_id:
        if patient_ref:
            raise SettingsError("a patient's export names the practice, not a group")
        members = store.group_practices(group_id)
        for pid in members:
            store.record_access(pid, actor(), "export", detail={"group": group_id})

        def again(name: str) -> Iterator[dict[str, Any]]:
            for pid in members:
                yield from (row for _name, row in store.export_rows(pid, None, sections=(name,)))

        return {
            "group_id": group_id,
            "practices": (_practice_document(store, pid, None, wanted) for pid in members),
            "patients": again("patients"),
            "rejected_rows": again("rejected_rows"),
        }
    if practice_id is None:
        raise SettingsError("an export names a practice or a group")
    document = _practice_document(store, practice_id, patient_ref, wanted)  # refuses an unknown one now
    if patient_ref:
        store.record_access(practice_id, actor(), "export_patient", [patient_ref])
    else:
        store.record_access(practice_id, actor(), "export", detail={})
    return document


def _practice_document(
    store: Store, practice_id: str, patient_ref: str | None, sections: Sequence[str]
) -> dict[str, Any]:
    """A practice's export with one lazy list per section, all cut from one `Store.export_rows` stream
    (one transaction), so the lists must be read in section order, as the export file has them."""
    rows = store.export_rows(practice_id, patient_ref, sections)
    order = {name: i for i, name in enumerate(sections)}
    ahead: list[tuple[str, dict[str, Any]]] = []  # the next row, once read: it may open a later section

    def section(name: str) -> Iterator[dict[str, Any]]:
        while True:
            if not ahead:
                following = next(rows, None)
                if following is None:
                    return
                ahead.append(following)
            current, row = ahead[0]
            if order[current] > order[name]:
                return  # a later section's row: left for it
            ahead.clear()
            if current == name:
                yield row  # (an earlier section's row nobody read is passed over)

    document: dict[str, Any] = {"practice_id": practice_id, **{name: section(name) for name in sections}}
    if patient_ref is not None:
        document["patient"] = patient_ref
    return document


def check_number(practice_id: str, phone: str) -> Any:
    """The calling system's question just before dialling: `call` or `skip`, on fresh data (see
    `nvc_pipelines.intraday.check_before_dial`)."""
    from nvc_pipelines import intraday
    from resources.gateway import UnsupportedPms
    from resources.protocol import PmsError

    store = open_store()
    practice = store.get_practice(practice_id)
    gateway = _gateway()
    return intraday.check_before_dial(
        store,
        practice,
        phone,
        lambda: gateway.open(practice, store.practice_credentials(practice_id)),
        (PmsError, UnsupportedPms),
    )


def refresh_clinicians(practice_id: str) -> list[Any]:
    """Read the practice's clinicians from its PMS now and check each against the GOC register (as the
    sync's `clinicians` step does); returns the checks. A PMS that lists no clinicians: []."""
    from nvc_pipelines import goc
    from resources.deployment import goc_register
    from resources.protocol import ClinicianSource

    store = open_store()
    practice = store.get_practice(practice_id)
    client = _gateway().open(practice, store.practice_credentials(practice_id))
    try:
        listed = client.read_clinicians() if isinstance(client, ClinicianSource) else None
    finally:
        client.close()
    if listed is None:
        return []
    with goc_register().open() as register:
        checks = [goc.check(c, register.lookup) for c in listed]
    goc.save(store, practice_id, checks)
    return checks


_INTERRUPTS = ("KeyboardInterrupt", "DagsterExecutionInterruptedError")
_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@contextmanager
def _stop_signals_seen() -> Iterator[Callable[[], bool]]:
    """Whether Ctrl-C, SIGTERM or SIGHUP arrived during the block, whichever handler took it. While a
    job runs in process Dagster installs its own: one that arrives between steps is recorded, and
    dropped if no step looks (the demo then went on past a SIGTERM); one inside a step is raised
    wherever the step is, even inside a database call, which then fails with another error. The
    interpreter writes every signal's number to its wakeup fd, whoever handles it. An interrupt
    raised where it cannot propagate (a finalizer) is not printed meanwhile: the fd has it."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    seen: set[int] = set()

    def arrived() -> bool:
        with suppress(BlockingIOError):
            while data := os.read(read_end, 512):
                seen.update(data)
        return bool(seen & _STOP_SIGNALS)

    previous = signal.set_wakeup_fd(write_end)
    previous_hook = sys.unraisablehook

    def unraisable(args: Any) -> None:
        # Dagster's handler raises the interrupt in whatever runs when the signal lands; in a
        # finalizer or a weakref callback (the collector's) it cannot propagate, and the interpreter
        # printed it with a stack trace. The wakeup fd has the signal: the stop is not lost.
        if args.exc_type is not None and args.exc_type.__name__ in _INTERRUPTS:
            return
        previous_hook(args)

    sys.unraisablehook = unraisable
    try:
        yield arrived
    finally:
        sys.unraisablehook = previous_hook
        signal.set_wakeup_fd(previous)
        arrived()
        os.close(read_end)
        os.close(write_end)


def sync_practice(
    practice_id: str, trigger: str = "sync_now", *, full: bool = False, allow_drop: bool = False, verbose: bool = False
) -> SyncOutcome:
    """Materialise the practice's partition now, on the persistent instance (it shows in the UI's runs).
    Dagster's own console log (stack traces of failed steps) only when `verbose`: the outcome names the
    cause, and the run's full log is in the UI."""
    from nvc_pipelines.definitions import defs
    from resources.executor import storage_connections_held

    store = open_store()
    practice = store.get_practice(practice_id)
    if practice.status != "connected":
        raise SettingsError(f"practice {practice_id} is {practice.status}; connect it again to sync")
    instance = get_instance()
    if not instance.has_dynamic_partition(PARTITIONS, practice_id):
        instance.add_dynamic_partitions(PARTITIONS, [practice_id])
    job = defs.resolve_job_def("practice_sync")
    # Its storage holds its connections for the run, as a launched run's executor does (`run_executor`).
    with _stop_signals_seen() as interrupted, storage_connections_held(instance):
        result = job.execute_in_process(
            partition_key=practice_id,
            instance=instance,
            tags={
                "practice": practice_id,
                "pms": str(practice.pms_kind),
                "trigger": trigger,
                "nvc/interactive": "true",  # someone waits at a shell: a PMS that does not answer fails fast
                **({"nvc/full_sync": "true"} if full else {}),
                **({"nvc/allow_drop": "true"} if allow_drop else {}),
            },
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else "CRITICAL"}}}},
        )
        stopped = interrupted()
    if stopped:  # the caller stops as interrupted (the demo stops what it started), whatever the run became
        raise KeyboardInterrupt(f"sync of {practice_id} interrupted (run {result.run_id})")
    metadata: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        metadata[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
    error = None
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure]
        errors = [f.step_failure_data.error for f in failures] + [
            e.job_failure_data.error for e in result.all_events if e.is_job_failure
        ]
        if any(err is not None and err.cls_name in _INTERRUPTS for err in errors):
            # Ctrl-C or SIGTERM while a step ran: Dagster recorded the run as failed and returned; the
            # caller stops as interrupted (the demo stops what it started), not as a sync that failed.
            raise KeyboardInterrupt(f"sync of {practice_id} interrupted (run {result.run_id})")
        causes = [
            (f.step_failure_data.user_failure_data.description if f.step_failure_data.user_failure_data else None)
            or (f.step_failure_data.error.message.strip() if f.step_failure_data.error else None)
            for f in failures
        ]
        error = "; ".join(dict.fromkeys(c for c in causes if c))  # three streams failing on one PMS name its cause once
    return SyncOutcome(result.run_id, result.success, metadata, error or None)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise_cell(value: Any) -> Any:
    """OWASP CSV-injection defence: a cell that starts with `= + - @`, a tab or a carriage return is
    prefixed with `'`, phones included: a spreadsheet turns `+447700900123` into a formula or a
    number (losing the `+`), so E.164 numbers are quoted too. A cell already starting with `'`s
    before one of those gets one more, so reading back is exact: drop one leading `'` from a cell
    that, once its leading `'`s are set aside, starts with one of them; leave every other cell
    as it is (`'t Hart` was never changed)."""
    if isinstance(value, str) and value.lstrip("'").startswith(_FORMULA_START):
        return "'" + value
    return value


EXPORT_CSV_COLUMNS = (
    "pms_patient_id",
    "first_name",
    "last_name",
    "date_of_birth",
    "phones",
    "email",
    "address",
    "last_eye_test_date",
    "last_clinical_test_date",
    "risk_flags",
    "recall_due_date",
    "recall_source",
    "recall_rule",
    "active",
    "status",
    "status_date",
    "phone_recall",
    "no_recall",
    "guardian_name",
)
REJECTED_CSV_COLUMNS = ("source", "source_ref", "row_ref", "reason", "raw")


def write_csv(document: dict[str, Any], patients_out: IO[str], rejected_out: IO[str] | None) -> tuple[int, int]:
    """The export's patients as CSV to `patients_out`, its rejected rows to `rejected_out` (when
    given), a row at a time, every cell neutralised against formula injection; returns the counts."""
    writer = csv.DictWriter(patients_out, EXPORT_CSV_COLUMNS, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    patients = rejected = 0
    for p in document["patients"]:
        row = {**p, "phones": "; ".join(p["phones"]), "risk_flags": "; ".join(p["risk_flags"])}
        writer.writerow({k: neutralise_cell(v) for k, v in row.items()})
        patients += 1
    if rejected_out is not None:
        writer = csv.DictWriter(rejected_out, REJECTED_CSV_COLUMNS, lineterminator="\r\n")
        writer.writeheader()
        for r in document["rejected_rows"]:
            row = {**r, "raw": json_dumps(r["raw"])}
            writer.writerow({k: neutralise_cell(v) for k, v in row.items() if k in REJECTED_CSV_COLUMNS})
            rejected += 1
    return patients, rejected


def write_json(document: dict[str, Any], out: IO[str]) -> dict[str, int]:
    """The export as the JSON `json.dumps(..., indent=2, ensure_ascii=False)` would write of it read
    whole, a row at a time; returns how many rows each top-level list had."""
    import json

    counts: dict[str, int] = {}

    def dump(value: Any, level: int, count: str | None = None) -> None:
        pad = "  " * level
        if isinstance(value, dict) and any(isinstance(v, Iterator) for v in value.values()):
            out.write("{")
            for i, (key, item) in enumerate(value.items()):
                out.write(("," if i else "") + "\n" + pad + "  " + json.dumps(key, ensure_ascii=False) + ": ")
                dump(item, level + 1, key if level == 0 else None)
            out.write("\n" + pad + "}")
        elif isinstance(value, Iterator):
            n = 0
            for item in value:
                out.write(("," if n else "[") + "\n" + pad + "  ")
                dump(item, level + 1)
                n += 1
            out.write("\n" + pad + "]" if n else "[]")
            if count is not None:
                counts[count] = n
        else:  # a row (or any value read whole): one call, its lines indented to where it sits
            text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
            out.write(text.replace("\n", "\n" + pad) if level else text)

    dump(document, 0)
    out.write("\n")
    return counts


def json_dumps(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, default=str)


def sync_now_remote(practice_id: str, url: str) -> tuple[str, str]:
    """Launch the practice's sync on a running webserver through Dagster's GraphQL client; returns
    (run id, link to the run in the UI). The daemon and run launcher then do the work."""
    from urllib.parse import urlsplit

    from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

    practice = open_store().get_practice(practice_id)
    if practice.status != "connected":
        raise SettingsError(f"practice {practice_id} is {practice.status}; connect it again to sync")
    parts = urlsplit(url if "://" in url else f"http://{url}")
    client = DagsterGraphQLClient(
        parts.hostname or "127.0.0.1", port_number=parts.port, use_https=parts.scheme == "https"
    )
    try:
        run_id = client.submit_job_execution(
            "practice_sync",
            repository_location_name="nvc_pipelines",
            repository_name="__repository__",
            tags={
                "dagster/partition": practice_id,
                "practice": practice_id,
                "pms": str(practice.pms_kind),
                "trigger": "sync_now",
            },
        )
    except DagsterGraphQLClientError as exc:
        raise SettingsError(f"the webserver at {url} refused the run: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - connection errors come as several types
        raise SettingsError(f"cannot reach the Dagster webserver at {url}: {exc}") from None
    return run_id, f"{parts.scheme}://{parts.netloc}/runs/{run_id}"


def sync_log(practice_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """The practice's sync history from the Dagster instance (the same runs the UI lists)."""
    from dagster import DagsterEventType, RunsFilter

    instance = get_instance()
    runs = instance.get_runs(filters=RunsFilter(tags={"dagster/partition": practice_id}), limit=limit)
    out = []
    for run in runs:
        stats = instance.get_run_stats(run.run_id)
        error = None
        if run.status.value == "FAILURE":
            failures = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.STEP_FAILURE).records
            messages = []
            for record in failures:
                data = record.event_log_entry.dagster_event.step_failure_data
                messages.append(
                    (data.user_failure_data.description if data.user_failure_data else None)
                    or data.error.message.strip()
                )
            if not messages:  # no step failed: the run itself did (e.g. its process died)
                ended = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.RUN_FAILURE).records
                messages = [r.event_log_entry.dagster_event.message or "" for r in ended]
            error = "; ".join(m for m in dict.fromkeys(messages) if m) or None
        out.append(
            {
                "run_id": run.run_id,
                "job": run.job_name,
                "status": run.status.value,
                "trigger": run.tags.get("trigger", "ui"),
                "started": stats.start_time,
                "seconds": (stats.end_time - stats.start_time) if stats.end_time and stats.start_time else None,
                "error": error,
            }
        )
    return out
