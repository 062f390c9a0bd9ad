"""The one retry policy: which PMS problems a later attempt may fix, and how long each layer waits.

Three layers retry, from the inside out, and all read their problems from here so they cannot
disagree: a PMS client retries a write within one call (seconds: `write_wait`), a sync step is
re-run by Dagster (minutes: `step_wait`), and the outbox re-delivers a row on a later run (up to
half an hour apart: `outbox_backoff`). Reads are retried inside `resources.http.PmsHttp` on the
HTTP status alone, before any problem code exists.

This is core (no Dagster, no PMS client), so the outbox may use it; `resources` and `assets` import it.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta

# Clear by themselves within seconds to minutes: the PMS was down, slow, throttling, its connector
# offline, or its answer was lost. Retried within a write, by a sync step and by the outbox.
TRANSIENT_PROBLEMS = frozenset(
    {
        "unreachable",
        "pms_error",
        "rate_limited",
        "lost_response",
        "connector_offline",
        "connector_timeout",
        "register_unavailable",  # the GOC register, asked before a booking naming a clinician
    }
)
# Fixed by people (a renewed certificate or a CA bundle, a corrected server clock), often within the
# outbox's window: a booking made on a call waits for that rather than failing at once. A sync step
# does not retry them (its next scheduled run will), nor does a write within its call.
FIXED_BY_PEOPLE = frozenset({"tls_certificate", "session_expired"})
# A booking naming a clinician before the practice's clinicians were read waits for its next sync.
OUTBOX_RETRY_PROBLEMS = TRANSIENT_PROBLEMS | FIXED_BY_PEOPLE | {"clinicians_not_read"}


def is_transient(problem: str) -> bool:
    """Whether retrying soon (within a call or a sync step) may succeed where this attempt failed."""
    return problem in TRANSIENT_PROBLEMS


def outbox_retries(problem: str) -> bool:
    """Whether the outbox keeps a row pending (until its last attempt) rather than failing it."""
    return problem in OUTBOX_RETRY_PROBLEMS


# --- a write within one client call ----------------------------------------------------------------

# The cap on the wait between two tries of one write. Short, because the outbox is the long retry:
# a call that holds a run for minutes helps no one.
WRITE_BACKOFF_CAP_SECONDS = 10.0


def write_wait(retry: int, base_seconds: float, retry_after: float | None = None) -> float:
    """Seconds before try `retry + 1` of a write: the PMS's `Retry-After` when it sent one (already
    bounded by `resources.http`), else `base * 2**(retry-1)` capped at `WRITE_BACKOFF_CAP_SECONDS`,
    plus up to `base` of jitter so practices sharing a PMS do not retry in step."""
    if retry_after is not None:
        return retry_after
    return min(WRITE_BACKOFF_CAP_SECONDS, base_seconds * 2.0 ** max(retry - 1, 0)) + random.uniform(0, base_seconds)


# --- a sync step ------------------------------------------------------------------------------------

# A PMS that is briefly down or throttling gets two more tries with backoff before the run fails.
STEP_RETRIES = 2


# Tries per PMS request when someone waits at a shell (`nvc sync`, `nvc practice connect`, the demo):
# a PMS that does not answer fails in seconds, and the scheduled runs keep their longer patience.
INTERACTIVE_ATTEMPTS = 2


def retry_base_seconds() -> float:
    """`NVC_RETRY_BASE_SECONDS` (default 30): the first wait before retrying a sync step."""
    return float(os.environ.get("NVC_RETRY_BASE_SECONDS", "30"))


def step_retries(problem: str, retry_number: int) -> bool:
    """Whether a sync step that failed with `problem` on retry `retry_number` is run again."""
    return is_transient(problem) and retry_number < STEP_RETRIES


def step_wait(retry_number: int) -> float:
    """Seconds before re-running a sync step: 30 s, then 60 s (with the default base)."""
    return retry_base_seconds() * 2.0**retry_number


# --- the outbox -------------------------------------------------------------------------------------

OUTBOX_MAX_ATTEMPTS = 8
OUTBOX_BASE_BACKOFF = timedelta(seconds=5)
OUTBOX_MAX_BACKOFF = timedelta(minutes=30)


def outbox_backoff(attempts: int) -> timedelta:
    """How long a row waits after its `attempts`-th failed delivery: 5 s doubling, at most 30 minutes."""
    return min(OUTBOX_BASE_BACKOFF * (1 << max(attempts - 1, 0)), OUTBOX_MAX_BACKOFF)
