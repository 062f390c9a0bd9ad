"""The code location: each domain's definitions merged, plus the resources they share."""

from dagster import Definitions

import assets.definitions as sync_domain
import schedules.definitions as scheduling_domain
from resources.deployment import shared_resources
from resources.executor import run_executor

# In process by default, so Materialize in the UI (Dagster's implicit asset job) runs a practice's
# sync like `practice_sync` does, not one process per step (`run_executor`: Dagster's in-process
# executor, with the run's storage holding its connections).
defs = Definitions.merge(
    sync_domain.defs,
    scheduling_domain.defs,
    Definitions(resources=shared_resources(), executor=run_executor),
)
