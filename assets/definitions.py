"""The sync domain's definitions."""

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules

from assets import checks, sync, writeback

defs = Definitions(
    assets=load_assets_from_modules([sync, writeback]), asset_checks=load_asset_checks_from_modules([checks])
)
