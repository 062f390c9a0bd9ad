"""Benchmark: full sync of a large Optix practice through the product path, against a floor and to_sql.

    .venv/bin/python bench/full_sync.py [--patients 200000] [--rate-limit 0]

In a temporary NVC_HOME with the embedded PostgreSQL, an Optix sandbox practice of N patients
(default 200,000) is synced three ways, each in its own process (so peak RSS is its own):

- product: `app.sync_practice(..., full=True)`, the real `practice_sync` Dagster job in process on the
  dagster-postgres instance (patients, appointments, clinical records, recalls, call list and the
  asset checks); the `patients` asset's own duration is read from its materialisation metadata;
- floor: the same patient pages (same page size) fetched with plain httpx and streamed into one
  `COPY` of the raw fields: nothing normalised, nothing merged;
- floor3: the floor of the whole job: all three streams the job reads (patients, appointments,
  clinical records) fetched with plain httpx and each streamed into one `COPY` of its raw fields;
- to_sql: the usual hand-written script: the same fetch, `pandas.json_normalize`, `DataFrame.to_sql`.

Then (unless `--no-parts`) the patients asset's components are timed directly, without Dagster, into
a second practice: the client's fetch, its normalising, the staging values, and the store's merge.

Ratios are against the floor and to_sql measured in the same run. The sandbox is served from this
process, seeded and warmed (every page rendered once) before anything is timed; its rate limit is
off by default so the figures are NVC's cost, not the sandbox's throttle. Nothing is asserted.
"""

from __future__ import annotations

import argparse

from _harness import (
    JsonFigures,
    add_json_argument,
    bench_environment,
    print_metadata,
    print_steps,
    product_page_size,
    run_child,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=200_000)
    parser.add_argument("--rate-limit", type=float, default=0.0, help="sandbox requests/s (0: off)")
    parser.add_argument("--no-parts", action="store_true", help="skip the component timings")
    parser.add_argument(
        "--skip-job",
        action="store_true",
        help="skip the practice_sync job (floor, to_sql and component timings only: for sizes the job cannot do quickly)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary NVC_HOME")
    add_json_argument(parser)
    args = parser.parse_args()
    out = JsonFigures(args.json, "full_sync")

    with bench_environment(args.patients, rate_limit=args.rate_limit, keep=args.keep) as (_home, sandbox):
        page_size = product_page_size()
        print(f"page size {page_size} (OptixResource default), {-(-args.patients // page_size)} pages", flush=True)
        reports = {}
        out.note_postgres()
        variants = [
            ("floor", (sandbox.url, str(page_size))),
            ("floor3", (sandbox.url, str(page_size))),
            ("to_sql", (sandbox.url, str(page_size))),
        ]
        if not args.skip_job:
            variants.append(("product", ("full",)))
        for variant, argv in variants:
            print(f"running {variant}...", flush=True)
            reports[variant] = run_child(variant, *argv)
            print(f"  {reports[variant]['seconds']:.1f} s", flush=True)
        if not args.no_parts:
            print("timing the patients asset's components...", flush=True)
            reports["parts"] = run_child("parts")
        throttled = sandbox.throttled

    floor, floor3, to_sql, product = reports["floor"], reports["floor3"], reports["to_sql"], reports.get("product")

    print(f"\nfull sync of {args.patients:,} Optix patients (page size {page_size}); ratios against this run")
    header = (
        f"  {'variant':<34} {'wall s':>8} {'rows':>9} {'rows/s':>9} {'x floor':>8} {'x to_sql':>9} {'peak RSS':>10}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))

    def line(name: str, seconds: float, n: int, rss: str) -> None:
        print(
            f"  {name:<34} {seconds:8.2f} {n:9,} {n / seconds if seconds else 0:9,.0f} "
            f"{seconds / floor['seconds']:8.2f} {seconds / to_sql['seconds']:9.2f} {rss:>10}"
        )

    line("floor (httpx + COPY raw)", floor["seconds"], floor["rows"], f"{floor['peak_rss_mb']:.0f} MB")
    line("floor3 (all three streams, raw)", floor3["seconds"], floor3["rows"], f"{floor3['peak_rss_mb']:.0f} MB")
    line("to_sql (httpx + pandas.to_sql)", to_sql["seconds"], to_sql["rows"], f"{to_sql['peak_rss_mb']:.0f} MB")
    out.figure("patients", args.patients)
    out.figure("floor_s", floor["seconds"])
    out.figure("floor3_s", floor3["seconds"])
    out.figure("floor3_rows", floor3["rows"])
    out.figure("to_sql_s", to_sql["seconds"])
    out.figure("floor_peak_rss_mb", floor["peak_rss_mb"])
    out.figure("to_sql_peak_rss_mb", to_sql["peak_rss_mb"])
    if product is None:
        print("  (practice_sync job skipped: --skip-job)")
    else:
        patients_seconds = float(product["metadata"].get("patients", {}).get("duration_seconds", 0.0))
        rows = product["rows"]
        line("product: patients asset", patients_seconds, rows, "(in job)")
        line("product: whole practice_sync job", product["seconds"], rows, f"{product['peak_rss_mb']:.0f} MB")
        print(
            f"  whole job vs floor3 (all three streams fetched and COPYed): {product['seconds'] / floor3['seconds']:.2f}"
        )
        out.figure("patients_asset_s", patients_seconds)
        out.figure("job_s", product["seconds"])
        out.figure("patients_vs_floor", patients_seconds / floor["seconds"])
        out.figure("job_vs_floor3", product["seconds"] / floor3["seconds"])
        out.figure("job_vs_to_sql", product["seconds"] / to_sql["seconds"])
        out.figure("job_peak_rss_mb", product["peak_rss_mb"])
        for step, seconds in product.get("steps", {}).items():
            out.figure(f"step_s:{step}", seconds)
        print_product(floor, to_sql, product)
    parts = reports.get("parts")
    if parts:
        fetch, read = parts["fetch_seconds"], parts["read_seconds"]
        print("\npatients asset components, called directly (no Dagster), into a second practice:")
        print(
            f"  OptixClient fetch only (httpx pages + JSON)       {fetch:8.2f} s   x floor {fetch / floor['seconds']:.2f}"
        )
        print(f"  OptixClient.read_patients (fetch + normalise)     {read:8.2f} s   normalise ~{read - fetch:.2f} s")
        print(f"  staging values (Python)                           {parts['values_seconds']:8.2f} s")
        print(f"  Store.write_patients (COPY + compare + merge)     {parts['write_seconds']:8.2f} s")
        print(f"  peak RSS of that process                          {parts['peak_rss_mb']:8.0f} MB")
    out.write()
    if throttled:
        print(f"\n  note: the sandbox answered {throttled} requests with 429 (rate limit {args.rate_limit:g}/s)")


def print_product(floor: dict, to_sql: dict, product: dict) -> None:
    print(
        f"\n  RSS after imports: floor {floor['imported_rss_mb']:.0f} MB, to_sql {to_sql['imported_rss_mb']:.0f} MB, "
        f"product {product['imported_rss_mb']:.0f} MB (Dagster and the code location loaded)"
    )
    print(
        f"  product process: imports {product['import_seconds']:.1f} s, whole process {product['process_seconds']:.1f} s"
    )
    print("  the job also read (materialisation metadata):")
    print_metadata(product, ("mode", "rows_read", "inserted", "recalls", "listed", "duration_seconds"))
    print_steps("product", product)


if __name__ == "__main__":
    main()
