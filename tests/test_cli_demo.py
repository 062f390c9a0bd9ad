"""The operator's shell path end to end: `nvc demo --no-ui` on embedded PostgreSQL and the
dagster-postgres instance, then the CLI commands against what it built."""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import date, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from nvc_pipelines.application.cli import main
from nvc_pipelines.crypto import generate_key
from nvc_pipelines.store.embedded import stop_server
from tests.conftest import isolated_env

# Tests that start services of their own (a store, sandboxes, `dagster dev`) run one after another on
# one pytest worker (`--dist loadgroup`), the rest of the suite on the other.
pytestmark = pytest.mark.xdist_group("services")


@pytest.fixture(scope="module")
def demo_state():
    """One demo for the whole module (it starts a server and four sandboxes): its home and key."""
    home = Path(tempfile.mkdtemp(prefix="nvc-demo-"))
    key = generate_key()
    with pytest.MonkeyPatch.context() as mp:
        isolated_env(mp, home, key)
        runner = CliRunner()
        result = runner.invoke(main, ["demo", "--no-ui", "--sandbox-port", "0"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        yield home, key, result.output
        stop_server()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def nvc_env(demo_state, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This module's tests all run against the one demo."""
    home, key, _ = demo_state
    isolated_env(monkeypatch, home, key)
    return home


@pytest.fixture
def demo_home(demo_state, nvc_env):
    return CliRunner(), demo_state[2]


def test_demo_connects_syncs_and_exports(demo_home) -> None:
    runner, output = demo_home
    for pms in ("csv", "optix", "acuitas", "optisoft", "sycle"):
        assert f"Synced demo-{pms}" in output

    listing = runner.invoke(main, ["practice", "list"])
    assert "demo-csv" in listing.output and "demo-optix" in listing.output
    assert "optix-demo-key" not in listing.output

    exported = json.loads(runner.invoke(main, ["export", "demo-csv"]).output)
    assert exported["practice_id"] == "demo-csv"
    assert len(exported["patients"]) >= 40
    first = exported["patients"][0]
    assert set(first) >= {
        "pms_patient_id",
        "first_name",
        "last_name",
        "date_of_birth",
        "phones",
        "last_eye_test_date",
        "risk_flags",
        "recall_due_date",
        "recall_source",
    }
    reasons = [r["reason"] for r in exported["rejected_rows"]]
    assert any("31/02/2024" in r for r in reasons) and any("scientific notation" in r for r in reasons)

    for pms in ("optix", "acuitas", "optisoft", "sycle"):
        data = json.loads(runner.invoke(main, ["export", f"demo-{pms}"]).output)
        assert len(data["patients"]) == 50, pms
        assert data["appointments"] and data["clinical_records"], pms
        assert {p["recall_source"] for p in data["patients"]} <= {"pms", "computed", None}
        assert any(p["recall_due_date"] for p in data["patients"]), pms

    # Sync Now from the shell: recorded on the persistent (dagster-postgres) instance, nothing changes.
    resync = runner.invoke(main, ["sync", "demo-csv"])
    assert resync.exit_code == 0, resync.output
    assert "inserted=0" in resync.output and "updated=0" in resync.output

    from nvc_pipelines.application.instance import get_instance

    instance = get_instance()
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    # Rows in = rows stored + rows rejected (+ erased, skipped), for every stream of every sync.
    from dagster import AssetKey

    checked = 0
    for key in ("patients", "appointments", "clinical_records"):
        for record in instance.fetch_materializations(AssetKey(key), limit=100).records:
            meta = {k: v.value for k, v in record.asset_materialization.metadata.items()}
            stored = (
                meta["inserted"] + meta["updated"] + meta["unchanged"] + meta["rejected"] + meta["suppressed_erased"]
            )
            assert meta["rows_read"] == stored, (key, meta)
            checked += 1
    assert checked >= 15  # three streams of five demo practices, at least
    runs = instance.get_runs()
    assert {r.tags.get("practice") for r in runs} >= {
        "demo-csv",
        "demo-optix",
        "demo-acuitas",
        "demo-optisoft",
        "demo-sycle",
    }
    assert {r.tags.get("trigger") for r in runs} >= {"initial", "sync_now"}


def test_cli_errors_are_one_clear_line(demo_home) -> None:
    runner, _ = demo_home
    result = runner.invoke(main, ["sync", "no-such-practice"])
    assert result.exit_code == 1
    assert "no practice 'no-such-practice' is registered" in result.output
    assert "Traceback" not in result.output

    bad = runner.invoke(
        main,
        [
            "practice",
            "connect",
            "x-optix",
            "--pms",
            "optix",
            "--setting",
            "practice_id=OPX-1001",
            "--setting",
            "api_url=http://127.0.0.1:9",
        ],
        input="wrong-key-123\n",
    )
    assert bad.exit_code == 1
    assert "Connection failed" in bad.output and "wrong-key-123" not in bad.output

    # The demo's sandbox has stopped: a sync fails naming the PMS and what to check; data stays.
    before = json.loads(runner.invoke(main, ["export", "demo-optix"]).output)
    down = runner.invoke(main, ["sync", "demo-optix"])
    assert down.exit_code == 1
    assert "Optix (practice demo-optix): Connection failed" in down.output and "Check:" in down.output
    # From a shell: the cause named once, no Dagster stack trace, the waits shown, no step retries.
    assert down.output.count("Connection failed") == 1, down.output
    assert "Stack Trace" not in down.output and "Traceback" not in down.output
    assert "attempt 1 of 2 failed" in down.output and "retrying in" in down.output
    run_id = down.output.split("(run ")[1].split(")")[0]
    from nvc_pipelines.application.instance import get_instance

    steps = [e.step_key for e in get_instance().all_logs(run_id) if e.dagster_event and e.dagster_event.is_step_start]
    assert len(steps) == len(set(steps)) and {"patients", "appointments", "clinical_records"} <= set(steps)  # no retry
    # --verbose: Dagster's own log of the run, stack traces included, then the same one error line.
    verbose = runner.invoke(main, ["sync", "demo-optix", "--verbose"])
    assert verbose.exit_code == 1
    assert "STEP_FAILURE" in verbose.output and "Stack Trace:" in verbose.output, verbose.output
    assert verbose.output.rstrip().splitlines()[-1].startswith("Error: sync of demo-optix failed")
    assert json.loads(runner.invoke(main, ["export", "demo-optix"]).output) == before


def test_wrong_api_key_is_refused_and_nothing_is_saved(demo_home) -> None:
    from sandboxes.optix import OptixSandbox

    runner, _ = demo_home
    with OptixSandbox(practices={"OPX-9": 5}, api_keys={"right-key": "OPX-9"}) as sandbox:
        args = ["practice", "connect", "new-optix", "--pms", "optix", "--setting", "practice_id=OPX-9"]
        args += ["--setting", f"api_url={sandbox.url}"]
        wrong = runner.invoke(main, args, env={"NVC_PMS_API_KEY": "wrong-key-456"})
        assert wrong.exit_code == 1
        assert "API key was rejected" in wrong.output and "wrong-key-456" not in wrong.output
        assert "new-optix" not in runner.invoke(main, ["practice", "list"]).output

        right = runner.invoke(main, args, env={"NVC_PMS_API_KEY": "right-key"})
        assert right.exit_code == 0, right.output
        assert runner.invoke(main, ["sync", "new-optix"]).exit_code == 0
        # --update keeps what is not given again: the key, the Optix ids, the display name.
        update = ["practice", "connect", "new-optix", "--pms", "optix", "--update"]
        changed = runner.invoke(
            main, [*update, "--setting", "recall_interval.default=18", "--setting", "max_drop_share=0.5"]
        )
        assert changed.exit_code == 0, changed.output
        bad_share = runner.invoke(main, [*update, "--setting", "max_drop_share=5"])
        assert bad_share.exit_code == 1 and "between 0 and 1" in bad_share.output
        no_group = runner.invoke(main, [*update, "--group", "nope"])
        assert no_group.exit_code == 1 and "no group 'nope'" in no_group.output
    assert "new-optix" in runner.invoke(main, ["practice", "list"]).output


def test_store_down_is_one_clear_line(nvc_env, monkeypatch) -> None:
    monkeypatch.setenv("NVC_DATABASE_URL", "postgresql://nvc@127.0.0.1:9/nvc")
    result = CliRunner().invoke(main, ["practice", "list"])
    assert result.exit_code == 1
    assert "Cannot reach the store's PostgreSQL" in result.output and "Traceback" not in result.output


def test_csv_template_and_csv_export(demo_home, tmp_path: Path) -> None:
    runner, _ = demo_home
    template = runner.invoke(main, ["csv-template"]).output
    assert template.splitlines()[0] == (
        "first_name,last_name,phone_number,last_eye_test_date,risk_category,last_clinical_test_date,"
        "clinical_condition_notes,date_of_birth,email,address,pms_patient_id,deceased,do_not_call,guardian_name"
    )
    assert len(template.splitlines()) == 4
    out = tmp_path / "export.csv"
    assert runner.invoke(main, ["export", "demo-csv", "--format", "csv", "--output", str(out)]).exit_code == 0
    assert out.read_text(encoding="utf-8-sig").startswith("pms_patient_id,first_name")
    assert (tmp_path / "export-rejected.csv").exists()


@pytest.mark.parametrize("practice", ["demo-optix", "demo-acuitas", "demo-optisoft", "demo-sycle"])
def test_demo_call_lists_are_safe_to_dial(demo_home, practice: str) -> None:
    """Every demo PMS practice shows a household on one call, a child asked for through a guardian,
    and deceased, moved-away, archived and opted-out patients kept off the list with their reason."""
    runner, _ = demo_home
    result = runner.invoke(main, ["call-list", practice, "--format", "json"])
    assert result.exit_code == 0, result.output
    view = json.loads(result.output)
    households = [e for e in view["entries"] if len(e["people"]) > 1]
    assert households, practice
    exported = {
        p["pms_patient_id"]: p for p in json.loads(runner.invoke(main, ["export", practice]).output)["patients"]
    }
    sixteen_years_ago = (date.today() - timedelta(days=16 * 365 + 4)).isoformat()
    children = [
        (e, exported[p["pms_patient_id"]])
        for e in view["entries"]
        for p in e["people"]
        if (exported[p["pms_patient_id"]]["date_of_birth"] or "0") > sixteen_years_ago
    ]
    assert children, practice
    for entry, child in children:  # asked for through the guardian the PMS names, else "parent or guardian of"
        guardian = child["guardian_name"]
        wanted = " ".join(guardian.split()[1:]) if guardian else f"parent or guardian of {child['first_name']}"
        assert wanted in entry["ask_for"], (entry, guardian)
    assert any(child["guardian_name"] for _, child in children)
    reasons = {n["reason_code"] for n in view["not_listed"]}
    assert {"deceased", "gone_away", "inactive", "do_not_call"} <= reasons, reasons
    phones = [e["phone"] for e in view["entries"]]
    assert len(phones) == len(set(phones))
    table = runner.invoke(main, ["call-list", practice])
    assert table.output.splitlines()[1].startswith("PHONE") and "Not listed:" in table.output
