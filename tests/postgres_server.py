"""A private PostgreSQL server for the tests: its own cluster in a temp dir, on a free port.

Debian's server binaries (package postgresql-15) are used as they are. As root, the cluster runs
as the ``postgres`` user (initdb refuses root). When no server can be started, tests that need it
are skipped with the reason, unless ASP_TEST_POSTGRES=required (CI sets it): then they fail.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from tests.harness import free_port


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="asp-pg-"))
        self.data = self.directory / "data"
        self.bin = _binaries()

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run(prefix + list(command), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stderr.strip()[-500:]}")

    def start(self) -> PostgresServer:
        if self.bin is None:
            raise RuntimeError("PostgreSQL server binaries (initdb) are not installed")
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        return self.resume()

    def resume(self) -> PostgresServer:
        """Start the server on its cluster (again, after ``pause``), on the same port."""
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.directory / "server.log"), "-w", "start")
        return self

    def pause(self, mode: str = "fast") -> None:
        """Stop the server, keeping its cluster: what an operator's restart or a failover does
        (``fast`` ends every connection at once)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def stop(self) -> None:
        if self.bin is not None and (self.data / "postmaster.pid").exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except RuntimeError:
                pass
        shutil.rmtree(self.directory, ignore_errors=True)

    async def new_database(self) -> str:
        """A fresh, empty database; returns its DSN."""
        import asyncpg

        name = "t_" + uuid.uuid4().hex[:16]
        connection = await asyncpg.connect(self.admin_dsn)
        try:
            await connection.execute(f"CREATE DATABASE {name}")
        finally:
            await connection.close()
        return self.dsn(name)


def required() -> bool:
    return os.environ.get("ASP_TEST_POSTGRES") == "required"


def serving() -> Iterator[PostgresServer]:
    """For a fixture (``yield from serving()``): a started server, stopped afterwards; the test is
    skipped (failed with ASP_TEST_POSTGRES=required) when PostgreSQL cannot start here."""
    import pytest

    server = PostgresServer()
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        server.stop()
        if required():
            pytest.fail(f"PostgreSQL is required (ASP_TEST_POSTGRES=required) but did not start: {exc}")
        pytest.skip(f"PostgreSQL cannot be started here: {exc}")
    yield server
    server.stop()
