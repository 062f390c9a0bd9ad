"""Recalls record the test date they were counted from, so a check can re-derive every due date.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE recalls ADD COLUMN based_on date")
