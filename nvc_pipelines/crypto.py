"""PMS credentials encrypted at rest with AES-256-GCM.

The key comes from `NVC_SECRET_KEY` (32 bytes, base64). Without it, a key is generated once into
`$NVC_HOME/secret.key` (mode 0600) so the embedded demo works out of the box; production sets the
environment variable. The practice id is bound in as associated data, so a ciphertext copied onto
another practice's row does not decrypt.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nvc_pipelines.config import nvc_home

_NONCE_BYTES = 12
_VERSION = b"\x01"


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


def generate_key() -> str:
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()


def load_key() -> bytes:
    env = os.environ.get("NVC_SECRET_KEY")
    if env:
        return _decode_key(env, "NVC_SECRET_KEY")
    path: Path = nvc_home() / "secret.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(generate_key() + "\n")
    return _decode_key(path.read_text(), str(path))


def encrypt_credentials(practice_id: str, credentials: dict[str, str], key: bytes | None = None) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    plaintext = json.dumps(credentials, sort_keys=True).encode()
    return _VERSION + nonce + AESGCM(key or load_key()).encrypt(nonce, plaintext, practice_id.encode())


def decrypt_credentials(practice_id: str, blob: bytes | None, key: bytes | None = None) -> dict[str, str]:
    if not blob:
        return {}
    if blob[:1] != _VERSION:
        raise SecretKeyError(f"credentials of practice {practice_id} are in an unknown format")
    nonce, ciphertext = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
    try:
        plaintext = AESGCM(key or load_key()).decrypt(nonce, ciphertext, practice_id.encode())
    except InvalidTag:
        raise SecretKeyError(
            f"credentials of practice {practice_id} cannot be decrypted with the current NVC_SECRET_KEY"
        ) from None
    return json.loads(plaintext)
