"""Stream rows are compared column by column in the database: `content_hash` goes.

A sync used to hash every row it read in Python (JSON, then SHA-256) and compare the hashes; the
merge now compares the staged row's columns with the stored row's (`IS DISTINCT FROM`), which is
exact, null-safe and costs the sync nothing per row. Dropping a column is a catalogue change: no
row is rewritten.

Revision ID: 0017
Revises: 0016
"""

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

TABLES = ("patients", "appointments", "clinical_records")


def upgrade() -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} DROP COLUMN content_hash")


def downgrade() -> None:
    # An empty hash differs from every computed one: the older code rewrites each row once.
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ADD COLUMN content_hash text NOT NULL DEFAULT ''")
