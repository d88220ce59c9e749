"""A Starlette (ASGI) app sharing one DreamOClient through its lifespan.

Run against the fake service::

    python -m dreamo_async.testing --port 8181 &
    DREAMO_BASE_URL=http://127.0.0.1:8181 DREAMO_API_KEY=test-key \\
        uvicorn examples.starlette_app:app --port 8080

FastAPI apps do the same in their ``lifespan``. The client lives in the lifespan
state, so every request shares its limits.

ASGI servers do not cancel a handler whose caller went away (aiohttp.web does,
with ``handler_cancellation=True``), so the handler watches for the
``http.disconnect`` message itself and cancels the job: its polling stops at
once and its slot goes to the next caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import dreamo_async as d

T = TypeVar("T")

#: Not an HTTP status anyone sees (the caller is gone); nginx's "client closed request".
CLIENT_CLOSED_REQUEST = 499


class ClientDisconnected(Exception):
    """The caller went away before the job ended."""


def create_app(client: d.DreamOClient | None = None) -> Starlette:
    """The app; tests pass their own client (pointed at a FakeDreamOServer)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with client or d.DreamOClient(
            base_url=os.environ.get("DREAMO_BASE_URL"),
            max_concurrency=8,
            requests_per_second=10,
        ) as shared:
            yield {"dreamo": shared}

    return Starlette(routes=[Route("/generate", generate, methods=["POST"])], lifespan=lifespan)


async def until_disconnected(request: Request) -> None:
    """Return when the ASGI server reports ``http.disconnect`` (body already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it (and raise ClientDisconnected) if the caller leaves first."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled (server shutdown)
        watcher.cancel()
        job.cancel()  # no-op when it has finished
        await asyncio.wait({job, watcher})
    if job.cancelled():
        raise ClientDisconnected
    return job.result()


async def generate(request: Request) -> Response:
    body = await request.json()
    client: d.DreamOClient = request.state.dreamo
    try:
        result = await unless_disconnected(
            request, client.generate(prompt=body.get("prompt"), images=body.get("images", []))
        )
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except d.InvalidRequestError as exc:
        return JSONResponse({"error": str(exc), "parameter": exc.parameter}, status_code=400)
    except d.TaskFailedError as exc:
        return JSONResponse({"error": str(exc), "code": exc.code}, status_code=502)
    return JSONResponse(
        {"task_id": result.task_id, "images": result.image_urls, "cost": str(result.cost)}
    )


app = create_app()
