"""A raw pass-through forwarder for `POST /v1/responses`: the floor a pass-through proxy costs.

    python bench/responses_forwarder.py --port 8001 --upstream http://127.0.0.1:9999

Forwards the request body's bytes as they are and relays the upstream's status, content type
and body (SSE as it arrives), over one pooled keep-alive connection set, like the proxy's
upstream client. No parsing, no state: what a pass-through mode would cost before it does
anything the proxy is for. Used by bench/responses_overhead.py.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web


def make_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def session_context(app: web.Application):
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": "application/json", "Authorization": request.headers.get("Authorization", "")}
        async with request.app["session"].post(upstream + "/v1/responses", data=body, headers=headers) as reply:
            response = web.StreamResponse(status=reply.status, headers={"Content-Type": reply.headers.get("Content-Type", "")})
            await response.prepare(request)
            async for data in reply.content.iter_any():
                await response.write(data)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session_context)
    app.router.add_post("/v1/responses", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's origin, e.g. http://127.0.0.1:9999")
    args = parser.parse_args()
    web.run_app(make_app(args.upstream.rstrip("/")), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
