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
    """

    db_url: str = DEFAULT_DB_URL
    smtp_url: str | None = None


def load_settings(*, db_url: str | None = None, smtp_url: str | None = None) -> Settings:
    """Settings from explicit arguments, else the environment, else the defaults."""
    return Settings(
        db_url=db_url or os.environ.get("MAILKIT_DB") or DEFAULT_DB_URL,
        smtp_url=smtp_url or os.environ.get("MAILKIT_SMTP_URL") or None,
    )
