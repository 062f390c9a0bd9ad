"""Shared plumbing for the sync benchmarks (`bench/full_sync.py`, `bench/incremental_sync.py`).

The parent process owns a temporary NVC_HOME with the embedded PostgreSQL and the Optix sandbox
(served from the parent's threads, warmed before anything is timed). Each measured variant runs in a
child process (`python bench/_harness.py <variant> ...`) that prints one JSON line: its own wall
time around the work (imports excluded, reported apart), its RSS after imports and its peak RSS
(`VmHWM` of its own address space), so every variant's memory is its own.

Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRACTICE_ID = "bench-optix"
PARTS_PRACTICE_ID = "bench-optix-parts"  # same sandbox practice, its own rows: for the component timings
OPTIX_PRACTICE = "OPX-BIG"
OPTIX_KEY = "optix-bench-key"
BENCH_DATABASE = "bench"  # floor and to_sql tables live here, on the same server as the store


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (`VmHWM`). Not `getrusage().ru_maxrss`: Linux carries the
    parent's high-water mark across fork and exec into it, so a child started by a parent holding a
    200,000-patient sandbox would report the parent's size."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- figures a machine can read (`--json PATH`) ---------------------------------------------------------


class JsonFigures:
    """The benchmark's figures as JSON for a machine: `{"figures": {name: value}, "machine": ...,
    "load": ...}`. Made at the start of `main` (it reads the load average then), filled with
    `figure()`, written by `write()` (which reads the load again). Every benchmark adds `--json PATH`
    with `add_json_argument`; nothing is written without it."""

    def __init__(self, path: str | None, bench: str):
        self.path = path
        self.bench = bench
        self.figures: dict[str, Any] = {}
        self.load_before = os.getloadavg()
        self.started = time.time()
        self.postgres: str | None = None

    def figure(self, name: str, value: Any) -> None:
        if isinstance(value, float):
            value = round(value, 4)
        self.figures[name] = value

    def note_postgres(self) -> None:
        """Read the store's PostgreSQL version (call it while the embedded server runs)."""
        try:
            import psycopg

            from nvc_pipelines.store.db import store_url

            conninfo = store_url().set(drivername="postgresql").render_as_string(hide_password=False)
            with psycopg.connect(conninfo) as conn:
                self.postgres = str(conn.execute("SHOW server_version").fetchone()[0])
        except Exception as exc:  # the figures still count without it
            self.postgres = f"unknown ({type(exc).__name__})"

    def write(self) -> None:
        if not self.path:
            return
        document = {
            "bench": self.bench,
            "figures": self.figures,
            "machine": machine(self.postgres),
            "load": {
                "before": list(self.load_before),
                "after": list(os.getloadavg()),
                "note": "os.getloadavg() (1, 5, 15 min) when the benchmark started and ended",
            },
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "wall_seconds": round(time.time() - self.started, 1),
        }
        Path(self.path).write_text(json.dumps(document, indent=2, default=str) + "\n")
        print(f"figures written to {self.path}")


def add_json_argument(parser: Any) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")


def machine(postgres: str | None = None) -> dict[str, Any]:
    memory_kb = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    memory_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_mb": round(memory_kb / 1024) if memory_kb else None,
        "python": platform.python_version(),
        "postgres": postgres,
        "platform": platform.platform(),
    }


# --- parent side -------------------------------------------------------------------------------------


@contextmanager
def bench_environment(patients: int, *, rate_limit: float = 0.0, keep: bool = False):
    """A temporary NVC_HOME with the embedded store, the Dagster instance, an Optix sandbox holding
    `patients` patients (seeded and warmed) and the practice `bench-optix` connected to it."""
    home = Path(tempfile.mkdtemp(prefix="nvc-bench-"))
    os.environ["NVC_HOME"] = str(home)
    os.environ.pop("NVC_DATABASE_URL", None)
    os.environ.pop("DAGSTER_HOME", None)
    sys.path.insert(0, str(REPO))
    from nvc_pipelines.application import app
    from nvc_pipelines.application.instance import ensure_dagster_home
    from nvc_pipelines.model import PmsKind
    from nvc_pipelines.store.db import ensure_database, store_url
    from nvc_pipelines.store.embedded import stop_server
    from sandboxes.optix import OptixSandbox

    sandbox = None
    try:
        t0 = time.perf_counter()
        app.open_store()
        ensure_dagster_home()  # exports DAGSTER_HOME: the children use the same dagster-postgres instance
        ensure_database(store_url().set(database=BENCH_DATABASE))
        print(f"embedded PostgreSQL and Dagster instance ready in {time.perf_counter() - t0:.1f} s", flush=True)
        sandbox = OptixSandbox(
            practices={OPTIX_PRACTICE: patients},
            api_keys={OPTIX_KEY: OPTIX_PRACTICE},
            rate_limit_per_second=rate_limit,
        ).start()
        t0 = time.perf_counter()
        sandbox.patient_count(OPTIX_PRACTICE)  # seed patients
        sandbox.clinicians(OPTIX_PRACTICE)  # seed the diary (appointments, clinical records) the job also reads
        warm_rows = sum(1 for _ in fetch_pages(sandbox.url, 1000))  # render and cache every patient's JSON
        print(
            f"Optix sandbox: {warm_rows:,} patients seeded and warmed in {time.perf_counter() - t0:.1f} s "
            f"(rate limit {'off' if not rate_limit else f'{rate_limit:g}/s'})",
            flush=True,
        )
        for practice_id in (PRACTICE_ID, PARTS_PRACTICE_ID):
            app.connect_practice(
                practice_id,
                PmsKind.OPTIX,
                "Benchmark practice",
                {"practice_id": OPTIX_PRACTICE, "api_url": sandbox.url},
                {"api_key": OPTIX_KEY},
            )
        yield home, sandbox
    finally:
        if sandbox is not None:
            sandbox.stop()
        stop_server()
        if keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def run_child(variant: str, *args: str) -> dict[str, Any]:
    """Run one variant in its own process; returns its JSON report plus the process's total wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), variant, *args],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
    )
    total = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"variant {variant} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    report = json.loads(lines[-1])
    report["process_seconds"] = total
    return report


def product_page_size() -> int:
    from resources.optix import OptixResource

    return OptixResource().page_size


# --- the raw fetch shared by the floor and to_sql ------------------------------------------------------


def fetch_pages(api_url: str, page_size: int, endpoint: str = "patients"):
    """Every raw row of an endpoint (patients, appointments, clinical-records), page by page, with
    plain httpx (the same requests the client makes)."""
    import httpx

    path = f"/api/v2/practices/{OPTIX_PRACTICE}/{endpoint}"
    params: dict[str, Any] = {"limit": page_size}
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {OPTIX_KEY}"}, timeout=60) as http:
        while True:
            response = http.get(path, params=params)
            response.raise_for_status()
            body = response.json()
            yield from body["data"]
            cursor = body["pagination"]["nextCursor"]
            if not cursor:
                return
            params["cursor"] = cursor


RAW_COLUMNS = (
    "patient_id",
    "title",
    "forename",
    "surname",
    "date_of_birth",
    "mobile",
    "home",
    "email",
    "line1",
    "town",
    "postcode",
    "last_sight_test",
    "recall_due",
    "clinical_flags",
    "notes",
    "updated_at",
)


def raw_values(row: dict[str, Any]) -> tuple[Any, ...]:
    contact = row.get("contact") or {}
    address = row.get("address") or {}
    return (
        row.get("patientId"),
        row.get("title"),
        row.get("forename"),
        row.get("surname"),
        row.get("dateOfBirth"),
        contact.get("mobile"),
        contact.get("home"),
        contact.get("email"),
        address.get("line1"),
        address.get("town"),
        address.get("postcode"),
        row.get("lastSightTest"),
        row.get("recallDue"),
        row.get("clinicalFlags") or [],
        row.get("notes"),
        row.get("updatedAt"),
    )


APPOINTMENT_COLUMNS = ("appointment_id", "patient_id", "start", "duration", "status", "type", "clinician", "notes",
                       "external_reference", "updated_at")  # fmt: skip
CLINICAL_COLUMNS = ("record_id", "patient_id", "exam_date", "flags", "notes", "iop_right", "iop_left", "clinician",
                    "updated_at")  # fmt: skip


def raw_appointment(row: dict[str, Any]) -> tuple[Any, ...]:
    return (
        row.get("appointmentId"),
        row.get("patientId"),
        row.get("start"),
        row.get("durationMinutes"),
        row.get("status"),
        row.get("type"),
        row.get("clinicianId"),
        row.get("notes"),
        row.get("externalReference"),
        row.get("updatedAt"),
    )


def raw_clinical(row: dict[str, Any]) -> tuple[Any, ...]:
    iop = row.get("iop") or {}
    return (
        row.get("recordId"),
        row.get("patientId"),
        row.get("examDate"),
        row.get("flags") or [],
        row.get("notes"),
        iop.get("right"),
        iop.get("left"),
        row.get("optometristId"),
        row.get("updatedAt"),
    )


def _bench_conninfo() -> str:
    from nvc_pipelines.store.db import store_url

    return store_url().set(drivername="postgresql", database=BENCH_DATABASE).render_as_string(hide_password=False)


# --- child side: the variants ----------------------------------------------------------------------------


def child_floor(api_url: str, page_size: int) -> dict[str, Any]:
    """The floor: plain httpx pages streamed into one COPY of the raw fields (no normalising, no merge)."""
    import psycopg

    conninfo = _bench_conninfo()
    imported_rss = current_rss_mb()
    t0 = time.perf_counter()
    rows = 0
    with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS floor_patients")
        columns = ", ".join(f"{c} text[]" if c == "clinical_flags" else f"{c} text" for c in RAW_COLUMNS)
        cur.execute(f"CREATE TABLE floor_patients ({columns})")
        with cur.copy(f"COPY floor_patients ({', '.join(RAW_COLUMNS)}) FROM STDIN") as copy:
            for row in fetch_pages(api_url, page_size):
                copy.write_row(raw_values(row))
                rows += 1
        conn.commit()
    return {"seconds": time.perf_counter() - t0, "rows": rows, "imported_rss_mb": imported_rss}


def child_floor3(api_url: str, page_size: int) -> dict[str, Any]:
    """The floor of the whole job: all three streams the job reads (patients, appointments, clinical
    records) fetched page by page with plain httpx and each streamed into one COPY of its raw fields."""
    import psycopg

    conninfo = _bench_conninfo()
    imported_rss = current_rss_mb()
    streams = (
        ("patients", "floor3_patients", RAW_COLUMNS, raw_values, {"clinical_flags"}),
        ("appointments", "floor3_appointments", APPOINTMENT_COLUMNS, raw_appointment, set()),
        ("clinical-records", "floor3_clinical", CLINICAL_COLUMNS, raw_clinical, {"flags"}),
    )
    t0 = time.perf_counter()
    rows: dict[str, int] = {}
    with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
        for endpoint, table, names, values, arrays in streams:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
            columns = ", ".join(f"{c} text[]" if c in arrays else f"{c} text" for c in names)
            cur.execute(f"CREATE TABLE {table} ({columns})")
            n = 0
            with cur.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN") as copy:
                for row in fetch_pages(api_url, page_size, endpoint):
                    copy.write_row(values(row))
                    n += 1
            rows[endpoint] = n
        conn.commit()
    return {
        "seconds": time.perf_counter() - t0,
        "rows": sum(rows.values()),
        "rows_by_stream": rows,
        "imported_rss_mb": imported_rss,
    }


def child_to_sql(api_url: str, page_size: int) -> dict[str, Any]:
    """The usual hand-written script: fetch everything, `json_normalize`, `DataFrame.to_sql`."""
    import pandas as pd
    from sqlalchemy import create_engine

    engine = create_engine(_bench_conninfo().replace("postgresql://", "postgresql+psycopg://", 1))
    imported_rss = current_rss_mb()
    t0 = time.perf_counter()
    frame = pd.json_normalize(list(fetch_pages(api_url, page_size)))
    frame["clinicalFlags"] = frame["clinicalFlags"].str.join(",")  # to_sql cannot write a list column
    frame.to_sql("tosql_patients", engine, if_exists="replace", index=False)
    seconds = time.perf_counter() - t0
    engine.dispose()
    return {"seconds": seconds, "rows": len(frame), "imported_rss_mb": imported_rss}


def _step_seconds(instance: Any, run_id: str) -> dict[str, float]:
    """Each step's duration (STEP_START to STEP_SUCCESS/FAILURE) and the run's, from the event log."""
    starts: dict[str, float] = {}
    out: dict[str, float] = {}
    run_start = run_end = None
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            continue
        kind = event.event_type_value
        kind = {
            "PIPELINE_START": "RUN_START",
            "PIPELINE_SUCCESS": "RUN_SUCCESS",
            "PIPELINE_FAILURE": "RUN_FAILURE",
        }.get(kind, kind)
        if kind == "STEP_START":
            starts[entry.step_key] = entry.timestamp
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE") and entry.step_key in starts:
            out[entry.step_key] = entry.timestamp - starts[entry.step_key]
        elif kind == "RUN_START":
            run_start = entry.timestamp
        elif kind in ("RUN_SUCCESS", "RUN_FAILURE"):
            run_end = entry.timestamp
    if run_start is not None and run_end is not None:
        out["(run: RUN_START to RUN_SUCCESS)"] = run_end - run_start
    return out


def child_product(full: bool, practice_id: str = PRACTICE_ID, warm_gx: bool = False) -> dict[str, Any]:
    """The product path: `app.sync_practice`, the real `practice_sync` job in process on the
    dagster-postgres instance, exactly as `nvc sync` runs it."""
    t_import = time.perf_counter()
    import nvc_pipelines.definitions  # noqa: F401 - loaded by sync_practice anyway; timed apart
    from nvc_pipelines.application import app
    from nvc_pipelines.application.instance import get_instance

    import_seconds = time.perf_counter() - t_import
    imported_rss = current_rss_mb()
    gx_import_seconds = 0.0
    if warm_gx:
        # A run process imports Great Expectations once, at its first check: a batch of the nightly
        # pays it once for all its practices. Timed apart, like the imports above.
        from nvc_pipelines import quality

        t_gx = time.perf_counter()
        quality.warm_up()
        gx_import_seconds = time.perf_counter() - t_gx
    t0 = time.perf_counter()
    outcome = app.sync_practice(practice_id, trigger="bench", full=full)
    seconds = time.perf_counter() - t0
    if not outcome.success:
        raise SystemExit(f"sync failed: {outcome.error}")
    metadata = {
        asset: {k: v for k, v in meta.items() if isinstance(v, int | float | str) and not isinstance(v, bool)}
        for asset, meta in outcome.metadata.items()
    }
    return {
        "seconds": seconds,
        "import_seconds": import_seconds,
        "gx_import_seconds": gx_import_seconds,
        "imported_rss_mb": imported_rss,
        "rows": metadata.get("patients", {}).get("rows_read", 0),
        "metadata": metadata,
        "steps": _step_seconds(get_instance(), outcome.run_id),
        "run_id": outcome.run_id,
    }


def child_parts() -> dict[str, Any]:
    """The patients asset's components, called directly (no Dagster), into a practice of their own:
    the client's fetch alone, the client's read (fetch + normalise), the staging values and content
    hashes, and the store's write (COPY into staging + INSERT ... ON CONFLICT, in one transaction)."""
    from datetime import date

    from nvc_pipelines.application import app
    from nvc_pipelines.store.streams import PATIENTS
    from nvc_pipelines.sync import next_cursor
    from resources.deployment import pms_gateway

    store = app.open_store()
    practice = store.get_practice(PARTS_PRACTICE_ID)
    secrets = store.practice_credentials(PARTS_PRACTICE_ID)
    out: dict[str, Any] = {}
    with pms_gateway().open(practice, secrets) as client:
        t0 = time.perf_counter()
        fetched = sum(1 for _ in client.iter_patient_rows(None))
        out["fetch_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = client.read_patients(None, date.today())
        out["read_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in result.patients:
        PATIENTS.values(p)
    out["values_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    counts = store.write_patients(
        PARTS_PRACTICE_ID,
        "optix",
        result,
        None,
        full=True,
        cursor_at=next_cursor(p.source_updated_at for p in result.patients),
    )
    out["write_seconds"] = time.perf_counter() - t0
    out["rows"] = fetched
    out["inserted"] = counts.inserted
    return out


def child_main(argv: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    variant = argv[0]
    if variant == "floor":
        report = child_floor(argv[1], int(argv[2]))
    elif variant == "floor3":
        report = child_floor3(argv[1], int(argv[2]))
    elif variant == "to_sql":
        report = child_to_sql(argv[1], int(argv[2]))
    elif variant == "parts":
        report = child_parts()
    elif variant == "product":
        report = child_product(
            full=argv[1] == "full",
            practice_id=argv[2] if len(argv) > 2 and argv[2] != "-" else PRACTICE_ID,
            warm_gx="--warm-gx" in argv,
        )
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    report["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(report, default=str), flush=True)


# --- printing ----------------------------------------------------------------------------------------


def print_steps(title: str, report: dict[str, Any], limit: int = 12) -> None:
    steps = report.get("steps") or {}
    print(f"\n{title}: step durations from the run's event log (longest first)")
    for key, seconds in sorted(steps.items(), key=lambda kv: -kv[1])[:limit]:
        print(f"  {key:<48} {seconds:8.2f} s")


def print_metadata(report: dict[str, Any], keys: tuple[str, ...] = ("mode", "rows_read", "duration_seconds")) -> None:
    for asset, meta in sorted(report.get("metadata", {}).items()):
        shown = ", ".join(f"{k}={meta[k]}" for k in keys if k in meta)
        print(f"  {asset:<18} {shown}")


if __name__ == "__main__":
    child_main(sys.argv[1:])
