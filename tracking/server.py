"""Starts the project's MLflow tracking server: ``python -m tracking.server``.

Defaults suit one machine: the local SQLite file `mlflow.db`, artifacts served from the local
folder `mlartifacts/`, bound to 127.0.0.1. For a team, pass a PostgreSQL URL
(``--backend-store-uri postgresql://user:pass@db-host/mlflow``; needs ``pip install -e '.[postgres]'``)
and any artifact store MLflow supports (``--artifacts-destination s3://bucket/mlflow``); the
model registry lives in the same database. Clients then set
``MLFLOW_TRACKING_URI=http://HOST:PORT`` for `mlflow run`, the search and the promotion.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def server_command(backend: str, artifacts: str, host: str, port: int, workers: int) -> list[str]:
    """The `mlflow server` command line; `--serve-artifacts` proxies artifacts for clients."""
    return ["mlflow", "server", "--backend-store-uri", backend, "--registry-store-uri", backend,
            "--artifacts-destination", artifacts, "--serve-artifacts", "--host", host,
            "--port", str(port), "--workers", str(workers)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tracking.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    p.add_argument("--artifacts-destination", default=str(Path("mlartifacts").resolve()))
    p.add_argument("--host", default="127.0.0.1", help="use 0.0.0.0 only behind a firewall or proxy")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"error: --port={args.port} is not allowed: 1-65535", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"error: --workers={args.workers} is not allowed: 1 or more", file=sys.stderr)
        return 2
    cmd = server_command(args.backend_store_uri, args.artifacts_destination, args.host, args.port,
                         args.workers)
    # MLflow's job runner (huey consumers for GenAI scorers) starts seven processes that this
    # project never uses; a user who wants it sets the variable to true.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print("starting:", " ".join(cmd), flush=True)
    os.execvp(cmd[0], cmd)  # the server replaces us: signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
