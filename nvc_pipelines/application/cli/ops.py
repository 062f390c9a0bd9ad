"""Local services and keys: the demo, `dagster dev`, the PMS sandboxes, the store's PostgreSQL, and
rotating the secret key."""

from __future__ import annotations

import os
import sys

import click

from nvc_pipelines.application.cli.base import _Group, main


@main.command("demo")
@click.option("--ui/--no-ui", default=True, help="Start the Dagster UI after the first syncs (default: yes).")
@click.option("--port", default=3000, show_default=True, help="Dagster UI port.")
@click.option(
    "--sandbox-port", default=8701, show_default=True, help="First of four PMS sandbox ports (0: any free ports)."
)
def demo(ui: bool, port: int, sandbox_port: int) -> None:
    """Embedded store + PMS sandboxes + one demo practice per source, synced, then the Dagster UI."""
    from nvc_pipelines.application.demo import run_demo

    run_demo(ui=ui, ui_port=port, sandbox_port=sandbox_port)


@main.command("dev")
@click.option("--port", default=3000, show_default=True)
def dev(port: int) -> None:
    """Start the store and `dagster dev -w workspace.yaml` on the persistent instance (no demo data)."""
    from nvc_pipelines.application.devserver import run_dev

    sys.exit(run_dev(port))


@main.command("sandbox")
@click.option(
    "--port",
    default=8701,
    show_default=True,
    help="First of five ports (Optix, Acuitas, Optisoft, Sycle, GOC register).",
)
@click.option("--patients", default=50, show_default=True, help="Patients in each demo practice.")
@click.option("--json", "as_json", is_flag=True, help="Print the URLs and credentials as one JSON object (first line).")
def sandbox(port: int, patients: int, as_json: bool) -> None:
    """Run the four PMS sandboxes and the GOC register on loopback until interrupted; once they serve,
    print each one's base URL and demo credentials."""
    from nvc_pipelines.application.demo import serve_sandboxes

    serve_sandboxes(port, patients, as_json=as_json)


@main.group(cls=_Group)
def store() -> None:
    """The store's PostgreSQL (embedded by default)."""


@store.command("start")
def store_start() -> None:
    """Start (or attach to) the store and migrate it."""
    from nvc_pipelines.application.app import open_store
    from nvc_pipelines.application.instance import ensure_dagster_home

    open_store()
    home = ensure_dagster_home()
    click.echo(f"Store ready; DAGSTER_HOME={home}")


@store.command("migrate")
def store_migrate() -> None:
    """Bring the store's schema up to date as its owner (NVC_OWNER_DATABASE_URL; embedded: automatic)."""
    from nvc_pipelines.store import Store, StoreUnavailable
    from nvc_pipelines.store.db import store_urls

    if store_urls().owner is None:
        raise StoreUnavailable("Migrations run as the store's owner: set NVC_OWNER_DATABASE_URL to the owner's login.")
    Store.open()  # migrates as the owner, then checks the application's login against the schema
    click.echo("Store schema up to date.")


@store.command("stop")
def store_stop() -> None:
    """Stop the embedded PostgreSQL server (data is kept under $NVC_HOME/pg)."""
    from nvc_pipelines.store.embedded import stop_server

    stopped = stop_server()
    click.echo(
        f"Stopped {stopped}. The next nvc command starts it again."
        if stopped
        else "The embedded store was not running; nothing to stop."
    )


@main.command("rotate-key")
@click.option("--generate", is_flag=True, help="Generate the new key instead of reading it.")
@click.option("--finish", is_flag=True, help="Finish a rotation of $NVC_HOME/secret.key that was interrupted.")
def rotate_key_cmd(generate: bool, finish: bool) -> None:
    """Re-encrypt every practice's PMS credentials under a new secret key, in one transaction.

    The new key comes from NVC_NEW_SECRET_KEY or standard input (never argv, which other users can
    read in the process list and which shell history keeps)."""
    from nvc_pipelines import crypto
    from nvc_pipelines.application.app import actor, open_store
    from nvc_pipelines.config import nvc_home

    if finish:
        done = crypto.finish_interrupted_rotation(open_store(), actor=actor())
        click.echo("No interrupted rotation to finish." if done is None else f"Finished: {done} practice(s).")
        return
    if generate:
        new_key = crypto.generate_key()
    else:
        new_key = os.environ.get(crypto.NEW_KEY_ENV) or ""
        if not new_key:
            new_key = (
                click.prompt("New secret key (base64, 32 bytes)", hide_input=True)
                if sys.stdin.isatty()
                else sys.stdin.readline()
            )
    ring_from_file = not os.environ.get(crypto.KEY_ENV)
    count = crypto.rotate_key(open_store(), new_key.strip(), actor=actor())
    click.echo(f"Rotated the credentials of {count} practice(s).")
    if ring_from_file:
        click.echo(
            f"{nvc_home() / crypto.KEY_FILE} now holds the new key; the old one is in {crypto.PREVIOUS_KEY_FILE}."
        )
    else:
        if generate:
            click.echo(f"New key (shown once; store it in your secret manager): {new_key}")
        click.echo(
            f"Now set {crypto.KEY_ENV} to the new key and {crypto.PREVIOUS_KEY_ENV} to the old one for every process, "
            f"restart them, then remove {crypto.PREVIOUS_KEY_ENV}."
        )
