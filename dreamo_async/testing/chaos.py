"""Every fault at once: a seeded chaos configuration of :class:`FakeDreamOServer`.

:meth:`FakeDreamOServer.chaos` draws single faults from a weighted list; a
:class:`ChaosConfig` describes a whole hostile service instead, with one
probability per failure a production client meets::

    chaos = ChaosConfig(seed=7, drop_before_body=0.02, reset_mid_response=0.02,
                        rate_limit_storm=0.005, never_finish=0.02, vanish=0.02)
    async with FakeDreamOServer(chaos_config=chaos) as server: ...

Per-request faults (each request to an endpoint in ``endpoints`` draws at most
one, from the seeded RNG, in arrival order):

======================  ========================================================
``drop_before_body``    the connection closes before the request body is read
``drop_after_body``     the body is read and the work done (a create makes its
                        task), then the connection closes without an answer
``reset_mid_response``  the work is done, headers and half the body are sent,
                        then the connection is reset
``html_5xx``            502 or 503 with an HTML page from a "proxy" (no work)
``invalid_json``        the work is done, then a 200 whose body is cut in half
``wrong_shape``         the work is done, then a 200 with JSON of no known shape
``slow``                the normal answer, ``slow_ms`` late (set it above the
                        client's read timeout)
``slow_answer``         the work is done (a create makes its task), then the
                        normal answer, ``slow_ms`` late: a client closed (or
                        timed out) meanwhile never hears of the task
``create_then_5xx``     creates only: the task is made, then a 500 (or 503)
``unexpected_2xx``      creates only: the task is made, then a 202, 203 or 204
                        with an empty body (no documented answer)
``rate_limit_storm``    starts a storm: this and the next ``storm_length``
                        requests all get 429 with ``Retry-After``
``hintless_storm``      the same storm, its 429s without ``Retry-After``
======================  ========================================================

Per-task faults (drawn once when a task is created):

======================  ========================================================
``never_finish``        the task stays ``processing`` forever
``vanish``              the task id answers 404 some ``vanish_after_ms`` after
                        creation (a service that lost it)
======================  ========================================================

Every fault used is counted in ``server.stats.faults`` under
``"<endpoint>:<name>"`` (``"task:never_finish"`` for per-task ones), so a run can
report what it survived. This is the fault model only: ``harness.py``'s
:func:`~dreamo_async.testing.harness.run_chaos` drives a client through such a server.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Final

import attrs

from ._faults import ENDPOINTS, Endpoint, Fault

if TYPE_CHECKING:
    from ._tasks import FakeTask

__all__ = ["ChaosConfig", "ChaosState"]

_HTML_502: Final = Fault.status(
    502,
    body="<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>"
    "<hr><center>nginx</center></body></html>",
    content_type="text/html",
).named("html_502")
_HTML_503: Final = Fault.status(
    503,
    body="<!DOCTYPE html><html><body>Service Temporarily Unavailable</body></html>",
    content_type="text/html; charset=utf-8",
).named("html_503")
_HINTLESS_429: Final = Fault.status(429, message="rate limit exceeded (storm, no hint)").named(
    "hintless_storm"
)
#: JSON answers of no known shape (the task ``id`` is missing or of the wrong type).
_WRONG_SHAPES: Final[tuple[object, ...]] = (
    {"result": ["not", "a task"]},
    [1, 2, 3],
    "a string",
    {"data": [], "status": {"code": 200}},
    {"id": None, "status": "completed"},
    {"id": {"nested": True}, "status": 7},
)

#: Faults :meth:`ChaosConfig.everything` gives the full ``rate`` (slow: half, storms: a tenth).
_AT_FULL_RATE: Final = (
    "drop_before_body",
    "drop_after_body",
    "reset_mid_response",
    "html_5xx",
    "invalid_json",
    "wrong_shape",
    "create_then_5xx",
    "unexpected_2xx",
    "never_finish",
    "vanish",
)


@attrs.frozen(kw_only=True)
class ChaosConfig:
    """Probabilities of each fault (0 = never); see the module docstring for what each does."""

    seed: int = 0
    endpoints: tuple[Endpoint, ...] = ("create", "poll")
    drop_before_body: float = 0.0
    drop_after_body: float = 0.0
    reset_mid_response: float = 0.0
    html_5xx: float = 0.0
    invalid_json: float = 0.0
    wrong_shape: float = 0.0
    slow: float = 0.0
    #: Delay of a ``slow`` answer; make it longer than the client's read timeout.
    slow_ms: float = 200.0
    slow_answer: float = 0.0
    create_then_5xx: float = 0.0
    unexpected_2xx: float = 0.0
    rate_limit_storm: float = 0.0
    hintless_storm: float = 0.0
    #: Requests answered 429 after the one that started a storm.
    storm_length: int = 20
    #: ``Retry-After`` of a storm's answers, in seconds (fractional keeps tests fast).
    retry_after_s: float = 0.005
    never_finish: float = 0.0
    vanish: float = 0.0
    vanish_after_ms: float = 5.0

    def __attrs_post_init__(self) -> None:
        for name, value in self.probabilities().items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ChaosConfig.{name} must be within 0..1, got {value!r}")
        if sum(self.request_probabilities().values()) > 1.0:
            raise ValueError("the per-request probabilities of a ChaosConfig must sum to <= 1")
        if self.never_finish + self.vanish > 1.0:
            raise ValueError("never_finish + vanish must be <= 1")
        for endpoint in self.endpoints:
            if endpoint not in ENDPOINTS:
                raise ValueError(f"unknown endpoint {endpoint!r}")

    @classmethod
    def everything(
        cls, rate: float = 0.03, *, seed: int = 0, slow_ms: float = 200.0
    ) -> ChaosConfig:
        """Every fault at once, each per-request fault with probability ``rate``.

        Storms (with and without ``Retry-After``) start ten times less often (each lasts
        ``storm_length`` requests).
        """
        every: dict[str, Any] = dict.fromkeys(_AT_FULL_RATE, rate)  # all float fields
        return attrs.evolve(
            cls(seed=seed, slow_ms=slow_ms, slow=rate / 2, slow_answer=rate / 2),
            rate_limit_storm=rate / 10,
            hintless_storm=rate / 10,
            **every,
        )

    def request_probabilities(self) -> dict[str, float]:
        return {
            "drop_before_body": self.drop_before_body,
            "drop_after_body": self.drop_after_body,
            "reset_mid_response": self.reset_mid_response,
            "html_5xx": self.html_5xx,
            "invalid_json": self.invalid_json,
            "wrong_shape": self.wrong_shape,
            "slow": self.slow,
            "slow_answer": self.slow_answer,
            "create_then_5xx": self.create_then_5xx,
            "unexpected_2xx": self.unexpected_2xx,
            "rate_limit_storm": self.rate_limit_storm,
            "hintless_storm": self.hintless_storm,
        }

    def probabilities(self) -> dict[str, float]:
        return {
            **self.request_probabilities(),
            "never_finish": self.never_finish,
            "vanish": self.vanish,
        }


class ChaosState:
    """The running side of a :class:`ChaosConfig`: its RNG and the storm in progress."""

    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._task_rng = random.Random(config.seed + 1)
        self._storm_left = 0
        self._storm_hint = True
        self._names = list(config.request_probabilities())
        self._weights = list(config.request_probabilities().values())

    def draw(self, endpoint: Endpoint) -> Fault | None:
        """The fault for the next request to ``endpoint``, or ``None``."""
        config = self.config
        if endpoint not in config.endpoints:
            return None
        if self._storm_left > 0:
            self._storm_left -= 1
            return self._storm_fault()
        roll = self._rng.random()
        for name, weight in zip(self._names, self._weights, strict=True):
            if roll < weight:
                return self._fault(name, endpoint)
            roll -= weight
        return None

    def _storm_fault(self) -> Fault:
        if not self._storm_hint:
            return _HINTLESS_429
        return Fault.status(
            429, retry_after=self.config.retry_after_s, message="rate limit exceeded (storm)"
        ).named("rate_limit_storm")

    def _fault(self, name: str, endpoint: Endpoint) -> Fault | None:
        config = self.config
        if name == "drop_before_body":
            return Fault.drop_before(reset=self._rng.random() < 0.5).named(name)
        if name == "drop_after_body":
            return Fault.drop_after(reset=self._rng.random() < 0.5).named(name)
        if name == "reset_mid_response":
            return Fault.reset_mid().named(name)
        if name == "html_5xx":
            return _HTML_502 if self._rng.random() < 0.5 else _HTML_503
        if name == "invalid_json":
            return Fault.invalid_json().named(name)
        if name == "wrong_shape":
            return Fault.wrong_shape(self._rng.choice(_WRONG_SHAPES)).named(name)
        if name == "slow":
            return Fault.slow(config.slow_ms).named(name)
        if name == "slow_answer":
            return Fault.slow_answer(config.slow_ms).named(name)
        if name == "create_then_5xx":
            if endpoint != "create":
                return None
            return Fault.create_then_500(self._rng.choice((500, 503))).named(name)
        if name == "unexpected_2xx":
            if endpoint != "create":
                return None
            status = self._rng.choice((202, 203, 204))
            return Fault.create_then_500(status, body="").named(f"unexpected_{status}")
        # rate_limit_storm, hintless_storm
        self._storm_left = config.storm_length
        self._storm_hint = name == "rate_limit_storm"
        return self._storm_fault()

    def shape_task(self, task: FakeTask) -> str | None:
        """Apply a per-task fault to a new task; return its name (or ``None``)."""
        roll = self._task_rng.random()
        if roll < self.config.never_finish:
            task.ends_at = float("inf")
            return "never_finish"
        if roll < self.config.never_finish + self.config.vanish:
            task.gone_at = task.created_at + self.config.vanish_after_ms / 1000.0
            return "vanish"
        return None
