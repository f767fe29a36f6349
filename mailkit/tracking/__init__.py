"""Tracking: signed tokens, link rewriting, the ASGI server for opens, clicks and unsubscribes."""

from .actions import save_unsubscribe
from .app import build_app, hash_client_ip
from .heuristics import MachineRules
from .rewrite import extract_links, rewrite_links
from .server import serve_tracking, serve_tracking_async
from .tokens import (
    TOKEN_KINDS,
    Keyring,
    build_keyring,
    load_keyring,
    save_keyring_file,
    sign_token,
    verify_token,
)
from .tracker import TRACKING_URL_ENV, CampaignTracker, build_tracker

__all__ = [
    "TOKEN_KINDS",
    "TRACKING_URL_ENV",
    "CampaignTracker",
    "Keyring",
    "MachineRules",
    "build_app",
    "build_keyring",
    "build_tracker",
    "extract_links",
    "hash_client_ip",
    "load_keyring",
    "rewrite_links",
    "save_keyring_file",
    "save_unsubscribe",
    "serve_tracking",
    "serve_tracking_async",
    "sign_token",
    "verify_token",
]
