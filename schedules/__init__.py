"""Schedules and sensors: when practice syncs run."""
