"""The code location: each domain's definitions merged, plus the resources they share."""

import os

from dagster import Definitions, EnvVar, in_process_executor

import assets.definitions as sync_domain
import schedules.definitions as scheduling_domain
from resources.acuitas import AcuitasResource
from resources.csv_source import CsvResource
from resources.gateway import PmsGateway
from resources.goc import GocRegisterResource
from resources.optisoft import OptisoftResource
from resources.optix import OptixResource
from resources.store import StoreResource
from resources.sycle import SycleResource


def _store() -> StoreResource:
    # EnvVar keeps the URLs (and their passwords) out of the UI; unset means the embedded server.
    return StoreResource(
        database_url=EnvVar("NVC_DATABASE_URL") if os.environ.get("NVC_DATABASE_URL") else None,
        owner_database_url=EnvVar("NVC_OWNER_DATABASE_URL") if os.environ.get("NVC_OWNER_DATABASE_URL") else None,
    )


def pms_gateway() -> PmsGateway:
    """Every PMS resource with its deployment-wide defaults (per-practice settings live in the store)."""
    return PmsGateway(
        csv=CsvResource(),
        optix=OptixResource(),
        acuitas=AcuitasResource(),
        optisoft=OptisoftResource(),
        sycle=SycleResource(),
    )


def goc_register() -> GocRegisterResource:
    """The GOC register (NVC_GOC_REGISTER_URL; unset: clinicians stay unverified and bookings naming one wait)."""
    return GocRegisterResource(
        register_url=EnvVar("NVC_GOC_REGISTER_URL") if os.environ.get("NVC_GOC_REGISTER_URL") else None
    )


resources = {"store": _store(), "pms": pms_gateway(), "goc_register": goc_register()}

# In process by default, so Materialize in the UI (Dagster's implicit asset job) runs a practice's
# sync like `practice_sync` does, not one process per step.
defs = Definitions.merge(
    sync_domain.defs,
    scheduling_domain.defs,
    Definitions(resources=resources, executor=in_process_executor),
)
