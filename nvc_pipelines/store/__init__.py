"""The PostgreSQL store: schema migrations, bulk idempotent writes, the practice registry."""

from nvc_pipelines.store.db import StoreUnavailable
from nvc_pipelines.store.store import PracticeExists, PracticeNotFound, Store, WriteCounts

__all__ = ["PracticeExists", "PracticeNotFound", "Store", "StoreUnavailable", "WriteCounts"]
