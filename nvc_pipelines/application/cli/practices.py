"""Practices and their data: connect, list and disconnect, group, sync, their sync history,
clinicians, export and the CSV import template."""

from __future__ import annotations

import json
import os
import sys
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import IO

import click

from nvc_pipelines.application.cli.base import _fail, _Group, _iso, _known, _table, main
from nvc_pipelines.application.console import print_outcome
from nvc_pipelines.files import atomic_write
from nvc_pipelines.model import PmsKind


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
@click.option(
    "--update",
    is_flag=True,
    help="Change a connected practice: only the settings and secrets (NVC_PMS_<NAME>) given are replaced.",
)
@click.option("--group", "group_id", default=None, help="Add the practice to this practice group.")
def practice_connect(
    practice_id: str, kind: str, name: str | None, settings: tuple[str, ...], update: bool, group_id: str | None
) -> None:
    """Test the connection to a practice's PMS and, if it works, register the practice for syncing.

    Secrets (API keys, passwords) are read from NVC_PMS_<NAME> environment variables or standard input.
    """
    from nvc_pipelines.application import app

    pms = PmsKind(kind)
    parsed = _parse_settings(settings)
    if update:  # changes a registered practice; a mistyped id must not connect a new one
        _known(practice_id)
    if group_id:
        app.open_store().group_practices(group_id)  # an unknown group fails before anything is saved
    _, _, secret_names = app.pms_requirements(pms)
    if update:  # only the secrets given are replaced; the others are kept
        secrets = {n: os.environ[secret_env_name(n)] for n in secret_names if os.environ.get(secret_env_name(n))}
        if not secrets and not parsed and sys.stdin.isatty():
            secrets = _read_secrets(secret_names)
    else:
        secrets = _read_secrets(secret_names)
    practice_, info = app.connect_practice(practice_id, pms, name, parsed, secrets, replace=update)
    if group_id:
        app.open_store().set_group(practice_id, group_id)
    detail = ", ".join(x for x in (info.practice_name, info.version and f"version {info.version}", info.detail) if x)
    click.secho(f"Connected {practice_.practice_id} ({info.pms}){': ' + detail if detail else ''}", fg="green")
    click.echo("Its partition is registered: sync now with `nvc sync " + practice_id + "` or from the Dagster UI.")
    if pms != PmsKind.CSV:  # its clinicians are checked against the GOC register before any booking
        from resources.deployment import goc_register

        with goc_register().open() as register:
            if register.warning:
                click.secho(f"Warning: {register.warning}.", fg="yellow")


@practice.command("list")
def practice_list() -> None:
    """The practices in the registry (secrets are never shown)."""
    from nvc_pipelines.application.app import open_store
    from nvc_pipelines.health import practice_health

    store = open_store()
    rows = store.list_practices()
    if not rows:
        click.echo("No practices connected yet: `nvc practice connect --help`.")
        return
    click.echo(f"{'PRACTICE':20} {'PMS':9} {'STATUS':13} {'PATIENTS':>8}  {'LAST SYNC':16}  {'READ':5}  WRITE")
    problems: list[str] = []
    writes = store.writeback_health()
    for r in rows:
        last = r["last_sync_at"].strftime("%Y-%m-%d %H:%M") if r["last_sync_at"] else "never"
        read = write = "-"
        if r["status"] == "connected":
            state = practice_health(r, writes.get(r["practice_id"], (None, 0)))
            read = "ok" if state.read_ok else "STALE"
            write = "WAITING" if not state.write_ok else "ACTION" if state.needs_action else "ok"
            problems += [f"{r['practice_id']}: {d}" for ok, d in ((state.read_ok, state.read_detail),
                                                                   (state.write_ok, state.write_detail)) if not ok]  # fmt: skip
            if state.needs_action:
                problems.append(
                    f"{r['practice_id']}: {state.needs_action} writeback(s) did not land and need action "
                    f"(`nvc outbox {r['practice_id']} --needs-action`)"
                )
        click.echo(f"{r['practice_id']:20} {r['pms_kind']:9} {r['status']:13} {r['patients']:>8}  {last:16}  "
                   f"{read:5}  {write}")  # fmt: skip
    for problem in problems:
        click.secho(f"  {problem}", fg="red")


@practice.command("disconnect")
@click.argument("practice_id")
def practice_disconnect(practice_id: str) -> None:
    """Stop syncing a practice; its data and sync history are kept."""
    from nvc_pipelines.application.app import disconnect_practice

    failed = disconnect_practice(practice_id)
    click.echo(f"Disconnected {practice_id}; its data and run history are kept.")
    if failed:
        click.secho(
            f"{failed} undelivered booking(s)/note(s) marked failed: see `nvc outbox {practice_id} --needs-action`.",
            fg="yellow",
        )


@main.group(cls=_Group)
def group() -> None:
    """Practice groups: one owner's several locations, listed and exported together."""


@group.command("create")
@click.argument("group_id")
@click.option("--name", default=None, help="Display name (default: the group id).")
def group_create(group_id: str, name: str | None) -> None:
    """Create a practice group (or rename one); add its locations with `nvc group add`."""
    from nvc_pipelines.application.app import open_store

    open_store().add_group(group_id, name or group_id)
    click.echo(f"Group {group_id} ready; add locations with `nvc group add {group_id} PRACTICE_ID...`")


@group.command("add")
@click.argument("group_id")
@click.argument("practice_ids", nargs=-1, required=True)
def group_add(group_id: str, practice_ids: tuple[str, ...]) -> None:
    """Add practices to a group: they are listed and exported together (`nvc export --group GROUP_ID`)."""
    from nvc_pipelines.application.app import open_store

    store = open_store()
    for practice_id in practice_ids:
        store.set_group(practice_id, group_id)
    click.echo(f"Group {group_id}: {', '.join(store.group_practices(group_id))}")


@group.command("list")
def group_list() -> None:
    """The practice groups with their locations."""
    from nvc_pipelines.application.app import open_store

    for g in open_store().groups():
        click.echo(f"{g['group_id']:20} {g['display_name']:30} {', '.join(g['practices']) or '(no locations)'}")


@main.command("sync")
@click.argument("practice_id")
@click.option("--full", is_flag=True, help="Read everything and reconcile, instead of what changed.")
@click.option("--allow-drop", is_flag=True, help="Accept a full read that deactivates many patients.")
@click.option("--verbose", is_flag=True, help="Show Dagster's own log of the run, stack traces included.")
def sync(practice_id: str, full: bool, allow_drop: bool, verbose: bool) -> None:
    """Sync a practice now ("Sync Now"): materialise its partition, recorded in the Dagster run history.

    A PMS that does not answer fails the sync within seconds, its cause named once (the nightly
    schedule retries for longer); waits between tries are shown as they happen."""
    from nvc_pipelines.application.app import sync_practice

    click.echo(f"Syncing {practice_id}{' (full)' if full else ''}...")
    print_outcome(practice_id, sync_practice(practice_id, full=full, allow_drop=allow_drop, verbose=verbose))


@main.command("export")
@click.argument("practice_id", required=False)
@click.option("--group", "group_id", default=None, help="Export every location of a practice group together.")
@click.option("--patient", "patient_ref", default=None, help="Only this patient (PMS id): data portability.")
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
def export(
    practice_id: str | None, group_id: str | None, patient_ref: str | None, fmt: str, output: Path | None
) -> None:
    """Everything held about a practice's patients (and its rejected rows), as JSON or CSV.

    CSV writes patients to OUTPUT and rejected rows beside it as <name>-rejected.csv.
    """
    from nvc_pipelines.application.app import export_document, write_csv, write_json

    if bool(practice_id) == bool(group_id):
        _fail("give a PRACTICE_ID or --group GROUP_ID")
    # Written a row at a time as the store reads them: a large practice's export holds a batch of rows.
    # The files are opened first (a path that cannot be written is refused before anything is read or
    # audited) and appear only when complete.
    paths = [output] if output else []
    if output and fmt == "csv":
        paths.append(output.with_name(output.stem + "-rejected.csv"))
    try:
        with ExitStack() as files:
            outs = [files.enter_context(_output_file(path, fmt)) for path in paths]
            if fmt == "json":
                counts = write_json(
                    export_document(practice_id, group_id, patient_ref), outs[0] if outs else sys.stdout
                )
                patients, rejected = counts.get("patients", 0), counts.get("rejected_rows", 0)
            else:
                document = export_document(practice_id, group_id, patient_ref, sections=("patients", "rejected_rows"))
                patients, rejected = write_csv(document, outs[0] if outs else sys.stdout, outs[1] if outs else None)
    except BrokenPipeError:  # `nvc export ... | head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter flushes stdout at exit
        return
    except OSError as exc:
        # The operator's path, not the temporary file beside it that failed (`files.atomic_write`).
        _fail(f"cannot write the export to {output or 'standard output'}: {exc.strerror or exc}")
    if output:
        click.echo(f"Exported {patients} patients and {rejected} rejected rows.", err=True)


def _output_file(path: Path, fmt: str) -> AbstractContextManager[IO[str]]:
    """Where an export goes: a file written whole or not at all (`files.atomic_write`), or a device or
    pipe (`/dev/stdout`, `>(gzip > f)`) written as it comes."""
    encoding, newline = ("utf-8-sig", "") if fmt == "csv" else ("utf-8", None)
    if path.exists() and not path.is_file():
        return path.open("w", encoding=encoding, newline=newline)
    return atomic_write(path, encoding=encoding, newline=newline)


@main.command("csv-template")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), required=False)
def csv_template(path: Path | None) -> None:
    """Write the CSV import template: every column the importer reads, with example rows (to PATH or stdout)."""
    from resources.csv_source import template_text

    if path:
        path.write_text(template_text(), encoding="utf-8")
        click.echo(f"Wrote {path}")
    else:
        click.echo(template_text(), nl=False)


@main.command("sync-now")
@click.argument("practice_id")
@click.option("--url", default="http://127.0.0.1:3000", show_default=True, help="The Dagster webserver.")
def sync_now(practice_id: str, url: str) -> None:
    """Launch the practice's sync on a running webserver (as the UI's Materialize does)."""
    from nvc_pipelines.application.app import sync_now_remote

    run_id, link = sync_now_remote(practice_id, url)
    click.echo(f"Launched run {run_id}\n{link}")


@main.command("sync-log")
@click.argument("practice_id")
@click.option("--limit", default=20, show_default=True)
def sync_log_cmd(practice_id: str, limit: int) -> None:
    """The practice's sync history, from the Dagster run history (newest first)."""
    from datetime import UTC, datetime

    from nvc_pipelines.application.app import sync_log
    from nvc_pipelines.application.instance import get_instance
    from schedules.runs import reap_dead_runs

    _known(practice_id)
    reap_dead_runs(get_instance())  # a killed `nvc sync` shows as failed, not STARTED
    rows = sync_log(practice_id, limit)
    if not rows:
        click.echo(f"No runs yet for {practice_id}.")
    for r in rows:
        when = datetime.fromtimestamp(r["started"], UTC).strftime("%Y-%m-%d %H:%M:%S") if r["started"] else "-"
        took = f"{r['seconds']:.1f}s" if r["seconds"] is not None else "-"
        line = f"{when}  {r['status']:9} {r['job']:18} trigger={r['trigger']:9} {took:>7}  {r['run_id']}"
        click.secho(line, fg="red" if r["status"] == "FAILURE" else None)
        if r["error"]:
            click.echo(f"    {r['error']}")


@main.command("clinicians")
@click.argument("practice_id")
@click.option("--refresh", is_flag=True, help="Read them from the PMS and check the GOC register now.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def clinicians_cmd(practice_id: str, refresh: bool, fmt: str) -> None:
    """The practice's clinicians with their GOC registration: who a booking may name."""
    from nvc_pipelines import goc
    from nvc_pipelines.application.app import refresh_clinicians

    store = _known(practice_id)
    if refresh:
        refresh_clinicians(practice_id)
    rows = goc.load(store, practice_id, listed_only=True)
    if fmt == "json":
        out = [
            {
                "clinician_ref": c.pms_clinician_ref,
                "name": c.name,
                "role": c.role,
                "goc_number": c.goc_number,
                "state": str(c.state),
                "registrant_type": c.registrant_type,
                "may_sight_test": c.may_sight_test,
                "reason": c.reason,
                "checked_at": _iso(c.checked_at),
            }
            for c in rows
        ]
        click.echo(json.dumps(out, indent=2))
        return
    if not rows:
        click.echo(f"No clinicians known for {practice_id}: sync it (or its PMS lists none).")
        return
    _table(
        ("REF", "NAME", "GOC", "STATE", "SIGHT TESTS", "WHY"),
        [
            (
                c.pms_clinician_ref,
                c.name or c.register_name or "",
                c.goc_number or "-",
                str(c.state),
                "yes" if c.may_sight_test else "no",
                c.reason,
            )
            for c in rows
        ],
    )
    flagged = sum(1 for c in rows if c.flagged)
    if flagged:
        click.echo(f"{flagged} clinician(s) flagged: a booking naming them fails before it reaches the PMS.")
