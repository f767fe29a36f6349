"""Signed tokens for tracking links, unsubscribe links and VERP bounce addresses.

A token names what it is for (its *kind*) and the ids it refers to, and carries an
HMAC-SHA256 tag made with a workspace secret. The secret has a key id, written into the token,
so keys can be rotated: new tokens use the current key, old ones verify with the key they name
for as long as it stays in the keyring.

Tokens are lower-case base32 and dots only, so they survive in URLs and in the local part of a
VERP address even through mail servers that fold the case of addresses::

    k1.aebagbaf.3nhq7x2m4vhcqkfa6bz5l4iy      (key id . payload . tag)

Secrets come from ``MAILKIT_SECRET_KEYS`` (``kid:base64secret`` pairs, comma separated, the first
one current), or from a key file (``MAILKIT_SECRET_FILE``, one ``kid base64secret`` per line,
the first one current). A SQLite workspace without either gets a key file beside its database,
created with mode 0600; nothing secret is ever written to the database.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url

from ..errors import ConfigError, TokenError

__all__ = [
    "TOKEN_KINDS",
    "Keyring",
    "build_keyring",
    "load_keyring",
    "save_keyring_file",
    "sign_token",
    "verify_token",
]

#: What a token may stand for; the kind is bound into the tag, so a token of one kind can
#: never be used as another.
TOKEN_KINDS = {
    "open": 1,  # (message_row_id,)
    "click": 2,  # (message_row_id, link_id)
    "unsubscribe": 3,  # (message_row_id,)
    "bounce": 4,  # (message_row_id,)
}
_TAG_BYTES = 12  # 96 bits: forging one takes ~2**95 guesses against the tracking server
_KID = re.compile(r"^[a-z0-9]{1,8}$")
_TOKEN = re.compile(r"^([a-z0-9]{1,8})\.([a-z2-7]{1,64})\.([a-z2-7]{20})$")
_MIN_SECRET = 16


@dataclass(frozen=True)
class Keyring:
    """Signing secrets by key id; ``current`` signs new tokens. Its repr shows no secret."""

    keys: Mapping[str, bytes] = field(repr=False)
    current: str

    def __post_init__(self) -> None:
        if self.current not in self.keys:
            raise ConfigError(f"current key id {self.current!r} is not in the keyring")
        for kid, secret in self.keys.items():
            if not _KID.match(kid):
                raise ConfigError(f"key id {kid!r} must be 1–8 lower-case letters or digits")
            if len(secret) < _MIN_SECRET:
                raise ConfigError(f"secret of key {kid!r} is shorter than {_MIN_SECRET} bytes")


def build_keyring(kid: str = "k1") -> Keyring:
    """A new keyring with one fresh random 32-byte secret."""
    return Keyring({kid: secrets.token_bytes(32)}, kid)


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)
    return base64.b32decode(padded)


def _varints(values: tuple[int, ...]) -> bytes:
    out = bytearray()
    for value in values:
        if value < 0:
            raise ValueError("token ids are non-negative")
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                break
    return bytes(out)


def _unvarints(data: bytes) -> tuple[int, ...]:
    values: list[int] = []
    value = shift = 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(value)
            value = shift = 0
        elif shift > 63:
            raise ValueError("id too large")
    if shift:
        raise ValueError("truncated id")
    return tuple(values)


def _tag(secret: bytes, kid: str, kind: str, payload: bytes) -> bytes:
    message = b"mailkit-token-v1\x00" + kid.encode() + b"\x00" + kind.encode() + b"\x00" + payload
    return hmac.new(secret, message, hashlib.sha256).digest()[:_TAG_BYTES]


def sign_token(keyring: Keyring, kind: str, *ids: int) -> str:
    """A token for ``kind`` and ``ids``, signed with the keyring's current key."""
    if kind not in TOKEN_KINDS:
        raise ValueError(f"unknown token kind {kind!r}")
    payload = _varints(ids)
    kid = keyring.current
    return f"{kid}.{_b32(payload)}.{_b32(_tag(keyring.keys[kid], kid, kind, payload))}"


def verify_token(keyring: Keyring, token: str, kind: str) -> tuple[int, ...]:
    """The ids of a valid token of this kind, or TokenError (one message for every failure)."""
    match = _TOKEN.match(token.strip().lower())
    secret = keyring.keys.get(match.group(1)) if match else None
    if match is None or secret is None or kind not in TOKEN_KINDS:
        raise TokenError("invalid or expired link")
    kid, payload_text, tag_text = match.groups()
    try:
        payload, tag = _unb32(payload_text), _unb32(tag_text)
        ids = _unvarints(payload)
    except (binascii.Error, ValueError):
        raise TokenError("invalid or expired link") from None
    if not hmac.compare_digest(tag, _tag(secret, kid, kind, payload)):
        raise TokenError("invalid or expired link")
    return ids


def _parse_pairs(text: str, sep: str, where: str) -> Keyring:
    keys: dict[str, bytes] = {}
    order: list[str] = []
    lines = [line for line in text.splitlines() if not line.strip().startswith("#")]
    for raw in ",".join(lines).split(","):
        item = raw.strip()
        if not item:
            continue
        kid, _, secret_text = item.partition(sep)
        try:
            secret = base64.b64decode(secret_text.strip(), validate=True)
        except binascii.Error:
            raise ConfigError(f"{where}: the secret of key {kid.strip()!r} is not base64") from None
        keys[kid.strip()] = secret
        order.append(kid.strip())
    if not order:
        raise ConfigError(f"{where} holds no keys")
    return Keyring(keys, order[0])


def save_keyring_file(keyring: Keyring, path: str | os.PathLike[str]) -> Path:
    """Write a key file (mode 0600, created without a world-readable moment); never overwrites."""
    target = Path(path)
    lines = [f"{keyring.current} {base64.b64encode(keyring.keys[keyring.current]).decode()}"]
    lines += [
        f"{kid} {base64.b64encode(secret).decode()}"
        for kid, secret in keyring.keys.items()
        if kid != keyring.current
    ]
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write("# mailkit signing keys: first line signs, all lines verify\n")
        fh.write("\n".join(lines) + "\n")
    return target


def load_keyring(db_url: str | None = None, *, create: bool = True) -> Keyring:
    """The workspace keyring from the environment, a key file, or beside a SQLite database.

    Order: ``MAILKIT_SECRET_KEYS``, then ``MAILKIT_SECRET_FILE``, then ``<database>.keys``
    next to a SQLite database file (created on first use when ``create``). Other databases
    need one of the two settings, since several machines must share the same secret.
    """
    inline = os.environ.get("MAILKIT_SECRET_KEYS")
    if inline:
        return _parse_pairs(inline.replace(":", " "), " ", "MAILKIT_SECRET_KEYS")
    file_setting = os.environ.get("MAILKIT_SECRET_FILE")
    if file_setting:
        return _load_file(Path(file_setting))
    if db_url:
        url = make_url(db_url)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            path = Path(url.database).expanduser().with_name(Path(url.database).name + ".keys")
            if path.exists():
                return _load_file(path)
            if create:
                keyring = build_keyring()
                try:
                    save_keyring_file(keyring, path)
                except FileExistsError:  # another process created it first: use theirs
                    return _load_file(path)
                return keyring
    raise ConfigError(
        "no signing secret: set MAILKIT_SECRET_KEYS='k1:<base64 of 32 random bytes>' or "
        "MAILKIT_SECRET_FILE=/path/to/keys (the same on every machine of the workspace)"
    )


def _load_file(path: Path) -> Keyring:
    try:
        text = path.read_text(encoding="ascii")
    except OSError as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc.strerror}") from None
    return _parse_pairs(text, " ", str(path))
