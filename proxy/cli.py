"""Command line: `agent-state-proxy serve | check-config | hash-key` and `--version`."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from pathlib import Path

from proxy import __version__, idle_gc, logs
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

    hashing = commands.add_parser("hash-key", help="print the sha256 of a proxy API key for tenant YAML")
    hashing.add_argument("key", nargs="?", help="the key (prompted for when omitted)")

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
    return _serve(config, args)


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
    import signal

    from aiohttp import web

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
    # A long-running server with a large long-lived heap: a full (generation 2) collection
    # takes 70-220 ms with a 100k-memory tenant loaded. The app runs them while no request is
    # in flight (proxy/idle_gc.py), not inside whichever request triggers one.
    idle_gc.disable_automatic_full_collection()
    # Embedding threads (ONNX Runtime, LMDB writes) take the GIL back several times per job;
    # while the event loop runs Python each take waits up to the switch interval (5 ms by
    # default). At 0.5 ms a query embedding under a busy loop took 4.4 ms instead of 11.8 ms;
    # at 0.1 ms the full-mode probe's query embedding p50 is 7.7 instead of 8.4 ms and its
    # request p50 12.4 instead of 12.7-13.0 ms, at the same CPU per request (docs/BENCHMARKS.md).
    sys.setswitchinterval(0.0001)
    try:
        web.run_app(
            create_app(config, reload=lambda: _load(args)),
            host=config.host,
            port=config.port,
            shutdown_timeout=30,  # drain in-flight requests on SIGTERM/SIGINT
            print=lambda _: log.info("serving on http://%s:%d/v1", config.host, config.port),
            access_log=None,  # ours is proxy/server/access_log.py
        )
    except OSError as exc:  # the address is taken or cannot be bound: the store was closed on the way out
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"error: cannot listen on {config.host}:{config.port}: {reason}", file=sys.stderr)
        return 1
    return 0
