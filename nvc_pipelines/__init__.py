"""NVC Pipelines: the domain core (model, normalisation, recall rules, store) plus CLI and sandboxes.

The core modules import neither Dagster nor any PMS resource, so they can be tested on their own.
"""
