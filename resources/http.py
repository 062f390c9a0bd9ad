"""The HTTP client every cloud/server PMS shares: TLS, timeouts, retries that honour `Retry-After`,
the failures every such PMS reports alike (`translate_common`, worded per PMS by `FailureWords`),
and the settings every such resource takes (`HttpPmsResource`).

Only idempotent reads are retried automatically; writes go through `resources.base`'s
`write_exactly_once`, which looks before retrying (a PMS without idempotency keys must not get a second booking).

Transport security: certificates are always verified (chain and host name), TLS 1.2 is the floor
and TLS 1.3 is negotiated whenever the server offers it; plain `http://` is only accepted to this
machine itself (the sandboxes). A practice-hosted server with a private CA is trusted through an
explicit CA bundle (`ca_bundle`, a setting every HTTP PMS accepts), never by turning verification
off; with a bundle, only the CAs in it are trusted for that connection. A refused certificate is its
own problem (`tls_certificate`), never retried. Redirects are not followed (one to `http://` would leak).
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable, Collection, Generator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from dagster import ConfigurableResource
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from nvc_pipelines.model import Practice
from resources.protocol import PmsConnectionFailed, PmsError

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER_SECONDS = 60.0
CA_BUNDLE_SETTING = "ca_bundle"
# The problem code of a refused server certificate or an unusable CA bundle: an operator fixes it, so
# it is not retried (unlike `unreachable`).
TLS_PROBLEM = "tls_certificate"
CHECK_CA_BUNDLE = "the ca_bundle setting: a PEM file on this server holding the practice's own CA certificate"

Fail = Callable[[str, str, str], PmsError]


class UnsafeUrl(ValueError):
    """A PMS URL that would send patient data or secrets in clear, or is not a URL at all."""


class CaBundleError(ValueError):
    """The CA bundle given for a practice's server is missing or holds no usable certificate."""


@dataclass(slots=True)
class HttpStatusError(Exception):
    """The PMS answered with an error status; `body` is its parsed JSON (or text) for the dialect to read."""

    status: int
    body: Any
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"HTTP {self.status}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _shown(url: str) -> str:
    """`url` as messages may quote it: no user name, password, query or fragment (they may hold a token)."""
    parts = urlsplit(url.strip())
    try:
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        host = f"[{host}]" if ":" in host else host
    except ValueError:
        host, port = parts.netloc.rpartition("@")[2], ""
    if not parts.scheme:
        return repr(url.strip().split("?", 1)[0].split("#", 1)[0].rpartition("@")[2])
    return repr(urlunsplit((parts.scheme, host + port, parts.path, "", "")))


def check_url(url: str) -> str:
    """Return `url` without a trailing slash if it is https, or http on loopback (the sandboxes).

    A URL carrying a user name or password (`https://user:pass@host`) is refused too: secrets belong
    in the encrypted secrets, not in a setting that messages and logs quote. Refusals never quote the
    URL's user name, password, query or fragment."""
    parts = urlsplit(url.strip())
    try:
        hostname = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise UnsafeUrl(f"{_shown(url)} is not a valid web address") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise UnsafeUrl(f"{_shown(url)} is not a web address; it must start with https://")
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrl(
            f"the address {_shown(url)} carries a user name or password; give the address alone and the "
            "login as the practice's secrets"
        )
    if parts.scheme == "http" and not is_loopback(hostname):
        raise UnsafeUrl(f"{_shown(url)} uses plain http://; patient data must travel over https://")
    return url.strip().rstrip("/")


def tls_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """Certificate verification on, TLS 1.2 at least (1.3 negotiated where the server has it).

    `ca_bundle` (a PEM file) replaces the system CAs for this connection: a practice's own server with
    a private CA is trusted through it, and nothing else about verification changes. It is read
    afresh each time (a practice may replace it); the system CAs' context is made once a process."""
    if ca_bundle is None:
        return _system_tls_context()
    path = Path(ca_bundle).expanduser()
    if not path.is_file():
        raise CaBundleError(f"the CA bundle {str(path)!r} does not exist or is not a file")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(path))
    except ssl.SSLError as exc:
        raise CaBundleError(f"the CA bundle {str(path)!r} holds no usable PEM certificate ({exc})") from None
    if not ctx.get_ca_certs():
        raise CaBundleError(f"the CA bundle {str(path)!r} holds no CA certificate")
    return _hardened(ctx)


@cache
def _system_tls_context() -> ssl.SSLContext:
    """One context on the system CAs for the process: loading them took about 35 ms, and a sync opens
    a client for each of its four streams (a batch, for each of its practices). Its clients share it
    as one client's connections always shared its own (httpcore sets the same ALPN list on it at each
    connect). A change to the system CA store is seen by the next run process."""
    return _hardened(ssl.create_default_context(ssl.Purpose.SERVER_AUTH))


def _hardened(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def ca_bundle_of(settings: Mapping[str, str]) -> str | None:
    """The practice's optional `ca_bundle` setting (a PEM file path), or None to trust the system CAs."""
    return (settings.get(CA_BUNDLE_SETTING) or "").strip() or None


def is_certificate_failure(exc: BaseException) -> bool:
    """Whether a transport failure is the server's certificate being refused: retrying cannot fix it,
    and "unreachable" would send the operator to the firewall instead of the certificate."""
    cause: BaseException | None = exc
    for _ in range(8):  # httpx -> httpcore -> ssl; bounded, so a cyclic chain cannot loop
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc).upper()


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_SECONDS)
    except ValueError:
        return None


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, HttpStatusError):
        return exc.status in RETRYABLE_STATUS
    return isinstance(exc, httpx.TransportError) and not is_certificate_failure(exc)


class SecretAuth(httpx.Auth):
    """Sends `Authorization: <scheme> <secret>` per request, so the secret is never part of the
    client's default headers or of any repr (a log line or a traceback would show it)."""

    def __init__(self, scheme: str, secret: str):
        self._header = f"{scheme} {secret}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request

    def __repr__(self) -> str:
        return "SecretAuth(<redacted>)"


class PmsHttp:
    """A small JSON-over-HTTP client bound to one PMS base URL."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str] | None = None,
        auth: httpx.Auth | None = None,
        timeout_seconds: float = 30.0,
        max_attempts: int = 5,
        backoff_seconds: float = 0.5,
        transport: httpx.BaseTransport | None = None,
        on_retry: Callable[[str], None] | None = None,
        ca_bundle: str | None = None,
    ):
        """`ca_bundle`: a PEM file of the CA(s) that signed a practice-hosted server's certificate (a
        private CA); default None trusts the system CAs. Verification is never switched off."""
        self.base_url = check_url(base_url)
        self.ca_bundle = ca_bundle
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.on_retry = on_retry
        self.client = httpx.Client(
            base_url=self.base_url,
            headers={"Accept": "application/json", "User-Agent": "nvc-pipelines/0.1", **(headers or {})},
            auth=auth,
            timeout=httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 10.0)),
            verify=tls_context(ca_bundle),
            transport=transport,
            follow_redirects=False,
        )

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, HttpStatusError) and exc.retry_after is not None:
            return exc.retry_after
        return wait_exponential_jitter(initial=self.backoff_seconds, max=30.0, jitter=self.backoff_seconds)(state)

    def _before_sleep(self, state: RetryCallState) -> None:
        if self.on_retry and state.outcome is not None:
            wait = state.next_action.sleep if state.next_action else 0.0
            self.on_retry(
                f"attempt {state.attempt_number} of {self.max_attempts} failed ({state.outcome.exception()}); "
                f"retrying in {wait:.1f} s"
            )

    def request(self, method: str, path: str, *, retry: bool, **kwargs: Any) -> Any:
        """Send one request; parse JSON; raise `HttpStatusError` for an error status."""

        def once() -> Any:
            response = self.client.request(method, path, **kwargs)
            if response.status_code >= 400:
                try:
                    body: Any = response.json()
                except ValueError:
                    body = response.text[:500]
                raise HttpStatusError(response.status_code, body, _retry_after(response))
            if not response.content:
                return None
            return response.json()

        if not retry:
            return once()
        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(_is_retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        return retrying(once)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, retry=True, params={k: v for k, v in params.items() if v is not None})

    def close(self) -> None:
        self.client.close()


# --- failures every HTTP PMS shares ------------------------------------------------------------------


def attempts_text(count: int) -> str:
    """`5 attempts` / `1 attempt`, as the messages quote how hard NVC tried."""
    return f"{count} attempt{'s' if count != 1 else ''}"


@dataclass(frozen=True, slots=True)
class FailureWords:
    """How one PMS is named in the failures every HTTP PMS shares, so each message reads naturally
    ("the Optisoft relay answered HTTP 503") while the logic stays in one place."""

    pms: str  # in "(Optix said: ...)"
    throttler: str  # who "kept rate-limiting requests": "Optix", "the relay"
    answerer: str  # who "answered HTTP 503": "Optix", "the Acuitas server"
    place: str  # before the address in "could not connect to ...": "" or "the Acuitas server at "
    heavy_user: str  # "whether another integration is using <the same API key> heavily"
    url_setting: str  # the setting holding the address: "api_url", "server_url"
    check_url: str  # what to check when the address cannot be reached
    check_server_error: str  # what to check on a 5xx, before "; the next sync will retry"
    tls_owner: str  # whose certificate: "the practice server's", "the Optix API's"

    def said(self, code: str, detail: str) -> str:
        """` (Optix said: code: detail)`, or "" when the PMS said nothing useful."""
        return f" ({self.pms} said: {code}{': ' if code and detail else ''}{detail})" if code or detail else ""

    @property
    def check_tls(self) -> str:
        return (
            f"{self.tls_owner} TLS certificate: it must be valid for the host name in {self.url_setting} and issued "
            "by a trusted certificate authority (a self-signed certificate is refused); a certificate from a "
            "private CA (the practice's own, or a TLS-inspecting proxy's) is trusted only through the ca_bundle "
            "setting, a PEM file of that CA on this server"
        )


def open_http(
    base_url: str,
    fail: Fail,
    *,
    check_unsafe: str,
    unsafe_message: str | None = None,
    ca_bundle: str | None = None,
    **options: Any,
) -> PmsHttp:
    """A `PmsHttp` for one practice; an unsafe address (`unsafe_url`) or an unusable CA bundle
    (`tls_certificate`) is raised through `fail` as that practice's problem, before any request."""
    try:
        return PmsHttp(base_url, ca_bundle=ca_bundle, **options)
    except UnsafeUrl as exc:
        raise fail("unsafe_url", unsafe_message or f"{exc}.", check_unsafe) from None
    except CaBundleError as exc:
        raise fail(TLS_PROBLEM, f"{exc}.", CHECK_CA_BUNDLE) from None


def translate_common(
    exc: Exception, http: PmsHttp, words: FailureWords, fail: Fail, *, said: str = ""
) -> PmsError | None:
    """The failures every HTTP PMS shares, as problems: a refused certificate (`tls_certificate`), no
    answer (`unreachable`), 429 after retries (`rate_limited`) and 5xx (`pms_error`).

    Returns None for any other status, for the dialect to read. `said` is what the PMS said (from
    `words.said`). A resource calls this before its own status cases; an error code that names its
    problem whatever the status (Optisoft's connector reports itself with 503/504) is read first.
    """
    if not isinstance(exc, HttpStatusError):
        text = f"{type(exc).__name__}: {exc}"
        if is_certificate_failure(exc):
            return fail(TLS_PROBLEM, f"the TLS certificate of {http.base_url} was refused ({text}).", words.check_tls)
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            what = "could not connect to"
        elif isinstance(exc, httpx.TimeoutException):
            what = "timed out waiting for"
        else:
            what = "lost the connection to"
        return fail("unreachable", f"{what} {words.place}{http.base_url} ({text}).", words.check_url)
    attempts = attempts_text(http.max_attempts)
    if exc.status == 429:
        return fail(
            "rate_limited",
            f"{words.throttler} kept rate-limiting requests after {attempts}{said}.",
            f"whether another integration is using {words.heavy_user} heavily; the next sync will retry",
        )
    if exc.status >= 500:
        return fail(
            "pms_error",
            f"{words.answerer} answered HTTP {exc.status} after {attempts}{said}.",
            f"{words.check_server_error}; the next sync will retry",
        )
    return None


class HttpPmsResource(ConfigurableResource):
    """What every HTTP PMS resource is configured with (once per deployment; a PMS may change the
    defaults), and the per-practice `ca_bundle` setting every one of them accepts."""

    timeout_seconds: float = 30.0
    max_attempts: int = 5
    page_size: int = 100
    backoff_seconds: float = 0.5

    def optional_settings(self) -> tuple[str, ...]:
        # ca_bundle: a private CA's PEM file (a practice's own, or a TLS-inspecting proxy's); only it is trusted.
        return (CA_BUNDLE_SETTING,)

    def required_settings(self) -> tuple[str, ...]:
        return ()

    def required_secrets(self) -> tuple[str, ...]:
        return ()

    def required_values(
        self,
        practice: Practice,
        credentials: Mapping[str, str],
        pms: str,
        checks: Mapping[str, str],
        *,
        verbatim: Collection[str] = (),
    ) -> dict[str, str]:
        """The practice's `required_settings()` and `required_secrets()` by name, checked in one place:
        the first one missing (or blank) fails the connection as `missing_setting` / `missing_secret`
        with `checks[name]`, what the practice should check. Values are stripped, except a secret in
        `verbatim` (a password may really start or end with a space)."""
        values: dict[str, str] = {}
        for names, source, problem, verb in (
            (self.required_settings(), practice.settings, "missing_setting", "set"),
            (self.required_secrets(), credentials, "missing_secret", "stored"),
        ):
            for name in names:
                raw = source.get(name) or ""
                if not raw.strip():
                    raise PmsConnectionFailed(
                        pms, practice.practice_id, problem, f"no {name} is {verb}.", checks.get(name, "")
                    )
                values[name] = raw if name in verbatim else raw.strip()
        return values

    def client_options(self, practice: Practice) -> dict[str, Any]:
        """The options every HTTP PMS client takes: this deployment's, and the practice's CA bundle."""
        return {
            "page_size": self.page_size,
            "timeout_seconds": self.timeout_seconds,
            "max_attempts": self.max_attempts,
            "backoff_seconds": self.backoff_seconds,
            "ca_bundle": ca_bundle_of(practice.settings),
        }
