"""ipywidgets for mailkit: thin interactive layers over the ``mailkit`` library."""

__all__: list[str] = []
