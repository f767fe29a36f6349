"""ipywidgets for mailkit: thin interactive layers over the ``mailkit`` library.

``SegmentBuilder`` (who), ``TemplatePreview`` (what they get), ``DispatchPanel`` (send it) and
``CampaignDashboard`` (what happened). Each takes the workspace Engine from ``mailkit.open_db``
and holds no business logic of its own.
"""

from .campaign_dashboard import CampaignDashboard
from .dispatch_panel import DispatchPanel
from .segment_builder import ConditionRow, SegmentBuilder
from .template_preview import TemplatePreview

__all__ = [
    "CampaignDashboard",
    "ConditionRow",
    "DispatchPanel",
    "SegmentBuilder",
    "TemplatePreview",
]
