"""Tracking: signed tokens, link rewriting, the ASGI server for opens, clicks and unsubscribes."""

from .tokens import (
    TOKEN_KINDS,
    Keyring,
    build_keyring,
    load_keyring,
    save_keyring_file,
    sign_token,
    verify_token,
)

__all__ = [
    "TOKEN_KINDS",
    "Keyring",
    "build_keyring",
    "load_keyring",
    "save_keyring_file",
    "sign_token",
    "verify_token",
]
