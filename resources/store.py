"""The store as a Dagster resource."""

from __future__ import annotations

from dagster import ConfigurableResource

from nvc_pipelines.store import Store


class StoreResource(ConfigurableResource):
    """PostgreSQL holding practices, patients and recalls.

    `database_url` comes from `NVC_DATABASE_URL` (the application's login, `nvc_service`) and
    `owner_database_url` from `NVC_OWNER_DATABASE_URL` (the owner's, for migrations; set only where
    they run, never in run pods). Set them with `EnvVar`, so passwords never show in the UI; left
    unset, the embedded server under `$NVC_HOME` is used.
    """

    database_url: str | None = None
    owner_database_url: str | None = None

    def open(self) -> Store:
        return Store.open(self.database_url, owner_url=self.owner_database_url)
