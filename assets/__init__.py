"""Per-practice assets: thin Dagster wiring around the core (read via a resource, call the core, record metadata)."""
