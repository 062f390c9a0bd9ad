"""Recalls say when the PMS's date (which wins) is later than the guideline's.

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE recalls
            ADD COLUMN warnings text[] NOT NULL DEFAULT '{}',
            ADD COLUMN guideline_due_date date;
        """
    )
