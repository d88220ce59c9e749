"""The create of a job: its body from the prepared images, and the create request,
which outlives a caller's cancellation once the body may be on the wire (a task it
makes is then known and watched, not lost)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Final

from ._body import BodyParts
from ._jobs import _Job
from ._watch import Watcher
from .errors import MoneyState
from .images import prepare_inline, prepare_slow
from .limits import Limits
from .models import Task
from .request import GenerationRequest
from .transport import Transport
from .wire import create_body_parts, request_params

logger = logging.getLogger("dreamo_async")

#: Create bodies up to this size are joined into one buffer; larger ones are sent as
#: parts. aiohttp warns about bytes bodies over 1 MiB, and joining costs a copy.
_JOIN_MAX_BYTES: Final = 256 * 1024


async def prepare_body(
    request: GenerationRequest,
    limits: Limits,
    fit_images: bool,
    fetch_input: Callable[[str, int], Awaitable[bytes]],
) -> bytes | BodyParts:
    """The create body of ``request``, its images read, checked and encoded."""
    prepared = None if fit_images else prepare_inline(request.images, limits)
    if prepared is None:
        # URLs alone pass through, with no I/O; files, data URIs, large or fitted
        # images, and URLs mixed with local images (downloaded first) go to the
        # worker thread. prepare_images would run prepare_inline again.
        prepared = await prepare_slow(request.images, limits, fetch_input, fit_images)
    params = request_params(request)
    parts = create_body_parts(request.model, params, prepared.base64_pieces, prepared.urls)
    del prepared  # the encoded images now live only in the body's parts
    # Small bodies go as one buffer (aiohttp sends it with the headers in one
    # syscall); large ones as their parts, never joined (a copy of up to 31 MB).
    if sum(map(len, parts)) > _JOIN_MAX_BYTES:
        return BodyParts(parts)
    return b"".join(parts)


async def create_task(
    transport: Transport,
    body: bytes | BodyParts,
    job: _Job,
    watcher: Watcher,
    *,
    before_send: Callable[[str], Awaitable[None]] | None = None,
) -> Task:
    """Send the create of ``job``; its lifecycle follows the request.

    The create runs as its own asyncio task. A caller's cancellation while the
    body may be on the wire does not abort it: it goes on in the background (bounded
    by the request's timeout, never sent again), so a task it makes is known and
    watched instead of lost. ``aclose`` aborts it: the outcome is then unknown.
    """
    request_id = secrets.token_hex(16)  # 32 hex digits, as uuid4().hex, 5x cheaper
    lifecycle = job.lifecycle
    loop = asyncio.get_running_loop()
    # The job awaits a bare future the create's task fills as it ends: a cancellation
    # of the job cancels that future only (what asyncio.shield does, with one fewer
    # future and one fewer trip round the loop per create).
    waiter: asyncio.Future[Task] = loop.create_future()
    create = loop.create_task(
        _report_to(
            waiter,
            transport.create(
                body, request_id=request_id, before_send=before_send, lifecycle=lifecycle
            ),
        )
    )
    try:
        task = await waiter
    except asyncio.CancelledError:
        if waiter.done() and not waiter.cancelled():
            waiter.exception()  # the create ended first: its task says how (below)
        if job.closed_by_client or watcher.closed or lifecycle.state is MoneyState.NOT_SENT:
            # Closing, or nothing left yet: abort (the job's error says which).
            create.cancel()
            await asyncio.wait([create])
            if not create.cancelled() and create.exception() is None:
                lifecycle.created(create.result().id)
            if job.closed_by_client and lifecycle.task_may_exist:
                logger.warning(
                    "the client was closed while a create was in flight; a task may "
                    "exist (X-Request-Id %s)",
                    request_id,
                )
        else:
            watcher.watch(job, None, create, "was cancelled while its create was in flight")
        raise
    except BaseException:
        create.exception()  # the job raises it: the create's task already ended with it
        raise
    if isinstance(body, BodyParts):
        await body.release()  # megabytes freed a part at a time, not in one callback
    logger.info("created task %s (%s; X-Request-Id %s)", task.id, task.raw_status, request_id)
    return task


async def _report_to(waiter: asyncio.Future[Task], create: Awaitable[Task]) -> Task:
    """Run ``create`` and hand its end to ``waiter`` (unless the job stopped waiting);
    the task running this keeps the end too, for a watcher that takes the create over."""
    try:
        task = await create
    except asyncio.CancelledError:
        if not waiter.done():
            waiter.cancel()
        raise
    except BaseException as exc:
        if not waiter.done():
            waiter.set_exception(exc)
        raise
    if not waiter.done():
        waiter.set_result(task)
    return task
