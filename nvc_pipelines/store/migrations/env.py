"""Alembic environment: always run programmatically by `nvc_pipelines.store.migrate`, with a connection."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table="alembic_version")
with context.begin_transaction():
    context.run_migrations()
