"""The application layer: the services the CLI and the demo share (connect, sync, export; the Dagster
instance, the dev server, runs), and the CLI on top of them. It runs the Dagster wiring's jobs; nothing
below it imports it."""
