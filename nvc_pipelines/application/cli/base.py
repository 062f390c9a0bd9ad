"""The `nvc` group itself: operators' errors as one red line, and the helpers its commands share."""

from __future__ import annotations

import click

from nvc_pipelines.application.console import fail, show_pms_waits

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
