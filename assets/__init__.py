"""Per-practice assets: thin Dagster wiring around the core (read via a resource, call the core, record metadata)."""

import warnings

from dagster import BetaWarning, PreviewWarning

# Partitioned asset checks (a Dagster preview feature) and source code references (beta) are chosen
# knowingly: their warnings are kept out of operators' output (the CLI, run logs, the daemon's log)
# instead of printed on every load.
warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)
