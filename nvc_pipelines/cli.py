"""`nvc`: the operators' shell interface. A thin face over `nvc_pipelines.app`; the Dagster UI stays the main one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from nvc_pipelines.model import PmsKind


def _fail(message: str) -> None:
    click.secho(f"Error: {message}", fg="red", err=True)
    sys.exit(1)


def _known_errors() -> tuple[type[BaseException], ...]:
    from nvc_pipelines.app import SettingsError
    from nvc_pipelines.crypto import SecretKeyError
    from nvc_pipelines.recall import RecallConfigError
    from nvc_pipelines.store import PracticeExists, PracticeNotFound, StoreUnavailable
    from resources.gateway import UnsupportedPms
    from resources.protocol import PmsError

    return (
        SettingsError,
        SecretKeyError,
        RecallConfigError,
        PracticeExists,
        PracticeNotFound,
        StoreUnavailable,
        UnsupportedPms,
        PmsError,
    )


class _Group(click.Group):
    """Turns the errors an operator can act on into one red line instead of a stack trace."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _known_errors() as exc:
            _fail(str(exc))


@click.group(cls=_Group)
def main() -> None:
    """NVC Pipelines: keep practices' PMS data in sync, compute recalls, write bookings back."""


# --- practices ------------------------------------------------------------------------------------


@main.group(cls=_Group)
def practice() -> None:
    """Connect, list and disconnect practices."""


def _parse_settings(pairs: tuple[str, ...]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            _fail(f"--setting {pair!r} must look like KEY=VALUE")
        settings[key.strip()] = value.strip()
    return settings


def secret_env_name(secret: str) -> str:
    return f"NVC_PMS_{secret.upper()}"


def _read_secrets(names: tuple[str, ...]) -> dict[str, str]:
    """Secrets from `NVC_PMS_<NAME>` or standard input, never argv (argv shows in `ps` and shell history)."""
    secrets: dict[str, str] = {}
    for name in names:
        value = os.environ.get(secret_env_name(name))
        if not value:
            tty = sys.stdin.isatty()
            value = click.prompt(name, hide_input=True) if tty else sys.stdin.readline().strip()
        if not value:
            _fail(f"secret {name} not given: set {secret_env_name(name)} or type it on standard input")
        secrets[name] = value
    return secrets


@practice.command("connect")
@click.argument("practice_id")
@click.option("--pms", "kind", type=click.Choice([k.value for k in PmsKind]), required=True)
@click.option("--name", default=None, help="Display name (default: the practice id).")
@click.option("--setting", "settings", multiple=True, metavar="KEY=VALUE", help="Non-secret setting; repeat.")
@click.option("--update", is_flag=True, help="Replace the settings of an already connected practice.")
def practice_connect(practice_id: str, kind: str, name: str | None, settings: tuple[str, ...], update: bool) -> None:
    """Test the connection to a practice's PMS and, if it works, register the practice for syncing.

    Secrets (API keys, passwords) are read from NVC_PMS_<NAME> environment variables or standard input.
    """
    from nvc_pipelines import app

    pms = PmsKind(kind)
    parsed = _parse_settings(settings)
    _, _, secret_names = app.pms_requirements(pms)
    secrets = _read_secrets(secret_names)
    practice_, info = app.connect_practice(practice_id, pms, name or practice_id, parsed, secrets, replace=update)
    detail = ", ".join(x for x in (info.practice_name, info.version and f"version {info.version}", info.detail) if x)
    click.secho(f"Connected {practice_.practice_id} ({info.pms}){': ' + detail if detail else ''}", fg="green")
    click.echo("Its partition is registered: sync now with `nvc sync " + practice_id + "` or from the Dagster UI.")


@practice.command("list")
def practice_list() -> None:
    """The practices in the registry (secrets are never shown)."""
    from nvc_pipelines.app import open_store

    rows = open_store().list_practices()
    if not rows:
        click.echo("No practices connected yet: `nvc practice connect --help`.")
        return
    click.echo(f"{'PRACTICE':20} {'PMS':9} {'STATUS':13} {'PATIENTS':>8}  LAST SYNC")
    for r in rows:
        last = r["last_sync_at"].strftime("%Y-%m-%d %H:%M") if r["last_sync_at"] else "never"
        click.echo(f"{r['practice_id']:20} {r['pms_kind']:9} {r['status']:13} {r['patients']:>8}  {last}")


@practice.command("disconnect")
@click.argument("practice_id")
def practice_disconnect(practice_id: str) -> None:
    """Stop syncing a practice; its data and sync history are kept."""
    from nvc_pipelines.app import disconnect_practice

    disconnect_practice(practice_id)
    click.echo(f"Disconnected {practice_id}; its data and run history are kept.")


# --- sync and data --------------------------------------------------------------------------------


def print_outcome(practice_id: str, outcome) -> None:
    for asset_name, meta in outcome.metadata.items():
        shown = {k: v for k, v in meta.items() if not isinstance(v, dict | list) and k != "rejection_reasons"}
        click.echo(f"  {asset_name}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    if outcome.success:
        click.secho(f"Synced {practice_id} (run {outcome.run_id})", fg="green")
    else:
        _fail(f"sync of {practice_id} failed (run {outcome.run_id}): {outcome.error}")


@main.command("sync")
@click.argument("practice_id")
def sync(practice_id: str) -> None:
    """Sync a practice now ("Sync Now"): materialise its partition, recorded in the Dagster run history."""
    from nvc_pipelines.app import sync_practice

    click.echo(f"Syncing {practice_id}...")
    print_outcome(practice_id, sync_practice(practice_id))


@main.command("export")
@click.argument("practice_id")
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
def export(practice_id: str, fmt: str, output: Path | None) -> None:
    """Everything held about a practice's patients (and its rejected rows), as JSON or CSV.

    CSV writes patients to OUTPUT and rejected rows beside it as <name>-rejected.csv.
    """
    from nvc_pipelines.app import export_csv, open_store

    data = open_store().export_practice(practice_id)
    if fmt == "json":
        text = json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
        if output:
            output.write_text(text, encoding="utf-8")
        else:
            click.echo(text, nl=False)
    else:
        patients_csv, rejected_csv = export_csv(data)
        if output:
            output.write_text(patients_csv, encoding="utf-8-sig")
            output.with_name(output.stem + "-rejected.csv").write_text(rejected_csv, encoding="utf-8-sig")
        else:
            click.echo(patients_csv, nl=False)
    if output:
        click.echo(
            f"Exported {len(data['patients'])} patients and {len(data['rejected_rows'])} rejected rows.", err=True
        )


@main.command("csv-template")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), required=False)
def csv_template(path: Path | None) -> None:
    """Write the CSV import template with two example rows (to PATH or standard output)."""
    from resources.csv_source import template_text

    if path:
        path.write_text(template_text(), encoding="utf-8")
        click.echo(f"Wrote {path}")
    else:
        click.echo(template_text(), nl=False)


# --- local services -------------------------------------------------------------------------------


@main.command("demo")
@click.option("--ui/--no-ui", default=True, help="Start the Dagster UI after the first syncs (default: yes).")
@click.option("--port", default=3000, show_default=True, help="Dagster UI port.")
@click.option("--sandbox-port", default=8701, show_default=True, help="Optix sandbox port (0: any free port).")
def demo(ui: bool, port: int, sandbox_port: int) -> None:
    """Embedded store + PMS sandboxes + one demo practice per source, synced, then the Dagster UI."""
    from nvc_pipelines.demo import run_demo

    run_demo(ui=ui, ui_port=port, sandbox_port=sandbox_port)


@main.command("dev")
@click.option("--port", default=3000, show_default=True)
def dev(port: int) -> None:
    """Start the store and `dagster dev -w workspace.yaml` on the persistent instance (no demo data)."""
    from nvc_pipelines.demo import run_dagster_dev

    sys.exit(run_dagster_dev(port))


@main.command("sandbox")
@click.option("--optix-port", default=8701, show_default=True)
@click.option("--patients", default=50, show_default=True, help="Patients in the demo Optix practice.")
def sandbox(optix_port: int, patients: int) -> None:
    """Run the PMS sandboxes on loopback until interrupted."""
    from nvc_pipelines.demo import serve_sandboxes

    serve_sandboxes(optix_port, patients)


@main.group(cls=_Group)
def store() -> None:
    """The embedded PostgreSQL store."""


@store.command("start")
def store_start() -> None:
    """Start (or attach to) the store and migrate it."""
    from nvc_pipelines.app import open_store
    from nvc_pipelines.instance import ensure_dagster_home

    open_store()
    home = ensure_dagster_home()
    click.echo(f"Store ready; DAGSTER_HOME={home}")


@store.command("stop")
def store_stop() -> None:
    """Stop the embedded PostgreSQL server (data is kept under $NVC_HOME/pg)."""
    from nvc_pipelines.store.embedded import stop_server

    click.echo("Stopped." if stop_server() else "The embedded server was not running.")


if __name__ == "__main__":
    main()
