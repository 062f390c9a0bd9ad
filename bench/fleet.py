"""Benchmark: a fleet of small practices through the queued run coordinator and the real daemon.

    .venv/bin/python bench/fleet.py [--practices 200] [--patients 300] [--max-concurrent 4] [--optix-limit 3]

In a temporary NVC_HOME with the embedded PostgreSQL and one Optix sandbox holding every practice:

1. baseline (same run): a few practices of the same size synced with `app.sync_practice` in one
   warm process (the `practice_sync` job in process, no run launcher, no queue): the cost of the
   sync itself, first sync and nightly (incremental) sync;
2. `dagster dev -w workspace.yaml` (webserver + daemon) on an instance configured like production:
   `deploy/dagster.yaml`'s queued coordinator, run retries and monitoring, with the storage pointed
   at the embedded server and the limits scaled to this machine (`--max-concurrent`, and a
   `pms=optix` tag limit below it so the tag limit is the one that binds);
3. pass "initial": N practices connect at once; the daemon's `initial_sync_sensor` queues their first
   syncs and the coordinator drains the queue;
4. pass "nightly": the same N runs submitted through GraphQL with the nightly schedule's tags
   (the 02:00 schedule yields exactly these run requests), now incremental.

Per run, from its event log: queue wait (enqueued to dequeued), launch (dequeued to RUN_START, i.e.
the run process starting and loading the code location) and execution (RUN_START to success).
Per-run overhead = launch + execution - the baseline's in-process job time for the same kind of
sync. Also the fleet's wall time and throughput, and the highest number of runs seen executing at
once against the limits. Nothing is asserted; a run that fails is counted and its error printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _harness import JsonFigures, add_json_argument

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def write_instance_yaml(dagster_home: Path, storage_url: str, max_concurrent: int, optix_limit: int) -> dict:
    """`deploy/dagster.yaml` with the embedded storage and this machine's limits (hand-written, so
    `nvc` leaves it alone)."""
    import yaml

    config = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    config["storage"] = {"postgres": {"postgres_url": storage_url}}
    coordinator = config["run_coordinator"]["config"]
    coordinator["max_concurrent_runs"] = max_concurrent
    coordinator["dequeue_interval_seconds"] = 1
    for limit in coordinator["tag_concurrency_limits"]:
        if limit["key"] == "pms" and limit["value"] == "optix":
            limit["limit"] = optix_limit
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return coordinator


def baseline_child(practice_ids: list[str]) -> None:
    """In one warm process: the first practice warms up (discarded), then first syncs, then nightly."""
    from nvc_pipelines.application import app

    def timed(pid: str, full: bool) -> float:
        t0 = time.perf_counter()
        outcome = app.sync_practice(pid, trigger="bench", full=full)
        if not outcome.success:
            raise SystemExit(f"baseline sync of {pid} failed: {outcome.error}")
        return time.perf_counter() - t0

    timed(practice_ids[0], True)
    first = [timed(pid, False) for pid in practice_ids[1:]]
    nightly = [timed(pid, False) for pid in practice_ids[1:]]
    print(json.dumps({"first": first, "nightly": nightly}), flush=True)


def run_timings(instance: Any, run_id: str) -> dict[str, float | str | None]:
    marks: dict[str, float] = {}
    error = None
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            continue
        kind = event.event_type_value
        marks.setdefault(kind, entry.timestamp)
        if kind == "STEP_FAILURE" and error is None:
            data = event.step_failure_data
            error = (data.user_failure_data.description if data.user_failure_data else None) or data.error.message
    return {
        "enqueued": marks.get("PIPELINE_ENQUEUED"),
        # The coordinator's daemon launches a run as it dequeues it (PIPELINE_STARTING).
        "dequeued": marks.get("PIPELINE_DEQUEUED") or marks.get("PIPELINE_STARTING"),
        "start": marks.get("PIPELINE_START"),
        "end": marks.get("PIPELINE_SUCCESS") or marks.get("PIPELINE_FAILURE"),
        "error": error,
    }


def wait_for_runs(instance: Any, trigger: str, partitions: set[str], timeout: float) -> list[Any]:
    """Every run with tag `trigger` for these partitions, once each partition's last run (a retry
    replaces the run it retries) has ended."""
    from dagster import DagsterRunStatus, RunsFilter

    done = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
    deadline = time.monotonic() + timeout
    last_print = 0.0
    while True:
        runs = [
            r
            for r in instance.get_runs(filters=RunsFilter(tags={"trigger": trigger}))
            if r.tags.get("dagster/partition") in partitions
        ]
        final = [r for r in runs if not _will_retry(r, runs)]
        finished = [r for r in final if r.status in done]
        if len(finished) == len(final) and {r.tags["dagster/partition"] for r in finished} >= partitions:
            return runs
        if time.monotonic() - last_print > 15:
            print(f"  {trigger}: {len(runs)} runs created, {len(finished)} finished", flush=True)
            last_print = time.monotonic()
        if time.monotonic() > deadline:
            raise SystemExit(f"{trigger}: only {len(finished)} of {len(partitions)} runs finished in {timeout:.0f} s")
        time.sleep(2)


def _will_retry(run: Any, runs: list[Any]) -> bool:
    """A failed run that the daemon's run retries replaced (its retry is in the list)."""
    return any(r.tags.get("dagster/parent_run_id") == run.run_id for r in runs)


def summarise(instance: Any, runs: list[Any], baseline: float, limits: dict[str, int]) -> dict[str, Any]:
    timings = [(run, run_timings(instance, run.run_id)) for run in runs]
    ok = [(r, t) for r, t in timings if r.status.value == "SUCCESS"]
    failed = [(r, t) for r, t in timings if r.status.value != "SUCCESS" and not _will_retry(r, runs)]
    waits = [t["dequeued"] - t["enqueued"] for _, t in ok if t["dequeued"] and t["enqueued"]]
    launches = [t["start"] - t["dequeued"] for _, t in ok if t["start"] and t["dequeued"]]
    execs = [t["end"] - t["start"] for _, t in ok if t["end"] and t["start"]]
    overhead = [(t["end"] - t["dequeued"]) - baseline for _, t in ok if t["end"] and t["dequeued"]]
    first = min(t["enqueued"] or t["start"] for _, t in timings)
    last = max(t["end"] for _, t in timings if t["end"])
    # Highest number of runs executing at once (dequeued .. end: the coordinator counts a run from
    # the moment it launches it).
    edges = sorted(
        [(t["dequeued"], 1) for _, t in timings if t["dequeued"] and t["end"]]
        + [(t["end"], -1) for _, t in timings if t["dequeued"] and t["end"]]
    )
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    wall = last - first
    return {
        "runs": len(runs),
        "succeeded": len(ok),
        "failed": [(r.tags.get("dagster/partition"), t["error"]) for r, t in failed],
        "retried": sum(1 for r in runs if r.tags.get("dagster/parent_run_id")),
        "wall_seconds": wall,
        "runs_per_minute": len(ok) / wall * 60 if wall else float("nan"),
        "queue_wait_p50": _pct(waits, 0.5),
        "queue_wait_max": max(waits, default=float("nan")),
        "launch_p50": _pct(launches, 0.5),
        "launch_p95": _pct(launches, 0.95),
        "exec_p50": _pct(execs, 0.5),
        "exec_p95": _pct(execs, 0.95),
        "overhead_p50": _pct(overhead, 0.5),
        "overhead_mean": statistics.fmean(overhead) if overhead else float("nan"),
        "baseline": baseline,
        "peak_concurrent": peak,
        "limit": min(limits.values()),
        "ideal_wall": len(ok) * baseline / min(limits.values()),
    }


def print_pass(name: str, s: dict[str, Any]) -> None:
    print(f"\npass {name}: {s['succeeded']} of {s['runs']} runs succeeded, {s['retried']} retries")
    for practice, error in s["failed"][:5]:
        print(f"  FAILED {practice}: {error}")
    print(f"  fleet wall                 {s['wall_seconds']:8.1f} s   ({s['runs_per_minute']:.1f} runs/min)")
    print(
        f"  ideal wall (baseline x runs / limit) {s['ideal_wall']:6.1f} s   "
        f"ratio {s['wall_seconds'] / s['ideal_wall']:.2f}"
    )
    print(f"  queue wait p50 / max       {s['queue_wait_p50']:8.1f} / {s['queue_wait_max']:.1f} s")
    print(f"  launch (STARTING -> RUN_START) p50 / p95 {s['launch_p50']:6.2f} / {s['launch_p95']:.2f} s")
    print(f"  execution p50 / p95        {s['exec_p50']:8.2f} / {s['exec_p95']:.2f} s")
    print(f"  baseline in-process job    {s['baseline']:8.2f} s")
    print(
        f"  per-run overhead p50 / mean {s['overhead_p50']:7.2f} / {s['overhead_mean']:.2f} s   "
        f"(run = {(s['baseline'] + s['overhead_p50']) / s['baseline']:.2f} x baseline)"
    )
    print(f"  peak runs executing at once {s['peak_concurrent']} (binding limit {s['limit']})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--practices", type=int, default=200)
    parser.add_argument("--patients", type=int, default=300, help="patients per practice")
    parser.add_argument("--max-concurrent", type=int, default=4, help="max_concurrent_runs of the coordinator")
    parser.add_argument("--optix-limit", type=int, default=3, help="tag concurrency limit for pms=optix")
    parser.add_argument("--baseline-practices", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--keep", action="store_true")
    add_json_argument(parser)
    args = parser.parse_args()
    figures = JsonFigures(args.json, "fleet")

    home = Path(tempfile.mkdtemp(prefix="nvc-fleet-"))
    os.environ["NVC_HOME"] = str(home)
    os.environ.pop("NVC_DATABASE_URL", None)
    os.environ.pop("DAGSTER_HOME", None)
    from dagster_graphql import DagsterGraphQLClient

    from nvc_pipelines.application import app
    from nvc_pipelines.application.devserver import dagster_dev
    from nvc_pipelines.application.instance import ensure_dagster_home, get_instance
    from nvc_pipelines.model import PmsKind
    from nvc_pipelines.store.db import dagster_storage_url
    from nvc_pipelines.store.embedded import stop_server
    from sandboxes.optix import OptixSandbox

    print(
        f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    fleet = [f"fleet-{i:03d}" for i in range(args.practices)]
    base = [f"base-{i}" for i in range(args.baseline_practices)]
    sandbox_ids = {pid: f"OPX-{pid.upper()}" for pid in fleet + base}
    sandbox = OptixSandbox(
        practices={sid: args.patients for sid in sandbox_ids.values()},
        api_keys={f"key-{pid}": sid for pid, sid in sandbox_ids.items()},
        rate_limit_per_second=0,
    ).start()
    services = ExitStack()
    try:
        app.open_store()
        dagster_home = ensure_dagster_home()
        storage = dagster_storage_url().render_as_string(hide_password=False)
        coordinator = write_instance_yaml(dagster_home, storage, args.max_concurrent, args.optix_limit)
        limits = {"max_concurrent_runs": args.max_concurrent, "pms=optix": args.optix_limit}
        print(f"instance: QueuedRunCoordinator, {json.dumps(limits)}; run retries from deploy/dagster.yaml")

        def connect(pid: str) -> None:
            app.connect_practice(
                pid,
                PmsKind.OPTIX,
                f"Fleet {pid}",
                {"practice_id": sandbox_ids[pid], "api_url": sandbox.url},
                {"api_key": f"key-{pid}"},
            )

        for pid in base:
            connect(pid)
        print(f"baseline: {len(base) - 1} practices of {args.patients} patients in one warm process...", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--baseline-child", *base],
            cwd=REPO,
            env=os.environ.copy(),
            capture_output=True,
            text=True,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            raise SystemExit(f"baseline failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        baseline = json.loads(lines[-1])
        base_first, base_nightly = statistics.median(baseline["first"]), statistics.median(baseline["nightly"])
        print(f"  first sync {base_first:.2f} s, nightly sync {base_nightly:.2f} s (median, in process)")

        t0 = time.perf_counter()
        for pid in fleet:
            connect(pid)
        print(f"connected {len(fleet)} practices in {time.perf_counter() - t0:.1f} s", flush=True)
        port = services.enter_context(dagster_dev(home, startup_timeout=120))  # webserver + daemon
        instance = get_instance()
        print("pass initial: the initial_sync_sensor queues every first sync...", flush=True)
        runs = wait_for_runs(instance, "initial", set(fleet), args.timeout)
        initial = summarise(instance, runs, base_first, limits)
        print_pass("initial (first syncs, launched by initial_sync_sensor)", initial)

        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        print(f"\npass nightly: {len(fleet)} runs submitted through GraphQL with the schedule's tags...", flush=True)
        for pid in fleet:
            client.submit_job_execution(
                "practice_sync",
                repository_location_name="nvc_pipelines",
                repository_name="__repository__",
                tags={
                    "dagster/partition": pid,
                    "practice": pid,
                    "pms": "optix",
                    "trigger": "schedule",
                    "fleet": "yes",
                },
            )
        runs = wait_for_runs(instance, "schedule", set(fleet), args.timeout)
        nightly = summarise(instance, runs, base_nightly, limits)
        print_pass("nightly (incremental, queued like the 02:00 schedule)", nightly)
        figures.note_postgres()
        figures.figure("practices", args.practices)
        for name, s in (("initial", initial), ("nightly", nightly)):
            for key in ("wall_seconds", "launch_p50", "exec_p50", "overhead_p50", "baseline", "peak_concurrent"):
                figures.figure(f"{name}_{key}", s[key])
        figures.figure("fleet_overhead_per_practice_s", nightly["overhead_p50"])
        figures.write()
        print(f"\ncoordinator config used: {json.dumps(coordinator)}")
    finally:
        services.close()
        sandbox.stop()
        stop_server()
        if args.keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline-child":
        baseline_child(sys.argv[2:])
    else:
        main()
