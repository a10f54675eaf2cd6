"""One tracked run from start to end: the layer every command and the search build on.

runs (the one path: start, own, end FINISHED/FAILED/KILLED), run_logging (what a run logs),
provenance and hardware (where its inputs came from, what it ran on), checkpoints (resume),
signals (Ctrl-C and SIGTERM), liveness (owner and heartbeat), store (checked first),
shared_writes (retried writes), safe_model (a logged model read back without running its code),
mlflow_run (our command as the child of `mlflow run`). Imports nothing else of tracking/.
"""
