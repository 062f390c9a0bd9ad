"""Faithful stand-ins for the PMS services, served for real on loopback.

They exist for the demo, the tests and the benchmarks. Nothing on the product path imports them.
"""
