"""The code location: each domain's definitions merged, plus the resources they share."""

from dagster import Definitions, in_process_executor

import assets.definitions as sync_domain
import schedules.definitions as scheduling_domain
from resources.deployment import shared_resources

# In process by default, so Materialize in the UI (Dagster's implicit asset job) runs a practice's
# sync like `practice_sync` does, not one process per step.
defs = Definitions.merge(
    sync_domain.defs,
    scheduling_domain.defs,
    Definitions(resources=shared_resources(), executor=in_process_executor),
)
