"""The store as a Dagster resource."""

from __future__ import annotations

from dagster import ConfigurableResource

from nvc_pipelines.store import Store


class StoreResource(ConfigurableResource):
    """PostgreSQL holding practices, patients and recalls.

    `database_url` comes from `NVC_DATABASE_URL` (set it with `EnvVar`, so the password never shows
    in the UI); left unset, the embedded server under `$NVC_HOME` is used.
    """

    database_url: str | None = None

    def open(self) -> Store:
        return Store.open(self.database_url)
