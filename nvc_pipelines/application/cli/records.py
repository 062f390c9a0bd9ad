"""Patients' records and their history: rejected rows, duplicates and merges, the audit log,
erasure, and alerts."""

from __future__ import annotations

import json

import click

from nvc_pipelines.application.cli.base import _known, main


@main.command("rejected")
@click.argument("practice_id")
def rejected_cmd(practice_id: str) -> None:
    """Rows the practice's last syncs could not import, with the reason for each."""

    rows = [row for _section, row in _known(practice_id).export_rows(practice_id, sections=("rejected_rows",))]
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
    from nvc_pipelines.application.app import actor

    merge_id = _known(practice_id).merge_patients(practice_id, keep_id, merged_id, actor())
    click.echo(
        f"Merged {merged_id} into {keep_id} (merge {merge_id}; undo with `nvc unmerge {practice_id} {merge_id}`)"
    )


@main.command("unmerge")
@click.argument("practice_id")
@click.argument("merge_id", type=int)
def unmerge_cmd(practice_id: str, merge_id: int) -> None:
    """Undo a merge."""
    from nvc_pipelines.application.app import actor

    _known(practice_id).undo_merge(practice_id, merge_id, actor())
    click.echo(f"Undid merge {merge_id}")


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
    from nvc_pipelines.application.app import actor
    from nvc_pipelines.erasure import erase_patient

    store = _known(practice_id)  # a mistyped practice is refused before the question is asked
    if not yes:
        click.confirm(
            f"Erase patient {patient_ref} of {practice_id} from NVC's store? This cannot be undone", abort=True
        )

    def waiting() -> None:
        click.echo(
            f"A sync of {practice_id} is writing; the erasure waits for it to commit, then deletes what it "
            "wrote too (up to NVC_STATEMENT_TIMEOUT_SECONDS; Ctrl-C cancels, nothing erased)...",
            err=True,
        )

    removed = erase_patient(store, practice_id, patient_ref, actor(), on_wait=waiting)
    click.echo("Erased: " + ", ".join(f"{k}={v}" for k, v in removed.items() if v))
    click.echo("A suppression (keyed hash, no personal data) keeps them out of future syncs. The PMS is unchanged.")


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
