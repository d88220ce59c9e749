"""A Starlette (ASGI) app sharing one DreamOClient through its lifespan.

Run against the fake service::

    python -m dreamo_async.testing --port 8181 &
    DREAMO_BASE_URL=http://127.0.0.1:8181 DREAMO_API_KEY=test-key \\
        uvicorn examples.starlette_app:app --port 8080

FastAPI apps do the same in their ``lifespan``. The client lives in the lifespan
state, so every request shares its limits.

ASGI servers do not cancel a handler whose caller went away, so the handler
wraps the job in ``d.cancel_on_disconnect``: it watches for the ``http.disconnect``
message and cancels the job, whose polling stops at once and whose slot goes to
the next caller.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import dreamo_async as d

#: Not an HTTP status anyone sees (the caller is gone); nginx's "client closed request".
CLIENT_CLOSED_REQUEST = 499


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


async def generate(request: Request) -> Response:
    body = await request.json()
    client: d.DreamOClient = request.state.dreamo
    try:
        result = await d.cancel_on_disconnect(
            request, client.generate(prompt=body.get("prompt"), images=body.get("images", []))
        )
    except d.CallerDisconnectedError:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except d.InvalidRequestError as exc:
        return JSONResponse({"error": str(exc), "parameter": exc.parameter}, status_code=400)
    except d.TaskFailedError as exc:
        return JSONResponse({"error": str(exc), "code": exc.code}, status_code=502)
    return JSONResponse(
        {"task_id": result.task_id, "images": result.image_urls, "cost": str(result.cost)}
    )


app = create_app()
