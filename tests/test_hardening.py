"""Hardening against the real PostgreSQL: a killed client's query is ended by the server, and a stuck
statement is cancelled with an error naming its bound. (Full re-syncs in linear time are shown by
`bench/resync.py`, at a size no test can afford.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from nvc_pipelines.store import Store, StoreUnavailable


def _running(store: Store, marker: str) -> list[int]:
    with store.begin() as conn:
        return list(
            conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE query LIKE :q AND pid <> pg_backend_pid()"),
                {"q": f"%{marker}%"},
            ).scalars()
        )


def test_a_killed_clients_query_does_not_keep_running(store: Store, database_url: str) -> None:
    marker = "nvc_killed_client_probe"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from sqlalchemy import text; from nvc_pipelines.store import Store; s = Store.open(); "
            f"c = s.engine.connect(); c.execute(text('SELECT pg_sleep(600) /* {marker} */'))",
        ],
        env={**os.environ, "NVC_DATABASE_URL": database_url},
    )
    try:
        for _ in range(300):  # up to 30 s for the child to start and send its query
            if _running(store, marker):
                break
            time.sleep(0.1)
        assert _running(store, marker), "the child's query never started"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The server notices the dead client within its check interval (5 s); without the check the
    # query would run its full 600 s. Wait up to 60 s (a loaded machine), no timing is asserted.
    for _ in range(600):
        if not _running(store, marker):
            break
        time.sleep(0.1)
    assert not _running(store, marker), "the killed client's query is still running"


def test_a_stuck_statement_is_cancelled_with_an_error_naming_its_bound(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NVC_STATEMENT_TIMEOUT_SECONDS", "1")
    url = make_url(database_url).update_query_dict({"application_name": "timeout_probe"})
    store = Store.open(url)  # a URL of its own: a new engine, which reads the setting
    with pytest.raises(StoreUnavailable) as info, store.begin() as conn:
        conn.execute(text("SELECT pg_sleep(5)"))
    assert "NVC_STATEMENT_TIMEOUT_SECONDS (1 s)" in str(info.value) and "nothing of it was written" in str(info.value)
