"""The Dagster instance (`$DAGSTER_HOME`) on dagster-postgres storage, next to the store.

When `dagster.yaml` is missing, or was written by nvc (first line `# managed by nvc`), it is
(re)written to point run, event-log and schedule storage at the store's server (its own database),
so the demo exercises production storage. Runs launch at once (no queue): a booking made on a call
must reach the PMS within seconds. A hand-written `dagster.yaml` is never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

from nvc_pipelines.config import dagster_home, external_database_url, owner_database_url
from nvc_pipelines.store.db import dagster_storage_url, ensure_database

MANAGED_MARK = "# managed by nvc"
DAGSTER_URL_ENV = "NVC_DAGSTER_DATABASE_URL"


def ensure_dagster_home() -> Path:
    """Create/refresh `$DAGSTER_HOME/dagster.yaml` and export `DAGSTER_HOME` for this process and its children."""
    home = dagster_home()
    os.environ["DAGSTER_HOME"] = str(home)
    config = home / "dagster.yaml"
    if config.exists() and not config.read_text().startswith(MANAGED_MARK):
        return home
    url = dagster_storage_url()
    ensure_database(url)
    if external_database_url() or owner_database_url():
        # Keep the password out of the file: children read it from the environment.
        os.environ[DAGSTER_URL_ENV] = url.render_as_string(hide_password=False)
        url_yaml = f"{{env: {DAGSTER_URL_ENV}}}"
    else:
        url_yaml = f'"{url.render_as_string(hide_password=False)}"'
    text = (
        f"{MANAGED_MARK}: rewritten by `nvc` on start; remove this line to manage the file yourself.\n"
        "storage:\n"
        "  postgres:\n"
        f"    postgres_url: {url_yaml}\n"
        "run_coordinator:\n"
        "  module: dagster.core.run_coordinator\n"
        "  class: DefaultRunCoordinator\n"
        "telemetry:\n"
        "  enabled: false\n"
        # Run processes print their events at INFO, not one DEBUG line per event (step started,
        # resource ready, output handled...) into the `nvc demo` / `nvc dev` terminal; the event
        # log keeps every event whatever this level.
        "python_logs:\n"
        "  python_log_level: INFO\n"
    )
    if not config.exists() or config.read_text() != text:
        config.write_text(text)
    return home


def get_instance():  # -> dagster.DagsterInstance
    """The persistent instance (imports Dagster lazily so the core stays orchestrator-free)."""
    from dagster import DagsterInstance

    ensure_dagster_home()
    return DagsterInstance.get()
