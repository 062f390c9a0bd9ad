"""The sync domain's definitions. Each asset carries a reference to its source (file and line), which
the UI links to, so an engineer reading an asset's page can open the code that builds it."""

from dagster import (
    Definitions,
    load_asset_checks_from_modules,
    load_assets_from_modules,
    with_source_code_references,
)

from assets import checks, sync, writeback

defs = Definitions(
    assets=with_source_code_references(load_assets_from_modules([sync, writeback])),
    asset_checks=load_asset_checks_from_modules([checks, writeback]),
)
