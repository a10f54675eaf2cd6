"""MLflow and Optuna glue for mnist_mlflow: the commands at the top level, their parts below.

A module here is a command, ``python -m tracking.NAME`` (stage, consistency, noise, report,
confirm, tune, promote, doctor, server; the search is the package search/), or cli.py, which
they all share, or a report of theirs (confirm_report, tune_report). Their parts, by concern:

- lifecycle/: one run from start to end: the one logging path, checkpoints, signals, owners, store
- search/: the Optuna search, its trials as nested runs
- promotion/: which run may be promoted, and registering it in the Model Registry

Imports go down only, bottom up: lifecycle/, cli, search/, promotion/, the commands; no two of
these import each other (tests/test_import_layers.py).
"""
