"""Starts the project's MLflow tracking server: ``python -m tracking.server``.

Defaults suit one machine: the local SQLite file `mlflow.db`, artifacts served from the local
folder `mlartifacts/`, bound to 127.0.0.1. For a team, pass a PostgreSQL URL
(``--backend-store-uri postgresql://user:pass@db-host/mlflow``; needs ``pip install -e '.[postgres]'``)
and any artifact store MLflow supports (``--artifacts-destination s3://bucket/mlflow``); the
model registry lives in the same database. Clients then set
``MLFLOW_TRACKING_URI=http://HOST:PORT`` for `mlflow run`, the search and the promotion.

``--auth`` turns on MLflow's basic authentication (its `basic-auth` app): every request but
/health needs a user and password (clients set MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD). Users live in ``--auth-database-uri``. Its admin is created on the
first start with MLFLOW_AUTH_ADMIN_PASSWORD (MLFLOW_AUTH_ADMIN_USERNAME, default `admin`), or,
when that is unset, with a generated password printed once.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import sys
import tempfile
import warnings
from pathlib import Path

from mnist_mlflow import config as C
from tracking import cli

AUTH_INI = """[mlflow]
default_permission = READ
database_uri = {database_uri}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def server_command(backend: str, artifacts: str, host: str, port: int, workers: int,
                   auth: bool = False) -> list[str]:
    """The `mlflow server` command line; `--serve-artifacts` proxies artifacts for clients."""
    return ["mlflow", "server", "--backend-store-uri", backend, "--registry-store-uri", backend,
            "--artifacts-destination", artifacts, "--serve-artifacts", "--host", host,
            "--port", str(port), "--workers", str(workers),
            *(["--app-name", "basic-auth"] if auth else [])]


def is_loopback(host: str) -> bool:
    """Whether only this machine can connect; a name other than localhost may resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def write_auth_config(database_uri: str) -> str:
    """MLflow reads the auth settings from an ini file; ours is private to its owner (0600)."""
    fd, path = tempfile.mkstemp(prefix="mnist-mlflow-auth-", suffix=".ini")  # created 0600
    with os.fdopen(fd, "w") as f:
        f.write(AUTH_INI.format(database_uri=database_uri))
    return path


def bootstrap_admin() -> None:
    """Creates the admin user now, so a bad setting is one line here, not a server traceback.

    Raises ImportError without Flask-WTF, MlflowException on a bad name or password.
    """
    with warnings.catch_warnings():  # MLflow's import-time deprecation notices
        warnings.simplefilter("ignore")
        from mlflow.server import auth
        from mlflow.server.auth.config import read_auth_config
    config = read_auth_config()  # fresh: the module's copy was read at its first import
    auth.store.init_db(config.database_uri)
    password, generated = config.admin_password, False
    if password is None and config.admin_username and not auth.store.has_user(
            config.admin_username, use_primary=True):
        password, generated = secrets.token_urlsafe(18), True
    auth.create_admin_user(config.admin_username, password)
    if generated:
        print(f"auth: created admin user '{config.admin_username}' with password {password} "
              "(shown once: keep it; set MLFLOW_AUTH_ADMIN_PASSWORD to choose it)", flush=True)


def enable_auth(database_uri: str) -> str | None:
    """Prepares the environment the basic-auth server reads; returns an error line, or None."""
    path = os.environ["MLFLOW_AUTH_CONFIG_PATH"] = write_auth_config(database_uri)
    # CSRF key of the sign-up form; one per start is enough, as every worker inherits it
    os.environ.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    try:
        bootstrap_admin()
    except Exception as exc:  # noqa: BLE001 - MlflowException or a database error, as one line
        os.unlink(path)
        if isinstance(exc, ImportError):
            return "--auth needs Flask-WTF: pip install -e ."
        return f"--auth: {getattr(exc, 'message', exc)}".splitlines()[0]
    return None


def parser() -> cli.Parser:
    p = cli.parser("python -m tracking.server", __doc__)
    p.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    p.add_argument("--artifacts-destination", default=str(Path("mlartifacts").resolve()))
    p.add_argument("--host", default="127.0.0.1", help="beyond loopback, use --auth or a firewall")
    cli.add(p, "--port", int, unset=5000, help="port to listen on (default 5000)")
    cli.add(p, "--workers", int, 1, unset=2, help="server processes (default 2)")
    p.add_argument("--auth", action="store_true", help="require a user and password (MLflow basic auth)")
    p.add_argument("--auth-database-uri", default=f"sqlite:///{Path('mlflow-auth.db').resolve()}",
                   help="where --auth keeps users and permissions")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        if not 0 < args.port < 65536:
            raise C.ConfigError(f"--port={args.port} is not allowed: 1-65535")
    except C.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.auth:
        error = enable_auth(args.auth_database_uri)
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    elif not is_loopback(args.host):
        print(f"warning: --host {args.host} without --auth: anyone who can reach port {args.port} "
              "can read and write every run and model", file=sys.stderr, flush=True)
    cmd = server_command(args.backend_store_uri, args.artifacts_destination, args.host, args.port,
                         args.workers, args.auth)
    # MLflow's job runner (huey consumers for GenAI scorers) starts seven processes that this
    # project never uses; a user who wants it sets the variable to true.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print("starting:", " ".join(cmd), flush=True)
    os.execvp(cmd[0], cmd)  # the server replaces us: signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
