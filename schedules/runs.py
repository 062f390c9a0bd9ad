"""Runs whose process died end as failed, with the reason, instead of staying STARTED forever.

On a single host (the embedded instance, `dagster dev`, `nvc sync`), a run's process is a local
process: Dagster records its pid in the run's engine events ("Started process for run (pid: N)",
"Executing steps in process (pid: N)"). A STARTED run whose recorded processes are all gone was
killed (kill -9, a crash, a reboot) and can never finish: it is reported failed, naming the pid.
In production (Kubernetes) the run launcher's own run monitoring does this (deploy/dagster.yaml),
so only the local launcher's runs are looked at here.
"""

from __future__ import annotations

import os
from typing import Any

DEAD_RUN_MESSAGE = "the run's process (pid {pids}) is no longer running: it was killed or crashed before finishing"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _pids(instance: Any, run_id: str) -> set[int]:
    from dagster import DagsterEventType

    pids: set[int] = set()
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        data = record.dagster_event.engine_event_data if record.dagster_event else None
        value = data.metadata.get("pid") if data and data.metadata else None
        if value is not None and str(value.value).isdigit():
            pids.add(int(value.value))
    return pids


def reap_dead_runs(instance: Any) -> list[str]:
    """Report every STARTED run of this host whose processes are all gone as failed; returns their ids."""
    from dagster import DagsterRunStatus, RunsFilter
    from dagster._core.launcher import DefaultRunLauncher

    if not isinstance(instance.run_launcher, DefaultRunLauncher):
        return []
    reaped: list[str] = []
    for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        pids = _pids(instance, run.run_id)
        if not pids or any(_alive(pid) for pid in pids):
            continue  # not started far enough to know, or still running
        instance.report_run_failed(run, DEAD_RUN_MESSAGE.format(pids=", ".join(map(str, sorted(pids)))))
        reaped.append(run.run_id)
    return reaped
