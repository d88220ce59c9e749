"""What a failed request means, and whether it is sent again: decided from its money state.

A create is re-sent only while nothing can exist (its :class:`JobLifecycle` is moved
first: refused, or outcome unknown); the poll of a task that exists retries transient
failures until the job's deadline; other polls and downloads up to ``max_attempts``.
Each rule returns the delay hint of the retry (``None``: the backoff's) or raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

import aiohttp

from ._answers import documented_refusal
from ._netguard import BlockedAddressError
from .errors import (
    APIConnectionError,
    APIError,
    CreateOutcomeUnknownError,
    InvalidRequestError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
)
from .lifecycle import JobLifecycle
from .retry import RetryPolicy

__all__ = ["create_retry", "hint", "hint_ok", "idempotent_retry"]

#: Network failures after which a create request surely never reached the service.
_NOT_SENT_ERRORS: Final = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
#: Everything aiohttp may raise while a request is in flight.
_TRANSPORT_ERRORS: Final = (aiohttp.ClientError, asyncio.TimeoutError)
#: Answers of an idempotent request that are retried (besides 429).
_RETRIED_API_ERRORS: Final = (ServerError, ResponseFormatError)


def create_retry(
    policy: RetryPolicy,
    error: Exception,
    attempt: int,
    job: JobLifecycle,
    answered: bool,
    on_429: Callable[[RateLimitError], None],
) -> float | None:
    """After a failed create attempt: move the job's money state, then retry (the delay
    hint) only while nothing can exist, else raise."""
    if isinstance(error, _NOT_SENT_ERRORS) or (
        answered and isinstance(error, APIError) and documented_refusal(error)
    ):
        job.refused()  # a connection never made, a 429, a 400-class code, 401, 403
    elif isinstance(error, CreateOutcomeUnknownError):
        job.outcome_unknown()
        raise error
    else:
        # A cut answer, a read timeout, a 5xx, 3xx, 404, 413, an answer over the cap...:
        # the body may have reached the service, so the outcome is unknown.
        job.outcome_unknown()
        if isinstance(error, APIError) and answered:
            message = (
                f"the service answered the create request with HTTP {error.status}: {error.message}"
            )
        else:
            message = (
                f"the create request failed after it was sent ({type(error).__name__}: {error})"
            )
        raise CreateOutcomeUnknownError(message, request_id=job.request_id) from error
    # Nothing exists from here on: sending again is safe, if the error allows it.
    if isinstance(error, RateLimitError):
        on_429(error)
        if attempt < policy.max_attempts and hint_ok(policy, error):
            return hint(policy, error)
        raise error
    if isinstance(error, _NOT_SENT_ERRORS):
        if attempt < policy.max_attempts:
            return None
        raise APIConnectionError(
            f"could not connect: {error} (after {attempt} attempts; no task was created)"
        ) from error
    raise error  # a documented refusal: nothing was made, and it would be refused again


def idempotent_retry(
    policy: RetryPolicy,
    error: Exception,
    attempt: int,
    name: str | None,
    task_exists: bool,
    on_429: Callable[[RateLimitError], None],
) -> float | None:
    """After a failed poll or download: the delay hint to retry with, or raise.

    429 (the cool-down is set), 5xx, unreadable answers and network errors are
    retried until ``max_attempts``; anything else is raised as it is. For the poll
    of a task that exists (``task_exists``), 429, 5xx and network errors are
    transient whatever their number: the caller's deadline bounds them.
    """
    if isinstance(error, RateLimitError):
        on_429(error)
        if task_exists:
            return min(hint(policy, error), policy.max_retry_after)
        if attempt >= policy.max_attempts or not hint_ok(policy, error):
            raise error
        return hint(policy, error)
    if isinstance(error, ServerError) and task_exists:
        return None
    if isinstance(error, _RETRIED_API_ERRORS):
        if attempt >= policy.max_attempts:
            raise error
        return None
    if isinstance(error, aiohttp.ClientConnectorError) and isinstance(
        error.os_error, BlockedAddressError
    ):
        raise InvalidRequestError(
            f"refusing to download {name}: {error.os_error.reason}; "
            "pass DreamOClient(allow_private_urls=True) to allow it",
            parameter="url",
        ) from None
    if isinstance(error, _TRANSPORT_ERRORS):
        if task_exists:
            return None
        if attempt >= policy.max_attempts:
            raise APIConnectionError(
                f"{name}: {type(error).__name__}: {error} (after {attempt} attempts)"
            ) from error
        return None
    raise error


def hint_ok(policy: RetryPolicy, error: RateLimitError) -> bool:
    """Whether a 429's hint is short enough to wait for."""
    return error.retry_after is None or error.retry_after <= policy.max_retry_after


def hint(policy: RetryPolicy, error: RateLimitError) -> float:
    """How long to hold requests after this 429: its hint, else the default pause."""
    return error.retry_after if error.retry_after is not None else policy.rate_limit_pause
