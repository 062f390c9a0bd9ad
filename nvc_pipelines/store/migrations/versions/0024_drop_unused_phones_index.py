"""Drop `patients_phones_gin`: no statement can use it, and every patient write paid for it.

The GIN index on `patients.phones` (migration 0001) answers `@>`, `<@`, `&&` and `=` on the whole
array. The store looks patients up by a number with `:phone = ANY(phones)` (a dial check's entry)
and by `unnest(phones)` (matching, households), which a GIN index cannot serve, and by the call
list's own `phone` column. So the index was kept up to date on every insert of a patient and every
change of their numbers, for no read.

Revision ID: 0024
Revises: 0023
"""

from alembic import op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP INDEX IF EXISTS patients_phones_gin")


def downgrade() -> None:
    op.execute("CREATE INDEX IF NOT EXISTS patients_phones_gin ON patients USING gin (phones)")
