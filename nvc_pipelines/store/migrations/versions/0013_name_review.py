"""Patients whose name mixes look-alike letters of different scripts carry why, for a person to check.

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE patients ADD COLUMN name_review text")


def downgrade() -> None:
    op.execute("ALTER TABLE patients DROP COLUMN name_review")
