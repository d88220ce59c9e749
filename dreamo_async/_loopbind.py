"""One client per event loop: a client works in the loop of its first job; once that loop
is closed (a second ``asyncio.run``) it starts afresh in the next one; two live loops at
once (threads) would split ``max_concurrency`` and the rate between them: refused."""

from __future__ import annotations

import asyncio
import logging

from .errors import ConfigurationError

logger = logging.getLogger("dreamo_async")


class LoopBinding:
    """The event loop a client works in, and the rule for moving to another one."""

    __slots__ = ("_remakes_limits", "loop")

    def __init__(self, *, remakes_limits: bool) -> None:
        #: The client made its limiter and backend itself, so it can make fresh ones.
        self._remakes_limits = remakes_limits
        self.loop: asyncio.AbstractEventLoop | None = None

    def enter(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Work in ``loop`` from now on; ``True``: a previous loop is closed, and what
        the client holds of it must be made afresh. Raises :class:`ConfigurationError`
        for a loop used while another still runs, or limits the client cannot remake."""
        old = self.loop
        if old is not None:
            if not old.is_closed():
                raise ConfigurationError(
                    "this DreamOClient is in use by another event loop (another thread?); "
                    "make one client per thread or event loop"
                )
            if not self._remakes_limits:
                raise ConfigurationError(
                    "this DreamOClient was used in an event loop that is now closed, and its "
                    "limiter or coordinator may belong to that loop; create the client "
                    "inside the coroutine that asyncio.run runs"
                )
            logger.info("the client's event loop was closed: starting afresh in a new one")
        self.loop = loop
        return old is not None
