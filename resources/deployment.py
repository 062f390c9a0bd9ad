"""The resources of this deployment, as every job gets them: the store, the PMS gateway, the GOC register.

Built here, beside the clients, so that the code location (`nvc_pipelines.definitions`), the batch job
that runs each practice's sync (`schedules.jobs`) and the application all take them from one place.
"""

from __future__ import annotations

import os
from typing import Any

from dagster import EnvVar

from resources.acuitas import AcuitasResource
from resources.csv_source import CsvResource
from resources.gateway import PmsGateway
from resources.goc import GocRegisterResource
from resources.optisoft import OptisoftResource
from resources.optix import OptixResource
from resources.store import StoreResource
from resources.sycle import SycleResource


def store_resource() -> StoreResource:
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


def shared_resources() -> dict[str, Any]:
    """The resources by the keys the assets and ops ask for."""
    return {"store": store_resource(), "pms": pms_gateway(), "goc_register": goc_register()}
