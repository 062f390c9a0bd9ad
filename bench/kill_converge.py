"""Benchmark: `nvc sync` killed with SIGKILL part-way, then run again, ends exactly where an
uninterrupted sync ends.

    .venv/bin/python bench/kill_converge.py [--csv-patients 200000] [--optix-patients 20000]

For a CSV practice (every CSV sync is full) and an Optix practice, in a temporary NVC_HOME with the
embedded PostgreSQL: a reference practice reading the same source is synced once, uninterrupted.
Then, for each kill point (a second into the run's `patients`, `recalls` and `call_list` steps, as
its event log shows them start: a point in time would miss a re-sync that runs faster than the
first), the practice under test runs `nvc sync` as its own process, is sent SIGKILL there, has its
dead run reaped (as `dead_run_sensor` / `nvc sync-log` do) and is synced again to the end. After each
recovery its patients (every column a source fills), recalls (key, due date, rule), call list (key,
listed, reason) and rejected rows are compared with the reference's: "converged" means no row
differs. Prints one line per kill and the totals; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _harness import OPTIX_PRACTICE, PARTS_PRACTICE_ID, PRACTICE_ID, JsonFigures, add_json_argument, bench_environment
from resync import write_csv

KILL_AT_STEPS = ("patients", "recalls", "call_list")  # a second after each starts
KILL_DELAY_SECONDS = 1.0
NVC = str(Path(sys.executable).with_name("nvc"))

# What a practice holds, keyed by the source's ids so two practices reading one source compare equal.
STATE_QUERIES = {
    # Every column a source fills, but not the ids and clocks.
    "patients": (
        "SELECT pms_patient_id, md5((to_jsonb(pt) - ARRAY['patient_id', 'practice_id', "
        "'first_seen_at', 'updated_at', 'change_seq', 'merged_into'])::text) "
        "FROM patients pt WHERE practice_id = :p"
    ),
    "recalls": (
        "SELECT pt.pms_patient_id, r.due_date, r.rule FROM recalls r JOIN patients pt USING (patient_id) "
        "WHERE r.practice_id = :p"
    ),
    "call_list": (
        "SELECT pt.pms_patient_id, c.listed, c.reason_code FROM call_list c JOIN patients pt USING (patient_id) "
        "WHERE c.practice_id = :p"
    ),
    "rejected_rows": "SELECT source, reason FROM rejected_rows WHERE practice_id = :p",
}


def state(practice_id: str) -> dict[str, list[tuple]]:
    from sqlalchemy import text

    from nvc_pipelines.application import app

    with app.open_store().begin_owner() as conn:  # across the two practices: the owner's view
        return {
            name: sorted(tuple(row) for row in conn.execute(text(sql), {"p": practice_id}))
            for name, sql in STATE_QUERIES.items()
        }


def differences(a: dict[str, list[tuple]], b: dict[str, list[tuple]]) -> dict[str, int]:
    return {name: len(set(a[name]) ^ set(b[name])) for name in a if set(a[name]) != set(b[name])}


def sync(practice_id: str) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([NVC, "sync", practice_id], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"nvc sync {practice_id} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def killed_then_recovered(practice_id: str, step: str) -> dict[str, float | bool | int | str]:
    """Start `nvc sync`, SIGKILL it a second after its run's `step` started, reap the run, sync again."""
    from dagster import DagsterEventType, RunsFilter

    from nvc_pipelines.application.instance import get_instance
    from schedules.runs import reap_dead_runs

    instance = get_instance()
    partition = RunsFilter(tags={"dagster/partition": practice_id})
    before = {r.run_id for r in instance.get_runs(filters=partition)}
    child = subprocess.Popen([NVC, "sync", practice_id], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    reached = False
    while child.poll() is None and not reached:
        time.sleep(0.2)
        for run in instance.get_runs(filters=partition, limit=3):
            if run.run_id not in before:
                started = instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)
                reached = any(e.step_key == step for e in started)
    if reached:
        time.sleep(KILL_DELAY_SECONDS)
    killed_after = time.perf_counter() - t0
    was_running = child.poll() is None
    child.send_signal(signal.SIGKILL)
    child.wait()
    reaped = reap_dead_runs(instance)
    t0 = time.perf_counter()
    recovery = sync(practice_id)
    return {"step": step, "killed_after_seconds": killed_after, "was_running": was_running,
            "reaped_runs": len(reaped), "recovery_seconds": recovery,
            "wall_seconds": time.perf_counter() - t0}  # fmt: skip


def measure(label: str, reference: str, under_test: str, rows: int) -> list[dict]:
    print(f"{label}: reference sync of {rows:,} rows...", flush=True)
    length = sync(reference)
    expected = state(reference)
    print(f"  uninterrupted: {length:.1f} s; {len(expected['patients']):,} patients, "
          f"{len(expected['recalls']):,} recalls, {len(expected['call_list']):,} call-list rows", flush=True)  # fmt: skip
    if not expected["patients"]:
        raise SystemExit(f"the reference practice {reference} holds no patients: nothing to compare against")
    results = []
    for step in KILL_AT_STEPS:
        outcome = killed_then_recovered(under_test, step)
        diff = differences(expected, state(under_test))
        results.append({"source": label, **outcome, "differences": diff})
        print(f"  SIGKILL {KILL_DELAY_SECONDS:g} s into {step} ({outcome['killed_after_seconds']:.1f} s after start, "
              f"still running: {outcome['was_running']}), run reaped: {outcome['reaped_runs']}, re-sync "
              f"{outcome['recovery_seconds']:.1f} s: {'converged' if not diff else f'DIFFERS {diff}'}", flush=True)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--csv-patients", type=int, default=200_000)
    parser.add_argument("--optix-patients", type=int, default=20_000)
    add_json_argument(parser)
    args = parser.parse_args()
    out = JsonFigures(args.json, "kill_converge")

    with bench_environment(args.optix_patients) as (home, _sandbox):
        from nvc_pipelines.application import app
        from nvc_pipelines.model import PmsKind

        drop = home / "drop"
        drop.mkdir()
        write_csv(drop / "patients.csv", args.csv_patients)
        for practice_id in ("bench-csv-ref", "bench-csv"):
            app.connect_practice(practice_id, PmsKind.CSV, "Benchmark CSV practice", {"path": str(drop)}, {})
        out.note_postgres()
        os.environ.setdefault("NVC_RETRY_BASE_SECONDS", "1")
        results = measure("csv", "bench-csv-ref", "bench-csv", args.csv_patients)
        results += measure(f"optix ({OPTIX_PRACTICE})", PARTS_PRACTICE_ID, PRACTICE_ID, args.optix_patients)

    converged = sum(1 for r in results if not r["differences"])
    mid_run = sum(1 for r in results if r["was_running"])
    print(f"\nkill -9 convergence: {converged} of {len(results)} killed syncs converged to the uninterrupted result "
          f"({mid_run} killed while running)")  # fmt: skip
    out.figure("killed_syncs", len(results))
    out.figure("killed_mid_run", mid_run)
    out.figure("converged", converged)
    out.figure("all_converged", converged == len(results))
    out.write()


if __name__ == "__main__":
    main()
