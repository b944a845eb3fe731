"""Command line: `agent-state-proxy serve | check-config | migrate | hash-key | backup | verify | salvage | restore` and `--version`."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import sys
from pathlib import Path

from proxy import __version__, interpreter, logs
from proxy.config import Config, ConfigError, hash_key, load_config


class _Parser(argparse.ArgumentParser):
    """Bad flags end in one line naming the flag and the rule (argparse prints its usage too)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="agent-state-proxy", description="Stateful OpenAI-compatible proxy for AI agents.")
    parser.add_argument("--version", action="version", version=f"agent-state-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    _config_flags(serve)
    serve.add_argument("--host", help="address to bind (default: $ASP_HOST, else server.host: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default: $ASP_PORT, else server.port: 8765)")
    serve.add_argument("--model", help="litellm model string: every requested model routes to it")
    serve.add_argument("--api-base", help="upstream base URL for --model")
    serve.add_argument("--log-level", type=str.upper, choices=logs.LEVELS, default=None,
                       help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL; env ASP_LOG_LEVEL")
    serve.add_argument("--log-format", choices=logs.FORMATS, default=None,
                       help="text (default) or json: one JSON object per line; env ASP_LOG_FORMAT")

    check = commands.add_parser("check-config", help="validate the configuration and exit")
    _config_flags(check)

    migrating = commands.add_parser("migrate", help="create or upgrade the PostgreSQL schema (storage.backend: postgres) and exit")
    _config_flags(migrating)

    hashing = commands.add_parser("hash-key", help="print the sha256 of a proxy API key for tenant YAML")
    hashing.add_argument("key", nargs="?", help="the key (prompted for when omitted)")

    backup = commands.add_parser("backup", help="copy the store to a new directory (safe while the proxy serves)")
    _config_flags(backup)
    backup.add_argument("--to", required=True, type=Path, help="an empty or new directory for the copy")

    verify = commands.add_parser("verify", help="check every stored record; exit 1 when the store is damaged")
    _config_flags(verify)
    verify.add_argument("--store", type=Path, help="an LMDB directory to check instead of <data_dir>/lmdb (a backup)")

    salvage = commands.add_parser("salvage", help="copy every readable record of a damaged store into a new one")
    _config_flags(salvage)
    salvage.add_argument("--to", required=True, type=Path, help="an empty or new directory for the salvaged store")

    restore = commands.add_parser("restore", help="replace the store with a backup or a salvaged store (proxy stopped)")
    _config_flags(restore)
    restore.add_argument("--from", dest="source", required=True, type=Path, help="a backup or salvage directory")

    args = parser.parse_args(argv)
    if args.command == "serve":
        # The environment's values are checked like the flags': a clear line, never a traceback.
        args.log_level = args.log_level or os.environ.get("ASP_LOG_LEVEL", "INFO").upper()
        args.log_format = args.log_format or os.environ.get("ASP_LOG_FORMAT", "text").lower()
        if args.log_level not in logs.LEVELS:
            parser.error(f"ASP_LOG_LEVEL: invalid choice {args.log_level!r} (choose from {', '.join(logs.LEVELS)})")
        if args.log_format not in logs.FORMATS:
            parser.error(f"ASP_LOG_FORMAT: invalid choice {args.log_format!r} (choose from {', '.join(logs.FORMATS)})")
    if args.command == "hash-key":
        print(hash_key(args.key or getpass.getpass("proxy API key: ")))
        return 0
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        # A key variable that is unset would fail every request to that model: an error here.
        problems = config.unset_key_envs()
        for problem in problems:
            print(f"configuration error: {problem}", file=sys.stderr)
        if problems:
            return 2
        print(f"ok: {config.source}: {len(config.tenants)} tenant(s): {', '.join(config.tenants)}")
        return 0
    if args.command == "migrate":
        return _migrate(config)
    if args.command in _MAINTENANCE:
        return _MAINTENANCE[args.command](config, args)
    return _serve(config, args)


def _migrate(config: Config) -> int:
    if config.storage_backend != "postgres" or config.postgres is None:
        print("nothing to migrate: storage.backend is lmdb (its layout needs no migrations)")
        return 0
    import asyncio

    from proxy.storage.base import StorageError
    from proxy.storage.postgres import migrate_database

    try:
        ran = asyncio.run(migrate_database(config.postgres.dsn))
    except StorageError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    print(f"ok: schema current ({ran} migration(s) applied)")
    return 0


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="path to proxy.yaml (default: $ASP_CONFIG, ./config/proxy.yaml, else embedded defaults)")
    parser.add_argument("--data-dir", help="where LMDB keeps its files (default: $ASP_DATA_DIR, else storage.data_dir: ./data)")


def _load(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("ASP_CONFIG")
    if path is None and Path("config/proxy.yaml").is_file():
        path = "config/proxy.yaml"
    # The environment stands in for the flags (the Docker image sets ASP_HOST, ASP_PORT, ASP_DATA_DIR).
    allow = os.environ.get("ASP_ALLOW_CLIENTS", "").strip()
    port = getattr(args, "port", None)
    if port is None and os.environ.get("ASP_PORT"):
        try:
            port = int(os.environ["ASP_PORT"])
        except ValueError:
            raise ConfigError(f"ASP_PORT: must be an integer between 0 and 65535 (got {os.environ['ASP_PORT']!r})") from None
    overrides = {
        "allowed_clients": [n.strip() for n in allow.split(",") if n.strip()] if allow else None,
        "host": getattr(args, "host", None) or os.environ.get("ASP_HOST") or None,
        "port": port,
        "data_dir": args.data_dir or os.environ.get("ASP_DATA_DIR") or None,
        "model": getattr(args, "model", None),
        "api_base": getattr(args, "api_base", None),
    }
    return load_config(path, overrides)


def _serve(config: Config, args: argparse.Namespace) -> int:
    from proxy.server.app import create_app

    logs.configure(args.log_level, args.log_format)
    logs.set_secrets(config.secrets())
    log = logging.getLogger("agent_state_proxy")
    # Until the app installs its reload handler, a SIGHUP (default action: terminate) is ignored.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info("agent-state-proxy %s; config: %s; tenants: %s", __version__, config.source, ", ".join(config.tenants))
    for problem in config.unset_key_envs():
        log.warning("%s: requests to that model go upstream without a key", problem)
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create the data directory {config.data_dir}: {exc.strerror}", file=sys.stderr)
        return 1
    if not os.access(config.data_dir, os.W_OK | os.X_OK):
        # Typically a bind-mounted host directory in Docker, owned by another user.
        print(f"error: the data directory {config.data_dir} is not writable by uid {os.getuid()}: "
              f"chown it to that uid, or run as its owner (docker run --user)", file=sys.stderr)
        return 1
    interpreter.configure_server()  # GIL switch interval, full collections when idle
    from proxy.storage.base import StorageError

    try:
        asyncio.run(_run(lambda: create_app(config, reload=lambda: _load(args)), config, log))
    except StorageError as exc:  # the store cannot open: say why in one line, no traceback
        log.critical("cannot start: %s", exc)
        return 1
    except OSError as exc:  # the address is taken or cannot be bound: the store was closed on the way out
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"error: cannot listen on {config.host}:{config.port}: {reason}", file=sys.stderr)
        return 1
    return 0


async def _run(create_app, config: Config, log: logging.Logger) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, drain in-flight requests and close."""
    from aiohttp import web

    from proxy.server.protocol import ProxyRunner

    runner = ProxyRunner(create_app(), access_log=None, shutdown_timeout=30)  # drain in-flight requests for up to 30 s
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        log.info("serving on http://%s:%d/v1", config.host, config.port)
        await stop.wait()
        log.info("stopping: draining in-flight requests")
    finally:
        await runner.cleanup()


# -- maintenance (docs/PERSISTENCE.md: what each failure looks like, what to run) ----------------

def _maintenance(run):
    """Run a maintenance command: a storage failure is a message and exit status 2."""

    def command(config: Config, args: argparse.Namespace) -> int:
        from proxy.storage.base import StorageError

        try:
            return run(config, args)
        except StorageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return command


@_maintenance
def _backup(config: Config, args: argparse.Namespace) -> int:
    from proxy.storage import maintenance

    made = maintenance.backup(maintenance.store_path(config.data_dir), args.to)
    print(f"backup of {maintenance.store_path(config.data_dir)} written to {made['path']}: {made['bytes']} bytes in {made['seconds']} s "
          f"(holds everything committed before {_utc(made['started'])})")
    return 0


@_maintenance
def _verify(config: Config, args: argparse.Namespace) -> int:
    from proxy.storage import maintenance

    path = args.store or maintenance.store_path(config.data_dir)
    report = maintenance.verify(path)
    print(f"verify {path}\n{report.summary()}")
    return 1 if report.damaged else 0


@_maintenance
def _salvage(config: Config, args: argparse.Namespace) -> int:
    from proxy.storage import maintenance

    source = maintenance.store_path(config.data_dir)
    report = maintenance.salvage(source, args.to)
    print(f"salvaged {source} into {args.to}\n{report.summary()}")
    print(f"next: `agent-state-proxy verify --store {args.to}`, then with the proxy stopped "
          f"`agent-state-proxy restore --from {args.to}`")
    return 0


@_maintenance
def _restore(config: Config, args: argparse.Namespace) -> int:
    from proxy.storage import maintenance

    report = maintenance.verify(args.source)
    if report.damaged:
        print(f"{args.source} is damaged; not restoring it:\n{report.summary()}", file=sys.stderr)
        return 1
    kept = maintenance.restore(args.source, config.data_dir)
    print(f"restored {args.source} into {maintenance.store_path(config.data_dir)} "
          f"({report.sessions} sessions, {report.messages} messages); the previous store is kept at {kept}")
    return 0


def _utc(ts: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


_MAINTENANCE = {"backup": _backup, "verify": _verify, "salvage": _salvage, "restore": _restore}
