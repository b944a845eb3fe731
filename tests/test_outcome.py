"""One middleware records each request's outcome once and hands the same record to every observer."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.server.outcome import Outcome, note_tenant, outcome_middleware


async def test_every_observer_sees_the_one_outcome_of_each_request() -> None:
    seen: dict[str, list[tuple[str, int, str | None, float]]] = {"log": [], "metrics": []}

    def observer(name: str):
        return lambda request, outcome: seen[name].append((request.path, outcome.status, outcome.tenant, outcome.duration_ms))

    async def ok(request: web.Request) -> web.Response:
        note_tenant(request, "team")
        return web.json_response({}, status=201)

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("boom")

    app = web.Application(middlewares=[outcome_middleware(observer("log"), observer("metrics"))])
    app.router.add_get("/ok", ok)
    app.router.add_get("/missing", missing)
    app.router.add_get("/broken", broken)
    async with TestClient(TestServer(app)) as client:
        for path in ("/ok", "/missing", "/broken"):
            await (await client.get(path)).read()
    statuses = [(path, status, tenant) for path, status, tenant, _ in seen["log"]]
    assert statuses == [("/ok", 201, "team"), ("/missing", 404, None), ("/broken", 500, None)]
    assert seen["metrics"] == seen["log"]  # the same record, once each
    assert all(ms >= 0 for *_, ms in seen["log"])


def test_an_outcome_starts_as_a_failure() -> None:
    assert Outcome().status == 500  # an observer of a request that never set one reports an error
