"""Benchmark: the nightly incremental sync after 1% of a large Optix practice changed, against the full sync.

    .venv/bin/python bench/incremental_sync.py [--patients 200000] [--changed 0.01]

In a temporary NVC_HOME with the embedded PostgreSQL: a full sync of an Optix sandbox practice of N
patients (default 200,000) through `app.sync_practice` (the real `practice_sync` Dagster job in
process on the dagster-postgres instance), then `touch` of 1% of the patients in the sandbox (a new
mobile, or a sight test today), then the incremental sync the nightly schedule would run. Each sync
runs in its own process. The baseline is the full sync measured in the same run: the issue asks
that a 1%-changed nightly costs a small fraction of it. Rows read per asset come from the
materialisation metadata; step durations from the run's event log. Nothing is asserted.

Like the imports of Dagster and the code location, Great Expectations is imported before each sync
is timed and its import reported apart: a nightly batch process pays it once for all its practices.
The ratio with that import counted in both syncs is printed and written beside the headline one.
"""

from __future__ import annotations

import argparse

from _harness import OPTIX_PRACTICE, JsonFigures, add_json_argument, bench_environment, run_child


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=200_000)
    parser.add_argument("--changed", type=float, default=0.01, help="share of patients touched (default 1%%)")
    parser.add_argument("--rate-limit", type=float, default=0.0, help="sandbox requests/s (0: off)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary NVC_HOME")
    add_json_argument(parser)
    args = parser.parse_args()
    out = JsonFigures(args.json, "incremental_sync")

    with bench_environment(args.patients, rate_limit=args.rate_limit, keep=args.keep) as (_home, sandbox):
        out.note_postgres()
        print("running the full sync...", flush=True)
        full = run_child("product", "full", "-", "--warm-gx")
        print(f"  {full['seconds']:.1f} s", flush=True)
        touched = sandbox.touch(OPTIX_PRACTICE, round(args.patients * args.changed))
        print(f"touched {len(touched):,} patients in the sandbox; running the incremental sync...", flush=True)
        incremental = run_child("product", "incremental", "-", "--warm-gx")
        print(f"  {incremental['seconds']:.1f} s", flush=True)

    # Each sync's process imports Great Expectations before the job is timed (`gx_import_seconds`):
    # the nightly runs practices in batches, which pay that import once for all of them. The ratio
    # with it counted in, as a process syncing one practice alone pays it, is reported beside.
    ratio = incremental["seconds"] / full["seconds"]
    cold = (incremental["seconds"] + incremental["gx_import_seconds"]) / (full["seconds"] + full["gx_import_seconds"])
    print(
        f"\nincremental sync after {len(touched):,} of {args.patients:,} patients changed "
        f"({args.changed:.0%}); baseline: the full sync, same run"
    )
    print(f"  full sync (whole practice_sync job)          {full['seconds']:8.2f} s")
    print(f"  incremental sync (whole practice_sync job)   {incremental['seconds']:8.2f} s")
    print(f"  ratio incremental / full                     {ratio:8.2f}   ({ratio:.0%} of a full sync)")
    print(
        f"  Great Expectations import (once a process)   {incremental['gx_import_seconds']:8.2f} s; "
        f"ratio with it in both: {cold:.2f}"
    )
    fp = float(full["metadata"].get("patients", {}).get("duration_seconds", 0))
    ip = float(incremental["metadata"].get("patients", {}).get("duration_seconds", 0))
    if fp:
        print(f"  patients asset alone: full {fp:.2f} s, incremental {ip:.2f} s, ratio {ip / fp:.2f}")
    print(
        f"  peak RSS: full {full['peak_rss_mb']:.0f} MB, incremental {incremental['peak_rss_mb']:.0f} MB; "
        f"touched rows are {args.changed:.0%} of the practice"
    )

    out.figure("patients", args.patients)
    out.figure("changed_share", args.changed)
    out.figure("full_job_s", full["seconds"])
    out.figure("incremental_job_s", incremental["seconds"])
    out.figure("incremental_vs_full", ratio)
    out.figure("incremental_vs_full_with_gx_import", cold)
    out.figure("gx_import_s", incremental["gx_import_seconds"])
    out.figure("full_peak_rss_mb", full["peak_rss_mb"])
    out.figure("incremental_peak_rss_mb", incremental["peak_rss_mb"])
    for step, seconds in incremental.get("steps", {}).items():
        out.figure(f"incremental_step_s:{step}", seconds)
    out.write()

    print("\nper asset (materialisation metadata) and per step (event log), full -> incremental:")
    print(f"  {'step':<40} {'full s':>8} {'incr s':>8} {'ratio':>6}   rows read full -> incremental")
    keys = sorted(set(full["steps"]) | set(incremental["steps"]), key=lambda k: -full["steps"].get(k, 0))
    for key in keys:
        f, i = full["steps"].get(key, 0.0), incremental["steps"].get(key, 0.0)
        rows = ""
        if key in full["metadata"] or key in incremental["metadata"]:
            fm, im = full["metadata"].get(key, {}), incremental["metadata"].get(key, {})
            for name in ("rows_read", "patients", "listed"):
                if name in fm or name in im:
                    rows = f"{name} {fm.get(name, '-'):,} -> {im.get(name, '-'):,}"
                    if "mode" in im:
                        rows += f" ({fm.get('mode')} -> {im.get('mode')})"
                    break
        print(f"  {key:<40} {f:8.2f} {i:8.2f} {i / f if f else 0:6.2f}   {rows}")


if __name__ == "__main__":
    main()
