"""`nvc sandbox --json` as another tool runs it: a real process whose first line is one JSON object
naming each sandbox's base URL and demo credentials, which then work over HTTP exactly as printed
(Sycle's published vendor API: a GET with a JSON body to `token/`, then `clinics/`), until the
process is stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from contextlib import suppress
from pathlib import Path

import httpx

FORM = {"Content-Type": "application/x-www-form-urlencoded"}  # how the published API sends its JSON body


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"`nvc sandbox --json` printed nothing in {timeout:.0f}s") from None


def _vendor(api_base: str, endpoint: str, body: dict) -> httpx.Response:
    return httpx.request("GET", f"{api_base}{endpoint}/", content=json.dumps(body), headers=FORM, timeout=10)


def test_sandbox_json_prints_urls_and_credentials_that_work() -> None:
    nvc = Path(sys.executable).with_name("nvc")
    proc = subprocess.Popen(
        [str(nvc), "sandbox", "--json", "--port", "0", "--patients", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),  # PYTHONPATH included: the checkout under test, not the installed one
        start_new_session=True,  # its own process group: the Optisoft connectors go with it
    )
    try:
        directory = json.loads(_first_line(proc, timeout=120))
        assert set(directory) == {"optix", "acuitas", "optisoft", "sycle", "goc"}
        sycle = directory["sycle"]
        assert sycle["api_base"] == f"{sycle['base_url']}/api/vendor/"

        token = _vendor(sycle["api_base"], "token", sycle["credentials"])
        assert token.status_code == 200, token.text
        clinics = _vendor(sycle["api_base"], "clinics", {"token": token.json()["token"]})
        assert clinics.status_code == 200, clinics.text
        assert sycle["location_id"] in {c["clinic"]["clinic_id"] for c in clinics.json()["clinic_details"]}
        wrong = _vendor(sycle["api_base"], "token", {**sycle["credentials"], "password": "not-it"})
        assert wrong.status_code >= 400, wrong.text  # the printed password is the one that works

        # The others answer where the line says, with the credentials it gives.
        acuitas = directory["acuitas"]
        login = httpx.post(
            f"{acuitas['base_url']}/acuitas/api/session",
            json={
                "database": acuitas["database"],
                "username": acuitas["credentials"]["api_username"],
                "password": acuitas["credentials"]["api_password"],
            },
            timeout=10,
        )
        assert login.status_code == 200 and login.json()["token"]
        assert httpx.get(f"{directory['goc']['api_base']}01-99999/", timeout=10).status_code == 404
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
