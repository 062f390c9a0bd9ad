"""Benchmark: intraday call-list refreshes for a fleet of practices, their cost and the staleness a call sees.

    .venv/bin/python bench/intraday.py [--practices 200] [--patients 50] [--cycles 3] [--changed 0.02]

In a temporary NVC_HOME with the embedded PostgreSQL and the Dagster instance, one Optix sandbox holds
N small practices (what most practices are). Each is connected and given its first sync. Then, per
cycle, a share of every practice's patients changes in the sandbox (a new mobile, or a sight test
today) and one `intraday_refresh` run refreshes them all, as the sensor launches it (one run per PMS
kind): it reads what changed since each practice's cursors and places the households read again.

Reported, each against a baseline measured in the same run:
- the run's wall time and CPU per practice, against a bare fetch of the same changed pages (httpx);
- a run process's cold start (import of the code location in a fresh interpreter), which the daemon
  pays once per run, shared by every practice in it;
- cost per practice per day at the default 15-minute cadence over 9 calling hours (36 refreshes);
- staleness: a change made at a uniformly random moment waits for the next tick (uniform over the
  interval) and then for the run to finish, so its p95 is 0.95 x interval + the run's p95 duration.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path

from _harness import JsonFigures, add_json_argument

REPO = Path(__file__).resolve().parent.parent
INTERVAL_MINUTES = 15
REFRESHES_PER_DAY = 9 * 60 // INTERVAL_MINUTES


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def first_sync(store, practice, client) -> None:
    from nvc_pipelines.recall import RecallRules, recall_with_clinical
    from nvc_pipelines.store.streams import APPOINTMENTS, CLINICAL_RECORDS, PATIENTS
    from nvc_pipelines.sync import next_cursor

    pid = practice.practice_id
    read = client.read_patients(None, date.today())
    store.write_stream(pid, PATIENTS, read.patients, read.rejected, source="optix", run_id=None, full=True,
                       cursor_at=next_cursor(p.source_updated_at for p in read.patients))  # fmt: skip
    for spec, batch in (
        (APPOINTMENTS, client.read_appointments(None)),
        (CLINICAL_RECORDS, client.read_clinical_records(None)),
    ):
        store.write_stream(pid, spec, batch.records, batch.rejected, source="optix", run_id=None, full=True,
                           cursor_at=next_cursor(r.source_updated_at for r in batch.records))  # fmt: skip
    rules = RecallRules.from_settings({})
    clinical = store.load_clinical_records(pid)
    found = [recall_with_clinical(p, clinical.get(p.pms_patient_id, []), rules) for p in store.load_patients(pid)]
    store.write_recalls(pid, [r for r in found if r is not None])
    store.rebuild_call_list(pid)


def bare_fetch(url: str, keys: dict[str, str], since: dict[str, datetime]) -> float:
    """The floor: the same changed pages (patients and appointments since each cursor), fetched and
    parsed with plain httpx, nothing written."""
    import httpx

    t0 = time.perf_counter()
    with httpx.Client(timeout=30) as http:
        for key, practice in keys.items():
            for what in ("patients", "appointments"):
                cursor = None
                while True:
                    params = {"updatedSince": since[practice].isoformat(), "limit": 100}
                    if cursor:
                        params["cursor"] = cursor
                    body = http.get(f"{url}/api/v2/practices/{practice}/{what}", params=params,
                                    headers={"Authorization": f"Bearer {key}"}).json()  # fmt: skip
                    cursor = body.get("nextCursor")
                    if not cursor:
                        break
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--practices", type=int, default=200)
    parser.add_argument("--patients", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument(
        "--changed", type=float, default=0.02, help="share of each practice's patients changed per cycle"
    )
    add_json_argument(parser)
    args = parser.parse_args()
    out = JsonFigures(args.json, "intraday")

    home = Path(tempfile.mkdtemp(prefix="nvc-bench-intraday-"))
    os.environ["NVC_HOME"] = str(home)
    os.environ.pop("NVC_DATABASE_URL", None)
    os.environ.pop("DAGSTER_HOME", None)
    sys.path.insert(0, str(REPO))
    from nvc_pipelines.application import app
    from nvc_pipelines.application.instance import ensure_dagster_home, get_instance
    from nvc_pipelines.model import PmsKind
    from nvc_pipelines.store.embedded import stop_server
    from resources.deployment import pms_gateway
    from resources.store import StoreResource
    from sandboxes.optix import OptixSandbox
    from schedules.intraday import OP_NAME, intraday_refresh_job

    refs = {f"OPX-{i:04d}": f"bench-{i:04d}" for i in range(args.practices)}
    keys = {f"key-{ref}": ref for ref in refs}
    sandbox = OptixSandbox(practices=dict.fromkeys(refs, args.patients), api_keys=keys).start()
    try:
        store = app.open_store()
        out.note_postgres()
        ensure_dagster_home()
        instance = get_instance()
        gateway = pms_gateway()
        t0 = time.perf_counter()
        for ref, practice_id in refs.items():
            practice = store.add_practice(practice_id, practice_id, PmsKind.OPTIX,
                                          {"practice_id": ref, "api_url": sandbox.url}, {"api_key": f"key-{ref}"})  # fmt: skip
            client = gateway.open(practice, {"api_key": f"key-{ref}"})
            try:
                first_sync(store, practice, client)
            finally:
                client.close()
        instance.add_dynamic_partitions("practices", list(refs.values()))
        print(f"{args.practices} practices of {args.patients} patients connected and synced in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip

        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import nvc_pipelines.definitions"], cwd=REPO, check=True)
        cold_start = time.perf_counter() - t0

        resources = {"store": StoreResource(), "pms": gateway}
        config = {"ops": {OP_NAME: {"config": {"practices": list(refs.values())}}}}
        runs, floors, cpus, changed = [], [], [], 0
        for cycle in range(args.cycles):
            since = {ref: datetime.now(UTC) for ref in refs}
            for ref in refs:
                changed += len(sandbox.touch(ref, args.changed))
            floors.append(bare_fetch(sandbox.url, {k: v for k, v in keys.items()}, since))
            c0, t0 = cpu_seconds(), time.perf_counter()
            result = intraday_refresh_job.execute_in_process(run_config=config, instance=instance, resources=resources)
            runs.append(time.perf_counter() - t0)
            cpus.append(cpu_seconds() - c0)
            print(f"cycle {cycle + 1}: run {runs[-1]:.1f} s ({'ok' if result.success else 'FAILED'}), "
                  f"bare fetch {floors[-1]:.1f} s", flush=True)  # fmt: skip
    finally:
        sandbox.stop()
        stop_server()
        shutil.rmtree(home, ignore_errors=True)

    runs.sort()
    n = args.practices
    run_p95 = runs[min(len(runs) - 1, int(0.95 * len(runs)))]
    median_run, median_floor, median_cpu = (
        sorted(runs)[len(runs) // 2],
        sorted(floors)[len(floors) // 2],
        sorted(cpus)[len(cpus) // 2],
    )
    per_practice_cpu = median_cpu / n + cold_start / n
    print(f"\nintraday refresh of {n} practices x {args.patients} patients, {args.changed:.0%} changed per cycle "
          f"({changed:,} changes over {args.cycles} cycles); one run per cycle, as the sensor launches it")  # fmt: skip
    print(
        f"  run wall (median)                {median_run:8.2f} s   x bare fetch of the same pages {median_run / median_floor:.1f}"
    )
    print(f"  bare fetch (httpx, no writes)    {median_floor:8.2f} s")
    print(f"  run CPU per practice             {median_cpu / n * 1000:8.1f} ms")
    print(f"  run process cold start           {cold_start:8.2f} s   shared by the {n} practices of the run")
    print(
        f"  cost per practice per day        {per_practice_cpu * REFRESHES_PER_DAY:8.2f} CPU-s   "
        f"({REFRESHES_PER_DAY} refreshes, every {INTERVAL_MINUTES} min over 9 calling hours)"
    )
    print(
        f"  staleness p95 (model)            {0.95 * INTERVAL_MINUTES + run_p95 / 60:8.1f} min   "
        f"= 0.95 x {INTERVAL_MINUTES} min + run p95 {run_p95:.1f} s"
    )
    out.figure("practices", n)
    out.figure("run_median_s", median_run)
    out.figure("run_p95_s", run_p95)
    out.figure("bare_fetch_median_s", median_floor)
    out.figure("run_vs_bare_fetch", median_run / median_floor)
    out.figure("run_cpu_per_practice_ms", median_cpu / n * 1000)
    out.figure("cold_start_s", cold_start)
    out.figure("cost_per_practice_per_day_cpu_s", per_practice_cpu * REFRESHES_PER_DAY)
    out.figure("staleness_p95_min", 0.95 * INTERVAL_MINUTES + run_p95 / 60)
    out.write()


if __name__ == "__main__":
    main()
