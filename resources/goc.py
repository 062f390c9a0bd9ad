"""The General Optical Council register, reached like every other outside system: a resource
(configured once per deployment: `register_url`, from `NVC_GOC_REGISTER_URL`) and a small client
over the shared HTTP plumbing (`resources.http.PmsHttp`: TLS, timeouts, retries honouring Retry-After).

The API is modelled (`sandboxes/goc.py`; the real register publishes none): `GET
{register_url}/api/registrants/{number}/` -> `{"registration_number", "name", "registrant_type",
"status"}`, 404 for a number that is not on it. What the answers mean for bookings is
`nvc_pipelines.goc`'s; this module only asks.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx
from dagster import ConfigurableResource, EnvVar

from nvc_pipelines.goc import RegisterEntry, RegisterUnavailable
from resources.http import CaBundleError, HttpStatusError, PmsHttp, UnsafeUrl

API_PATH = "/api/registrants"


class GocRegister:
    """One connection to the register; `lookup` is `nvc_pipelines.goc.Lookup`."""

    def __init__(
        self,
        register_url: str | None,
        *,
        timeout_seconds: float = 10.0,
        max_attempts: int = 3,
        backoff_seconds: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ):
        self.http: PmsHttp | None = None
        self.problem = ""
        if not (register_url or "").strip():
            self.problem = "no GOC register is configured (NVC_GOC_REGISTER_URL)"
            return
        try:
            self.http = PmsHttp(
                register_url or "",
                timeout_seconds=timeout_seconds,
                max_attempts=max_attempts,
                backoff_seconds=backoff_seconds,
                transport=transport,
            )
        except (UnsafeUrl, CaBundleError) as exc:
            self.problem = f"the GOC register URL cannot be used: {exc}"

    @property
    def warning(self) -> str:
        """What an operator must learn at once when the register cannot be asked at all ("" when it can)."""
        if not self.problem:
            return ""
        return (
            f"{self.problem}: every clinician stays unverified, and a booking naming one waits "
            "(register_unavailable) and then dead-letters"
        )

    def lookup(self, number: str) -> RegisterEntry | None:
        """The register's entry for a GOC number, None when it is not on the register."""
        if self.http is None:
            raise RegisterUnavailable(self.problem)
        try:
            body = self.http.get(f"{API_PATH}/{quote(number, safe='')}/")
        except HttpStatusError as exc:
            if exc.status in (400, 404):
                return None
            raise RegisterUnavailable(f"the GOC register answered HTTP {exc.status}") from None
        except httpx.TransportError as exc:
            raise RegisterUnavailable(f"the GOC register at {self.http.base_url} did not answer ({exc})") from None
        if not isinstance(body, dict) or not body.get("status"):
            raise RegisterUnavailable("the GOC register sent an answer without a status")
        return RegisterEntry(
            number=str(body.get("registration_number") or number),
            name=str(body.get("name") or ""),
            registrant_type=str(body.get("registrant_type") or "").lower().replace(" ", "_"),
            status=str(body.get("status")).lower(),
        )

    def close(self) -> None:
        if self.http is not None:
            self.http.close()

    def __enter__(self) -> GocRegister:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GocRegisterResource(ConfigurableResource):
    """The register for the whole deployment; with no `register_url` every check is `unverified`
    (and a booking naming a clinician waits, `register_unavailable`, until one is configured)."""

    register_url: str | None = None
    timeout_seconds: float = 10.0
    max_attempts: int = 3
    backoff_seconds: float = 0.5

    def open(self) -> GocRegister:
        # Outside a Dagster run (`nvc clinicians --refresh`, `nvc practice connect`) an `EnvVar` is
        # not resolved for us: it would be taken for the URL itself.
        url = self.register_url.get_value() if isinstance(self.register_url, EnvVar) else self.register_url
        return GocRegister(
            url,
            timeout_seconds=self.timeout_seconds,
            max_attempts=self.max_attempts,
            backoff_seconds=self.backoff_seconds,
        )
