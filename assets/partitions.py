"""One dynamic partition per connected practice; `nvc practice connect` adds it, disconnect removes it."""

from dagster import DynamicPartitionsDefinition

practices_partitions = DynamicPartitionsDefinition(name="practices")
