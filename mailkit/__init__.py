"""mailkit: email campaigns from JupyterLab.

contacts → segment → template → campaign → ledger → SMTP → events → report.
Everything public is re-exported here; ``__all__`` is kept complete by a test.
"""

from .config import Settings, load_settings
from .errors import (
    CampaignError,
    ConfigError,
    ContactImportError,
    EncodingDetectionError,
    MailkitError,
    NotFoundError,
    PreflightError,
    SegmentError,
    SMTPDeliveryError,
    StorageError,
    TemplateError,
    TemplateSecurityError,
)
from .storage import open_db

__version__ = "0.1.0"

__all__ = [
    "CampaignError",
    "ConfigError",
    "ContactImportError",
    "EncodingDetectionError",
    "MailkitError",
    "NotFoundError",
    "PreflightError",
    "SMTPDeliveryError",
    "SegmentError",
    "Settings",
    "StorageError",
    "TemplateError",
    "TemplateSecurityError",
    "__version__",
    "load_settings",
    "open_db",
]
