"""An aiohttp.web app sharing one DreamOClient through the app's lifespan.

Run against the fake service::

    python -m dreamo_async.testing --port 8181 &       # prints READY http://127.0.0.1:8181
    DREAMO_BASE_URL=http://127.0.0.1:8181 DREAMO_API_KEY=test-key python examples/aiohttp_app.py

then ``POST /generate`` with ``{"prompt": "...", "images": ["https://.../a.jpg"]}``.

One client per app: its ``max_concurrency`` and ``requests_per_second`` then hold for
every request the app serves. When a caller disconnects, ``d.cancel_on_disconnect``
cancels its job (within a quarter of a second), which stops the job's polling and
frees its slot. (``handler_args={"handler_cancellation": True}`` on the Application
would cancel every handler of the app at once instead.)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from aiohttp import web

import dreamo_async as d

#: Not an HTTP status anyone sees (the caller is gone); nginx's "client closed request".
CLIENT_CLOSED_REQUEST = 499
CLIENT_KEY: web.AppKey[d.DreamOClient] = web.AppKey("dreamo", d.DreamOClient)


def create_app(client: d.DreamOClient | None = None) -> web.Application:
    """The app; tests pass their own client (pointed at a FakeDreamOServer)."""
    app = web.Application()

    async def client_context(app: web.Application) -> AsyncIterator[None]:
        async with client or d.DreamOClient(
            base_url=os.environ.get("DREAMO_BASE_URL"),
            max_concurrency=8,
            requests_per_second=10,
        ) as shared:
            app[CLIENT_KEY] = shared
            yield

    app.cleanup_ctx.append(client_context)
    app.router.add_post("/generate", generate)
    return app


async def generate(request: web.Request) -> web.Response:
    body = await request.json()
    try:
        result = await d.cancel_on_disconnect(
            request,
            request.app[CLIENT_KEY].generate(
                prompt=body.get("prompt"), images=body.get("images", [])
            ),
        )
    except d.CallerDisconnectedError:
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    except d.InvalidRequestError as exc:
        return web.json_response({"error": str(exc), "parameter": exc.parameter}, status=400)
    except d.TaskFailedError as exc:
        return web.json_response({"error": str(exc), "code": exc.code}, status=502)
    return web.json_response(
        {"task_id": result.task_id, "images": result.image_urls, "cost": str(result.cost)}
    )


if __name__ == "__main__":
    web.run_app(create_app(), host="127.0.0.1", port=8080)
