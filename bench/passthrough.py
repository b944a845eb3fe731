"""Pass-through floor: the least an aiohttp proxy can do, to measure what any proxy costs.

One pooled ``aiohttp.ClientSession``; each request's body is forwarded as raw bytes (never
parsed) to the upstream with the upstream key, and the answer comes back as it arrives:
a JSON reply is read and returned whole, an ``text/event-stream`` reply is relayed chunk by
chunk. No session state, no logging, no JSON work.

    python bench/passthrough.py --port 9100 --upstream http://127.0.0.1:9999
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
from aiohttp import web

_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


def make_app(upstream: str, api_key: str) -> web.Application:
    upstream = upstream.rstrip("/")
    auth = f"Bearer {api_key}"
    app = web.Application(client_max_size=64 * 1024 * 1024)
    state: dict[str, aiohttp.ClientSession] = {}

    async def session_ctx(app: web.Application):
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=256, keepalive_timeout=30)
        state["http"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await state["http"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json"), "Authorization": auth}
        async with state["http"].request(request.method, upstream + request.path_qs, data=body, headers=headers) as up:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP}
            if up.content_type == "text/event-stream":
                response = web.StreamResponse(status=up.status, headers=out_headers)
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
            return web.Response(status=up.status, body=await up.read(), headers=out_headers)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/health", health)
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--upstream", required=True, help="upstream origin, e.g. http://127.0.0.1:9999")
    parser.add_argument("--api-key", default="upstream-secret-key")
    args = parser.parse_args(argv)

    async def serve() -> None:
        runner = web.AppRunner(make_app(args.upstream, args.api_key), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        print(f"passthrough listening on http://{args.host}:{args.port} -> {args.upstream}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
