"""One resource that hands out the right PMS client for a practice, whichever PMS it is on."""

from __future__ import annotations

from dagster import ConfigurableResource

from nvc_pipelines.model import PmsKind, Practice
from resources.acuitas import AcuitasResource
from resources.csv_source import CsvResource
from resources.optisoft import OptisoftResource
from resources.optix import OptixResource
from resources.protocol import PmsClient, PmsResourceBase
from resources.sycle import SycleResource


class UnsupportedPms(ValueError):
    pass


class PmsGateway(ConfigurableResource):
    """Nested PMS resources, one per kind; each is configured once for the whole deployment."""

    csv: CsvResource
    optix: OptixResource
    acuitas: AcuitasResource
    optisoft: OptisoftResource
    sycle: SycleResource

    def resource_for(self, kind: PmsKind | str) -> PmsResourceBase:
        resource = getattr(self, str(kind), None)
        if resource is None:
            known = ", ".join(k for k in PmsKind if getattr(self, str(k), None) is not None)
            raise UnsupportedPms(f"PMS {kind!r} is not supported yet; supported: {known}")
        return resource

    def open(self, practice: Practice, credentials: dict[str, str], *, max_attempts: int | None = None) -> PmsClient:
        """The practice's client; `max_attempts` overrides this deployment's tries per request (a sync
        started from a shell is someone waiting: it gives up sooner, and says so)."""
        resource = self.resource_for(practice.pms_kind)
        if max_attempts is not None and hasattr(resource, "max_attempts"):
            resource = resource.model_copy(update={"max_attempts": max_attempts})
        return resource.open(practice, credentials)
