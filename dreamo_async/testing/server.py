"""``FakeDreamOServer``: the service of API.md, simulated on 127.0.0.1 with aiohttp.web.

It speaks the real protocol (paths, wrapped bodies, bearer key, statuses, error
codes), checks the documented limits server-side, runs tasks on its own clock
(no background timers: a task's status is computed when it is polled), and
counts everything from the server's side so tests can prove what the client did.

Scripted outcomes ride in the prompt, so a test or the demo needs no set-up:
``[fail:003013095]`` ends the task failed with that code, ``[slow:MS]`` sets
its duration, ``[never]`` never finishes. Faults of the transport are injected
with :meth:`FakeDreamOServer.inject` (see :mod:`._faults`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import datetime as dt
import itertools
import json
import math
import re
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final, Self

import attrs
from aiohttp import web

from ..errors import PROVIDER_ERROR_CODES
from ..limits import DEFAULT_LIMITS, Limits
from ._faults import Endpoint, Fault
from ._images import make_png

__all__ = ["FakeDreamOServer", "ServerStats"]

CREATE_PATH: Final = "/model/v1/generation"
TASK_PATH: Final = "/model/v1/generation/task/{id}"
_MODELS: Final = ("spark_multi_dreamo", "spark_dreamo")
_REF_TYPES: Final = {"IP", "ID", "STYLE", "AUTO"}
_REPHRASER_LEVELS: Final = {"general", "fine", "coarse"}
_FAIL_RE: Final = re.compile(r"\[fail:(\w+)\]")
_SLOW_RE: Final = re.compile(r"\[slow:(\d+)\]")
_OUTPUT_PNG: Final = make_png(64, 64)


@attrs.define
class ServerStats:
    """What the server saw. ``request_times`` holds ``(monotonic, method, path)``."""

    creates: int = 0
    refused: collections.Counter[str] = attrs.field(factory=collections.Counter)
    polls: int = 0
    downloads: int = 0
    rate_limited: int = 0
    creates_by_request_id: collections.Counter[str] = attrs.field(factory=collections.Counter)
    creates_by_prompt: collections.Counter[str] = attrs.field(factory=collections.Counter)
    max_open_tasks: int = 0
    request_times: list[tuple[float, str, str]] = attrs.field(factory=list)

    def max_requests_in_window(self, window_s: float = 1.0, *, api_only: bool = True) -> int:
        """Most requests seen in any sliding window of ``window_s`` seconds."""
        times = sorted(
            t for t, _, path in self.request_times if not api_only or path.startswith("/model/")
        )
        best = 0
        start = 0
        for end, moment in enumerate(times):
            while moment - times[start] >= window_s:
                start += 1
            best = max(best, end - start + 1)
        return best

    def as_dict(self) -> dict[str, Any]:
        return {
            "creates": self.creates,
            "refused": dict(self.refused),
            "polls": self.polls,
            "downloads": self.downloads,
            "rate_limited": self.rate_limited,
            "creates_by_request_id": dict(self.creates_by_request_id),
            "creates_by_prompt": dict(self.creates_by_prompt),
            "max_open_tasks": self.max_open_tasks,
            "requests": len(self.request_times),
            "max_requests_in_1s": self.max_requests_in_window(1.0),
        }


@attrs.define
class _Task:
    id: str
    model: str
    created: float  # server clock (monotonic)
    created_wall: float
    queue_s: float
    duration_s: float  # math.inf for [never]
    fail_code: str | None


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason


class FakeDreamOServer:
    """A faithful in-process simulation of the Spark DreamO API (see module docstring).

    Times are in milliseconds so tests stay fast. ``api_key=None`` accepts any
    non-empty bearer key.
    """

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        host: str = "127.0.0.1",
        port: int = 0,
        task_duration_ms: float = 50,
        queue_ms: float = 0,
        report_progress: bool = False,
        envelope: bool = False,
        status_words: Mapping[str, str] | None = None,
        output_layout: str = "content",
        created_at_format: str = "s",
        cost: str = "0.03",
        limits: Limits = DEFAULT_LIMITS,
        rate_limit: float | None = None,
        max_open_tasks: int | None = None,
    ) -> None:
        self.api_key = api_key
        self.host = host
        self.port = port
        self.task_duration_ms = task_duration_ms
        self.queue_ms = queue_ms
        self.report_progress = report_progress
        self.envelope = envelope
        self.status_words = dict(status_words or {})
        self.output_layout = output_layout
        self.created_at_format = created_at_format
        self.cost = cost
        self.limits = limits
        self.rate_limit = rate_limit
        self.max_open_tasks = max_open_tasks
        self.stats = ServerStats()
        self.last_create_body: dict[str, Any] | None = None
        self.last_create_headers: dict[str, str] | None = None
        self._tasks: dict[str, _Task] = {}
        self._faults: dict[str, collections.deque[Fault]] = collections.defaultdict(
            collections.deque
        )
        self._files: dict[str, tuple[bytes, str]] = {}
        self._ids = itertools.count(1)
        self._recent: collections.deque[float] = collections.deque()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024 * 1024)
        app.router.add_post(CREATE_PATH, self._create)
        app.router.add_get(TASK_PATH, self._poll)
        app.router.add_get("/files/{task_id}/{name}", self._file)
        app.router.add_get("/assets/{name:.*}", self._asset)
        app.router.add_get("/_fake/stats", self._stats)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.1
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- test controls ---------------------------------------------------------------

    def inject(self, endpoint: Endpoint, fault: Fault, *, times: int = 1) -> None:
        """Make the next ``times`` requests to ``endpoint`` misbehave as ``fault``."""
        self._faults[endpoint].extend([fault] * times)

    def clear_faults(self) -> None:
        self._faults.clear()

    def add_file(self, path: str, data: bytes, content_type: str = "image/png") -> str:
        """Serve ``data`` at ``/assets/...``; returns its full URL."""
        name = path.removeprefix("/").removeprefix("assets/")
        self._files[name] = (data, content_type)
        return f"{self.url}/assets/{name}"

    def reset_stats(self) -> None:
        self.stats = ServerStats()

    def open_tasks(self, now: float | None = None) -> int:
        """Tasks running at the service now (created, not yet at their end time)."""
        moment = time.monotonic() if now is None else now
        return sum(1 for t in self._tasks.values() if t.created + t.queue_s + t.duration_s > moment)

    # -- handlers --------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.stats.request_times.append((time.monotonic(), request.method, request.path))
        response: web.StreamResponse = await handler(request)
        return response

    def _next_fault(self, endpoint: Endpoint) -> Fault | None:
        queue = self._faults.get(endpoint)
        return queue.popleft() if queue else None

    def _check_key(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not key or (self.api_key is not None and key != self.api_key):
            self.stats.refused["auth"] += 1
            return self._error(401, "401", "invalid or missing API key")
        return None

    def _over_rate(self) -> web.Response | None:
        if self.rate_limit is None:
            return None
        now = time.monotonic()
        while self._recent and now - self._recent[0] >= 1.0:
            self._recent.popleft()
        if len(self._recent) >= self.rate_limit:
            self.stats.rate_limited += 1
            wait = max(0.001, 1.0 - (now - self._recent[0]))
            return self._error(429, "429", "rate limit exceeded", retry_after=f"{wait:.3f}")
        self._recent.append(now)
        return None

    async def _create(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._check_key(request)) is not None:
            return refused
        if (limited := self._over_rate()) is not None:
            return limited
        fault = self._next_fault("create")
        if fault is not None and fault.kind == "drop_before":
            return await self._drop(request)
        if fault is not None and (early := await self._simple_fault(fault)) is not None:
            return early
        try:
            body = await request.read()
            task = self._accept(body, request)
        except _Refusal as refusal:
            self.stats.refused[refusal.reason] += 1
            return self._error(refusal.status, refusal.code, refusal.message)
        if fault is not None and fault.kind == "drop_after":
            return await self._drop(request)
        if fault is not None and fault.kind == "create_then_500":
            return self._error(500, "003013099", "service unavailable")
        return self._json(
            {
                "id": task.id,
                "status": self._word("pending"),
                "model": task.model,
                "created_at": self._created_at(task),
            }
        )

    async def _poll(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._check_key(request)) is not None:
            return refused
        if (limited := self._over_rate()) is not None:
            return limited
        self.stats.polls += 1
        fault = self._next_fault("poll")
        if fault is not None and fault.kind in ("drop_before", "drop_after"):
            return await self._drop(request)
        if fault is not None and (early := await self._simple_fault(fault)) is not None:
            return early
        task = self._tasks.get(request.match_info["id"])
        if task is None:
            return self._error(404, "404", "task not found")
        return self._json(self._describe(task, time.monotonic()))

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.stats.downloads += 1
        fault = self._next_fault("download")
        if fault is not None and fault.kind in ("drop_before", "drop_after"):
            return await self._drop(request)
        if fault is not None and (early := await self._simple_fault(fault)) is not None:
            return early
        if request.match_info["task_id"] not in self._tasks:
            return self._error(404, "404", "file not found")
        return web.Response(body=_OUTPUT_PNG, content_type="image/png")

    async def _asset(self, request: web.Request) -> web.StreamResponse:
        self.stats.downloads += 1
        fault = self._next_fault("download")
        if fault is not None and fault.kind in ("drop_before", "drop_after"):
            return await self._drop(request)
        if fault is not None and (early := await self._simple_fault(fault)) is not None:
            return early
        entry = self._files.get(request.match_info["name"])
        if entry is None:
            return self._error(404, "404", "file not found")
        return web.Response(body=entry[0], content_type=entry[1])

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats.as_dict())

    # -- the service's logic ------------------------------------------------------------

    def _accept(self, raw: bytes, request: web.Request) -> _Task:
        try:
            body = json.loads(raw)
        except ValueError:
            raise _Refusal(400, "003013004", "body is not JSON", "json") from None
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("input"), list)
            or not body["input"]
        ):
            raise _Refusal(400, "003013004", "body must be {model, input: [{params}]}", "shape")
        first = body["input"][0]
        params = first.get("params") if isinstance(first, dict) else None
        if not isinstance(params, dict):
            raise _Refusal(400, "003013004", "input[0].params must be an object", "shape")
        model = body.get("model")
        if model not in _MODELS:
            raise _Refusal(400, "003013004", f"unknown model {model!r}", "model")
        self._validate(model, params)
        self.last_create_body = body
        self.last_create_headers = {
            k: v for k, v in request.headers.items() if k.lower() != "authorization"
        }
        prompt = params["prompt"]
        now = time.monotonic()
        duration = self.task_duration_ms / 1000.0
        if (slow := _SLOW_RE.search(prompt)) is not None:
            duration = int(slow.group(1)) / 1000.0
        if "[never]" in prompt:
            duration = math.inf
        fail = _FAIL_RE.search(prompt)
        if self.max_open_tasks is not None and self.open_tasks(now) >= self.max_open_tasks:
            raise _Refusal(429, "429", "too many running tasks", "open_tasks")
        task = _Task(
            id=f"fake{next(self._ids):06d}",
            model=model,
            created=now,
            created_wall=time.time(),
            queue_s=self.queue_ms / 1000.0,
            duration_s=duration,
            fail_code=fail.group(1) if fail else None,
        )
        self._tasks[task.id] = task
        self.stats.creates += 1
        self.stats.creates_by_request_id[request.headers.get("X-Request-Id", "")] += 1
        self.stats.creates_by_prompt[prompt] += 1
        self.stats.max_open_tasks = max(self.stats.max_open_tasks, self.open_tasks(now))
        return task

    def _validate(self, model: str, params: dict[str, Any]) -> None:
        limits = self.limits
        prompt = params.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _Refusal(400, "003013001", "missing prompt", "prompt")
        if limits.max_prompt_chars is not None and len(prompt) > limits.max_prompt_chars:
            raise _Refusal(400, "003013003", "invalid prompt length", "prompt")
        binary, urls = params.get("binary_data_base64"), params.get("image_urls")
        if binary is None and urls is None:
            raise _Refusal(400, "003013002", "missing image", "images")
        if binary is not None and urls is not None:
            raise _Refusal(
                400, "003013004", "send binary_data_base64 or image_urls, not both", "images"
            )
        images = binary if binary is not None else urls
        if not isinstance(images, list) or not images:
            raise _Refusal(400, "003013002", "missing image", "images")
        high = 1 if model == "spark_dreamo" else limits.max_images
        if not limits.min_images <= len(images) <= high:
            raise _Refusal(400, "003013004", f"{len(images)} images; 1-{high} allowed", "images")
        for i, item in enumerate(images):
            if not isinstance(item, str):
                raise _Refusal(400, "003013004", f"image {i} is not a string", "images")
            if binary is not None:
                self._check_image(i, item)
            elif not item.startswith(("http://", "https://")):
                raise _Refusal(400, "003013004", f"image_urls[{i}] is not an http(s) URL", "images")
        refs = params.get("ref_type_list")
        if refs is not None and (
            not isinstance(refs, list) or len(refs) != len(images) or not set(refs) <= _REF_TYPES
        ):
            raise _Refusal(400, "003013004", f"invalid ref_type_list {refs!r}", "ref_type_list")
        self._check_number(
            params, "guidance_scale1", limits.min_guidance_scale, limits.max_guidance_scale
        )
        self._check_number(
            params, "guidance_scale2", limits.min_guidance_scale, limits.max_guidance_scale
        )
        self._check_number(
            params, "ddim_steps", limits.min_ddim_steps, limits.max_ddim_steps, integer=True
        )
        self._check_number(params, "seed", -1, limits.max_seed, integer=True)
        self._check_number(
            params, "width", limits.min_output_side, limits.max_output_side, integer=True
        )
        self._check_number(
            params, "height", limits.min_output_side, limits.max_output_side, integer=True
        )
        if params.get("width", 1328) * params.get("height", 1328) > limits.max_output_pixels:
            raise _Refusal(400, "003013004", "width * height too large", "width")
        for name in ("swap_face", "use_rephraser"):
            if name in params and not isinstance(params[name], bool):
                raise _Refusal(400, "003013004", f"{name} must be a boolean", name)
        if "rephraser_level" in params and params["rephraser_level"] not in _REPHRASER_LEVELS:
            raise _Refusal(400, "003013004", "invalid rephraser_level", "rephraser_level")

    def _check_image(self, index: int, encoded: str) -> None:
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise _Refusal(400, "003013004", f"image {index} is not base64", "base64") from None
        if len(data) > self.limits.max_image_bytes:
            raise _Refusal(400, "003013004", f"image {index} is {len(data)} bytes", "image_size")
        if not (data.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"))):
            raise _Refusal(400, "003013004", f"image {index} is not JPEG or PNG", "image_format")

    @staticmethod
    def _check_number(
        params: Mapping[str, Any], name: str, low: float, high: float, *, integer: bool = False
    ) -> None:
        if name not in params:
            return
        value = params[name]
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not low <= value <= high:
            raise _Refusal(400, "003013004", f"invalid parameter {name}={value!r}", name)

    def _describe(self, task: _Task, now: float) -> dict[str, Any]:
        elapsed = now - task.created
        data: dict[str, Any] = {
            "id": task.id,
            "model": task.model,
            "created_at": self._created_at(task),
        }
        if elapsed < task.queue_s:
            data["status"] = self._word("pending")
        elif elapsed < task.queue_s + task.duration_s:
            data["status"] = self._word("processing")
            if self.report_progress and math.isfinite(task.duration_s):
                data["progress"] = round((elapsed - task.queue_s) / task.duration_s, 4)
        elif task.fail_code is not None:
            data["status"] = self._word("failed")
            meaning = PROVIDER_ERROR_CODES.get(task.fail_code, "generation failed")
            data["error"] = {"code": task.fail_code, "message": meaning.capitalize()}
        else:
            data["status"] = self._word("completed")
            url = f"{self.url}/files/{task.id}/0.png"
            job = f"job-{task.id}"
            if self.output_layout == "flat":
                data["output"] = [{"url": url, "type": "image", "jobId": job}]
            else:
                data["output"] = [{"content": [{"type": "image", "url": url, "jobId": job}]}]
            data["usage"] = {"cost": self.cost, "discount": 1}
            data["metadata"] = {"completed_at": int(task.created_wall + elapsed)}
        return data

    def _word(self, canonical: str) -> str:
        return self.status_words.get(canonical, canonical)

    def _created_at(self, task: _Task) -> int | str:
        if self.created_at_format == "ms":
            return int(task.created_wall * 1000)
        if self.created_at_format == "iso":
            return dt.datetime.fromtimestamp(task.created_wall, tz=dt.UTC).isoformat()
        return int(task.created_wall)

    # -- answers ---------------------------------------------------------------------

    def _json(self, data: dict[str, Any]) -> web.Response:
        if self.envelope:
            return web.json_response({"data": data, "status": {"code": 200, "message": "success"}})
        return web.json_response(data)

    @staticmethod
    def _error(
        status: int, code: str, message: str, *, retry_after: str | None = None
    ) -> web.Response:
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        return web.json_response(
            {"error": {"code": code, "message": message}}, status=status, headers=headers
        )

    async def _simple_fault(self, fault: Fault) -> web.StreamResponse | None:
        """Answer a fault that needs no task; None when the request should go on."""
        if fault.kind == "slow":
            await asyncio.sleep(fault.delay_ms / 1000.0)
            return None
        if fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            if fault.body is not None:
                return web.Response(
                    status=fault.status_code,
                    text=fault.body,
                    content_type=fault.content_type,
                    headers=headers,
                )
            message = fault.message or f"injected HTTP {fault.status_code}"
            return web.json_response(
                {"error": {"code": str(fault.status_code), "message": message}},
                status=fault.status_code,
                headers=headers,
            )
        if fault.kind == "invalid_json":
            return web.Response(text='{"id": "x", "status": ', content_type="application/json")
        if fault.kind == "wrong_shape":
            return web.json_response(["not", "a", "task"])
        if fault.kind == "huge":
            return web.Response(body=b" " * fault.size, content_type="application/json")
        return None

    @staticmethod
    async def _drop(request: web.Request) -> web.StreamResponse:
        """Close the connection without an answer (the client sees a disconnect)."""
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise asyncio.CancelledError  # aiohttp ends the handler quietly
