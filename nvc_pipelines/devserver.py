"""`dagster dev -w workspace.yaml` (webserver + daemon) as a managed child process, for the tests and
benchmarks that drive Dagster the way ops do (application layer: it starts Dagster's own CLI)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


class DevServerFailed(RuntimeError):
    """`dagster dev` exited or never answered; the message carries its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def dagster_dev(home: Path, startup_timeout: float = 90) -> Iterator[int]:
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
