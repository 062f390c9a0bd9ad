"""Benchmark: how long loading the code location takes, and that Great Expectations stays out of it.

    .venv/bin/python bench/import_time.py [--runs 7]

In a temporary NVC_HOME with the embedded PostgreSQL running, times (fresh processes, interleaved,
after one untimed warm-up round):

- `dagster definitions validate -w workspace.yaml` with `DAGSTER_HOME` unset (what CI runs);
- `python -c "import nvc_pipelines.definitions"`;
- the baseline, same run: `python -c "import dagster"`.

It reports the median (and range), the ratios to the baseline, whether `great_expectations` (and
pandas, which it pulls in) was imported by loading the definitions (it must not be: the checks import
it lazily when they run), and the modules that cost most beyond Dagster (`-X importtime`).
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import JsonFigures, add_json_argument

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PY = sys.executable

COMMANDS = {
    "import dagster (baseline)": [PY, "-c", "import dagster"],
    "import nvc_pipelines.definitions": [PY, "-c", "import nvc_pipelines.definitions"],
    "dagster definitions validate": [str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
}
LAZY = ("great_expectations", "pandas")


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds


def imported_modules(cmd: list[str], env: dict[str, str]) -> dict[str, int]:
    """Top-level package -> its modules' own import time summed (us), from `PYTHONPROFILEIMPORTTIME`
    (inherited by any child process the command starts)."""
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed under -X importtime:\n{proc.stderr[-2000:]}")
    out: dict[str, int] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            top = m.group(2).split(".")[0]
            out[top] = out.get(top, 0) + int(m.group(1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    add_json_argument(parser)
    args = parser.parse_args()
    out = JsonFigures(args.json, "import_time")

    home = Path(tempfile.mkdtemp(prefix="nvc-bench-"))
    os.environ["NVC_HOME"] = str(home)
    os.environ.pop("NVC_DATABASE_URL", None)
    os.environ.pop("DAGSTER_HOME", None)
    sys.path.insert(0, str(REPO))
    from nvc_pipelines.store.embedded import ensure_server, stop_server

    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env["PYTHONWARNINGS"] = "ignore"
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    try:
        ensure_server()
        for cmd in COMMANDS.values():  # warm-up round: disk cache and .pyc files
            run(cmd, env)
        for i in range(args.runs):
            for name, cmd in COMMANDS.items():
                times[name].append(run(cmd, env))
            print(f"  round {i + 1}/{args.runs} done", flush=True)
        modules = {name: imported_modules(cmd, env) for name, cmd in COMMANDS.items()}
    finally:
        stop_server()
        shutil.rmtree(home, ignore_errors=True)

    base = statistics.median(times["import dagster (baseline)"])
    print(f"\nloading the code location: median of {args.runs} fresh processes (after one warm-up round)")
    print(f"  {'command':<36} {'median s':>9} {'min s':>7} {'max s':>7} {'x import dagster':>17}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:<36} {med:9.2f} {min(values):7.2f} {max(values):7.2f} {med / base:17.2f}")
        out.figure(f"median_s:{name}", med)
        out.figure(f"vs_import_dagster:{name}", med / base)

    print("\nlazily imported packages (must not be loaded by the definitions):")
    for name in ("import nvc_pipelines.definitions", "dagster definitions validate"):
        found = ", ".join(f"{pkg} {'IMPORTED' if pkg in modules[name] else 'not imported'}" for pkg in LAZY)
        loaded = "nvc_pipelines" in modules[name] and "assets" in modules[name]
        print(f"  {name:<36} {found}  (code location loaded in it: {'yes' if loaded else 'NO'})")

    dagster_modules = set(modules["import dagster (baseline)"])
    extra = {k: v for k, v in modules["import nvc_pipelines.definitions"].items() if k not in dagster_modules}
    print("\nwhat `import nvc_pipelines.definitions` imports beyond `import dagster` (own import time per package):")
    for pkg, us in sorted(extra.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {pkg:<36} {us / 1000:8.0f} ms")
    for name in ("import nvc_pipelines.definitions", "dagster definitions validate"):
        for pkg in LAZY:
            out.figure(f"imports:{pkg}:{name}", pkg in modules[name])
    out.write()


if __name__ == "__main__":
    main()
