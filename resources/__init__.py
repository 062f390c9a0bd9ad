"""Dagster resources: one per PMS (all behind `PmsClient`), the shared HTTP client, and the store."""
