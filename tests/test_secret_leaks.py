"""No PMS secret ever leaves the encrypted `practices.credentials` column.

Each PMS with secrets is connected against its sandbox with distinctive values, synced, then made to
fail every way it can (the PMS rejects the stored secret, wrong secrets stored or typed, the practice
connector offline, the PMS server gone) through `app.sync_practice` on the persistent dagster-postgres
instance and through the CLI. Then every secret, and every wrong secret tried, is searched for in:
captured stdout/stderr and log records, every run, run config, tag and event of the Dagster instance,
every column of every table of both databases (compressed blobs opened), every file under
`$NVC_HOME` (the PostgreSQL data directory included), and `nvc practice list` / `nvc export`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from nvc_pipelines.application import app
from nvc_pipelines.application.cli import main
from nvc_pipelines.crypto import generate_key
from nvc_pipelines.model import PmsKind
from nvc_pipelines.store.embedded import stop_server
from resources.http import PmsHttp
from resources.protocol import PmsError
from sandboxes.acuitas import ROLE_DIARY, ROLE_READ, AcuitasSandbox
from sandboxes.optisoft import OptisoftSandbox
from sandboxes.optix import OptixSandbox
from sandboxes.sycle import SycleSandbox
from tests.conftest import isolated_env

# Tests that start services of their own (a store, sandboxes, `dagster dev`) run one after another on
# one pytest worker (`--dist loadgroup`), the rest of the suite on the other.
pytestmark = pytest.mark.xdist_group("services")

# Distinctive values: mixed case (searched case-insensitively), nothing a message would say by chance.
SECRETS = {
    "optix": {"api_key": "OptixKey-Zq7r3Lw0pX"},
    "acuitas": {"api_username": "AcuUser_k7V3q", "api_password": "AcuPass-w8Lm#Tq2"},
    "optisoft": {"db_username": "OSUSER_P4z1x", "db_password": "OsPass-Jd93!vRk"},
    "sycle": {"api_username": "SycleUser_Qm5Hs", "api_password": "SyclePass-Qm5Hs8Yt1"},
}
WRONG = {
    "optix": {"api_key": "WrongOptix-Rr4k8Bz"},
    "acuitas": {"api_username": "WrongAcuUser_b6N", "api_password": "WrongAcuPass-Hx27"},
    "optisoft": {"db_username": "WRONGOS_Ue8q", "db_password": "WrongOsPass-Fa61"},
    "sycle": {"api_username": "WrongSycleUser_Lp3", "api_password": "WrongSyclePass-Lp3Dz9"},
}
KINDS = {"optix": PmsKind.OPTIX, "acuitas": PmsKind.ACUITAS, "optisoft": PmsKind.OPTISOFT, "sycle": PmsKind.SYCLE}
PATIENTS = 6


def _needles() -> dict[str, str]:
    """Every secret value to look for, by a label; plus `user:password` as Basic auth would carry it."""
    needles: dict[str, str] = {}
    for label, group in (("secret", SECRETS), ("wrong", WRONG)):
        for pms, secrets in group.items():
            for name, value in secrets.items():
                needles[f"{label} {pms}.{name}"] = value
        for pms, user, password in (
            ("acuitas", "api_username", "api_password"),
            ("optisoft", "db_username", "db_password"),
        ):
            pair = f"{group[pms][user]}:{group[pms][password]}".encode()
            needles[f"{label} {pms} basic-auth"] = base64.b64encode(pair).decode()
    return needles


@pytest.fixture(scope="module")
def leak_env():
    """One embedded server and home for the module (stopped at the end)."""
    home = Path(tempfile.mkdtemp(prefix="nvc-leaks-"))
    with pytest.MonkeyPatch.context() as mp:
        isolated_env(mp, home, generate_key())
        yield home, mp
        stop_server()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def nvc_env(leak_env, monkeypatch) -> Path:
    return leak_env[0]


def _settings(pms: str, servers: dict) -> dict[str, str]:
    url = servers[pms].url
    return {
        "optix": {"practice_id": "OPX-7", "api_url": url},
        "acuitas": {"server_url": url, "database": "ACU_LEAKS"},
        "optisoft": {"server_address": url, "practice_code": "OS-7"},
        "sycle": {"account_url": url, "location_id": "2803-9577"},
    }[pms]


def _start_sandboxes() -> dict:
    servers = {
        "optix": OptixSandbox(practices={"OPX-7": PATIENTS}, api_keys={SECRETS["optix"]["api_key"]: "OPX-7"}),
        "acuitas": AcuitasSandbox(
            databases={"ACU_LEAKS": PATIENTS},
            users={SECRETS["acuitas"]["api_username"]: (SECRETS["acuitas"]["api_password"], {ROLE_READ, ROLE_DIARY})},
        ),
        "optisoft": OptisoftSandbox(
            practices={"OS-7": PATIENTS},
            db_users={SECRETS["optisoft"]["db_username"]: (SECRETS["optisoft"]["db_password"], True)},
            offline_after_seconds=1.0,
            answer_timeout_seconds=3.0,
            poll_wait_seconds=1.0,
        ),
        "sycle": SycleSandbox(
            clinics={"2803-9577": PATIENTS},
            logins={SECRETS["sycle"]["api_username"]: SECRETS["sycle"]["api_password"]},
        ),
    }
    started = {}
    try:
        for name, server in servers.items():
            started[name] = server.start()
    except BaseException:
        for server in started.values():
            server.stop()
        raise
    return servers


# --- where to look -------------------------------------------------------------------------------------


def _texts_of(value) -> list[bytes]:
    """A database value as searchable bytes; bytea is also tried as zlib (Dagster's snapshots)."""
    if value is None:
        return []
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        out = [raw]
        with contextlib.suppress(zlib.error):
            out.append(zlib.decompress(raw))
        return out
    return [str(value).encode()]


def _dump_database(url: str) -> dict[str, list[bytes]]:
    """Every column of every row of every user table, by `database.schema.table`."""
    out: dict[str, list[bytes]] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        dbname = conn.info.dbname
        for schema, table in tables:
            rows = conn.execute(sql.SQL("SELECT * FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table)))
            out[f"{dbname}.{schema}.{table}"] = [t for row in rows for v in row for t in _texts_of(v)]
    return out


def _dagster_haystacks(instance) -> dict[str, list[bytes]]:
    from dagster._serdes import serialize_value

    out: dict[str, list[bytes]] = {}
    for run in instance.get_runs():
        entries = [serialize_value(run), repr(run.tags), repr(run.run_config)]
        entries += [serialize_value(e) for e in instance.all_logs(run.run_id)]
        out[f"dagster run {run.run_id[:8]} ({run.tags.get('practice')})"] = [e.encode() for e in entries]
    return out


def _file_haystacks(home: Path) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                out[f"file {path.relative_to(home)}"] = [path.read_bytes()]
            except OSError:  # a file PostgreSQL removed while we walked
                continue
    return out


def _find_leaks(haystacks: dict[str, list[bytes]], needles: dict[str, str]) -> list[str]:
    lowered = {label: needle.lower().encode() for label, needle in needles.items()}
    leaks = []
    for where, blobs in haystacks.items():
        for blob in blobs:
            low = blob.lower()
            for label, needle in lowered.items():
                at = low.find(needle)
                if at >= 0:
                    context = blob[max(0, at - 80) : at + len(needle) + 80]
                    leaks.append(f"{label} in {where}: ...{context!r}...")
    return sorted(set(leaks))


# --- the test -----------------------------------------------------------------------------------------


def test_no_secret_leaks_anywhere(leak_env, capfd, caplog, monkeypatch) -> None:
    home, _ = leak_env
    caplog.set_level(logging.DEBUG)
    # Retries keep running (their log lines are searched too) but without waiting between attempts.
    monkeypatch.setattr(PmsHttp, "_wait", lambda self, state: 0.0)
    started = time.monotonic()
    outputs: list[str] = []  # messages the operator sees: errors, outcomes, CLI output
    runner = CliRunner()

    def sync(practice_id: str, expect_success: bool) -> None:
        outcome = app.sync_practice(practice_id, trigger="leak_test")
        outputs.append(repr(outcome))
        assert outcome.success is expect_success, (practice_id, outcome.error)

    def cli(*args: str, **env: str) -> str:
        result = runner.invoke(main, list(args), env=env or None)
        outputs.append(result.output)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            outputs.append(repr(result.exception))
        return result.output

    servers = _start_sandboxes()
    try:
        # 1. Connect (tests the connection) and sync each practice for real.
        for pms, kind in KINDS.items():
            app.connect_practice(f"leak-{pms}", kind, None, _settings(pms, servers), SECRETS[pms])
            sync(f"leak-{pms}", True)

        # 2. The PMS rejects the stored secret (revoked key, changed password, expired token).
        servers["optix"].api_keys.clear()
        servers["acuitas"].users[SECRETS["acuitas"]["api_username"]] = ("changed-elsewhere", {ROLE_READ})
        servers["sycle"].logins[SECRETS["sycle"]["api_username"]] = "changed-elsewhere"
        servers["sycle"].expire_tokens()
        for pms in ("optix", "acuitas", "sycle"):
            sync(f"leak-{pms}", False)

        # 2b. Every PMS answers 503 (restarting): retried, each retry logged, then given up.
        for server in servers.values():
            server.faults.down = True
        for pms in KINDS:
            sync(f"leak-{pms}", False)
        for server in servers.values():
            server.faults.down = False

        # 3. Wrong secrets typed at connect time (the connection test refuses them; nothing saved)...
        for pms, kind in KINDS.items():
            with pytest.raises(PmsError) as caught:
                app.connect_practice(f"wrong-{pms}", kind, None, _settings(pms, servers), WRONG[pms])
            outputs.append(str(caught.value))
        wrong_env = {f"NVC_PMS_{k.upper()}": v for k, v in WRONG["optix"].items()}
        cli("practice", "connect", "wrong-cli", "--pms", "optix", *_setting_args("optix", servers), **wrong_env)
        # ... and wrong secrets stored without a connection test (as a restored backup might have).
        store = app.open_store()
        for pms, kind in KINDS.items():
            store.add_practice(f"leak-{pms}", f"leak-{pms}", kind, _settings(pms, servers), WRONG[pms], replace=True)
            sync(f"leak-{pms}", False)
            store.add_practice(f"leak-{pms}", f"leak-{pms}", kind, _settings(pms, servers), SECRETS[pms], replace=True)

        # 4. The practice's Optisoft connector goes offline.
        servers["optisoft"].stop_connector("OS-7")
        sync("leak-optisoft", False)
    finally:
        for server in servers.values():
            server.stop()

    # 5. Every PMS server is gone; once through the app, once through the CLI.
    for pms in KINDS:
        sync(f"leak-{pms}", False)
    assert "Check:" in cli("sync", "leak-optix")
    listing = cli("practice", "list")
    assert "leak-optix" in listing and "leak-sycle" in listing
    cli("export", "leak-acuitas")

    # Gather every haystack.
    captured = capfd.readouterr()
    log_text = caplog.text + "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    haystacks: dict[str, list[bytes]] = {
        "captured stdout": [captured.out.encode()],
        "captured stderr": [captured.err.encode()],
        "log records": [log_text.encode()],
        "messages and CLI output": [o.encode() for o in outputs],
    }
    from nvc_pipelines.application.instance import get_instance
    from nvc_pipelines.store.db import dagster_storage_url, store_url

    instance = get_instance()
    haystacks |= _dagster_haystacks(instance)
    for url in (store_url(), dagster_storage_url()):
        haystacks |= _dump_database(url.set(drivername="postgresql").render_as_string(hide_password=False))
    haystacks |= _file_haystacks(home)

    # The search would see a leak: each place holds what it should (a practice id, a sync message).
    assert b"leak-acuitas" in b"".join(haystacks["log records"]) + b"".join(haystacks["captured stderr"])
    assert any(k.startswith("dagster run") for k in haystacks) and len(instance.get_runs()) >= 21
    assert any(b"leak-sycle" in blob for blob in haystacks["nvc.public.practices"])
    assert any(b"invalid_credentials" in blob for k, v in haystacks.items() if k.startswith("dagster") for blob in v)
    assert any(k.startswith("file pg/") for k in haystacks)
    assert "retrying" in log_text  # the retry log lines were produced (and searched)

    leaks = _find_leaks(haystacks, _needles())
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)

    # The credentials column holds ciphertext only, and it still opens to the real secrets.
    with psycopg.connect(store_url().set(drivername="postgresql").render_as_string(hide_password=False)) as conn:
        blobs = dict(conn.execute("SELECT practice_id, credentials FROM practices").fetchall())
    for pms in KINDS:
        blob = bytes(blobs[f"leak-{pms}"])
        assert blob[:1] == b"\x01" and len(blob) > 28
        for value in SECRETS[pms].values():
            assert value.encode() not in blob and value.lower().encode() not in blob.lower()
        assert store.practice_credentials(f"leak-{pms}") == SECRETS[pms]
    print(f"searched {len(haystacks)} places for {len(_needles())} secrets in {time.monotonic() - started:.1f}s")
    assert os.environ["NVC_HOME"] == str(home)


def _setting_args(pms: str, servers: dict) -> list[str]:
    return [arg for k, v in _settings(pms, servers).items() for arg in ("--setting", f"{k}={v}")]
