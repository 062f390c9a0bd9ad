"""The rows changed since a mark, by index: what a nightly's checks read of each table.

A nightly's validity checks read the patients, appointments and recalls written since they last
passed (`ChecksMixin.quality_rows`: `updated_at > :since`, `computed_at > :since`). With no index on
those columns each read scanned the whole practice: at 200,000 patients about 30-110 ms a table,
for the 1% that changed. Each index is (practice, time): the practice's recent rows are one range.
Every write already sets the column, so a full sync pays one more index entry a row.

Revision ID: 0020
Revises: 0019
"""

from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX patients_changed ON patients (practice_id, updated_at)")
    op.execute("CREATE INDEX appointments_changed ON appointments (practice_id, updated_at)")
    op.execute("CREATE INDEX recalls_changed ON recalls (practice_id, computed_at)")


def downgrade() -> None:
    op.execute("DROP INDEX recalls_changed")
    op.execute("DROP INDEX appointments_changed")
    op.execute("DROP INDEX patients_changed")
