"""Alembic environment: mailkit always passes an open connection in ``config.attributes``."""

from __future__ import annotations

from alembic import context

from mailkit.storage.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things; batch mode rebuilds tables there and is a no-op elsewhere.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
