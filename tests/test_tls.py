"""Transport security of `PmsHttp`, and of every HTTP PMS resource, against real TLS servers on loopback.

A private CA and server certificates are made here with `cryptography`; each server is Python's
`http.server` behind `ssl`, with a TCP relay in front that records every byte the client sends, so
the tests prove not only that a request fails but that nothing readable left this machine. For the
PMS resources the TLS server fronts that PMS's sandbox (forwarding each request to it), so a
practice's `ca_bundle` is proved end to end: a refused certificate is a `tls_certificate` problem
naming the PMS, the practice and what to check, and the practice's CA lets the connection test pass.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import text

from nvc_pipelines.model import PmsKind, Practice
from resources.acuitas import AcuitasResource
from resources.http import (
    CA_BUNDLE_SETTING,
    CaBundleError,
    PmsHttp,
    UnsafeUrl,
    check_url,
    is_certificate_failure,
    tls_context,
)
from resources.optisoft import OptisoftResource
from resources.optix import OptixResource
from resources.protocol import PmsConnectionFailed
from resources.sycle import SycleResource
from sandboxes.acuitas import AcuitasSandbox
from sandboxes.base import SandboxServer
from sandboxes.optisoft import OptisoftSandbox
from sandboxes.optix import OptixSandbox
from sandboxes.sycle import SycleSandbox

SECRET = "tls-test-secret-7Hq2"
SECRET_PATH = "/patients/confidential-path"


# --- certificates ------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca_pem: Path
    other_ca_pem: Path
    dir: Path

    def server(self, name: str, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), expired: bool = False):
        return _server_cert(self.dir, name, self._ca, hosts, expired)

    _ca: tuple = field(default=(), repr=False)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(directory: Path, cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def _server_cert(directory: Path, name: str, ca, hosts: tuple[str, ...], expired: bool) -> tuple[Path, Path]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    start, end = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired else (now, now)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - dt.timedelta(hours=1))
        .not_valid_after(end + dt.timedelta(days=0 if expired else 30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, ca_path = _ca(directory, "Practice Private CA")
    _, _, other_path = _ca(directory, "Some Other CA")
    return Pki(ca_path, other_path, directory, (ca_key, ca_cert))


# --- servers -------------------------------------------------------------------------------------------


@dataclass
class TlsServer:
    url: str
    requests: list[dict]  # what the HTTP handler received (after a successful handshake)
    wire: bytearray  # every byte the client sent, as seen on the wire by the relay
    handshake_errors: list[str]


# Headers that belong to one connection, not to the request: not passed on to the upstream sandbox.
_HOP_HEADERS = frozenset({"host", "connection", "content-length", "keep-alive", "transfer-encoding"})


class _Handler(BaseHTTPRequestHandler):
    """Answers `{"ok", "tls"}`, or, with an `upstream` sandbox, passes the request on to it (the
    sandbox behind TLS, as a practice's server or a PMS's cloud is)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer()

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self._answer()

    def _answer(self) -> None:
        version = self.connection.version() if isinstance(self.connection, ssl.SSLSocket) else None
        self.server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "tls": version})
        status, headers, body = 200, {"Content-Type": "application/json"}, json.dumps({"ok": True, "tls": version})
        if self.server.upstream:
            length = int(self.headers.get("Content-Length") or 0)
            sent = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            answer = httpx.request(
                self.command,
                self.server.upstream + self.path,
                headers=sent,
                content=self.rfile.read(length) if length else None,
                timeout=30,
            )
            status, body = answer.status_code, answer.text
            headers = {k: answer.headers[k] for k in ("Content-Type", "Retry-After") if k in answer.headers}
        payload = body.encode()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # quiet
        pass


class _TlsHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext, upstream: str | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.context = context
        self.upstream = upstream
        self.seen: list[dict] = []
        self.handshake_errors: list[str] = []

    def finish_request(self, request, client_address) -> None:
        # The handshake runs in the request's thread, so a refused client never stalls the server.
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.handshake_errors.append(str(exc))
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            tls.close()

    def handle_error(self, request, client_address) -> None:  # quiet
        pass


def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
    try:
        while data := src.recv(65536):
            if record is not None:
                record.extend(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@contextmanager
def tls_server(
    cert: tuple[Path, Path],
    *,
    versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None = None,
    legacy: bool = False,
    upstream: str | None = None,
) -> Iterator[TlsServer]:
    """An HTTPS server with `cert` (optionally pinned to TLS `versions`, optionally fronting the
    plain-http `upstream`), behind a recording relay."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*map(str, cert))
    if legacy:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 only speaks TLS < 1.2 at security level 0
    if versions:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version, ctx.maximum_version = versions
    server = _TlsHttpServer(ctx, upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    wire = bytearray()
    relay = socket.create_server(("127.0.0.1", 0))
    relay.settimeout(0.2)
    stop = threading.Event()

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                client, _ = relay.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(server.server_address)
            threading.Thread(target=_pump, args=(client, upstream, wire), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client, None), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    try:
        yield TlsServer(f"https://127.0.0.1:{relay.getsockname()[1]}", server.seen, wire, server.handshake_errors)
    finally:
        stop.set()
        relay.close()
        server.shutdown()
        server.server_close()


def _client(url: str, ca_bundle: str | Path | None = None) -> PmsHttp:
    return PmsHttp(
        url,
        headers={"Authorization": f"Bearer {SECRET}"},
        ca_bundle=str(ca_bundle) if ca_bundle else None,
        timeout_seconds=5,
        max_attempts=1,
    )


def _assert_nothing_readable_left(server: TlsServer, secrets: Iterable[str] = (SECRET, SECRET_PATH)) -> None:
    wire = bytes(server.wire)
    assert wire, "the relay saw no traffic at all"
    for needle in (*secrets, "Authorization", "GET ", "POST "):
        assert needle.encode() not in wire, f"{needle!r} crossed the wire in clear"


# --- tests ---------------------------------------------------------------------------------------------


def test_default_trust_refuses_a_private_ca_and_sends_nothing(pki: Pki) -> None:
    with tls_server(pki.server("private")) as server:
        client = _client(server.url)
        with pytest.raises(httpx.ConnectError) as caught:
            client.get(SECRET_PATH)
        client.close()
        message = str(caught.value)
        assert "CERTIFICATE_VERIFY_FAILED" in message and "unable to get local issuer certificate" in message
        assert SECRET not in message
        assert server.requests == []  # the request never reached the server
        _assert_nothing_readable_left(server)


def test_the_ca_bundle_trusts_the_private_ca(pki: Pki) -> None:
    with tls_server(pki.server("private")) as server:
        client = _client(server.url, pki.ca_pem)
        assert client.get(SECRET_PATH)["ok"] is True
        client.close()
        assert server.requests == [{"path": SECRET_PATH, "auth": f"Bearer {SECRET}", "tls": "TLSv1.3"}]
        _assert_nothing_readable_left(server)  # the secret went, but only inside TLS


def test_a_bundle_with_another_ca_is_still_refused(pki: Pki) -> None:
    with tls_server(pki.server("private")) as server:
        client = _client(server.url, pki.other_ca_pem)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            client.get(SECRET_PATH)
        assert server.requests == []


def test_the_ca_bundle_does_not_switch_off_host_name_or_expiry_checks(pki: Pki) -> None:
    with tls_server(pki.server("wrong-host", hosts=("pms.example.org",))) as server:
        client = _client(server.url, pki.ca_pem)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED.*(IP address mismatch|match)"):
            client.get(SECRET_PATH)
        assert server.requests == []
    with tls_server(pki.server("expired", expired=True)) as server:
        client = _client(server.url, pki.ca_pem)
        with pytest.raises(httpx.ConnectError, match="certificate has expired"):
            client.get(SECRET_PATH)
        assert server.requests == []


def test_the_ca_bundle_replaces_rather_than_adds_to_system_trust(pki: Pki) -> None:
    ctx = tls_context(str(pki.ca_pem))
    assert [dict(c["subject"][0])["commonName"] for c in ctx.get_ca_certs()] == ["Practice Private CA"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_bad_ca_bundle_is_a_clear_error(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(CaBundleError, match="does not exist"):
        PmsHttp("https://127.0.0.1:9", ca_bundle=str(tmp_path / "missing.pem"))
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(CaBundleError, match="no usable PEM certificate|no CA certificate"):
        PmsHttp("https://127.0.0.1:9", ca_bundle=str(empty))
    _, key = pki.server("leaf-only")
    with pytest.raises(CaBundleError):
        PmsHttp("https://127.0.0.1:9", ca_bundle=str(key))  # a private key is not a CA bundle


def test_tls_1_3_is_negotiated_and_1_2_still_accepted(pki: Pki) -> None:
    with tls_server(pki.server("modern")) as server:
        client = _client(server.url, pki.ca_pem)
        with client.client.stream("GET", "/version") as response:
            ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
            assert ssl_object.version() == "TLSv1.3"  # what the client negotiated
            assert json.loads(response.read())["tls"] == "TLSv1.3"  # and what the server saw
        client.close()
    tls12 = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
    with tls_server(pki.server("tls12"), versions=tls12) as server:
        client = _client(server.url, pki.ca_pem)
        assert client.get("/version")["tls"] == "TLSv1.2"
        client.close()


def test_the_system_cas_context_is_made_once_and_a_ca_bundle_is_read_each_time(pki: Pki, tmp_path: Path) -> None:
    """Every client on the system CAs shares one hardened context (loading the CAs cost each stream's
    client about 35 ms); a practice's CA bundle is read afresh, so replacing the file takes effect."""
    assert tls_context() is tls_context()
    assert tls_context().verify_mode == ssl.CERT_REQUIRED and tls_context().check_hostname
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(pki.ca_pem.read_bytes())
    first = tls_context(str(bundle))
    assert first is not tls_context(str(bundle)) and first.get_ca_certs()
    bundle.write_text("not a certificate\n")
    with pytest.raises(CaBundleError):
        tls_context(str(bundle))


@pytest.mark.parametrize("old", ["TLSv1_1", "TLSv1"])
def test_a_server_below_tls_1_2_is_refused(pki: Pki, old: str) -> None:
    assert tls_context().minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls_context(str(pki.ca_pem)).minimum_version == ssl.TLSVersion.TLSv1_2
    version = getattr(ssl.TLSVersion, old)
    with tls_server(pki.server(f"legacy-{old}"), versions=(version, version), legacy=True) as server:
        # First prove this server really speaks the old version (OpenSSL here may not offer it at all).
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe.load_verify_locations(str(pki.ca_pem))
        probe.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            probe.minimum_version = probe.maximum_version = version
        port = int(server.url.rsplit(":", 1)[1])
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                probe.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                negotiated = tls.version()
        except (ssl.SSLError, OSError) as exc:
            print(f"OpenSSL {ssl.OPENSSL_VERSION} cannot speak {old} here ({exc}); only minimum_version checked")
            pytest.skip(f"this OpenSSL cannot offer {old}: the client's minimum_version (TLS 1.2) is asserted above")
        assert negotiated == old.replace("_", ".")
        before = len(server.requests)
        server.wire.clear()

        client = _client(server.url, pki.ca_pem)
        with pytest.raises(httpx.ConnectError) as caught:
            client.get(SECRET_PATH)
        client.close()
        print("refused:", caught.value)
        message = str(caught.value).upper()
        assert "PROTOCOL" in message or "VERSION" in message, message
        assert len(server.requests) == before  # no request reached the server
        _assert_nothing_readable_left(server)


@pytest.mark.parametrize(
    "url",
    [
        "http://pms.example.org/api",
        "http://10.0.0.5:8080",
        "http://192.168.1.20",
        "http://127.0.0.1.nip.io",
        "http://localhost.evil.example",
        "http://[2001:db8::1]/",
        "ftp://127.0.0.1/",
        "127.0.0.1:8080",
        "https://nvc:hunter2@pms.example.org",
        "https://nvc@pms.example.org",
        "https://pms.example.org:notaport/",
        "http://pms.example.org/api?token=hunter2#hunter2",
        "ftp://user:hunter2@127.0.0.1/x?hunter2",
        "pms.example.org/?key=hunter2",
    ],
)
def test_check_url_refuses_unsafe_addresses(url: str) -> None:
    with pytest.raises(UnsafeUrl) as caught:
        check_url(url)
    assert "hunter2" not in str(caught.value)  # a refusal never quotes a credential or query
    host = urlsplit(url).hostname or url.split("/")[0].split(":")[0]
    assert host.split(":")[0] in str(caught.value).lower()  # but it names the host, so the operator can act
    with pytest.raises(UnsafeUrl):
        PmsHttp(url)  # before any connection is attempted


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8701", "http://localhost:1/", "http://[::1]:8080/x/", "https://pms.example.org/api/"],
)
def test_check_url_accepts_https_and_loopback_http(url: str) -> None:
    assert check_url(url) == url.rstrip("/")


def test_a_refused_certificate_is_not_retried(pki: Pki) -> None:
    retries: list[str] = []
    with tls_server(pki.server("not-retried")) as server:
        client = PmsHttp(server.url, max_attempts=4, backoff_seconds=0.01, on_retry=retries.append)
        with pytest.raises(httpx.ConnectError) as caught:
            client.get(SECRET_PATH)
        client.close()
    assert is_certificate_failure(caught.value)  # found on the cause chain, down to ssl's own error
    assert retries == []  # retrying cannot fix a certificate: one attempt, then the problem
    assert not is_certificate_failure(httpx.ConnectError("[Errno 111] Connection refused"))


# --- every HTTP PMS resource: a practice's CA bundle, and refused certificates as their own problem ------


@dataclass(frozen=True)
class PmsCase:
    """How to connect one PMS kind to its sandbox: the URL setting, the other settings, the secrets."""

    kind: PmsKind
    name: str  # as messages name the PMS
    url_setting: str
    settings: dict[str, str]
    secrets: dict[str, str]
    sandbox: Callable[[], SandboxServer]
    resource: Callable[[], Any]

    def practice(self, url: str, ca_bundle: str | Path | None = None) -> Practice:
        settings = {self.url_setting: url, **self.settings}
        if ca_bundle is not None:
            settings[CA_BUNDLE_SETTING] = str(ca_bundle)
        return Practice(f"tls-{self.kind}", "TLS test", self.kind, settings, "connected")

    def open(self, url: str, ca_bundle: str | Path | None = None) -> Any:
        return self.resource().open(self.practice(url, ca_bundle), dict(self.secrets))


QUICK = {"max_attempts": 3, "backoff_seconds": 0.01, "timeout_seconds": 15}
PMS_CASES = {
    "optix": PmsCase(
        PmsKind.OPTIX,
        "Optix",
        "api_url",
        {"practice_id": "OPX-1001"},
        {"api_key": "optix-demo-key"},
        OptixSandbox,
        lambda: OptixResource(**QUICK),
    ),
    "acuitas": PmsCase(
        PmsKind.ACUITAS,
        "Acuitas",
        "server_url",
        {"database": "ACUITAS_DEMO"},
        {"api_username": "nvc_api", "api_password": "demo-password"},
        AcuitasSandbox,
        lambda: AcuitasResource(**QUICK),
    ),
    "optisoft": PmsCase(
        PmsKind.OPTISOFT,
        "Optisoft",
        "server_address",
        {"practice_code": "OS-1001"},
        {"db_username": "NVC_LINK", "db_password": "optisoft-demo-password"},
        lambda: OptisoftSandbox(offline_after_seconds=5.0, poll_wait_seconds=3.0),
        lambda: OptisoftResource(**QUICK),
    ),
    "sycle": PmsCase(
        PmsKind.SYCLE,
        "Sycle",
        "account_url",
        {"location_id": "2803-9506"},
        {"api_username": "nvc-demo", "api_password": "sycle-demo-password"},
        SycleSandbox,
        lambda: SycleResource(**QUICK),
    ),
}


@pytest.fixture(scope="module", params=sorted(PMS_CASES))
def pms(request: pytest.FixtureRequest) -> Iterator[tuple[PmsCase, SandboxServer]]:
    """Each PMS kind with its sandbox running (once per kind for this module)."""
    case = PMS_CASES[request.param]
    with case.sandbox() as sandbox:
        yield case, sandbox


def test_every_pms_connects_through_the_practice_ca_bundle(pms: tuple[PmsCase, SandboxServer], pki: Pki) -> None:
    case, sandbox = pms
    with tls_server(pki.server(f"{case.kind}-trusted"), upstream=sandbox.url) as front:
        with case.open(front.url, pki.ca_pem) as client:
            info = client.test_connection()
        assert info.pms == case.name
        assert front.requests and {r["tls"] for r in front.requests} == {"TLSv1.3"}
        _assert_nothing_readable_left(front, case.secrets.values())  # the secrets went, but only inside TLS


@pytest.mark.parametrize(
    ("cert", "bundle", "why"),
    [
        ("private", None, "unable to get local issuer certificate"),  # the system CAs do not know the practice's
        ("private", "other", "unable to get local issuer certificate"),  # nor does another CA's bundle
        ("wrong-host", "ca", "mismatch"),  # the right CA does not excuse the wrong host name
        ("expired", "ca", "certificate has expired"),
    ],
)
def test_every_pms_reports_a_refused_certificate_as_its_own_problem(
    pms: tuple[PmsCase, SandboxServer],
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    cert: str,
    bundle: str | None,
    why: str,
) -> None:
    case, sandbox = pms
    hosts = ("pms.example.org",) if cert == "wrong-host" else ("localhost", "127.0.0.1")
    served = pki.server(f"{case.kind}-{cert}", hosts=hosts, expired=cert == "expired")
    ca_bundle = {None: None, "other": pki.other_ca_pem, "ca": pki.ca_pem}[bundle]
    reached = len(sandbox.request_log)
    with tls_server(served, upstream=sandbox.url) as front:
        with case.open(front.url, ca_bundle) as client, pytest.raises(PmsConnectionFailed) as caught:
            client.test_connection()
        error = caught.value
        assert error.problem == "tls_certificate" and error.pms == case.name
        message = str(error)
        assert message.startswith(
            f"{case.name} (practice tls-{case.kind}): Connection failed: the TLS certificate of {front.url} was refused"
        )
        assert "CERTIFICATE_VERIFY_FAILED" in message and why in message
        # What to check: the certificate, the setting holding the address, and the ca_bundle way in.
        assert "TLS certificate" in error.check and case.url_setting in error.check
        assert "self-signed" in error.check and CA_BUNDLE_SETTING in error.check
        assert not any(secret in message for secret in case.secrets.values())
        assert "retrying" not in caplog.text  # refused once, not retried as if the server were down
        assert front.requests == [] and len(sandbox.request_log) == reached  # no request got through
        _assert_nothing_readable_left(front, case.secrets.values())


@pytest.mark.parametrize("kind", sorted(PMS_CASES))
def test_every_http_pms_takes_a_ca_bundle_and_refuses_an_unusable_one(kind: str, tmp_path: Path, pki: Pki) -> None:
    case = PMS_CASES[kind]
    assert CA_BUNDLE_SETTING in case.resource().optional_settings()
    not_pem = tmp_path / "not-a-certificate.pem"
    not_pem.write_text("not a certificate\n")
    _, private_key = pki.server(f"{kind}-leaf")
    for bundle, said in (
        (tmp_path / "missing.pem", "does not exist"),
        (not_pem, "holds no"),
        (private_key, "holds no"),  # a private key is not a CA bundle
    ):
        with pytest.raises(PmsConnectionFailed) as caught:
            case.open("https://127.0.0.1:9", bundle)  # refused before any connection is tried
        error = caught.value
        assert error.problem == "tls_certificate" and error.pms == case.name
        assert said in str(error) and str(bundle) in str(error)
        assert error.check.startswith("the ca_bundle setting: a PEM file")
        assert not any(secret in str(error) for secret in case.secrets.values())


def test_a_booking_refused_for_the_certificate_waits_and_lands_once_the_ca_is_given(pki: Pki, store: Any) -> None:
    """A certificate is fixed by people within hours: the booking backs off (not `failed`), is
    dead-lettered only after the last attempt, and goes in once the practice's CA bundle is set."""
    from nvc_pipelines import writeback
    from resources.protocol import PmsError

    case = PMS_CASES["optix"]
    store.add_practice("tls-optix", "TLS Optix", PmsKind.OPTIX, dict(case.settings), dict(case.secrets))
    start = dt.datetime.now(dt.UTC).replace(microsecond=0, second=0, minute=0) + dt.timedelta(days=20, hours=2)
    with (
        OptixSandbox() as sandbox,
        tls_server(pki.server("optix-wb", hosts=("127.0.0.1",)), upstream=sandbox.url) as front,
    ):
        patient = f"P{sandbox.patients('OPX-1001')[0].index:07d}"
        writeback.add_booking(store, "tls-optix", "tls-booking-1", patient, start)
        with case.open(front.url) as client:  # the system trust store: the practice CA is refused
            report = writeback.deliver(store, "tls-optix", client, error_types=(PmsError,))
        (row,) = writeback.outbox_rows(store, "tls-optix")
        assert (report.retry_later, report.failed, row["status"], row["problem"]) == (
            1,
            0,
            "pending",
            "tls_certificate",
        )
        assert "TLS certificate" in row["last_error"] and sandbox.nvc_appointments("OPX-1001") == []

        with store.begin_owner() as conn:  # due again now
            conn.execute(text("UPDATE outbox SET next_attempt_at = now() WHERE practice_id = 'tls-optix'"))
        with case.open(front.url, pki.ca_pem) as client:  # the practice's CA bundle is now set
            report = writeback.deliver(store, "tls-optix", client, error_types=(PmsError,))
        assert report.confirmed == 1
        assert [r["status"] for r in writeback.outbox_rows(store, "tls-optix")] == ["confirmed"]
        assert [a["nvc_reference"] for a in sandbox.nvc_appointments("OPX-1001")] == ["tls-booking-1"]

        writeback.add_booking(store, "tls-optix", "tls-booking-2", patient, start + dt.timedelta(hours=1))
        with case.open(front.url) as client:  # on its last attempt a refused certificate dead-letters
            report = writeback.deliver(store, "tls-optix", client, error_types=(PmsError,), max_attempts=1)
        assert report.dead_lettered == 1
        assert writeback.outbox_rows(store, "tls-optix", "dead_letter")[0]["problem"] == "tls_certificate"
