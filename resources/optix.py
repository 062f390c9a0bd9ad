"""Optix, the cloud PMS: a practice connects with an API key and its Optix Practice ID.

Reads only. Patients come from `/api/v2/practices/{id}/patients`, paged by an opaque cursor in
`(updatedAt, patientId)` order; an incremental sync passes `updatedSince`. Every error becomes a
`PmsError` with a stable `problem` code and what the practice should check. The API key travels
only in the Authorization header: no message or log line here ever contains it.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import quote

import httpx
from dagster import ConfigurableResource

from nvc_pipelines.model import PmsKind, Practice, ReadResult
from nvc_pipelines.normalise import PatientDraft, collect
from resources.http import HttpStatusError, PmsHttp, UnsafeUrl
from resources.protocol import ConnectionInfo, PmsConnectionFailed, PmsError

log = logging.getLogger(__name__)

PMS_NAME = "Optix"
API_PREFIX = "/api/v2"

# Optix clinical flag codes -> the recall rules' flags. Other codes pass through raw and are reported.
FLAG_CODES: dict[str, str] = {
    "DIAB": "diabetic",
    "GLAU": "glaucoma",
    "GLS": "glaucoma_suspect",
    "OHT": "ocular_hypertension",
    "FHG": "glaucoma_family_history",
}

CHECK_KEY = (
    "the API key in Optix > Settings > Integrations; copy it again, a typo or an expired/revoked key is the usual cause"
)
CHECK_URL = "the api_url setting, and that this server can reach it (firewall, proxy, network)"


class _BearerAuth(httpx.Auth):
    """Adds the API key per request, so it is never part of the client's default headers or a repr."""

    def __init__(self, api_key: str):
        self._api_key = api_key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._api_key}"
        yield request

    def __repr__(self) -> str:
        return "_BearerAuth(<redacted>)"


def optix_draft(row: dict[str, Any]) -> PatientDraft:
    """Translate one Optix patient into the shared draft; unknown flag codes are kept raw."""
    contact = row.get("contact") or {}
    address = row.get("address") or {}
    flags: list[str] = []
    for code in row.get("clinicalFlags") or []:
        flag = FLAG_CODES.get(str(code).strip().upper(), str(code).strip())
        if flag and flag not in flags:
            flags.append(flag)
    parts = (address.get("line1"), address.get("line2"), address.get("town"), address.get("postcode"))
    return PatientDraft(
        pms_patient_id=str(row.get("patientId") or "") or None,
        first_name=row.get("forename"),
        last_name=row.get("surname"),
        phones=[contact.get("mobile"), contact.get("home")],
        date_of_birth=row.get("dateOfBirth"),
        email=contact.get("email"),
        address=", ".join(str(p).strip() for p in parts if p and str(p).strip()) or None,
        last_eye_test_date=row.get("lastSightTest"),
        risk_flags=flags,
        clinical_notes=row.get("notes"),
        recall_due_date=row.get("recallDue"),
        updated_at=_parse_timestamp(row.get("updatedAt")),
    )


def _parse_timestamp(raw: Any) -> datetime | None:
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(str(raw))
    except ValueError:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _since_param(since: datetime) -> str:
    """`since` as Optix wants it: UTC ISO-8601 with `Z` (a naive datetime is taken as UTC)."""
    value = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


class OptixClient:
    """One practice's Optix API connection (implements `PmsClient`)."""

    kind = PmsKind.OPTIX

    def __init__(
        self,
        practice: Practice,
        *,
        api_url: str,
        optix_practice_id: str,
        api_key: str,
        page_size: int,
        timeout_seconds: float,
        max_attempts: int,
        backoff_seconds: float,
        transport: httpx.BaseTransport | None = None,
    ):
        self.practice = practice
        self.optix_practice_id = optix_practice_id
        self.page_size = page_size
        self._secret = api_key
        try:
            self.http = PmsHttp(
                api_url,
                auth=_BearerAuth(api_key),
                timeout_seconds=timeout_seconds,
                max_attempts=max_attempts,
                backoff_seconds=backoff_seconds,
                transport=transport,
                on_retry=self._on_retry,
            )
        except UnsafeUrl as exc:
            raise self._fail(
                "unsafe_url", f"{exc}.", "the api_url setting: it must be the https:// address of the Optix API"
            ) from None
        # Accept the API root with or without the version prefix.
        self._prefix = "" if self.http.base_url.endswith(API_PREFIX) else API_PREFIX
        self._practice_path = f"{self._prefix}/practices/{quote(optix_practice_id, safe='')}"

    def __repr__(self) -> str:
        return f"OptixClient(practice={self.practice.practice_id!r}, optix_practice_id={self.optix_practice_id!r})"

    # --- errors ------------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "<api key>") if self._secret else text

    def _fail(self, problem: str, message: str, check: str = "") -> PmsConnectionFailed:
        return PmsConnectionFailed(PMS_NAME, self.practice.practice_id, problem, self._scrub(message), check)

    def _on_retry(self, message: str) -> None:
        log.warning("%s practice %s: %s", PMS_NAME, self.practice.practice_id, self._scrub(message))

    def _translate(self, exc: Exception) -> PmsError:
        """Turn an HTTP or transport failure into an error that names the problem and what to check."""
        if not isinstance(exc, HttpStatusError):
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                what = "could not connect to"
            elif isinstance(exc, httpx.TimeoutException):
                what = "timed out waiting for"
            else:
                what = "lost the connection to"
            return self._fail("unreachable", f"{what} {self.http.base_url} ({type(exc).__name__}: {exc}).", CHECK_URL)
        error = exc.body.get("error") if isinstance(exc.body, dict) else None
        code = str(error.get("code", "")) if isinstance(error, dict) else ""
        detail = str(error.get("message", "")) if isinstance(error, dict) else str(exc.body or "")[:200]
        detail = detail.strip().rstrip(".")
        attempts = f"{self.http.max_attempts} attempt{'s' if self.http.max_attempts != 1 else ''}"
        said = f" (Optix said: {code}{': ' if code and detail else ''}{detail})" if code or detail else ""
        pid = self.optix_practice_id
        if exc.status == 401:
            return self._fail("invalid_credentials", f"The API key was rejected{said}.", CHECK_KEY)
        if exc.status == 403 and code == "api_access_disabled":
            return self._fail(
                "api_access_disabled",
                f"API access is disabled for Optix practice {pid}{said}.",
                "ask the practice to enable API access in Optix settings",
            )
        if exc.status == 403:
            return self._fail("forbidden", f"Optix refused access to practice {pid}{said}.", CHECK_KEY)
        if exc.status == 404:
            return self._fail(
                "practice_not_found",
                f"Optix has no practice {pid} for this API key{said}.",
                "the practice_id setting (the Optix Practice ID, e.g. OPX-1234) and that the API key belongs to it",
            )
        if exc.status == 429:
            return self._fail(
                "rate_limited",
                f"Optix kept rate-limiting requests after {attempts}{said}.",
                "whether another integration is using the same API key heavily; the next sync will retry",
            )
        if exc.status >= 500:
            return self._fail(
                "pms_error",
                f"Optix answered HTTP {exc.status} after {attempts}{said}.",
                "Optix's status page; the next sync will retry",
            )
        return PmsError(
            PMS_NAME,
            self.practice.practice_id,
            "bad_request",
            self._scrub(f"Optix refused the request with HTTP {exc.status}{said}."),
            "this is a bug in the Optix integration; report it with this message",
        )

    def _get(self, path: str, **params: Any) -> Any:
        try:
            return self.http.get(path, **params)
        except (HttpStatusError, httpx.TransportError) as exc:
            raise self._translate(exc) from None

    # --- PmsClient ---------------------------------------------------------------------------------

    def test_connection(self) -> ConnectionInfo:
        """Read the practice record: proves the URL, the key and the Practice ID in one call."""
        body = self._get(self._practice_path)
        if not isinstance(body, dict):
            raise self._fail("pms_error", "Optix returned an unexpected practice record.", CHECK_URL)
        if body.get("apiAccess") is False:
            raise self._fail(
                "api_access_disabled",
                f"API access is disabled for Optix practice {self.optix_practice_id}.",
                "ask the practice to enable API access in Optix settings",
            )
        return ConnectionInfo(
            pms=PMS_NAME,
            practice_name=body.get("name"),
            version="api/v2",
            detail=f"Optix practice {body.get('practiceId', self.optix_practice_id)}",
        )

    def iter_patient_rows(self, since: datetime | None) -> Iterator[dict[str, Any]]:
        """Every patient page by page, following `nextCursor` to the end."""
        params: dict[str, Any] = {"limit": self.page_size}
        if since is not None:
            params["updatedSince"] = _since_param(since)
        seen_cursors: set[str] = set()
        while True:
            body = self._get(f"{self._practice_path}/patients", **params)
            if not isinstance(body, dict) or not isinstance(body.get("data"), list):
                raise self._fail("pms_error", "Optix returned a patient page without a data list.", CHECK_URL)
            for row in body["data"]:
                # A malformed row is passed on (and ends as a rejected row), never silently dropped.
                yield row if isinstance(row, dict) else {"unexpected": row}
            cursor = (body.get("pagination") or {}).get("nextCursor")
            if not cursor:
                return
            if cursor in seen_cursors:
                raise self._fail("pms_error", "Optix returned the same page cursor twice.", "Optix's status page")
            seen_cursors.add(cursor)
            params["cursor"] = cursor

    def read_patients(self, since: datetime | None, today: date) -> ReadResult:
        """Patients updated since `since` (inclusive; all when None), normalised.

        A patient edited while we page moves behind the cursor and comes back on a later page; the
        later copy is newer, so it replaces the earlier one instead of counting as a duplicate.
        """
        latest: dict[str, dict[str, Any]] = {}
        anonymous: list[dict[str, Any]] = []
        for row in self.iter_patient_rows(since):
            patient_id = str(row.get("patientId") or "")
            if patient_id:
                latest.pop(patient_id, None)
                latest[patient_id] = row
            else:
                anonymous.append(row)
        rows = [(f"optix:{pid}", raw, optix_draft(raw)) for pid, raw in latest.items()]
        rows += [(f"optix:row-without-id-{n}", raw, optix_draft(raw)) for n, raw in enumerate(anonymous, 1)]
        scope = "full" if since is None else f"since {_since_param(since)}"
        source_ref = f"optix:{self.optix_practice_id} {scope}"
        return collect(self.practice.practice_id, rows, today, strict=False, source_ref=source_ref)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> OptixClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OptixResource(ConfigurableResource):
    """Optix connections. Per practice: `practice_id` (the Optix Practice ID), optional `api_url`;
    secret: `api_key`."""

    timeout_seconds: float = 30.0
    max_attempts: int = 5
    page_size: int = 500
    backoff_seconds: float = 0.5
    default_api_url: str = "https://api.optix.cloud"

    def required_settings(self) -> tuple[str, ...]:
        return ("practice_id",)

    def optional_settings(self) -> tuple[str, ...]:
        return ("api_url",)

    def required_secrets(self) -> tuple[str, ...]:
        return ("api_key",)

    def open(self, practice: Practice, credentials: dict[str, str]) -> OptixClient:
        optix_practice_id = (practice.settings.get("practice_id") or "").strip()
        api_key = (credentials.get("api_key") or "").strip()
        if not optix_practice_id:
            raise PmsConnectionFailed(
                PMS_NAME,
                practice.practice_id,
                "missing_setting",
                "no Optix Practice ID is set.",
                "the practice_id setting: the Practice ID shown in Optix > Settings > Integrations",
            )
        if not api_key:
            raise PmsConnectionFailed(
                PMS_NAME, practice.practice_id, "missing_secret", "no API key is stored.", CHECK_KEY
            )
        return OptixClient(
            practice,
            api_url=(practice.settings.get("api_url") or "").strip() or self.default_api_url,
            optix_practice_id=optix_practice_id,
            api_key=api_key,
            page_size=self.page_size,
            timeout_seconds=self.timeout_seconds,
            max_attempts=self.max_attempts,
            backoff_seconds=self.backoff_seconds,
        )
