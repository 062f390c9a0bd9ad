"""Real services for the tests that drive Dagster as ops do: `dagster dev` (webserver + daemon) on a free
loopback port, on the persistent dagster-postgres instance in the embedded store, as `nvc dev` starts it."""

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
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def dagster_dev(home: Path, startup_timeout: float = 90) -> Iterator[int]:
    """`dagster dev -w workspace.yaml` for NVC_HOME `home` (store and DAGSTER_HOME already set up); yields
    its port once the webserver answers, and stops webserver, daemon and code server afterwards."""
    port = free_port()
    log_path = home / "dagster-dev.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster"),
                "dev",
                "-w",
                "workspace.yaml",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=REPO,
            env={**os.environ, "NVC_HOME": str(home)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # SIGINT (which `dagster dev` maps SIGTERM to as well) must stop it even when pytest was
            # started in the background by a shell that ignores SIGINT for its children.
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
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.5)
        else:
            pytest.fail("dagster dev did not start:\n" + log_path.read_text())
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
