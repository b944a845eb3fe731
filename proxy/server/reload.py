"""Configuration reload: on SIGHUP or a changed file in tenants/, load, validate, swap.

The new configuration is loaded and validated in full first; a file that breaks a rule leaves
the running configuration in place and the reason in the log. The swap is one assignment of a
new frozen Config: a request reads the configuration once, when it starts, and finishes on the
one it started with. Server and storage settings (address, port, data directory, LMDB and the
write queue) are fixed for the life of the process: a change to them is logged as needing a
restart and not applied. Tenants' memory settings and the janitor's tenant list, which
background services took at start-up, also change at the next restart, except extraction's
(``memory.extract``, ``extractor_model``, ``backfill_per_minute``): turned on, it starts at once,
with the backfill of the sessions recorded before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import AsyncIterator, Callable

from aiohttp import web

from proxy import logs
from proxy.config import Config, ConfigError
from proxy.server import keys

log = logging.getLogger("agent_state_proxy.reload")

# Set for the life of the process: a reload keeps the running values of these (proxy.yaml keys).
_RESTART_ONLY = {
    "server": ("host", "port", "max_body_bytes", "janitor_interval_seconds"),
    "storage": ("data_dir", "map_size_mb", "write_batch_size", "flush_interval_ms", "write_queue_max", "transcript_cache_messages"),
}
POLL_SECONDS = 1.0


class Reloader:
    """Reloads the app's configuration with ``load`` (the same files and flags as at start)."""

    def __init__(self, app: web.Application, load: Callable[[], Config]) -> None:
        self.app, self.load = app, load

    def reload(self, reason: str) -> bool:
        """Load, validate and swap in the configuration; False (old one kept) when it is invalid."""
        old = self.app[keys.CONFIG]
        try:
            new = self.load()
        except ConfigError as exc:
            log.error("configuration reload (%s) failed; the previous configuration keeps serving: %s", reason, exc,
                      extra={"fields": {"event": "reload_failed"}})
            return False
        new, fixed = _keep_restart_only(new, old)
        if fixed:
            log.warning("configuration reload (%s): %s take effect at the next restart", reason, ", ".join(fixed))
        for problem in new.unset_key_envs():
            log.warning("%s", problem)
        # Redaction learns the new upstream keys before any request can use them.
        secrets = new.secrets() + old.secrets()
        logs.set_secrets(secrets)
        self.app[keys.UPSTREAM].set_secrets(secrets)
        self.app[keys.CONFIG] = new  # the swap: one assignment of a frozen value
        self.app[keys.QUOTAS].settings = {name: tenant.quotas for name, tenant in new.tenants.items()}
        memory = self.app[keys.PIPELINE].memory if keys.PIPELINE in self.app else None
        if memory is not None:
            memory.reconfigure(new.tenants.values())  # extraction on or off, its backfill, its model
        log.info("configuration reloaded (%s): %s; tenants: %s", reason, new.source, ", ".join(new.tenants),
                 extra={"fields": {"event": "reloaded"}})
        return True


def _keep_restart_only(new: Config, old: Config) -> tuple[Config, list[str]]:
    """``new`` with the running values of the restart-only settings, and the keys it changed."""
    fixed, sections = [], {}
    for section, names in _RESTART_ONLY.items():
        was, now = getattr(old, section), getattr(new, section)
        kept = {name: getattr(was, name) for name in names if getattr(now, name) != getattr(was, name)}
        fixed += [f"{section}.{name}" for name in kept]
        sections[section] = now.model_copy(update=kept)
    return new.model_copy(update=sections), fixed


def watched_files(config: Config) -> dict[str, tuple[int, int]]:
    """(mtime, size) of proxy.yaml and of every file in the tenants directory."""
    paths: list[Path] = []
    if config.tenants_dir is not None:
        source = Path(config.source)
        paths.append(source)
        if config.tenants_dir.is_dir():
            paths += [p for p in config.tenants_dir.iterdir() if p.suffix in (".yaml", ".yml")]
    found = {}
    for path in paths:
        with contextlib.suppress(OSError):
            stat = path.stat()
            found[str(path)] = (stat.st_mtime_ns, stat.st_size)
    return found


def reloading(load: Callable[[], Config], poll_seconds: float = POLL_SECONDS):
    """cleanup_ctx: SIGHUP reloads; a change in the configuration files (polled) reloads."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        reloader = Reloader(app, load)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
        watcher = asyncio.create_task(_watch(app, reloader, poll_seconds), name="config-watch")
        yield
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # while the store flushes: never the default (exit)

    return context


async def _watch(app: web.Application, reloader: Reloader, poll_seconds: float) -> None:
    # A stat of a few files per second: no dependency, works on every filesystem and bind mount.
    seen = await asyncio.to_thread(watched_files, app[keys.CONFIG])
    while True:
        await asyncio.sleep(poll_seconds)
        now = await asyncio.to_thread(watched_files, app[keys.CONFIG])
        if now != seen:
            changed = sorted(set(now.items()) ^ set(seen.items()))
            seen = now
            reloader.reload(f"{Path(changed[0][0]).name} changed")
