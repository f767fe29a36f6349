"""The mailkit error tree.

Errors that concern a whole operation are exceptions; errors that concern one recipient are
data (a ledger state, a row in an import report). Every class sits under one root and, where
a builtin fits, also subclasses it so that ``except ValueError`` keeps working::

    MailkitError
    ├── ConfigError(ValueError)          a setting is missing or malformed
    ├── StorageError                     the database cannot be opened or migrated
    ├── ContactImportError               a contact file cannot be read at all
    │   └── EncodingDetectionError(UnicodeError)
    ├── NotFoundError(LookupError)       a named list / template / campaign does not exist
    ├── SegmentError(ValueError)         a segment expression is not allowed
    ├── TemplateError(ValueError)        a template does not compile or render
    │   ├── TemplateSecurityError        the sandbox refused an unsafe operation
    │   └── PreflightError               some recipients cannot be rendered
    ├── AddressError(ValueError)         an address or header cannot go into a message
    ├── CampaignError                    a campaign cannot be created or sent in its state
    ├── SMTPDeliveryError(ConnectionError)  the SMTP server cannot be used at all
    ├── TokenError(ValueError)           a tracking/unsubscribe/bounce token is forged or unknown
    └── MailboxError(ConnectionError)    a bounce mailbox (IMAP) cannot be reached or read
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from unicodedata import east_asian_width

__all__ = [
    "AddressError",
    "CampaignError",
    "ConfigError",
    "ContactImportError",
    "EncodingDetectionError",
    "MailboxError",
    "MailkitError",
    "NotFoundError",
    "PreflightError",
    "SMTPDeliveryError",
    "SegmentError",
    "StorageError",
    "TemplateError",
    "TemplateSecurityError",
    "TokenError",
]


class MailkitError(Exception):
    """Root of every error mailkit raises on purpose."""


class ConfigError(MailkitError, ValueError):
    """A setting is missing or malformed."""


class StorageError(MailkitError):
    """The database cannot be opened, migrated or written."""


class ContactImportError(MailkitError):
    """A contact file cannot be imported at all (nothing was changed)."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class EncodingDetectionError(ContactImportError, UnicodeError):
    """None of the candidate encodings decodes the file."""


class NotFoundError(MailkitError, LookupError):
    """A named object (list, template, campaign) does not exist."""

    def __init__(self, kind: str, key: object) -> None:
        super().__init__(f"no {kind} {key!r}")
        self.kind = kind
        self.key = key


class SegmentError(MailkitError, ValueError):
    """A segment expression is not valid or not allowed.

    ``offset`` is the 0-based character offset of the offending token in ``expression``
    when it is known, so a UI can point at it.
    """

    def __init__(self, message: str, *, expression: str = "", offset: int | None = None) -> None:
        if expression and offset is not None:
            # Pad by display width so the caret sits under full-width Japanese text too.
            width = sum(2 if east_asian_width(ch) in "WF" else 1 for ch in expression[:offset])
            pointer = " " * width + "^"
            message = f"{message}\n  {expression}\n  {pointer}"
        super().__init__(message)
        self.expression = expression
        self.offset = offset


class TemplateError(MailkitError, ValueError):
    """A template does not compile or cannot be rendered."""

    def __init__(self, message: str, *, template: str | None = None, part: str | None = None):
        super().__init__(message)
        self.template = template
        self.part = part


class TemplateSecurityError(TemplateError):
    """The sandbox refused an unsafe operation (attribute access, call, ...)."""


class PreflightError(TemplateError):
    """Some recipients cannot be rendered; ``failures`` lists them."""

    def __init__(self, message: str, *, failures: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.failures = list(failures)


class AddressError(MailkitError, ValueError):
    """An address or header value cannot be put in a message (malformed, or a CR/LF injection)."""


class CampaignError(MailkitError):
    """A campaign cannot be created, started or sent in its current state."""


class SMTPDeliveryError(MailkitError, ConnectionError):
    """The SMTP server cannot be reached or refuses the session as a whole."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class TokenError(MailkitError, ValueError):
    """A signed token does not verify. The message is the same for every cause on purpose."""


class MailboxError(MailkitError, ConnectionError):
    """A bounce mailbox (IMAP) cannot be reached, logged into or read; nothing was marked seen."""
