"""Alembic's entry point, run by :func:`auto_glm.tenants.database.migrate`.

It migrates the connection that ``migrate`` passes in ``config.attributes["connection"]``,
inside that connection's transaction. To add a revision, change ``schema.py`` and write
``versions/NNNN_what.py`` by hand after ``0001_initial.py`` (``down_revision`` is the
previous file's ``revision``); every store applies it when it opens.
"""

from alembic import context

from auto_glm.tenants.schema import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=True,  # SQLite changes columns by copying the table
)
with context.begin_transaction():
    context.run_migrations()
