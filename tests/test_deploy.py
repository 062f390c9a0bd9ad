"""The production `deploy/dagster.yaml` is valid Dagster instance config, and does what the docs say."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config, pg_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_production_instance_config_validates(tmp_path: Path, pg_env: None) -> None:
    shutil.copy(DEPLOY / "dagster.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))  # raises on an instance-level schema error
    # Configurable classes are only checked when instantiated: check them against their own schemas.
    coordinator = config["run_coordinator"]
    module = coordinator["module"].replace("dagster.core.", "dagster._core.")  # Dagster's own alias
    cls = getattr(importlib.import_module(module), coordinator["class"])
    checked = process_config(cls.config_type(), coordinator["config"])
    assert checked.success, checked.errors
    storage = process_config(pg_config(), config["storage"]["postgres"])
    assert storage.success, storage.errors
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    limits = config["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert {(lim["key"], lim["value"]) for lim in limits} >= {
        ("pms", k) for k in ("optix", "acuitas", "optisoft", "sycle")
    }
    assert config["run_retries"]["enabled"] is True
    raw = (DEPLOY / "dagster.yaml").read_text()
    assert "not-a-real-password" not in raw and "password: {env:" in raw
    assert yaml.safe_load(raw)["storage"]["postgres"]["postgres_db"]["params"]["sslmode"] == "require"


def test_a_typo_in_the_coordinator_config_is_caught(tmp_path: Path) -> None:
    from dagster import QueuedRunCoordinator

    bad = process_config(QueuedRunCoordinator.config_type(), {"max_concurent_runs": 40})
    assert not bad.success
