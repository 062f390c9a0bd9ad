"""PMS credentials encrypted at rest with AES-256-GCM, and rotation of the key that protects them.

The key comes from `NVC_SECRET_KEY` (32 bytes, base64). Without it, a key is generated once into
`$NVC_HOME/secret.key` (mode 0600) so the embedded demo works out of the box; production sets the
environment variable. The practice id is bound in as associated data, so a ciphertext copied onto
another practice's row does not decrypt.

Key ring. New blobs are always sealed with the current key; opening tries the current key first,
then the older keys still accepted during a rotation: `NVC_SECRET_KEY_PREVIOUS` (one key, or several
separated by commas or spaces), and for the file-held key `$NVC_HOME/secret.key.previous` and a
pending `$NVC_HOME/secret.key.new` (left only by a rotation interrupted between its commit and its
file switch, so nothing is ever locked out).

Rotation (`rotate_key`) re-encrypts every practice's blob from the key ring to the new key in one
transaction: each blob must open first, and if any does not, nothing is written. Procedure with an
environment key (several processes: webserver, daemon, run workers):

1. optionally, let every process accept the new key first: `NVC_SECRET_KEY_PREVIOUS=<new>`;
2. `nvc rotate-key` (new key on standard input or in `NVC_NEW_SECRET_KEY`);
3. set `NVC_SECRET_KEY=<new>` and `NVC_SECRET_KEY_PREVIOUS=<old>` everywhere and restart;
4. once every process runs with the new key, remove `NVC_SECRET_KEY_PREVIOUS` (and run
   `nvc rotate-key` again only if a practice was connected by a process still on the old key:
   `unreadable_practices` lists those, and re-running converges).

With the file-held key (the embedded default) `rotate_key` does steps 1-3 itself: the new key is
written to `secret.key.new` before the transaction, and after the commit the old key moves to
`secret.key.previous` and the new one replaces `secret.key` atomically.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nvc_pipelines.config import nvc_home
from nvc_pipelines.files import atomic_write

_NONCE_BYTES = 12
_VERSION = b"\x01"

KEY_ENV = "NVC_SECRET_KEY"
PREVIOUS_KEY_ENV = "NVC_SECRET_KEY_PREVIOUS"
NEW_KEY_ENV = "NVC_NEW_SECRET_KEY"  # where `nvc rotate-key` reads the new key from (else standard input)
KEY_FILE = "secret.key"
PREVIOUS_KEY_FILE = "secret.key.previous"
PENDING_KEY_FILE = "secret.key.new"


class SecretKeyError(RuntimeError):
    """The secret key is missing, malformed, or does not open the stored credentials."""


def _decode_key(text: str, origin: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise SecretKeyError(f"{origin} is not base64") from None
    if len(key) != 32:
        raise SecretKeyError(f"{origin} must decode to 32 bytes (AES-256), got {len(key)}")
    return key


def _encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


def generate_key() -> str:
    return _encode_key(AESGCM.generate_key(bit_length=256))


def _key_path() -> Path:
    return nvc_home() / KEY_FILE


def _read_key_file(path: Path) -> bytes | None:
    return _decode_key(path.read_text(), str(path)) if path.exists() else None


def _write_key_file(path: Path, key: bytes) -> None:
    """Write a key atomically with mode 0600 (`files.atomic_write`)."""
    with atomic_write(path) as fh:
        fh.write(_encode_key(key) + "\n")


def load_key() -> bytes:
    """The current key: `NVC_SECRET_KEY`, else `$NVC_HOME/secret.key` (created on first use)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return _decode_key(env, KEY_ENV)
    path = _key_path()
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(generate_key() + "\n")
    return _decode_key(path.read_text(), str(path))


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The current key (seals everything new) and older keys still accepted for opening."""

    current: bytes
    previous: tuple[bytes, ...] = ()
    source: str = KEY_ENV  # KEY_ENV, or the path of the key file

    @property
    def from_file(self) -> bool:
        return self.source != KEY_ENV

    @property
    def decryption_keys(self) -> tuple[bytes, ...]:
        """Current first, then the others, without repeats."""
        keys: list[bytes] = []
        for key in (self.current, *self.previous):
            if key not in keys:
                keys.append(key)
        return tuple(keys)


def load_key_ring() -> KeyRing:
    """The key ring from the environment (or the key file and its rotation companions)."""
    current = load_key()
    previous: list[bytes] = []
    extra = os.environ.get(PREVIOUS_KEY_ENV, "")
    for n, part in enumerate(p for p in re.split(r"[,\s]+", extra) if p):
        previous.append(_decode_key(part, f"{PREVIOUS_KEY_ENV} (key {n + 1})"))
    if os.environ.get(KEY_ENV):
        return KeyRing(current, tuple(previous), KEY_ENV)
    home = nvc_home()
    for name in (PREVIOUS_KEY_FILE, PENDING_KEY_FILE):
        key = _read_key_file(home / name)
        if key is not None:
            previous.append(key)
    return KeyRing(current, tuple(previous), str(home / KEY_FILE))


def _keys(key: bytes | Sequence[bytes] | KeyRing | None) -> tuple[bytes, ...]:
    if key is None:
        return load_key_ring().decryption_keys
    if isinstance(key, KeyRing):
        return key.decryption_keys
    if isinstance(key, bytes | bytearray):
        return (bytes(key),)
    return tuple(key)


def encrypt_credentials(practice_id: str, credentials: dict[str, str], key: bytes | None = None) -> bytes:
    """Seal `credentials` for `practice_id` with `key` (default: the current key)."""
    nonce = os.urandom(_NONCE_BYTES)
    plaintext = json.dumps(credentials, sort_keys=True).encode()
    return _VERSION + nonce + AESGCM(key or load_key()).encrypt(nonce, plaintext, practice_id.encode())


def _open(practice_id: str, blob: bytes, keys: Sequence[bytes]) -> tuple[dict[str, str], bytes] | None:
    """(credentials, the key that opened them), or None when no key does."""
    nonce, ciphertext = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
    for key in keys:
        try:
            plaintext = AESGCM(key).decrypt(nonce, ciphertext, practice_id.encode())
        except InvalidTag:
            continue
        return json.loads(plaintext), key
    return None


def decrypt_credentials(
    practice_id: str, blob: bytes | None, key: bytes | Sequence[bytes] | KeyRing | None = None
) -> dict[str, str]:
    """Open a practice's blob with `key` (one key, several, or a ring; default: the key ring)."""
    if not blob:
        return {}
    blob = bytes(blob)
    if blob[:1] != _VERSION:
        raise SecretKeyError(f"credentials of practice {practice_id} are in an unknown format")
    opened = _open(practice_id, blob, _keys(key))
    if opened is None:
        raise SecretKeyError(
            f"credentials of practice {practice_id} cannot be decrypted with the current {KEY_ENV}"
            + (f" (nor {PREVIOUS_KEY_ENV})" if key is None else "")
        )
    return opened[0]


# --- rotation (pure) ------------------------------------------------------------------------------


def rotate_credentials(
    rows: Iterable[tuple[str, bytes | None]],
    old_keys: bytes | Sequence[bytes] | KeyRing,
    new_key: bytes,
) -> list[tuple[str, bytes]]:
    """Re-seal each `(practice_id, blob)` under `new_key`; all or nothing.

    Every blob must open with one of `old_keys` (its practice id as associated data) and its new blob
    must open with `new_key` to the same credentials, else `SecretKeyError` names every practice that
    failed and nothing is returned. Rows without credentials are left out. Pure: no I/O.
    """
    if len(new_key) != 32:
        raise SecretKeyError(f"the new key must be 32 bytes (AES-256), got {len(new_key)}")
    keys = _keys(old_keys)
    out: list[tuple[str, bytes]] = []
    failed: list[str] = []
    for practice_id, blob in rows:
        if not blob:
            continue
        blob = bytes(blob)
        opened = _open(practice_id, blob, keys) if blob[:1] == _VERSION else None
        if opened is None:
            failed.append(practice_id)
            continue
        credentials = opened[0]
        sealed = encrypt_credentials(practice_id, credentials, new_key)
        if decrypt_credentials(practice_id, sealed, new_key) != credentials:  # pragma: no cover - AES-GCM bug
            failed.append(practice_id)
            continue
        out.append((practice_id, sealed))
    if failed:
        raise SecretKeyError(
            f"nothing was rotated: the credentials of {len(failed)} practice(s) cannot be decrypted with the "
            f"current keys ({', '.join(sorted(failed))}); set {PREVIOUS_KEY_ENV} to the key that sealed them, "
            "or connect those practices again"
        )
    return out


def unreadable_practices(
    rows: Iterable[tuple[str, bytes | None]], keys: bytes | Sequence[bytes] | KeyRing
) -> list[str]:
    """The practices whose blob none of `keys` opens (a check before dropping a previous key)."""
    ks = _keys(keys)
    return [pid for pid, blob in rows if blob and (bytes(blob)[:1] != _VERSION or _open(pid, bytes(blob), ks) is None)]


# --- rotation (store) -----------------------------------------------------------------------------


class CredentialStore(Protocol):
    """What rotation needs of the store (`nvc_pipelines.store.Store` is one): named here, so the
    store can seal credentials with this module without the two importing each other."""

    def stored_credentials(self) -> list[tuple[str, bytes]]: ...

    def reseal_credentials(
        self,
        reseal: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]],
        *,
        actor: str,
        detail: dict[str, Any],
    ) -> int: ...


def rotate_key(store: CredentialStore, new_key_b64: str, *, actor: str = "cli:rotate-key") -> int:
    """Re-encrypt every practice's credentials from the key ring to `new_key_b64` in ONE transaction;
    returns how many practices were rotated.

    The practices table is locked against concurrent writes for the transaction; any blob that does
    not open rolls everything back (`SecretKeyError`). One `rotate_key` audit entry per practice
    commits with the rotation (no key material in it). With an environment key the caller then
    switches `NVC_SECRET_KEY` (keeping the old one in `NVC_SECRET_KEY_PREVIOUS` until every process
    has the new one); with the file-held key the file is switched here, crash-safely.
    """
    new_key = _decode_key(new_key_b64, "the new key")
    ring = load_key_ring()
    if new_key == ring.current:
        raise SecretKeyError("the new key is the current key; generate a new one (`nvc_pipelines.crypto.generate_key`)")
    home = nvc_home()
    pending = home / PENDING_KEY_FILE
    staged = False
    if ring.from_file:
        # Stage the new key on disk before any blob is sealed with it, so a crash anywhere leaves
        # every blob openable (`load_key_ring` accepts a pending key).
        existing = _read_key_file(pending)
        if existing is not None and existing != new_key:
            raise SecretKeyError(
                f"an earlier key rotation was interrupted: {pending} holds its new key. Finish it first "
                "(`nvc rotate-key --finish`, i.e. `finish_interrupted_rotation`), then rotate again"
            )
        _write_key_file(pending, new_key)
        staged = True
    try:
        # The new key is accepted too, so a rotation re-run after an interruption converges.
        rotated = store.reseal_credentials(
            lambda rows: rotate_credentials(rows, (*ring.decryption_keys, new_key), new_key),
            actor=actor,
            detail={"key_source": _source_label(ring)},
        )
    except BaseException:
        if staged and not _sealed_with(store, new_key):
            pending.unlink(missing_ok=True)  # surely nothing committed: the rotation never happened
        raise
    if ring.from_file:
        _write_key_file(home / PREVIOUS_KEY_FILE, ring.current)
        os.replace(pending, home / KEY_FILE)
        dir_fd = os.open(home, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return rotated


def _sealed_with(store: CredentialStore, key: bytes) -> bool:
    """Whether any stored blob opens with `key`; True when that cannot be told (a failure at COMMIT
    may still have committed, so the staged key must then stay on disk)."""
    try:
        rows = store.stored_credentials()
    except Exception:  # noqa: BLE001 - unknown means keep the key
        return True
    return any(pid not in unreadable_practices([(pid, blob)], key) for pid, blob in rows)


def finish_interrupted_rotation(store: CredentialStore, *, actor: str = "cli:rotate-key") -> int | None:
    """Complete a file-key rotation that stopped before its file switch (`secret.key.new` left behind):
    rotate to that pending key. None when there is nothing to finish."""
    if os.environ.get(KEY_ENV):
        return None
    pending = _read_key_file(nvc_home() / PENDING_KEY_FILE)
    if pending is None:
        return None
    if pending == load_key():  # switched already; only the leftover file remains
        (nvc_home() / PENDING_KEY_FILE).unlink(missing_ok=True)
        return 0
    return rotate_key(store, _encode_key(pending), actor=actor)


def _source_label(ring: KeyRing) -> str:
    return "env" if not ring.from_file else "file"


def unreadable_stored_practices(
    store: CredentialStore, keys: bytes | Sequence[bytes] | KeyRing | None = None
) -> list[str]:
    """Practices in the store whose credentials `keys` (default: the current key alone) cannot open:
    empty means `NVC_SECRET_KEY_PREVIOUS` (and `secret.key.previous`) can be removed."""
    rows = store.stored_credentials()
    return unreadable_practices(rows, keys if keys is not None else load_key())


def forget_previous_key_file() -> bool:
    """Delete `$NVC_HOME/secret.key.previous` (after `unreadable_stored_practices` came back empty)."""
    path = nvc_home() / PREVIOUS_KEY_FILE
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed
