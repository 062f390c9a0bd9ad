"""What every HTTP PMS client does alike, so each PMS module keeps only its dialect.

- **Errors as a table.** A client lists its `ErrorRule`s (HTTP status, the PMS's error code, reads
  or writes -> problem code, message, what to check); `PmsClientBase._translate` reads them around
  the failures every HTTP PMS shares (`resources.http.translate_common`). No PMS keeps an if-chain.
- **Secrets out of every message and log line** (`_secrets`, `_scrub`), and one `_get`, `close`.
- **One exactly-once write** (`write_exactly_once`): look the record up by NVC's marker before
  creating it and after any answer that may hide a landed write, with one backoff policy
  (`nvc_pipelines.retry.write_wait`) and one meaning of `created` (see its docstring).

Whether a failure is worth retrying is `nvc_pipelines.retry`'s call, shared with the sync and the outbox.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Self

import httpx

from nvc_pipelines.model import Appointment, ClinicalRecord, ReadResult, RecordBatch
from nvc_pipelines.retry import is_transient, write_wait
from resources.http import FailureWords, HttpStatusError, PmsHttp, attempts_text, open_http, translate_common
from resources.protocol import PmsConnectionFailed, PmsError

# Transport errors raised before a request could reach the PMS: nothing can have been written.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
# Problems a PMS reports before it acts on a write (throttled, its connector never collected it).
NOT_APPLIED = frozenset({"rate_limited", "connector_offline"})
WRITES = "write"  # `ErrorRule.on`: any write (a booking or a note)


@dataclass(frozen=True, slots=True)
class ErrorRule:
    """One row of a PMS's error table: when a failure matches, it becomes this problem.

    A rule matches when every condition it sets holds: `status` (one or several HTTP statuses),
    `code` (the PMS's own error code, one or several), `on` (None: any call; `"write"`: a booking
    or a note; `"booking"` / `"note"`: that write only). `first` rules are read before the failures
    every PMS shares, for a code that names its problem whatever the status (a connector reporting
    itself with 503). `message`, `check` and `problem` are `str.format` templates over the client's
    `_error_context()` plus `said` (" (Optix said: code: detail)" or ""), `status`, `code`, `kind`
    (booking / note) and `thing` (what the write calls itself). `connection`: a
    `PmsConnectionFailed` (the practice's setup is wrong) rather than a `PmsError` about one record.
    """

    problem: str
    message: str
    check: str
    status: int | Collection[int] | None = None
    code: str | Collection[str] | None = None
    on: str | None = None
    first: bool = False
    connection: bool = True

    def matches(self, status: int, code: str, on: str | None) -> bool:
        if self.status is not None and status not in ((self.status,) if isinstance(self.status, int) else self.status):
            return False
        if self.code is not None and code not in ((self.code,) if isinstance(self.code, str) else self.code):
            return False
        return self.on is None or (on is not None and self.on in (WRITES, on))


@dataclass(frozen=True, slots=True)
class Existing:
    """What a write's `send` returns when the PMS itself says the record was already there (Optisoft's
    connector refuses a second row with the same marker and names the first)."""

    pms_id: str


@dataclass(frozen=True, slots=True)
class Secret:
    """A stored secret to keep out of messages: matched in any case (servers echo logins as they
    like); `whole_word` for a short one (a user name) that may be part of other words."""

    value: str
    label: str
    whole_word: bool = False


class PmsClientBase:
    """The shared half of every HTTP `PmsClient`. A subclass sets `pms_name`, `words`, `errors` and
    `fallback` (its error table), opens `self.http` with `_open_http`, and says what its PMS said in
    an error body (`_reply`); it may add to `_error_context` and `_secrets`."""

    pms_name: str
    words: FailureWords
    errors: tuple[ErrorRule, ...] = ()
    # The rule for any status no row names: a request the PMS refused that NVC should not have sent.
    fallback: ErrorRule
    practice: Any
    http: PmsHttp

    def _open_http(self, url: str, check_unsafe: str, **options: Any) -> PmsHttp:
        return open_http(url, self._fail, check_unsafe=check_unsafe, on_retry=self._on_retry, **options)

    # --- secrets, messages, logs -------------------------------------------------------------------

    def _secrets(self) -> tuple[Secret, ...]:
        return ()

    def _scrub(self, text: str) -> str:
        for secret in self._secrets():
            if secret.value:
                pattern = re.escape(secret.value)
                if secret.whole_word:
                    pattern = rf"(?<![\w-]){pattern}(?![\w-])"
                text = re.sub(pattern, secret.label, text, flags=re.IGNORECASE)
        return text

    def _fail(self, problem: str, message: str, check: str = "") -> PmsConnectionFailed:
        return PmsConnectionFailed(self.pms_name, self.practice.practice_id, problem, self._scrub(message), check)

    def _error(self, problem: str, message: str, check: str = "") -> PmsError:
        return PmsError(self.pms_name, self.practice.practice_id, problem, self._scrub(message), check)

    def _on_retry(self, message: str) -> None:
        # Logged under the PMS module's name, as an operator filters logs by PMS.
        logging.getLogger(type(self).__module__).warning(
            "%s practice %s: %s", self.pms_name, self.practice.practice_id, self._scrub(message)
        )

    # --- errors ------------------------------------------------------------------------------------

    def _reply(self, body: Any) -> tuple[str, str]:
        """`(error code, what the PMS said)` from an error body; the dialect's envelope."""
        return "", str(body or "")[:200]

    def _error_context(self) -> dict[str, Any]:
        """Names the error table's templates may use besides `said`, `status`, `code`, `kind`, `thing`."""
        return {"base_url": self.http.base_url}

    def _translate(self, exc: Exception, *, on: str | None = None, thing: str = "") -> PmsError:
        """An HTTP or transport failure as a problem with what to check: the table's `first` rows,
        then the failures every HTTP PMS shares, then the table in order, then `fallback`.
        `on` is None for a read, or the write (`"booking"`, `"note"`)."""
        if not isinstance(exc, HttpStatusError):
            common = translate_common(exc, self.http, self.words, self._fail)
            assert common is not None  # every transport failure is a shared one
            return common
        code, detail = self._reply(exc.body)
        said = self.words.said(code, detail.strip().rstrip("."))
        first = [rule for rule in self.errors if rule.first]
        rule = next((r for r in first if r.matches(exc.status, code, on)), None)
        if rule is None:
            common = translate_common(exc, self.http, self.words, self._fail, said=said)
            if common is not None:
                return common
            rest = (r for r in self.errors if not r.first and r.matches(exc.status, code, on))
            rule = next(rest, self.fallback)
        names = {**self._error_context(), "said": said, "status": exc.status, "code": code}
        names |= {"kind": on or "request", "thing": thing or on or "request"}
        make = self._fail if rule.connection else self._error
        return make(rule.problem.format_map(names), rule.message.format_map(names), rule.check.format_map(names))

    def _get(self, path: str, **params: Any) -> Any:
        """A read, retried by `PmsHttp`; a failure becomes the problem the error table names."""
        try:
            return self.http.get(path, **params)
        except (HttpStatusError, httpx.TransportError) as exc:
            raise self._translate(exc) from None

    # --- the one exactly-once write ----------------------------------------------------------------

    def write_exactly_once(
        self,
        kind: str,
        what: str,
        send: Callable[[], str | Existing | None],
        find: Callable[[], str | None],
        *,
        thing: str = "",
    ) -> tuple[str, bool]:
        """Create a record once in a PMS that has no idempotency keys; returns `(PMS id, created)`.

        `send()` posts the record (carrying NVC's marker) and returns its new id, or `Existing(id)`
        when the PMS says it already had it, or None when the answer named no id; it raises the raw
        `HttpStatusError` / `httpx.TransportError`. `find()` looks the record up by the marker and
        returns its id or None. `kind` is `"booking"` or `"note"` (for the error table), `what`
        names this write in log lines and messages.

        The record is looked up first. After an answer that may hide a landed write (a lost
        response, a timeout, a 5xx) it is looked up again before sending again; after one that
        cannot (a refused connection, a 429, an offline connector) it is sent again at once. Each
        wait is `nvc_pipelines.retry.write_wait` (Retry-After, else capped exponential backoff with
        jitter); at most `http.max_attempts` sends. A 409 is looked up once too: our own landed
        send may be what holds the slot. Other refusals raise the problem the error table names.

        `created` means "this call's send made it": True when the send was confirmed, and when the
        record was found after a send of this call whose answer was lost (it was not there when
        the call began, so that send made it). False only when the record was there before this
        call's first send (an earlier call made it, or the practice did). So the outbox's
        `already_there` counts deliveries that wrote nothing, never a write whose answer was lost.
        """
        found = find()
        if found:
            return found, False
        maybe_sent = False  # a send of this call may have landed
        last: Exception | None = None
        for attempt in range(1, self.http.max_attempts + 1):
            if attempt > 1:
                retry_after = last.retry_after if isinstance(last, HttpStatusError) else None
                time.sleep(write_wait(attempt - 1, self.http.backoff_seconds, retry_after))
            try:
                answer = send()
            except (HttpStatusError, httpx.TransportError) as exc:
                last = exc
                error = self._translate(exc, on=kind, thing=thing or what)
                if isinstance(exc, HttpStatusError) and exc.status == 409:
                    found = find()  # our own earlier send may be what holds the slot
                    if found:
                        return found, maybe_sent
                if not is_transient(error.problem):
                    raise error from None
                if error.problem in NOT_APPLIED or isinstance(exc, NOT_SENT):
                    self._on_retry(f"{what}: {_describe(exc)} ({error.problem}); nothing was written, trying again")
                    continue
                maybe_sent = True
                self._on_retry(f"{what}: {_describe(exc)} ({error.problem}); looking for it before trying again")
                found = self._find_after_loss(find, what, exc)
                if found:
                    return found, True
                continue
            if isinstance(answer, Existing):
                return answer.pms_id, maybe_sent
            found = answer or find()
            if found:
                return found, True
            raise self._error(
                "pms_error", f"{self.pms_name} accepted the {what} but returned no id.", self.words.check_url
            )
        raise self._gave_up(kind, what, last, maybe_sent)

    def _find_after_loss(self, find: Callable[[], str | None], what: str, cause: Exception) -> str | None:
        try:
            return find()
        except PmsError as lookup:
            raise self._error(
                "lost_response",
                f"{self.pms_name} did not answer the {what} ({_describe(cause)}), and the look-up that would show "
                f"whether it was made failed too ({lookup.problem}); it may or may not exist.",
                "the PMS's status page; the write is safe to retry (NVC looks for its earlier attempt first)",
            ) from None

    def _gave_up(self, kind: str, what: str, last: Exception | None, maybe_sent: bool) -> PmsError:
        attempts = attempts_text(self.http.max_attempts)
        if maybe_sent and isinstance(last, httpx.TransportError) and not isinstance(last, NOT_SENT):
            return self._error(
                "lost_response",
                f"{self.pms_name} did not confirm the {what} after {attempts} ({_describe(last)}) and it was not "
                "found by its reference.",
                f"{self.words.check_url}; the write is safe to retry (NVC looks for its earlier attempt first)",
            )
        assert last is not None
        return self._translate(last, on=kind, thing=what)

    # --- reads in pages ----------------------------------------------------------------------------
    # A client that cannot page its reads yields each read whole, as one page; one that can (Optix)
    # overrides these so a sync holds one page at a time.

    def iter_patients(self, since: datetime | None, today: date) -> Iterator[ReadResult]:
        yield self.read_patients(since, today)  # type: ignore[attr-defined]

    def iter_appointments(self, since: datetime | None) -> Iterator[RecordBatch[Appointment]]:
        yield self.read_appointments(since)  # type: ignore[attr-defined]

    def iter_clinical_records(self, since: datetime | None) -> Iterator[RecordBatch[ClinicalRecord]]:
        yield self.read_clinical_records(since)  # type: ignore[attr-defined]

    # --- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _describe(exc: Exception | None) -> str:
    if exc is None:
        return "no answer"
    if isinstance(exc, HttpStatusError):
        return f"HTTP {exc.status}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
