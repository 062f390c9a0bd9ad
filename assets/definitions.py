"""The sync domain's definitions."""

from dagster import Definitions, load_assets_from_modules

from assets import sync

defs = Definitions(assets=load_assets_from_modules([sync]))
