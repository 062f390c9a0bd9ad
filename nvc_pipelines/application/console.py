"""What the shell prints: shared by the CLI and the demo, so neither imports the other."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click


def fail(message: str) -> None:
    """One red line on standard error and exit 1: an operator never sees a stack trace for a known error."""
    click.secho(f"Error: {message}", fg="red", err=True)
    sys.exit(1)


def print_outcome(practice_id: str, outcome: Any) -> None:
    """What a sync did, asset by asset (zero counts of reasons left out), then success or the error."""
    for asset_name, meta in outcome.metadata.items():
        shown = {
            k: v
            for k, v in meta.items()
            if not isinstance(v, dict | list)
            and k != "rejection_reasons"
            and not (k.startswith("not_listed_") and not v)
        }
        click.echo(f"  {asset_name}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    if outcome.success:
        click.secho(f"Synced {practice_id} (run {outcome.run_id})", fg="green")
    else:
        fail(f"sync of {practice_id} failed (run {outcome.run_id}): {outcome.error}")


class _PmsWaits(logging.StreamHandler):
    """Prints the PMS clients' retry lines ("attempt 1 of 2 failed (...); retrying in 0.6 s")."""


def show_pms_waits() -> None:
    """Show an operator at a shell each wait for a PMS as it happens, on standard error, once per
    command (the PMS clients log them under `resources.<pms>`)."""
    log = logging.getLogger("resources")
    for handler in [h for h in log.handlers if isinstance(h, _PmsWaits)]:
        log.removeHandler(handler)
    handler = _PmsWaits(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
