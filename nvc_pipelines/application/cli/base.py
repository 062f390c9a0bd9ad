"""`nvc`: the operators' shell interface. A thin face over `nvc_pipelines.application.app`; the Dagster UI stays the main one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from nvc_pipelines.application.console import fail, print_outcome, show_pms_waits
from nvc_pipelines.model import CallOutcome, PmsKind

_fail = fail


def _known_errors() -> tuple[type[BaseException], ...]:
    from nvc_pipelines.application.app import SettingsError
    from nvc_pipelines.crypto import SecretKeyError
    from nvc_pipelines.recall import RecallConfigError
    from nvc_pipelines.store import PracticeExists, PracticeNotFound, StoreUnavailable
    from nvc_pipelines.writeback import OutboxError
    from resources.gateway import UnsupportedPms
    from resources.protocol import PmsError

    return (
        ValueError,  # the store's and the model's refusals of bad ids and arguments
        SettingsError,
        OutboxError,
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
    from nvc_pipelines.store import embedded

    embedded.on_start = lambda message: click.secho(message, err=True, fg="yellow")
    show_pms_waits()


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
    for r in rows:
        last = r["last_sync_at"].strftime("%Y-%m-%d %H:%M") if r["last_sync_at"] else "never"
        read = write = "-"
        if r["status"] == "connected":
            state = practice_health(store, r)
            read, write = ("ok" if state.read_ok else "STALE"), ("ok" if state.write_ok else "WAITING")
            problems += [f"{r['practice_id']}: {d}" for ok, d in ((state.read_ok, state.read_detail),
                                                                   (state.write_ok, state.write_detail)) if not ok]  # fmt: skip
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


# --- sync and data --------------------------------------------------------------------------------


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
    from nvc_pipelines.application.app import export_csv, export_data

    if bool(practice_id) == bool(group_id):
        _fail("give a PRACTICE_ID or --group GROUP_ID")
    data = export_data(practice_id, group_id, patient_ref)
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
    """Write the CSV import template: every column the importer reads, with example rows (to PATH or stdout)."""
    from resources.csv_source import template_text

    if path:
        path.write_text(template_text(), encoding="utf-8")
        click.echo(f"Wrote {path}")
    else:
        click.echo(template_text(), nl=False)


def _known(practice_id: str):
    """The store, once `practice_id` is known to be registered: a mistyped id is one clear error and a
    non-zero exit, never an empty answer that looks like "nothing to do"."""
    from nvc_pipelines.application.app import open_store

    store = open_store()
    store.get_practice(practice_id)
    return store


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Columns as wide as their widest cell (a header row, then the rows), for people to read."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in (headers, *rows):
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _iso(value: object) -> object:
    from datetime import date, datetime

    from nvc_pipelines.calling import UK_TZ

    if isinstance(value, datetime):
        return value.astimezone(UK_TZ).isoformat()
    return value.isoformat() if isinstance(value, date) else value


def _when(value) -> str:
    from nvc_pipelines.calling import UK_TZ

    return value.astimezone(UK_TZ).strftime("%a %d %b %H:%M")


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


@main.command("call-list")
@click.argument("practice_id")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--why", "why_patient", default=None, metavar="PATIENT", help="Explain one patient (PMS id).")
@click.option(
    "--check",
    "check_phone",
    default=None,
    metavar="PHONE",
    help="Just before dialling: re-read the PMS if the list is older than a few minutes, then answer call or skip.",
)
def call_list_cmd(practice_id: str, fmt: str, why_patient: str | None, check_phone: str | None) -> None:
    """Who the AI caller phones: one entry per number, whom to ask for, when; and every due patient
    not listed with the reason (as of the last sync or call outcome)."""
    from nvc_pipelines.application.app import actor, open_store

    if check_phone is not None:
        from nvc_pipelines.application.app import check_number

        answer = check_number(practice_id, check_phone)
        if fmt == "json":
            click.echo(json.dumps({
                "answer": answer.answer, "reason": answer.reason, "phone": answer.phone, "people": list(answer.people),
                "refreshed_at": _iso(answer.refreshed_at), "stale": answer.stale}))  # fmt: skip
        else:
            click.echo(f"{answer.answer}: {answer.phone}: {answer.reason}")
        return
    store = open_store()
    if why_patient is not None:
        found = store.call_list_why(practice_id, why_patient, actor=actor())
        if fmt == "json":
            click.echo(json.dumps({k: _iso(v) for k, v in found.items()}, indent=2, ensure_ascii=False))
            return
        name = f"{found['first_name']} {found['last_name']} ({found['pms_patient_id']})"
        if found["listed"]:
            also = f", in the same call as {', '.join(found['same_call'])}" if found["same_call"] else ""
            click.echo(
                f"{name} is on the call list: {found['phone']}, ask for {found['ask_for']}, "
                f"from {_when(found['earliest_call_at'])}{also}. Due {found['due_date']}: {found['recall_reason']}."
            )
        else:
            click.echo(f"{name} is not on the call list: {found['reason_code']}. {found['detail']}.")
        return
    view = store.call_list_view(practice_id, actor=actor())
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "entries": [
                        {
                            **e,
                            "earliest_call_at": _iso(e["earliest_call_at"]),
                            "people": [{k: _iso(v) for k, v in p.items()} for p in e["people"]],
                        }
                        for e in view["entries"]
                    ],
                    "not_listed": [{k: _iso(v) for k, v in n.items()} for n in view["not_listed"]],
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return
    entries, not_listed = view["entries"], view["not_listed"]
    people = sum(len(e["people"]) for e in entries)
    click.echo(
        f"{len(entries)} number(s) to call for {people} due patient(s); {len(not_listed)} due patient(s) not listed"
    )
    rows: list[tuple[str, ...]] = []
    for e in entries:
        for i, p in enumerate(e["people"]):
            first = i == 0
            rows.append(
                (
                    e["phone"] if first else "",
                    e["ask_for"] if first else "",
                    f"{p['first_name']} {p['last_name']} ({p['pms_patient_id']})",
                    str(p["due_date"]),
                    p["reason"],
                    _when(e["earliest_call_at"]) if first else "",
                )
            )
    if rows:
        _table(("PHONE", "ASK FOR", "PEOPLE", "DUE", "REASON", "EARLIEST CALL"), rows)
    if not_listed:
        click.echo("")
        click.echo("Not listed:")
        _table(
            ("PATIENT", "DUE", "REASON", "DETAIL"),
            [
                (
                    f"{n['first_name']} {n['last_name']} ({n['pms_patient_id']})",
                    str(n["due_date"]),
                    n["reason_code"],
                    n["detail"],
                )
                for n in not_listed
            ],
        )


@main.command("recalls")
@click.argument("practice_id")
@click.option(
    "--warnings",
    "warnings_only",
    is_flag=True,
    help="Patients whose PMS recall date is later than the guideline's, for the practice to review.",
)
def recalls_cmd(practice_id: str, warnings_only: bool) -> None:
    """The practice's recalls by rule; `--warnings` lists PMS dates later than the 2002 guideline's."""
    from datetime import date

    from nvc_pipelines.application.app import open_store

    store = open_store()
    if not warnings_only:
        store.get_practice(practice_id)
        summary = store.recall_summary(practice_id, date.today())
        click.echo(
            f"{summary['total']} recall(s) for {summary['active_patients']} active patient(s): "
            f"{summary['due_now']} due now, {summary['due_30_days']} in the next 30 days; {summary['from_pms']} "
            f"from the PMS, {summary['computed']} computed; {summary['pms_later_than_guideline']} PMS date(s) "
            "later than the guideline (--warnings lists them)"
        )
        _table(("RULE", "PATIENTS"), [(rule, str(n)) for rule, n in summary["by_rule"].items()])
        return
    rows = store.recall_warnings(practice_id)
    click.echo(f"{len(rows)} patient(s) recalled later in the PMS than the guideline")
    if rows:
        _table(
            ("PATIENT", "PMS DATE", "GUIDELINE", "FLAGS"),
            [
                (
                    f"{r['first_name']} {r['last_name']} ({r['pms_patient_id']})",
                    str(r["pms_due_date"]),
                    str(r["guideline_due_date"]),
                    ", ".join(r["flags"]) or "-",
                )
                for r in rows
            ],
        )


@main.group(cls=_Group)
def contact() -> None:
    """Who may be called: lift a patient's request not to be called."""


@contact.command("allow")
@click.argument("practice_id")
@click.argument("patient_id")
@click.option("--why", default="lifted by an operator", show_default=True, help="Recorded in the audit log.")
def contact_allow(practice_id: str, patient_id: str, why: str) -> None:
    """Let a patient who asked not to be called (or was reported deceased on a call) be called again."""
    from nvc_pipelines.application.app import actor, open_store

    lifted = open_store().lift_contact_suppression(practice_id, patient_id, actor(), why)
    click.echo(f"Lifted {', '.join(lifted)} for {patient_id}; the call list was updated (audited)")


@main.command("rejected")
@click.argument("practice_id")
def rejected_cmd(practice_id: str) -> None:
    """Rows the practice's last syncs could not import, with the reason for each."""

    rows = _known(practice_id).export_practice(practice_id)["rejected_rows"]
    click.echo(f"{len(rows)} rejected row(s)")
    for r in rows:
        click.echo(f"{r['source']:22} {r['row_ref']:34} {r['reason']}")


@main.command("duplicates")
@click.argument("practice_id")
def duplicates_cmd(practice_id: str) -> None:
    """Records that look like the same person (shared phone plus name, or name plus date of birth)."""

    pairs = _known(practice_id).duplicates(practice_id)
    click.echo(f"{len(pairs)} possible duplicate(s)")
    for d in pairs:
        click.echo(f"keep {d.keep:24} merge {d.other:24} ({d.reason})  ->  nvc merge {practice_id} {d.keep} {d.other}")


@main.command("merge")
@click.argument("practice_id")
@click.argument("keep_id")
@click.argument("merged_id")
def merge_cmd(practice_id: str, keep_id: str, merged_id: str) -> None:
    """Merge MERGED_ID into KEEP_ID (PMS patient ids); audited and undoable with `nvc unmerge`."""
    from nvc_pipelines.application.app import actor, open_store

    merge_id = open_store().merge_patients(practice_id, keep_id, merged_id, actor())
    click.echo(
        f"Merged {merged_id} into {keep_id} (merge {merge_id}; undo with `nvc unmerge {practice_id} {merge_id}`)"
    )


@main.command("unmerge")
@click.argument("practice_id")
@click.argument("merge_id", type=int)
def unmerge_cmd(practice_id: str, merge_id: int) -> None:
    """Undo a merge."""
    from nvc_pipelines.application.app import actor, open_store

    open_store().undo_merge(practice_id, merge_id, actor())
    click.echo(f"Undid merge {merge_id}")


@main.group(cls=_Group)
def group() -> None:
    """Practice groups: one owner's several locations, listed and exported together."""


@group.command("create")
@click.argument("group_id")
@click.option("--name", default=None)
def group_create(group_id: str, name: str | None) -> None:
    from nvc_pipelines.application.app import open_store

    open_store().add_group(group_id, name or group_id)
    click.echo(f"Group {group_id} ready; add locations with `nvc group add {group_id} PRACTICE_ID...`")


@group.command("add")
@click.argument("group_id")
@click.argument("practice_ids", nargs=-1, required=True)
def group_add(group_id: str, practice_ids: tuple[str, ...]) -> None:
    from nvc_pipelines.application.app import open_store

    store = open_store()
    for practice_id in practice_ids:
        store.set_group(practice_id, group_id)
    click.echo(f"Group {group_id}: {', '.join(store.group_practices(group_id))}")


@group.command("list")
def group_list() -> None:
    from nvc_pipelines.application.app import open_store

    for g in open_store().groups():
        click.echo(f"{g['group_id']:20} {g['display_name']:30} {', '.join(g['practices']) or '(no locations)'}")


@main.command("audit")
@click.argument("practice_id")
@click.option("--limit", default=50, show_default=True)
def audit_cmd(practice_id: str, limit: int) -> None:
    """Who read or wrote the practice's patient data, newest first (the audit log is append-only)."""

    entries = _known(practice_id).audit_entries(practice_id, limit)
    if not entries:
        click.echo(f"No audit entries for {practice_id} yet.")
        return
    # Fixed columns first, the variable ones (records, details) last, so the columns line up.
    actor_width = max(12, *(len(e["actor"]) for e in entries))
    action_width = max(12, *(len(e["action"]) for e in entries))
    click.echo(f"{'AT':19}  {'ACTOR':{actor_width}}  {'ACTION':{action_width}}  {'RUN':8}  RECORDS / DETAIL")
    for e in entries:
        run = (e["run_id"] or "-")[:8]
        refs = f"records={','.join(e['record_refs'])} " if e["record_refs"] else ""
        click.echo(
            f"{e['at']:%Y-%m-%d %H:%M:%S}  {e['actor']:{actor_width}}  {e['action']:{action_width}}  {run:8}  "
            f"{refs}{json.dumps(e['detail'])}"
        )


@main.command("erase")
@click.argument("practice_id")
@click.argument("patient_ref")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def erase_cmd(practice_id: str, patient_ref: str, yes: bool) -> None:
    """GDPR erasure: remove a patient's personal data from NVC's store (never from the PMS) and keep
    them from being imported again."""
    from nvc_pipelines.application.app import actor, open_store
    from nvc_pipelines.erasure import erase_patient

    if not yes:
        click.confirm(
            f"Erase patient {patient_ref} of {practice_id} from NVC's store? This cannot be undone", abort=True
        )
    removed = erase_patient(open_store(), practice_id, patient_ref, actor())
    click.echo("Erased: " + ", ".join(f"{k}={v}" for k, v in removed.items() if v))
    click.echo("A suppression (keyed hash, no personal data) keeps them out of future syncs. The PMS is unchanged.")


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


@main.command("alerts")
@click.argument("practice_id", required=False)
@click.option("--limit", default=20, show_default=True)
def alerts_cmd(practice_id: str | None, limit: int) -> None:
    """Failed syncs and writebacks, writebacks that need action and the daily digest, newest first; three
    failed runs in a row, or a booking that did not reach the PMS, are critical."""
    from nvc_pipelines.alerts import recent_alerts
    from nvc_pipelines.application.app import open_store

    rows = recent_alerts(_known(practice_id) if practice_id else open_store(), practice_id, limit)
    click.echo(f"{len(rows)} alert(s)")
    for a in rows:
        click.secho(
            f"{a['raised_at']:%Y-%m-%d %H:%M} {a['severity']:8} {a['practice_id']:18} {a['job_name']:18} "
            f"x{a['consecutive']}  {a['message']}",
            fg="red" if a["severity"] == "critical" else "yellow",
        )


# --- the outbox (what the AI calling system writes) --------------------------------------------------


def _key(key: str | None, prefix: str) -> str:
    import uuid

    return key or f"{prefix}-{uuid.uuid4().hex[:16]}"


@main.group(cls=_Group)
def booking() -> None:
    """Bookings made on AI calls, written into the PMS by the writeback sensor."""


@booking.command("add")
@click.argument("practice_id")
@click.option("--patient", "patient_id", required=True, help="The patient's PMS id.")
@click.option("--start", required=True, help="Start, ISO 8601 (e.g. 2026-12-01T09:30:00+00:00; no offset = UK time).")
@click.option("--minutes", default=30, show_default=True)
@click.option("--type", "appointment_type", default="eye_test", show_default=True)
@click.option("--clinician", default=None, help="Clinician reference (Optisoft: GOC number).")
@click.option("--notes", default=None)
@click.option("--key", default=None, help="Idempotency key (default: a new one). The same key is one booking.")
def booking_add(practice_id, patient_id, start, minutes, appointment_type, clinician, notes, key) -> None:
    """Record a booking as the AI calling system does; it reaches the PMS within seconds."""
    from nvc_pipelines import writeback
    from nvc_pipelines.application.app import open_store

    key = _key(key, "bk")
    outbox_id, created = writeback.add_booking(
        open_store(), practice_id, key, patient_id, start, minutes, appointment_type, clinician, notes
    )
    click.echo(f"{'Queued' if created else 'Already queued'} booking {key} (outbox {outbox_id})")


def _call_event(
    kind: str, practice_id: str, patient_id: str, outcome: str, text: str, key: str | None, phone: str | None
) -> None:
    from nvc_pipelines import writeback
    from nvc_pipelines.application.app import actor, open_store

    key = _key(key, "call")
    outbox_id, created = writeback.add_call_event(
        open_store(), practice_id, kind, key, patient_id, text, outcome, phone=phone, actor=actor()
    )
    what = kind.replace("_", " ")
    if created:
        click.echo(
            f"Recorded {what} {key} ({outcome}); the call list reflects it now; note queued (outbox {outbox_id})"
        )
    else:
        click.echo(f"Already recorded {what} {key} (outbox {outbox_id})")


_OUTCOME = click.Choice([str(o) for o in CallOutcome])
_PHONE_HELP = "The number dialled (default: the patient's number on the call list)."


@main.group("call-attempt", cls=_Group)
def call_attempt() -> None:
    """Call attempts, as the AI calling system records them: logged in the PMS, counted on the list."""


@call_attempt.command("add")
@click.argument("practice_id")
@click.option("--patient", "patient_id", required=True)
@click.option("--outcome", type=_OUTCOME, default="no_answer", show_default=True)
@click.option("--text", "text_", default="NVC recall call attempt", show_default=True)
@click.option("--phone", default=None, help=_PHONE_HELP)
@click.option("--key", default=None)
def call_attempt_add(practice_id, patient_id, outcome, text_, phone, key) -> None:
    """Record a call attempt; its outcome changes the call list at once."""
    _call_event("call_attempt", practice_id, patient_id, outcome, text_, key, phone)


@main.group("call-outcome", cls=_Group)
def call_outcome() -> None:
    """Call outcomes, as the AI calling system records them: a note in the PMS, and the list changes."""


@call_outcome.command("add")
@click.argument("practice_id")
@click.option("--patient", "patient_id", required=True)
@click.option("--outcome", type=_OUTCOME, required=True)
@click.option("--text", "text_", required=True)
@click.option("--phone", default=None, help=_PHONE_HELP)
@click.option("--key", default=None)
def call_outcome_add(practice_id, patient_id, outcome, text_, phone, key) -> None:
    """Record what a call came to; its effect on the call list applies at once (see docs/calling.md)."""
    _call_event("call_outcome", practice_id, patient_id, outcome, text_, key, phone)


class _OutboxGroup(_Group):
    """`nvc outbox PRACTICE_ID ...` lists (as it always did); `nvc outbox retry|dismiss ID` act on one row."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@main.group("outbox", cls=_OutboxGroup)
def outbox() -> None:
    """The practice's outbox (`nvc outbox PRACTICE_ID`), its worklist (`--needs-action`), and acting on
    a writeback that needs it: `nvc outbox retry ID` after a fix, `nvc outbox dismiss ID --why TEXT`."""


def _outbox_line(r: dict) -> str:
    why = f"  {r['problem']}: {r['last_error']}" if r["status"] in ("failed", "dead_letter", "timed_out") else ""
    if r["status"] == "dismissed":
        why = f"  dismissed by {r['dismissed_by']}: {r['dismissed_why']}"
    return (
        f"{r['outbox_id']:>6} {r['kind']:13} {r['idempotency_key']:24} {r['status']:11} "
        f"attempts={r['attempts']} pms={r['pms_record_id'] or '-'}{why}"
    )


@outbox.command("list")
@click.argument("practice_id")
@click.option("--status", type=click.Choice(["pending", "sent", "confirmed", "failed", "dead_letter", "timed_out",
                                             "dismissed"]), default=None)  # fmt: skip
@click.option(
    "--needs-action", is_flag=True, help="The worklist: failed, dead-lettered and timed-out rows nobody acted on yet."
)
def outbox_list(practice_id: str, status: str | None, needs_action: bool) -> None:
    """What was written back, what is waiting, and what failed and why."""
    from nvc_pipelines import writeback

    if status and needs_action:
        _fail("give --status or --needs-action, not both")
    rows = writeback.outbox_rows(_known(practice_id), practice_id, status, needs_action=needs_action)
    if not needs_action:
        click.echo(f"{len(rows)} outbox row(s)")
        for r in rows:
            click.echo(_outbox_line(r))
        return
    if not rows:
        click.secho(f"Nothing needs action for {practice_id}.", fg="green")
        return
    click.secho(f"{len(rows)} writeback(s) need action for {practice_id}", fg="red")
    table: list[tuple[str, ...]] = []
    for r in rows:
        start = _when(r["starts_at"]) if r["starts_at"] else "-"
        ended = _when(r["finished_at"]) if r["finished_at"] else "-"
        table.append(
            (str(r["outbox_id"]), r["kind"], r["idempotency_key"], r["pms_patient_id"], start, r["status"],
             r["problem"] or "-", str(r["attempts"]), ended, r["last_error"] or "")
        )  # fmt: skip
    _table(("ID", "KIND", "KEY", "PATIENT", "APPOINTMENT", "STATUS", "PROBLEM", "ATTEMPTS", "SINCE", "ERROR"), table)
    click.echo("After fixing the cause: `nvc outbox retry ID`; to close one: `nvc outbox dismiss ID --why TEXT`.")


@outbox.command("retry")
@click.argument("outbox_id", type=int)
def outbox_retry(outbox_id: int) -> None:
    """Send a failed or dead-lettered writeback again, once its cause is fixed (audited). It cannot land
    twice: the PMS is searched for it before it is created."""
    from nvc_pipelines import writeback
    from nvc_pipelines.application.app import actor, open_store

    done = writeback.retry(open_store(), outbox_id, actor())
    click.echo(
        f"Outbox {outbox_id} ({done['kind']} {done['key']}, practice {done['practice_id']}) is pending again; "
        "the writeback sensor delivers it within seconds."
    )


@outbox.command("dismiss")
@click.argument("outbox_id", type=int)
@click.option("--why", required=True, help="Why nobody needs to act on it any more (audited).")
def outbox_dismiss(outbox_id: int, why: str) -> None:
    """Take a writeback off the worklist for good (booked by hand, patient called back...), with the reason."""
    from nvc_pipelines import writeback
    from nvc_pipelines.application.app import actor, open_store

    done = writeback.dismiss(open_store(), outbox_id, why, actor())
    click.echo(
        f"Dismissed outbox {outbox_id} ({done['kind']} {done['key']}, practice {done['practice_id']}): {why.strip()}"
    )


# --- local services -------------------------------------------------------------------------------


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
