"""Per-practice assets: thin Dagster wiring around the core (read via a resource, call the core, record metadata)."""

import warnings

from dagster import PreviewWarning

# Partitioned asset checks are a Dagster preview feature, chosen knowingly: its warning is kept out
# of operators' output (the CLI, run logs, the daemon's log) instead of printed on every load.
warnings.filterwarnings("ignore", category=PreviewWarning)
