"""Promotion's parts, used by ``python -m tracking.promote``: which run may be promoted, and the registry.

candidates (the criteria, the verified candidate runs), registry (one registered version per
run, whoever else promotes at the same moment). Builds on lifecycle/ and search's names.
"""
