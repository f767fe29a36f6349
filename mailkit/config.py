"""Settings in one place: environment variables, with explicit arguments taking precedence."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["DEFAULT_DB_URL", "Settings", "load_settings"]

DEFAULT_DB_URL = "sqlite:///mailkit.db"


@dataclass(frozen=True)
class Settings:
    """Workspace settings.

    ``db_url``   SQLAlchemy URL of the workspace database (``MAILKIT_DB``).
    ``smtp_url`` where campaigns are sent (``MAILKIT_SMTP_URL``), e.g. ``smtp://host:25``,
                 ``smtp+starttls://user:pass@host:587`` or ``smtps://host:465``.
    ``dkim_domain`` / ``dkim_selector`` / ``dkim_key``  DKIM signing domain (d=), selector (s=)
                 and the path of the RSA private key file (``MAILKIT_DKIM_DOMAIN``,
                 ``MAILKIT_DKIM_SELECTOR``, ``MAILKIT_DKIM_KEY``); campaigns are signed when
                 all three are set.
    ``dkim_ed25519_selector`` / ``dkim_ed25519_key``  an optional second, Ed25519 signature
                 (``MAILKIT_DKIM_ED25519_SELECTOR``, ``MAILKIT_DKIM_ED25519_KEY``).
    """

    db_url: str = DEFAULT_DB_URL
    smtp_url: str | None = None
    dkim_domain: str | None = None
    dkim_selector: str | None = None
    dkim_key: str | None = None
    dkim_ed25519_selector: str | None = None
    dkim_ed25519_key: str | None = None


def load_settings(*, db_url: str | None = None, smtp_url: str | None = None) -> Settings:
    """Settings from explicit arguments, else the environment, else the defaults."""
    return Settings(
        db_url=db_url or os.environ.get("MAILKIT_DB") or DEFAULT_DB_URL,
        smtp_url=smtp_url or os.environ.get("MAILKIT_SMTP_URL") or None,
        dkim_domain=os.environ.get("MAILKIT_DKIM_DOMAIN") or None,
        dkim_selector=os.environ.get("MAILKIT_DKIM_SELECTOR") or None,
        dkim_key=os.environ.get("MAILKIT_DKIM_KEY") or None,
        dkim_ed25519_selector=os.environ.get("MAILKIT_DKIM_ED25519_SELECTOR") or None,
        dkim_ed25519_key=os.environ.get("MAILKIT_DKIM_ED25519_KEY") or None,
    )
