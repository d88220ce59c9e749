"""Which fault the fake server plays next, and how it plays it.

:class:`FaultPlan` holds the scripted queue (``inject``) and both kinds of random
chaos (``chaos`` probabilities, a :class:`ChaosConfig`); :func:`before_work` and
:func:`after_work` turn a drawn :class:`Fault` into what the client receives, so
``FakeDreamOServer`` keeps only the service's own work.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from aiohttp import web

from ._faults import CHAOS_FAULTS, ENDPOINTS, Endpoint, Fault
from ._http import Answer, drop, fault_answer, render, stream_cut, stream_padded
from .chaos import ChaosConfig, ChaosState

__all__ = ["FaultPlan", "after_work", "before_work", "check_endpoint"]

_FAIL_RE: Final = re.compile(r"\[fail:([\w-]+)\]")
_SLOW_RE: Final = re.compile(r"\[slow:(\d+(?:\.\d+)?)\]")


class FaultPlan:
    """Scripted faults first (in order), then a :class:`ChaosConfig`, then ``chaos()`` draws.

    It also scripts how new tasks end: the prompt's tags, else the ``fail_tasks`` rule.
    """

    def __init__(self, chaos_config: ChaosConfig | None = None) -> None:
        self._queued: dict[str, collections.deque[Fault]] = collections.defaultdict(
            collections.deque
        )
        self._p: dict[str, float] = {}
        self._pool: list[Fault] = []
        self._weights: list[float] = []
        self._rng = random.Random(0)
        self.state = ChaosState(chaos_config) if chaos_config is not None else None
        self._fail_rule: tuple[str, float, random.Random] | None = None

    def inject(self, endpoint: Endpoint, fault: Fault, times: int) -> None:
        self._queued[check_endpoint(endpoint)].extend([fault] * times)

    def pending(self, endpoint: Endpoint) -> int:
        return len(self._queued.get(endpoint, ()))

    def chaos(
        self,
        probability: float | Mapping[Endpoint, float],
        seed: int,
        faults: Sequence[Fault] | Mapping[Fault, float] | None,
        endpoints: Iterable[Endpoint],
    ) -> None:
        if isinstance(probability, Mapping):
            self._p = {check_endpoint(k): v for k, v in probability.items()}
        else:
            self._p = {check_endpoint(e): probability for e in endpoints}
        pool = CHAOS_FAULTS if faults is None else faults
        weighted = pool if isinstance(pool, Mapping) else dict.fromkeys(pool, 1.0)
        if not weighted:
            raise ValueError("chaos needs at least one fault")
        self._pool = list(weighted)
        self._weights = [float(w) for w in weighted.values()]
        self._rng = random.Random(seed)

    def set_chaos(self, config: ChaosConfig | None) -> None:
        self.state = ChaosState(config) if config is not None else None

    def clear(self) -> None:
        self._queued.clear()
        self._p = {}
        self.state = None

    def fail_tasks(self, code: str, ratio: float, seed: int) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("ratio must be within 0..1")
        self._fail_rule = (code, ratio, random.Random(seed)) if ratio > 0 else None

    def task_outcome(self, prompt: str, duration: float) -> tuple[float, str | None]:
        """A new task's duration (seconds) and failure code, from ``[slow:MS]``, ``[never]``,
        ``[fail:CODE]`` in ``prompt``, else the ``fail_tasks`` rule (``None``: it completes)."""
        if (slow := _SLOW_RE.search(prompt)) is not None:
            duration = float(slow.group(1)) / 1000.0
        if "[never]" in prompt:
            duration = math.inf
        if (fail := _FAIL_RE.search(prompt)) is not None:
            return duration, fail.group(1)
        if self._fail_rule is not None:
            code, ratio, rng = self._fail_rule
            return duration, code if rng.random() < ratio else None
        return duration, None

    def next(self, endpoint: Endpoint) -> Fault | None:
        """The fault for the next request to ``endpoint``, or ``None`` to serve it straight."""
        queue = self._queued.get(endpoint)
        if queue:
            return queue.popleft()
        if self.state is not None and (fault := self.state.draw(endpoint)):
            return fault
        p = self._p.get(endpoint, 0.0)
        if p > 0 and self._rng.random() < p:
            return self._rng.choices(self._pool, self._weights)[0]
        return None


def check_endpoint(endpoint: str) -> Endpoint:
    """``endpoint`` itself when it is one of :data:`ENDPOINTS`, else a ``ValueError``."""
    for known in ENDPOINTS:
        if endpoint == known:
            return known
    raise ValueError(f"endpoint must be one of {', '.join(map(repr, ENDPOINTS))}, got {endpoint!r}")


async def before_work(fault: Fault, request: web.Request) -> web.StreamResponse | None:
    """Play the part of ``fault`` that comes before the work; an answer ends the request."""
    if fault.delay_ms > 0 and fault.kind != "slow_answer":
        await asyncio.sleep(fault.delay_ms / 1000.0)
    if fault.kind == "drop_before":
        return drop(request, reset=fault.reset)
    if fault.kind == "status":
        return render(fault_answer(fault))
    if fault.kind == "envelope_error":
        status = {"code": fault.status_code, "message": fault.message or "error"}
        return render(Answer(200, {"data": None, "status": status}))
    return None


async def after_work(fault: Fault, request: web.Request, answer: Answer) -> web.StreamResponse:
    """Deliver the service's ``answer`` as ``fault`` (one of the after-work kinds) spoils it."""
    if fault.kind == "slow_answer":
        await asyncio.sleep(fault.delay_ms / 1000.0)
        return render(answer)
    if fault.kind == "drop_after":
        return drop(request, reset=fault.reset)
    if fault.kind == "create_then_500":
        return render(fault_answer(fault))
    if fault.kind == "reset_mid":
        return await stream_cut(request, answer)
    if fault.kind == "invalid_json":
        encoded = answer.encode()
        return render(Answer(200, body=encoded[: len(encoded) // 2]))
    if fault.kind == "wrong_shape":
        shape = fault.payload if fault.payload is not None else {"result": ["not", "a task"]}
        return render(Answer(200, shape))
    return await stream_padded(request, answer, fault.size, chunked=fault.chunked)
