"""Credentials at rest: AES-256-GCM bound to the practice, and key rotation that is all-or-nothing."""

from __future__ import annotations

import base64
import os
import stat

import pytest
from sqlalchemy import text

from nvc_pipelines.crypto import (
    KEY_ENV,
    PENDING_KEY_FILE,
    PREVIOUS_KEY_ENV,
    PREVIOUS_KEY_FILE,
    KeyRing,
    SecretKeyError,
    decrypt_credentials,
    encrypt_credentials,
    finish_interrupted_rotation,
    generate_key,
    load_key,
    load_key_ring,
    rotate_credentials,
    rotate_key,
    unreadable_practices,
    unreadable_stored_practices,
)
from nvc_pipelines.model import PmsKind

SECRETS = {"api_key": "sk-live-Zq81-rotate-me", "note": "pa55 wörd"}


def _key() -> bytes:
    return base64.b64decode(generate_key())


def _blobs(store) -> dict[str, bytes]:
    with store.begin_owner() as conn:
        rows = conn.execute(text("SELECT practice_id, credentials FROM practices WHERE credentials IS NOT NULL"))
        return {r.practice_id: bytes(r.credentials) for r in rows}


def _add(store, practice_id: str, secrets: dict[str, str]) -> None:
    store.add_practice(practice_id, practice_id, PmsKind.OPTIX, {"practice_id": "OPX-1"}, secrets)


# --- pure functions ----------------------------------------------------------------------------------


def test_round_trip_and_fresh_nonce() -> None:
    key = _key()
    a = encrypt_credentials("p1", SECRETS, key)
    b = encrypt_credentials("p1", SECRETS, key)
    assert a != b  # a fresh nonce per seal
    assert b"sk-live" not in a and b"rotate-me" not in a
    assert decrypt_credentials("p1", a, key) == SECRETS
    assert decrypt_credentials("p1", None, key) == {} and decrypt_credentials("p1", b"", key) == {}


def test_round_trip_with_the_environment_key() -> None:
    blob = encrypt_credentials("p1", SECRETS)
    assert decrypt_credentials("p1", blob) == SECRETS
    assert load_key() == base64.b64decode(os.environ[KEY_ENV])


@pytest.mark.parametrize("where", [0, 1, 13, -1])
def test_tampered_blob_is_refused(where: int) -> None:
    key = _key()
    blob = bytearray(encrypt_credentials("p1", SECRETS, key))
    blob[where] ^= 0x01
    with pytest.raises(SecretKeyError):
        decrypt_credentials("p1", bytes(blob), key)


def test_truncated_blob_is_refused() -> None:
    key = _key()
    blob = encrypt_credentials("p1", SECRETS, key)
    with pytest.raises(SecretKeyError):
        decrypt_credentials("p1", blob[:-1], key)


def test_blob_moved_to_another_practice_is_refused() -> None:
    key = _key()
    blob = encrypt_credentials("practice-a", SECRETS, key)
    with pytest.raises(SecretKeyError, match="practice-b"):
        decrypt_credentials("practice-b", blob, key)


def test_wrong_key_is_refused_and_the_message_holds_no_secret() -> None:
    blob = encrypt_credentials("p1", SECRETS, _key())
    with pytest.raises(SecretKeyError) as caught:
        decrypt_credentials("p1", blob, _key())
    assert "sk-live" not in str(caught.value)


def test_malformed_keys_are_refused(monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, "not base64!!")
    with pytest.raises(SecretKeyError, match="not base64"):
        load_key()
    monkeypatch.setenv(KEY_ENV, base64.b64encode(b"short").decode())
    with pytest.raises(SecretKeyError, match="32 bytes"):
        load_key()


def test_key_file_is_created_once_with_mode_0600(monkeypatch, nvc_env) -> None:
    monkeypatch.delenv(KEY_ENV)
    first = load_key()
    path = nvc_env / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key() == first
    assert load_key_ring() == KeyRing(first, (), str(path))


def test_rotate_credentials_reseals_under_the_new_key_only() -> None:
    old, new = _key(), _key()
    rows = [("p1", encrypt_credentials("p1", SECRETS, old)), ("p2", None), ("p3", encrypt_credentials("p3", {}, old))]
    rotated = dict(rotate_credentials(rows, old, new))
    assert set(rotated) == {"p1", "p3"}  # no credentials, nothing to rotate
    assert decrypt_credentials("p1", rotated["p1"], new) == SECRETS
    with pytest.raises(SecretKeyError):
        decrypt_credentials("p1", rotated["p1"], old)


def test_rotate_credentials_is_all_or_nothing() -> None:
    old, new, stranger = _key(), _key(), _key()
    rows = [
        ("p1", encrypt_credentials("p1", SECRETS, old)),
        ("p2", encrypt_credentials("p2", SECRETS, stranger)),  # sealed by a key we do not hold
        ("p3", encrypt_credentials("elsewhere", SECRETS, old)),  # moved from another practice
    ]
    with pytest.raises(SecretKeyError, match=r"nothing was rotated.*p2, p3") as caught:
        rotate_credentials(rows, old, new)
    assert "sk-live" not in str(caught.value)
    assert unreadable_practices(rows, old) == ["p2", "p3"]
    # With the stranger key in the ring p2 opens; p3 never does (bound to another practice).
    with pytest.raises(SecretKeyError, match=r"\(p3\)"):
        rotate_credentials(rows, (old, stranger), new)


def test_previous_key_is_accepted_for_decryption(monkeypatch) -> None:
    old, new = generate_key(), generate_key()
    monkeypatch.setenv(KEY_ENV, old)
    blob = encrypt_credentials("p1", SECRETS)
    monkeypatch.setenv(KEY_ENV, new)
    with pytest.raises(SecretKeyError, match=PREVIOUS_KEY_ENV):
        decrypt_credentials("p1", blob)
    monkeypatch.setenv(PREVIOUS_KEY_ENV, f"{generate_key()}, {old}")
    assert decrypt_credentials("p1", blob) == SECRETS
    # New seals always use the current key, never a previous one.
    fresh = encrypt_credentials("p1", SECRETS)
    assert decrypt_credentials("p1", fresh, base64.b64decode(new)) == SECRETS
    monkeypatch.setenv(PREVIOUS_KEY_ENV, "nope")
    with pytest.raises(SecretKeyError, match=PREVIOUS_KEY_ENV):
        decrypt_credentials("p1", blob)


# --- rotation in the store ---------------------------------------------------------------------------


def test_rotate_key_reencrypts_every_practice_in_one_go(store, monkeypatch) -> None:
    old = os.environ[KEY_ENV]
    for n in range(3):
        _add(store, f"p{n}", {"api_key": f"secret-{n}"})
    store.add_practice("csv", "csv", PmsKind.CSV, {"path": "/tmp"}, {})  # no credentials
    before = _blobs(store)
    new = generate_key()

    assert rotate_key(store, new) == 3
    after = _blobs(store)
    assert set(after) == set(before) and all(after[p] != before[p] for p in before)
    for n in range(3):
        assert decrypt_credentials(f"p{n}", after[f"p{n}"], base64.b64decode(new)) == {"api_key": f"secret-{n}"}
        with pytest.raises(SecretKeyError):
            decrypt_credentials(f"p{n}", after[f"p{n}"], base64.b64decode(old))
    audited = [e["action"] for e in store.audit_entries("p0")]
    assert "rotate_key" in audited

    # The caller switches NVC_SECRET_KEY; the store then reads everything with the new key alone.
    monkeypatch.setenv(KEY_ENV, new)
    assert store.practice_credentials("p1") == {"api_key": "secret-1"}
    assert unreadable_stored_practices(store) == []
    monkeypatch.setenv(KEY_ENV, old)
    assert unreadable_stored_practices(store) == ["p0", "p1", "p2"]


def test_rotate_key_failure_mid_rotation_rotates_nothing(store) -> None:
    for n in range(4):
        _add(store, f"p{n}", {"api_key": f"secret-{n}"})
    # p2's blob was sealed under a key nobody holds any more (the row sorts mid-table).
    with store.begin_owner() as conn:
        conn.execute(
            text("UPDATE practices SET credentials = :b WHERE practice_id = 'p2'"),
            {"b": encrypt_credentials("p2", {"api_key": "lost"}, _key())},
        )
    before = _blobs(store)
    with pytest.raises(SecretKeyError, match=r"nothing was rotated.*\(p2\)"):
        rotate_key(store, generate_key())
    assert _blobs(store) == before
    assert store.practice_credentials("p3") == {"api_key": "secret-3"}
    assert not [e for e in store.audit_entries("p0") if e["action"] == "rotate_key"]


def test_rotate_key_failure_in_the_database_rotates_nothing(store, monkeypatch) -> None:
    for n in range(3):
        _add(store, f"p{n}", {"api_key": f"secret-{n}"})
    before = _blobs(store)
    import nvc_pipelines.crypto as crypto

    real = crypto.rotate_credentials

    def rotate_then_fail(rows, old_keys, new_key):
        out = real(rows, old_keys, new_key)
        return [*out, ("p1", 12345)]  # a row the database refuses, after good ones

    monkeypatch.setattr(crypto, "rotate_credentials", rotate_then_fail)
    with pytest.raises(Exception) as caught:  # noqa: B017 - any failure must roll the whole transaction back
        rotate_key(store, generate_key())
    assert "bytea" in str(caught.value)  # the database refused the last UPDATE, after the good ones ran
    assert _blobs(store) == before


def test_rotate_key_refuses_the_current_key_and_bad_keys(store) -> None:
    _add(store, "p0", {"api_key": "s"})
    with pytest.raises(SecretKeyError, match="current key"):
        rotate_key(store, os.environ[KEY_ENV])
    with pytest.raises(SecretKeyError, match="32 bytes"):
        rotate_key(store, base64.b64encode(b"x" * 16).decode())


def test_rotation_with_the_previous_key_in_the_ring(store, monkeypatch) -> None:
    """A practice connected by a process still on the old key during the switch is rotated by a re-run."""
    k1, k2, k3 = generate_key(), generate_key(), generate_key()
    monkeypatch.setenv(KEY_ENV, k1)
    _add(store, "early", {"api_key": "e"})
    assert rotate_key(store, k2) == 1
    _add(store, "straggler", {"api_key": "s"})  # written with k1 after the rotation committed
    monkeypatch.setenv(KEY_ENV, k2)
    monkeypatch.setenv(PREVIOUS_KEY_ENV, k1)
    assert store.practice_credentials("straggler") == {"api_key": "s"}
    assert unreadable_stored_practices(store) == ["straggler"]
    assert rotate_key(store, k3) == 2
    monkeypatch.setenv(KEY_ENV, k3)
    monkeypatch.delenv(PREVIOUS_KEY_ENV)
    assert unreadable_stored_practices(store) == []
    assert store.practice_credentials("early") == {"api_key": "e"}


def test_rotate_key_switches_the_key_file_atomically(store, monkeypatch, nvc_env) -> None:
    monkeypatch.delenv(KEY_ENV)
    old = load_key()
    _add(store, "p0", {"api_key": "file-held"})
    new = generate_key()
    assert rotate_key(store, new) == 1
    assert load_key() == base64.b64decode(new)
    assert (nvc_env / "secret.key").read_text().strip() == new
    assert stat.S_IMODE((nvc_env / "secret.key").stat().st_mode) == 0o600
    assert base64.b64decode((nvc_env / PREVIOUS_KEY_FILE).read_text()) == old
    assert not (nvc_env / PENDING_KEY_FILE).exists()
    assert store.practice_credentials("p0") == {"api_key": "file-held"}
    with pytest.raises(SecretKeyError):
        decrypt_credentials("p0", _blobs(store)["p0"], old)


def test_interrupted_file_rotation_locks_nobody_out(store, monkeypatch, nvc_env) -> None:
    """Crash after the commit, before the file switch: the pending key still opens everything and
    finishing the rotation to that key converges; another key is refused until then."""
    monkeypatch.delenv(KEY_ENV)
    load_key()
    _add(store, "p0", {"api_key": "k"})
    new = generate_key()
    import nvc_pipelines.crypto as crypto

    real_replace = os.replace

    def crash_on_switch(src, dst):
        if str(src).endswith(PENDING_KEY_FILE):
            raise KeyboardInterrupt  # the process dies between the commit and the key file switch
        real_replace(src, dst)

    monkeypatch.setattr(crypto.os, "replace", crash_on_switch)
    with pytest.raises(KeyboardInterrupt):
        rotate_key(store, new)
    monkeypatch.setattr(crypto.os, "replace", real_replace)
    assert (nvc_env / PENDING_KEY_FILE).exists()
    assert decrypt_credentials("p0", _blobs(store)["p0"], base64.b64decode(new)) == {"api_key": "k"}
    # secret.key still holds the old key; the pending one is in the ring, so the store still opens it.
    assert store.practice_credentials("p0") == {"api_key": "k"}
    (nvc_env / PREVIOUS_KEY_FILE).unlink()
    assert store.practice_credentials("p0") == {"api_key": "k"}
    with pytest.raises(SecretKeyError, match="interrupted"):
        rotate_key(store, generate_key())
    assert finish_interrupted_rotation(store) == 1
    assert finish_interrupted_rotation(store) is None
    assert load_key() == base64.b64decode(new) and not (nvc_env / PENDING_KEY_FILE).exists()
    assert store.practice_credentials("p0") == {"api_key": "k"}


def test_an_ambiguous_commit_keeps_the_staged_key(store, monkeypatch, nvc_env) -> None:
    """The connection drops during COMMIT but the server committed: the staged key must stay on disk."""
    from contextlib import contextmanager

    from nvc_pipelines.store.db import StoreUnavailable

    monkeypatch.delenv(KEY_ENV)
    old = load_key()
    _add(store, "p0", {"api_key": "k"})
    new = generate_key()
    real_begin = store.begin_owner
    calls = []

    @contextmanager
    def commit_then_lose_the_answer():
        calls.append(1)
        with real_begin() as conn:
            yield conn
        if len(calls) == 1:
            raise StoreUnavailable("connection lost during COMMIT")

    monkeypatch.setattr(store, "begin_owner", commit_then_lose_the_answer)
    with pytest.raises(StoreUnavailable):
        rotate_key(store, new)
    assert load_key() == old  # not switched: the caller saw a failure
    assert (nvc_env / PENDING_KEY_FILE).exists()  # but the key that sealed the rows is kept
    assert store.practice_credentials("p0") == {"api_key": "k"}
    assert finish_interrupted_rotation(store) == 1
    assert load_key() == base64.b64decode(new) and not (nvc_env / PENDING_KEY_FILE).exists()


def test_failed_file_rotation_leaves_the_key_file_alone(store, monkeypatch, nvc_env) -> None:
    monkeypatch.delenv(KEY_ENV)
    old = load_key()
    _add(store, "p0", {"api_key": "k"})
    with store.begin_owner() as conn:
        conn.execute(
            text("UPDATE practices SET credentials = :b WHERE practice_id = 'p0'"),
            {"b": encrypt_credentials("p0", {"api_key": "x"}, _key())},
        )
    with pytest.raises(SecretKeyError):
        rotate_key(store, generate_key())
    assert load_key() == old
    assert not (nvc_env / PENDING_KEY_FILE).exists() and not (nvc_env / PREVIOUS_KEY_FILE).exists()


def test_rotate_key_command(store, monkeypatch) -> None:
    """`nvc rotate-key`: the new key from standard input; `--finish` when nothing was interrupted."""
    from click.testing import CliRunner

    from nvc_pipelines.application.cli import main

    _add(store, "p0", {"api_key": "k"})
    new = generate_key()
    result = CliRunner().invoke(main, ["rotate-key"], input=new + "\n")
    assert result.exit_code == 0, result.output
    assert "Rotated the credentials of 1 practice(s)" in result.output and new not in result.output
    monkeypatch.setenv(KEY_ENV, new)
    assert store.practice_credentials("p0") == {"api_key": "k"}
    finish = CliRunner().invoke(main, ["rotate-key", "--finish"])
    assert finish.exit_code == 0 and "No interrupted rotation" in finish.output
