"""The operator's day in a real browser: the Dagster UI driven by Playwright through Debian's Chromium.

`nvc demo`-style services on free loopback ports (embedded PostgreSQL, the four PMS sandboxes, the
demo practices connected and first synced as the demo does, plus a practice whose Optix server has
gone away), then the real `dagster dev` webserver and daemon. In the browser: the asset graph, a
practice partition and Sync Now, the run succeeding, the sync log filtered by the practice tag, the
failed run of the practice whose PMS is down with its troubleshooting message, the asset checks, a
booking the PMS refused turning the writeback check red (and green once dismissed), the nightly
schedule, the daily writeback digest and the writeback sensor. Every step is asserted against what the page shows,
through Playwright's auto-waiting `expect`; screenshots land in docs/screenshots/.

Skipped, with the reason, only where Chromium is not installed (`.ci/run` installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from nvc_pipelines import writeback
from nvc_pipelines.alerts import recent_alerts
from nvc_pipelines.application import app, demo
from nvc_pipelines.application.cli import main
from nvc_pipelines.application.instance import ensure_dagster_home, get_instance
from nvc_pipelines.crypto import generate_key
from nvc_pipelines.model import PmsKind
from nvc_pipelines.store.embedded import stop_server
from sandboxes.optix import OptixSandbox
from tests import services
from tests.conftest import isolated_env

# Tests that start services of their own (a store, sandboxes, `dagster dev`) run one after another on
# one pytest worker (`--dist loadgroup`), the rest of the suite on the other.
pytestmark = pytest.mark.xdist_group("services")

CHROMIUM = os.environ.get("NVC_CHROMIUM", "/usr/bin/chromium")
# Headless, and nothing that phones home: on a closed network Chromium's own background
# connections are refused and would otherwise disturb the session.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Saved under build/ (ignored by git) so a test run leaves the tree clean; refresh the README's
# pictures with NVC_SCREENSHOTS=docs/screenshots.
SCREENSHOTS = Path(os.environ.get("NVC_SCREENSHOTS", services.REPO / "build" / "screenshots"))
PATIENTS = 20
DOWN = "harbour-optix"  # its Optix server is stopped after it connected and synced once
RUN_TIMEOUT_MS = 120_000  # a run is watched until it ends; this only bounds a hung one
SYNC_ASSETS = ("patients", "appointments", "clinical_records", "clinicians", "recalls", "call_list")


@dataclass(frozen=True)
class Services:
    url: str
    practices: list[str]
    down_url: str


def _chromium() -> str:
    path = shutil.which(CHROMIUM)
    if path is None:
        why = os.environ.get("NVC_CHROMIUM_MISSING") or "install Debian's package: apt-get install chromium"
        pytest.skip(f"browser tests need Chromium at {CHROMIUM}, which is not installed ({why})")
    return path


@pytest.fixture(scope="module")
def chromium() -> str:
    return _chromium()


@pytest.fixture(scope="module")
def operator_services(chromium: str) -> Iterator[Services]:
    """`nvc demo` on free ports, one practice whose PMS is down, and `dagster dev` on a free port."""
    home = Path(tempfile.mkdtemp(prefix="nvc-e2e-"))
    sandboxes = {}
    with pytest.MonkeyPatch.context() as mp:
        isolated_env(mp, home, generate_key())
        try:
            app.open_store()
            ensure_dagster_home()
            sandboxes = demo.start_sandboxes(0, patients=PATIENTS)
            practices = demo.connect_demo_practices(sandboxes)
            sandboxes["down"] = OptixSandbox(
                practices={"OPX-2002": PATIENTS}, api_keys={"harbour-key": "OPX-2002"}
            ).start()
            down_url = sandboxes["down"].url
            app.connect_practice(
                DOWN,
                PmsKind.OPTIX,
                "Harbour Opticians (Optix)",
                {"practice_id": "OPX-2002", "api_url": down_url},
                {"api_key": "harbour-key"},
            )
            practices.append(DOWN)
            for practice_id in practices:  # each practice's first sync, as `nvc demo` runs it
                outcome = app.sync_practice(practice_id, trigger="initial")
                assert outcome.success, (practice_id, outcome.error)
            sandboxes.pop("down").stop()  # the practice's PMS goes down
            mp.setenv("NVC_HEALTH_EVERY_SECONDS", "5")  # sync health judged every 5 s, not 5 minutes
            with services.dagster_dev(home) as port:
                url = f"http://127.0.0.1:{port}"
                # The "join the community" prompt `dagster dev` shows on loopback, dismissed for good
                # on this instance the way its Skip button does.
                seen = httpx.post(f"{url}/graphql", json={"query": "mutation { setNuxSeen }"}, timeout=30)
                assert seen.json() == {"data": {"setNuxSeen": True}}, seen.text
                yield Services(url, practices, down_url)
        finally:
            for server in sandboxes.values():
                server.stop()
            stop_server()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def nvc_env(operator_services: Services) -> None:
    """The browser drives the module's services; tests here need no NVC_HOME of their own."""


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    expect.set_options(timeout=30_000)
    with sync_playwright() as playwright:
        # Playwright gives every launch a fresh, empty user-data-dir of its own.
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, operator_services: Services) -> Iterator[Page]:
    context = browser.new_context(
        base_url=operator_services.url,
        viewport={"width": 1440, "height": 900},
        locale="en-GB",
        timezone_id="Europe/London",
    )
    context.set_default_timeout(30_000)
    page = context.new_page()
    yield page
    context.close()


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png")


def open_partition(page: Page, practice_id: str) -> None:
    """Catalog > patients > Partitions > the practice."""
    page.goto("/assets/patients?view=partitions")
    page.get_by_role("tab", name="Partitions").click()
    page.get_by_text(practice_id, exact=True).first.click()
    expect(page).to_have_url(re.compile(rf"partition={re.escape(practice_id)}"))


def sync_now(page: Page, practice_id: str) -> str:
    """Press Materialize on the open partition ("Sync Now" in the UI) and follow the launched run's
    link; returns the run's short id."""
    page.get_by_role("button", name="Materialize…").click()
    dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize patients")
    expect(dialog.get_by_text("1 partition", exact=True)).to_be_visible()
    expect(dialog.get_by_text(practice_id, exact=True).first).to_be_visible()
    dialog.get_by_role("button", name="Launch 1 run").click()
    toast = page.get_by_text(re.compile(r"^Launched run [0-9a-f]{8}$"))
    expect(toast).to_be_visible(timeout=60_000)  # a liveness wait: a loaded machine is slow, not red
    run_id = toast.inner_text().split()[-1]
    page.get_by_role("link", name="View").or_(page.get_by_role("button", name="View")).first.click()
    expect(page).to_have_url(re.compile(rf"/runs/{run_id}"))
    return run_id


def list_rows(page: Page) -> Locator:
    """The rows of the UI's (virtualised) lists: runs, automations."""
    return page.locator("[data-index]")


def detail(page: Page, label: str) -> Locator:
    """The row labelled `label` of a schedule's or sensor's details table."""
    return page.get_by_role("row").filter(has=page.get_by_text(label, exact=True))


def sync_log(page: Page, practice_id: str) -> Locator:
    """Runs, filtered by the practice's partition tag: its sync log, however each sync was started
    (UI, schedule, sensor, `nvc`). Returns its rows."""
    page.goto(f"/runs?q%5B0%5D=tag%3Adagster%2Fpartition%3D{practice_id}")
    expect(page.get_by_text(f"Partition is {practice_id}")).to_be_visible()  # how the UI shows that filter
    return list_rows(page)


def test_sync_now_the_sync_log_and_a_practice_whose_pms_is_down(page: Page, operator_services: Services) -> None:
    # The asset graph: the five sync assets, each partitioned by practice.
    page.goto("/locations/nvc_pipelines/asset-groups/practice_sync")
    for asset in SYNC_ASSETS:
        expect(page.get_by_text(asset, exact=True).first).to_be_visible()
    partitions = f"{len(operator_services.practices)} partitions"
    expect(page.get_by_text(partitions, exact=True)).to_have_count(len(SYNC_ASSETS))
    screenshot(page, "asset-graph")

    # Sync Now for the practice whose PMS is down (it fails after its retries; looked at below).
    open_partition(page, DOWN)
    failed_run = sync_now(page, DOWN)

    # A practice's partition: every practice is listed, and the one opened shows its last sync.
    open_partition(page, "demo-optix")
    for practice_id in operator_services.practices:
        expect(page.get_by_text(practice_id, exact=True).first).to_be_visible()
    title = page.locator("[data-tooltip='demo-optix']").filter(has_text="Materialized")  # the partition's heading
    expect(title).to_be_visible()
    expect(page.get_by_role("row", name=re.compile(rf"rows_read\s+{PATIENTS}"))).to_be_visible()
    screenshot(page, "practice-partition")

    # Sync Now: Materialize the partition, then watch the run succeed.
    run_id = sync_now(page, "demo-optix")
    expect(page.get_by_text("partition: demo-optix").first).to_be_visible()
    expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=RUN_TIMEOUT_MS)
    screenshot(page, "sync-now-run")

    # The sync log: runs filtered by the practice's partition, the Sync Now and the first sync.
    rows = sync_log(page, "demo-optix")
    sync_now_row = rows.filter(has_text=run_id)
    expect(sync_now_row).to_contain_text("Success")
    initial_row = rows.filter(has_text="trigger: initial")
    expect(initial_row).to_have_count(1)
    expect(initial_row).to_contain_text("Success")
    expect(rows.filter(has_text="demo-acuitas")).to_have_count(0)
    screenshot(page, "sync-log")

    # The practice whose PMS is down: its sync log, and its failed run with what to check.
    rows = sync_log(page, DOWN)
    expect(rows.filter(has_text="trigger: initial")).to_contain_text("Success")
    rows.filter(has_text=failed_run).get_by_role("link", name=failed_run).click()
    expect(page.get_by_text("Failure", exact=True).first).to_be_visible(timeout=RUN_TIMEOUT_MS)
    page.get_by_placeholder("Filter…").fill("type:STEP_FAILURE")  # what the run list's "steps failed" link opens
    message = (
        f"Optix (practice {DOWN}): Connection failed: could not connect to {operator_services.down_url}"
        " (ConnectError: [Errno 111] Connection refused). Check: the api_url setting, and that this server"
        " can reach it (firewall, proxy, network)"
    )
    expect(page.get_by_text(message)).to_be_visible()
    expect(page.get_by_role("row", name="problem unreachable")).to_be_visible()
    expect(page.get_by_role("row", name="attempts 3")).to_be_visible()  # retried twice before it failed
    screenshot(page, "failed-run")
    rows = sync_log(page, DOWN)
    expect(rows.filter(has_text=failed_run)).to_contain_text("Failure")


def test_asset_checks_show_their_results(page: Page, operator_services: Services) -> None:
    page.goto("/assets/patients?view=checks")
    for check in ("patients_are_valid", "patients_are_fresh", "volume_drop_within_limit"):
        expect(page.get_by_text(check, exact=True).first).to_be_visible()
    page.get_by_text("patients_are_valid", exact=True).first.click()
    page.get_by_role("tab", name="Execution history").click()
    # One result per practice partition (newest first), evaluated by Great Expectations at each sync.
    for practice_id in operator_services.practices:
        if practice_id != DOWN:  # its latest check execution depends on whether its failed sync ran yet
            result = page.get_by_role("row").filter(has_text=practice_id).first
            expect(result).to_contain_text("Passed")
            expect(result).to_contain_text("all expectations met")
    screenshot(page, "asset-checks")


def _writeback_runs(practice_id: str) -> list:
    return [
        r
        for r in get_instance().get_runs()
        if r.tags.get("trigger") == "writeback" and r.tags.get("practice") == practice_id
    ]


def _wait_for_writeback_run(practice_id: str, seen: int) -> None:
    """Until the daemon's sensor has launched a writeback run after the `seen` ones and it has ended."""
    deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        runs = _writeback_runs(practice_id)
        if len(runs) > seen and runs[0].is_finished:
            assert runs[0].is_success, runs[0].status
            return
        time.sleep(0.5)
    raise AssertionError(f"no writeback run for {practice_id} ended within {RUN_TIMEOUT_MS / 1000:.0f} s")


def test_a_booking_the_pms_refuses_turns_the_writeback_check_red(page: Page) -> None:
    """Outbox row -> the daemon's sensor -> run -> the PMS refuses an unknown patient: the run succeeds
    but the worklist check is red and an alert is recorded; dismissed, it turns green by itself."""
    practice_id = "demo-optix"
    store = app.open_store()
    seen = len(_writeback_runs(practice_id))
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=400)
    writeback.add_booking(store, practice_id, "e2e-ghost", "NO-SUCH-PATIENT", start)
    _wait_for_writeback_run(practice_id, seen)
    (row,) = writeback.outbox_rows(store, practice_id, needs_action=True)
    assert (row["status"], row["problem"]) == ("failed", "patient_not_found")
    assert any(a["job_name"] == "booking_writeback" for a in recent_alerts(store, practice_id))

    page.goto("/assets/booking_writebacks?view=checks")
    expect(page.get_by_text("no_writeback_needs_action", exact=True).first).to_be_visible()
    page.get_by_text("no_writeback_needs_action", exact=True).first.click()
    page.get_by_role("tab", name="Execution history").click()
    result = page.get_by_role("row").filter(has_text=practice_id).first
    expect(result).to_contain_text("Failed")
    expect(result).to_contain_text("1 writeback(s) need action (1 failed)")
    screenshot(page, "writeback-needs-action")

    seen = len(_writeback_runs(practice_id))
    dismissed = CliRunner().invoke(main, ["outbox", "dismiss", str(row["outbox_id"]), "--why", "booked by hand"])
    assert dismissed.exit_code == 0, dismissed.output
    _wait_for_writeback_run(practice_id, seen)  # the sensor re-checks the practice after a dismissal
    page.reload()
    page.get_by_role("tab", name="Execution history").click()
    result = page.get_by_role("row").filter(has_text=practice_id).first
    expect(result).to_contain_text("Passed")
    expect(result).to_contain_text("nothing waits for action")


def test_a_practice_the_nightly_no_longer_reaches_goes_red_by_itself(page: Page, operator_services: Services) -> None:
    """Sync health between runs: the PMS of DOWN has been down for 30 hours (its last successful sync
    is that old): without any run, `sync_health_sensor` turns its `patients_are_fresh` red, and
    `nvc practice list` says STALE."""
    from sqlalchemy import text

    with app.open_store().begin_owner() as conn:
        conn.execute(
            text("UPDATE practices SET last_sync_at = now() - interval '30 hours' WHERE practice_id = :p"), {"p": DOWN}
        )
    listing = CliRunner().invoke(main, ["practice", "list"])
    assert listing.exit_code == 0, listing.output
    assert re.search(rf"{DOWN} .* STALE", listing.output), listing.output
    assert "over the 26 h the nightly schedule allows" in listing.output

    page.goto("/assets/patients?view=checks")
    page.get_by_text("patients_are_fresh", exact=True).first.click()
    page.get_by_role("tab", name="Execution history").click()
    result = page.get_by_role("row").filter(has_text="over the 26 h").first
    deadline = time.monotonic() + 90  # the sensor judges every 5 s here; the daemon may be busy
    while not result.is_visible() and time.monotonic() < deadline:
        time.sleep(2)
        page.reload()
        page.get_by_role("tab", name="Execution history").click()
    expect(result).to_contain_text("Failed")
    screenshot(page, "practice-stale")


def test_nightly_schedule_and_writeback_sensor_are_running(page: Page) -> None:
    page.goto("/automation")
    for name in (
        "nightly_pms_sync",
        "writeback_digest_schedule",
        "booking_writeback_sensor",
        "initial_sync_sensor",
        "run_failure_alert_sensor",
        "sync_health_sensor",
    ):
        automation = list_rows(page).filter(has_text=name)
        expect(automation.get_by_role("checkbox").last).to_be_checked()  # its on/off switch
    expect(list_rows(page).filter(has_text="nightly_pms_sync")).to_contain_text(re.compile(r"At 0?2:00"))
    screenshot(page, "automation")

    page.get_by_text("nightly_pms_sync", exact=True).click()
    expect(page).to_have_url(re.compile(r"/schedules/nightly_pms_sync"))
    expect(detail(page, "Execution timezone")).to_have_text(re.compile(r"Execution timezone\s*Europe/London"))
    schedule = detail(page, "Schedule")
    expect(schedule).to_contain_text("(0 2 * * *)")
    expect(schedule).to_contain_text(re.compile(r"At 0?2:00"))
    expect(detail(page, "Next tick")).to_contain_text(re.compile(r"0?2:00:00"))
    expect(detail(page, "Running").get_by_role("checkbox")).to_be_checked()
    screenshot(page, "nightly-schedule")

    page.goto("/automation")
    page.get_by_text("booking_writeback_sensor", exact=True).click()
    expect(page).to_have_url(re.compile(r"/sensors/booking_writeback_sensor"))
    expect(detail(page, "Running").get_by_role("checkbox")).to_be_checked()
    # Evaluated by the daemon every second or so: its latest tick is there.
    expect(detail(page, "Latest tick")).to_contain_text("runs requested")
    screenshot(page, "writeback-sensor")
