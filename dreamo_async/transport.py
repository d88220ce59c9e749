"""HTTP to the service: auth, timeouts, capped reads, retries, and error mapping.

This is the only module that touches aiohttp's client. Its exceptions never
leave it: each is mapped to a :mod:`dreamo_async.errors` class and chained.

The retry rules are where money is saved or lost:

* a **poll** or a **download** is idempotent, so connection errors, timeouts,
  5xx, 429 and unreadable answers are retried with backoff;
* a **create** is retried only when the service surely made no task: the
  connection was never established (refused, DNS, connect timeout) or the
  answer was a 429. After the body may have left (a reset, a read timeout, a
  5xx), :class:`CreateOutcomeUnknownError` is raised and the request is never
  sent again.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import random
import secrets
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar
from urllib.parse import quote

import aiohttp
import attrs
from aiohttp.connector import Connection
from yarl import URL

from . import __about__
from ._body import BodyParts
from ._netguard import (
    BlockedAddressError,
    check_url,
    display_url,
    guarded_socket_factory,
    secret_header,
)
from .coordination import Priority, RateLimiter, UnlimitedLimiter
from .errors import (
    PROVIDER_ERROR_CODES,
    APIConnectionError,
    APIError,
    ClientClosedError,
    ConfigurationError,
    CreateOutcomeUnknownError,
    DownloadError,
    DreamOError,
    InvalidRequestError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
    TaskTimeoutError,
)
from .lifecycle import JobLifecycle
from .limits import DEFAULT_LIMITS, Limits
from .models import Task
from .retry import RetryPolicy, parse_retry_after
from .wire import error_class_for_status, parse_error_body, parse_task

__all__ = ["DEFAULT_BASE_URL", "Endpoints", "Transport"]

_T = TypeVar("_T")

logger = logging.getLogger("dreamo_async")

#: The provider's base URL (API.md).
DEFAULT_BASE_URL: Final = "https://cloud.vtrix.ai"

#: Network failures after which a create request surely never reached the service.
_NOT_SENT_ERRORS: Final = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
#: Everything aiohttp may raise while a request is in flight.
_TRANSPORT_ERRORS: Final = (aiohttp.ClientError, asyncio.TimeoutError)
#: Answers of an idempotent request that are retried (besides 429).
_RETRIED_API_ERRORS: Final = (ServerError, ResponseFormatError)


#: The limiter of the request being sent by this asyncio task (see _PacedConnector).
_PACING: Final[contextvars.ContextVar[RateLimiter | None]] = contextvars.ContextVar(
    "dreamo_async_pacing", default=None
)
#: The timeout of a poll when the user set none: one timer for the whole request. The
#: session's ``sock_read`` guard re-arms a timer at every read (two per request); a poll
#: answer is a few hundred bytes, so a deadline on the whole request guards the same
#: stall for half the timer work. A poll that hits it is retried (polls are idempotent).
_POLL_TIMEOUT: Final = aiohttp.ClientTimeout(total=60.0, sock_connect=30.0)
#: The timeout of a small create (a body sent in one buffer) when the user set none:
#: one timer too, as for polls. A create that times out is never sent again, so the
#: deadline must not be spent before the request leaves: ``connect`` bounds the wait
#: for a pooled connection and the connecting (past it aiohttp raises
#: ``ConnectionTimeoutError``: surely not sent, so retried), well inside ``total``.
#: Large bodies keep the session's ``sock_read``: a slow uplink may take long to send
#: 31 MB, and only silence should end it.
_CREATE_TIMEOUT: Final = aiohttp.ClientTimeout(total=90.0, connect=60.0, sock_connect=30.0)
#: The lowest rate a client that learns from its first 429 starts from (requests/s): a
#: client that was nearly idle when a 429 came (a key shared with others) is not
#: throttled to a crawl; the learned limiter cuts further on the next 429s.
_MIN_LEARNED_START: Final = 5
#: How long past a job's deadline a retried poll's answer is awaited.
_DEADLINE_GRACE_S: Final = 0.05
#: Getting a connection slower than this means a new TCP connection was made.
_NEW_CONNECTION_S: Final = 0.002


class _PacedConnector(aiohttp.TCPConnector):
    """A connector that takes a second rate slot when it had to open a new connection.

    The rate slot is taken before the request (so polls can go ahead of creates).
    A pooled connection is handed over at once and the request leaves right after
    its slot; a new one takes a connect round trip, so the request would land at
    the service late, bunched with the ones paced after it. Waiting for a fresh
    slot once the connection is up keeps the service's view of every 1-s window
    within ``rate + burst`` (it costs one slot per new connection, not per request).
    """

    async def connect(
        self, req: aiohttp.ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        limiter = _PACING.get()
        if limiter is None:
            return await super().connect(req, traces, timeout)
        loop = asyncio.get_running_loop()
        started = loop.time()
        connection = await super().connect(req, traces, timeout)
        if loop.time() - started > _NEW_CONNECTION_S:
            try:
                await limiter.acquire(Priority.POLL)
            except BaseException:
                connection.close()
                raise
        return connection


@attrs.frozen(kw_only=True)
class Endpoints:
    """Where the two calls go. Both paths are configuration (a proxy may move them)."""

    base_url: str = DEFAULT_BASE_URL
    create_path: str = "/model/v1/generation"
    task_path: str = "/model/v1/generation/task/{id}"

    def __attrs_post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"base_url must be an http:// or https:// URL; got {self.base_url!r}"
            )

    @property
    def create_url(self) -> str:
        return self.base_url.rstrip("/") + self.create_path


class Transport:
    """One aiohttp session and the rules for talking to the service through it.

    The session is created lazily inside the running loop, so a client can be
    built outside any loop. ``api_key`` is held privately and never printed.
    """

    def __init__(
        self,
        *,
        api_key: str | None,
        endpoints: Endpoints,
        retry: RetryPolicy,
        limiter: RateLimiter | None = None,
        limits: Limits = DEFAULT_LIMITS,
        timeout: aiohttp.ClientTimeout | None = None,
        max_connections: int = 100,
        rng: random.Random | None = None,
        allow_private_urls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        learn_limiter: Callable[[float], RateLimiter] | None = None,
    ) -> None:
        _check_key(api_key)
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            # aiohttp takes ``False`` to mean "no certificate checks": never by accident here.
            raise ConfigurationError(
                f"ssl_context must be an ssl.SSLContext (or None for the system's trusted "
                f"certificates), got {ssl_context!r}; certificate verification cannot be "
                "switched off with a flag"
            )
        self._api_key = api_key
        self._auth = {"Authorization": secret_header(f"Bearer {api_key}")} if api_key else None
        self.allow_private_urls = allow_private_urls
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._user_session: aiohttp.ClientSession | None = None
        self.endpoints = endpoints
        #: Endpoints is frozen: the URLs' fixed parts are computed once, not per request.
        self._create_url = URL(endpoints.create_url)
        self._task_url = _task_url_maker(endpoints)
        self.retry = retry
        self.limiter: RateLimiter = limiter or UnlimitedLimiter()
        #: The unlimited limiter, whose acquire is skipped while it was never paused; None
        #: for any other limiter, and then requests are paced: new connections take a
        #: second rate slot (_PacedConnector) and the limiter records each status.
        self._unlimited = self.limiter if type(self.limiter) is UnlimitedLimiter else None
        #: Makes the limiter that replaces the unlimited one at the first 429 (the
        #: default client learns the service's rate, as ``"auto"``); None: never.
        self._learn = learn_limiter if self._unlimited is not None else None
        #: Answers other than 429 while a rate may be learned, counted from when the
        #: session was made: the service's rate seen before its first 429.
        self._answers = 0
        self._answers_since: float | None = None
        self.limits = limits
        self._timeout = timeout or aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=30.0, sock_read=60.0
        )
        #: Per-request timeout of polls: the session's when the user set one.
        self._poll_timeout = _POLL_TIMEOUT if timeout is None else self._timeout
        #: Per-request timeout of small creates: the session's when the user set one.
        self._create_timeout = _CREATE_TIMEOUT if timeout is None else self._timeout
        self._max_connections = max_connections
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        """The session, created on first use inside the running loop."""
        if self._closed:
            raise _closed_error()
        if self._session is None:
            # Without a rate there is nothing to pace: the plain connector saves a
            # coroutine layer per request.
            connector_class = _PacedConnector if self._unlimited is None else aiohttp.TCPConnector
            connector = connector_class(
                limit=self._max_connections, enable_cleanup_closed=False, ssl=self._ssl
            )
            self._session = self._new_session(connector)
            self._answers_since = asyncio.get_running_loop().time()
        return self._session

    @property
    def user_session(self) -> aiohttp.ClientSession:
        """The session for URLs users give (input images): public addresses only.

        Separate from the API session: no Authorization, no cookies, and unless
        ``allow_private_urls`` every connection's resolved address is checked as
        the socket is made (DNS rebinding, redirects and IP literals included).
        """
        if self._closed:
            raise _closed_error()
        if self._user_session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                ssl=self._ssl,
                socket_factory=None if self.allow_private_urls else guarded_socket_factory,
            )
            self._user_session = self._new_session(connector, cookie_jar=aiohttp.DummyCookieJar())
        return self._user_session

    def _new_session(self, connector: aiohttp.BaseConnector, **extra: Any) -> aiohttp.ClientSession:
        """A session with the options both sessions share: timeout, User-Agent, no
        environment proxies, statuses left to the caller."""
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers={"User-Agent": f"dreamo_async/{__about__.__version__}"},
            raise_for_status=False,
            trust_env=False,
            **extra,
        )

    @property
    def is_open(self) -> bool:
        return any(s is not None and not s.closed for s in (self._session, self._user_session))

    async def aclose(self) -> None:
        """Close the sessions and their connections."""
        self._closed = True
        for session in (self._session, self._user_session):
            if session is not None and not session.closed:
                await session.close()

    def _auth_headers(self) -> dict[str, str]:
        """The Authorization header (built once: the key never changes; never mutated)."""
        if self._auth is None:
            raise ConfigurationError(
                "no API key: pass DreamOClient(api_key=...) or set DREAMO_API_KEY "
                "(or VTRIX_API_KEY) in the environment"
            )
        return self._auth

    # -- the two calls -------------------------------------------------------------

    async def create(
        self,
        body: bytes | BodyParts,
        *,
        request_id: str | None = None,
        before_send: Callable[[str], Awaitable[None]] | None = None,
        lifecycle: JobLifecycle | None = None,
    ) -> Task:
        """Send a create request; retried only while no task can exist.

        ``before_send(request_id)`` is awaited once, before the rate slot is taken (a
        slow hook must not spend a slot granted for now): a journal records "outcome
        unknown from here on" durably before any task can exist. Only a documented
        refusal (400-class with a provider code, 401, 403, 429) or a connection never
        made means no task exists; any other failure after the body may have left
        raises :class:`CreateOutcomeUnknownError`, never re-sent. ``lifecycle`` is moved along as
        the body leaves, is refused, makes a task or meets an unknown outcome.
        """
        request_id = request_id or secrets.token_hex(16)
        job = lifecycle if lifecycle is not None else JobLifecycle()
        headers = {
            **self._auth_headers(),
            "Content-Type": "application/json",
            "X-Request-Id": request_id,
        }
        url = self._create_url
        timeout = self._create_timeout if type(body) is bytes else self._timeout
        if before_send is not None:
            # Before the rate slot: a slow hook (a journal's fsync) must not hold a slot
            # granted for "now", or creates granted apart leave together.
            await before_send(request_id)
        attempt = 0
        while True:
            attempt += 1
            # The limiter of this attempt: its answer is recorded into the limiter that
            # granted it (not into one learned meanwhile from other requests' 429s).
            limiter, unlimited = self.limiter, self._unlimited
            if unlimited is None or not unlimited.never_paused:
                await limiter.acquire(Priority.CREATE)
            pacing = _PACING.set(limiter) if unlimited is None else None
            job.sending(request_id)
            try:
                async with self.session.post(
                    url,
                    data=body,
                    headers=headers,
                    timeout=timeout,
                    allow_redirects=False,  # a redirect is an answer, never a second request
                ) as response:
                    status = response.status
                    if unlimited is None:  # UnlimitedLimiter.record does nothing
                        limiter.record(status)
                    elif self._learn is not None and status != 429:
                        self._answers += 1
                    if _plain_within(response, self.limits.max_response_bytes):
                        payload = await response.read()
                    else:
                        payload = await self._read_capped(response, request_id=request_id)
                    if 200 <= status < 300:
                        outcome = _created_task(payload, status, request_id)
                        if isinstance(outcome, Task):
                            job.created(outcome.id)
                            return outcome
                        error = outcome
                    else:
                        error = self._error_from_response(status, payload, response, request_id)
            except _NOT_SENT_ERRORS as exc:
                # The connection was never made: no task can exist, so sending again is safe.
                job.refused()
                if attempt < self.retry.max_attempts:
                    await self._backoff(attempt, None, "create", exc)
                    continue
                raise APIConnectionError(
                    f"could not connect to {self.endpoints.base_url}: {exc} "
                    f"(after {attempt} attempts; no task was created)"
                ) from exc
            except CreateOutcomeUnknownError:
                job.outcome_unknown()
                raise
            except (ConfigurationError, ClientClosedError):
                raise
            except Exception as exc:
                # A cut answer, a read timeout, an answer over the cap...: the body may
                # have reached the service, so whatever went wrong, the outcome is unknown.
                job.outcome_unknown()
                raise CreateOutcomeUnknownError(
                    f"the create request failed after it was sent ({type(exc).__name__}: {exc})",
                    request_id=request_id,
                ) from exc
            finally:
                if pacing is not None:
                    _PACING.reset(pacing)
            if isinstance(error, RateLimitError):
                # 429: the service refused, so no task exists; safe to send again.
                job.refused()
                self._on_rate_limited(error)
                if attempt < self.retry.max_attempts and self._hint_ok(error):
                    await self._backoff(attempt, self._hint(error), "create", error)
                    continue
                raise error
            if _documented_refusal(error):
                job.refused()  # 400-class with the provider's code, 401, 403
                raise error
            # Anything else (5xx, 3xx, 404, 405, 413, an unexpected 2xx without a task...)
            # is not documented as "nothing was created": never re-sent.
            job.outcome_unknown()
            raise CreateOutcomeUnknownError(
                f"the service answered the create request with HTTP {error.status}: "
                f"{error.message}",
                request_id=request_id,
            ) from error

    async def get_task(self, task_id: str, *, deadline: float | None = None) -> Task:
        """One poll of a task (retried on transient failures); errors name the task.

        Without ``deadline`` (a one-off poll) failures are retried up to
        ``RetryPolicy.max_attempts``. With one (the loop-clock time a job's deadline
        falls, ``math.inf`` for none) the task exists and is paid: connection errors,
        5xx and 429 are retried for as long as the deadline allows, and no backoff
        sleeps past it (:class:`TaskTimeoutError` then). Unreadable answers are
        retried up to ``max_attempts`` either way, then raise ResponseFormatError.
        """
        url = self._task_url(task_id)
        headers = self._auth_headers()
        timeout = self._poll_timeout
        cap = self.limits.max_response_bytes
        attempt = 0
        while True:
            attempt += 1
            if attempt > 1 and deadline is not None and deadline != math.inf:
                # A retry never outlives the job's deadline (the first attempt's caller
                # arms its own timer when the deadline is near).
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining < (timeout.total or math.inf):
                    timeout = aiohttp.ClientTimeout(
                        total=max(remaining, 0.0) + _DEADLINE_GRACE_S, sock_connect=30.0
                    )
            limiter, unlimited = self.limiter, self._unlimited
            if unlimited is None or not unlimited.never_paused:
                await limiter.acquire(Priority.POLL)
            pacing = _PACING.set(limiter) if unlimited is None else None
            try:
                async with self.session.get(
                    url,
                    headers=headers,
                    timeout=timeout,
                    allow_redirects=False,  # a redirect is an answer, never a second request
                    # Paced requests only: without a limiter a re-send costs no slot (and
                    # the middleware costs every poll a coroutine).
                    middlewares=None if unlimited is not None else _NO_SILENT_RESEND,
                ) as response:
                    status = response.status
                    if unlimited is None:
                        limiter.record(status)
                    elif self._learn is not None and status != 429:
                        self._answers += 1
                    if _plain_within(response, cap):
                        payload = await response.read()
                    else:
                        payload = await self._read_capped(response)
                    if status == 200:
                        return _polled_task(payload, status)
                    raise self._error_from_response(status, payload, response, None)
            except Exception as exc:
                error: Exception = exc
                try:
                    hint = self._retry_hint(exc, attempt, f"poll {task_id}", deadline is not None)
                except DreamOError as final:
                    if final.task_id is None:  # the caller can resume or report it
                        final.task_id = task_id
                    raise
            finally:
                if pacing is not None:
                    _PACING.reset(pacing)
            await self._backoff(attempt, hint, f"poll {task_id}", error, deadline=deadline)
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                raise TaskTimeoutError(task_id, 0.0)

    async def download(self, url: str, max_bytes: int, *, untrusted: bool = False) -> bytes:
        """GET ``url`` into memory, streamed and capped at ``max_bytes``; retried.

        For input images given as URLs (a few MB at most); results go to disk with
        :meth:`download_stream`. Same rules: see there.
        """
        chunks: list[bytes] = []

        def begin() -> Callable[[bytes], None]:
            chunks.clear()  # a retry starts afresh
            return chunks.append

        await self.download_stream(url, max_bytes, begin, untrusted=untrusted)
        return b"".join(chunks)

    async def download_stream(
        self,
        url: str,
        max_bytes: int,
        begin: Callable[[], Callable[[bytes], None]],
        *,
        untrusted: bool = False,
    ) -> int:
        """GET ``url`` streamed chunk by chunk into a sink; retried; returns the byte count.

        Only ``http``/``https``. ``untrusted=True`` (a URL a user gave) goes through
        :attr:`user_session`: private, loopback and link-local addresses are refused
        unless ``allow_private_urls``. ``begin()`` is called at the start of every
        attempt and returns the sink for that attempt's chunks (so a retry starts a
        fresh file). More than ``max_bytes`` — counted after decompression, so a
        small gzip bomb cannot get past the cap — raises :class:`DownloadError` at
        once: the same URL would only send the same bytes again.
        """
        check_url(url, allow_private=self.allow_private_urls or not untrusted)
        session = self.user_session if untrusted else self.session
        shown = display_url(url)

        async def once() -> int:
            try:
                async with session.get(url) as response:
                    if response.status != 200:
                        payload = await self._read_capped(response)
                        raise self._error_from_response(response.status, payload, response, None)
                    declared = response.content_length
                    if declared is not None and declared > max_bytes and _identity(response):
                        raise DownloadError(
                            f"{shown}: {declared} bytes exceed the {max_bytes}-byte cap"
                        )
                    sink = begin()
                    size = 0
                    async for chunk in response.content.iter_chunked(64 * 1024):
                        size += len(chunk)
                        if size > max_bytes:
                            raise DownloadError(f"{shown}: more than the {max_bytes}-byte cap")
                        sink(chunk)
                    return size
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, BlockedAddressError):
                    raise InvalidRequestError(
                        f"refusing to download {shown}: {exc.os_error.reason}; "
                        "pass DreamOClient(allow_private_urls=True) to allow it",
                        parameter="url",
                    ) from None
                raise

        return await self._retried(once, f"download {shown}")

    # -- helpers -------------------------------------------------------------------

    async def _retried(self, once: Callable[[], Awaitable[_T]], what: str) -> _T:
        """Run an idempotent request (a download) until it succeeds or may not be retried.

        Downloads are not API calls: the rate limiter does not count them.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return await once()
            except Exception as exc:
                error: Exception = exc
                hint = self._retry_hint(exc, attempt, what)
            await self._backoff(attempt, hint, what, error)

    def _retry_hint(
        self, exc: Exception, attempt: int, what: str, task_exists: bool = False
    ) -> float | None:
        """After a failed idempotent attempt: the delay hint to retry with, or raise.

        429 (the cool-down is set), 5xx, unreadable answers and network errors are
        retried until ``max_attempts``; anything else is raised as it is. For the poll
        of a task that exists (``task_exists``), 429, 5xx and network errors are
        transient whatever their number: the caller's deadline bounds them.
        """
        if isinstance(exc, RateLimitError):
            self._on_rate_limited(exc)
            if task_exists:
                return min(self._hint(exc), self.retry.max_retry_after)
            if attempt >= self.retry.max_attempts or not self._hint_ok(exc):
                raise exc
            return self._hint(exc)
        if isinstance(exc, ServerError) and task_exists:
            return None
        if isinstance(exc, _RETRIED_API_ERRORS):
            if attempt >= self.retry.max_attempts:
                raise exc
            return None
        if isinstance(exc, _TRANSPORT_ERRORS):
            if task_exists:
                return None
            if attempt >= self.retry.max_attempts:
                raise APIConnectionError(
                    f"{what}: {type(exc).__name__}: {exc} (after {attempt} attempts)"
                ) from exc
            return None
        raise exc

    def _accepted_rate(self) -> float:
        """Answers other than 429 per second so far: the count itself within the first
        second (a storm at start), the mean rate after it."""
        since = self._answers_since
        elapsed = 0.0 if since is None else asyncio.get_running_loop().time() - since
        return self._answers / elapsed if elapsed > 1.0 else float(self._answers)

    def _hint_ok(self, error: RateLimitError) -> bool:
        return error.retry_after is None or error.retry_after <= self.retry.max_retry_after

    def _hint(self, error: RateLimitError) -> float:
        """How long to hold requests after this 429: its hint, else the default pause."""
        return error.retry_after if error.retry_after is not None else self.retry.rate_limit_pause

    def _on_rate_limited(self, error: RateLimitError) -> None:
        """A 429: every request of the client waits (the hint, or the default pause),
        and a client that had no rate starts learning one (``"auto"``)."""
        if self._learn is not None:
            # Start from what the service accepted in the last second. Requests already
            # granted record into the old limiter (nothing): only answers to requests
            # the learned limiter paced teach it.
            seen = max(self._accepted_rate(), _MIN_LEARNED_START)
            self.limiter, self._unlimited = self._learn(float(seen)), None
            self._learn = None
            logger.info(
                "HTTP 429 without a configured rate: learning the service's rate from %.1f/s",
                seen,
            )
        if self._hint_ok(error):
            self.limiter.pause(self._hint(error))

    async def _backoff(
        self,
        attempt: int,
        hint: float | None,
        what: str,
        error: BaseException,
        *,
        deadline: float | None = None,
    ) -> None:
        delay = self.retry.delay(attempt, hint, self._rng)
        logger.debug("%s: retry %d in %.3f s after %s", what, attempt, delay, type(error).__name__)
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - asyncio.get_running_loop().time()))
        if delay > 0:
            await asyncio.sleep(delay)

    async def _read_capped(
        self, response: aiohttp.ClientResponse, *, request_id: str | None = None
    ) -> bytes:
        """Read an API answer, refusing more than ``Limits.max_response_bytes``.

        ``Content-Length`` is the size on the wire: for a compressed answer aiohttp
        inflates the body, so only an uncompressed answer is judged by its header (and,
        when within the cap, read in one call); any other is counted as it is
        inflated, chunk by chunk. Creates and polls test :func:`_plain_within`
        themselves and come here only for other answers; a download's error answer
        comes here directly.
        """
        limit = self.limits.max_response_bytes
        if _plain_within(response, limit):
            return await response.read()
        declared = response.content_length
        if declared is not None and _identity(response):  # over the cap, by its header
            raise ResponseFormatError(
                f"response of {declared} bytes exceeds the {limit}-byte cap",
                status=response.status,
                request_id=request_id,
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise ResponseFormatError(
                    f"response exceeds the {limit}-byte cap",
                    status=response.status,
                    request_id=request_id,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _error_from_response(
        self,
        status: int,
        payload: bytes,
        response: aiohttp.ClientResponse,
        request_id: str | None,
    ) -> APIError:
        message, code, body_hint = parse_error_body(payload, response.content_type)
        if message is None:
            kind = response.content_type or "no content type"
            message = f"HTTP {status} {response.reason or ''}".strip() + (
                f" with a non-JSON body ({kind}, {len(payload)} bytes)"
                if payload
                else " (empty body)"
            )
        if 300 <= status < 400:
            location = response.headers.get("Location")
            message += (
                f"; redirected to {location!r}, which API calls never follow "
                "(set base_url to the final address)"
                if location
                else "; a redirect without a Location"
            )
        # A server echoing the key (in the message, the code, a Location...) never prints it.
        message = self._redact(message)
        code = self._redact(code) if code is not None else None
        cls = error_class_for_status(status)
        if cls is RateLimitError:
            hint = parse_retry_after(response.headers.get("Retry-After"))
            return RateLimitError(
                message,
                retry_after=hint if hint is not None else body_hint,
                status=status,
                code=code,
                request_id=request_id,
            )
        return cls(message, status=status, code=code, request_id=request_id)

    def _redact(self, text: str) -> str:
        key = self._api_key
        if not key or key not in text:
            return text
        return text.replace(key, "<redacted>")

    def __repr__(self) -> str:
        key = "set" if self._api_key else "missing"
        return f"<Transport {self.endpoints.base_url} key={key}>"


def _check_key(api_key: str | None) -> None:
    """A key that cannot travel in a header is refused when the client is made, not at
    the first request (with aiohttp's raw ValueError)."""
    if api_key is not None and any(c in api_key for c in "\r\n\0"):
        raise ConfigurationError(
            "the API key contains a line break or NUL (a copy-paste error?): "
            "it cannot be sent in a header"
        )


async def _no_silent_resend(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Turn a dropped pooled connection into an error of our own (a client middleware).

    aiohttp re-sends an idempotent request once on a new connection when the server
    drops a pooled one, a request no rate slot paid for. Raised as
    :class:`_ConnectionLost` it reaches our retry loop instead, which takes a slot.
    """
    try:
        return await handler(request)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
        raise
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        raise _ConnectionLost(f"{type(exc).__name__}: {exc}") from exc


class _ConnectionLost(aiohttp.ClientConnectionError):
    """The connection was lost mid-request (see :func:`_no_silent_resend`)."""


_NO_SILENT_RESEND: Final = (_no_silent_resend,)

#: Statuses after which the service surely made no task (API.md): with the provider's
#: error code for 400 and 422 (a proxy's 400 page proves nothing), always for these.
_REFUSAL_STATUSES: Final = frozenset({401, 403, 429})


def _documented_refusal(error: APIError) -> bool:
    """Whether a create's error answer documents that no task was made."""
    if error.status in _REFUSAL_STATUSES:
        return True
    return error.status in (400, 422) and error.code in PROVIDER_ERROR_CODES


def _created_task(payload: bytes, status: int, request_id: str) -> Task | APIError:
    """A 2xx create answer: the task, or the service's error (an envelope's), else
    :class:`CreateOutcomeUnknownError` (an empty 204, an odd field: a task may exist)."""
    try:
        return parse_task(_json(payload, status, request_id))
    except APIError as exc:
        if isinstance(exc, ResponseFormatError) or exc.status is None:
            reason: Exception = exc
        else:  # an envelope's status code: judged as an HTTP status would be
            exc.request_id = request_id
            return exc
    except Exception as exc:  # a field no converter expected (created_at: "²")
        reason = exc
    kind = "an empty" if not payload else "an unreadable"
    raise CreateOutcomeUnknownError(
        f"the service answered the create request with HTTP {status} and {kind} body "
        f"({type(reason).__name__}: {reason})",
        request_id=request_id,
    ) from reason


def _polled_task(payload: bytes, status: int) -> Task:
    """A 200 poll answer as a task; anything unreadable is a ResponseFormatError (retried)."""
    try:
        return parse_task(_json(payload, status, None))
    except DreamOError:
        raise
    except Exception as exc:  # a field no converter expected (created_at: "²")
        raise ResponseFormatError(
            f"the poll answer could not be read ({type(exc).__name__}: {exc})", status=status
        ) from exc


#: The decoder ``json.loads`` uses, called directly (see _json).
_DECODER: Final = json.JSONDecoder()


def _json(payload: bytes, status: int, request_id: str | None) -> Mapping[str, Any]:
    try:
        try:
            # UTF-8 decoded here, then the decoder's scanner: ``json.loads(bytes)`` spends
            # as long guessing the encoding (a UTF-16/32 BOM) and skipping whitespace as
            # parsing a poll answer. Anything but one bare JSON document (whitespace
            # around it, trailing data, another encoding) goes to json.loads, which decides.
            text = payload.decode()
            data, end = _DECODER.raw_decode(text)
            if end != len(text) and not text[end:].isspace():  # a newline after it is fine
                raise ValueError("not one JSON document")
        except ValueError:
            data = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # RecursionError: [[[[... nested too deep
        raise ResponseFormatError(
            f"the answer is not valid JSON ({len(payload)} bytes)",
            status=status,
            request_id=request_id,
        ) from exc
    if type(data) is not dict:  # a JSON object decodes to a dict, and to nothing else
        raise ResponseFormatError(
            f"the answer is JSON {type(data).__name__}, expected an object",
            status=status,
            request_id=request_id,
        )
    return data


def _closed_error() -> ClientClosedError:
    """A request after ``aclose`` (a retry that woke up late): typed, never aiohttp's own
    ``RuntimeError('Session is closed')``, and never a new session that would leak."""
    return ClientClosedError("the client is closed; no request is sent")


#: Characters left as they are in a URL path (RFC 3986 pchar, plus "/" and "%").
_PATH_SAFE: Final = "/%:@!$&'()*+,;=-._~"


def _task_url_maker(endpoints: Endpoints) -> Callable[[str], URL | str]:
    """``task_id -> URL`` of its poll. Parsing a URL string costs ~3.6 µs, and every
    poll URL is new; with a ``{id}`` template the URL is built from parts already
    parsed (~1 µs), the id percent-encoded. Other templates are formatted as text."""
    base = endpoints.base_url.rstrip("/")
    head, sep, tail = endpoints.task_path.partition("{id}")
    if not sep or any(c in head + tail for c in "{}?#"):  # a format spec, a query...
        return lambda task_id: base + endpoints.task_path.format(id=quote(task_id, safe=""))
    origin = URL(base)
    prefix = origin.raw_path.rstrip("/") + quote(head, safe=_PATH_SAFE)
    suffix = quote(tail, safe=_PATH_SAFE)

    def task_url(task_id: str) -> URL:
        quoted = task_id if task_id.isalnum() and task_id.isascii() else quote(task_id, safe="")
        return origin.with_path(prefix + quoted + suffix, encoded=True)

    return task_url


def _plain_within(response: aiohttp.ClientResponse, cap: int) -> bool:
    """An answer whose ``Content-Length`` is within ``cap`` and that aiohttp will not
    inflate: read in one call. ``_read_capped``'s fast path; the two calls of the API
    test it first, without that coroutine (every poll runs it), and send every other
    answer to ``_read_capped``, which refuses or counts what it reads.
    """
    declared = response.content_length
    return (
        declared is not None
        and declared <= cap
        and ("Content-Encoding" not in response.headers or _identity(response))
    )


def _identity(response: aiohttp.ClientResponse) -> bool:
    """Whether the body arrives as sent: no ``Content-Encoding`` for aiohttp to inflate."""
    return response.headers.get("Content-Encoding", "identity").strip().lower() in ("", "identity")
