"""A FastAPI app sharing one DreamOClient through its lifespan.

Run against the fake service::

    python -m dreamo_async.testing --port 8181 &       # prints READY http://127.0.0.1:8181
    DREAMO_BASE_URL=http://127.0.0.1:8181 DREAMO_API_KEY=test-key \\
        uvicorn examples.fastapi_app:app --port 8080

then ``POST /generate`` with ``{"prompt": "...", "images": ["https://.../a.jpg"]}``.

One client for the whole app, created in the lifespan: its ``max_concurrency`` and
``requests_per_second`` hold for every request the app serves. ASGI servers do not
cancel a handler whose caller went away, so the handler wraps the job in
``d.cancel_on_disconnect``: a caller that hangs up while queued for a slot never
gets a task created, and one that hangs up later stops the job's polling.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, Field

import dreamo_async as d

#: Not an HTTP status anyone sees (the caller is gone); nginx's "client closed request".
CLIENT_CLOSED_REQUEST = 499


class GenerateBody(BaseModel):
    prompt: str
    #: ``http(s)://`` URLs or ``data:image/...;base64,`` URIs.
    images: list[str] = Field(min_length=1, max_length=5)
    seed: int | None = None


class GenerateAnswer(BaseModel):
    task_id: str
    images: list[str]
    cost: str


def create_app(client: d.DreamOClient | None = None) -> FastAPI:
    """The app; tests pass their own client (pointed at a FakeDreamOServer)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with client or d.DreamOClient(
            base_url=os.environ.get("DREAMO_BASE_URL"),
            max_concurrency=8,
            requests_per_second=10,
        ) as shared:
            yield {"dreamo": shared}

    app = FastAPI(lifespan=lifespan)
    app.post("/generate", response_model=GenerateAnswer)(generate)
    return app


def dreamo(request: Request) -> d.DreamOClient:
    """The shared client, from the lifespan state (a dependency)."""
    client: d.DreamOClient = request.state.dreamo
    return client


async def generate(
    body: GenerateBody,
    request: Request,
    client: Annotated[d.DreamOClient, Depends(dreamo)],
) -> GenerateAnswer | Response:
    try:
        result = await d.cancel_on_disconnect(
            request, client.generate(prompt=body.prompt, images=body.images, seed=body.seed)
        )
    except d.CallerDisconnectedError:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except d.InvalidRequestError as exc:
        raise HTTPException(400, {"error": str(exc), "parameter": exc.parameter}) from exc
    except d.TaskFailedError as exc:
        raise HTTPException(502, {"error": str(exc), "code": exc.code}) from exc
    return GenerateAnswer(
        task_id=result.task_id, images=list(result.image_urls), cost=str(result.cost)
    )


app = create_app()
