"""A Starlette app served by several worker processes that share one budget through Redis.

Every worker process has its own ``DreamOClient``; all of them use one
``RedisCoordinator``, so ``max_concurrency`` and ``requests_per_second`` hold for the
API key as a whole, whatever the number of workers. Run it against the fake
service (4 workers, one Redis)::

    redis-server --port 6379 --save "" &
    python -m dreamo_async.testing --port 8181 &      # prints READY http://127.0.0.1:8181
    export DREAMO_BASE_URL=http://127.0.0.1:8181 DREAMO_API_KEY=test-key \\
           REDIS_URL=redis://127.0.0.1:6379/0
    uvicorn examples.redis_app:app --workers 4 --port 8080
    # or: gunicorn examples.redis_app:app -k uvicorn.workers.UvicornWorker -w 4 -b :8080

then ``POST /generate`` with ``{"prompt": "...", "images": ["<URL or data: URI>"]}``
from as many clients as you like: the service never sees more than 8 tasks of this
key at once, nor more than 10 + 2 requests in a second. ``GET /stats`` shows the
share of the worker that answers.

Settings (environment): ``REDIS_URL``, ``DREAMO_LIMITS_KEY`` (the budget's name,
default ``default``), ``DREAMO_MAX_CONCURRENCY`` (8), ``DREAMO_RATE`` (10 requests/s),
``DREAMO_BURST`` (2). When Redis is down at start-up the app refuses to start
(``LimitsBackendError``): without the shared limits, 4 workers would send 4 times
the budget. ``fallback="local"`` would instead warn and split nothing.
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
from examples.starlette_app import CLIENT_CLOSED_REQUEST


def make_client() -> d.DreamOClient:
    """This worker's client; the limits live in Redis and are shared by every worker."""
    limits = d.RedisCoordinator(
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        key=os.environ.get("DREAMO_LIMITS_KEY", "default"),
        lease_ttl=10.0,  # a worker killed mid-job gives its slots back within 10 s
    )
    return d.DreamOClient(
        base_url=os.environ.get("DREAMO_BASE_URL"),
        max_concurrency=int(os.environ.get("DREAMO_MAX_CONCURRENCY", "8")),
        requests_per_second=float(os.environ.get("DREAMO_RATE", "10")),
        burst=int(os.environ.get("DREAMO_BURST", "2")),
        coordinator=limits,
    )


def create_app() -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with make_client() as client:
            limits = client.coordinator
            if isinstance(limits, d.RedisCoordinator):
                await limits.ping()  # fail at start-up, not at the first request
            yield {"dreamo": client}

    return Starlette(
        routes=[
            Route("/generate", generate, methods=["POST"]),
            Route("/stats", stats, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


async def generate(request: Request) -> Response:
    body = await request.json()
    client: d.DreamOClient = request.state.dreamo
    try:
        # A caller that leaves cancels its job: its slot goes back to every worker's budget.
        result = await d.cancel_on_disconnect(
            request, client.generate(prompt=body.get("prompt"), images=body.get("images", []))
        )
    except d.CallerDisconnectedError:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except d.InvalidRequestError as exc:
        return JSONResponse({"error": str(exc), "parameter": exc.parameter}, status_code=400)
    except d.TaskFailedError as exc:
        return JSONResponse({"error": str(exc), "code": exc.code}, status_code=502)
    except d.LimitsBackendError as exc:  # Redis gone for longer than reconnect_timeout
        return JSONResponse({"error": str(exc)}, status_code=503)
    return JSONResponse(
        {"task_id": result.task_id, "images": result.image_urls, "worker": os.getpid()}
    )


async def stats(request: Request) -> JSONResponse:
    client: d.DreamOClient = request.state.dreamo
    snapshot = client.statistics()
    return JSONResponse(
        {
            "worker": os.getpid(),
            "jobs_running_here": snapshot.jobs_running,
            "jobs_waiting_here": snapshot.jobs_waiting,
            "max_concurrency_shared": snapshot.max_concurrency,
        }
    )


app = create_app()
