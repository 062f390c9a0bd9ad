"""Stopping is easy: `nvc dev` (and `nvc demo`, which ends in the same code) stops everything it
started on SIGTERM, also when started in the background; `nvc store stop` says what it stopped and
the next command that starts the store again says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from click.testing import CliRunner

from nvc_pipelines.application.cli import main
from nvc_pipelines.application.devserver import REPO, free_port
from nvc_pipelines.store.embedded import is_running, stop_server

# Tests that start services of their own (a store, sandboxes, `dagster dev`) run one after another on
# one pytest worker (`--dist loadgroup`), the rest of the suite on the other.
pytestmark = pytest.mark.xdist_group("services")


def _ignore_sigint() -> None:
    # What a non-interactive shell does for a command started with `&`: Ctrl-C never reaches it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_nvc_dev_in_the_background_stops_everything_it_started_on_sigterm(nvc_env: Path) -> None:
    port = free_port()
    nvc = str(Path(sys.executable).with_name("nvc"))
    log = (nvc_env / "dev.out").open("w+")
    proc = subprocess.Popen([nvc, "dev", "--port", str(port)], cwd=REPO, env=os.environ.copy(), stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=_ignore_sigint)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log.seek(0) or log.read()
            time.sleep(0.5)
        else:
            raise AssertionError("the Dagster UI never answered")
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("dagster" in " ".join(p.cmdline()) for p in started)
        assert is_running()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        gone, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
        assert not is_running()  # it started the store, so it stopped it too
        log.seek(0)
        output = log.read()
        assert "Stopped the embedded store" in output, output
        assert "Warning" not in output and "Traceback" not in output, output  # `dagster dev`'s own warnings
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_server()


def test_nvc_demo_in_the_background_stops_on_sigterm_during_its_first_syncs(nvc_env: Path) -> None:
    """SIGTERM while a first sync runs: "Interrupted.", no failed-sync error and no stack trace, exit 0,
    and the sandboxes (the Optisoft connector is a process of its own) and the store are stopped."""
    nvc = str(Path(sys.executable).with_name("nvc"))
    log_path = nvc_env / "demo.out"
    with log_path.open("w") as log:
        proc = subprocess.Popen([nvc, "demo", "--sandbox-port", "0", "--port", str(free_port())], cwd=REPO,
                                env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_ignore_sigint)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "first sync..." not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.1)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("sandboxes.optisoft" in " ".join(p.cmdline()) for p in started), [p.cmdline() for p in started]
        time.sleep(1)  # into the sync's steps
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log_path.read_text()
        gone, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
        assert not is_running()
        output = log_path.read_text()
        assert "Interrupted." in output and "Stopped the embedded store" in output, output
        assert "Error:" not in output and "Traceback" not in output and "Exception" not in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_server()


def test_an_interrupt_raised_in_a_finalizer_during_a_sync_is_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dagster raises Ctrl-C or SIGTERM wherever the step is; when that is a finalizer (the collector
    running a weakref callback) it cannot propagate, and the interpreter printed it with a stack trace
    after "Interrupted." (the demo's SIGTERM test, once in CI). During a sync it is left out, as the
    wakeup fd keeps the signal; any other error in a finalizer still reaches the hook."""
    from dagster._core.errors import DagsterExecutionInterruptedError

    from nvc_pipelines.application.app import _stop_signals_seen

    class Raises:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def __del__(self) -> None:
            raise self.exc

    reached: list[str] = []

    def hook(args) -> None:
        reached.append(args.exc_type.__name__)

    monkeypatch.setattr(sys, "unraisablehook", hook)
    with _stop_signals_seen():
        Raises(KeyboardInterrupt())  # collected at once: raised where nothing can catch it
        Raises(DagsterExecutionInterruptedError())
        Raises(ValueError("a real problem"))
    Raises(KeyboardInterrupt())  # outside a sync: as before
    assert reached == ["ValueError", "KeyboardInterrupt"] and sys.unraisablehook is hook


def test_run_processes_of_the_managed_instance_print_no_debug_lines(nvc_env: Path, capfd) -> None:
    """`nvc demo` / `nvc dev` run processes log to their terminal at INFO: no DEBUG line per event, while
    the run's event log keeps every event."""
    from nvc_pipelines.application import app
    from nvc_pipelines.application.instance import ensure_dagster_home, get_instance
    from schedules.health import sync_health_job

    try:
        app.open_store()
        ensure_dagster_home()
        instance = get_instance()
        assert instance.python_log_level == "INFO"
        capfd.readouterr()
        result = sync_health_job.execute_in_process(
            run_config={"ops": {"report_sync_health": {"config": {"states": []}}}}, instance=instance
        )
        assert result.success
        printed = "".join(capfd.readouterr())
        assert " - DEBUG - " not in printed, printed
        assert any(e.is_step_start for e in result.all_events)  # recorded, just not printed
        assert any(e.dagster_event and e.dagster_event.is_step_start for e in instance.all_logs(result.run_id))
    finally:
        stop_server()


def test_a_background_process_is_stopped_by_sigint_too(tmp_path: Path) -> None:
    """SIGINT, ignored by a shell for background commands, is armed again inside the block."""
    script = (
        "import time\n"
        "from nvc_pipelines.application.devserver import stopped_by_signals\n"
        "try:\n"
        "    with stopped_by_signals():\n"
        "        print('ready', flush=True); time.sleep(60)\n"
        "except KeyboardInterrupt as exc:\n"
        "    print('cleaned up after', exc, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            preexec_fn=_ignore_sigint)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "cleaned up after SIGINT" in out


def test_store_stop_says_what_it_stopped_and_a_restart_says_so(nvc_env: Path) -> None:
    runner = CliRunner()
    started = runner.invoke(main, ["store", "start"])
    assert started.exit_code == 0 and "Started the embedded store" in started.output, started.output
    stopped = runner.invoke(main, ["store", "stop"])
    assert stopped.exit_code == 0, stopped.output
    assert "Stopped the embedded store (PostgreSQL pid" in stopped.output and "data kept in" in stopped.output
    assert not is_running()
    again = runner.invoke(main, ["store", "stop"])
    assert "was not running; nothing to stop" in again.output
    listing = runner.invoke(main, ["practice", "list"])
    assert listing.exit_code == 0 and "Started the embedded store" in listing.output, listing.output
    stop_server()
