"""`dagster dev -w workspace.yaml` (webserver + daemon) as a managed child process: `nvc dev` and the
end of `nvc demo` in the foreground, and the tests and benchmarks that drive Dagster the way ops do
(application layer: it starts Dagster's own CLI). Whatever starts it stops it, with everything it
started, on Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import click
import httpx

from nvc_pipelines.application import app
from nvc_pipelines.application.instance import ensure_dagster_home
from nvc_pipelines.config import external_database_url, nvc_home
from nvc_pipelines.store.embedded import is_running, stop_server

REPO = Path(__file__).resolve().parents[2]


class DevServerFailed(RuntimeError):
    """`dagster dev` exited or never answered; the message carries its log."""


DEV_SUPERSEDED = "ignore:Function `dev_command` is superseded:FutureWarning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def dagster_dev(home: Path, startup_timeout: float = 180) -> Iterator[int]:
    """`dagster dev` for NVC_HOME `home` (store and DAGSTER_HOME already set up); yields its port once
    the webserver answers, and stops webserver, daemon and code server afterwards."""
    port = free_port()
    log_path = home / "dagster-dev.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster"), "dev", "-w", "workspace.yaml"]
            + ["-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO,
            env={**os.environ, "NVC_HOME": str(home)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # SIGINT (which `dagster dev` maps SIGTERM to as well) must stop it even when started in the
            # background by a shell that ignores SIGINT for its children.
            preexec_fn=_default_sigint,
        )
    try:
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise DevServerFailed(f"dagster dev exited ({proc.returncode}):\n{log_path.read_text()}")
            time.sleep(0.5)
        else:
            raise DevServerFailed(f"dagster dev did not answer in {startup_timeout:.0f} s:\n{log_path.read_text()}")
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _repo_root() -> Path:
    here = Path(__file__).resolve().parents[2]
    return here if (here / "workspace.yaml").exists() else Path.cwd()


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def stopped_by_signals() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP all end the block through KeyboardInterrupt, so the `finally`
    clauses that stop what was started run. SIGINT is re-armed too: a shell that starts a command in
    the background (`nvc demo &`) has it ignored."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig in previous:
        signal.signal(sig, _interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# How long what `dagster dev` stopped may take to exit on its own before the rest of its group is
# interrupted.
EXIT_SECONDS = 5.0


def _stop_group(proc: subprocess.Popen, grace_seconds: float = 30) -> None:
    """Stop `dagster dev` and everything it started (webserver, daemon, code servers, run processes).

    SIGINT to `dagster dev` alone first: it tells the webserver and the daemon to shut down, waits
    for them, then stops the code server they call. (A SIGINT to the whole group at once stopped the
    code server under a daemon in the middle of a sensor tick, which printed a stack trace on the
    way out.) Then, after a few seconds for what it stopped to finish exiting, SIGINT to whatever is
    left of the group (run processes), and SIGKILL after the grace. (A second SIGINT reaching a code
    server while it still waited, at exit, for the embedded store's lock printed "Exception ignored in
    atexit callback" and a stack trace, on a loaded machine.)"""
    deadline = time.monotonic() + grace_seconds
    with suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(grace_seconds)
    settle = min(deadline, time.monotonic() + EXIT_SECONDS)
    while time.monotonic() < settle and _group_alive(proc.pid):
        time.sleep(0.1)
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # nothing left of the group
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.1)
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run_dagster_dev(port: int) -> int:
    """`dagster dev -w workspace.yaml` on the persistent (dagster-postgres) instance, until it exits or
    this process is interrupted (Ctrl-C, SIGTERM, SIGHUP); then it is stopped with all it started."""
    app.open_store()
    ensure_dagster_home()
    exe = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
    # Warnings and errors only: at INFO the daemon logs every sensor tick ("skipped"), every few seconds.
    cmd = [exe, "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port), "--log-level", "warning"]
    env = {**os.environ, "NVC_HOME": str(nvc_home())}  # run processes must find the same store
    # `dagster dev` warns on every start that it is superseded by `dg dev` (another package): Dagster's
    # own warning, not the operator's business.
    env["PYTHONWARNINGS"] = ",".join(filter(None, (os.environ.get("PYTHONWARNINGS"), DEV_SUPERSEDED)))
    with stopped_by_signals():
        # Its own process group: a signal to this process reaches it only through `_stop_group`, once.
        proc = subprocess.Popen(cmd, cwd=_repo_root(), env=env, start_new_session=True, preexec_fn=_default_sigint)
        click.echo(f"Dagster UI: http://127.0.0.1:{port}  (Ctrl-C or SIGTERM stops it)")
        try:
            return proc.wait()
        except KeyboardInterrupt:
            click.echo("Stopping the Dagster UI and daemon...")
            return 0
        finally:
            _stop_group(proc)


def stop_store_if_started(was_running: bool) -> None:
    if was_running or external_database_url() is not None:
        return
    # A sync interrupted mid-step leaves store reads suspended in garbage frames; closed now, while the
    # server still answers, not at exit against a stopped server (a stack trace after "Interrupted.").
    gc.collect()
    if stopped := stop_server():
        click.echo(f"Stopped {stopped}.")


def run_dev(port: int) -> int:
    """`nvc dev`: the store and `dagster dev`; on Ctrl-C or SIGTERM both stop (the store only when
    this command started it)."""
    store_was_running = is_running()
    try:
        return run_dagster_dev(port)
    finally:
        stop_store_if_started(store_was_running)
