"""VERP bounce addresses: ``bounces+TOKEN@domain``, where TOKEN is a signed ``bounce`` token.

The token names the ledger row (``messages.id``) of the message, so a bounce is mapped to its
exact recipient and campaign from the envelope address alone, even when the bounce body is
mangled or written in a form no parser knows. Tokens are lower-case base32 and dots, so they
survive mail servers that fold the case of addresses; the separator may come back as ``+``,
``-`` or ``=`` (relays and mailing-list software rewrite it), and the address may come back
inside angle brackets or with a display name.
"""

from __future__ import annotations

import re

from ..errors import TokenError
from ..tracking.tokens import Keyring, sign_token, verify_token

__all__ = ["VERP_PREFIX", "build_verp_address", "decode_verp"]

#: The local part before the separator.
VERP_PREFIX = "bounces"

# A token as tokens.py writes it (kid . payload . tag), found anywhere after the separator.
_TOKEN_IN_LOCAL = re.compile(r"[+=\-]([a-z0-9]{1,8}\.[a-z2-7]{1,64}\.[a-z2-7]{20})(?![a-z2-7])")
_ADDR = re.compile(r"<([^<>]*)>")


def build_verp_address(
    keyring: Keyring, message_row_id: int, domain: str, *, prefix: str = VERP_PREFIX
) -> str:
    """The Return-Path ``prefix+TOKEN@domain`` for the ledger row ``message_row_id``."""
    if not domain or "@" in domain or any(c.isspace() for c in domain):
        raise ValueError(f"not a mail domain: {domain!r}")
    token = sign_token(keyring, "bounce", message_row_id)
    return f"{prefix}+{token}@{domain.lower()}"


def decode_verp(address: str, keyring: Keyring) -> int | None:
    """The ledger row id a VERP address names, or None when it is not one of ours or forged.

    Accepts any case, ``+``/``-``/``=`` as the separator, ``<...>`` and display names, and
    an ``rfc822;`` type prefix as DSN fields write it. Never raises on bad input.
    """
    text = address.strip()
    bracketed = _ADDR.search(text)
    if bracketed:
        text = bracketed.group(1)
    if ";" in text:  # "rfc822; bounces+...@x" as in Final-Recipient / Original-Recipient
        text = text.split(";", 1)[1]
    local = text.strip().rsplit("@", 1)[0].lower()
    match = _TOKEN_IN_LOCAL.search(local)
    if match is None:
        return None
    try:
        ids = verify_token(keyring, match.group(1), "bounce")
    except TokenError:
        return None
    return ids[0] if len(ids) == 1 else None
