"""How a client is made: the API key and base URL from the environment, the request
limiter from the rate options, the key as shown in a repr."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Final, Literal, cast

import yarl

from .coordination import AdaptiveLimiter, Coordinator, RateLimiter
from .errors import ConfigurationError

#: Environment variables read for the API key, in order.
API_KEY_ENV_VARS: Final = ("DREAMO_API_KEY", "VTRIX_API_KEY")
#: Environment variable read for the base URL when ``base_url`` is not given.
BASE_URL_ENV_VAR: Final = "DREAMO_BASE_URL"


def _make_limiter(
    backend: Coordinator, rate: float | Literal["auto"] | None, burst: int
) -> RateLimiter:
    """The request limiter: strict (a number), none (``None``) or learned (``"auto"``).

    ``"auto"`` needs the backend's optional ``make_adaptive_limiter`` (the in-process
    default has it). A shared backend without one is refused rather than given a
    per-process learned rate, which would silently stop sharing the budget.
    """
    if rate == "auto":
        factory = getattr(backend, "make_adaptive_limiter", None)
        if factory is None:
            raise ConfigurationError(
                f'requests_per_second="auto" is learned in one process; {backend!r} shares '
                "a fixed budget between processes: give requests_per_second a number"
            )
        return cast(RateLimiter, factory(burst))
    if isinstance(rate, str):
        raise ValueError(f'requests_per_second must be a number, None or "auto"; got {rate!r}')
    return backend.make_limiter(rate, burst)


def _learned(factory: Callable[[int], RateLimiter], burst: int, seen: float) -> RateLimiter:
    """The limiter a client without a rate switches to at its first 429, from the rate
    the service accepted just before (``"auto"``'s limiter, without its slow start)."""
    limiter = factory(burst)
    if isinstance(limiter, AdaptiveLimiter):
        limiter.settle(seen)
    return limiter


def mask_key(key: str | None) -> str:
    if not key:
        return "missing"
    return f"...{key[-4:]}" if len(key) >= 12 else "***"


def make_limiters(
    backend: Coordinator,
    limiter: RateLimiter | None,
    rate: float | Literal["auto"] | None,
    burst: int,
) -> tuple[RateLimiter, Callable[[float], RateLimiter] | None]:
    """The request limiter (given, or made from the rate), and what a client without a
    rate learns from at its first 429 (``None``: nothing to learn)."""
    if limiter is not None:
        return limiter, None
    made = _make_limiter(backend, rate, burst)
    if rate is not None:
        return made, None
    # No rate given: full speed until the service answers 429, then learned as "auto"
    # does (a backend that shares a fixed budget has no learning).
    factory = getattr(backend, "make_adaptive_limiter", None)
    return made, None if factory is None else functools.partial(_learned, factory, burst)


def checked_base_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a valid port; else :class:`ConfigurationError`
    (yarl's own ``ValueError`` for a port out of range names no option)."""
    try:
        port = yarl.URL(url).port
    except ValueError as exc:
        raise ConfigurationError(f"base_url {url!r} is not a valid URL: {exc}") from None
    if port is not None and not 0 < port < 65536:
        raise ConfigurationError(f"base_url {url!r} has a port out of range (1-65535)")
    return url
