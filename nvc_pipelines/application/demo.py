"""`nvc demo`, `nvc dev` and `nvc sandbox`: local services for trying the product end to end.

The demo starts the embedded store and the PMS sandboxes, connects one demo practice per source
(exactly as an operator would, through `app.connect_practice`), runs each practice's first sync on
the persistent instance, then hands over to `dagster dev` with the sandboxes still serving.
"""

from __future__ import annotations

import csv
import json
import os
import time
from datetime import date
from pathlib import Path
from typing import Any

import click

from nvc_pipelines.application import app
from nvc_pipelines.application.console import print_outcome
from nvc_pipelines.application.devserver import run_dagster_dev, stop_store_if_started, stopped_by_signals
from nvc_pipelines.application.instance import ensure_dagster_home
from nvc_pipelines.config import nvc_home
from nvc_pipelines.model import PmsKind
from nvc_pipelines.store.embedded import is_running

try:
    from sandboxes.acuitas import AcuitasSandbox
    from sandboxes.base import SandboxServer
    from sandboxes.goc import GocSandbox, Registrant, registrants_for, registrants_for_staff
    from sandboxes.optisoft import OptisoftSandbox
    from sandboxes.optix import OptixSandbox
    from sandboxes.seed import ODD_STAFF, seed_clinicians, seed_patients
    from sandboxes.sycle import DEMO_PASSWORD as SYCLE_DEMO_PASSWORD
    from sandboxes.sycle import DEMO_USERNAME as SYCLE_DEMO_USERNAME
    from sandboxes.sycle import SycleSandbox
except ModuleNotFoundError as exc:  # an image or a plain `pip install .`: the product without its sandboxes
    raise click.ClickException(
        f"the demo and the PMS sandboxes need a development checkout (`make demo`, or `pip install -e '.[dev]'` "
        f"in the repository): {exc.name} is not installed"
    ) from None

DEMO_OPTIX_PRACTICE = "OPX-1001"
DEMO_OPTIX_KEY = "optix-demo-key"
DEMO_ACUITAS_DATABASE = "ACUITAS_DEMO"
DEMO_ACUITAS_LOGIN = {"api_username": "nvc_api", "api_password": "demo-password"}
DEMO_OPTISOFT_PRACTICE = "OS-1001"
DEMO_OPTISOFT_LOGIN = {"db_username": "NVC_LINK", "db_password": "optisoft-demo-password"}
DEMO_SYCLE_CLINIC = "2803-9506"  # the guide's "Location ID": a Sycle clinic id, prefixed by the account number
DEMO_SYCLE_LOGIN = {"api_username": SYCLE_DEMO_USERNAME, "api_password": SYCLE_DEMO_PASSWORD}
_RISK_WORDS = {
    "diabetic": "Diabetes",
    "glaucoma": "Glaucoma",
    "glaucoma_suspect": "glaucoma suspect",
    "ocular_hypertension": "OHT",
    "glaucoma_family_history": "family history glaucoma",
    "binocular_vision_anomaly": "Squint",
    "corrected_refractive_error": "corrected refractive error",
    "progressive_myopia": "rapidly progressing myopia",
}


def _bind(factory, port: int) -> SandboxServer:
    """The sandbox on `port`, or on any free port when that one is taken."""
    try:
        return factory(port)
    except OSError:
        return factory(0)


GOC_REGISTER_ENV = "NVC_GOC_REGISTER_URL"


def demo_register(sandboxes: dict[str, SandboxServer]) -> dict[str, Registrant]:
    """The GOC register's entries for every clinician the PMS sandboxes list, all registered, but for
    the odd cases Acuitas and Optisoft list beside them (`ODD_STAFF`: suspended, erased, not held)."""
    optix: Any = sandboxes["optix"]
    acuitas: Any = sandboxes["acuitas"]
    sycle: Any = sandboxes["sycle"]
    optisoft: Any = sandboxes["optisoft"]
    entries = registrants_for(seed_clinicians(optix._practice_seed(DEMO_OPTIX_PRACTICE)))
    entries |= registrants_for(sycle.clinicians)
    entries |= registrants_for(acuitas.optom_codes(DEMO_ACUITAS_DATABASE).values())
    for row in optisoft.select(DEMO_OPTISOFT_PRACTICE, "SELECT Name, GOCNumber FROM Clinicians"):
        number = row["GOCNumber"]
        kind = "optometrist" if str(number).startswith("01-") else "dispensing_optician"
        entries[number] = Registrant(number, row["Name"], kind)
    odd = {s.goc_number for s in ODD_STAFF}
    return {n: e for n, e in entries.items() if n and n not in odd} | registrants_for_staff(ODD_STAFF)


def start_sandboxes(base_port: int = 8701, patients: int = 50) -> dict[str, SandboxServer]:
    """One sandbox per PMS, on `base_port` and the next three, and the GOC register on the fifth
    (any free ports when 0 or taken)."""

    def port(offset: int) -> int:
        return base_port + offset if base_port else 0

    started: dict[str, SandboxServer] = {}
    try:
        started["optix"] = _bind(
            lambda p: OptixSandbox(
                port=p, practices={DEMO_OPTIX_PRACTICE: patients}, api_keys={DEMO_OPTIX_KEY: DEMO_OPTIX_PRACTICE}
            ),
            port(0),
        ).start()
        started["acuitas"] = _bind(
            lambda p: AcuitasSandbox(port=p, databases={DEMO_ACUITAS_DATABASE: patients}), port(1)
        ).start()
        started["optisoft"] = _bind(
            lambda p: OptisoftSandbox(port=p, practices={DEMO_OPTISOFT_PRACTICE: patients}), port(2)
        ).start()
        started["sycle"] = _bind(
            lambda p: SycleSandbox(port=p, clinics={DEMO_SYCLE_CLINIC: patients, "2803-9507": 20}), port(3)
        ).start()
        started["goc"] = _bind(lambda p: GocSandbox(port=p, registrants=demo_register(started)), port(4)).start()
    except BaseException:
        for server in started.values():
            server.stop()
        raise
    return started


def write_demo_csv(folder: Path, n: int = 40, seed: int = 11) -> Path:
    """A practice export in the seed CSV format, with a few rows a real export would get wrong."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"patients-{date.today():%Y%m%d}.csv"
    from resources.csv_source import OPTIONAL_COLUMNS, SEED_COLUMNS

    # The importer's own column names: its seed columns, then the optional ones the demo fills.
    columns = (
        *SEED_COLUMNS,
        *(c for c in OPTIONAL_COLUMNS if c in ("date_of_birth", "deceased", "do_not_call", "guardian_name")),
    )
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        for p in seed_patients(n, seed=seed):
            test = p.last_eye_test.strftime("%d/%m/%Y") if p.last_eye_test else ""
            died = (p.status_date.strftime("%d/%m/%Y") if p.status_date else "yes") if p.status == "deceased" else ""
            writer.writerow(
                {
                    "first_name": p.first_name,
                    "last_name": p.last_name,
                    "phone_number": p.mobile or p.landline or "",
                    "last_eye_test_date": test,
                    "risk_category": "; ".join(_RISK_WORDS[f] for f in p.flags) or "standard",
                    "last_clinical_test_date": test,
                    "clinical_condition_notes": p.clinical_notes or "",
                    "date_of_birth": p.date_of_birth.strftime("%d/%m/%Y") if p.date_of_birth else "",
                    "deceased": died,
                    "do_not_call": "yes" if not p.phone_recall or p.no_recall else "",
                    "guardian_name": p.guardian_name or "",
                }
            )
        # What real exports contain: kept as rejected rows with their reasons, never dropped.
        for first, last, phone, tested, risk in (
            ("Gwen", "Price", "", "12/03/2024", "standard"),
            ("Rhys", "Morgan", "07700 900999", "31/02/2024", "standard"),
            ("Ffion", "Hughes", "7.7009E+09", "01/05/2023", "standard"),
            ("Alys", "Evans", "07700 900998", "01/05/2023", "high myopia"),
        ):
            writer.writerow(
                {"first_name": first, "last_name": last, "phone_number": phone, "last_eye_test_date": tested,
                 "risk_category": risk}
            )  # fmt: skip
    return path


def demo_connections(sandboxes: dict[str, SandboxServer]) -> list[tuple[str, PmsKind, str, dict, dict]]:
    """(practice id, PMS, name, settings, secrets) of the demo practice on each sandbox."""
    return [
        (
            "demo-optix",
            PmsKind.OPTIX,
            "Demo Eyecare (Optix)",
            {"practice_id": DEMO_OPTIX_PRACTICE, "api_url": sandboxes["optix"].url},
            {"api_key": DEMO_OPTIX_KEY},
        ),
        (
            "demo-acuitas",
            PmsKind.ACUITAS,
            "Demo Vision Centre (Acuitas)",
            {"server_url": sandboxes["acuitas"].url, "database": DEMO_ACUITAS_DATABASE},
            dict(DEMO_ACUITAS_LOGIN),
        ),
        (
            "demo-optisoft",
            PmsKind.OPTISOFT,
            "Demo Opticians (Optisoft)",
            {"server_address": sandboxes["optisoft"].url, "practice_code": DEMO_OPTISOFT_PRACTICE},
            dict(DEMO_OPTISOFT_LOGIN),
        ),
        (
            "demo-sycle",
            PmsKind.SYCLE,
            "Demo Hearing & Eyes (Sycle)",
            {
                "account_url": sandboxes["sycle"].url,
                "location_id": DEMO_SYCLE_CLINIC,
                "field_map.last_eye_test": "custom_3",
                "field_map.recall_due": "custom_5",
                "field_map.date_of_death": "custom_6",
            },
            dict(DEMO_SYCLE_LOGIN),
        ),
    ]


def connect_demo_practices(sandboxes: dict[str, SandboxServer]) -> list[str]:
    """Connect one demo practice per source; re-running the demo updates them in place."""
    drop = nvc_home() / "demo" / "csv-drop"
    write_demo_csv(drop)
    app.connect_practice("demo-csv", PmsKind.CSV, "Demo Opticians (CSV upload)", {"path": str(drop)}, {}, replace=True)
    connections = demo_connections(sandboxes)
    for practice_id, kind, name, settings, secrets in connections:
        app.connect_practice(practice_id, kind, name, settings, secrets, replace=True)
    return ["demo-csv", *(c[0] for c in connections)]


def run_demo(*, ui: bool, ui_port: int, sandbox_port: int) -> None:
    """Store, sandboxes, demo practices and their first syncs, then the UI; on Ctrl-C or SIGTERM
    everything it started stops (the store too, when the demo started it)."""
    started = time.monotonic()
    store_was_running = is_running()
    sandboxes: dict[str, SandboxServer] = {}
    try:
        with stopped_by_signals():
            app.open_store()
            home = ensure_dagster_home()
            click.echo(f"Store ready (NVC_HOME={nvc_home()}, DAGSTER_HOME={home})")
            sandboxes = start_sandboxes(sandbox_port)
            os.environ[GOC_REGISTER_ENV] = sandboxes["goc"].url  # the syncs and `dagster dev` check against it
            for name, server in sandboxes.items():
                click.echo(f"{name} sandbox listening on {server.url}")
            for practice_id in connect_demo_practices(sandboxes):
                click.echo(f"Connected {practice_id}; first sync...")
                print_outcome(practice_id, app.sync_practice(practice_id, trigger="initial"))
            click.echo(f"Demo ready in {time.monotonic() - started:.1f}s. Try `nvc export demo-optix`.")
            if ui:
                run_dagster_dev(ui_port)
    except KeyboardInterrupt:
        click.echo("Interrupted.")
    finally:
        for server in sandboxes.values():
            server.stop()
        if ui:
            stop_store_if_started(store_was_running)


def sandbox_directory(sandboxes: dict[str, SandboxServer]) -> dict[str, dict[str, Any]]:
    """Each sandbox's base URL and demo credentials (sandbox credentials only), as `nvc sandbox` prints them."""
    sycle_url = sandboxes["sycle"].url
    return {
        "optix": {
            "base_url": sandboxes["optix"].url,
            "practice_id": DEMO_OPTIX_PRACTICE,
            "credentials": {"api_key": DEMO_OPTIX_KEY},
        },
        "acuitas": {
            "base_url": sandboxes["acuitas"].url,
            "database": DEMO_ACUITAS_DATABASE,
            "credentials": dict(DEMO_ACUITAS_LOGIN),
        },
        "optisoft": {
            "base_url": sandboxes["optisoft"].url,
            "practice_code": DEMO_OPTISOFT_PRACTICE,
            "credentials": dict(DEMO_OPTISOFT_LOGIN),
        },
        "sycle": {
            "base_url": sycle_url,
            "api_base": f"{sycle_url}/api/vendor/",
            "location_id": DEMO_SYCLE_CLINIC,
            "credentials": {"username": SYCLE_DEMO_USERNAME, "password": SYCLE_DEMO_PASSWORD},
        },
        "goc": {"base_url": sandboxes["goc"].url, "api_base": f"{sandboxes['goc'].url}/api/registrants/"},
    }


def serve_sandboxes(optix_port: int, patients: int, *, as_json: bool = False) -> None:
    """Serve the sandboxes until interrupted; once they serve, print each one's base URL and demo
    credentials (`as_json`: one JSON object on the first line, for another tool to read)."""
    sandboxes = start_sandboxes(optix_port, patients)
    try:
        # Armed before the directory is printed: whoever reads it may stop us at once, and a process
        # started in the background has SIGINT ignored until `stopped_by_signals` re-arms it.
        with stopped_by_signals():
            directory = sandbox_directory(sandboxes)
            if as_json:
                click.echo(json.dumps(directory))
            else:
                for name, entry in directory.items():
                    extra = ", ".join(f"{k} {v}" for k, v in entry.items() if k not in ("base_url", "credentials"))
                    login = ", ".join(f"{k} {v}" for k, v in entry.get("credentials", {}).items())
                    click.echo(
                        f"{name}: {entry['base_url']}"
                        + (f" ({extra})" if extra else "")
                        + (f"; {login}" if login else "")
                    )
                click.echo("Sandbox credentials only. Ctrl-C stops.")
            while True:
                # Short sleeps: the kernel may hand Ctrl-C to any of the sandboxes' threads, and Python
                # runs the handler only when the main thread wakes (a long sleep slept on through it:
                # `nvc sandbox` then outlived a Ctrl-C for as long as it was given).
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for server in sandboxes.values():
            server.stop()
