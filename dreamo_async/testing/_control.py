"""The fake server's control plane, ``/_fake/...``: stats, reset and fault injection over HTTP.

For a server in another process (``python -m dreamo_async.testing``), where tests
cannot call its methods; these requests are not counted in ``ServerStats``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ._faults import Fault

if TYPE_CHECKING:
    from .server import FakeDreamOServer

__all__ = ["CONTROL_PREFIX", "control_routes"]

CONTROL_PREFIX = "/_fake/"


def control_routes(server: FakeDreamOServer) -> list[web.RouteDef]:
    """The ``/_fake/...`` routes acting on ``server`` through its public methods."""

    async def stats(request: web.Request) -> web.StreamResponse:
        data = server.stats.as_dict()
        data["open_tasks"] = server.open_tasks()
        data["tasks"] = len(server.tasks)
        return web.json_response(data)

    async def reset(request: web.Request) -> web.StreamResponse:
        server.reset_stats()
        return web.json_response({"ok": True})

    async def inject(request: web.Request) -> web.StreamResponse:
        try:
            spec = await request.json()
            fault = Fault.from_dict(spec["fault"])
            server.inject(spec["endpoint"], fault, times=int(spec.get("times", 1)))
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True})

    return [
        web.get(f"{CONTROL_PREFIX}stats", stats),
        web.post(f"{CONTROL_PREFIX}reset", reset),
        web.post(f"{CONTROL_PREFIX}inject", inject),
    ]
