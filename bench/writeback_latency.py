"""Benchmark: outbox insert -> appointment in the PMS, through the real daemon, sensor and run worker.

    .venv/bin/python bench/writeback_latency.py [--bookings 20]

Starts an embedded store, the Optix sandbox and `dagster dev` (webserver + daemon) in a temporary
NVC_HOME, then books one appointment at a time and times it until the sandbox holds it. The
baseline, measured in the same run, is the same booking written by the Optix client directly (no
outbox, no Dagster): the ratio is what orchestration costs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
from _harness import JsonFigures, add_json_argument

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bookings", type=int, default=20)
    parser.add_argument("--port", type=int, default=3399)
    add_json_argument(parser)
    args = parser.parse_args()
    out = JsonFigures(args.json, "writeback_latency")

    home = Path(tempfile.mkdtemp(prefix="nvc-bench-"))
    os.environ.update({"NVC_HOME": str(home)})
    os.environ.pop("NVC_DATABASE_URL", None)
    os.environ.pop("DAGSTER_HOME", None)
    sys.path.insert(0, str(REPO))
    from nvc_pipelines import writeback
    from nvc_pipelines.application import app
    from nvc_pipelines.application.demo import demo_connections, start_sandboxes
    from nvc_pipelines.application.instance import ensure_dagster_home
    from nvc_pipelines.model import BookingRequest
    from nvc_pipelines.store.embedded import stop_server
    from resources.deployment import pms_gateway

    store = app.open_store()
    out.note_postgres()
    ensure_dagster_home()
    sandboxes = start_sandboxes(0, patients=50)
    optix = sandboxes["optix"]
    practice_id, kind, name, settings, secrets = next(c for c in demo_connections(sandboxes) if c[0] == "demo-optix")
    app.connect_practice(practice_id, kind, name, settings, secrets)
    client = pms_gateway().open(store.get_practice(practice_id), secrets)
    patient = client.read_patients(None, date.today()).patients[0].pms_patient_id
    day = datetime.combine(date.today() + timedelta(days=700), datetime.min.time(), tzinfo=UTC)

    baseline = []
    for i in range(args.bookings):
        start = day + timedelta(hours=9, minutes=30 * (i % 14)) + timedelta(days=i // 14)
        t0 = time.perf_counter()
        client.create_appointment(BookingRequest(f"direct-{i}", patient, start, start + timedelta(minutes=30)))
        baseline.append(time.perf_counter() - t0)

    log = (home / "dagster-dev.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-w", "workspace.yaml", "-p", str(args.port)],
        cwd=REPO,
        env=os.environ.copy(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    latencies: list[float] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{args.port}/server_info", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        time.sleep(8)  # let the daemon start its sensor loop
        for i in range(args.bookings):
            key = f"bench-{i}"
            start = day + timedelta(days=100 + i // 14, hours=9, minutes=30 * (i % 14))
            t0 = time.perf_counter()
            writeback.add_booking(store, practice_id, key, patient, start)
            while not any(a["nvc_reference"] == key for a in optix.nvc_appointments("OPX-1001")):
                if time.perf_counter() - t0 > 120:
                    raise SystemExit(f"booking {key} did not reach the PMS in 120 s; see {home}/dagster-dev.log")
                time.sleep(0.05)
            latencies.append(time.perf_counter() - t0)
            print(f"  booking {i + 1:>3}: {latencies[-1]:.2f} s", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
        client.close()
        for server in sandboxes.values():
            server.stop()
        stop_server()
        shutil.rmtree(home, ignore_errors=True)

    base = statistics.median(baseline)
    print(f"\nwriteback latency over {len(latencies)} bookings (outbox insert -> appointment in the Optix sandbox)")
    print(
        f"  p50 {percentile(latencies, 50):.2f} s   p95 {percentile(latencies, 95):.2f} s   max {max(latencies):.2f} s"
    )
    print(f"  baseline (direct client call, same run): p50 {base * 1000:.1f} ms")
    print(f"  ratio p50 / baseline: {percentile(latencies, 50) / base:.0f}x   (promise: 60 s; target p95 under 15 s)")
    out.figure("bookings", len(latencies))
    out.figure("latency_p50_s", percentile(latencies, 50))
    out.figure("latency_p95_s", percentile(latencies, 95))
    out.figure("latency_max_s", max(latencies))
    out.figure("direct_call_p50_s", base)
    out.figure("p50_vs_direct_call", percentile(latencies, 50) / base)
    out.write()


if __name__ == "__main__":
    main()
