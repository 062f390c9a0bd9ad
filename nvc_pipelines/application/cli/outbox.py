"""The outbox: what was written back to the PMS, its worklist, and retrying or dismissing a writeback."""

from __future__ import annotations

import click

from nvc_pipelines.application.cli.base import _fail, _Group, _known, _table, _when, main


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
