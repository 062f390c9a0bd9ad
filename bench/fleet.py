"""Benchmark: a fleet of small practices through the queued run coordinator and the real daemon.

    .venv/bin/python bench/fleet.py [--practices 200] [--patients 300] [--max-concurrent 4] [--optix-limit 3]
        [--batch-size 25] [--unbatched] [--broken 1] [--first-syncs daemon|in-process]

In a temporary NVC_HOME with the embedded PostgreSQL and one Optix sandbox holding every practice:

1. baseline (same run): a few practices of the same size synced with `app.sync_practice` in one
   warm process (the `practice_sync` job in process, no run launcher, no queue): the cost of the
   sync itself, first sync and nightly (incremental) sync; the nightly baseline is measured again
   right before and after each nightly pass (a shared machine's load changes over a long run), and
   those passes are compared with it;
2. `dagster dev -w workspace.yaml` (webserver + daemon) on an instance configured like production:
   `deploy/dagster.yaml`'s queued coordinator, run retries and monitoring, with the storage pointed
   at the embedded server and the limits scaled to this machine (`--max-concurrent`, and a
   `pms=optix` tag limit below it so the tag limit is the one that binds);
3. pass "initial": N practices connect at once; the daemon's `initial_sync_sensor` queues their first
   syncs and the coordinator drains the queue (with `--first-syncs in-process` the first syncs run in
   one warm process before `dagster dev` starts instead, and there is no initial pass: quicker on a
   busy machine, and the nightly passes are what the figure is about);
4. pass "nightly batched": what the 02:00 schedule yields, submitted through GraphQL: one
   `practice_sync_batch` run per batch (`schedules.jobs.batches` of `--batch-size` practices of one
   PMS, default `NVC_SYNC_BATCH_SIZE` or 25) with the schedule's run config and tags; each batch runs
   its practices one after the other, each as its own `practice_sync` run (tags `nvc/batch`,
   `trigger=schedule`, its partition); incremental;
5. with `--unbatched`, pass "nightly unbatched": one `practice_sync` run per practice with the
   schedule's tags (the nightly before batching, and `NVC_SYNC_BATCH_SIZE=1`), for comparison.

Per run, from its event log: queue wait (enqueued to dequeued), launch (dequeued to RUN_START, i.e.
the run process starting and loading the code location) and execution (RUN_START to success).
Unbatched, per-run overhead = launch + execution - the baseline's in-process job time for the same
kind of sync. Batched, per-practice overhead = sum over batches of (launch + execution) / practices
- the baseline (the practices made to fail by `--broken` left out of both: their runs wait out the
PMS client's retries); also each practice's own run inside its batch and each batch's fixed cost
(launch + execution - its practices' runs). Also the fleet's wall time and throughput, and the
highest number of runs seen executing at once against the limits.

The batched pass also checks that every practice got exactly one `practice_sync` run of its own
partition from its batch, and, with `--broken N`, that N practices whose PMS URL points at a port
nobody listens on (changed in the store after the first syncs) fail their own runs only: their
batch runs and batch-mates succeed. Nothing is asserted; what fails is counted and printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
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


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


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


def baseline_child(practice_ids: list[str], nightly_only: bool = False) -> None:
    """In one warm process: the first practice warms up (discarded), then first syncs, then nightly
    (`nightly_only`: practices synced before, nightly syncs only)."""
    from nvc_pipelines.application import app

    def timed(pid: str, full: bool) -> float:
        t0 = time.perf_counter()
        outcome = app.sync_practice(pid, trigger="bench", full=full)
        if not outcome.success:
            raise SystemExit(f"baseline sync of {pid} failed: {outcome.error}")
        return time.perf_counter() - t0

    timed(practice_ids[0], not nightly_only)
    first = [] if nightly_only else [timed(pid, False) for pid in practice_ids[1:]]
    nightly = [timed(pid, False) for pid in practice_ids[1:]]
    print(json.dumps({"first": first, "nightly": nightly}), flush=True)


def sync_child(practice_ids: list[str]) -> None:
    """`--first-syncs in-process`: the fleet's first syncs one after the other in one warm process."""
    from nvc_pipelines.application import app

    for pid in practice_ids:
        outcome = app.sync_practice(pid, trigger="bench", full=False)
        if not outcome.success:
            raise SystemExit(f"first sync of {pid} failed: {outcome.error}")


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


def _done() -> set[Any]:
    from dagster import DagsterRunStatus

    return {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def wait_for_runs(
    instance: Any, trigger: str, partitions: set[str], timeout: float, tags: dict[str, str] | None = None
) -> list[Any]:
    """Every run with tag `trigger` (and `tags`) for these partitions, once each partition's last run
    (a retry replaces the run it retries) has ended."""
    from dagster import RunsFilter

    done = _done()
    deadline = time.monotonic() + timeout
    last_print = 0.0
    while True:
        runs = [
            r
            for r in instance.get_runs(filters=RunsFilter(tags={"trigger": trigger, **(tags or {})}))
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


def wait_for_batches(instance: Any, submitted: list[str], timeout: float) -> tuple[list[Any], list[Any]]:
    """The batch runs (those submitted and any retries of them) once every one has ended, and the
    practices' `practice_sync` runs they made (tag `nvc/batch`), once each of those has ended too."""
    from dagster import RunsFilter

    from schedules.jobs import BATCH_TAG

    done = _done()
    deadline = time.monotonic() + timeout
    last_print = 0.0
    while True:
        batch_runs = [
            r
            for r in instance.get_runs(filters=RunsFilter(job_name="practice_sync_batch"))
            if r.run_id in submitted or r.tags.get("dagster/root_run_id") in submitted
        ]
        ids = {r.run_id for r in batch_runs}
        practice_runs = [
            r
            for r in instance.get_runs(filters=RunsFilter(job_name="practice_sync", tags={"trigger": "schedule"}))
            if r.tags.get(BATCH_TAG) in ids
        ]
        final = [r for r in batch_runs if not _will_retry(r, batch_runs)]
        if all(r.status in done for r in final + practice_runs):
            return batch_runs, practice_runs
        if time.monotonic() - last_print > 15:
            print(
                f"  batched: {sum(r.status in done for r in final)} of {len(final)} batch runs ended, "
                f"{sum(r.status in done for r in practice_runs)} practice runs ended",
                flush=True,
            )
            last_print = time.monotonic()
        if time.monotonic() > deadline:
            raise SystemExit(f"batched: not every batch run ended in {timeout:.0f} s")
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
    peak = _peak([(t["dequeued"], t["end"]) for _, t in timings if t["dequeued"] and t["end"]])
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


def _peak(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def summarise_batched(
    instance: Any,
    batch_runs: list[Any],
    practice_runs: list[Any],
    practices: list[str],
    broken: set[str],
    baseline: float,
    limits: dict[str, int],
) -> dict[str, Any]:
    from schedules.jobs import BATCH_TAG

    batches = [(r, run_timings(instance, r.run_id)) for r in batch_runs if not _will_retry(r, batch_runs)]
    runs = [(r, run_timings(instance, r.run_id)) for r in practice_runs]
    duration = {r.run_id: t["end"] - t["start"] for r, t in runs if t["end"] and t["start"]}
    waits = [t["dequeued"] - t["enqueued"] for _, t in batches if t["dequeued"] and t["enqueued"]]
    launches = [t["start"] - t["dequeued"] for _, t in batches if t["start"] and t["dequeued"]]
    execs = [t["end"] - t["start"] for _, t in batches if t["end"] and t["start"]]
    costs = {r.run_id: t["end"] - t["dequeued"] for r, t in batches if t["end"] and t["dequeued"]}
    fixed = [
        cost - sum(duration.get(p.run_id, 0.0) for p in practice_runs if p.tags.get(BATCH_TAG) == run_id)
        for run_id, cost in costs.items()
    ]
    healthy = [(r, t) for r, t in runs if r.tags.get("dagster/partition") not in broken]
    broken_time = sum(duration.get(r.run_id, 0.0) for r, _ in runs if r.tags.get("dagster/partition") in broken)
    n_healthy = len(practices) - len(broken)
    per_practice_cost = (sum(costs.values()) - broken_time) / n_healthy if n_healthy else float("nan")
    practice_durations = [duration[r.run_id] for r, _ in healthy if r.run_id in duration]

    # The checks: one practice_sync run of its own partition per practice, from a batch of this pass,
    # tagged as the schedule's; failures only where the PMS was made unreachable.
    per_partition: dict[str, int] = {}
    for r in practice_runs:
        key = r.tags.get("dagster/partition")
        per_partition[key] = per_partition.get(key, 0) + 1
    own_run = (
        set(per_partition) == set(practices)
        and all(n == 1 for n in per_partition.values())
        and all(
            r.tags.get("trigger") == "schedule" and r.tags.get("practice") == r.tags.get("dagster/partition")
            for r in practice_runs
        )
    )
    failed = {r.tags.get("dagster/partition"): t["error"] for r, t in runs if r.status.value != "SUCCESS"}
    batches_ok = all(r.status.value == "SUCCESS" for r, _ in batches)
    first = min(t["enqueued"] or t["start"] for _, t in batches)
    last = max(t["end"] for _, t in batches if t["end"])
    wall = last - first
    limit = min(limits.values())
    return {
        "batches": len(batches),
        "batch_runs_succeeded": sum(r.status.value == "SUCCESS" for r, _ in batches),
        "retried": sum(1 for r in batch_runs if r.tags.get("dagster/parent_run_id")),
        "practices": len(practices),
        "practice_runs": len(practice_runs),
        "practice_runs_succeeded": sum(r.status.value == "SUCCESS" for r in practice_runs),
        "failed": sorted(failed.items()),
        "every_practice_own_run": own_run,
        "failures_isolated": batches_ok and set(failed) == broken,
        "broken": sorted(broken),
        "wall_seconds": wall,
        "practices_per_minute": len(practices) / wall * 60 if wall else float("nan"),
        "queue_wait_p50": _pct(waits, 0.5),
        "queue_wait_max": max(waits, default=float("nan")),
        "launch_p50": _pct(launches, 0.5),
        "launch_max": max(launches, default=float("nan")),
        "exec_p50": _pct(execs, 0.5),
        "exec_max": max(execs, default=float("nan")),
        "batch_fixed_p50": _pct(fixed, 0.5),
        "practice_run_p50": _pct(practice_durations, 0.5),
        "practice_run_p95": _pct(practice_durations, 0.95),
        "cost_per_practice": per_practice_cost,
        "overhead_per_practice": per_practice_cost - baseline,
        "baseline": baseline,
        "peak_concurrent": _peak([(t["dequeued"], t["end"]) for _, t in batches if t["dequeued"] and t["end"]]),
        "limit": limit,
        "ideal_wall": len(practices) * baseline / limit,
    }


def print_batched(s: dict[str, Any], size: int) -> None:
    print(
        f"\npass nightly batched: {s['batch_runs_succeeded']} of {s['batches']} batch runs (up to {size} practices) "
        f"succeeded, {s['retried']} retries; {s['practice_runs_succeeded']} of {s['practice_runs']} practice runs "
        f"succeeded ({s['practices']} practices)"
    )
    for practice, error in s["failed"][:5]:
        print(f"  FAILED {practice}{' (made unreachable)' if practice in s['broken'] else ''}: {error}")
    print(
        f"  every practice its own practice_sync run (partition, trigger=schedule, nvc/batch): {s['every_practice_own_run']}"
    )
    if s["broken"]:
        print(
            f"  failures isolated (only the unreachable practices' runs failed, batches ok): {s['failures_isolated']}"
        )
    print(f"  fleet wall                 {s['wall_seconds']:8.1f} s   ({s['practices_per_minute']:.1f} practices/min)")
    print(
        f"  ideal wall (baseline x practices / limit) {s['ideal_wall']:6.1f} s   "
        f"ratio {s['wall_seconds'] / s['ideal_wall']:.2f}"
    )
    print(f"  batch queue wait p50 / max {s['queue_wait_p50']:8.1f} / {s['queue_wait_max']:.1f} s")
    print(f"  batch launch (STARTING -> RUN_START) p50 / max {s['launch_p50']:6.2f} / {s['launch_max']:.2f} s")
    print(f"  batch execution p50 / max  {s['exec_p50']:8.2f} / {s['exec_max']:.2f} s")
    print(f"  batch fixed cost (launch + execution - its practices' runs) p50 {s['batch_fixed_p50']:.2f} s")
    print(f"  a practice's run in its batch p50 / p95 {s['practice_run_p50']:6.2f} / {s['practice_run_p95']:.2f} s")
    print(f"  baseline in-process job    {s['baseline']:8.2f} s")
    print(
        f"  per-practice cost / overhead {s['cost_per_practice']:6.2f} / {s['overhead_per_practice']:.2f} s   "
        "(sum of batches' launch + execution / practices; overhead = cost - baseline)"
    )
    print(f"  peak batch runs executing at once {s['peak_concurrent']} (binding limit {s['limit']})")


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
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="practices per nightly batch run (default NVC_SYNC_BATCH_SIZE or 25)",
    )
    parser.add_argument("--unbatched", action="store_true", help="also run the nightly with one run per practice")
    parser.add_argument(
        "--broken", type=int, default=0, help="practices whose PMS is made unreachable before the nightly passes"
    )
    parser.add_argument(
        "--first-syncs",
        choices=("daemon", "in-process"),
        default="daemon",
        help="daemon: pass initial through initial_sync_sensor; in-process: the fleet's first syncs in one warm "
        "process before `dagster dev` starts (no initial pass: quicker on a busy machine)",
    )
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
    from nvc_pipelines.application.devserver import dagster_dev, free_port
    from nvc_pipelines.application.instance import ensure_dagster_home, get_instance
    from nvc_pipelines.model import PmsKind
    from nvc_pipelines.store.db import dagster_storage_url
    from nvc_pipelines.store.embedded import stop_server
    from sandboxes.optix import OptixSandbox
    from schedules.jobs import BATCH_OP, batch_size, batches

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

        def measure_baseline(mode: str) -> dict[str, list[float]]:
            out = subprocess.run(
                [sys.executable, __file__, mode, *base], cwd=REPO, env=os.environ.copy(), capture_output=True, text=True
            )
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                raise SystemExit(f"baseline failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            return json.loads(lines[-1])

        print(f"baseline: {len(base) - 1} practices of {args.patients} patients in one warm process...", flush=True)
        baseline = measure_baseline("--baseline-child")
        base_first, base_nightly = statistics.median(baseline["first"]), statistics.median(baseline["nightly"])
        print(f"  first sync {base_first:.2f} s, nightly sync {base_nightly:.2f} s (median, in process)")

        t0 = time.perf_counter()
        for pid in fleet:
            connect(pid)
        print(f"connected {len(fleet)} practices in {time.perf_counter() - t0:.1f} s", flush=True)
        initial = None
        if args.first_syncs == "in-process":
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, __file__, "--sync-child", *fleet], cwd=REPO, env=os.environ.copy(), text=True
            )
            if out.returncode:
                raise SystemExit("first syncs in process failed")
            print(f"first syncs of {len(fleet)} practices in one warm process: {time.perf_counter() - t0:.1f} s")
        port = services.enter_context(dagster_dev(home, startup_timeout=300))  # webserver + daemon
        instance = get_instance()
        if args.first_syncs == "daemon":
            print("pass initial: the initial_sync_sensor queues every first sync...", flush=True)
            runs = wait_for_runs(instance, "initial", set(fleet), args.timeout)
            initial = summarise(instance, runs, base_first, limits)
            print_pass("initial (first syncs, launched by initial_sync_sensor)", initial)

        # The nightly passes are incremental syncs of what the first syncs wrote. `--broken` practices
        # now point at a port nobody listens on (written to the store directly: connecting again
        # would test the connection first).
        step = max(1, len(fleet) // max(1, args.broken))
        broken = set(fleet[1::step][: args.broken])
        if broken:
            dead = f"http://127.0.0.1:{free_port()}"
            store = app.open_store()
            for pid in sorted(broken):
                store.add_practice(
                    pid,
                    f"Fleet {pid}",
                    PmsKind.OPTIX,
                    {"practice_id": sandbox_ids[pid], "api_url": dead},
                    {"api_key": f"key-{pid}"},
                    replace=True,
                )
            print(f"\nmade unreachable ({dead}): {', '.join(sorted(broken))}")

        # The load of a shared machine changes over a long run: the nightly baseline is measured again
        # right before and right after the batched pass (dagster dev idle), and their median is used.
        near = measure_baseline("--nightly-baseline-child")["nightly"]
        print(f"  nightly baseline before the batched pass: {statistics.median(near):.2f} s (median, in process)")

        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        size = args.batch_size or batch_size()
        kinds = {p["practice_id"]: p["pms_kind"] for p in app.open_store().list_practices()}
        plan = batches({pid: kinds[pid] for pid in fleet}, size)
        print(
            f"\npass nightly batched: {len(plan)} practice_sync_batch runs of up to {size} practices submitted "
            "through GraphQL as the schedule yields them...",
            flush=True,
        )
        submitted = [
            client.submit_job_execution(
                "practice_sync_batch",
                repository_location_name="nvc_pipelines",
                repository_name="__repository__",
                run_config={"ops": {BATCH_OP: {"config": {"practices": ids}}}},
                tags={"pms": kind, "trigger": "schedule", "nvc/practices": str(len(ids))},
            )
            for kind, ids in plan
        ]
        batch_runs, practice_runs = wait_for_batches(instance, submitted, args.timeout)
        nightly_load = os.getloadavg()
        print(f"  load average at the end of the batched pass: {', '.join(f'{x:.2f}' for x in nightly_load)}")
        after = measure_baseline("--nightly-baseline-child")["nightly"]
        print(f"  nightly baseline after the batched pass: {statistics.median(after):.2f} s (median, in process)")
        base_near = statistics.median(near + after)
        batched = summarise_batched(instance, batch_runs, practice_runs, fleet, broken, base_near, limits)
        print_batched(batched, size)

        figures.note_postgres()
        figures.figure("practices", args.practices)
        figures.figure("patients", args.patients)
        figures.figure("batch_size", size)
        figures.figure("broken", len(broken))
        figures.figure("first_syncs", args.first_syncs)
        figures.figure("load_during_nightly", [round(x, 2) for x in nightly_load])
        figures.figure("baseline_nightly_at_start", base_nightly)
        figures.figure("baseline_nightly_around_batched", base_near)
        for key in ("wall_seconds", "launch_p50", "exec_p50", "overhead_p50", "baseline", "peak_concurrent"):
            if initial:
                figures.figure(f"initial_{key}", initial[key])
        for key in (
            "batches",
            "wall_seconds",
            "queue_wait_p50",
            "launch_p50",
            "exec_p50",
            "batch_fixed_p50",
            "practice_run_p50",
            "practice_run_p95",
            "cost_per_practice",
            "overhead_per_practice",
            "baseline",
            "peak_concurrent",
            "practice_runs",
            "practice_runs_succeeded",
            "every_practice_own_run",
            "failures_isolated",
        ):
            figures.figure(f"nightly_batched_{key}", batched[key])
        figures.figure("fleet_overhead_per_practice_s", batched["overhead_per_practice"])
        figures.write()  # now: an interrupted unbatched pass keeps the batched figures

        unbatched = None
        if args.unbatched:
            print(
                f"\npass nightly unbatched: {len(fleet)} practice_sync runs submitted through GraphQL "
                "with the schedule's tags (one run per practice)...",
                flush=True,
            )
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
                        "fleet": "unbatched",
                    },
                )
            runs = wait_for_runs(instance, "schedule", set(fleet), args.timeout, tags={"fleet": "unbatched"})
            later = measure_baseline("--nightly-baseline-child")["nightly"]
            print(f"  nightly baseline after the unbatched pass: {statistics.median(later):.2f} s (median, in process)")
            unbatched = summarise(instance, runs, statistics.median(after + later), limits)
            print_pass("nightly unbatched (incremental, one run per practice)", unbatched)

        if unbatched:
            for key in ("wall_seconds", "launch_p50", "exec_p50", "overhead_p50", "baseline", "peak_concurrent"):
                figures.figure(f"nightly_unbatched_{key}", unbatched[key])
            figures.write()  # again, with the unbatched pass
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
    elif len(sys.argv) > 1 and sys.argv[1] == "--nightly-baseline-child":
        baseline_child(sys.argv[2:], nightly_only=True)
    elif len(sys.argv) > 1 and sys.argv[1] == "--sync-child":
        sync_child(sys.argv[2:])
    else:
        # SIGTERM and SIGHUP end `main` through its `finally` too: dagster dev, the sandbox and the store stop.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
        main()
